"""Prometheus metrics: per-model latency histograms, gRPC request counts, model state, providers.

Everything is registered on a CollectorRegistry handed in by the composition root (agent/app.py);
nothing touches prometheus_client's global REGISTRY, so every test builds its own and several agents
can live in one process. AgentMetrics is three things at once:

* a DetectObserver (InferenceService calls on_detect once per request that reached a running model),
* a RegistryListener (model status, load/warm-up durations, swaps, providers),
* the metrics that agent/serving/grpc/interceptors.py's MetricsInterceptor fills: every RPC by method
  and status code, aborted ones included, and DetectAnomalies timed end to end as the gRPC server sees it.

Names follow Prometheus conventions (base units, `_seconds`, `_total`); per-model series carry the
labels `model` and `version`, like Triton's. docs/metrics.md lists them with their Triton equivalents.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from agent import __version__
from agent.core.lifecycle import ModelInfo, ModelRegistry, ModelStatus
from agent.core.pipeline import Clock, Detection

log = logging.getLogger(__name__)

#: 100 µs … 10 s: a tiny model on a GPU answers in well under a millisecond, a big one on a Jetson CPU
#: takes seconds; roughly 1-2.5-5 steps keep histogram_quantile's interpolation error below ~2x anywhere.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
#: Pixels per image: 64x64 … 4096x4096 (LFV's largest accepted image), in factor-4 steps.
PIXEL_BUCKETS = (4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)
MODEL_LABELS = ("model", "version")
GRPC_LABELS = ("grpc_service", "grpc_method", "grpc_type")
DETECT_METHOD = "/AWS.LookoutVision.EdgeAgent/DetectAnomalies"


@dataclass
class CallMark:
    """Filled in by on_detect while a DetectAnomalies call runs, read by the interceptor after it."""

    model: str = ""
    version: str = ""
    ok: bool = False


# The interceptor and on_detect run in the same thread and contextvars.Context (grpc documents this
# for interceptors and handlers), so a context variable carries the model/version of the current call
# back to the interceptor without any shared table.
CURRENT_CALL: contextvars.ContextVar[CallMark | None] = contextvars.ContextVar("edge_agent_call", default=None)


class AgentMetrics:
    """All of the agent's metrics, registered on `registry`. Agent (agent/app.py) builds and wires
    one; wiring it by hand, e.g. around a bare ModelRegistry and InferenceService, looks like:

    >>> metrics = AgentMetrics(CollectorRegistry())
    >>> models = ModelRegistry(runtime, settings, listeners=[metrics])
    >>> metrics.watch_admission(models)
    >>> service = InferenceService(models, observer=metrics)
    >>> server = grpc.server(pool, interceptors=[MetricsInterceptor(metrics)])
    >>> endpoint = metrics.serve("127.0.0.1", 0)   # endpoint.port, endpoint.url; endpoint.close()
    """

    def __init__(self, registry: CollectorRegistry, *, clock: Clock = time.perf_counter,
                 process_metrics: bool = True) -> None:
        self.registry = registry
        self._clock = clock
        self._lock = threading.Lock()
        self._versions: dict[str, str] = {}  # model → version its per-version gauges are labelled with
        self._statuses: dict[str, ModelStatus] = {}

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, MODEL_LABELS, buckets=LATENCY_BUCKETS, registry=registry)

        self.request_duration = histogram(
            "edge_agent_request_duration_seconds",
            "End-to-end DetectAnomalies time inside the agent's gRPC server (successful requests)")
        self.image_read_duration = histogram(
            "edge_agent_image_read_duration_seconds",
            "Time to read the bitmap from the request or shared memory and check it")
        self.queue_duration = histogram(
            "edge_agent_queue_duration_seconds", "Time a request waited for one of the model's inference slots")
        self.preprocess_duration = histogram(
            "edge_agent_preprocess_duration_seconds", "Resize and normalise into the model's input tensor")
        self.inference_duration = histogram(
            "edge_agent_inference_duration_seconds", "ONNX Runtime session.run time")
        self.postprocess_duration = histogram(
            "edge_agent_postprocess_duration_seconds", "Score, threshold and mask rendering time")
        self.image_pixels = Histogram(
            "edge_agent_image_pixels", "Width x height of the images sent to DetectAnomalies", MODEL_LABELS,
            buckets=PIXEL_BUCKETS, registry=registry)
        self.requests = Counter(
            "edge_agent_requests", "DetectAnomalies calls that reached a running model, by gRPC status code",
            (*MODEL_LABELS, "code"), registry=registry)
        self.model_status = Gauge(
            "edge_agent_model_status", "1 for the state each model is in, 0 for the others",
            ("model", "status"), registry=registry)
        self.model_info = Info(
            "edge_agent_model", "Version and effective execution provider of each loaded model (1 while loaded); "
            "provider=CPUExecutionProvider on a GPU device means ONNX Runtime fell back to the CPU",
            ("model",), registry=registry)
        self.load_duration = Gauge(
            "edge_agent_model_load_duration_seconds", "Session creation time of the model's last load",
            MODEL_LABELS, registry=registry)
        self.warmup_duration = Gauge(
            "edge_agent_model_warmup_duration_seconds", "Warm-up time of the model's last load",
            MODEL_LABELS, registry=registry)
        self.swaps = Counter(
            "edge_agent_model_swaps", "Hot swaps of a running model to a new package, by result (ok, failed)",
            ("model", "result"), registry=registry)
        self.grpc_started = Counter(
            "grpc_server_started", "RPCs started on the server", GRPC_LABELS, registry=registry)
        self.grpc_handled = Counter(
            "grpc_server_handled", "RPCs completed on the server, by status code", (*GRPC_LABELS, "grpc_code"),
            registry=registry)
        self.grpc_handling = Histogram(
            "grpc_server_handling_seconds", "Time from receiving an RPC to its handler returning",
            GRPC_LABELS, buckets=LATENCY_BUCKETS, registry=registry)
        Info("edge_agent_build", "The agent's version", registry=registry).info({"version": __version__})
        if process_metrics:
            # The same collectors prometheus_client puts on its global registry, on ours instead.
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

    def watch_admission(self, models: ModelRegistry) -> None:
        """Report in-flight and queued requests per model, read from the registry's gates at scrape time."""
        self.registry.register(AdmissionCollector(models))

    # -- DetectObserver ------------------------------------------------------------------------
    def on_detect(self, model: str, version: str, detection: Detection | None, queue_wait: float,
                  read_seconds: float, pixels: int) -> None:
        mark = CURRENT_CALL.get()
        if mark is not None:
            mark.model, mark.version, mark.ok = model, version, detection is not None
        self.image_pixels.labels(model, version).observe(pixels)
        if detection is None:
            return  # failures are counted by code in edge_agent_requests_total; they'd distort latency
        self.image_read_duration.labels(model, version).observe(read_seconds)
        self.queue_duration.labels(model, version).observe(queue_wait)
        timings = detection.timings
        for histogram, stage in ((self.preprocess_duration, "preprocess"), (self.inference_duration, "inference"),
                                 (self.postprocess_duration, "postprocess")):
            if stage in timings:
                histogram.labels(model, version).observe(timings[stage])

    # -- RegistryListener ----------------------------------------------------------------------
    def on_status(self, info: ModelInfo) -> None:
        with self._lock:
            self._statuses[info.name] = info.status
            for status in ModelStatus:
                self.model_status.labels(info.name, status.name).set(1 if status == info.status else 0)
            if info.status == ModelStatus.RUNNING and info.providers:
                self._set_info(info)
            elif info.status in (ModelStatus.STOPPED, ModelStatus.FAILED):
                _remove(self.model_info, info.name)

    def on_loaded(self, info: ModelInfo, load_seconds: float, warmup_seconds: float) -> None:
        with self._lock:
            old = self._versions.get(info.name)
            if old is not None and old != info.version:
                # A swap: drop the old version's series so dashboards don't show it forever.
                for gauge in (self.load_duration, self.warmup_duration):
                    _remove(gauge, info.name, old)
            self._versions[info.name] = info.version
            self.load_duration.labels(info.name, info.version).set(load_seconds)
            self.warmup_duration.labels(info.name, info.version).set(warmup_seconds)
            if info.status == ModelStatus.RUNNING:
                self._set_info(info)

    def on_swap(self, info: ModelInfo, ok: bool, reason: str) -> None:
        self.swaps.labels(info.name, "ok" if ok else "failed").inc()

    def on_removed(self, name: str) -> None:
        with self._lock:
            self._statuses.pop(name, None)
            version = self._versions.pop(name, None)
            for status in ModelStatus:
                _remove(self.model_status, name, status.name)
            _remove(self.model_info, name)
            if version is not None:
                for gauge in (self.load_duration, self.warmup_duration):
                    _remove(gauge, name, version)

    def _set_info(self, info: ModelInfo) -> None:
        self.model_info.labels(info.name).info({
            "version": info.version,
            "provider": info.providers[0] if info.providers else "",
            "providers": ",".join(info.providers),
        })

    # -- endpoint ------------------------------------------------------------------------------
    def serve(self, address: str, port: int) -> MetricsServer:
        """Serve /metrics over HTTP on address:port (port 0 = any free port; read it back from .port)."""
        return MetricsServer(self.registry, address, port)


