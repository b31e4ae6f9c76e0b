"""scripts/bench-peers' own pieces, offline: the V2 wire it speaks, the identical-output check (against the
in-process floor, a real V2 gRPC server and the real agent), the loopback check, the virtualenv cache and the
table writer. The real peer runs install from PyPI and are not part of the suite."""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from agent.config import AgentConfig
from agent.core.package import build_package, load_package
from agent.core.pipeline import Predictor
from agent.tools.bench import peers
from agent.tools.bench.benchmark import agent_process, detect_requests, make_frame, start_model, wait_ready
from agent.tools.bench.peer_servers.common import infer
from agent.tools.bench.peer_servers.grpcio_v2 import V2Servicer, serve
from agent.tools.modelgen import build_tiny

FRAME = make_frame(160, 120)  # small: the pieces are what is tested, not the speed


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("peers")
    onnx = build_tiny(root / "onnx" / "model.onnx")
    build_package(onnx, root / "models" / "tiny", name="tiny")
    return root / "models"


@pytest.fixture(scope="module")
def predictor(models_dir: Path) -> Predictor:
    from agent.app import onnx_runtime

    package = load_package(models_dir / "tiny")
    return Predictor(package, onnx_runtime(AgentConfig.from_sources(cli={"execution_providers": "cpu"})).load(package))


class Tampered(V2Servicer):
    """The reference server answering like MLServer does (1-D tensors get an extra axis), optionally with one
    mask byte flipped: what the output check must accept, and what it must catch."""

    def __init__(self, predictors: dict[str, Any], tamper: bool) -> None:
        super().__init__(predictors)
        self.tamper = tamper

    def outputs(self, model: str, frame: np.ndarray) -> dict[str, np.ndarray]:
        out = {k: (v.reshape(1, -1) if v.ndim == 1 else v) for k, v in super().outputs(model, frame).items()}
        if self.tamper:
            out["mask"] = out["mask"].copy()
            out["mask"][0, 0, 0] ^= 1
        return out


@pytest.fixture
def v2_channel(tmp_path: Path, predictor: Predictor, request: pytest.FixtureRequest) -> Iterator[grpc.Channel]:
    address = f"unix://{tmp_path}/v2.sock"
    server = serve(Tampered({"tiny": predictor}, tamper=getattr(request, "param", False)), address, workers=2)
    try:
        with grpc.insecure_channel(address) as channel:
            yield channel
    finally:
        server.stop(None)


def test_a_v2_answer_is_identical_to_the_floor(v2_channel: grpc.Channel, predictor: Predictor) -> None:
    request_cls, response_cls = peers.v2_messages()
    call = peers.v2_caller(v2_channel, response_cls, peers.v2_request(request_cls, "tiny", FRAME))
    got = peers.v2_outputs(call())
    assert got["mask"].shape == (120, 160, 3) and got["score"].shape == (1, 1)
    assert peers.compare(infer(predictor, FRAME), got) == []


def test_the_reference_server_rejects_a_malformed_request(v2_channel: grpc.Channel) -> None:
    request_cls, response_cls = peers.v2_messages()
    request = peers.v2_request(request_cls, "tiny", FRAME)
    request.inputs[0].shape[:] = [120, 161, 3]  # one column more than the bytes hold
    with pytest.raises(grpc.RpcError) as err:
        peers.v2_caller(v2_channel, response_cls, request)()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not match" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        peers.v2_caller(v2_channel, response_cls, peers.v2_request(request_cls, "other", FRAME))()
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("v2_channel", [True], indirect=True)
def test_a_single_differing_mask_byte_is_reported(v2_channel: grpc.Channel, predictor: Predictor) -> None:
    request_cls, response_cls = peers.v2_messages()
    got = peers.v2_outputs(peers.v2_caller(v2_channel, response_cls, peers.v2_request(request_cls, "tiny", FRAME))())
    assert peers.compare(infer(predictor, FRAME), got) == [f"mask: 1 of {120 * 160 * 3} values differ"]


def test_compare_names_each_kind_of_difference(predictor: Predictor) -> None:
    want = infer(predictor, FRAME)
    assert peers.compare(want, dict(want)) == []
    off = dict(want, score=want["score"] + np.float32(1e-3), is_anomalous=~want["is_anomalous"])
    problems = peers.compare(want, off)
    assert len(problems) == 2 and problems[0].startswith("score differs by 0.001")
    assert problems[1] == "is_anomalous: 1 of 1 values differ"
    assert peers.compare(want, {"score": want["score"], "mask": want["mask"][:1]}) == [
        "is_anomalous missing", f"mask: {160 * 3} values, expected {120 * 160 * 3}"]


