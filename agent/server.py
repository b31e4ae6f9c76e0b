"""The composition root: builds runtime, registry, inference service, gRPC server and discovery
from one AgentConfig, and runs them with an orderly start and stop. No I/O in __init__."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from .config import AgentConfig
from .discovery import DirectoryWatcher
from .grpc._generated import edge_agent_pb2_grpc as pb_grpc
from .grpc.server import bind, build_server, secure_socket
from .grpc.servicer import EdgeAgentServicer
from .inference import DetectObserver, InferenceService
from .pipeline import Clock
from .registry import ModelRegistry, RegistryListener, RegistrySettings
from .runtime.base import ModelRuntime
from .runtime.onnx import OnnxRuntime, OnnxRuntimeOptions

log = logging.getLogger(__name__)


def registry_settings(config: AgentConfig) -> RegistrySettings:
    return RegistrySettings(
        max_concurrency=config.max_concurrency,
        max_queue=config.max_queue,
        warmup_runs=config.warmup_runs,
        stop_timeout_s=config.stop_timeout_s,
        autostart=config.autostart,
    )


def onnx_runtime(config: AgentConfig) -> OnnxRuntime:
    return OnnxRuntime(OnnxRuntimeOptions(
        providers=config.execution_providers,
        require_accelerator=config.require_accelerator,
        intra_op_threads=config.intra_op_threads,
        inter_op_threads=config.inter_op_threads,
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
    ) -> None:
        self.config = config
        self.registry = ModelRegistry(runtime or onnx_runtime(config), registry_settings(config), clock=clock,
                                      listeners=listeners)
        self.inference = InferenceService(self.registry, clock=clock, observer=observer)
        self.addresses: list[str] = []
        self._services = list(services)  # extra gRPC services (health, reflection), added at start()
        self._server: grpc.Server | None = None
        self._watcher: DirectoryWatcher | None = None
        self._stop_requested = threading.Event()

    def start(self) -> None:
        server = build_server(self.config)
        pb_grpc.add_EdgeAgentServicer_to_server(EdgeAgentServicer(self.registry, self.inference), server)
        for add_service in self._services:
            add_service(server)
        self.addresses = bind(server, self.config)
        server.start()
        self._server = server
        secure_socket(self.config)
        log.info("edge agent serving on %s", ", ".join(self.addresses))
        if self.config.models_dir:
            self._watcher = DirectoryWatcher(Path(self.config.models_dir), self.registry, self.config.scan_interval_s)
            self._watcher.start()

    def request_stop(self) -> None:
        """Wake whoever is in wait() (signal handlers call this; they must not block)."""
        self._stop_requested.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until request_stop() or stop(); True if that happened within timeout."""
        return self._stop_requested.wait(timeout)

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish (grace), stop models, remove the socket."""
        if self._watcher is not None:
            self._watcher.stop()
        if self._server is not None:
            self._server.stop(self.config.stop_timeout_s if grace is None else grace).wait()
        self.registry.close()
        try:
            Path(self.config.socket_path).unlink(missing_ok=True)
        except OSError:
            pass
        self._stop_requested.set()
        log.info("edge agent stopped")
