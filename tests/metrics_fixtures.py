"""A real agent on a real Unix socket with a fresh metrics registry, for the observability tests.

Kept apart from conftest.py so the metrics/health/Prometheus tests own their set-up. The socket
lives in a short mkdtemp() directory because AF_UNIX paths are limited to 107 bytes and pytest's
tmp_path can be longer than that.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from packaging_helpers import wait_until  # noqa: F401 - the serving tests import it from here
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from agent.app import Agent
from agent.config import AgentConfig
from agent.core.lifecycle import ModelStatus
from agent.core.package import build_package
from agent.serving.grpc._generated import edge_agent_pb2 as pb
from agent.serving.grpc._generated import edge_agent_pb2_grpc as pb_grpc
from agent.tools.modelgen import build_anomalib_v2

IMAGE_SIZE = (64, 64)
MODEL = "widget"


@dataclass
class RunningAgent:
    agent: Agent
    registry: CollectorRegistry
    channel: grpc.Channel
    stub: pb_grpc.EdgeAgentStub
    socket: str

    @property
    def metrics_url(self) -> str:
        assert self.agent.metrics_server is not None
        return self.agent.metrics_server.url

    def detect(self, image: np.ndarray, model: str = MODEL) -> pb.DetectAnomalyResult:
        h, w = image.shape[:2]
        request = pb.DetectAnomaliesRequest(model_component=model, bitmap=pb.Bitmap(
            width=w, height=h, byte_data=np.ascontiguousarray(image, np.uint8).tobytes()))
        return self.stub.DetectAnomalies(request, timeout=30).detect_anomaly_result

    def wait_status(self, status: ModelStatus, model: str = MODEL, timeout: float = 30.0) -> None:
        info = self.agent.registry.wait_for(model, {status}, timeout)
        assert info.status == status, f"{model} is {info.status.name} ({info.status_message}), wanted {status.name}"

    def sample(self, name: str, **labels: str) -> float:
        """One sample's value from the in-process registry (0 when the series doesn't exist yet)."""
        return self.registry.get_sample_value(name, labels) or 0.0


def grey(size: tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    return np.full((size[1], size[0], 3), 128, np.uint8)


def scrape(url: str, timeout: float = 5.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name → [(labels, value)] from a /metrics endpoint (the text format, parsed by prometheus_client)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((dict(s.labels), s.value))
    return samples


def make_models_dir(root: Path, names: tuple[str, ...] = (MODEL,), version: str = "1") -> Path:
    models = root / "models"
    models.mkdir()
    for name in names:
        onnx_path = build_anomalib_v2(root / f"{name}.onnx", image_size=IMAGE_SIZE)
        build_package(onnx_path, models / name, name=name, model_version=version)
    return models


@contextmanager
def short_tmp_dir() -> Iterator[Path]:
    """A temporary directory under /tmp, short enough for AF_UNIX socket paths."""
    path = Path(tempfile.mkdtemp(prefix="ea-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_agent(root: Path, models_dir: Path, **overrides: object) -> RunningAgent:
    registry = CollectorRegistry()
    settings: dict[str, object] = dict(
        socket=f"unix://{root}/agent.sock", models_dir=str(models_dir), work_dir=str(root / "work"),
        execution_providers=("cpu",), warmup_runs=1, metrics_port=0, metrics_address="127.0.0.1",
        scan_interval_s=0.2, stop_timeout_s=5.0,
    )
    settings.update(overrides)
    agent = Agent(AgentConfig(**settings), metrics_registry=registry)  # type: ignore[arg-type]
    agent.start()
    channel = grpc.insecure_channel(agent.config.socket)
    return RunningAgent(agent, registry, channel, pb_grpc.EdgeAgentStub(channel), agent.config.socket)


@contextmanager
def widget_agent(root: Path) -> Iterator[RunningAgent]:
    """An agent serving the `widget` model (anomalib 2.x style, 64x64), STOPPED until a test starts it.
    Test modules wrap this in their own `running_agent` fixture."""
    models = make_models_dir(root)
    running = start_agent(root, models)
    try:
        wait_until(lambda: MODEL in running.agent.registry.names(), 10, "model discovery")
        yield running
    finally:
        running.channel.close()
        running.agent.stop(grace=2)


# -- the Grafana dashboard --------------------------------------------------------------------------
DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                 "offset", "inf", "nan"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "info": ("_info",),
             "summary": ("", "_count", "_sum"), "gauge": ("",), "unknown": ("",), "stateset": ("",),
             "gaugehistogram": ("_bucket", "_gcount", "_gsum")}


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and template-variable queries."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            # label_values(selector, label): only the selector is PromQL; the label is not a metric.
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query.strip())
            exprs.append(match.group(1) if match else query)
    return exprs


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads: identifiers that are not functions, keywords, label names
    (inside {...} or by/without/on/ignoring (...)), strings or durations."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings (label values, regexes)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range / subquery durations, $__rate_interval
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", text):
        name, call = match.group(1), match.group(2)
        if not call and name.lower() not in _PROMQL_WORDS:
            names.add(name)
    return names


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry can export, including families with no series yet."""
    names = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names
