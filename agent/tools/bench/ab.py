"""`edge-agent bench-ab`: two agent builds side by side, same client, interleaved — for one change.

`edge-agent bench` compares the agent with the in-process floor; run twice (before / after a change) its
numbers drift with the shared machine's load by more than most single changes are worth. Here both
agents run at once, each from its own source tree (the baseline is a git revision checked out into a
temporary worktree), and the client alternates blocks of requests between them in ABBA order, so drift
hits both alike. Besides p50/p90 it reads each agent's minor page faults and CPU ticks per request from
/proc, which is what exposed glibc's mmap page-fault storms (docs/benchmarks-notes.md).

Not for CI: like the benchmark, it measures time on whatever machine it runs on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.tools.bench.benchmark import (
    FRAMES,
    ROOT,
    agent_process,
    build_models,
    detect_requests,
    make_frame,
    start_model,
    wait_ready,
)


@dataclass
class Side:
    label: str
    p50_ms: float
    p90_ms: float
    faults_per_request: float
    cpu_ticks_per_request: float  # utime + stime in clock ticks (os.sysconf("SC_CLK_TCK") per second)
    throughput: float = 0.0  # requests per second while this side's blocks ran


def proc_counters(pid: int) -> tuple[int, int]:
    """(minor page faults, utime + stime ticks) of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[11]) + int(fields[12])


@contextmanager
def baseline_tree(rev: str) -> Iterator[Path]:
    """`rev` of this repository checked out into a temporary git worktree."""
    path = Path(tempfile.mkdtemp(prefix="ea-ab-base-", dir="/tmp"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), rev], check=True,
                   capture_output=True, text=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def run_ab(baseline: Path, candidate: Path, *, model: str = "tiny", frame: str = "640x480", mode: str = "bytes",
           blocks: int = 20, per_block: int = 25, baseline_args: tuple[str, ...] = (),
           candidate_args: tuple[str, ...] = (), clients: int = 1,
           log: Callable[[str], None] = print) -> tuple[Side, Side]:
    """clients: concurrent clients per block (each with its own channel and, for shm, its own segments)."""
    from agent.client import channel
    from agent.serving.grpc._generated import edge_agent_pb2 as pb
    from agent.serving.grpc._generated import edge_agent_pb2_grpc as pb_grpc

    width, height = FRAMES[frame]
    work = Path(tempfile.mkdtemp(prefix="ea-ab-", dir="/tmp"))  # short: AF_UNIX paths are limited
    try:
        models_dir = work / "models"
        models_dir.mkdir()
        build_models(models_dir, work / "onnx", (model,))
        image = make_frame(width, height)
        with ExitStack() as stack:
            procs, stubs = [], []
            for tag, tree, extra in (("a", baseline, baseline_args), ("b", candidate, candidate_args)):
                proc, uri = stack.enter_context(agent_process(work, models_dir, list(extra), tree=tree, tag=tag))
                side_stubs = [pb_grpc.EdgeAgentStub(stack.enter_context(channel(uri))) for _ in range(clients)]
                wait_ready(proc, side_stubs[0], pb, (model,), work / f"{tag}.log")
                start_model(side_stubs[0], pb, model)
                procs.append(proc)
                stubs.append(side_stubs)
            requests = []
            for i in range(clients):
                inline, via_shm = detect_requests(stack, model, image, f"/edge-agent-ab-{os.getpid()}-{i}")
                requests.append(inline if mode == "bytes" else via_shm)
            for side_stubs in stubs:
                for stub, request in zip(side_stubs, requests):
                    for _ in range(5):
                        stub.DetectAnomalies(request, timeout=300)
            latencies: list[list[float]] = [[], []]
            walls = [0.0, 0.0]
            before = [proc_counters(p.pid) for p in procs]
            for block in range(blocks):
                for side in ((0, 1) if block % 2 == 0 else (1, 0)):  # ABBA: neither side always goes first
                    t0 = time.perf_counter()
                    latencies[side] += _block(stubs[side], requests, per_block)
                    walls[side] += time.perf_counter() - t0
            after = [proc_counters(p.pid) for p in procs]
        sides = []
        for i, label in enumerate(("baseline", "candidate")):
            ms = np.asarray(latencies[i]) * 1000.0
            n = len(ms)
            sides.append(Side(label, float(np.percentile(ms, 50)), float(np.percentile(ms, 90)),
                              (after[i][0] - before[i][0]) / n, (after[i][1] - before[i][1]) / n, n / walls[i]))
        for s in sides:
            log(f"{s.label:9} {model} {frame} {mode} x{clients}: p50 {s.p50_ms:8.2f} ms  p90 {s.p90_ms:8.2f} ms  "
                f"{s.throughput:8.1f} req/s  page faults/request {s.faults_per_request:9.1f}  "
                f"CPU ticks/request {s.cpu_ticks_per_request:.3f}")
        log(f"candidate / baseline: p50 {sides[1].p50_ms / sides[0].p50_ms:.3f}, throughput "
            f"{sides[1].throughput / sides[0].throughput:.3f}, CPU "
            f"{_ratio(sides[1].cpu_ticks_per_request, sides[0].cpu_ticks_per_request)}")
        return sides[0], sides[1]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _block(stubs: list[Any], requests: list[Any], per_block: int) -> list[float]:
    """per_block requests from each client at once (one thread per client); their latencies in seconds."""
    out: list[list[float]] = [[] for _ in stubs]

    def client(i: int) -> None:
        for _ in range(per_block):
            t0 = time.perf_counter()
            stubs[i].DetectAnomalies(requests[i], timeout=300)
            out[i].append(time.perf_counter() - t0)

    if len(stubs) == 1:
        client(0)
    else:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(stubs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return [x for lat in out for x in lat]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a (too few ticks: raise --blocks)"


def run(args: argparse.Namespace) -> int:
    if args.frame not in FRAMES:
        print(f"edge-agent bench-ab: unknown frame {args.frame!r} (one of {', '.join(FRAMES)})", file=sys.stderr)
        return 2
    with ExitStack() as stack:
        baseline = Path(args.baseline_tree) if args.baseline_tree else stack.enter_context(baseline_tree(args.rev))
        run_ab(baseline, ROOT, model=args.model, frame=args.frame, mode=args.mode, blocks=args.blocks,
               per_block=args.per_block, baseline_args=tuple(args.baseline_arg),
               candidate_args=tuple(args.candidate_arg), clients=args.clients)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("bench-ab", help="A/B two agent builds side by side (not for CI)",
                              description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rev", default="HEAD", help="baseline git revision of this repository (default HEAD; the "
                   "candidate is the working tree)")
    p.add_argument("--baseline-tree", help="use this source tree as the baseline instead of --rev")
    p.add_argument("--model", choices=("tiny", "patchcore"), default="tiny")
    p.add_argument("--frame", default="640x480", help="one of " + ", ".join(FRAMES))
    p.add_argument("--mode", choices=("bytes", "shm"), default="bytes")
    p.add_argument("--blocks", type=int, default=20, help="blocks of requests per side (default 20)")
    p.add_argument("--per-block", type=int, default=25, help="requests per block and client (default 25)")
    p.add_argument("--clients", type=int, default=1, help="concurrent clients, each with its own channel "
                   "(default 1)")
    p.add_argument("--baseline-arg", action="append", default=[], help="extra `serve` argument for the baseline")
    p.add_argument("--candidate-arg", action="append", default=[], help="extra `serve` argument for the "
                   "candidate, e.g. --candidate-arg=--malloc-mmap-threshold-mb --candidate-arg=0")
    p.set_defaults(func=run)
