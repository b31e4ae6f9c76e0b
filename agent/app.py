"""The composition root, the only one: `serve()` (what `edge-agent serve` runs) wires configuration,
Greengrass, memory tuning and signals around an `Agent`, which builds runtime, model lifecycle,
inference, gRPC server, health, metrics and discovery from one AgentConfig and runs them with an
orderly start and stop. No I/O in __init__."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from agent import __version__
from agent.config import AgentConfig
from agent.core.admission import Capacity
from agent.core.discovery import DirectoryWatcher
from agent.core.inference import DetectObserver, InferenceService
from agent.core.lifecycle import ModelRegistry, RegistryListener, RegistrySettings
from agent.core.masks import MaskPolicy
from agent.core.pipeline import Clock, Detection
from agent.core.resize import ResizeWorkers
from agent.logs import configure
from agent.runtime.base import ModelRuntime
from agent.runtime.onnx import OnnxRuntime, OnnxRuntimeOptions
from agent.serving.grpc.guard import RequestGuard
from agent.serving.grpc.interceptors import MetricsInterceptor
from agent.serving.grpc.server import bind, build_server, detect_capacity, secure_socket
from agent.serving.grpc.servicer import EdgeAgentServicer, add_to_server
from agent.serving.health import AgentHealth, enable_reflection
from agent.serving.metrics import AgentMetrics, MetricsServer

log = logging.getLogger(__name__)


def registry_settings(config: AgentConfig) -> RegistrySettings:
    return RegistrySettings(
        max_concurrency=config.max_concurrency,
        max_queue=config.max_queue,
        warmup_runs=config.warmup_runs,
        stop_timeout_s=config.stop_timeout_s,
        load_timeout_s=config.load_timeout_s,
        autostart=config.autostart,
    )


def mask_policy(config: AgentConfig) -> MaskPolicy:
    return MaskPolicy(config.inline_mask, config.inline_mask_max_bytes, config.inline_mask_normal)


def onnx_runtime(config: AgentConfig) -> OnnxRuntime:
    return OnnxRuntime(OnnxRuntimeOptions(
        providers=config.execution_providers,
        require_accelerator=config.require_accelerator,
        intra_op_threads=config.intra_op_threads,
        inter_op_threads=config.inter_op_threads,
        allow_spinning=config.intra_op_spinning,
        cache_dir=Path(config.work_dir),
    ))


class Agent:
    """The running agent. `start()` binds and serves; `stop()` drains and unbinds."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        runtime: ModelRuntime | None = None,
        clock: Clock = time.perf_counter,
        listeners: list[RegistryListener] | None = None,
        observer: DetectObserver | None = None,
        services: Sequence[Callable[[grpc.Server], None]] = (),
        interceptors: Sequence[grpc.ServerInterceptor] = (),
        metrics_registry: CollectorRegistry | None = None,
        component_models: bool = False,
    ) -> None:
        self.config = config
        # Metrics and health are wired here and nowhere else. The registry is a fresh one per agent
        # unless the caller (a test, an embedding application) hands one in; never the global one.
        self.metrics = AgentMetrics(metrics_registry if metrics_registry is not None else CollectorRegistry(),
                                    clock=clock)
        self.health = AgentHealth()
        self.runtime = runtime or onnx_runtime(config)
        # Under Greengrass the models dir holds one symlink per model component (docs/greengrass.md).
        self._component_models = component_models
        # The one admission bound of the whole server (agent/core/admission.py): fixed by GrpcWorkers.
        self.capacity = Capacity(detect_capacity(config))
        # Shared by every model: the threads that resize row bands of large frames (agent/core/resize.py).
        self.resize_workers = ResizeWorkers(config.resize_threads or ResizeWorkers.auto_threads())
        self.registry = ModelRegistry(self.runtime, registry_settings(config), clock=clock,
                                      listeners=[self.metrics, self.health, *(listeners or [])],
                                      capacity=self.capacity, resize_workers=self.resize_workers)
        self.metrics.watch_admission(self.registry)
        observers = [self.metrics] + ([observer] if observer is not None else [])
        self.inference = InferenceService(self.registry, clock=clock, observer=_Observers(observers),
                                          mask_policy=mask_policy(config))
        self.addresses: list[str] = []
        self.metrics_server: MetricsServer | None = None
        # extra gRPC services, added at start(); health always, reflection if configured
        self._services = [self.health.add_to_server, *services]
        self._interceptors = [MetricsInterceptor(self.metrics), *interceptors]
        self._guard = RequestGuard()
        self._server: grpc.Server | None = None
        self._watcher: DirectoryWatcher | None = None
        self._stop_requested = threading.Event()

    def start(self) -> None:
        server = build_server(self.config, self._interceptors, self._guard)
        add_to_server(EdgeAgentServicer(self.registry, self.inference), server)
        for add_service in self._services:
            add_service(server)
        if self.config.grpc_reflection:
            enable_reflection(server)
        self.addresses = bind(server, self.config)
        server.start()
        self._server = server
        secure_socket(self.config)
        self.health.serving()
        self._start_metrics()
        log.info("edge agent %s serving on %s; metrics %s", __version__, ", ".join(self.addresses),
                 f"at {self.metrics_server.url}" if self.metrics_server else "off")
        if self.config.models_dir:
            self._watcher = DirectoryWatcher(
                Path(self.config.models_dir), self.registry, self.config.scan_interval_s,
                removal_grace_s=self._removal_grace_s(), name_from_entry=self._component_models,
                prune_dangling_links=self._component_models)
            self._watcher.start()

    def apply_config(self, new: AgentConfig) -> list[str]:
        """Apply a configuration change live where possible (registry bounds and autostart, execution
        providers and threads for later loads, discovery timing, log level). Returns the Greengrass
        keys of changed settings that only take effect after a restart; they keep their old value."""
        old = self.config
        fields = AgentConfig.keys()
        changed = [key for key, f in fields.items() if getattr(old, f.name) != getattr(new, f.name)]
        later = [key for key in changed if fields[key].metadata["restart"]]
        live = {fields[key].name: getattr(new, fields[key].name) for key in changed if key not in later}
        if not live:
            return later
        config = old.replace(**live)
        self.config = config
        self.registry.update_settings(registry_settings(config))
        self.inference.mask_policy = mask_policy(config)
        if isinstance(self.runtime, OnnxRuntime):
            self.runtime.options = onnx_runtime(config).options
        if self._watcher is not None:
            self._watcher.interval_s = config.scan_interval_s
            self._watcher.removal_grace_s = self._removal_grace_s()
        if "LogLevel" in changed:
            logging.getLogger().setLevel(config.log_level)
        log.info("configuration applied live: %s", ", ".join(f"{k}={_show(getattr(config, fields[k].name))}"
                                                              for k in changed if k not in later))
        return later

    def _removal_grace_s(self) -> float:
        # Both modes: it protects Greengrass model-component links (docs/greengrass.md) and a standalone
        # package replaced by `rm -rf` + `cp -r` slower than a scan (docs/model-package.md).
        return self.config.removal_grace_s

    def rescan_models(self, flush_missing: bool = False) -> None:
        """Look at the models dir now (a deployment just finished) instead of at the next poll."""
        if self._watcher is not None:
            self._watcher.scan(flush_missing=flush_missing)

    def request_stop(self) -> None:
        """Wake whoever is in wait() (signal handlers call this; they must not block)."""
        self._stop_requested.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until request_stop() or stop(); True if that happened within timeout.

        Waits in short slices: Python runs signal handlers in the main thread only, and a SIGTERM that
        the kernel delivers to another thread (grpc's, ONNX Runtime's) does not interrupt a lock wait
        without a timeout, so an untimed wait could sleep through the signal forever (seen once in
        eight SIGTERMs under load)."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 0.2 if end is None else min(0.2, end - time.monotonic())
            if self._stop_requested.wait(max(left, 0.0)):
                return True
            if end is not None and time.monotonic() >= end:
                return False

    def stop(self, grace: float | None = None) -> None:
        """Let requests that arrived finish (within grace), refuse new calls, stop models, remove the socket.

        grpc's stop() drops calls it has accepted but not yet handed to a worker (a burst still arriving),
        so the server is first left to run until it is quiet (nothing handled, nothing new for a moment;
        health already says NOT_SERVING, so well-behaved clients stop sending), then stopped with the
        rest of the grace for what is still running."""
        grace = self.config.stop_timeout_s if grace is None else grace
        deadline = time.monotonic() + grace
        log.info("edge agent stopping: health NOT_SERVING, draining in-flight requests (up to %.0fs)", grace)
        self.health.shutting_down()
        if self._watcher is not None:
            self._watcher.stop()
        if self._server is not None:
            if not self._guard.quiesce(grace):
                log.warning("requests still arriving or running after %.0fs; stopping anyway", grace)
            self._server.stop(max(deadline - time.monotonic(), 0.0)).wait()
        self.registry.close()
        self.resize_workers.close()
        try:
            Path(self.config.socket_path).unlink(missing_ok=True)
        except OSError:
            pass
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        self._stop_requested.set()
        log.info("edge agent stopped")

    def _start_metrics(self) -> None:
        if self.config.metrics_port < 0:
            return
        try:
            self.metrics_server = self.metrics.serve(self.config.metrics_address, self.config.metrics_port)
        except OSError as exc:
            # Inference matters more than its metrics: a taken port must not keep a production line's
            # agent down, so it is an ERROR line (and `edge-agent status` shows no metrics), not a crash.
            log.error("metrics endpoint disabled: cannot listen on %s:%d: %s", self.config.metrics_address,
                      self.config.metrics_port, exc.strerror or exc)