def _remove(metric: Any, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


class AdmissionCollector(Collector):
    """In-flight and queued DetectAnomalies requests per running model, read when Prometheus scrapes
    (the gates already count them; keeping a second copy in gauges could only drift)."""

    def __init__(self, models: ModelRegistry) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        inflight = GaugeMetricFamily("edge_agent_inflight_requests", "DetectAnomalies requests running now",
                                     labels=MODEL_LABELS)
        queued = GaugeMetricFamily("edge_agent_queued_requests", "DetectAnomalies requests waiting for an "
                                   "inference slot (Triton's pending request count)", labels=MODEL_LABELS)
        for info in self._models.models():
            if info.status != ModelStatus.RUNNING:
                continue
            try:
                running = self._models.running(info.name)
            except Exception:  # stopped between list() and running(): nothing to report
                continue
            inflight.add_metric([running.name, running.version], running.gate.active)
            queued.add_metric([running.name, running.version], running.gate.waiting)
        yield inflight
        yield queued

    def describe(self) -> Iterator[Metric]:
        # Describing without collecting keeps register() from calling into the registry early.
        yield GaugeMetricFamily("edge_agent_inflight_requests", "", labels=MODEL_LABELS)
        yield GaugeMetricFamily("edge_agent_queued_requests", "", labels=MODEL_LABELS)


class MetricsServer:
    """The /metrics HTTP endpoint (prometheus_client's WSGI server in a daemon thread), stoppable."""

    def __init__(self, registry: CollectorRegistry, address: str, port: int) -> None:
        self._httpd, self._thread = start_http_server(port, address, registry=registry)
        self.address = address
        self.port: int = self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    def close(self, timeout: float = 5.0) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout)
