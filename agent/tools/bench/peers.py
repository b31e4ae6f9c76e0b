"""`scripts/bench-peers`: the agent next to KServe, Triton (via PyTriton) and MLServer, serving the same Predictor.

Every peer gets its own virtualenv under a cache directory (pinned versions, built once), and serves the agent's
own :class:`~agent.core.pipeline.Predictor` (same model packages, same ONNX Runtime options, same pre- and
post-processing incl. the full-size mask) through its own V2 ("Open Inference Protocol") gRPC endpoint
(adapters in :mod:`agent.tools.bench.peer_servers`). Before anything is timed, every server's answer to the same
frame is checked against the in-process floor (score, verdict and every mask byte). Then, per model and client
count, all modes run interleaved (the floor, the agent over byte_data and shm, each peer over V2 raw tensors),
and the table (p50/p90 ratios to the floor, throughput, cold start, resident memory) and a plot are written into
docs/benchmarks.md (section "Peers", between markers) plus benchmarks-peers.json / .png.

Documented workarounds applied: KServe's hard-coded 0.0.0.0 / [::] bind addresses are patched to 127.0.0.1
(peer_servers/kserve_server.py); PyTriton's python-backend stub gets LD_LIBRARY_PATH = the interpreter's libdir
(else it loads the system's libpython: triton-inference-server/pytriton#51); MLServer runs with
`parallel_workers: 0` (its worker pool crashes with current uvloop: SeldonIO/MLServer#2286). Every server binds
127.0.0.1 only, which is checked from /proc before the first request.

Not part of CI: it installs packages from PyPI. tests/tools/test_bench_peers.py checks its pieces offline.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.tools.bench.benchmark import stop_process

ROOT = Path(__file__).resolve().parents[3]
MODELS = ("tiny", "patchcore")
FRAME = (640, 480)
#: Requests per (model, clients) configuration and mode, before --scale; PatchCore-size runs ~10x longer.
REQUESTS = {"tiny": 400, "patchcore": 150}
BEGIN = "<!-- bench-peers:begin (written by scripts/bench-peers) -->"
END = "<!-- bench-peers:end -->"
V2_SERVICE = "inference.GRPCInferenceService"
#: A floor whose p90 exceeds this multiple of its p50 ran under outside load; the table says so.
NOISY = 2.0
#: ... or whose per-round p50s are further apart than this factor.
SPREAD = 1.5


@dataclass(frozen=True)
class Peer:
    key: str
    title: str  # what the table calls it, with the version that actually serves
    packages: tuple[str, ...]  # pinned, besides onnxruntime and Pillow (pinned to the agent's own)
    notes: str = ""
    own_venv: bool = True  # False: runs in the agent's own virtualenv (the grpcio reference)


PEERS: dict[str, Peer] = {
    "kserve": Peer("kserve", "KServe 0.21.0", ("kserve==0.21.0",),
                   "kserve.Model, default ModelServer (1 process); bind addresses patched to 127.0.0.1"),
    "pytriton": Peer("pytriton", "Triton 2.51.0 (PyTriton 0.7.0)", ("nvidia-pytriton==0.7.0",),
                     "tritonserver's python backend → PyTriton proxy → the callable; batching off; "
                     "LD_LIBRARY_PATH = the interpreter's libdir"),
    "mlserver": Peer("mlserver", "MLServer 1.7.1", ("mlserver==1.7.1",),
                     "MLModel runtime, parallel_workers 0 (the default pool crashes with uvloop ≥ 0.22)"),
    "grpcio": Peer("grpcio", "hand-written grpcio V2 server", (),
                   "reference: grpcio generic handler, 4 threads, np.frombuffer in / tobytes out, on a Unix socket; "
                   "agent.tools.bench.peer_servers.grpcio_v2", own_venv=False),
}


# -- virtualenvs ------------------------------------------------------------------------------------

def requirements(peer: Peer) -> list[str]:
    """The peer's pins plus the agent's own onnxruntime (CPU build) and Pillow versions: same kernels and resize."""
    import onnxruntime
    import PIL

    return [*peer.packages, f"onnxruntime=={onnxruntime.__version__}", f"pillow=={PIL.__version__}"]


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-agent" / "bench-peers"


def venv_python(cache: Path, peer: Peer) -> Path:
    return cache / peer.key / "bin" / "python" if peer.own_venv else Path(sys.executable)


def build_venv(cache: Path, peer: Peer, log: Callable[[str], None] = print) -> str | None:
    """Create (or reuse) the peer's virtualenv; returns None when usable, else why not (pip's last lines)."""
    if not peer.own_venv:
        return None
    reqs = requirements(peer)
    home = cache / peer.key
    stamp = home / ".requirements"
    want = "\n".join(reqs) + "\n"
    if stamp.exists() and stamp.read_text() == want and venv_python(cache, peer).exists():
        return None
    cache.mkdir(parents=True, exist_ok=True)
    if home.exists():
        subprocess.run(["rm", "-rf", str(home)], check=True)
    base = getattr(sys, "_base_executable", sys.executable)
    log(f"building {peer.key}: {' '.join(reqs)}")
    t0 = time.perf_counter()
    pip_log = cache / f"{peer.key}.pip.log"
    with open(pip_log, "wb") as out:
        rc = subprocess.call([base, "-m", "venv", str(home)], stdout=out, stderr=subprocess.STDOUT)
        if rc == 0:
            rc = subprocess.call([str(venv_python(cache, peer)), "-m", "pip", "install", "--disable-pip-version-check",
                                  "--progress-bar", "off", *reqs], stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = pip_log.read_text(errors="replace").strip().splitlines()[-6:]
        return f"pip failed ({rc}): " + " / ".join(tail)
    stamp.write_text(want)
    log(f"built {peer.key} in {time.perf_counter() - t0:.0f} s")
    return None


def installed_versions(python: Path, names: Sequence[str]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            "for n in sys.argv[1:]:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    done = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


# -- the V2 (Open Inference Protocol) wire, just what the client needs ----------------------------------

@functools.lru_cache(maxsize=None)  # noqa: UP033  (functools.cache is 3.9+)
def _v2_classes() -> dict[str, Any]:
    """ModelInfer and ServerMetadata request / response classes, built from descriptors (field numbers as in
    KServe's and Triton's grpc_service.proto; `parameters` and typed `contents` left out: unknown fields are
    skipped), so the client needs no generated stubs and no peer package."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="edge_agent_bench_v2.proto", package="inference", syntax="proto3")

    def add(msg: Any, name: str, number: int, kind: int, repeated: bool = False, type_name: str = "") -> None:
        field = msg.field.add(name=name, number=number, type=kind,
                              label=f.LABEL_REPEATED if repeated else f.LABEL_OPTIONAL)
        if type_name:
            field.type_name = type_name

    def tensor(msg: Any) -> None:
        add(msg, "name", 1, f.TYPE_STRING)
        add(msg, "datatype", 2, f.TYPE_STRING)
        add(msg, "shape", 3, f.TYPE_INT64, repeated=True)

    req = fdp.message_type.add(name="ModelInferRequest")
    tensor(req.nested_type.add(name="InferInputTensor"))
    out_req = req.nested_type.add(name="InferRequestedOutputTensor")
    add(out_req, "name", 1, f.TYPE_STRING)
    add(req, "model_name", 1, f.TYPE_STRING)
    add(req, "model_version", 2, f.TYPE_STRING)
    add(req, "id", 3, f.TYPE_STRING)
    add(req, "inputs", 5, f.TYPE_MESSAGE, True, ".inference.ModelInferRequest.InferInputTensor")
    add(req, "outputs", 6, f.TYPE_MESSAGE, True, ".inference.ModelInferRequest.InferRequestedOutputTensor")
    add(req, "raw_input_contents", 7, f.TYPE_BYTES, repeated=True)
    resp = fdp.message_type.add(name="ModelInferResponse")
    tensor(resp.nested_type.add(name="InferOutputTensor"))
    add(resp, "model_name", 1, f.TYPE_STRING)
    add(resp, "model_version", 2, f.TYPE_STRING)
    add(resp, "id", 3, f.TYPE_STRING)
    add(resp, "outputs", 5, f.TYPE_MESSAGE, True, ".inference.ModelInferResponse.InferOutputTensor")
    add(resp, "raw_output_contents", 6, f.TYPE_BYTES, repeated=True)
    fdp.message_type.add(name="ServerMetadataRequest")
    meta = fdp.message_type.add(name="ServerMetadataResponse")
    add(meta, "name", 1, f.TYPE_STRING)
    add(meta, "version", 2, f.TYPE_STRING)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    get = message_factory.GetMessageClass
    names = ("ModelInferRequest", "ModelInferResponse", "ServerMetadataRequest", "ServerMetadataResponse")
    return {name: get(pool.FindMessageTypeByName(f"inference.{name}")) for name in names}


