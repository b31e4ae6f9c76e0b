"""The component on a real nucleus: AWS IoT Greengrass nucleus lite 2.6.0, built from ../shared/greengrass-lite.

What it does, in order (docs/greengrass.md §4):
1. builds lite once into a cache dir with a fixed absolute path (its PREFIX is compiled into the binaries), under
   a file lock (runs of this test share that runtime and take turns);
2. builds the component with `scripts/build-component --offline` for this machine and the device's Python (the
   downloaded wheels are cached by their requirements) and deploys it exactly as rendered with `ggl-cli deploy`;
3. runs its install phase in a network namespace with no network (`unshare -n`), empty home, no pip config:
   everything comes from the wheelhouse artifact;
4. runs it (also without network), changes its configuration live over lite's IPC (an invalid value is
   ignored with a log line, a valid one is applied), deploys a model component made by the project's own
   packaging job (local mode), installs it offline (lite leaves its zip packed: the install step unpacks it)
   and gets DetectAnomalies answers;
5. restarts lite's IPC daemon (every SVCUID forgotten): the agent reconnects by component name in place and a
   further configuration change still arrives.

Skipped, with the reason, without the kit, without root or without a cgroup hierarchy lite can use. The kit's
limits (no systemd: units are generated but phases are run by hand, no cloud) are in its README.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from packaging_helpers import wait_until

from agent import __version__
from agent.client import detect
from agent.greengrass import COMPONENT_NAME as AGENT
from agent.serving.grpc._generated import edge_agent_pb2 as pb
from agent.serving.grpc._generated import edge_agent_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]


def find_kit() -> Path:
    """../shared/greengrass-lite beside the repository, or beside the main checkout of a git worktree;
    EDGE_AGENT_GGLITE_KIT overrides."""
    if os.environ.get("EDGE_AGENT_GGLITE_KIT"):
        return Path(os.environ["EDGE_AGENT_GGLITE_KIT"])
    candidates = [ROOT.parent / "shared" / "greengrass-lite"]
    dot_git = ROOT / ".git"
    if dot_git.is_file():  # a worktree: "gitdir: <main>/.git/worktrees/<name>"
        gitdir = Path(dot_git.read_text().partition("gitdir:")[2].strip())
        if gitdir.parent.name == "worktrees":
            candidates.append(gitdir.parent.parent.parent.parent / "shared" / "greengrass-lite")
    return next((c for c in candidates if (c / "build.sh").is_file()), candidates[0])


KIT = find_kit()
MODEL = "com.example.LiteModel"
#: The PATH systemd gives a unit (and the kit's run-component.sh): the device's `python3` is the one on it.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLIENT = Path(__file__).with_name("lite_ipc_client.py")
LPS = {"x86_64": "X86_64", "aarch64": "ARM64"}

pytestmark = pytest.mark.timeout(420)


def cgroup_root() -> Path | None:
    """The hierarchy libsystemd reads (the kit's lib.sh: gglite_cgroup_root)."""
    def fstype(path: str) -> str:
        done = subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True)
        return done.stdout.strip()

    if fstype("/sys/fs/cgroup") == "cgroup2fs":
        return Path("/sys/fs/cgroup")
    if fstype("/sys/fs/cgroup/unified") == "cgroup2fs":
        return Path("/sys/fs/cgroup/unified")
    if " /sys/fs/cgroup/systemd cgroup " in Path("/proc/mounts").read_text():
        return Path("/sys/fs/cgroup/systemd")
    return None


def why_not() -> str:
    if not (KIT / "build.sh").is_file():
        return f"nucleus lite kit not found at {KIT} (../shared/greengrass-lite beside the repository)"
    if os.geteuid() != 0:
        return "nucleus lite places components in cgroups: the test needs root"
    if cgroup_root() is None:
        return "no cgroup hierarchy nucleus lite can use (cgroup v2, a v2 'unified' mount or v1 name=systemd)"
    if shutil.which("unshare") is None:
        return "no unshare(1) to run the install phase without network"
    return ""


