"""Model registry and lifecycle: known models, their states, loading, swapping and admission.

States follow the Lookout for Vision Edge Agent: StartModel puts a model in STARTING before it
returns and loads it in the background (session + warm-up) to RUNNING or FAILED; StopModel
drains in-flight requests and unloads synchronously. A new package for a RUNNING model is
loaded and warmed beside the old one and swapped in atomically; requests already holding the
old predictor finish on it, and it is freed when the last of them lets go.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from agent.core.admission import Gate
from agent.core.package import ModelPackage
from agent.core.pipeline import Clock, Predictor
from agent.errors import AgentError, InvalidModelState, ModelNotFound
from agent.logs import model_context
from agent.runtime.base import ModelRuntime

log = logging.getLogger(__name__)


class ModelStatus(enum.Enum):
    """A model's lifecycle state. The names are the wire enum AWS.LookoutVision.ModelStatus's; the gRPC
    adapter maps by name, so nothing here depends on the wire numbers."""

    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    FAILED = "FAILED"
    STOPPING = "STOPPING"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    arn: str
    status: ModelStatus
    status_message: str
    version: str
    providers: tuple[str, ...] = ()


class RegistryListener(Protocol):
    """Hooks for metrics, persistence and logs; called outside the registry lock."""

    def on_status(self, info: ModelInfo) -> None: ...

    def on_loaded(self, info: ModelInfo, load_seconds: float, warmup_seconds: float) -> None: ...

    def on_swap(self, info: ModelInfo, ok: bool, reason: str) -> None: ...

    def on_removed(self, name: str) -> None: ...


@dataclass(frozen=True)
class RegistrySettings:
    max_concurrency: int = 2
    max_queue: int = 16
    warmup_runs: int = 3
    stop_timeout_s: float = 30.0
    autostart: tuple[str, ...] = ()


@dataclass
class _Model:
    package: ModelPackage
    status: ModelStatus = ModelStatus.STOPPED
    message: str = ""
    predictor: Predictor | None = None
    gate: Gate | None = None
    generation: int = 0  # bumps on each start/stop/update, so stale background loads are discarded
    swapping: str = ""  # fingerprint of a package being loaded to replace the running one
    removed: bool = False
    providers: tuple[str, ...] = field(default_factory=tuple)
    package_problem: str = ""  # what discovery says is wrong with the package source (conflict, unreadable update)

    def info(self) -> ModelInfo:
        version = self.package.version
        message = "; ".join(m for m in (self.message, self.package_problem) if m)
        return ModelInfo(self.package.name, self.package.arn, self.status, message, version, self.providers)


@dataclass(frozen=True)
class RunningModel:
    """What a request holds while it runs: the predictor and the model's gate, fixed at lookup."""

    name: str
    version: str
    predictor: Predictor
    gate: Gate