def v2_messages() -> tuple[Any, Any]:
    classes = _v2_classes()
    return classes["ModelInferRequest"], classes["ModelInferResponse"]


def server_metadata(channel: Any) -> str:
    """"name version" as the running server reports it (V2 ServerMetadata): the version that actually serves."""
    classes = _v2_classes()
    call = channel.unary_unary(f"/{V2_SERVICE}/ServerMetadata", request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=classes["ServerMetadataResponse"].FromString)
    reply = call(classes["ServerMetadataRequest"](), timeout=30)
    return f"{reply.name} {reply.version}".strip()


_DTYPES = {"FP32": np.float32, "BOOL": np.bool_, "UINT8": np.uint8, "INT64": np.int64, "FP64": np.float64}


def v2_request(request_cls: Any, model: str, frame: np.ndarray) -> Any:
    from agent.tools.bench.peer_servers.common import INPUT, OUTPUTS

    request = request_cls(model_name=model, raw_input_contents=[frame.tobytes()])
    request.inputs.add(name=INPUT, datatype="UINT8", shape=list(frame.shape))
    for name in OUTPUTS:
        request.outputs.add(name=name)
    return request


def v2_outputs(response: Any) -> dict[str, np.ndarray]:
    """name -> array of a ModelInferResponse with raw output contents (what every peer answers raw requests with)."""
    if len(response.raw_output_contents) != len(response.outputs):
        raise ValueError(f"{len(response.outputs)} outputs but {len(response.raw_output_contents)} raw contents")
    out = {}
    for spec, raw in zip(response.outputs, response.raw_output_contents):  # noqa: B905 (lengths checked above)
        out[spec.name] = np.frombuffer(raw, dtype=_DTYPES[spec.datatype]).reshape(tuple(spec.shape))
    return out


