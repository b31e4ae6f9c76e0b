"""`edge-agent bench`: what the agent adds on top of running the model itself, in one run.

For every model × frame size × concurrency it measures, on the same frames:

* ``floor``  — in-process: the agent's own :class:`~agent.pipeline.Predictor` with the *reference*
  pre-processing (Pillow bilinear resize with reducing_gap 3.0, /255, NCHW: ``fast_reduce=False``, so
  the agent's faster resize of large frames shows as a gain, not a lower floor), the ONNX Runtime
  session built with the agent's runtime options, post-processing incl. the inline mask of the default
  MaskPolicy; called from N threads; no transport;
* ``bytes``  — a real agent (``python -m agent serve`` in a child process, default settings) over its
  Unix socket, frame in ``byte_data``, mask back inline (what every existing LFV client does);
* ``shm``    — the same agent, frame in a client-owned POSIX shared-memory segment and the mask
  written into a second one (``anomaly_mask_params.shared_memory_handle``);
* ``grpcio-bytes`` / ``grpcio-shm`` — the same requests against :mod:`agent.tools.bench.transport`, the
  agent's gRPC server with no model behind it (canned answer of the same size): what grpcio alone costs.
  ``floor + grpcio`` is the best the agent could do with this transport (the "grpcio bound").

Clients use gRPC's default channel options (4 MiB receive limit), as the AWS sample clients do: the
targets of issue #16 are defined for default clients and default settings.

Modes of one configuration run interleaved (two rounds of all modes) so that drift on a noisy
shared machine hits all of them alike; report ratios, absolute times are context only. Each
configuration is bounded by a request count and a time cap. It also measures the agent's resident
memory with no model running and the cold StartModel → RUNNING time of the small model.

Writes ``benchmarks.md`` (table, ratios, targets, machine), ``benchmarks.json`` and, when matplotlib
is installed (``pip install edge-agent[bench]``), ``benchmarks.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[3]  # the repository (this file is agent/tools/bench/benchmark.py)
FRAMES: dict[str, tuple[int, int]] = {"640x480": (640, 480), "1920x1080": (1920, 1080), "4096x4096": (4096, 4096)}
MODELS = ("tiny", "patchcore")
MODES = ("floor", "bytes", "shm", "grpcio-bytes", "grpcio-shm")
# Requests per (model, frame) and configuration, before --scale; big frames get fewer.
REQUESTS: dict[tuple[str, str], int] = {
    ("tiny", "640x480"): 300, ("tiny", "1920x1080"): 120, ("tiny", "4096x4096"): 16,
    ("patchcore", "640x480"): 60, ("patchcore", "1920x1080"): 40, ("patchcore", "4096x4096"): 12,
}
TARGETS = {"bytes_p50": 1.10, "shm_p50": 1.05, "throughput_4": 0.9, "shm_4096_p50": 1.2, "rss_mb": 200.0,
           "cold_start_s": 2.0,
           # issue #16: large frames, default clients and settings
           "bytes_1080_p50": 1.20, "shm_1080_p50": 1.00, "shm_4096_tiny_p50": 1.00, "bytes_4096_over_grpcio": 0.10}


@dataclass
class Result:
    model: str
    frame: str
    mode: str
    clients: int
    requests: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # requests per second
    capped: bool = False
    ratio_p50: float = math.nan  # agent / floor (floor: 1.0)
    ratio_p99: float = math.nan
    ratio_throughput: float = math.nan


@dataclass
class Report:
    machine: dict[str, Any]
    settings: dict[str, Any]
    results: list[Result] = field(default_factory=list)
    rss_idle_mb: float = math.nan
    rss_running_mb: float = math.nan
    rss_after_mb: float = math.nan  # models running, after all the traffic (what buffers stay mapped)
    cold_start_s: float = math.nan
    cold_start_patchcore_s: float = math.nan
    wall_s: float = 0.0


# -- frames, models, machine ---------------------------------------------------------------------

def make_frame(width: int, height: int) -> np.ndarray:
    """Mid-grey with mild deterministic noise and a red square: a non-trivial mask for every model."""
    rng = np.random.default_rng(width * 7919 + height)
    frame = (128 + rng.integers(-6, 7, size=(height, width, 3))).astype(np.uint8)
    s = max(16, min(width, height) // 8)
    frame[height // 3:height // 3 + s, width // 3:width // 3 + s] = (255, 0, 0)
    return frame


def build_models(models_dir: Path, scratch: Path, models: tuple[str, ...]) -> None:
    from agent.core.package import build_package
    from agent.tools.modelgen import build_patchcore_like, build_tiny

    builders = {"tiny": build_tiny, "patchcore": build_patchcore_like}
    for name in models:
        (scratch / name).mkdir(parents=True)
        onnx = builders[name](scratch / name / "model.onnx")
        build_package(onnx, models_dir / name, name=name)


def machine_info() -> dict[str, Any]:
    import google.protobuf
    import grpc
    import onnxruntime
    import PIL

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "memory": mem,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "grpcio": grpc.__version__, "numpy": np.__version__,
            "pillow": PIL.__version__, "protobuf": google.protobuf.__version__}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


# -- the agent under test --------------------------------------------------------------------------

def _child_env(tree: Path) -> dict[str, str]:
    """This environment, with `tree` first on PYTHONPATH: the child imports that tree's `agent`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    return env


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM a server of the benchmark (the agent, the grpcio reference, a peer); SIGKILL after `timeout`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def agent_process(work: Path, models_dir: Path, extra: list[str], *, tree: Path = ROOT, tag: str = "agent",
                  inline_mask: str | None = "full") -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`python -m agent serve` from source tree `tree` (this one by default) on {work}/{tag}.sock.

    inline_mask: the InlineMask setting (None: the agent's default). "full" for bench-ab and bench-peers,
    whose clients allow 64 MiB: rows stay comparable with older trees, which ignore the variable and
    always send full-size masks."""
    socket_uri = f"unix://{work}/{tag}.sock"
    cmd = [sys.executable, "-m", "agent", "serve", "--socket", socket_uri, "--models-dir", str(models_dir),
           "--work-dir", str(work / f"state-{tag}"), "--execution-providers", "cpu", "--metrics-port", "-1",
           "--log-level", "WARNING", "--model-scan-interval-seconds", "0.2", *extra]
    env = _child_env(tree)
    if inline_mask is not None:
        env.setdefault("EDGE_AGENT_INLINE_MASK", inline_mask)
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(work / f"{tag}.log", "wb"))
    try:
        yield proc, socket_uri
    finally:
        stop_process(proc)


@contextmanager
def transport_process(work: Path) -> Iterator[str]:
    """agent.tools.bench.transport on its own socket: the grpcio-only reference."""
    socket_uri = f"unix://{work}/transport.sock"
    proc = subprocess.Popen([sys.executable, "-m", "agent.tools.bench.transport", "--socket", socket_uri],
                            env=_child_env(ROOT),
                            stdout=subprocess.DEVNULL, stderr=open(work / "transport.log", "wb"))
    try:
        wait_for(lambda: proc.poll() is not None or Path(socket_uri[len("unix://"):]).exists(), 30,
                 "the transport reference server")
        if proc.poll() is not None:
            raise RuntimeError(f"transport server exited: {(work / 'transport.log').read_text()[-2000:]}")
        yield socket_uri
    finally:
        stop_process(proc)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(poll)


def wait_ready(proc: subprocess.Popen[bytes], stub: Any, pb: Any, models: tuple[str, ...], log_file: Path,
               timeout: float = 60.0) -> None:
    """Until the agent answers ListModels with every model (discovery is asynchronous)."""

    def known() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited with {proc.returncode}: {log_file.read_text()[-2000:]}")
        try:
            listed = stub.ListModels(pb.ListModelsRequest(), timeout=2).models
        except Exception:
            return False
        return {m.model_component for m in listed} >= set(models)

    wait_for(known, timeout, "the agent to list the models", poll=0.05)


def start_model(stub: Any, pb: Any, name: str, timeout: float = 120.0) -> float:
    """StartModel → RUNNING (polling DescribeModel like LFV clients); returns the seconds it took."""
    t0 = time.perf_counter()
    stub.StartModel(pb.StartModelRequest(model_component=name))
    desc: list[Any] = []

    def running() -> bool:
        d = stub.DescribeModel(pb.DescribeModelRequest(model_component=name)).model_description
        desc[:] = [d]
        if d.status == pb.FAILED:
            raise RuntimeError(f"model {name} failed to start: {d.status_message}")
        return bool(d.status == pb.RUNNING)

    wait_for(running, timeout, f"model {name} to run", poll=0.002)
    return time.perf_counter() - t0


# -- one measured configuration -------------------------------------------------------------------

def measure(calls: list[Callable[[], Any]], total: int, cap_s: float) -> tuple[list[float], float, bool]:
    """Run `total` calls spread over len(calls) concurrent workers (one callable each), at most cap_s.
    Returns per-request latencies (s), wall time (s) and whether the cap cut it short."""
    lock = threading.Lock()
    remaining = [total]
    latencies: list[float] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(calls) + 1)
    deadline = [0.0]

    def worker(call: Callable[[], Any]) -> None:
        barrier.wait()
        mine = []
        try:
            while True:
                with lock:
                    if remaining[0] <= 0 or time.perf_counter() > deadline[0]:
                        break
                    remaining[0] -= 1
                t0 = time.perf_counter()
                call()
                mine.append(time.perf_counter() - t0)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in calls]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + cap_s
    t0 = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return latencies, wall, remaining[0] > 0


def detect_requests(stack: ExitStack, model: str, frame: np.ndarray, base: str) -> tuple[Any, Any]:
    """The two DetectAnomalies requests for `frame`: byte_data, and shared memory (the frame copied into
    segment `{base}-in`, the mask into `{base}-mask`; both live as long as `stack`)."""
    from agent.client import shm_segment
    from agent.serving.grpc._generated import edge_agent_pb2 as pb

    height, width = frame.shape[:2]
    nbytes = frame.nbytes
    inline = pb.DetectAnomaliesRequest(model_component=model, bitmap=pb.Bitmap(
        width=width, height=height, byte_data=frame.tobytes()))
    stack.enter_context(shm_segment(base + "-in", nbytes))[:] = frame.tobytes()
    stack.enter_context(shm_segment(base + "-mask", nbytes))
    via_shm = pb.DetectAnomaliesRequest(
        model_component=model,
        bitmap=pb.Bitmap(width=width, height=height, shared_memory_handle=pb.SharedMemoryHandle(
            name=base + "-in", size=nbytes, offset=0)),
        anomaly_mask_params=pb.AnomalyMaskParams(shared_memory_handle=pb.SharedMemoryHandle(
            name=base + "-mask", size=nbytes, offset=0)))
    return inline, via_shm


def _caller(stub: Any, request: Any) -> Callable[[], Any]:
    return lambda: stub.DetectAnomalies(request, timeout=300)


class Clients:
    """Per-client callables for one (model, frame, clients): floor threads, byte_data and shm stubs."""

    def __init__(self, stack: ExitStack, socket_uri: str, transport_uri: str, predictor: Any, model: str,
                 frame: np.ndarray, clients: int, tag: str) -> None:
        import grpc

        from agent.serving.grpc._generated import edge_agent_pb2_grpc as pb_grpc

        # The agent's default MaskPolicy (fit): the inline mask the agent sends a default client.
        self.floor = [lambda: predictor.predict(frame) for _ in range(clients)]
        self.bytes: list[Callable[[], Any]] = []
        self.shm: list[Callable[[], Any]] = []
        self.grpcio_bytes: list[Callable[[], Any]] = []
        self.grpcio_shm: list[Callable[[], Any]] = []
        for i in range(clients):
            # Default channel options (4 MiB receive limit), as every AWS sample client has them.
            stub = pb_grpc.EdgeAgentStub(stack.enter_context(grpc.insecure_channel(socket_uri)))
            reference = pb_grpc.EdgeAgentStub(stack.enter_context(grpc.insecure_channel(transport_uri)))
            inline, via_shm = detect_requests(stack, model, frame, f"/edge-agent-bench-{os.getpid()}-{tag}-{i}")
            self.bytes.append(_caller(stub, inline))
            self.shm.append(_caller(stub, via_shm))
            self.grpcio_bytes.append(_caller(reference, inline))
            self.grpcio_shm.append(_caller(reference, via_shm))

    def calls(self, mode: str) -> list[Callable[[], Any]]:
        return getattr(self, mode.replace("-", "_"))  # type: ignore[no-any-return]

    def warm(self) -> None:
        for calls in (self.floor, self.bytes, self.shm, self.grpcio_bytes, self.grpcio_shm):
            for call in calls:
                call()


def summarise(model: str, frame: str, mode: str, clients: int, lat: list[float], wall: float,
              capped: bool) -> Result:
    ms = np.asarray(lat) * 1000.0
    return Result(model, frame, mode, clients, len(lat), float(np.percentile(ms, 50)),
                  float(np.percentile(ms, 99)), float(ms.mean()), len(lat) / wall if wall > 0 else math.nan,
                  capped)


# -- the run ----------------------------------------------------------------------------------------

def run_bench(out_dir: Path, *, models: tuple[str, ...] = MODELS, frames: tuple[str, ...] = tuple(FRAMES),
              concurrency: tuple[int, ...] = (1, 4), scale: float = 1.0, cap_s: float = 8.0, rounds: int = 2,
              agent_args: tuple[str, ...] = (), plot: bool = True, log: Callable[[str], None] = print) -> Report:
    from agent.app import onnx_runtime
    from agent.config import AgentConfig
    from agent.core.package import load_package
    from agent.core.pipeline import Predictor
    from agent.serving.grpc._generated import edge_agent_pb2 as pb
    from agent.serving.grpc._generated import edge_agent_pb2_grpc as pb_grpc

    started = time.perf_counter()
    report = Report(machine_info(), {"models": list(models), "frames": list(frames), "clients": list(concurrency),
                                     "scale": scale, "cap_s": cap_s, "rounds": rounds,
                                     "agent_args": list(agent_args)})
    work = Path(tempfile.mkdtemp(prefix="eab-", dir="/tmp"))  # short: AF_UNIX paths are limited
    try:
        models_dir = work / "models"
        models_dir.mkdir()
        build_models(models_dir, work / "onnx", models)
        # The floor uses the agent's own runtime options (threads, providers) and Predictor.
        cli: dict[str, Any] = {"execution_providers": "cpu"}
        flags = list(agent_args)
        for flag, value in zip(flags[::2], flags[1::2], strict=False):
            cli[flag.lstrip("-").replace("-", "_")] = value
        runtime = onnx_runtime(AgentConfig.from_sources(cli=cli))
        # Default settings (InlineMask fit) and default clients, as issue #16's targets are defined.
        with agent_process(work, models_dir, flags, inline_mask=None) as (proc, socket_uri), \
                transport_process(work) as transport_uri, \
                ExitStack() as stack:
            from agent.client import channel

            stub = pb_grpc.EdgeAgentStub(stack.enter_context(channel(socket_uri)))

            wait_ready(proc, stub, pb, models, work / "agent.log")
            time.sleep(0.5)
            report.rss_idle_mb = rss_mb(proc.pid)
            log(f"agent RSS, no model running: {report.rss_idle_mb:.1f} MB")
            for name in models:
                seconds = start_model(stub, pb, name)
                if name == "tiny":
                    report.cold_start_s = seconds
                else:
                    report.cold_start_patchcore_s = seconds
                log(f"StartModel {name} -> RUNNING: {seconds:.3f} s")
            report.rss_running_mb = rss_mb(proc.pid)

            for model in models:
                package = load_package(models_dir / model)
                # The reference pipeline (Pillow alone), whatever faster path the agent itself takes.
                predictor = Predictor(package, runtime.load(package), fast_reduce=False)
                predictor.warmup(2, np.random.default_rng(0))
                for frame_name in frames:
                    frame = make_frame(*FRAMES[frame_name])
                    total = max(2, int(REQUESTS[(model, frame_name)] * scale))
                    for clients in concurrency:
                        with ExitStack() as cstack:
                            calls = Clients(cstack, socket_uri, transport_uri, predictor, model, frame, clients,
                                            f"{model}-{frame_name}-{clients}")
                            calls.warm()
                            pooled: dict[str, tuple[list[float], float, bool]] = {m: ([], 0.0, False) for m in MODES}
                            per_round = max(1, math.ceil(total / rounds))
                            for _ in range(rounds):
                                for mode in MODES:
                                    lat, wall, capped = measure(calls.calls(mode), per_round, cap_s / rounds)
                                    acc = pooled[mode]
                                    pooled[mode] = (acc[0] + lat, acc[1] + wall, acc[2] or capped)
                            rows = [summarise(model, frame_name, m, clients, *pooled[m]) for m in MODES]
                        floor = rows[0]
                        for row in rows:
                            row.ratio_p50 = row.p50_ms / floor.p50_ms
                            row.ratio_p99 = row.p99_ms / floor.p99_ms
                            row.ratio_throughput = row.throughput / floor.throughput
                        report.results.extend(rows)
                        log(f"{model:9} {frame_name:9} x{clients}: " + "  ".join(
                            f"{r.mode} p50 {r.p50_ms:8.2f} ms ({r.ratio_p50:.2f}x) {r.throughput:7.1f}/s"
                            for r in rows))
                predictor.session.unload()
            report.rss_after_mb = rss_mb(proc.pid)
            log(f"agent RSS after the traffic: {report.rss_after_mb:.1f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.wall_s = time.perf_counter() - started
    write_report(report, out_dir, plot=plot)
    return report


# -- output -----------------------------------------------------------------------------------------

def _find(report: Report, model: str, frame: str, mode: str, clients: int) -> Result | None:
    for r in report.results:
        if (r.model, r.frame, r.mode, r.clients) == (model, frame, mode, clients):
            return r
    return None


def targets(report: Report) -> list[tuple[str, str, float, float, bool, float]]:
    """(target, comparison, value, limit, met, grpcio bound) for each target the run has data for.

    The bound is the ratio the agent would reach if it added nothing but the plain grpcio server's cost
    (the grpcio-* rows) to the floor: 1 + grpcio/floor for latency; for throughput, where the transport's
    CPU and the model's share the same cores, 1 / (1 + floor/grpcio)."""
    out: list[tuple[str, str, float, float, bool, float]] = []

    def add(what: str, value: float, limit: float, bound: float = math.nan, higher_is_better: bool = False) -> None:
        if math.isnan(value):
            return
        met = value >= limit if higher_is_better else value <= limit
        out.append((what, "≥" if higher_is_better else "≤", value, limit, met, bound))

    def latency_bound(model: str, frame: str, mode: str, clients: int) -> float:
        ref = _find(report, model, frame, f"grpcio-{mode}", clients)
        return 1.0 + ref.ratio_p50 if ref else math.nan

    def throughput_bound(model: str, frame: str, mode: str, clients: int) -> float:
        ref = _find(report, model, frame, f"grpcio-{mode}", clients)
        return ref.ratio_throughput / (1.0 + ref.ratio_throughput) if ref else math.nan

    for mode, key in (("bytes", "bytes_p50"), ("shm", "shm_p50")):
        r = _find(report, "tiny", "640x480", mode, 1)
        if r:
            add(f"p50 agent/floor, {mode}, 640x480, tiny, 1 client", r.ratio_p50, TARGETS[key],
                latency_bound("tiny", "640x480", mode, 1))
    for model in MODELS:
        for mode in ("bytes", "shm"):
            r = _find(report, model, "640x480", mode, 4)
            if r:
                add(f"throughput agent/floor, {mode}, 640x480, {model}, 4 clients", r.ratio_throughput,
                    TARGETS["throughput_4"], throughput_bound(model, "640x480", mode, 4), higher_is_better=True)
    for model in MODELS:
        r = _find(report, model, "4096x4096", "shm", 1)
        if r:
            add(f"p50 agent/floor, shm, 4096x4096, {model}, 1 client", r.ratio_p50,
                TARGETS["shm_4096_tiny_p50" if model == "tiny" else "shm_4096_p50"],
                latency_bound(model, "4096x4096", "shm", 1))
    for mode, key in (("bytes", "bytes_1080_p50"), ("shm", "shm_1080_p50")):
        r = _find(report, "tiny", "1920x1080", mode, 1)
        if r:
            add(f"p50 agent/floor, {mode}, 1920x1080, tiny, 1 client", r.ratio_p50, TARGETS[key],
                latency_bound("tiny", "1920x1080", mode, 1))
    r, ref = _find(report, "tiny", "4096x4096", "bytes", 1), _find(report, "tiny", "4096x4096", "grpcio-bytes", 1)
    if r and ref:
        # Every call of the run was answered (a failed call ends the run); what the agent adds to grpcio's own
        # round trip of the same request and response, as a share of the floor.
        add("(agent − grpcio) p50 / floor, bytes, 4096x4096, tiny, 1 client", r.ratio_p50 - ref.ratio_p50,
            TARGETS["bytes_4096_over_grpcio"], 0.0)
    add("agent RSS with no model running (MB)", report.rss_idle_mb, TARGETS["rss_mb"])
    add("cold StartModel → RUNNING, tiny (s)", report.cold_start_s, TARGETS["cold_start_s"])
    return out


def markdown(report: Report) -> str:
    m = report.machine
    lines = [
        "# Benchmarks",
        "",
        "What the agent adds on top of running the model itself. **floor** = the reference pipeline: the agent's "
        "own `Predictor` with the reference pre-processing (Pillow bilinear resize with reducing_gap 3.0, /255, "
        "NCHW; `fast_reduce=False`, one thread) + ONNX Runtime session with the agent's runtime options + "
        "post-processing incl. rendering the inline mask the default `InlineMask=fit` sends, called in-process "
        "from N threads. The agent itself resizes large frames faster than that reference (row bands on "
        "several threads, exact; OpenCV reduction, within 1 grey level: docs/benchmarks-notes.md), so a ratio "
        "below 1.0 is a real gain over the reference; **bytes** = the agent (`edge-agent serve` in its own "
        "process, default settings) over its Unix socket, frame in `byte_data`, mask back inline (full size up "
        "to gRPC's default 4 MiB, else scaled to fit: `InlineMask=fit`); **shm** = frame in a client POSIX "
        "shared-memory segment, mask written into a second one; **grpcio-bytes / grpcio-shm** = the same requests"
        " to the agent's gRPC server with no model behind it (`agent.tools.bench.transport`: parses the request, "
        "answers with a canned result of the same size), i.e. the transport alone. Clients are threads of the "
        "benchmark process, one channel each with gRPC's default options (as the AWS sample clients), "
        "requests built once. The modes of one row group "
        f"run interleaved ({report.settings['rounds']} rounds), so the ratios come from the same minutes of a "
        "shared machine: **read the ratios; absolute times are context only.**",
        "",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores ({m['cores']} online), {m['memory']}, "
        f"{m['os']}; Python {m['python']}, onnxruntime {m['onnxruntime']} (CPU EP), grpcio {m['grpcio']}, "
        f"protobuf {m['protobuf']}, numpy {m['numpy']}, Pillow {m['pillow']}. Run took {report.wall_s:.0f} s "
        f"(scale {report.settings['scale']}, cap {report.settings['cap_s']} s per configuration"
        + (f", agent flags `{' '.join(report.settings['agent_args'])}`" if report.settings["agent_args"] else "")
        + ").",
        "",
        "Models: **tiny** = `agent.tools.modelgen.build_tiny` (224×224 anomalib-2.x contract, a handful of "
        "element-wise ops: overhead shows); **patchcore** = `build_patchcore_like` (256×256, conv features + "
        "4096×64 memory-bank distance + resize: PatchCore-like cost).",
        "",
        "## Targets",
        "",
        "`grpcio bound` = the ratio the agent would reach if it added only what the plain grpcio server "
        "(`grpcio-*` rows) costs to the floor: what no Python-side work in the agent can beat with this "
        "transport.",
        "",
        "| target | value | limit | met | grpcio bound |",
        "|---|---|---|---|---|",
    ]
    for what, op, value, limit, met, bound in targets(report):
        shown = "—" if math.isnan(bound) else f"{bound:.3g}"
        lines.append(f"| {what} | {value:.3g} | {op} {limit:g} | {'yes' if met else '**no**'} | {shown} |")
    lines += [
        "",
        "## Results",
        "",
        "p50/p99 in ms, throughput in requests/s over the whole configuration; `×floor` = agent ÷ floor of "
        "the same model, frame and clients (latency: lower is better; throughput: higher is better).",
        "",
        "| model | frame | clients | mode | n | p50 ms | p99 ms | req/s | p50 ×floor | p99 ×floor | req/s ×floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.results:
        cap = "*" if r.capped else ""
        ratio = ("—", "—", "—") if r.mode == "floor" else (
            f"{r.ratio_p50:.2f}", f"{r.ratio_p99:.2f}", f"{r.ratio_throughput:.2f}")
        lines.append(f"| {r.model} | {r.frame} | {r.clients} | {r.mode} | {r.requests}{cap} | {r.p50_ms:.2f} | "
                     f"{r.p99_ms:.2f} | {r.throughput:.1f} | {ratio[0]} | {ratio[1]} | {ratio[2]} |")
    lines += [
        "",
        "`*` = the time cap ended the configuration before its request count. The 4096×4096 `bytes` rows send "
        "48 MiB per request and get a 4 MiB mask back inline (a default client's receive limit); shared-memory "
        "masks are always full size.",
        "",
        f"Agent resident memory, models known but none running: **{report.rss_idle_mb:.0f} MB**; with all "
        f"benchmark models running: {report.rss_running_mb:.0f} MB, and {report.rss_after_mb:.0f} MB after "
        f"all the traffic above (frame-size buffers kept for reuse: `MallocMmapThresholdMB`). Cold StartModel → "
        f"RUNNING (polling DescribeModel, includes loading ONNX Runtime, the session and the warm-up runs): tiny "
        f"**{report.cold_start_s:.2f} s**, patchcore {report.cold_start_patchcore_s:.2f} s.",
        "",
    ]
    return "\n".join(lines)


HOW_TO = """## How to run

```
scripts/bench                       # or: edge-agent bench [--out docs] [--scale 1] [--cap 8]
scripts/bench --models tiny --frames 640x480 --clients 1,4 --scale 0.5
scripts/bench --agent-arg=--intra-op-threads --agent-arg=1     # try an agent setting
scripts/bench --rewrite             # benchmarks.md again from benchmarks.json, after editing benchmarks-notes.md
```

It builds the models with `agent.tools.modelgen`, starts `python -m agent serve` on a temporary Unix socket,
measures, and writes `benchmarks.md`, `benchmarks.json` and `benchmarks.png` (the plot needs matplotlib:
`pip install -e .[bench]`). A full run takes a few minutes on 2 cores. It is not part of the CI suite
(`tests/tools/test_bench_smoke.py` runs it with tiny counts under `-m slow` and checks only the report's shape).

For one change, compare two builds side by side instead of two benchmark runs (whose drift on a shared
machine is often larger than the change): `edge-agent bench-ab` runs the working tree and a git revision
(checked out into a temporary worktree) at once, alternates blocks of requests between them (ABBA), and
reports p50/p90, throughput, page faults and CPU ticks per request of each agent (`--clients N`: N
concurrent clients per block):

```
.venv/bin/edge-agent bench-ab --rev HEAD~1 --frame 1920x1080 --mode bytes [--blocks 20] [--clients 4]
.venv/bin/edge-agent bench-ab --candidate-arg=--malloc-mmap-threshold-mb --candidate-arg=0   # a setting
```
"""


def write_report(report: Report, out_dir: Path, *, plot: bool = True, notes: str | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = asdict(report)
    data["targets"] = [dict(zip(("target", "op", "value", "limit", "met", "grpcio_bound"), t))
                       for t in targets(report)]
    (out_dir / "benchmarks.json").write_text(json.dumps(data, indent=1, allow_nan=True) + "\n")
    notes_file = out_dir / "benchmarks-notes.md"
    text = markdown(report)
    if plot and _plot(report, out_dir / "benchmarks.png"):
        text += "\n![p50 latency per configuration](benchmarks.png)\n"
    extra = notes if notes is not None else (notes_file.read_text() if notes_file.exists() else "")
    doc = text + "\n" + (extra.rstrip() + "\n\n" if extra else "") + HOW_TO
    # The peer comparison (scripts/bench-peers: other runs, other servers) is kept as it was.
    from agent.tools.bench.peers import BEGIN, END, insert_section

    old = out_dir / "benchmarks.md"
    previous = old.read_text() if old.exists() else ""
    if BEGIN in previous and END in previous:
        doc = insert_section(doc, previous.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n"))
    old.write_text(doc)


def _plot(report: Report, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = [m for m in MODELS if any(r.model == m for r in report.results)]
    if not models:
        return False
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.6), squeeze=False)
    colors = {"floor": "#777777", "bytes": "#1f77b4", "shm": "#2ca02c", "grpcio-bytes": "#aec7e8",
              "grpcio-shm": "#98df8a"}
    for ax, model in zip(axes[0], models):
        groups = sorted({(r.frame, r.clients) for r in report.results if r.model == model},
                        key=lambda g: (list(FRAMES).index(g[0]), g[1]))
        width = 0.8 / len(MODES)
        for k, mode in enumerate(MODES):
            xs, p50, p99 = [], [], []
            for i, (frame, clients) in enumerate(groups):
                r = _find(report, model, frame, mode, clients)
                if r:
                    xs.append(i + (k - (len(MODES) - 1) / 2) * width)
                    p50.append(r.p50_ms)
                    p99.append(r.p99_ms)
            ax.bar(xs, p50, width, label=f"{mode} p50", color=colors[mode])
            ax.scatter(xs, p99, marker="_", s=120, color="black", zorder=3, label="p99" if k == 0 else None)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{f}\n{c} client{'s' if c > 1 else ''}" for f, c in groups], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("latency per request, ms (log)")
        ax.set_title(f"{model}: floor (in-process), agent (byte_data, shm), grpcio alone")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"edge-agent benchmark — {report.machine['cpu']}, {report.machine['usable_cores']} cores",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- command line ----------------------------------------------------------------------------------

def csv_list(value: str) -> tuple[str, ...]:
    """A comma-separated option as a tuple of its non-empty items (also used by bench-peers)."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="directory for benchmarks.md/.json/.png")
    p.add_argument("--models", type=csv_list, default=MODELS, help="comma list of tiny,patchcore")
    p.add_argument("--frames", type=csv_list, default=tuple(FRAMES), help="comma list of " + ",".join(FRAMES))
    p.add_argument("--clients", type=lambda v: tuple(int(c) for c in csv_list(v)), default=(1, 4),
                   help="comma list of concurrent clients (default 1,4)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the request counts (default 1)")
    p.add_argument("--cap", type=float, default=8.0, help="time cap per configuration and mode, s (default 8)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per configuration (default 2)")
    p.add_argument("--agent-arg", action="append", default=[], help="extra `edge-agent serve` argument "
                   "(repeat; also applied to the floor's runtime options), e.g. --agent-arg=--intra-op-threads "
                   "--agent-arg=1")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--rewrite", action="store_true", help="measure nothing: write benchmarks.md again from "
                   "benchmarks.json (e.g. after editing benchmarks-notes.md)")


def load_report(path: Path) -> Report:
    """A report as write_report saved it (benchmarks.json)."""
    data = json.loads(path.read_text())
    data.pop("targets", None)  # derived from the results
    results = [Result(**r) for r in data.pop("results")]
    return Report(results=results, **data)


def run(args: argparse.Namespace) -> int:
    if args.rewrite:
        write_report(load_report(args.out / "benchmarks.json"), args.out, plot=not args.no_plot)
        print(f"wrote {args.out / 'benchmarks.md'} from benchmarks.json and benchmarks-notes.md")
        return 0
    bad = [m for m in args.models if m not in MODELS] + [f for f in args.frames if f not in FRAMES]
    if bad:
        print(f"edge-agent bench: unknown model/frame {bad}", file=sys.stderr)
        return 2
    report = run_bench(args.out, models=tuple(args.models), frames=tuple(args.frames),
                       concurrency=tuple(args.clients), scale=args.scale, cap_s=args.cap, rounds=args.rounds,
                       agent_args=tuple(args.agent_arg), plot=not args.no_plot)
    print(f"wrote {args.out / 'benchmarks.md'} ({report.wall_s:.0f} s)")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="benchmark the agent against the in-process floor (not for CI)")
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_arguments(parser)
    return run(parser.parse_args(argv))
