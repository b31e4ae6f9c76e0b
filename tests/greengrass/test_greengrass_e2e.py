"""End to end: deployments of a model component, emulated the way the Java nucleus does them.

The agent runs as the nucleus runs it: recipe.yaml's Run step (with its interpolated Setenv) in
the component's work dir, with SVCUID and the IPC socket in the environment, talking to the fake
nucleus with the real awsiotsdk client. Model components come from agent/packaging's recipe.

What the emulated nucleus does per deployment, in the real order (reference §4.1, nucleus
DefaultDeploymentTask / Lifecycle / ComponentManager):
1. download and unarchive the new artifacts into packages/artifacts-unarchived/<name>/<version>/,
2. PreComponentUpdateEvent to every subscriber, waiting for DeferComponentUpdate (re-sent after
   recheckAfterMs while it is > 0),
3. (re)install: the model component has no Run/Startup step, so the nucleus keeps it FINISHED; a
   new version goes FINISHED -> NEW -> Install without running Shutdown (Lifecycle:
   handleCurrentStateFinished), and a removed FINISHED component is closed without Shutdown,
4. PostComponentUpdateEvent,
5. stale-version cleanup: keep each component's current and previous version, delete the rest
   (and every version of a removed component).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from gg_nucleus import OP_SUBSCRIBE_TO_COMPONENT_UPDATES, FakeNucleus

from agent.core.package import build_package
from agent.greengrass import COMPONENT_NAME as AGENT
from agent.greengrass.recipe import default_configuration, render
from agent.greengrass.running import STATE_FILE
from agent.packaging.recipe import artifact_name, artifact_stem, model_component_recipe
from agent.serving.grpc._generated import edge_agent_pb2 as pb
from agent.serving.grpc._generated import edge_agent_pb2_grpc as pb_grpc
from agent.tools.modelgen import build_anomalib_v2

ROOT = Path(__file__).resolve().parents[2]
MODEL = "com.example.BottleModel"
TOKEN = "ZXCVBNMASDFGHJKL"
ARCH = {"x86_64": "amd64", "aarch64": "aarch64"}.get(platform.machine(), "amd64")
IMAGE = np.full((64, 64, 3), 128, np.uint8)
WAIT_S = 15.0

pytestmark = pytest.mark.timeout(120)


# --- the emulated nucleus ----------------------------------------------------------------------

SAME = re.compile(r"\{([.\w-]+):([^:}]*)}")
CROSS = re.compile(r"\{([.\w-]+):([.\w-]+):([^:}]*)}")


def _pointer(doc: Any, pointer: str) -> str | None:
    for part in [p for p in pointer.split("/")[1:]]:
        if not isinstance(doc, dict) or part not in doc:
            return None  # the nucleus leaves a missing node's placeholder as it is
        doc = doc[part]
    if isinstance(doc, bool):
        return "true" if doc else "false"
    return json.dumps(doc) if isinstance(doc, (dict, list)) else str(doc)


@dataclass
class Component:
    name: str
    version: str
    recipe: dict[str, Any]
    config: dict[str, Any]
    deps: set[str] = field(default_factory=set)


class GreengrassRoot:
    """The nucleus' directory layout and its lifecycle-step runner (KernelConfigResolver's interpolation)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.components: dict[str, Component] = {}
        self.kept: dict[str, set[str]] = {}  # name -> versions on disk

    def artifacts(self, name: str, version: str) -> Path:
        return self.root / "packages" / "artifacts" / name / version

    def unarchived(self, name: str, version: str) -> Path:
        return self.root / "packages" / "artifacts-unarchived" / name / version

    def work(self, name: str) -> Path:
        path = self.root / "work" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def system(self, c: Component, namespace: str, key: str) -> str | None:
        if namespace == "artifacts" and key == "path":
            return str(self.artifacts(c.name, c.version))
        if namespace == "artifacts" and key == "decompressedPath":
            return str(self.unarchived(c.name, c.version))
        if namespace == "work" and key == "path":
            return str(self.work(c.name))
        if namespace == "kernel" and key == "rootPath":
            return str(self.root)
        if namespace == "configuration":
            return _pointer(c.config, key)
        return None

    def interpolate(self, text: str, c: Component) -> str:
        def cross(m: re.Match[str]) -> str:
            other = self.components.get(m[1])
            if other is None or m[1] not in c.deps:  # only direct dependencies are interpolated
                return m[0]
            value = self.system(other, m[2], m[3])
            return m[0] if value is None else value

        def same(m: re.Match[str]) -> str:
            value = self.system(c, m[1], m[2])
            return m[0] if value is None else value

        return SAME.sub(same, CROSS.sub(cross, text))

    def lifecycle(self, c: Component) -> dict[str, Any]:
        for manifest in c.recipe["Manifests"]:
            if manifest["Platform"]["architecture"] in (ARCH, "*") and manifest["Platform"]["os"] in ("linux", "*"):
                return dict(manifest.get("Lifecycle", {}))
        raise AssertionError(f"{c.name} has no manifest for linux/{ARCH}")

    def step(self, c: Component, step: str) -> tuple[str, dict[str, str]]:
        value = self.lifecycle(c).get(step)
        script = value["Script"] if isinstance(value, dict) else value
        env = value.get("Setenv", {}) if isinstance(value, dict) else {}
        return self.interpolate(script, c), {k: self.interpolate(str(v), c) for k, v in env.items()}

    def run_step(self, c: Component, step: str) -> None:
        if step not in self.lifecycle(c):
            return
        script, env = self.step(c, step)
        done = subprocess.run(["sh", "-c", script], cwd=self.work(c.name), env={**os.environ, **env},
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{c.name} {step} failed: {done.stdout}{done.stderr}"

    def unpack(self, c: Component, archive: Path) -> None:
        """Download + unarchive (ComponentManager.prepareArtifacts)."""
        target = self.artifacts(c.name, c.version)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(archive, target / archive.name)
        with zipfile.ZipFile(archive) as z:
            z.extractall(self.unarchived(c.name, c.version) / artifact_stem(archive.name))
        self.kept.setdefault(c.name, set()).add(c.version)

    def cleanup(self, keep: dict[str, set[str]]) -> None:
        """ComponentManager.cleanupStaleVersions: delete versions not kept (all of a removed component)."""
        for name, versions in list(self.kept.items()):
            for version in sorted(versions - keep.get(name, set())):
                shutil.rmtree(self.artifacts(name, version), ignore_errors=True)
                shutil.rmtree(self.unarchived(name, version), ignore_errors=True)
                versions.discard(version)


class EmulatedNucleus:
    def __init__(self, root: GreengrassRoot, ipc: FakeNucleus) -> None:
        self.root = root
        self.ipc = ipc
        self.previous: dict[str, str] = {}

    def notify_pre(self, deployment: str) -> list[int]:
        rechecks = []
        for _ in range(20):
            defers = self.ipc.send_pre_update(deployment, timeout=5.0)
            assert defers, "the agent did not answer the PreComponentUpdateEvent"
            rechecks.append(defers[-1].recheck_after_ms)
            if defers[-1].recheck_after_ms == 0:
                return rechecks
            time.sleep(defers[-1].recheck_after_ms / 1000)
        raise AssertionError(f"deployment deferred forever: {rechecks}")

    def deploy_model(self, version: str, archive: Path, *, events: bool = True,
                     merge: dict[str, Any] | None = None) -> float:
        """A deployment that installs or updates MODEL (with configurationUpdate.merge); returns when the
        link was published (monotonic)."""
        recipe = model_component_recipe(component_name=MODEL, component_version=version,
                                        artifact_uri=f"s3://bucket/{archive.name}", architecture=ARCH)
        # KernelConfigResolver: running configuration, recipe defaults only for missing keys, then the merge.
        config = {**recipe["ComponentConfiguration"]["DefaultConfiguration"],
                  **(self.ipc.configuration(MODEL) if MODEL in self.root.components else {}), **(merge or {})}
        c = Component(MODEL, version, recipe, config, set(recipe.get("ComponentDependencies", {})))
        self.root.unpack(c, archive)
        deployment = str(uuid.uuid4())
        if events:
            assert self.notify_pre(deployment)[-1] == 0
        previous = self.root.components.get(MODEL)
        self.root.components[MODEL] = c
        self.ipc.set_configuration(config, component_name=MODEL)
        self.root.run_step(c, "install")  # FINISHED -> NEW -> Install: no Shutdown in between
        published = time.monotonic()
        if events:
            self.ipc.send_post_update(deployment)
        if previous is not None:
            self.previous[MODEL] = previous.version
        self.root.cleanup({MODEL: {version, self.previous.get(MODEL, version)}})
        return published

    def remove_model(self) -> None:
        deployment = str(uuid.uuid4())
        assert self.notify_pre(deployment)[-1] == 0
        del self.root.components[MODEL]  # closed while FINISHED: no Shutdown step runs
        self.ipc.send_post_update(deployment)
        self.root.cleanup({})


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_model() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gge2eonnx", dir="/tmp"))
    try:
        yield build_anomalib_v2(path / "model.onnx", image_size=(64, 64))
    finally:
        shutil.rmtree(path, ignore_errors=True)


def model_zip(onnx: Path, out: Path, version: str, threshold: float, *, corrupt: bool = False) -> Path:
    """The model component's artifact: a zip with the model package at its top level."""
    staging = out / f"pkg-{version}"
    build_package(onnx, staging, name=MODEL, threshold=threshold, model_version=version)
    if corrupt:  # the manifest's sha256 no longer matches: the agent's load fails
        (staging / "model.onnx").write_bytes(b"not an onnx model")
    archive = out / artifact_name(MODEL, version)
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(staging.rglob("*")):
            z.write(path, path.relative_to(staging))
    return archive


class AgentProcess:
    """recipe.yaml's Run step, started the way the nucleus' ShellRunner starts it."""

    def __init__(self, gg: GreengrassRoot, ipc: FakeNucleus) -> None:
        template = (ROOT / "recipe.yaml").read_text()
        recipe = yaml.safe_load(render(template, "1.0.0", "s3://bucket/edge_agent-1.0.0-py3-none-any.whl"))
        self.component = Component(AGENT, "1.0.0", recipe, ipc.configuration())
        self.gg = gg
        gg.components[AGENT] = self.component
        work = gg.work(AGENT)
        # The Install step would create this venv; here it runs the checkout under test.
        shim = work / "venv" / "bin" / "edge-agent"
        shim.parent.mkdir(parents=True, exist_ok=True)
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m agent "$@"\n')
        shim.chmod(0o755)
        self.log_path = gg.root / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        script, setenv = self.gg.step(self.component, "run")
        env = {**os.environ, **setenv, "PYTHONPATH": str(ROOT), "SVCUID": TOKEN,
               "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT": str(self.gg.root / "ipc.socket")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(["sh", "-c", script], cwd=self.gg.work(AGENT), env=env, stdout=log,
                                         stderr=subprocess.STDOUT)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)  # how the nucleus stops a Run step
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""


@dataclass
class Env:
    gg: GreengrassRoot
    ipc: FakeNucleus
    nucleus: EmulatedNucleus
    agent: AgentProcess
    socket: str
    out: Path


@pytest.fixture
def env() -> Iterator[Env]:
    root = Path(tempfile.mkdtemp(prefix="gge2e", dir="/tmp"))  # AF_UNIX paths: keep them short
    socket = f"unix://{root}/lfv.sock"
    config = default_configuration()
    config.update(Socket=socket, MetricsPort=-1, WarmupRuns=1, ModelRemovalGraceSeconds=1.0)
    ipc = FakeNucleus(str(root / "ipc.socket"), TOKEN, AGENT, config).start()
    gg = GreengrassRoot(root)
    agent = AgentProcess(gg, ipc)
    out = root / "build"
    out.mkdir()
    try:
        yield Env(gg, ipc, EmulatedNucleus(gg, ipc), agent, socket, out)
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait(10)
        ipc.stop()
        shutil.rmtree(root, ignore_errors=True)


def wait_until(predicate: Any, what: str, env: Env, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}\n--- agent log ---\n{env.agent.log()}")


def start_agent(env: Env) -> pb_grpc.EdgeAgentStub:
    env.agent.start()
    stub = pb_grpc.EdgeAgentStub(grpc.insecure_channel(env.socket))

    def serving() -> bool:
        try:
            stub.ListModels(pb.ListModelsRequest(), timeout=1)
            return True
        except grpc.RpcError:
            return False

    wait_until(serving, "the agent to serve", env)
    env.ipc.wait_for_subscriber(OP_SUBSCRIBE_TO_COMPONENT_UPDATES, count=1, timeout=WAIT_S)
    return stub


def status(stub: pb_grpc.EdgeAgentStub, name: str = MODEL) -> tuple[str, str]:
    try:
        d = stub.DescribeModel(pb.DescribeModelRequest(model_component=name), timeout=2).model_description
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    return pb.ModelStatus.Name(d.status), d.status_message


class Clients:
    """Threads calling DetectAnomalies back to back; records (sent, answered, threshold) and every failure."""

    def __init__(self, socket: str, threads: int = 4) -> None:
        self.results: list[tuple[float, float, float]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(socket,), daemon=True) for _ in range(threads)]

    def _run(self, socket: str) -> None:
        stub = pb_grpc.EdgeAgentStub(grpc.insecure_channel(socket))
        request = pb.DetectAnomaliesRequest(model_component=MODEL, bitmap=pb.Bitmap(
            width=64, height=64, byte_data=IMAGE.tobytes()))
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                result = stub.DetectAnomalies(request, timeout=10).detect_anomaly_result
                with self._lock:
                    self.results.append((sent, time.monotonic(), round(result.anomaly_threshold, 3)))
            except grpc.RpcError as exc:
                with self._lock:
                    self.failures.append(f"{exc.code().name}: {exc.details()}")

    def __enter__(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def thresholds_since(self, t: float) -> list[float]:
        """Results of the calls sent at or after t (calls already holding the old model finish on it)."""
        with self._lock:
            return [th for sent, _, th in self.results if sent >= t]

    def first_time(self, threshold: float) -> float | None:
        """When the first answer with this threshold arrived."""
        with self._lock:
            return min((answered for _, answered, th in self.results if th == threshold), default=None)


# --- the test ----------------------------------------------------------------------------------


def test_model_component_lifecycle(env: Env, onnx_model: Path) -> None:
    stub = start_agent(env)
    models_dir = env.gg.work(AGENT) / "models"

    # 1. First deployment: the model component's configuration says Autostart, so it RUNs by itself.
    env.nucleus.deploy_model("1.0.0", model_zip(onnx_model, env.out, "1.0.0", 0.5), merge={"Autostart": True})
    assert (models_dir / MODEL).is_symlink()
    wait_until(lambda: status(stub)[0] == "RUNNING", "version 1.0.0 RUNNING", env)

    with Clients(env.socket) as clients:
        wait_until(lambda: clients.thresholds_since(0), "first results", env)

        # 2. New version while clients call continuously: zero failures, new outputs after the swap.
        flipped = env.nucleus.deploy_model("1.1.0", model_zip(onnx_model, env.out, "1.1.0", 0.3))
        swapped = wait_until(lambda: clients.first_time(0.3), "version 1.1.0 outputs", env)
        time.sleep(0.3)
        after = clients.thresholds_since(swapped)
        assert set(after) == {0.3}, f"old outputs after the swap: {sorted(set(after))}"
        swap_s = swapped - flipped
        during_swap = len([a for _, a, _ in clients.results if flipped <= a <= swapped])

        # 3. A new version that fails to load: the old one keeps serving, the status says why.
        env.nucleus.deploy_model("1.2.0", model_zip(onnx_model, env.out, "1.2.0", 0.2, corrupt=True))
        wait_until(lambda: "failed" in status(stub)[1], "the failed update in status_message", env)
        failed_at = time.monotonic()
        time.sleep(0.3)
        assert status(stub)[0] == "RUNNING"
        assert set(clients.thresholds_since(failed_at)) == {0.3}

        # 4. A fixed version deployed locally (no component-update events): noticed by polling.
        flipped_local = env.nucleus.deploy_model("1.3.0", model_zip(onnx_model, env.out, "1.3.0", 0.4),
                                                  events=False)
        local = wait_until(lambda: clients.first_time(0.4), "version 1.3.0 without events", env) - flipped_local
        assert local < 2.0, f"a change without events took {local:.2f}s to serve"
    assert clients.failures == [], clients.failures[:5]
    total = len(clients.results)
    print(f"\nswap: {total} DetectAnomalies calls ({during_swap} between the link change and the first new "
          f"result), {len(clients.failures)} failed; link change -> new version serving {swap_s * 1000:.0f} ms "
          f"(with events), {local * 1000:.0f} ms (polling only)")

    # 5. Restart (crash, nucleus restart): the model runs again with no StartModel call.
    env.ipc.set_configuration({"Autostart": False}, component_name=MODEL)  # only persistence can restart it
    assert env.agent.stop() == 0
    state = json.loads((env.gg.work(AGENT) / STATE_FILE).read_text())
    assert state == {"running": [MODEL]}
    stub = start_agent(env)
    wait_until(lambda: status(stub)[0] == "RUNNING", "the model RUNNING again after the restart", env)
    result = stub.DetectAnomalies(pb.DetectAnomaliesRequest(model_component=MODEL, bitmap=pb.Bitmap(
        width=64, height=64, byte_data=IMAGE.tobytes())), timeout=10).detect_anomaly_result
    assert round(result.anomaly_threshold, 3) == 0.4

    # 6. Removal from the deployment: the link dangles once the nucleus deletes the artifacts, and the
    #    model leaves ListModels after the grace period (1 s here); the dangling link is cleaned up.
    env.nucleus.remove_model()
    wait_until(lambda: not stub.ListModels(pb.ListModelsRequest(), timeout=2).models, "the model removed", env)
    assert not os.path.lexists(models_dir / MODEL)
    state = json.loads((env.gg.work(AGENT) / STATE_FILE).read_text())
    assert state == {"running": []}
    assert env.agent.stop() == 0


def test_stop_model_is_remembered_across_restarts(env: Env, onnx_model: Path) -> None:
    stub = start_agent(env)
    env.nucleus.deploy_model("1.0.0", model_zip(onnx_model, env.out, "1.0.0", 0.5))
    wait_until(lambda: status(stub)[0] == "STOPPED", "the new model STOPPED (no Autostart)", env)
    stub.StartModel(pb.StartModelRequest(model_component=MODEL), timeout=5)
    wait_until(lambda: status(stub)[0] == "RUNNING", "RUNNING after StartModel", env)
    stub.StopModel(pb.StopModelRequest(model_component=MODEL), timeout=10)
    assert env.agent.stop() == 0
    stub = start_agent(env)
    wait_until(lambda: status(stub)[0] == "STOPPED", "still STOPPED after the restart", env)
    time.sleep(0.5)
    assert status(stub)[0] == "STOPPED"
    assert env.agent.stop() == 0


def test_a_forgotten_identity_makes_the_agent_exit_for_a_fresh_one(env: Env) -> None:
    """Nucleus lite after its IPC daemon restarted: the old SVCUID is refused (socket closed during the
    connect), and here the componentName connect too (this process is in no lite unit). The agent keeps
    serving meanwhile, then exits 75 so the nucleus restarts it with a fresh identity; a nucleus that is merely
    down does not count."""
    stub = start_agent(env)
    env.ipc.stop()  # down: connection refused, for longer than five refusals would take
    time.sleep(4.0)
    assert env.agent.proc is not None and env.agent.proc.poll() is None, env.agent.log()
    stub.ListModels(pb.ListModelsRequest(), timeout=2)  # the gRPC service never depended on the nucleus
    restarted = FakeNucleus(env.ipc.socket_path, "A-NEW-SVCUID-123", AGENT, env.ipc.configuration())
    restarted.refuse_by_closing = True
    with restarted:
        started = time.monotonic()
        status_code = env.agent.proc.wait(30)
        took = time.monotonic() - started
    log = env.agent.log()
    assert status_code == 75, log
    attempts = restarted.connect_attempts
    assert [a.auth_token is not None for a in attempts][:4] == [True, False, True, False]  # token, then by name
    assert not any(a.accepted for a in attempts)
    assert "refused this component's identity 5 times" in log
    print(f"\nidentity refused: the agent exited 75 after {took:.1f} s ({len(attempts)} connects)")
