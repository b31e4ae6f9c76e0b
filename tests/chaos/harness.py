"""The chaos suite's shared machinery: a real ``edge-agent serve`` process (``python -m agent serve``) on
a real Unix socket, real gRPC clients, client-owned shared-memory segments, and a tally per attack of
what was sent and what came back.

Every attack ends with the same checks (``Tally.check``): the agent process is alive, answers
DescribeModel within a couple of seconds, its RSS grew by less than a bound, every answer had one of
the attack's documented status codes (never INTERNAL or UNKNOWN), no call went unanswered, and a
well-behaved control client sending valid requests alongside the attack lost nothing.

Environment:

* ``CHAOS_REPORT=path``: append each attack's figures as a JSON line (docs/reliability.md is filled
  from these).
* ``CHAOS_AGENT_SRC=dir``: run the agent from another source tree (e.g. an older checkout, to see an
  attack succeed against it); the default is this repository.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from agent.core.package import build_package
from agent.serving.grpc._generated import edge_agent_pb2 as pb
from agent.serving.grpc._generated import edge_agent_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
AGENT_SRC = Path(os.environ.get("CHAOS_AGENT_SRC") or ROOT)
REPORT = os.environ.get("CHAOS_REPORT")
MODEL = "widget"
#: Codes a client can never be answered with for something it sent.
FORBIDDEN = {"INTERNAL", "UNKNOWN"}


def frame(width: int, height: int, defect: bool) -> np.ndarray:
    """Mid-grey, with a red square in the middle (an eighth of each side) when `defect`: the modelgen
    anomalib detector flags exactly the square."""
    image = np.full((height, width, 3), 128, np.uint8)
    if defect:
        image[height * 7 // 16:height * 9 // 16, width * 7 // 16:width * 9 // 16] = (255, 0, 0)
    return image


# -- the agent process -----------------------------------------------------------------------------

class AgentProcess:
    """`python -m agent serve` in a subprocess on a Unix socket in `workdir`, serving the packages in
    workdir/models (both chaos modules drive it)."""

    def __init__(self, workdir: Path, *extra_args: str, large_messages: bool = False) -> None:
        """large_messages: the client channel accepts 64 MiB (4096x4096 masks inline); else gRPC's defaults."""
        self.workdir = workdir
        self.socket = f"unix://{workdir}/agent.sock"
        self.log_path = workdir / "agent.log"
        self._log = open(self.log_path, "w")  # a file, not a pipe: a chatty agent must never block on it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "serve", "--socket", self.socket, "--models-dir",
             str(workdir / "models"), "--execution-providers", "cpu", "--work-dir", str(workdir / "work"),
             "--metrics-port", "0", *extra_args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=AGENT_SRC, env={**os.environ, "PYTHONPATH": str(AGENT_SRC)})
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        self.channel = grpc.insecure_channel(self.socket, options=options if large_messages else None)
        self.stub = pb_grpc.EdgeAgentStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metrics_url = ""

    def wait_ready(self, *models: str, timeout: float = 60.0) -> None:
        """Until every model is RUNNING; then the metrics endpoint's address is read from the log."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.alive, f"agent exited with {self.proc.returncode}:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"{models} never RUNNING:\n{self.log_tail()}"
            try:
                if all(self.status(m, timeout=1.0) == "RUNNING" for m in models):
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        found = re.search(r"metrics at (http://\S+/metrics)", self.log_path.read_text())
        assert found, self.log_tail()
        self.metrics_url = found.group(1)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def status(self, model: str = MODEL, timeout: float = 2.0) -> str:
        return pb.ModelStatus.Name(self.describe(model, timeout).status)

    def describe(self, model: str = MODEL, timeout: float = 5.0) -> Any:
        reply = self.stub.DescribeModel(pb.DescribeModelRequest(model_component=model), timeout=timeout)
        return reply.model_description

    def wait_status(self, model: str, *statuses: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while (status := self.status(model)) not in statuses:
            assert time.monotonic() < deadline, f"{model} is {status}, wanted {statuses}:\n{self.log_tail()}"
            time.sleep(0.02)
        return status

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return str(response.read().decode())

    def sample(self, name: str, text: str | None = None, **labels: str) -> float:
        """The sum of the samples called `name` with (at least) these labels, in `text` or a fresh scrape."""
        text = self.metrics() if text is None else text
        return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name == name and labels.items() <= s.labels.items())

    def version(self, model: str) -> str:
        """The version edge_agent_model_info says the model serves ("" when none)."""
        pattern = r'edge_agent_model_info\{[^}]*model="' + re.escape(model) + r'"[^}]*version="([^"]*)"'
        found = re.search(pattern, self.metrics())
        return found.group(1) if found else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-lines:])

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM; the exit status (asserting it exits within `timeout`)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"SIGTERM did not stop the agent within {timeout} s:\n{self.log_tail()}") from None

    def stop(self, timeout: float = 20.0) -> float:
        """SIGTERM; seconds until the process exited (asserting it exits within `timeout`, status 0)."""
        self.channel.close()
        t0 = time.monotonic()
        rc = self.terminate(timeout)
        assert rc == 0, f"agent exited with {rc} after SIGTERM:\n{self.log_tail()}"
        return time.monotonic() - t0

    def close(self) -> None:
        self.channel.close()
        if self.alive:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@contextmanager
def running_agent(workdir: Path, onnx: Path, *extra_args: str) -> Iterator[AgentProcess]:
    """An agent with one autostarted anomalib model (MODEL), RUNNING; killed afterwards if still alive."""
    build_package(onnx, workdir / "models" / MODEL, name=MODEL, autostart=True)
    agent = AgentProcess(workdir, "--log-format", "json", *extra_args, large_messages=True)
    try:
        agent.wait_ready(MODEL)
        yield agent
    finally:
        agent.close()


# -- client-owned segments -------------------------------------------------------------------------

class Segment:
    """A POSIX shared-memory segment the way a client owns it, used through its descriptor only: the
    test process maps nothing, so shrinking it can never fault the test itself."""

    def __init__(self, name: str, size: int, data: bytes | np.ndarray | None = None, mode: int = 0o600) -> None:
        self.name = name if name.startswith("/") else "/" + name
        self.path = Path("/dev/shm" + self.name)
        self.size = size
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_TRUNC | os.O_CLOEXEC, mode)
        os.fchmod(self.fd, mode)  # exactly `mode`, whatever the umask
        os.ftruncate(self.fd, size)
        if data is not None:
            self.write(data)

    def write(self, data: bytes | np.ndarray, offset: int = 0) -> None:
        os.pwrite(self.fd, data if isinstance(data, bytes) else np.ascontiguousarray(data).data, offset)

    def read(self, nbytes: int, offset: int = 0) -> bytes:
        return os.pread(self.fd, nbytes, offset)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def handle(self, size: int | None = None, offset: int = 0) -> pb.SharedMemoryHandle:
        return pb.SharedMemoryHandle(name=self.name, size=self.size if size is None else size, offset=offset)

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


def detect_request(width: int, height: int, *, data: np.ndarray | None = None,
                   shm: pb.SharedMemoryHandle | None = None,
                   mask: pb.SharedMemoryHandle | None = None, model: str = MODEL) -> pb.DetectAnomaliesRequest:
    bitmap = pb.Bitmap(width=width, height=height)
    if shm is not None:
        bitmap.shared_memory_handle.CopyFrom(shm)
    elif data is not None:
        bitmap.byte_data = data.tobytes()
    request = pb.DetectAnomaliesRequest(model_component=model, bitmap=bitmap)
    if mask is not None:
        request.anomaly_mask_params.shared_memory_handle.CopyFrom(mask)
    return request


def call(fn: Callable[..., Any], request: Any, timeout: float) -> tuple[str, str, Any]:
    """(status code name, details, response or None) of one unary call."""
    try:
        return "OK", "", fn(request, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or "", None


# -- tallies ---------------------------------------------------------------------------------------

@dataclass
class Tally:
    """What one attack sent and saw; `check` asserts the agent came through it unharmed."""

    attack: str
    allowed: set[str]
    sent: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    details: dict[str, str] = field(default_factory=dict)  # one example message per code
    hangs: int = 0  # calls the agent never answered within the client's deadline
    control_sent: int = 0
    control_lost: int = 0  # valid requests alongside the attack that failed or came back wrong
    control_errors: list[str] = field(default_factory=list)
    rss_before: float = 0.0
    rss_after: float = 0.0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, code: str, details: str = "") -> None:
        with self._lock:
            self.sent += 1
            self.codes[code] += 1
            self.details.setdefault(code, details)
            if code == "DEADLINE_EXCEEDED":
                self.hangs += 1

    def control(self, ok: bool, why: str = "") -> None:
        with self._lock:
            self.control_sent += 1
            if not ok:
                self.control_lost += 1
                if len(self.control_errors) < 5:
                    self.control_errors.append(why)

    def check(self, agent: AgentProcess, rss_growth_mb: float) -> None:
        crashed = not agent.alive
        self.rss_after = agent.rss_mb() if not crashed else float("nan")
        self.write_report(crashed)
        assert not crashed, f"{self.attack}: the agent died ({agent.proc.returncode}):\n{agent.log_tail()}"
        t0 = time.monotonic()
        assert agent.status(timeout=5.0) == "RUNNING"
        assert time.monotonic() - t0 < 2.0, f"{self.attack}: DescribeModel took {time.monotonic() - t0:.1f} s"
        assert self.sent > 0, f"{self.attack}: nothing was sent"
        assert self.hangs == 0, f"{self.attack}: {self.hangs} calls were never answered"
        assert not set(self.codes) & FORBIDDEN, f"{self.attack}: {dict(self.codes)} {self.details}"
        assert set(self.codes) <= self.allowed, f"{self.attack}: {dict(self.codes)} {self.details}"
        assert self.control_lost == 0, f"{self.attack}: control client lost {self.control_lost}: " \
                                       f"{self.control_errors}"
        growth = self.rss_after - self.rss_before
        assert growth < rss_growth_mb, f"{self.attack}: RSS grew {growth:.0f} MB (bound {rss_growth_mb} MB)"

    def write_report(self, crashed: bool) -> None:
        if not REPORT:
            return
        row = {"attack": self.attack, "sent": self.sent, "codes": dict(self.codes), "crashed": crashed,
               "hangs": self.hangs, "rss_before_mb": round(self.rss_before, 1),
               "rss_growth_mb": round(self.rss_after - self.rss_before, 1), "control_sent": self.control_sent,
               "control_lost": self.control_lost, "seconds": round(self.seconds, 1), **self.extra}
        with open(REPORT, "a") as out:
            out.write(json.dumps(row) + "\n")


def run_for(seconds: float, workers: Iterable[Callable[[threading.Event], None]]) -> float:
    """Run each worker(stop) in its own thread until `seconds` have passed or all have returned; the
    first exception of any is re-raised."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def guard(fn: Callable[[threading.Event], None]) -> None:
        try:
            fn(stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=guard, args=(fn,), daemon=True) for fn in workers]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:  # until the time is up, or every worker has finished (or one failed)
        t.join(max(0.0, t0 + seconds - time.monotonic()))
    stop.set()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a client thread is stuck (an unanswered call?)"
    if errors:
        raise errors[0]
    return time.monotonic() - t0