def v2_caller(channel: Any, response_cls: Any, request: Any) -> Callable[[], Any]:
    call = channel.unary_unary(f"/{V2_SERVICE}/ModelInfer", request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=response_cls.FromString)
    return lambda: call(request, timeout=300)


# -- identical outputs -------------------------------------------------------------------------------

def compare(expected: dict[str, np.ndarray], got: dict[str, np.ndarray], score_atol: float = 1e-6) -> list[str]:
    """What differs between two answers (score within score_atol, verdict and mask exactly); [] when identical.
    Shapes may differ by size-1 axes (MLServer answers [1] as [1, 1])."""
    problems = []
    for name, want in expected.items():
        if name not in got:
            problems.append(f"{name} missing")
            continue
        have = got[name]
        if have.size != want.size:
            problems.append(f"{name}: {have.size} values, expected {want.size}")
            continue
        have = have.reshape(want.shape)
        if name == "score":
            diff = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
            if not diff <= score_atol:
                problems.append(f"score differs by {diff:.3g} (> {score_atol:g})")
        elif not np.array_equal(have, want):
            problems.append(f"{name}: {int(np.count_nonzero(have != want))} of {want.size} values differ")
    return problems


def agent_outputs(response: Any) -> dict[str, np.ndarray]:
    """The agent's DetectAnomaliesResponse as the three tensors the peers answer with."""
    result = response.detect_anomaly_result
    mask = result.anomaly_mask
    return {"score": np.array([result.anomaly_score], np.float32),
            "is_anomalous": np.array([result.is_anomalous], bool),
            "mask": np.frombuffer(mask.byte_data, np.uint8).reshape(mask.height, mask.width, 3)}


# -- processes: ports, loopback check, memory ----------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (Triton's server and stub, MLServer's workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                children = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                todo.extend(int(c) for c in children)
        except OSError:
            continue
    return out