class ModelRegistry:
    def __init__(
        self,
        runtime: ModelRuntime,
        settings: RegistrySettings,
        *,
        clock: Clock = time.perf_counter,
        listeners: list[RegistryListener] | None = None,
        loader_threads: int = 2,
    ) -> None:
        self._runtime = runtime
        self._settings = settings
        self._clock = clock
        self._listeners = list(listeners or [])
        self._lock = threading.RLock()
        self._models: dict[str, _Model] = {}
        self._loader = ThreadPoolExecutor(max_workers=loader_threads, thread_name_prefix="model-loader")
        self._closed = False

    # -- queries -------------------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        with self._lock:
            return [m.info() for _, m in sorted(self._models.items())]

    def describe(self, name: str) -> ModelInfo:
        with self._lock:
            return self._get(name).info()

    def names(self) -> set[str]:
        with self._lock:
            return set(self._models)

    def package(self, name: str) -> ModelPackage:
        with self._lock:
            return self._get(name).package

    def add_listener(self, listener: RegistryListener) -> None:
        self._listeners.append(listener)

    @property
    def settings(self) -> RegistrySettings:
        return self._settings

    def update_settings(self, settings: RegistrySettings) -> None:
        """Live configuration change: applies to later loads, starts and stops (a running model keeps
        the admission bounds it was started with until it is restarted)."""
        with self._lock:
            self._settings = settings

    def busy(self) -> list[str]:
        """Models being loaded: STARTING, or a new version warming up beside the running one."""
        with self._lock:
            return sorted(n for n, m in self._models.items()
                          if m.status == ModelStatus.STARTING or m.swapping)

    def _get(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None or model.removed:
            raise ModelNotFound(name)
        return model

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, name: str) -> ModelStatus:
        """STOPPED/FAILED → STARTING (returned at once); the load continues in the background."""
        with self._lock:
            model = self._get(name)
            if model.status not in (ModelStatus.STOPPED, ModelStatus.FAILED):
                raise InvalidModelState(f"the edge agent can't start model {name!r}: it is {model.status.name}; "
                                        "only a STOPPED or FAILED model can be started")
            self._begin_load(model)
            info = model.info()
        self._notify("on_status", info)
        return ModelStatus.STARTING

    def _begin_load(self, model: _Model) -> None:
        model.status = ModelStatus.STARTING
        model.message = "loading"
        model.generation += 1
        self._loader.submit(self._load, model, model.package, model.generation, False)

    def stop(self, name: str) -> ModelStatus:
        """RUNNING → STOPPING → (in-flight requests drained, session freed) → STOPPED."""
        with self._lock:
            model = self._get(name)
            if model.status != ModelStatus.RUNNING:
                raise InvalidModelState(f"the edge agent can't stop model {name!r}: it is {model.status.name}; "
                                        "only a RUNNING model can be stopped")
            model.status = ModelStatus.STOPPING
            model.message = "stopping"
            model.generation += 1
            info = model.info()
        self._notify("on_status", info)
        self._finish_stop(model)
        with self._lock:
            return model.status

    def _finish_stop(self, model: _Model) -> None:
        gate = model.gate
        drained = gate.drain(self._settings.stop_timeout_s) if gate else True
        with self._lock:
            predictor, model.predictor, model.gate = model.predictor, None, None
            model.status = ModelStatus.STOPPED
            model.providers = ()
            model.message = "stopped" if drained else (
                f"stopped; requests still running after {self._settings.stop_timeout_s:.0f}s finish on the old "
                "session")
            info = model.info()
        if predictor is not None and drained:
            predictor.session.unload()
        log.info("model %s stopped", model.package.name, extra={"model": info.name, "version": info.version})
        self._notify("on_status", info)

    def _load(self, model: _Model, package: ModelPackage, generation: int, swap: bool) -> None:
        # Loader threads don't inherit a context: label this load's log lines (incl. the runtime's
        # CPU-fallback warning) with the model and the version being loaded.
        with model_context(package.name, package.version):
            self._load_in_context(model, package, generation, swap)

    def _load_in_context(self, model: _Model, package: ModelPackage, generation: int, swap: bool) -> None:
        name = package.name
        try:
            t0 = self._clock()
            package.verify_files()
            session = self._runtime.load(package)
            predictor = Predictor(package, session, self._clock)
            t1 = self._clock()
            predictor.warmup(self._settings.warmup_runs, np.random.default_rng(0))
            t2 = self._clock()
        except Exception as exc:  # any failure becomes FAILED / a failed swap, never a dead loader thread
            reason = exc.message if isinstance(exc, AgentError) else f"{type(exc).__name__}: {exc}"
            self._load_failed(model, package, generation, swap, reason)
            return
        with self._lock:
            current = model.generation == generation and not model.removed
            if swap:
                current = current and model.status == ModelStatus.RUNNING and model.swapping == package.fingerprint
            if current:
                model.predictor = predictor
                model.package = package
                model.providers = tuple(session.providers)
                if not swap:
                    model.gate = Gate(self._settings.max_concurrency, self._settings.max_queue)
                    model.status = ModelStatus.RUNNING
                model.swapping = ""
                model.message = session.provider_note
                info = model.info()
        if not current:
            session.unload()
            log.info("model %s: discarded a load that was overtaken (stopped, removed or replaced)", name)
            return
        log.info("model %s %s on %s (load %.3fs, warm-up %.3fs)", name, "swapped in" if swap else "RUNNING",
                 info.providers[0] if info.providers else "?", t1 - t0, t2 - t1)
        self._notify("on_loaded", info, t1 - t0, t2 - t1)
        if swap:
            self._notify("on_swap", info, True, "")
        else:
            self._notify("on_status", info)

    def _load_failed(self, model: _Model, package: ModelPackage, generation: int, swap: bool, reason: str) -> None:
        with self._lock:
            if model.generation != generation or model.removed:
                return
            if swap:
                if model.swapping != package.fingerprint:
                    return
                model.swapping = ""
                model.message = (f"update of {package.name} to version {package.version} "
                                 f"failed, still serving the previous version: {reason}")
            else:
                model.status = ModelStatus.FAILED
                model.message = reason
            info = model.info()
        log.error("model %s: %s", package.name, info.status_message)
        self._notify("on_swap" if swap else "on_status", *((info, False, reason) if swap else (info,)))

    # -- packages come and go ------------------------------------------------------------------
    def upsert(self, package: ModelPackage) -> None:
        """Add a new model (STOPPED, or started if autostart) or hand a changed package to an existing one."""
        name = package.name
        autostart = package.autostart or name in self._settings.autostart or "*" in self._settings.autostart
        with self._lock:
            if self._closed:
                return
            model = self._models.get(name)
            if model is None or model.removed:
                model = _Model(package)
                self._models[name] = model
                log.info("model %s added (version %s)", name, package.version)
                start = autostart and not package.unservable
                if package.unservable:  # e.g. a Neo/DLR-compiled LFV model: listed, FAILED, with the reason
                    model.status, model.message = ModelStatus.FAILED, package.unservable
                    log.error("model %s: %s", name, package.unservable)
            else:
                if package.fingerprint in (model.package.fingerprint, model.swapping):
                    return
                start = False
                if model.status == ModelStatus.RUNNING:
                    model.swapping = package.fingerprint
                    log.info("model %s: loading new version %s beside the running one", name,
                             package.version)
                    self._loader.submit(self._load, model, package, model.generation, True)
                elif model.status == ModelStatus.STARTING:
                    model.package = package
                    self._begin_load(model)  # restart the load with the new files
                else:
                    if package.unservable or model.package.unservable:  # FAILED for that reason, or no more
                        model.status = ModelStatus.FAILED if package.unservable else ModelStatus.STOPPED
                        model.message = package.unservable
                    model.package = package
            info = model.info()
        self._notify("on_status", info)
        if start:
            try:
                self.start(name)
            except InvalidModelState:
                pass

    def report_package_problem(self, name: str, problem: str) -> None:
        """What is wrong with the model's package source while the model keeps what it has (discovery: another
        package claims the name, a newer package can't be read): appended to status_message until the
        reporter clears it with "". Unknown names are ignored."""
        with self._lock:
            model = self._models.get(name)
            if model is None or model.removed or model.package_problem == problem:
                return
            model.package_problem = problem
            info = model.info()
        self._notify("on_status", info)

    def remove(self, name: str) -> None:
        """Forget a model; a RUNNING one is drained and stopped first."""
        with self._lock:
            model = self._models.get(name)
            if model is None or model.removed:
                return
            running = model.status == ModelStatus.RUNNING
            if running:
                model.status = ModelStatus.STOPPING
            model.generation += 1
        if running:
            self._finish_stop(model)
        with self._lock:
            model.removed = True
            if self._models.get(name) is model:
                del self._models[name]
        log.info("model %s removed", name)
        self._notify("on_removed", name)

    def sync(self, packages: Mapping[str, ModelPackage]) -> None:
        """Make the known models exactly `packages` (a discovery scan's result)."""
        for name in self.names() - set(packages):
            self.remove(name)
        for package in packages.values():
            self.upsert(package)

    # -- requests --------------------------------------------------------------------------------
    def running(self, name: str) -> RunningModel:
        """The model's current predictor; NOT_FOUND / FAILED_PRECONDITION unless it is RUNNING."""
        with self._lock:
            model = self._get(name)
            if model.status != ModelStatus.RUNNING or model.predictor is None or model.gate is None:
                raise InvalidModelState(f"model {name!r} is {model.status.name}, not RUNNING; call StartModel and "
                                        "wait for RUNNING")
            return RunningModel(name, model.package.version, model.predictor, model.gate)

    def wait_for(self, name: str, statuses: set[ModelStatus], timeout: float) -> ModelInfo:
        """Poll until the model is in one of statuses (tests, CLI); returns the last info seen."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.describe(name)
            if info.status in statuses or time.monotonic() > deadline:
                return info
            time.sleep(0.01)

    def close(self) -> None:
        """Stop every RUNNING model (draining requests) and the loader threads."""
        with self._lock:
            self._closed = True
            names = [n for n, m in self._models.items() if m.status == ModelStatus.RUNNING]
        for name in names:
            try:
                self.stop(name)
            except AgentError:
                pass
        self._loader.shutdown(wait=True, cancel_futures=True)

    def _notify(self, hook: str, *args: object) -> None:
        for listener in self._listeners:
            fn: Callable[..., None] | None = getattr(listener, hook, None)
            if fn is None:
                continue
            try:
                fn(*args)
            except Exception:  # a broken listener (metrics, persistence) must not break the lifecycle
                log.exception("registry listener %s.%s failed", type(listener).__name__, hook)
