"""Model registry and lifecycle: known models, their states, loads, swaps, and who holds what.

One explicit state machine per model (the states are the Lookout for Vision Edge Agent's):

    STOPPED/FAILED --start--> STARTING --load ok--> RUNNING
    STARTING --load fails / takes longer than ModelLoadTimeoutSeconds--> FAILED
    STARTING --stop--> STOPPED             (the load is cancelled; its result, if it ever comes, is discarded)
    RUNNING --stop--> STOPPING --drained (or StopTimeoutSeconds)--> STOPPED
    RUNNING --new package--> RUNNING + swap pending
        swap commit: the new version serves, the old one is freed when its last request lets go
        swap fail / time-out: the old version keeps serving; the failed package is remembered and not
        retried until a package with another fingerprint appears; DescribeModel's message says why
        stop / remove / newer package during a swap: the pending load is cancelled and discarded
    any state --remove--> gone             (a load is cancelled; RUNNING is drained first, as by a stop)

Requests hold a *lease* on the loaded version they looked up (`lease()`), so a stop, swap or removal
never unloads a session under a request: a retired version is unloaded when its last holder lets go.
Every load runs in a `_Loader` slot with a time limit; a queued load that a newer one supersedes is
dropped before it starts, and a load that hangs gives its slot back when its time is up.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from agent.core.admission import Capacity, Gate
from agent.core.package import ModelPackage
from agent.core.pipeline import Clock, Predictor
from agent.core.resize import ResizeWorkers
from agent.errors import AgentError, InvalidModelState, ModelNotFound
from agent.logs import model_context
from agent.runtime.base import ModelRuntime, RuntimeSession

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
    load_timeout_s: float = 600.0
    autostart: tuple[str, ...] = ()


class _Loaded:
    """One loaded version and the requests holding it. Freed once retired and its last holder let go."""

    def __init__(self, package: ModelPackage, session: RuntimeSession, predictor: Predictor) -> None:
        self.package = package
        self.session = session
        self.predictor = predictor
        self.providers = tuple(session.providers)
        self.note = session.provider_note
        self.holders = 0
        self.retired = False
        self.unloaded = False


class _LoadJob:
    """One load (a start, or a swap's new version). Only the job a model currently points at counts:
    anything else that finishes is discarded, so cancelling is just forgetting it."""

    def __init__(self, model: _Model, package: ModelPackage, swap: bool) -> None:
        self.model = model
        self.package = package
        self.swap = swap
        self.cancelled = threading.Event()

    def __repr__(self) -> str:
        kind = "swap" if self.swap else "start"
        return f"<load {kind} {self.package.name} {self.package.version}>"


@dataclass(eq=False)
class _Model:
    package: ModelPackage  # the newest package known: what the next start (or the pending swap) loads
    status: ModelStatus = ModelStatus.STOPPED
    message: str = ""
    serving: _Loaded | None = None
    gate: Gate | None = None
    job: _LoadJob | None = None
    rejected: dict[str, str] = field(default_factory=dict)  # fingerprint → why its swap failed
    package_problem: str = ""  # a newer package that could not even be read (discovery reports it)
    removed: bool = False

    def info(self) -> ModelInfo:
        serving = self.serving if self.status in (ModelStatus.RUNNING, ModelStatus.STOPPING) else None
        package = serving.package if serving is not None else self.package
        message = self.message
        if self.job is not None and self.job.swap:
            loading = f"loading version {self.job.package.version} to replace version {package.version}"
            message = f"{message}; {loading}" if message else loading
        if self.package_problem:
            message = f"{message}; {self.package_problem}" if message else self.package_problem
        providers = serving.providers if serving is not None else ()
        return ModelInfo(package.name, package.arn, self.status, message, package.version, providers)


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
        capacity: Capacity | None = None,
        resize_workers: ResizeWorkers | None = None,
    ) -> None:
        self._runtime = runtime
        self._settings = settings
        self._clock = clock
        self._listeners = list(listeners or [])
        self._capacity = capacity
        self._resize_workers = resize_workers
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # a holder let go, or a stop finished
        self._models: dict[str, _Model] = {}
        self._loader = _Loader(loader_threads, lambda: self._settings.load_timeout_s, self._load_timed_out)
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
        """Models being loaded: STARTING, or a new version loading beside the running one."""
        with self._lock:
            return sorted(n for n, m in self._models.items() if m.job is not None)

    def _get(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None or model.removed:
            raise ModelNotFound(name)
        return model

    # -- transitions ---------------------------------------------------------------------------
    def start(self, name: str) -> ModelStatus:
        """STOPPED/FAILED → STARTING (returned at once); the load continues in the background."""
        with self._lock:
            model = self._get(name)
            if model.status not in (ModelStatus.STOPPED, ModelStatus.FAILED):
                raise InvalidModelState(f"the edge agent can't start model {name!r}: it is {model.status.name}; "
                                        "only a STOPPED or FAILED model can be started")
            if self._closed:
                raise InvalidModelState(f"the edge agent can't start model {name!r}: it is shutting down")
            self._begin_load(model, model.package, swap=False)
            model.status = ModelStatus.STARTING
            model.message = "loading"
            info = model.info()
        self._notify("on_status", info)
        return ModelStatus.STARTING

    def stop(self, name: str) -> ModelStatus:
        """RUNNING → STOPPING → (requests drained, session freed) → STOPPED; STARTING → STOPPED (the load is
        cancelled). A stop already under way is waited for. Returns STOPPED; FAILED_PRECONDITION for a
        STOPPED or FAILED model (as Lookout for Vision's agent)."""
        with self._lock:
            model = self._get(name)
            if model.status == ModelStatus.STOPPING:
                return self._await_stop(model)
            if model.status == ModelStatus.STARTING:
                self._cancel_load(model)
                model.status = ModelStatus.STOPPED
                model.message = "stopped while loading (the load was cancelled)"
                info = model.info()
                serving = None
            elif model.status == ModelStatus.RUNNING:
                self._cancel_load(model)  # a pending swap: the next start loads the newest package
                model.status = ModelStatus.STOPPING
                model.message = "stopping: waiting for requests in flight"
                info = model.info()
                serving = model.serving
            else:
                raise InvalidModelState(f"the edge agent can't stop model {name!r}: it is {model.status.name}; "
                                        "only a RUNNING (or STARTING) model can be stopped")
        self._notify("on_status", info)
        if serving is not None:
            self._drain_and_stop(model, serving)
        return ModelStatus.STOPPED

    def _await_stop(self, model: _Model) -> ModelStatus:
        # Called with the lock held: another thread is draining this model; its stop is ours too.
        self._changed.wait_for(lambda: model.status != ModelStatus.STOPPING, self._settings.stop_timeout_s + 5)
        if model.status == ModelStatus.STOPPING:
            raise InvalidModelState(f"model {model.package.name!r} is still STOPPING; try again")
        return ModelStatus.STOPPED

    def _drain_and_stop(self, model: _Model, serving: _Loaded) -> None:
        timeout = self._settings.stop_timeout_s
        with self._lock:
            drained = self._changed.wait_for(lambda: serving.holders == 0, timeout)
            left = serving.holders
            model.serving, model.gate = None, None
            model.status = ModelStatus.STOPPED
            model.message = "stopped" if drained else (
                f"stopped; {left} request(s) still running after {timeout:.0f}s finish on the old session")
            unload = self._retire(serving)
            info = model.info()
            self._changed.notify_all()
        self._unload(unload)
        log.info("model %s stopped", info.name, extra={"model": info.name, "version": serving.package.version})
        self._notify("on_status", info)

    def _begin_load(self, model: _Model, package: ModelPackage, swap: bool) -> None:
        self._cancel_load(model)
        job = _LoadJob(model, package, swap)
        model.job = job
        self._loader.submit(package.name, job, self._run_load)

    def _cancel_load(self, model: _Model) -> None:
        if model.job is not None:
            model.job.cancelled.set()
            model.job = None

    def _retire(self, loaded: _Loaded | None) -> _Loaded | None:
        """Mark a version retired (lock held); returns it if nobody holds it, for the caller to unload."""
        if loaded is None or loaded.retired:
            return None
        loaded.retired = True
        if loaded.holders == 0:
            loaded.unloaded = True
            return loaded
        return None

    @staticmethod
    def _unload(loaded: _Loaded | None) -> None:
        if loaded is None:
            return
        try:
            loaded.session.unload()
        except Exception:  # freeing must never take the lifecycle down; say where it went wrong
            log.exception("model %s: unloading version %s failed", loaded.package.name, loaded.package.version)

    # -- loads ---------------------------------------------------------------------------------
    def _run_load(self, job: _LoadJob) -> None:
        # Loader threads don't inherit a context: label this load's log lines (incl. the runtime's
        # CPU-fallback warning) with the model and the version being loaded.
        with model_context(job.package.name, job.package.version):
            self._load(job)

    def _load(self, job: _LoadJob) -> None:
        package = job.package
        session: RuntimeSession | None = None
        try:
            t0 = self._clock()
            package.verify_files()
            session = self._runtime.load(package)
            if job.cancelled.is_set():
                raise _Cancelled()
            predictor = Predictor(package, session, self._clock, resize_workers=self._resize_workers)
            t1 = self._clock()
            predictor.warmup(self._settings.warmup_runs, np.random.default_rng(0))
            t2 = self._clock()
        except _Cancelled:
            self._discard(job, session)
            return
        except AgentError as exc:
            self._discard(job, session)
            self._load_failed(job, exc.message)
            return
        except Exception as exc:  # a bug, not a bad package: keep the traceback, give the client one line
            log.exception("model %s: loading version %s failed unexpectedly", package.name, package.version)
            self._discard(job, session)
            self._load_failed(job, f"internal error while loading: {type(exc).__name__}: {exc} (traceback in "
                                   "the agent log)")
            return
        loaded = _Loaded(package, session, predictor)
        self._commit(job, loaded, t1 - t0, t2 - t1)

    @staticmethod
    def _discard(job: _LoadJob, session: RuntimeSession | None) -> None:
        if session is None:
            return
        try:
            session.unload()
        except Exception:
            log.exception("model %s: freeing a discarded load failed", job.package.name)

    def _commit(self, job: _LoadJob, loaded: _Loaded, load_s: float, warmup_s: float) -> None:
        model = job.model
        old: _Loaded | None = None
        with self._lock:
            current = model.job is job and not model.removed and not self._closed
            if current and job.swap:
                current = model.status == ModelStatus.RUNNING
            elif current:
                current = model.status == ModelStatus.STARTING
            if current:
                model.job = None
                if job.swap:
                    old = self._retire(model.serving)
                else:
                    s = self._settings
                    model.gate = Gate(s.max_concurrency, s.max_queue, self._capacity)
                    model.status = ModelStatus.RUNNING
                model.serving = loaded
                model.message = loaded.note
                info = model.info()
        if not current:
            self._unload(loaded)
            log.info("model %s: discarded load of version %s (stopped, removed or superseded meanwhile)",
                     job.package.name, job.package.version)
            return
        self._unload(old)
        log.info("model %s %s on %s (load %.3fs, warm-up %.3fs)", info.name,
                 f"swapped in version {info.version}" if job.swap else "RUNNING",
                 info.providers[0] if info.providers else "?", load_s, warmup_s)
        self._notify("on_loaded", info, load_s, warmup_s)
        if job.swap:
            self._notify("on_swap", info, True, "")
        else:
            self._notify("on_status", info)

    def _load_failed(self, job: _LoadJob, reason: str) -> None:
        model, package = job.model, job.package
        with self._lock:
            if model.job is not job or model.removed:
                return
            model.job = None
            if job.swap:
                model.rejected[package.fingerprint] = reason
                serving = model.serving.package.version if model.serving else "?"
                model.message = (f"update of {package.name} to version {package.version} failed, still serving "
                                 f"the previous version ({serving}): "
                                 f"{reason} (not retried until the package changes)")
            else:
                model.status = ModelStatus.FAILED
                model.message = reason
            info = model.info()
        log.error("model %s: %s", package.name, info.status_message)
        if job.swap:
            self._notify("on_swap", info, False, reason)
        else:
            self._notify("on_status", info)

    def _load_timed_out(self, job: _LoadJob) -> None:
        limit = self._settings.load_timeout_s
        job.cancelled.set()
        self._load_failed(job, f"loading version {job.package.version} took longer than "
                               f"ModelLoadTimeoutSeconds ({limit:g}s) and was abandoned")

    # -- packages come and go ------------------------------------------------------------------
    def upsert(self, package: ModelPackage) -> None:
        """Add a new model (STOPPED, or started if autostart) or hand a changed package to a known one."""
        name = package.name
        autostart = package.autostart or name in self._settings.autostart or "*" in self._settings.autostart
        start = False
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
                if package.fingerprint == model.package.fingerprint or package.fingerprint in model.rejected:
                    return  # nothing new (a failed swap's package is not tried again)
                was_failed = model.status == ModelStatus.FAILED
                previous = model.package
                model.package = package
                model.package_problem = ""  # a newer package arrived: whatever was wrong before is moot
                self._package_changed(model, package)
                if model.status in (ModelStatus.STOPPED, ModelStatus.FAILED) and (
                        package.unservable or previous.unservable):
                    # FAILED for that reason, or no more (STOPPED until started, like any model)
                    model.status = ModelStatus.FAILED if package.unservable else ModelStatus.STOPPED
                    model.message = package.unservable
                start = was_failed and autostart and not package.unservable
            info = model.info()
        self._notify("on_status", info)
        if start:
            try:
                self.start(name)
            except (InvalidModelState, ModelNotFound):
                pass  # someone else started, stopped or removed it meanwhile

    def _package_changed(self, model: _Model, package: ModelPackage) -> None:
        """A new package for a known model (lock held)."""
        if model.status == ModelStatus.RUNNING:
            serving = model.serving
            if serving is not None and serving.package.fingerprint == package.fingerprint:
                self._cancel_load(model)  # back to what is serving: drop the pending swap
                model.message = serving.note
                return
            log.info("model %s: loading version %s beside the running one", package.name, package.version)
            self._begin_load(model, package, swap=True)
        elif model.status == ModelStatus.STARTING:
            self._begin_load(model, package, swap=False)  # restart the load with the new files
        # STOPPED, FAILED, STOPPING: the next start loads the new package

    def report_package_problem(self, name: str, problem: str) -> None:
        """A newer package for `name` exists but can't be read (discovery keeps serving the previous one):
        shown in DescribeModel's status_message until the reporter clears it (problem "") or a package
        with another fingerprint arrives. Unknown names are ignored."""
        with self._lock:
            model = self._models.get(name)
            if model is None or model.removed or model.package_problem == problem:
                return
            model.package_problem = problem
            info = model.info()
        self._notify("on_status", info)

    def remove(self, name: str) -> None:
        """Forget a model in any state: a load under way is cancelled, a RUNNING model is drained first like a
        StopModel (STOPPING, at most StopTimeoutSeconds; requests still running then finish on the version
        they hold, which is freed when the last of them lets go). Blocks for the drain: discovery calls it
        from its own removal thread, never from a scan."""
        with self._lock:
            model = self._models.get(name)
            if model is None or model.removed:
                return
            self._cancel_load(model)
            serving = None
            if model.status == ModelStatus.RUNNING:
                model.status = ModelStatus.STOPPING
                model.message = "removing: waiting for requests in flight"
                serving = model.serving
                info = model.info()
            elif model.status == ModelStatus.STOPPING:  # a StopModel is draining it: let that finish
                self._changed.wait_for(lambda: model.status != ModelStatus.STOPPING,
                                       self._settings.stop_timeout_s + 5)
        if serving is not None:
            self._notify("on_status", info)
            self._drain_and_stop(model, serving)
        with self._lock:
            if model.removed:
                return  # removed by another caller meanwhile
            model.removed = True
            if self._models.get(name) is model:
                del self._models[name]
            self._cancel_load(model)  # started again during the drain
            unload = self._retire(model.serving)
            model.serving, model.gate = None, None
            model.status = ModelStatus.STOPPED
            self._changed.notify_all()
        self._unload(unload)
        log.info("model %s removed", name)
        self._notify("on_removed", name)

    def sync(self, packages: Mapping[str, ModelPackage]) -> None:
        """Make the known models exactly `packages` (a discovery scan's result)."""
        for name in self.names() - set(packages):
            self.remove(name)
        for package in packages.values():
            self.upsert(package)

    # -- requests --------------------------------------------------------------------------------
    @contextmanager
    def lease(self, name: str) -> Iterator[RunningModel]:
        """Hold the model's current version for one request: NOT_FOUND / FAILED_PRECONDITION unless it is
        RUNNING. Whatever happens to the model meanwhile (stop, swap, removal), the version stays loaded
        until the request lets go."""
        with self._lock:
            model = self._get(name)
            serving, gate = model.serving, model.gate
            if model.status != ModelStatus.RUNNING or serving is None or gate is None:
                raise InvalidModelState(f"model {name!r} is {model.status.name}, not RUNNING; call StartModel and "
                                        "wait for RUNNING")
            serving.holders += 1
        try:
            yield RunningModel(name, serving.package.version, serving.predictor, gate)
        finally:
            with self._lock:
                serving.holders -= 1
                unload = serving.retired and serving.holders == 0 and not serving.unloaded
                if unload:
                    serving.unloaded = True
                self._changed.notify_all()
            if unload:
                self._unload(serving)

    def running(self, name: str) -> RunningModel:
        """A look at the model's current version and gate (metrics, tests); requests use lease()."""
        with self._lock:
            model = self._get(name)
            if model.status != ModelStatus.RUNNING or model.serving is None or model.gate is None:
                raise InvalidModelState(f"model {name!r} is {model.status.name}, not RUNNING; call StartModel and "
                                        "wait for RUNNING")
            return RunningModel(name, model.serving.package.version, model.serving.predictor, model.gate)

    def wait_for(self, name: str, statuses: set[ModelStatus], timeout: float) -> ModelInfo:
        """Poll until the model is in one of statuses (tests, CLI); returns the last info seen."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.describe(name)
            if info.status in statuses or time.monotonic() > deadline:
                return info
            time.sleep(0.01)

    def close(self) -> None:
        """Stop every model (draining requests, cancelling loads) and the loader."""
        with self._lock:
            self._closed = True
            names = [n for n, m in self._models.items()
                     if m.status in (ModelStatus.RUNNING, ModelStatus.STARTING, ModelStatus.STOPPING)]
        for name in names:
            try:
                self.stop(name)
            except AgentError:
                pass
        self._loader.close(self._settings.stop_timeout_s)

    def _notify(self, hook: str, *args: object) -> None:
        for listener in self._listeners:
            fn: Callable[..., None] | None = getattr(listener, hook, None)
            if fn is None:
                continue
            try:
                fn(*args)
            except Exception:  # a broken listener (metrics, persistence) must not break the lifecycle
                log.exception("registry listener %s.%s failed", type(listener).__name__, hook)


class _Cancelled(Exception):
    """The load's result is no longer wanted (stopped, removed or superseded while loading)."""


class _Loader:
    """Runs loads, at most `parallel` at a time, each with a time limit.

    The queue holds at most one load per model: a newer one replaces a queued one, which is dropped
    before it starts. A running load that passes its time limit is reported (the model goes FAILED, or
    its swap fails) and gives its slot back; its thread is left to finish on its own and whatever it
    produces is discarded, so one hung load can't block the others."""

    def __init__(self, parallel: int, timeout_s: Callable[[], float],
                 on_timeout: Callable[[_LoadJob], None]) -> None:
        self._parallel = parallel
        self._timeout_s = timeout_s
        self._on_timeout = on_timeout
        self._cond = threading.Condition()
        self._queue: dict[str, tuple[_LoadJob, Callable[[_LoadJob], None]]] = {}
        self._running: dict[_LoadJob, float] = {}  # job → monotonic deadline
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, key: str, job: _LoadJob, run: Callable[[_LoadJob], None]) -> None:
        with self._cond:
            if self._closed:
                job.cancelled.set()
                return
            queued = self._queue.pop(key, None)
            if queued is not None:
                queued[0].cancelled.set()  # superseded before it began
            self._queue[key] = (job, run)
            if self._thread is None:
                self._thread = threading.Thread(target=self._supervise, name="model-loader", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _supervise(self) -> None:
        while True:
            expired: list[_LoadJob] = []
            with self._cond:
                while True:
                    now = time.monotonic()
                    expired = [j for j, deadline in self._running.items() if deadline <= now]
                    if expired:
                        for job in expired:
                            del self._running[job]
                        break
                    if self._closed and not self._running:
                        return
                    if self._queue and len(self._running) < self._parallel and not self._closed:
                        key = next(iter(self._queue))
                        job, run = self._queue.pop(key)
                        if job.cancelled.is_set():
                            continue
                        self._running[job] = now + self._timeout_s()
                        threading.Thread(target=self._execute, args=(job, run), daemon=True,
                                         name=f"model-loader-{job.package.name}").start()
                        continue
                    deadlines = list(self._running.values())
                    self._cond.wait(min(deadlines) - now if deadlines else None)
            for job in expired:
                log.error("model %s: load of version %s passed its time limit", job.package.name,
                          job.package.version)
                try:
                    self._on_timeout(job)
                except Exception:
                    log.exception("model %s: handling a load time-out failed", job.package.name)

    def _execute(self, job: _LoadJob, run: Callable[[_LoadJob], None]) -> None:
        try:
            run(job)
        except Exception:  # run() reports its own failures; this is the last line against a dead slot
            log.exception("model %s: load crashed", job.package.name)
        finally:
            with self._cond:
                self._running.pop(job, None)
                self._cond.notify_all()

    def close(self, timeout: float) -> None:
        """Drop queued loads and wait (up to timeout) for running ones; a hung one is left behind."""
        with self._cond:
            self._closed = True
            for job, _ in self._queue.values():
                job.cancelled.set()
            self._queue.clear()
            for job in self._running:
                job.cancelled.set()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