def tree_rss_mb(pid: int) -> float:
    """Summed VmRSS of the tree (shared pages counted once per process: an upper bound for multi-process peers)."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def listening_addresses(pid: int) -> list[str]:
    """host:port of every TCP socket in LISTEN state that a process of the tree holds."""
    inodes = set()
    for p in process_tree(pid):
        try:
            for fd in os.listdir(f"/proc/{p}/fd"):
                try:
                    target = os.readlink(f"/proc/{p}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                continue
            host_hex, port_hex = cols[1].split(":")
            raw = bytes.fromhex(host_hex)
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            host = socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, raw)
            found.append(f"{host}:{int(port_hex, 16)}")
    return found


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0]
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1") or host.startswith("::ffff:127.")


# -- peer servers ------------------------------------------------------------------------------------

@dataclass
class Running:
    key: str
    title: str
    proc: subprocess.Popen[bytes]
    target: str  # host:port of the V2 gRPC endpoint
    log: Path
    cold_start_s: float = math.nan
    versions: dict[str, str] = field(default_factory=dict)


def peer_command(peer: Peer, python: Path, work: Path, grpc_port: int) -> tuple[list[str], dict[str, str], str]:
    """Command line, extra environment and gRPC target that start `peer` serving every model on
    127.0.0.1:grpc_port (the grpcio reference: on a Unix socket in `work`)."""
    http_port, metrics_port = free_port(), free_port()
    env: dict[str, str] = {}
    module = "agent.tools.bench.peer_servers"
    tcp = f"127.0.0.1:{grpc_port}"
    if peer.key == "grpcio":
        address = f"unix://{work}/grpcio-v2.sock"
        return [str(python), "-m", f"{module}.grpcio_v2", "--address", address], env, address
    if peer.key == "kserve":
        return [str(python), "-m", f"{module}.kserve_server", "--grpc-port", str(grpc_port),
                "--http-port", str(http_port)], env, tcp
    if peer.key == "pytriton":
        # The python-backend stub links the system's libpython of the same minor version unless the running
        # interpreter's libdir comes first (pytriton#51: "3.11.7 breaks").
        libdir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                                capture_output=True, text=True, check=True).stdout.strip()
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))
        return [str(python), "-m", f"{module}.pytriton_server", "--grpc-port", str(grpc_port), "--http-port",
                str(http_port), "--metrics-port", str(metrics_port), "--workspace", str(work / "pytriton")], env, tcp
    if peer.key == "mlserver":
        root = work / "mlserver"
        root.mkdir(parents=True, exist_ok=True)
        (root / "settings.json").write_text(json.dumps({
            "host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port,
            "parallel_workers": 0, "debug": False, "load_models_at_startup": True}))
        return [str(python.parent / "mlserver"), "start", str(root)], env, tcp
    raise ValueError(f"unknown peer {peer.key}")


def write_mlserver_models(root: Path, models: Sequence[str]) -> None:
    for name in models:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": "agent.tools.bench.peer_servers.mlserver_runtime.PredictorRuntime"}))


def wait_answers(proc: subprocess.Popen[bytes], log: Path, calls: dict[str, Callable[[], Any]],
                 timeout: float = 240.0) -> None:
    """Until every model has answered one request (the definition of "cold start" for every server)."""
    pending = dict(calls)
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while pending:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text(errors='replace')[-1500:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer within {timeout:.0f} s ({last}); log: "
                               f"{log.read_text(errors='replace')[-1500:]}")
        for name, call in list(pending.items()):
            try:
                call()
                del pending[name]
            except Exception as exc:  # not up yet: connection refused, model not ready
                last = exc
        if pending:
            time.sleep(0.02)


@contextmanager
def peer_server(peer: Peer, cache: Path, work: Path, packages: dict[str, Path], runtime_options: dict[str, Any],
                frame: np.ndarray) -> Iterator[Running]:
    import grpc

    python = venv_python(cache, peer)
    grpc_port = free_port()
    cmd, extra, target = peer_command(peer, python, work, grpc_port)
    if peer.key == "mlserver":
        write_mlserver_models(work / "mlserver", list(packages))
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["EDGE_AGENT_PEER_MODELS"] = json.dumps({k: str(v) for k, v in packages.items()})
    env["EDGE_AGENT_PEER_RUNTIME"] = json.dumps(runtime_options)
    env.pop("VIRTUAL_ENV", None)
    log = work / f"{peer.key}.log"
    request_cls, response_cls = v2_messages()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        with grpc.insecure_channel(target) as channel:
            calls = {m: v2_caller(channel, response_cls, v2_request(request_cls, m, frame)) for m in packages}
            wait_answers(proc, log, calls)
        running = Running(peer.key, peer.title, proc, target, log, cold_start_s=time.perf_counter() - t0)
        running.versions = installed_versions(python, [p.split("==")[0] for p in requirements(peer)]
                                              + ["onnxruntime-gpu", "uvloop", "grpcio", "numpy"])
        yield running
    finally:
        stop_process(proc, timeout=20)


# -- the run ------------------------------------------------------------------------------------------

@dataclass
class Row:
    model: str
    clients: int
    mode: str
    requests: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float
    capped: bool = False
    ratio_p50: float = math.nan
    ratio_p90: float = math.nan
    ratio_throughput: float = math.nan
    #: slowest ÷ fastest per-round p50 of this mode: how much the load on the machine moved between rounds
    round_spread: float = math.nan


@dataclass
class PeerReport:
    machine: dict[str, Any]
    settings: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    #: mode -> {"title", "cold_start_s", "rss_mb", "versions", "identical", "notes"}
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: peer key -> why it is not in the table (install or start failure, different outputs)
    failed: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0


def summarise(model: str, clients: int, mode: str, lat: list[float], wall: float, capped: bool) -> Row:
    ms = np.asarray(lat) * 1000.0
    return Row(model, clients, mode, len(lat), float(np.percentile(ms, 50)), float(np.percentile(ms, 90)),
               float(np.percentile(ms, 99)), len(lat) / wall if wall > 0 else math.nan, capped)


def apply_ratios(rows: list[Row]) -> None:
    """Ratios of every row to the floor row of the same model and clients."""
    floors = {(r.model, r.clients): r for r in rows if r.mode == "floor"}
    for r in rows:
        f = floors.get((r.model, r.clients))
        if f:
            r.ratio_p50, r.ratio_p90 = r.p50_ms / f.p50_ms, r.p90_ms / f.p90_ms
            r.ratio_throughput = r.throughput / f.throughput


def interleaved(modes: dict[str, list[Callable[[], Any]]], total: int, cap_s: float, rounds: int,
                model: str, clients: int) -> list[Row]:
    """`rounds` rounds of every mode in turn (same minutes of a shared machine for all), pooled per mode."""
    from agent.tools.bench.benchmark import measure

    pooled: dict[str, tuple[list[float], float, bool]] = {m: ([], 0.0, False) for m in modes}
    round_p50: dict[str, list[float]] = {m: [] for m in modes}
    per_round = max(1, math.ceil(total / rounds))
    for _ in range(rounds):
        for mode, calls in modes.items():
            lat, wall, capped = measure(calls, per_round, cap_s / rounds)
            acc = pooled[mode]
            pooled[mode] = (acc[0] + lat, acc[1] + wall, acc[2] or capped)
            if lat:
                round_p50[mode].append(float(np.percentile(lat, 50)))
    rows = [summarise(model, clients, m, *pooled[m]) for m in modes]
    for row in rows:
        p50s = round_p50[row.mode]
        row.round_spread = max(p50s) / min(p50s) if p50s and min(p50s) > 0 else math.nan
    apply_ratios(rows)
    return rows


def run_peers(out_dir: Path, *, peers: Sequence[str], models: Sequence[str] = MODELS,
              concurrency: Sequence[int] = (1, 4), scale: float = 1.0, cap_s: float = 15.0, rounds: int = 3,
              cache: Path | None = None, build: bool = True, write: bool = True,
              log: Callable[[str], None] = print) -> PeerReport:
    import grpc

    from agent.app import onnx_runtime
    from agent.client import channel as agent_channel
    from agent.config import AgentConfig
    from agent.core.package import load_package
    from agent.core.pipeline import Predictor
    from agent.serving.grpc._generated import edge_agent_pb2 as pb
    from agent.serving.grpc._generated import edge_agent_pb2_grpc as pb_grpc
    from agent.tools.bench.benchmark import (
        agent_process,
        build_models,
        detect_requests,
        machine_info,
        make_frame,
        start_model,
        wait_ready,
    )
    from agent.tools.bench.peer_servers.common import infer

    started = time.perf_counter()
    cache = cache or default_cache()
    config = AgentConfig.from_sources(cli={"execution_providers": "cpu"})
    runtime_options = {"providers": list(config.execution_providers), "intra_op_threads": config.intra_op_threads,
                       "inter_op_threads": config.inter_op_threads, "allow_spinning": config.intra_op_spinning}
    report = PeerReport(machine_info(), {"models": list(models), "clients": list(concurrency),
                                         "frame": f"{FRAME[0]}x{FRAME[1]}", "scale": scale, "cap_s": cap_s,
                                         "rounds": rounds, "peers": list(peers),
                                         "runtime": runtime_options})
    usable: list[Peer] = []
    for key in peers:
        peer = PEERS[key]
        why = build_venv(cache, peer, log) if build else (
            None if venv_python(cache, peer).exists() else "no virtualenv (run without --no-build)")
        if why:
            report.failed[key] = f"install: {why}"
            log(f"{key}: {why}")
        else:
            usable.append(peer)

    frame = make_frame(*FRAME)
    work = Path(tempfile.mkdtemp(prefix="ebp-", dir="/tmp"))  # short: AF_UNIX paths are limited
    try:
        models_dir = work / "models"
        models_dir.mkdir()
        build_models(models_dir, work / "onnx", tuple(models))
        packages = {m: models_dir / m for m in models}
        runtime = onnx_runtime(config)
        predictors = {}
        for m in models:
            package = load_package(packages[m])
            predictors[m] = Predictor(package, runtime.load(package))
            predictors[m].warmup(2, np.random.default_rng(0))
        expected = {m: infer(predictors[m], frame) for m in models}

        with ExitStack() as stack:
            # The agent: spawn → every model RUNNING → first answer, the same "cold start" as the peers'.
            t0 = time.perf_counter()
            proc, socket_uri = stack.enter_context(agent_process(work, models_dir, []))
            stub = pb_grpc.EdgeAgentStub(stack.enter_context(agent_channel(socket_uri)))
            wait_ready(proc, stub, pb, tuple(models), work / "agent.log")
            for m in models:
                start_model(stub, pb, m)
            first = {m: stub.DetectAnomalies(detect_requests(stack, m, frame, f"/ebp-{os.getpid()}-cold-{m}")[0],
                                             timeout=120) for m in models}
            import google.protobuf
            import onnxruntime
            import PIL

            report.servers["agent"] = {
                "title": "edge-agent (this tree)", "cold_start_s": time.perf_counter() - t0, "pid": proc.pid,
                "versions": {"grpcio": grpc.__version__, "onnxruntime": onnxruntime.__version__,
                             "pillow": PIL.__version__, "protobuf": google.protobuf.__version__},
                "identical": {m: compare(expected[m], agent_outputs(first[m])) for m in models},
                "notes": "LFV API on a Unix socket; byte_data and shared memory"}
            log(f"agent cold start {report.servers['agent']['cold_start_s']:.2f} s")

            running: list[Running] = []
            for peer in usable:
                try:
                    r = stack.enter_context(peer_server(peer, cache, work, packages, runtime_options, frame))
                except Exception as exc:
                    report.failed[peer.key] = f"start: {exc}"
                    log(f"{peer.key} did not start: {exc}")
                    continue
                bad = [a for a in listening_addresses(r.proc.pid) if not is_loopback(a)]
                if bad:
                    raise RuntimeError(f"{peer.key} listens beyond loopback: {bad}")
                request_cls, response_cls = v2_messages()
                ch = stack.enter_context(grpc.insecure_channel(r.target))
                if peer.own_venv:  # the grpcio reference serves ModelInfer only
                    try:
                        r.versions["server reports"] = server_metadata(ch)
                    except grpc.RpcError as exc:
                        r.versions["server reports"] = f"(ServerMetadata failed: {exc.code().name})"
                got = {m: v2_outputs(v2_caller(ch, response_cls, v2_request(request_cls, m, frame))())
                       for m in models}
                identical = {m: compare(expected[m], got[m]) for m in models}
                report.servers[peer.key] = {"title": peer.title, "cold_start_s": r.cold_start_s, "pid": r.proc.pid,
                                            "versions": r.versions, "identical": identical, "notes": peer.notes,
                                            "listening": listening_addresses(r.proc.pid)}
                log(f"{peer.key}: cold start {r.cold_start_s:.2f} s, listening {report.servers[peer.key]['listening']}"
                    f", identical outputs: {identical}")
                if any(identical.values()):
                    report.failed[peer.key] = f"different outputs: {identical}"
                    continue
                running.append(r)

            for m in models:
                total = max(2, int(REQUESTS[m] * scale))
                for clients in concurrency:
                    with ExitStack() as cstack:
                        request_cls, response_cls = v2_messages()
                        modes: dict[str, list[Callable[[], Any]]] = {
                            "floor": [functools.partial(infer, predictors[m], frame) for _ in range(clients)],
                            "agent-bytes": [], "agent-shm": []}
                        for r in running:
                            modes[r.key] = []
                        for i in range(clients):
                            s = pb_grpc.EdgeAgentStub(cstack.enter_context(agent_channel(socket_uri)))
                            inline, via_shm = detect_requests(cstack, m, frame, f"/ebp-{os.getpid()}-{m}-{clients}-{i}")
                            modes["agent-bytes"].append(functools.partial(s.DetectAnomalies, inline, timeout=300))
                            modes["agent-shm"].append(functools.partial(s.DetectAnomalies, via_shm, timeout=300))
                            for r in running:
                                ch = cstack.enter_context(grpc.insecure_channel(r.target))
                                modes[r.key].append(v2_caller(ch, response_cls, v2_request(request_cls, m, frame)))
                        for calls in modes.values():
                            for call in calls:
                                call()  # warm: one request per client and mode
                        rows = interleaved(modes, total, cap_s, rounds, m, clients)
                        report.rows.extend(rows)
                        log(f"{m:9} x{clients}: " + "  ".join(
                            f"{r.mode} {r.p50_ms:.1f} ms ({r.ratio_p50:.2f}x)" for r in rows))
            report.servers["agent"]["rss_mb"] = tree_rss_mb(proc.pid)
            for r in running:
                report.servers[r.key]["rss_mb"] = tree_rss_mb(r.proc.pid)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    report.wall_s = time.perf_counter() - started
    if write:
        write_report(report, out_dir)
    return report


# -- output --------------------------------------------------------------------------------------------

def _title(report: PeerReport, mode: str) -> str:
    if mode == "floor":
        return "floor (in-process Predictor)"
    if mode in ("agent-bytes", "agent-shm"):
        return f"edge-agent, {'byte_data' if mode == 'agent-bytes' else 'shared memory'}"
    return str(report.servers.get(mode, {}).get("title", mode))


def markdown(report: PeerReport, plot_name: str | None = "benchmarks-peers.png") -> str:
    m = report.machine
    s = report.settings
    lines = [
        "## Peers",
        "",
        "The same work served by other model servers, measured side by side in one run by `scripts/bench-peers` "
        "(`agent/tools/bench/peers.py`). Every server runs the agent's own `Predictor` (the same model packages, "
        "ONNX Runtime options, pre-processing and full-size mask rendering) behind its own V2 / Open Inference "
        "Protocol gRPC endpoint on 127.0.0.1 (adapters: `agent/tools/bench/peer_servers/`); the client sends the "
        f"{s['frame']} RGB frame as one raw UINT8 tensor and gets score, verdict and mask back as raw tensors. Before "
        "timing, every server's answer to the same frame was checked against the floor: same score, verdict and "
        "mask bytes. **floor** here = that same Predictor exactly as the agent runs it (default settings, its own "
        "pre-processing), called in-process: not the reference pipeline the tables above use as their floor, so "
        "ratios here are the cost of serving, not of pre-processing. The modes of one row group ran interleaved "
        f"({s['rounds']} rounds, at most {s['cap_s']:g} s per mode), clients are threads of the benchmark process, "
        "one channel each. **Read the ratios; absolute times are context only.**",
        "",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores, {m['memory']}, {m['os']}, Python {m['python']}. "
        f"Run took {report.wall_s:.0f} s (scale {s['scale']:g}).",
        "",
        "| server | versions | cold start s | RSS after the run MB | outputs | how it serves |",
        "|---|---|---|---|---|---|",
    ]
    for info in report.servers.values():
        versions = ", ".join(f"{k} {v}" for k, v in sorted(info.get("versions", {}).items()))
        same = "identical" if not any(info.get("identical", {}).values()) else "**differ**"
        rss = info.get("rss_mb", math.nan)
        lines.append(f"| {info['title']} | {versions} | {info['cold_start_s']:.2f} | "
                     f"{'—' if math.isnan(rss) else f'{rss:.0f}'} | {same} | {info.get('notes', '')} |")
    lines += [
        "",
        "Cold start = process start until every model has answered its first request (the agent: spawn, "
        "StartModel for each model, first DetectAnomalies); one start each, on a shared machine, so only "
        "differences of 2× or more mean anything. RSS = summed resident memory of the server's process "
        "tree with both models loaded, after all the traffic (shared pages count once per process).",
        "",
        "| model | clients | server | n | p50 ms | p90 ms | req/s | p50 ×floor | p90 ×floor | req/s ×floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    noisy = False
    for r in report.rows:
        ratio = ("—", "—", "—") if r.mode == "floor" else (
            f"{r.ratio_p50:.2f}", f"{r.ratio_p90:.2f}", f"{r.ratio_throughput:.2f}")
        title = _title(report, r.mode)
        if r.mode == "floor" and (r.p90_ms > NOISY * r.p50_ms or r.round_spread > SPREAD):
            title += f" — **noisy**: p90 {r.p90_ms / r.p50_ms:.1f}× p50" + (
                f", round p50s {r.round_spread:.1f}× apart" if math.isfinite(r.round_spread) else "")
            noisy = True
        lines.append(f"| {r.model} | {r.clients} | {title} | {r.requests}{'*' if r.capped else ''} "
                     f"| {r.p50_ms:.2f} | {r.p90_ms:.2f} | {r.throughput:.1f} | {ratio[0]} | {ratio[1]} | {ratio[2]} |")
    lines += [
        "",
        "`*` = the time cap ended the mode before its request count."
        + (f" **noisy**: the floor's p90 is more than {NOISY:g}× its p50 or its p50 moved more than {SPREAD:g}× "
           "between rounds, i.e. outside load (other work on the shared machine) hit that group: its ratios can "
           "swing by 2× between runs, so compare its rows only loosely." if noisy else ""),
        "",
        "Every peer runs the Predictor in Python, as the agent does: Triton itself is not on PyPI (`tritonserver` "
        "there is a 1.5 kB placeholder whose setup.py points to NGC containers), and PyTriton's wheel bundles a real "
        "`tritonserver` with the python backend only (no onnxruntime backend), so Triton hands each request to the "
        "PyTriton process that runs the Predictor. What differs between the rows is each server's transport, "
        "request decoding and threading, which is what this comparison is about."]
    asked = ", ".join(PEERS[k].title if k in PEERS else k for k in s.get("peers", []))
    if report.failed:
        lines += ["", f"Peers asked for: {asked}. Not in the table (install, start or output check failed):", ""]
        for key, why in report.failed.items():
            lines.append(f"- **{PEERS[key].title if key in PEERS else key}**: {why}")
    else:
        lines += ["", f"Peers asked for: {asked}; every one installed, started on loopback only and answered "
                  "identically."]
    if plot_name:
        lines += ["", f"![p50 and p90 over the floor per server]({plot_name})"]
    lines += [
        "",
        "Rerun: `scripts/bench-peers` (all peers; `--peers kserve,mlserver`, `--scale 0.5`, `--clients 1`; "
        "`--help`). It builds each peer's virtualenv once under `~/.cache/edge-agent/bench-peers` (pinned: "
        + ", ".join(f"`{' '.join(p.packages)}`" for p in PEERS.values() if p.packages)
        + ", plus the agent's own onnxruntime and Pillow versions), applies the workarounds each peer needs here "
        "(KServe's hard-coded `0.0.0.0`/`[::]` bind addresses patched to 127.0.0.1; PyTriton's python-backend stub "
        "gets `LD_LIBRARY_PATH` = the interpreter's libdir; MLServer `parallel_workers: 0`), refuses to measure a "
        "server that listens beyond loopback, and rewrites this section. Needs PyPI; not part of CI. `scripts/bench` "
        "keeps this section when it rewrites benchmarks.md; `scripts/bench-peers --rewrite` writes it again from "
        "benchmarks-peers.json without measuring.",
    ]
    return "\n".join(lines) + "\n"


def insert_section(doc: str, section: str) -> str:
    """`doc` with the text between the markers replaced by `section` (added before "## How to run", or at the end,
    the first time)."""
    block = f"{BEGIN}\n{section.rstrip()}\n{END}\n"
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        return head + block + (tail[1:] if tail.startswith("\n") else tail)  # the block brings its own newline
    anchor = "## How to run"
    if anchor in doc:
        head, tail = doc.split(anchor, 1)
        return head.rstrip("\n") + "\n\n" + block + "\n" + anchor + tail
    return doc.rstrip("\n") + "\n\n" + block


def write_report(report: PeerReport, out_dir: Path, *, plot: bool = True) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmarks-peers.json").write_text(json.dumps(asdict(report), indent=1, allow_nan=True) + "\n")
    plotted = plot and _plot(report, out_dir / "benchmarks-peers.png")
    section = markdown(report, "benchmarks-peers.png" if plotted else None)
    doc_path = out_dir / "benchmarks.md"
    doc = doc_path.read_text() if doc_path.exists() else "# Benchmarks\n"
    doc_path.write_text(insert_section(doc, section))


def load_report(path: Path) -> PeerReport:
    """A report as write_report saved it (benchmarks-peers.json)."""
    data = json.loads(path.read_text())
    rows = [Row(**r) for r in data.pop("rows")]
    return PeerReport(**data, rows=rows)


def _plot(report: PeerReport, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = sorted({(r.model, r.clients) for r in report.rows}, key=lambda g: (MODELS.index(g[0]), g[1]))
    modes = [m for m in dict.fromkeys(r.mode for r in report.rows) if m != "floor"]
    if not groups or not modes:
        return False
    fig, ax = plt.subplots(figsize=(max(7, 2.2 * len(groups)), 4.6))
    width = 0.8 / len(modes)
    for k, mode in enumerate(modes):
        xs, p50, p90 = [], [], []
        for i, (model, clients) in enumerate(groups):
            for r in report.rows:
                if (r.model, r.clients, r.mode) == (model, clients, mode):
                    xs.append(i + (k - (len(modes) - 1) / 2) * width)
                    p50.append(r.ratio_p50)
                    p90.append(r.ratio_p90)
        ax.bar(xs, p50, width, label=_title(report, mode))
        ax.scatter(xs, p90, marker="_", s=120, color="black", zorder=3, label="p90" if k == 0 else None)
    ax.axhline(1.0, color="#777777", linewidth=1, linestyle="--")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{m}\n{c} client{'s' if c > 1 else ''}" for m, c in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("p50 ÷ in-process floor (log; bars p50, ticks p90)")
    ax.set_title(f"{report.settings['frame']}: the same Predictor served by each server — "
                 f"{report.machine['cpu']}, {report.machine['usable_cores']} cores", fontsize=9)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- command line ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from agent.tools.bench.benchmark import csv_list

    p = argparse.ArgumentParser(prog="bench-peers", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="directory of benchmarks.md (default docs)")
    p.add_argument("--peers", type=csv_list, default=tuple(PEERS), help="comma list of " + ",".join(PEERS))
    p.add_argument("--models", type=csv_list, default=MODELS, help="comma list of tiny,patchcore")
    p.add_argument("--clients", type=lambda v: tuple(int(c) for c in csv_list(v)), default=(1, 4))
    p.add_argument("--scale", type=float, default=1.0, help="multiply the request counts (default 1)")
    p.add_argument("--cap", type=float, default=15.0, help="time cap per configuration and mode, s (default 15)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration (default 3)")
    p.add_argument("--cache", type=Path, default=None, help=f"virtualenvs (default {default_cache()})")
    p.add_argument("--no-build", action="store_true", help="use the virtualenvs as they are")
    p.add_argument("--rewrite", action="store_true", help="measure nothing: write the section again from "
                   "benchmarks-peers.json (e.g. after scripts/bench has rewritten benchmarks.md)")
    args = p.parse_args(argv)
    if args.rewrite:
        write_report(load_report(args.out / "benchmarks-peers.json"), args.out)
        print(f"wrote the Peers section of {args.out / 'benchmarks.md'} from benchmarks-peers.json")
        return 0
    bad = [k for k in args.peers if k not in PEERS] + [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"unknown peer/model {bad}")
    # The servers run in sessions of their own (a terminal's Ctrl-C must not kill them mid-run); a SIGTERM to
    # this process unwinds the ExitStack, which stops every one of them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    report = run_peers(args.out, peers=args.peers, models=args.models, concurrency=args.clients, scale=args.scale,
                       cap_s=args.cap, rounds=args.rounds, cache=args.cache, build=not args.no_build)
    print(f"wrote the Peers section of {args.out / 'benchmarks.md'} ({report.wall_s:.0f} s); "
          f"not run: {report.failed or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
