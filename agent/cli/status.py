"""`edge-agent status`: a one-screen summary of a running agent for a person at the device.

Models and states come from the LFV API on the socket (ListModels); version, provider, request
rate, error rate and p50/p99 latency from two scrapes of the /metrics endpoint `--interval` seconds
apart. Quantiles are computed from histogram buckets with Prometheus's own interpolation rule, over
the interval when requests arrived in it, else over everything since the agent started (marked *).

Whose metrics: the LFV API cannot say where an agent's /metrics endpoint is, so the URL is
`--metrics-url`, else the one `edge-agent serve` would use with the same EDGE_AGENT_* variables. Two
agents on one machine make that guess wrong, so the metrics are checked to come from the process
that serves the socket (Linux: the socket's inode in /proc/net/unix → the process holding it → its
start time, which is what `process_start_time_seconds` exports); metrics of another process are not
shown. Where /proc can't tell (another user's agent, another network namespace) the metrics are
shown only if they describe exactly the models the agent lists.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.cli.common import socket_uri
from agent.config import DEFAULT_METRICS_PORT, AgentConfig
from agent.errors import ConfigError

Samples = dict[str, list[tuple[dict[str, str], float]]]
LATENCY = "edge_agent_request_duration_seconds"


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """The q-quantile of cumulative (upper bound, count) buckets, interpolated as Prometheus does.

    NaN without observations; a rank that falls in the +Inf bucket gives the highest finite bound.
    """
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return math.nan
    rank = q * ordered[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for i, (bound, count) in enumerate(ordered):
        if count >= rank:
            if math.isinf(bound):
                return ordered[i - 1][0] if i > 0 else math.nan
            if i == 0 and bound <= 0:
                return bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return ordered[-1][0]


def parse_metrics(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return samples


def fetch_metrics(url: str, timeout: float) -> Samples:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse_metrics(response.read().decode())


def _sum(samples: Samples, name: str, **match: str) -> float:
    return sum(v for labels, v in samples.get(name, []) if all(labels.get(k) == x for k, x in match.items()))


def _buckets(samples: Samples, model: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for labels, value in samples.get(LATENCY + "_bucket", []):
        if labels.get("model") == model:
            bound = float(labels["le"])
            out[bound] = out.get(bound, 0.0) + value  # summed over versions (a swap mid-interval)
    return out


@dataclass
class ModelRow:
    name: str
    state: str = "?"
    version: str = ""
    provider: str = ""
    rate: float | None = None
    errors: float | None = None
    p50: float = math.nan
    p99: float = math.nan
    since_start: bool = False
    message: str = ""
    inflight: float = 0.0
    queued: float = 0.0


@dataclass
class Summary:
    socket: str
    metrics_url: str
    rows: list[ModelRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    uptime_s: float | None = None
    agent_version: str = ""


def _list_models(socket: str, timeout: float) -> list[tuple[str, str, str]]:
    import grpc

    from agent.serving.grpc._generated import edge_agent_pb2 as pb
    from agent.serving.grpc._generated import edge_agent_pb2_grpc as pb_grpc

    with grpc.insecure_channel(socket) as channel:
        response = pb_grpc.EdgeAgentStub(channel).ListModels(pb.ListModelsRequest(), timeout=timeout)
    return [(m.model_component, pb.ModelStatus.Name(m.status), m.status_message) for m in response.models]


def socket_owner_start_time(socket: str) -> float | None:
    """Start time (Unix seconds, as process_start_time_seconds) of the process serving a Unix socket, from
    /proc; None where that can't be told (not Linux, another user's process, another network namespace)."""
    if not socket.startswith("unix:"):
        return None
    path = _one_slash(socket[len("unix:"):])
    try:
        with open("/proc/net/unix") as table:
            rows = [line.split() for line in table.read().splitlines()[1:]]
        # grpc binds "unix:///p" as "///p": compare with the leading slashes folded
        inodes = {f"socket:[{row[6]}]" for row in rows if len(row) >= 8 and _one_slash(row[7]) == path}
        if not inodes:
            return None
        with open("/proc/stat") as stat:
            boot = next(float(line.split()[1]) for line in stat if line.startswith("btime "))
        ticks = os.sysconf("SC_CLK_TCK")
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
                if not any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                    continue
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                return boot + int(fields[19]) / ticks  # field 22, starttime, in clock ticks since boot
            except OSError:
                continue  # gone meanwhile, or not ours to look at
    except (OSError, ValueError, StopIteration, IndexError):
        return None
    return None


def _one_slash(path: str) -> str:
    return "/" + path.lstrip("/") if path.startswith("/") else path


def _whose(socket: str, models: dict[str, ModelRow], samples: Samples, metrics_url: str) -> str:
    """Why these metrics are not the agent's on `socket` ("" when they are, or can't be told apart)."""
    exported = samples.get("process_start_time_seconds")
    owner = socket_owner_start_time(socket)
    if owner is not None and exported:
        if abs(exported[0][1] - owner) < 1.0:
            return ""
        return (f"the metrics at {metrics_url} come from another process than the agent on {socket} (started "
                f"{time.time() - exported[0][1]:.0f}s ago vs {time.time() - owner:.0f}s ago); not shown: pass "
                "that agent's --metrics-url")
    listed = {labels["model"] for labels, _ in samples.get("edge_agent_model_status", [])}
    if listed != set(models):
        return (f"the metrics at {metrics_url} describe models {sorted(listed)}, the agent on {socket} has "
                f"{sorted(models)}: probably another agent's; not shown: pass that agent's --metrics-url")
    return ""


def collect(socket: str, metrics_url: str | None, interval: float, timeout: float = 5.0,
            no_metrics_reason: str = "") -> Summary:
    """The summary; raises grpc.RpcError when the agent does not answer on `socket` (then nothing else is
    worth showing). `metrics_url` None: models only, with `no_metrics_reason` as the note."""
    summary = Summary(socket, metrics_url or "-")
    models: dict[str, ModelRow] = {}
    for name, state, message in _list_models(socket, timeout):
        models[name] = ModelRow(name, state, message=message)
    summary.rows = sorted(models.values(), key=lambda r: r.name)
    if metrics_url is None:
        summary.notes.append(no_metrics_reason)
        return summary
    first = second = None
    t0 = t1 = 0.0
    try:
        t0, first = time.monotonic(), fetch_metrics(metrics_url, timeout)
        if interval > 0:
            time.sleep(interval)
            t1, second = time.monotonic(), fetch_metrics(metrics_url, timeout)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        summary.notes.append(f"metrics not reachable at {metrics_url}: {reason}")
    latest = second or first
    if latest is not None:
        foreign = _whose(socket, models, latest, metrics_url)
        if foreign:
            summary.notes.append(foreign)
            summary.metrics_url = f"{metrics_url} (not this agent's)"
            return summary
        for labels, value in latest.get("edge_agent_model_status", []):
            row = models.get(labels["model"])
            if row is not None and value == 1 and row.state == "?":
                row.state = labels["status"]
        for labels, _ in latest.get("edge_agent_model_info", []):
            if labels.get("model") in models:
                models[labels["model"]].version = labels.get("version", "")
                models[labels["model"]].provider = labels.get("provider", "")
        starts = latest.get("process_start_time_seconds")
        if starts:
            summary.uptime_s = max(0.0, time.time() - starts[0][1])
        builds = latest.get("edge_agent_build_info")
        if builds:
            summary.agent_version = builds[0][0].get("version", "")
        for row in models.values():
            row.inflight = _sum(latest, "edge_agent_inflight_requests", model=row.name)
            row.queued = _sum(latest, "edge_agent_queued_requests", model=row.name)
            _latency(row, first, second, t1 - t0)
    summary.rows = sorted(models.values(), key=lambda r: r.name)
    return summary


def _latency(row: ModelRow, first: Samples | None, second: Samples | None, elapsed: float) -> None:
    assert first is not None
    end = _buckets(second or first, row.name)
    if second is not None and elapsed > 0:
        total = _sum(second, "edge_agent_requests_total", model=row.name) - \
            _sum(first, "edge_agent_requests_total", model=row.name)
        ok = _sum(second, "edge_agent_requests_total", model=row.name, code="OK") - \
            _sum(first, "edge_agent_requests_total", model=row.name, code="OK")
        row.rate, row.errors = total / elapsed, (total - ok) / elapsed
        start = _buckets(first, row.name)
        delta = [(b, c - start.get(b, 0.0)) for b, c in end.items()]
        if delta and max(c for _, c in delta) > 0:
            row.p50, row.p99 = histogram_quantile(0.5, delta), histogram_quantile(0.99, delta)
            return
    row.since_start = True
    row.p50, row.p99 = histogram_quantile(0.5, list(end.items())), histogram_quantile(0.99, list(end.items()))


def _ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _uptime(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m{s:02d}s" if hours else f"{m}m{s:02d}s"


def render(summary: Summary) -> str:
    head = f"edge agent {summary.agent_version}".rstrip() + f" on {summary.socket}"
    if summary.uptime_s is not None:
        head += f", up {_uptime(summary.uptime_s)}"
    lines = [head, f"metrics {summary.metrics_url}", ""]
    columns = ("MODEL", "STATE", "VERSION", "PROVIDER", "REQ/S", "ERR/S", "P50", "P99", "RUNNING", "QUEUED")
    table: list[Sequence[str]] = [columns]
    for r in summary.rows:
        rate = "-" if r.rate is None else f"{r.rate:.1f}"
        errors = "-" if r.errors is None else f"{r.errors:.1f}"
        star = "*" if r.since_start and not math.isnan(r.p50) else ""
        table.append((r.name, r.state, r.version or "-", r.provider.replace("ExecutionProvider", "") or "-", rate,
                      errors, _ms(r.p50) + star, _ms(r.p99) + star, f"{r.inflight:.0f}", f"{r.queued:.0f}"))
    if summary.rows:
        widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    else:
        lines.append("no models")
    # FAILED reasons, CPU fallbacks, failed updates and package conflicts are what a person looking at this
    # screen needs to read in full.
    messages = [f"  {r.name}: {r.message}" for r in summary.rows
                if r.message and (r.state == "FAILED" or any(w in r.message.lower()
                                                             for w in ("fallback", "conflict", "failed")))]
    if messages:
        lines += ["", "notes:", *messages]
    if any(r.since_start and not math.isnan(r.p50) for r in summary.rows):
        lines += ["", "* no requests during the interval: latency since the agent started"]
    for note in summary.notes:
        lines.append(f"! {note}")
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    defaults = _defaults()
    p = subparsers.add_parser(
        "status", help="one-screen summary: models, state, provider, request rate, latency",
        description="Models and states from the agent on --socket, rates and latency from its /metrics. Metrics "
                    "that turn out to belong to another process are not shown.")
    p.add_argument("--socket", type=socket_uri, default=None,
                   help=f"the agent's socket, unix:///path or a bare /path.sock (default: $EDGE_AGENT_SOCKET, "
                        f"else {defaults[0]})")
    p.add_argument("--metrics-url", default=None,
                   help=f"the agent's /metrics URL (default: the one `serve` uses with the same EDGE_AGENT_* "
                        f"variables, {defaults[1]}; with a --socket of another agent, pass its URL)")
    p.add_argument("--interval", type=float, default=1.0,
                   help="seconds between the two scrapes that rates and recent latency come from (default 1)")
    p.set_defaults(func=run)


def _defaults() -> tuple[str, str]:
    """Socket and metrics URL as `edge-agent serve` would use them with the same EDGE_AGENT_* variables."""
    try:
        config = AgentConfig.from_sources(env=os.environ)
    except ConfigError:
        config = AgentConfig()
    host = config.metrics_address
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    # Port 0 (any free port) and -1 (off) can't be guessed: fall back to the default port.
    port = config.metrics_port if config.metrics_port > 0 else DEFAULT_METRICS_PORT
    return config.socket, f"http://{host}:{port}/metrics"


def run(args: argparse.Namespace) -> int:
    import grpc

    default_socket, default_url = _defaults()
    socket = args.socket or default_socket
    metrics_url = args.metrics_url
    reason = ""
    if metrics_url is None:
        if socket == socket_uri(default_socket):
            metrics_url = default_url  # the pair `serve` uses with this environment; checked in collect()
        else:
            reason = (f"metrics not shown: the agent on {socket} cannot say where its /metrics endpoint is; pass "
                      "--metrics-url (the agent logs it at start: 'metrics at http://...')")
    try:
        summary = collect(socket, metrics_url, args.interval, no_metrics_reason=reason)
    except grpc.RpcError as exc:
        from agent.cli.models import unavailable_reason

        print(f"edge-agent status: agent not reachable on {socket} ({exc.code().name}: "
              f"{unavailable_reason(exc.details())})", file=sys.stderr)
        return 1
    print(render(summary))
    return 0