def cache_base() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-agent"


def kit_key() -> str:
    """The build's identity: the sources and the kit's scripts (a change to either builds a new PREFIX)."""
    digest = hashlib.sha256()
    for path in sorted(KIT.iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:12]


def lite_prefix(key: str) -> Path:
    # The PREFIX is compiled into lite's binaries: a fixed absolute path, at most 64 characters.
    prefix = cache_base() / f"gglite-{key}"
    return prefix if len(str(prefix)) <= 64 else Path("/var/tmp/edge-agent") / f"gglite-{key}"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


class Steps:
    """Runs commands with a bounded time, logs their output, times each step."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.times: dict[str, float] = {}

    def run(self, what: str, argv: list[str], *, timeout: float, env: dict[str, str] | None = None,
            ok: bool = True) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        self.times[what] = self.times.get(what, 0.0) + time.monotonic() - started
        with self.log.open("a") as fh:
            fh.write(f"=== {what}: {' '.join(argv)} -> {done.returncode}\n{done.stdout}{done.stderr}\n")
        if ok:
            output = done.stdout[-3000:] + done.stderr[-3000:]
            assert done.returncode == 0, f"{what} failed ({done.returncode}):\n{output}"
        return done

    def mark(self, what: str, started: float) -> None:
        self.times[what] = time.monotonic() - started


def device_python() -> str:
    done = subprocess.run(["env", "-i", f"PATH={SYSTEM_PATH}", "python3", "-c",
                           "import sys, venv, ensurepip; print('%d.%d' % sys.version_info[:2])"],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"the device's python3 (on {SYSTEM_PATH}) cannot make a venv with pip: {done.stderr.strip()}")
    return done.stdout.strip()


def test_agent_and_model_component_on_nucleus_lite(tmp_path: Path) -> None:
    reason = why_not()
    if reason:
        pytest.skip(reason)
    started_all = time.monotonic()
    key = kit_key()
    prefix = lite_prefix(key)
    steps = Steps(tmp_path / "steps.log")
    with locked(prefix.with_name(prefix.name + ".lock")):
        steps.run("build lite", [str(KIT / "build.sh"), str(prefix)], timeout=600)
        passed = False
        try:
            _exercise(prefix, steps, tmp_path)
            passed = True
        finally:
            subprocess.run([str(KIT / "stop-nucleus.sh"), str(prefix)], capture_output=True, timeout=60)
            if passed:  # the deployed component store and venv (~0.5 GB) are not worth caching; logs stay
                shutil.rmtree(prefix / "rt" / "root", ignore_errors=True)
    total = time.monotonic() - started_all
    print(f"\nnucleus lite test: {total:.1f} s in all; " + ", ".join(f"{k} {v:.1f} s" for k, v in steps.times.items()))


def _exercise(prefix: Path, steps: Steps, tmp: Path) -> None:
    machine = platform.machine()
    python = device_python()
    build = tmp / "build"
    # 2. The component exactly as scripts/build-component renders it, with the offline wheelhouse.
    steps.run("build-component --offline", [sys.executable, str(ROOT / "scripts" / "build-component"),
                                            "--out", str(build), "--offline", "--arch", machine, "--python", python,
                                            "--cache", str(cache_base() / "wheelhouse"), "--bucket", "edge-test"],
              timeout=600)
    sock_dir = Path(tempfile.mkdtemp(prefix="ea-lite-", dir="/tmp"))  # AF_UNIX paths: short
    socket = f"unix://{sock_dir}/lfv.sock"
    agent_log = tmp / "agent.log"
    config_d = prefix / "rt" / "etc" / "config.d"
    config_d.mkdir(parents=True, exist_ok=True)
    # Device-side configuration (wins over the recipe's defaults, as on a real device).
    (config_d / "edge-agent-test.yaml").write_text(json.dumps({"services": {AGENT: {"configuration": {
        "Socket": socket, "MetricsPort": "-1", "WarmupRuns": "1"}}}}))
    steps.run("start lite", [str(KIT / "start-nucleus.sh"), str(prefix)], timeout=120,
              env={**os.environ, "FRESH": "1"})
    steps.run("deploy agent", [str(KIT / "deploy.sh"), str(prefix), str(build / "recipes"), str(build / "artifacts"),
                               f"{AGENT}={__version__}"], timeout=300)

    # 3. Install with no network at all: a clean device (empty home, no pip configuration).
    home = tmp / "home"
    home.mkdir()
    offline = {**os.environ, "GGLITE_PASSENV": "HOME PIP_CONFIG_FILE", "HOME": str(home),
               "PIP_CONFIG_FILE": "/dev/null"}
    done = steps.run("install agent offline", ["unshare", "-n", str(KIT / "run-component.sh"), str(prefix), AGENT,
                                               __version__, "install"], timeout=600, env=offline)
    assert "offline, from" in done.stdout, done.stdout[-2000:]
    venv = prefix / "rt" / "root" / "work" / AGENT / "venv"
    assert (venv / "bin" / "edge-agent").is_file()
    # Install runs again on every start of the nucleus: unchanged, it is skipped.
    again = steps.run("install agent again", ["unshare", "-n", str(KIT / "run-component.sh"), str(prefix), AGENT,
                                              __version__, "install"], timeout=120, env=offline)
    assert "edge-agent already installed" in again.stdout, again.stdout[-2000:]

    # 4. Run it, with no network either (only loopback; lite's IPC and the agent's sockets are Unix sockets);
    #    configuration comes over lite's IPC.
    run = [str(KIT / "run-component.sh"), str(prefix), AGENT, __version__, "run"]
    if shutil.which("ip"):
        run = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *run]
    started = time.monotonic()
    with agent_log.open("ab") as out:
        agent = subprocess.Popen(run, stdout=out, stderr=subprocess.STDOUT)
    try:
        stub = pb_grpc.EdgeAgentStub(grpc.insecure_channel(socket))

        def serving() -> bool:
            assert agent.poll() is None, f"the agent exited {agent.returncode}:\n{agent_log.read_text()[-4000:]}"
            try:
                stub.ListModels(pb.ListModelsRequest(), timeout=1)
                return True
            except grpc.RpcError:
                return False

        wait_until(serving, 60, "the agent serving on its configured socket", log=agent_log)
        steps.mark("agent up", started)
        _drive(prefix, steps, tmp, stub, agent, agent_log)
    finally:
        if agent.poll() is None:
            agent.terminate()
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait(10)
        shutil.rmtree(sock_dir, ignore_errors=True)


def _drive(prefix: Path, steps: Steps, tmp: Path, stub: pb_grpc.EdgeAgentStub, agent: subprocess.Popen[bytes],
           agent_log: Path) -> None:
    from agent.packaging import Client, PackagingSettings
    from agent.tools.modelgen import build_anomalib_v2

    log = agent_log.read_text
    cgroup = cgroup_root()
    assert cgroup is not None
    slice_name = f"gglite-{hashlib.sha1(str(prefix).encode()).hexdigest()[:8]}.slice"
    unit_cgroup = cgroup / slice_name / f"ggl.{AGENT}.service"
    ipc_socket = str(prefix / "rt" / "root" / "gg-ipc.socket")

    def ipc(command: str, arg: str) -> str:
        done = steps.run(f"IPC {command}", [sys.executable, str(CLIENT), str(unit_cgroup), ipc_socket, AGENT, command,
                                            arg], timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
        return done.stdout

    # Live configuration over lite's IPC. Lite has no validation: an invalid value reaches the agent, which
    # keeps its last good configuration and says so; a valid change is applied without a restart.
    assert "Greengrass IPC: no configuration validation" in log()  # lite answers ServiceError: polling instead
    ipc("update", json.dumps({"MaxConcurrentInferences": 0}))
    wait_until(lambda: "ignoring invalid configuration from the nucleus" in log(), 15, "the invalid value ignored",
               log=agent_log)
    started = time.monotonic()
    ipc("update", json.dumps({"MaxConcurrentInferences": 2, "MaxQueuedRequests": 7}))
    wait_until(lambda: "MaxQueuedRequests=7" in log(), 15, "MaxQueuedRequests=7 applied live", log=agent_log)
    steps.mark("live configuration change", started)

    # A model component made by the project's own packaging job (local mode), deployed and installed offline.
    started = time.monotonic()
    home = tmp / "packaging"
    client = Client(settings=PackagingSettings(home=home, mode="local"), executor="inline", env={})
    client.create_project(ProjectName="lite")
    onnx_path = build_anomalib_v2(tmp / "export" / "model.onnx", image_size=(64, 64))
    client.create_model(ProjectName="lite", ModelFile=onnx_path)
    client.start_model_packaging_job(ProjectName="lite", ModelVersion="1", JobName="to-lite", Configuration={
        "Greengrass": {"TargetPlatform": {"Os": "LINUX", "Arch": LPS.get(platform.machine(), "X86_64")},
                       "S3OutputLocation": {"Bucket": "models", "Prefix": "lite"},
                       "ComponentName": MODEL, "ComponentVersion": "1.0.0"}})
    desc = client.wait_for_job("lite", "to-lite", timeout=120)["ModelPackagingDescription"]
    assert desc["Status"] == "SUCCEEDED", desc
    steps.mark("packaging job", started)
    steps.run("deploy model", [str(KIT / "deploy.sh"), str(prefix), str(home / "greengrass" / "recipes"),
                               str(home / "greengrass" / "artifacts"), f"{MODEL}=1.0.0"], timeout=300)
    steps.run("install model offline", ["unshare", "-n", str(KIT / "run-component.sh"), str(prefix), MODEL, "1.0.0",
                                        "install"], timeout=120)
    link = prefix / "rt" / "root" / "work" / AGENT / "models" / MODEL
    assert link.is_symlink() and (link / "manifest.json").is_file()

    def listed() -> bool:
        return any(m.model_component == MODEL for m in stub.ListModels(pb.ListModelsRequest(), timeout=5).models)

    wait_until(listed, 30, f"{MODEL} discovered", log=agent_log)
    stub.StartModel(pb.StartModelRequest(model_component=MODEL), timeout=30)

    def running() -> bool:
        d = stub.DescribeModel(pb.DescribeModelRequest(model_component=MODEL), timeout=5).model_description
        assert d.status != pb.FAILED, d.status_message
        return d.status == pb.RUNNING

    wait_until(running, 60, f"{MODEL} RUNNING", log=agent_log)
    grey = np.full((64, 64, 3), 128, np.uint8)
    result, _ = detect(stub, MODEL, grey, use_shm=False)
    assert not result.is_anomalous
    defect = grey.copy()
    defect[20:36, 20:36] = (255, 0, 0)
    result, _ = detect(stub, MODEL, defect, use_shm=False)
    assert result.is_anomalous and result.anomaly_score > result.anomaly_threshold

    # 5. lite's IPC daemon restarts and forgets every SVCUID: the agent (inside its unit's cgroup) reconnects by
    #    component name, without a restart, and keeps following its configuration.
    started = time.monotonic()
    steps.run("restart ggipcd", [str(KIT / "stop-nucleus.sh"), str(prefix), "ggipcd"], timeout=60)
    steps.run("restart ggipcd", [str(KIT / "start-nucleus.sh"), str(prefix)], timeout=60)
    wait_until(lambda: "connected as component" in log(), 30, "the agent reconnected by component name", log=agent_log)
    ipc("update", json.dumps({"MaxQueuedRequests": 9}))
    wait_until(lambda: "MaxQueuedRequests=9" in log(), 15, "MaxQueuedRequests=9 after the ggipcd restart",
               log=agent_log)
    steps.mark("recovery after the ggipcd restart", started)
    assert agent.poll() is None, "the agent restarted (it should have recovered in place)"
    result, _ = detect(stub, MODEL, grey, use_shm=False)  # served throughout
    assert not result.is_anomalous