class _Observers:
    """Hands each on_detect to several observers (the agent's metrics plus any the caller adds)."""

    def __init__(self, observers: Sequence[DetectObserver]) -> None:
        self._observers = list(observers)

    def on_detect(self, model: str, version: str, detection: Detection | None, queue_wait: float,
                  read_seconds: float, pixels: int) -> None:
        for observer in self._observers:
            observer.on_detect(model, version, detection, queue_wait, read_seconds, pixels)


def _show(value: object) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def serve(cli: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> int:
    """`edge-agent serve`: configuration (standalone or from the Greengrass nucleus), logging, malloc tuning,
    the agent, Greengrass following and the RUNNING-set store, signals; returns the exit status."""
    from agent.greengrass import detect

    # Started by the Greengrass nucleus (SVCUID + IPC socket in the environment): configuration and
    # deployments come over IPC, models from model components (docs/greengrass.md).
    gg = detect(environ, Path.cwd())
    component = None
    if gg is None:
        config = AgentConfig.from_sources(env=environ, cli=cli)
    else:
        from agent.greengrass.component import ConfigSource, GreengrassComponent
        from agent.greengrass.ipc import aws_session_factory

        connect = aws_session_factory(gg.socket_path, gg.svcuid, component_name=gg.component_name)
        component = GreengrassComponent(connect, ConfigSource(gg.work_path, environ, cli))
        config = component.initial_config()
    configure(config.log_level, config.log_format)
    from agent.runtime.memory import tune_malloc

    tune_malloc(config.malloc_mmap_threshold_mb)

    agent = Agent(config, component_models=gg is not None)
    from agent.core.running_set import STATE_FILE, RunningModels

    # Models asked to run come back RUNNING after a restart, standalone and under Greengrass alike.
    running = RunningModels(Path(config.work_dir) / STATE_FILE, agent.registry,
                            component.component_autostart if component is not None else None)
    agent.registry.add_listener(running)
    agent.start()
    if component is not None:
        component.attach(agent)

    def handle(signum: int, _frame: Any) -> None:
        # Greengrass stops components with SIGTERM: drain in-flight requests, then exit 0.
        agent.request_stop()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        agent.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        running.freeze()  # stopping the models on the way out is not a StopModel
        if component is not None:
            component.stop()
        agent.stop()
    # Non-zero when the nucleus kept refusing our identity: it restarts the component with a fresh one.
    return component.exit_status if component is not None else 0