def test_the_agents_answer_is_identical_to_the_floor(tmp_path: Path, models_dir: Path, predictor: Predictor) -> None:
    from agent.client import channel
    from agent.serving.grpc._generated import edge_agent_pb2 as pb
    from agent.serving.grpc._generated import edge_agent_pb2_grpc as pb_grpc

    with ExitStack() as stack:
        proc, socket_uri = stack.enter_context(agent_process(tmp_path, models_dir, []))
        stub = pb_grpc.EdgeAgentStub(stack.enter_context(channel(socket_uri)))
        wait_ready(proc, stub, pb, ("tiny",), tmp_path / "agent.log")
        start_model(stub, pb, "tiny")
        inline, via_shm = detect_requests(stack, "tiny", FRAME, f"/ea-test-peers-{os.getpid()}")
        got = peers.agent_outputs(stub.DetectAnomalies(inline, timeout=60))
        assert peers.compare(infer(predictor, FRAME), got) == []
        # and the interleaved rounds run on the floor and this agent, ratios to the floor
        rows = peers.interleaved({"floor": [lambda: infer(predictor, FRAME)],
                                  "agent-bytes": [lambda: stub.DetectAnomalies(inline, timeout=60)]},
                                 total=6, cap_s=10.0, rounds=2, model="tiny", clients=1)
        assert [(r.mode, r.requests) for r in rows] == [("floor", 6), ("agent-bytes", 6)]
        assert rows[0].ratio_p50 == 1.0 and math.isfinite(rows[1].ratio_p90) and rows[1].throughput > 0
        assert all(r.round_spread >= 1.0 for r in rows)


def test_listening_sockets_are_found_and_only_loopback_passes() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert f"127.0.0.1:{port}" in peers.listening_addresses(os.getpid())
    assert f"127.0.0.1:{port}" not in peers.listening_addresses(os.getpid())
    assert peers.is_loopback("127.0.0.1:8001") and peers.is_loopback("::ffff:127.0.0.1:8001")
    assert peers.is_loopback("::1:8001")
    assert not peers.is_loopback("0.0.0.0:8001") and not peers.is_loopback(":::8001")
    assert not peers.is_loopback("10.0.0.5:8001")


def test_a_built_virtualenv_is_reused_while_its_pins_are_unchanged(tmp_path: Path) -> None:
    peer = peers.PEERS["kserve"]
    home = tmp_path / peer.key
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "python").write_text("")
    (home / ".requirements").write_text("\n".join(peers.requirements(peer)) + "\n")
    assert peers.build_venv(tmp_path, peer, log=pytest.fail) is None  # no pip, no log line
    reqs = peers.requirements(peer)
    assert reqs[0] == "kserve==0.21.0" and all("==" in r for r in reqs)


def _report() -> peers.PeerReport:
    report = peers.PeerReport({"cpu": "TestCPU", "usable_cores": 2, "memory": "1 GiB", "os": "Linux", "python": "3"},
                              {"frame": "640x480", "rounds": 2, "cap_s": 8.0, "scale": 1.0,
                               "peers": ["kserve", "mlserver"]})
    report.rows = [peers.Row("tiny", 1, "floor", 10, 2.0, 3.0, 4.0, 400.0),
                   peers.Row("tiny", 1, "agent-bytes", 10, 4.0, 6.0, 8.0, 200.0),
                   peers.Row("tiny", 1, "kserve", 10, 8.0, 9.0, 12.0, 100.0, capped=True)]
    peers.apply_ratios(report.rows)
    report.servers = {"agent": {"title": "edge-agent (this tree)", "cold_start_s": 1.1, "rss_mb": 120.0,
                                "versions": {"grpcio": "1"}, "identical": {"tiny": []}, "notes": "LFV"},
                      "kserve": {"title": "KServe 0.21.0", "cold_start_s": 2.8, "versions": {"kserve": "0.21.0"},
                                 "identical": {"tiny": []}, "notes": "patched"}}
    report.failed = {"mlserver": "install: pip failed (1): no matching distribution"}
    return report


