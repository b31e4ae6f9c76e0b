"""The model state machine (agent/core/lifecycle.py), transition by transition, and the races between
them, with real threads, real packages and real ONNX sessions. The runtime below only adds control:
a load can be held on an Event or made to fail, and every load and unload is recorded."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import grey_with_square

from agent.core.admission import Capacity
from agent.core.lifecycle import ModelRegistry, ModelStatus, RegistrySettings
from agent.core.package import ModelPackage
from agent.errors import InvalidModelState, ModelNotFound
from agent.runtime.onnx import OnnxRuntime, OnnxRuntimeOptions

S = ModelStatus


class Session:
    def __init__(self, inner: Any, runtime: HeldRuntime, version: str) -> None:
        self.inner, self.runtime, self.version = inner, runtime, version
        self.inputs, self.outputs = inner.inputs, inner.outputs
        self.providers, self.provider_note = inner.providers, inner.provider_note
        self.unloaded = False

    def predict(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        return self.inner.predict(feeds, output_names)  # raises "session was unloaded" after unload()

    def unload(self) -> None:
        self.unloaded = True
        with self.runtime.lock:
            self.runtime.unloads.append(self.version)
        self.inner.unload()


class HeldRuntime:
    """Real ONNX Runtime; `hold[version]` (an Event) holds that version's load until set, `fail` makes
    loads raise, `loads`/`unloads` record versions."""

    def __init__(self) -> None:
        self.inner = OnnxRuntime(OnnxRuntimeOptions(providers=("cpu",)))
        self.hold: dict[str, threading.Event] = {}
        self.fail: Exception | None = None
        self.lock = threading.Lock()
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.sessions: list[Session] = []

    def load(self, package: ModelPackage) -> Session:
        with self.lock:
            self.loads.append(package.version)
        gate = self.hold.get(package.version)
        if gate is not None:
            gate.wait(30)
        if self.fail is not None:
            raise self.fail
        session = Session(self.inner.load(package), self, package.version)
        with self.lock:
            self.sessions.append(session)
        return session

    def release_all(self) -> None:
        for event in self.hold.values():
            event.set()


@pytest.fixture
def runtime() -> Iterator[HeldRuntime]:
    rt = HeldRuntime()
    yield rt
    rt.release_all()


@pytest.fixture
def registries(runtime: HeldRuntime) -> Iterator[Any]:
    made: list[ModelRegistry] = []

    def make(**settings: Any) -> ModelRegistry:
        loader_threads = settings.pop("loader_threads", 2)
        settings.setdefault("warmup_runs", 1)
        settings.setdefault("stop_timeout_s", 5.0)
        registry = ModelRegistry(runtime, RegistrySettings(**settings), loader_threads=loader_threads,
                                 capacity=Capacity(32))
        made.append(registry)
        return registry

    yield make
    runtime.release_all()
    for registry in made:
        registry.close()


@pytest.fixture
def versions(make_package: Any, short_tmp: Path) -> Any:
    """versions(n, name="widget") → package version n of an anomalib model (each in its own directory)."""

    def make(n: int, name: str = "widget", **kwargs: Any) -> ModelPackage:
        return make_package("anomalib", name, directory=short_tmp / f"{name}-v{n}", model_version=str(n), **kwargs)

    return make


def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def running(registry: ModelRegistry, name: str = "widget") -> Any:
    info = registry.wait_for(name, {S.RUNNING, S.FAILED}, 20)
    assert info.status == S.RUNNING, info.status_message
    return info


def predict_ok(registry: ModelRegistry, name: str = "widget") -> str:
    with registry.lease(name) as model:
        assert model.predictor.predict(grey_with_square()).is_anomalous
        return model.version


def test_start_run_stop_start(registries, versions, runtime):
    registry = registries()
    registry.upsert(versions(1))
    assert registry.describe("widget").status == S.STOPPED
    assert registry.start("widget") == S.STARTING
    with pytest.raises(InvalidModelState, match="it is (STARTING|RUNNING)"):
        registry.start("widget")
    running(registry)
    assert predict_ok(registry) == "1"
    assert registry.stop("widget") == S.STOPPED
    assert runtime.unloads == ["1"]
    with pytest.raises(InvalidModelState, match="only a RUNNING"):
        registry.stop("widget")
    with pytest.raises(InvalidModelState, match="STOPPED, not RUNNING"), registry.lease("widget"):
        pass
    registry.start("widget")
    running(registry)
    assert registry.busy() == []


def test_stop_while_a_new_version_loads_then_start_serves_the_new_one(registries, versions, runtime):
    registry = registries()
    registry.upsert(versions(1))
    registry.start("widget")
    running(registry)
    runtime.hold["2"] = threading.Event()
    registry.upsert(versions(2))
    until(lambda: "2" in runtime.loads)
    assert registry.busy() == ["widget"]  # a Greengrass deployment would wait for this
    assert registry.stop("widget") == S.STOPPED
    assert registry.busy() == []  # nothing left pending: deployments are not deferred forever
    runtime.hold["2"].set()
    until(lambda: runtime.unloads.count("2") == 1)  # the overtaken load is discarded and freed
    assert registry.describe("widget").status == S.STOPPED
    registry.start("widget")
    assert running(registry).version == "2"  # the newest package, not the old one
    assert predict_ok(registry) == "2"
    registry.upsert(versions(3))  # later updates are still picked up
    until(lambda: registry.describe("widget").version == "3")
    assert predict_ok(registry) == "3" and registry.busy() == []


def test_stop_while_starting_cancels_the_load(registries, versions, runtime):
    registry = registries()
    runtime.hold["1"] = threading.Event()
    registry.upsert(versions(1))
    registry.start("widget")
    until(lambda: runtime.loads == ["1"])
    t0 = time.monotonic()
    assert registry.stop("widget") == S.STOPPED
    assert time.monotonic() - t0 < 0.5  # does not wait for the hung load
    info = registry.describe("widget")
    assert info.status == S.STOPPED and "cancelled" in info.status_message
    runtime.hold["1"].set()
    until(lambda: runtime.unloads == ["1"])
    assert registry.describe("widget").status == S.STOPPED  # the late result changed nothing


def test_request_holding_the_model_survives_stop(registries, versions, runtime):
    """A request that looked the model up just before StopModel keeps its session until it lets go."""
    registry = registries(stop_timeout_s=0.3)
    registry.upsert(versions(1))
    registry.start("widget")
    running(registry)
    with registry.lease("widget") as held:
        t0 = time.monotonic()
        assert registry.stop("widget") == S.STOPPED  # drain times out after 0.3 s: STOPPED anyway
        assert 0.25 < time.monotonic() - t0 < 2
        assert "still running" in registry.describe("widget").status_message
        assert runtime.unloads == []
        assert held.predictor.predict(grey_with_square()).is_anomalous  # no "session was unloaded"
    assert runtime.unloads == ["1"]  # freed by the last holder


def test_stop_waits_for_holders_and_concurrent_stops_all_return_stopped(registries, versions, runtime):
    registry = registries(stop_timeout_s=5.0)
    registry.upsert(versions(1))
    registry.start("widget")
    running(registry)
    release = threading.Event()
    leased = threading.Event()

    def hold() -> None:
        with registry.lease("widget"):
            leased.set()
            release.wait(5)

    with ThreadPoolExecutor(4) as pool:
        holder = pool.submit(hold)
        leased.wait(2)
        stops = [pool.submit(registry.stop, "widget") for _ in range(3)]
        until(lambda: registry.describe("widget").status == S.STOPPING)
        time.sleep(0.1)
        assert not any(f.done() for f in stops)  # all wait for the drain
        release.set()
        holder.result(5)
        assert [f.result(5) for f in stops] == [S.STOPPED] * 3
    assert registry.describe("widget").status == S.STOPPED and runtime.unloads == ["1"]


def test_swap_keeps_the_old_version_for_its_holders(registries, versions, runtime):
    registry = registries()
    registry.upsert(versions(1))
    registry.start("widget")
    running(registry)
    with registry.lease("widget") as old:
        registry.upsert(versions(2))
        until(lambda: registry.describe("widget").version == "2")
        assert runtime.unloads == []
        assert old.predictor.predict(grey_with_square()).is_anomalous
        assert predict_ok(registry) == "2"
    assert runtime.unloads == ["1"]


def test_load_timeout_fails_the_model_and_frees_the_loader(registries, versions, runtime):
    registry = registries(load_timeout_s=0.5, loader_threads=1)
    runtime.hold["1"] = threading.Event()
    registry.upsert(versions(1))
    registry.upsert(versions(5, name="other"))
    registry.start("widget")
    until(lambda: runtime.loads == ["1"])
    registry.start("other")  # queued behind the hung load on the only loader slot
    info = registry.wait_for("widget", {S.FAILED}, 5)
    assert info.status == S.FAILED and "ModelLoadTimeoutSeconds (0.5s)" in info.status_message
    running(registry, "other")  # the slot came back when the hung load's time was up
    runtime.hold["1"].set()
    until(lambda: runtime.unloads.count("1") == 1)  # the late session is discarded
    assert registry.describe("widget").status == S.FAILED
    registry.start("widget")  # FAILED → STARTING again
    running(registry)


def test_swap_timeout_keeps_serving(registries, versions, runtime):
    registry = registries(load_timeout_s=0.5)
    registry.upsert(versions(1))
    registry.start("widget")
    running(registry)
    runtime.hold["2"] = threading.Event()
    registry.upsert(versions(2))
    until(lambda: "ModelLoadTimeoutSeconds" in registry.describe("widget").status_message)
    info = registry.describe("widget")
    assert info.status == S.RUNNING and info.version == "1" and registry.busy() == []
    assert predict_ok(registry) == "1"


def test_superseded_queued_load_never_runs(registries, versions, runtime):
    registry = registries(loader_threads=1)
    runtime.hold["9"] = threading.Event()
    registry.upsert(versions(9, name="blocker"))
    registry.start("blocker")
    until(lambda: runtime.loads == ["9"])
    registry.upsert(versions(1))
    registry.start("widget")  # queued
    registry.upsert(versions(2))  # STARTING with a new package: the queued load of 1 is replaced
    runtime.hold["9"].set()
    assert running(registry).version == "2"
    assert runtime.loads == ["9", "2"]  # version 1 was never loaded


def test_programming_error_in_load_is_logged_with_traceback(registries, versions, runtime, caplog):
    registry = registries()
    registry.upsert(versions(1))
    runtime.fail = AttributeError("'NoneType' object has no attribute 'shape'")
    with caplog.at_level(logging.ERROR, logger="agent.core.lifecycle"):
        registry.start("widget")
        info = registry.wait_for("widget", {S.FAILED}, 10)
    assert info.status == S.FAILED
    assert info.status_message.startswith("internal error while loading: AttributeError: 'NoneType'")
    assert "\n" not in info.status_message
    assert any(r.exc_info and r.exc_info[0] is AttributeError for r in caplog.records)


def test_failed_swap_is_not_retried_and_a_fixed_package_is(registries, versions, runtime, caplog):
    registry = registries()
    registry.upsert(versions(1))
    registry.start("widget")
    running(registry)
    broken = versions(2)
    (broken.root / "model.onnx.data").write_bytes(b"corrupt")
    with caplog.at_level(logging.ERROR, logger="agent.core.lifecycle"):
        registry.upsert(broken)
        until(lambda: "update of widget to version 2 failed" in registry.describe("widget").status_message)
        for _ in range(5):  # discovery scans again and again while the broken package stays
            registry.upsert(broken)
        time.sleep(0.2)
    errors = [r for r in caplog.records if "update of widget to version 2 failed" in r.getMessage()]
    assert len(errors) == 1 and registry.busy() == []
    info = registry.describe("widget")
    assert info.status == S.RUNNING and info.version == "1" and "sha256" in info.status_message
    registry.upsert(versions(3))  # fixed: a new fingerprint is tried
    until(lambda: registry.describe("widget").version == "3")
    assert "failed" not in registry.describe("widget").status_message


def test_package_fixed_after_failed_start(registries, versions, runtime):
    registry = registries()
    broken = versions(1)
    (broken.root / "model.onnx.data").write_bytes(b"corrupt")
    registry.upsert(broken)
    registry.start("widget")
    assert registry.wait_for("widget", {S.FAILED}, 10).status == S.FAILED
    registry.upsert(versions(2))
    assert registry.describe("widget").status == S.FAILED  # not autostart: a client starts it
    registry.start("widget")
    assert running(registry).version == "2"
    # With autostart, a fixed package is loaded as soon as it appears.
    bad = versions(1, name="auto", autostart=True)
    (bad.root / "model.onnx.data").write_bytes(b"corrupt")
    registry.upsert(bad)
    assert registry.wait_for("auto", {S.FAILED}, 10).status == S.FAILED
    registry.upsert(versions(2, name="auto", autostart=True))
    assert running(registry, "auto").version == "2"


def test_package_problem_is_shown_until_a_readable_package_arrives(registries, versions):
    registry = registries()
    package = versions(1)
    registry.upsert(package)
    registry.report_package_problem("widget", "new package skipped: manifest.json is not valid JSON")
    assert registry.describe("widget").status_message.endswith("manifest.json is not valid JSON")
    registry.upsert(package)  # discovery keeps handing in the previous package meanwhile
    assert "manifest.json" in registry.describe("widget").status_message
    registry.report_package_problem("widget", "")  # the directory reads fine again
    assert "manifest" not in registry.describe("widget").status_message
    registry.report_package_problem("widget", "half-copied")
    registry.upsert(versions(2))  # or a new package arrives
    assert "half-copied" not in registry.describe("widget").status_message
    registry.report_package_problem("nope", "ignored")  # unknown names are ignored


def test_remove_drains_like_stop_and_frees_after_the_last_holder(registries, versions, runtime):
    registry = registries(stop_timeout_s=0.3)
    registry.upsert(versions(1))
    registry.start("widget")
    running(registry)
    with registry.lease("widget") as held:
        t0 = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            removal = pool.submit(registry.remove, "widget")
            until(lambda: registry.describe("widget").status == S.STOPPING)
            with pytest.raises(InvalidModelState, match="STOPPING"), registry.lease("widget"):
                pass
            removal.result(5)
        assert 0.25 < time.monotonic() - t0 < 2  # drained for StopTimeoutSeconds, then gone
        with pytest.raises(ModelNotFound):
            registry.describe("widget")
        assert held.predictor.predict(grey_with_square()).is_anomalous  # still loaded for its holder
        assert runtime.unloads == []
    assert runtime.unloads == ["1"]


def test_remove_while_loading_discards_the_load(registries, versions, runtime):
    registry = registries()
    runtime.hold["1"] = threading.Event()
    registry.upsert(versions(1))
    registry.start("widget")
    until(lambda: runtime.loads == ["1"])
    registry.remove("widget")
    assert registry.busy() == []
    runtime.hold["1"].set()
    until(lambda: runtime.unloads == ["1"])
    assert registry.names() == set()


def test_requests_racing_stop_start_and_swaps(registries, versions, runtime):
    """Real threads for ~1 s: requests lease and predict while another thread stops, starts and swaps.
    Requests may be refused (FAILED_PRECONDITION / NOT_FOUND), never hit an unloaded session; every
    StopModel returns STOPPED; at the end every session but the serving one is freed."""
    registry = registries(stop_timeout_s=5.0)
    packages = [versions(1), versions(2)]
    registry.upsert(packages[0])
    registry.start("widget")
    running(registry)
    stop_at = time.monotonic() + 1.0
    outcomes: dict[str, int] = {}
    lock = threading.Lock()
    image = grey_with_square()

    def client() -> None:
        while time.monotonic() < stop_at:
            try:
                with registry.lease("widget") as model:
                    model.predictor.predict(image)
                kind = "ok"
            except InvalidModelState:
                kind = "refused"
            with lock:
                outcomes[kind] = outcomes.get(kind, 0) + 1

    def operator() -> list[ModelStatus]:
        results = []
        i = 0
        while time.monotonic() < stop_at:
            i += 1
            registry.upsert(packages[i % 2])
            try:
                results.append(registry.stop("widget"))
            except InvalidModelState:
                pass  # a load had failed? (it must not: checked below)
            registry.start("widget")
            registry.wait_for("widget", {S.RUNNING, S.FAILED}, 10)
        return results

    with ThreadPoolExecutor(5) as pool:
        clients = [pool.submit(client) for _ in range(4)]
        stops = pool.submit(operator).result(30)
        for f in clients:
            f.result(30)  # any other exception (e.g. "session was unloaded") fails here
    assert stops and set(stops) == {S.STOPPED}
    assert outcomes.get("ok", 0) > 0
    running(registry)
    serving = [s for s in runtime.sessions if not s.unloaded]
    assert len(serving) == 1
