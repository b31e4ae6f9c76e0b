"""The benchmark runs end to end and writes a well-formed report. No timing assertions: the
benchmark itself is the performance guard (docs/benchmarks.md), CI machines are too noisy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from agent.tools.bench import benchmark as bench

pytestmark = pytest.mark.slow


def test_bench_writes_a_well_formed_report(tmp_path: Path) -> None:
    report = bench.run_bench(tmp_path, models=("tiny", "patchcore"), frames=("640x480",), concurrency=(1, 2),
                             scale=0.02, cap_s=5.0, rounds=1, plot=True, log=lambda _: None)

    rows = {(r.model, r.frame, r.mode, r.clients) for r in report.results}
    assert rows == {(m, "640x480", mode, c) for m in ("tiny", "patchcore") for mode in bench.MODES for c in (1, 2)}
    for r in report.results:
        assert r.requests >= 1
        assert 0 < r.p50_ms <= r.p99_ms and r.throughput > 0
        assert math.isfinite(r.ratio_p50) and math.isfinite(r.ratio_throughput)
        if r.mode == "floor":
            assert r.ratio_p50 == 1.0
    assert report.rss_idle_mb > 0 and report.cold_start_s > 0 and report.rss_after_mb > 0
    bounds = {t[0]: t[5] for t in bench.targets(report)}
    # every agent/floor latency target is shown next to its grpcio-only bound, which is above 1
    assert bounds["p50 agent/floor, shm, 640x480, tiny, 1 client"] > 1.0
    assert "| grpcio-shm |" in (tmp_path / "benchmarks.md").read_text()

    md = (tmp_path / "benchmarks.md").read_text()
    assert "## Targets" in md and "## Results" in md and "## How to run" in md
    assert "| tiny | 640x480 | 1 | bytes |" in md and report.machine["cpu"] in md
    data = json.loads((tmp_path / "benchmarks.json").read_text())
    assert len(data["results"]) == 2 * 2 * len(bench.MODES) and data["machine"]["onnxruntime"]
    assert {t["target"] for t in data["targets"]} >= {"agent RSS with no model running (MB)"}
    png = tmp_path / "benchmarks.png"
    try:
        import matplotlib  # noqa: F401  (the bench extra)
    except ImportError:
        assert not png.exists()  # the plot is written only where matplotlib is installed
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cli_is_registered() -> None:
    from agent.cli import build_parser

    args = build_parser().parse_args(["bench", "--models", "tiny", "--frames", "640x480", "--clients", "1",
                                      "--scale", "0.1", "--out", "/tmp/x"])
    assert args.func is bench.run and args.models == ("tiny",) and args.clients == (1,)


def test_bench_ab_runs_two_builds_side_by_side() -> None:
    from agent.tools.bench import ab as bench_ab

    lines: list[str] = []
    with bench_ab.baseline_tree("HEAD") as baseline:
        assert (baseline / "agent" / "__init__.py").is_file()
        a, b = bench_ab.run_ab(baseline, bench.ROOT, frame="640x480", mode="shm", blocks=2, per_block=3,
                               candidate_args=("--malloc-mmap-threshold-mb", "0"), clients=2, log=lines.append)
    assert not baseline.exists()  # the worktree is removed again
    for side in (a, b):
        assert 0 < side.p50_ms <= side.p90_ms
        assert side.faults_per_request >= 0 and side.cpu_ticks_per_request >= 0
        assert side.throughput > 0
    assert (a.label, b.label) == ("baseline", "candidate")
    assert lines[-1].startswith("candidate / baseline: p50 ") and "throughput" in lines[-1]
    assert " x2: " in lines[0]  # two concurrent clients per side


def test_bench_ab_cli_is_registered() -> None:
    from agent.cli import build_parser
    from agent.tools.bench import ab as bench_ab

    args = build_parser().parse_args(["bench-ab", "--rev", "HEAD~1", "--mode", "shm", "--frame", "1920x1080"])
    assert args.func is bench_ab.run and args.rev == "HEAD~1" and args.mode == "shm"