def test_the_table_goes_into_benchmarks_md_and_is_replaced_on_the_next_run(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhand-written text\n\n## How to run\n\nscripts/bench\n")
    report = _report()
    peers.write_report(report, tmp_path, plot=False)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written text\n\n" + peers.BEGIN + "\n## Peers\n")
    assert text.index(peers.END) < text.index("## How to run") and text.endswith("scripts/bench\n")
    assert "| tiny | 1 | edge-agent, byte_data | 10 | 4.00 | 6.00 | 200.0 | 2.00 | 2.00 | 0.50 |" in text
    assert "| tiny | 1 | KServe 0.21.0 | 10* | 8.00 | 9.00 | 100.0 | 4.00 | 3.00 | 0.25 |" in text
    assert "| KServe 0.21.0 | kserve 0.21.0 | 2.80 | — | identical | patched |" in text
    assert "Peers asked for: KServe 0.21.0, MLServer 1.7.1. Not in the table" in text
    assert "- **MLServer 1.7.1**: install: pip failed (1): no matching distribution" in text
    assert json.loads((tmp_path / "benchmarks-peers.json").read_text())["rows"][1]["ratio_p50"] == 2.0

    report.rows[1].p50_ms = 6.0
    peers.apply_ratios(report.rows)
    peers.write_report(report, tmp_path, plot=False)
    again = doc.read_text()
    assert again.count(peers.BEGIN) == 1 and again.count("## Peers") == 1 and "| 6.00 | 6.00 | 200.0 | 3.00 |" in again
    assert again.split(peers.BEGIN)[0] == text.split(peers.BEGIN)[0]
    assert again.split(peers.END)[1] == text.split(peers.END)[1]


def test_rewrite_puts_the_section_back_from_the_saved_report(tmp_path: Path) -> None:
    peers.write_report(_report(), tmp_path, plot=False)
    section = peers.markdown(_report(), None)
    # what scripts/bench does: benchmarks.md written anew, without the section
    (tmp_path / "benchmarks.md").write_text("# Benchmarks\n\nnew run\n\n## How to run\n\nscripts/bench\n")
    assert peers.main(["--out", str(tmp_path), "--rewrite"]) == 0
    text = (tmp_path / "benchmarks.md").read_text()
    assert all(line in text for line in section.splitlines())  # (plus the plot, where matplotlib is installed)
    assert text.index("new run") < text.index(peers.BEGIN) < text.index("## How to run")


def test_a_benchmark_run_keeps_the_peers_section(tmp_path: Path) -> None:
    """scripts/bench rewrites benchmarks.md from its own run and carries the Peers section over unchanged."""
    from agent.tools.bench import benchmark

    peers.write_report(_report(), tmp_path, plot=False)
    before = (tmp_path / "benchmarks.md").read_text()
    section = before.split(peers.BEGIN)[1].split(peers.END)[0]
    machine = {k: "x" for k in ("cpu", "usable_cores", "cores", "memory", "os", "python", "onnxruntime", "grpcio",
                                "protobuf", "numpy", "pillow")}
    run = benchmark.Report(machine=machine, settings={"rounds": 1, "scale": 1.0, "cap_s": 1.0, "agent_args": []},
                           results=[benchmark.Result("tiny", "640x480", "floor", 1, 5, 1.0, 2.0, 1.0, 100.0)])
    for _ in range(2):
        benchmark.write_report(run, tmp_path, plot=False, notes="notes of this run")
        text = (tmp_path / "benchmarks.md").read_text()
        assert text.count(peers.BEGIN) == 1 and text.split(peers.BEGIN)[1].split(peers.END)[0] == section
        assert text.index("notes of this run") < text.index(peers.BEGIN) < text.index("## How to run")
        assert "| tiny | 640x480 | 1 | floor |" in text
    # `scripts/bench --rewrite`: the same document again from benchmarks.json and benchmarks-notes.md.
    (tmp_path / "benchmarks-notes.md").write_text("notes of this run\n")
    assert benchmark.main(["--out", str(tmp_path), "--rewrite", "--no-plot"]) == 0
    assert (tmp_path / "benchmarks.md").read_text() == text


def test_a_row_group_whose_floor_ran_under_outside_load_is_flagged(tmp_path: Path) -> None:
    report = _report()
    assert "**noisy**" not in peers.markdown(report)  # floor p90 3.0 = 1.5x its p50
    report.rows[0].p90_ms = 5.0
    text = peers.markdown(report)
    assert "| tiny | 1 | floor (in-process Predictor) — **noisy**: p90 2.5× p50 | 10 |" in text
    report.rows[0].p90_ms, report.rows[0].round_spread = 3.0, 1.6  # quiet within rounds, load moved between them
    assert "— **noisy**: p90 1.5× p50, round p50s 1.6× apart |" in peers.markdown(report)
    assert "its ratios can swing by 2× between runs" in text
