"""Standalone discovery: packages added, removed, replaced, copied, duplicated and unreadable while the agent
runs (real agent, real files, real gRPC socket)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time

import grpc
import pytest
from conftest import detect, grey_with_square, start, wait_known, wait_status
from runtimes import ControlledRuntime


def wait_until(predicate, timeout: float = 5.0) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "condition not met in time"
        time.sleep(0.02)
    return time.monotonic() - t0


def scans(agent, count: int) -> None:
    """Let the poll thread run `count` more scans."""
    watcher = agent._watcher
    target = watcher.scans + count
    wait_until(lambda: watcher.scans >= target, timeout=count * 2.0)


def messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


class Clients:
    """Client threads calling DetectAnomalies in a loop, recording thresholds and failures."""

    def __init__(self, stub, pb, name: str, threads: int = 2) -> None:
        self.thresholds: list[float] = []
        self.failures: list[grpc.RpcError] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(stub, pb, name)) for _ in range(threads)]

    def _run(self, stub, pb, name) -> None:
        image = grey_with_square()
        while not self._stop.is_set():
            try:
                self.thresholds.append(detect(stub, pb, name, image).anomaly_threshold)
            except grpc.RpcError as exc:  # any failure is a defect here
                self.failures.append(exc)

    def __enter__(self) -> Clients:
        for t in self._threads:
            t.start()
        wait_until(lambda: len(self.thresholds) > 10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


def test_added_and_removed_packages(make_package, models_dir, agent_factory, pb, pb_modules):
    agent = agent_factory(removal_grace_s=0)
    make_package("anomalib", "first")
    wait_known(agent, "first")
    make_package("classification", "second")
    seconds = wait_until(lambda: "second" in agent.registry.names(), timeout=2.0)
    assert seconds < 2.0
    with grpc.insecure_channel(agent.config.socket) as ch:
        stub = pb_modules[1].EdgeAgentStub(ch)
        start(stub, pb, "first")
        shutil.rmtree(models_dir / "first")
        wait_until(lambda: "first" not in agent.registry.names(), timeout=2.0)
        names = [m.model_component for m in stub.ListModels(pb.ListModelsRequest()).models]
        assert names == ["second"]
        with pytest.raises(grpc.RpcError) as info:
            detect(stub, pb, "first", grey_with_square())
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_deleted_package_is_removed_after_the_grace(make_package, models_dir, agent_factory):
    agent = agent_factory(removal_grace_s=0.6)
    make_package("anomalib", "first")
    wait_known(agent, "first")
    shutil.rmtree(models_dir / "first")
    gone = wait_until(lambda: "first" not in agent.registry.names(), timeout=5.0)
    assert gone >= 0.5


def test_half_copied_package_is_ignored_until_complete(models_dir, make_package, agent, short_tmp):
    (models_dir / "partial").mkdir()
    (models_dir / "partial" / "manifest.json").write_text('{"name": "partial", ')  # still being written
    make_package("anomalib", "ok")
    wait_known(agent, "ok")
    scans(agent, 2)
    assert agent.registry.names() == {"ok"}


def test_replaced_package_of_running_model_swaps_without_failures(make_package, models_dir, agent, stub, pb,
                                                                  short_tmp):
    make_package("anomalib", "widget", model_version="1", threshold=0.5)
    wait_known(agent, "widget")
    start(stub, pb, "widget")
    with Clients(stub, pb, "widget", threads=3) as clients:
        # Replace the package the way a deployment tool would: build beside, then rename over.
        staged = make_package("anomalib", "widget", directory=short_tmp / "staged", model_version="2",
                              threshold=0.7, arn="arn:aws:lookoutvision:us-east-1:123456789012:model/test/v2")
        old = models_dir / "widget.old"
        os.rename(models_dir / "widget", old)
        os.rename(staged.root, models_dir / "widget")
        shutil.rmtree(old)
        # The new version loads and warms up beside the old one: seconds on a busy 2-core machine.
        wait_until(lambda: clients.thresholds[-1] == pytest.approx(0.7), timeout=20.0)
        count = len(clients.thresholds)
        wait_until(lambda: len(clients.thresholds) > count + 20)
    assert clients.failures == []
    thresholds = clients.thresholds
    switched = thresholds.index(next(t for t in thresholds if t == pytest.approx(0.7)))
    assert all(t == pytest.approx(0.7) for t in thresholds[switched + 3:])  # in-flight old ones finish first
    desc = wait_status(stub, pb, "widget", pb.RUNNING)
    assert desc.lookout_vision_model_arn.endswith("/v2")


def test_rm_rf_then_slow_copy_keeps_the_running_model(make_package, models_dir, agent_factory, pb, pb_modules,
                                                      short_tmp):
    """`rm -rf models/m; cp -r new models/m` with a copy slower than several scans: no failed call, the model
    never leaves RUNNING, and the new version is served once the copy is complete."""
    agent = agent_factory(removal_grace_s=10)
    make_package("anomalib", "widget", model_version="1", threshold=0.5)
    wait_known(agent, "widget")
    new = make_package("anomalib", "widget", directory=short_tmp / "new", model_version="2", threshold=0.7)
    with grpc.insecure_channel(agent.config.socket) as ch:
        stub = pb_modules[1].EdgeAgentStub(ch)
        start(stub, pb, "widget")
        statuses: list[int] = []
        with Clients(stub, pb, "widget") as clients:
            shutil.rmtree(models_dir / "widget")
            scans(agent, 3)
            target = models_dir / "widget"
            target.mkdir()
            scans(agent, 2)
            shutil.copy2(new.root / "manifest.json", target)  # cp -r's order is the directory's order
            for item in sorted(new.root.iterdir()):
                if item.name == "manifest.json":
                    continue
                data = item.read_bytes()
                with open(target / item.name, "wb") as out:  # half the file, a pause, the rest
                    out.write(data[: len(data) // 2])
                    out.flush()
                    scans(agent, 2)
                    statuses.append(stub.DescribeModel(pb.DescribeModelRequest(model_component="widget")
                                                       ).model_description.status)
                    out.write(data[len(data) // 2:])
            wait_until(lambda: clients.thresholds[-1] == pytest.approx(0.7), timeout=10.0)
        assert clients.failures == []
        assert set(statuses) == {pb.RUNNING}
        desc = stub.DescribeModel(pb.DescribeModelRequest(model_component="widget")).model_description
        assert desc.status == pb.RUNNING and "failed" not in desc.status_message


def test_failed_new_version_keeps_the_old_one_and_is_not_retried(make_package, models_dir, agent, stub, pb,
                                                                 short_tmp, caplog):
    caplog.set_level(logging.INFO)
    make_package("anomalib", "widget", model_version="1")
    wait_known(agent, "widget")
    start(stub, pb, "widget")
    staged = make_package("anomalib", "widget", directory=short_tmp / "staged", model_version="2")
    (staged.root / "model.onnx.data").write_bytes(b"corrupt")
    os.rename(models_dir / "widget", short_tmp / "old")
    os.rename(staged.root, models_dir / "widget")
    wait_until(lambda: "failed" in agent.registry.describe("widget").status_message)
    desc = stub.DescribeModel(pb.DescribeModelRequest(model_component="widget")).model_description
    assert desc.status == pb.RUNNING
    assert "still serving the previous version" in desc.status_message
    assert detect(stub, pb, "widget", grey_with_square()).is_anomalous
    scans(agent, 5)
    assert len(messages(caplog, "update of widget to version 2 failed")) == 1  # not an ERROR every scan


def test_backup_copy_never_replaces_the_served_model(make_package, models_dir, agent, stub, pb, short_tmp, caplog):
    caplog.set_level(logging.INFO)
    make_package("anomalib", "redness", model_version="2", threshold=0.7)
    wait_known(agent, "redness")
    start(stub, pb, "redness")
    # A backup of an older version beside it; "redness-backup" sorts after "redness", "a-backup" before it.
    for backup in ("redness-backup", "a-backup"):
        make_package("anomalib", "redness", directory=models_dir / backup, model_version="1", threshold=0.3)
    wait_until(lambda: "a-backup" in agent.registry.describe("redness").status_message)
    scans(agent, 3)
    with Clients(stub, pb, "redness") as clients:
        scans(agent, 2)
    assert clients.failures == [] and {round(t, 3) for t in clients.thresholds} == {0.7}
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert [(m.model_component, m.status) for m in models] == [("redness", pb.RUNNING)]
    message = models[0].status_message
    assert "package conflict" in message and "redness-backup (version 1)" in message and "a-backup" in message
    assert len(messages(caplog, "redness-backup (version 1) also names model 'redness'")) == 1  # once, not per scan
    assert agent._watcher.conflicts()["redness"][0].owner == models_dir / "redness"

    # The served package updated in place still swaps; the backups still don't.
    staged = make_package("anomalib", "redness", directory=short_tmp / "v3", model_version="3", threshold=0.6)
    os.rename(models_dir / "redness", short_tmp / "v2")
    os.rename(staged.root, models_dir / "redness")
    wait_until(lambda: detect(stub, pb, "redness", grey_with_square()).anomaly_threshold == pytest.approx(0.6))

    shutil.rmtree(models_dir / "redness-backup")
    shutil.rmtree(models_dir / "a-backup")
    wait_until(lambda: "conflict" not in agent.registry.describe("redness").status_message)
    assert messages(caplog, "package name conflict resolved")


def test_an_unreadable_update_is_shown_while_the_old_version_serves(make_package, models_dir, agent, stub, pb):
    make_package("anomalib", "widget", model_version="1")
    wait_known(agent, "widget")
    start(stub, pb, "widget")
    manifest = models_dir / "widget" / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good[: len(good) // 2])  # an editor or a copy that broke off
    wait_until(lambda: "not valid JSON" in agent.registry.describe("widget").status_message)
    desc = stub.DescribeModel(pb.DescribeModelRequest(model_component="widget")).model_description
    assert desc.status == pb.RUNNING and "still serving the last package that could be read" in desc.status_message
    assert detect(stub, pb, "widget", grey_with_square()).is_anomalous
    manifest.write_text(good)
    wait_until(lambda: agent.registry.describe("widget").status_message == "running on CPUExecutionProvider")


def test_at_start_up_the_directory_named_like_the_model_wins(make_package, models_dir, agent_factory):
    make_package("anomalib", "redness", directory=models_dir / "a-old-copy", model_version="1")
    make_package("anomalib", "redness", model_version="2")
    agent = agent_factory()
    wait_known(agent, "redness")
    assert agent.registry.describe("redness").version == "2"
    assert "a-old-copy" in agent.registry.describe("redness").status_message


def test_broken_packages_are_logged_once_per_problem(make_package, models_dir, agent, caplog):
    caplog.set_level(logging.INFO)
    (models_dir / "broken").mkdir()
    (models_dir / "broken" / "manifest.json").write_text('{"name": "broken", "runtime_artifact": "nope.onnx"}')
    (models_dir / "empty-folder").mkdir()
    (models_dir / "notes.txt").write_text("not a package")
    make_package("anomalib", "ok")
    wait_known(agent, "ok")
    scans(agent, 5)
    assert len(messages(caplog, "model package broken")) == 1
    assert len(messages(caplog, "empty-folder has no manifest.json")) == 1
    assert len(messages(caplog, "notes.txt is not a directory")) == 1
    # A problem that goes away and comes back is logged again.
    shutil.rmtree(models_dir / "broken")
    scans(agent, 2)
    (models_dir / "broken").mkdir()
    (models_dir / "broken" / "manifest.json").write_text('{"name": "broken", "runtime_artifact": "nope.onnx"}')
    scans(agent, 3)
    assert len(messages(caplog, "model package broken")) == 2


def test_unreadable_entries_never_stop_discovery(make_package, models_dir, agent_factory, caplog):
    """A symlink loop (ELOOP) and a link to an over-long name (ENAMETOOLONG) raise OSError/RuntimeError from
    pathlib: at start-up and while running, the rest of the directory is still served and watched."""
    caplog.set_level(logging.INFO)
    (models_dir / "loop").symlink_to(models_dir / "loop")
    (models_dir / "too-long").symlink_to("/tmp/" + "x" * 300)
    make_package("anomalib", "first")
    agent = agent_factory()
    wait_known(agent, "first")
    (models_dir / "loop2").symlink_to(models_dir / "loop2")  # appears while running
    make_package("anomalib", "second")
    wait_known(agent, "second")
    scans(agent, 3)
    assert agent.registry.names() == {"first", "second"}
    for name in ("loop", "loop2", "too-long"):
        assert len(messages(caplog, f"model package {name} ")) == 1, name
    assert not messages(caplog, "scan failed")


def test_half_copied_package_that_failed_starts_once_complete(make_package, models_dir, short_tmp, agent_factory,
                                                              pb, pb_modules):
    """Seen with its data file half-written and asked to run (autostart): FAILED; once the copy completes it
    starts again by itself, with no StartModel call."""
    agent = agent_factory()
    full = make_package("anomalib", "late", directory=short_tmp / "full", autostart=True)
    target = models_dir / "late"
    shutil.copytree(full.root, target)
    data = (full.root / "model.onnx.data").read_bytes()
    (target / "model.onnx.data").write_bytes(data[: len(data) // 3])  # the copy stalls here
    wait_known(agent, "late")
    with grpc.insecure_channel(agent.config.socket) as ch:
        stub = pb_modules[1].EdgeAgentStub(ch)
        desc = wait_status(stub, pb, "late", pb.FAILED)
        assert desc.status == pb.FAILED, desc.status_message
        (target / "model.onnx.data").write_bytes(data)
        desc = wait_status(stub, pb, "late", pb.RUNNING)
        assert desc.status == pb.RUNNING, desc.status_message


def test_a_drain_never_holds_up_scans(make_package, models_dir, agent_factory, pb, pb_modules):
    """Removing a RUNNING model waits for its in-flight request (up to StopTimeoutSeconds); meanwhile new
    packages are still discovered and a rescan returns at once (issue #10)."""
    runtime = ControlledRuntime()
    agent = agent_factory(runtime=runtime, removal_grace_s=0, stop_timeout_s=20)
    make_package("anomalib", "busy")
    wait_known(agent, "busy")
    with grpc.insecure_channel(agent.config.socket) as ch:
        stub = pb_modules[1].EdgeAgentStub(ch)
        start(stub, pb, "busy")
        runtime.predict_gate = threading.Event()
        caller = threading.Thread(target=lambda: detect(stub, pb, "busy", grey_with_square()))
        caller.start()
        wait_until(lambda: runtime.active == 1)
        try:
            shutil.rmtree(models_dir / "busy")
            wait_until(lambda: agent.registry.describe("busy").status.name == "STOPPING")
            make_package("anomalib", "newcomer")
            assert wait_until(lambda: "newcomer" in agent.registry.names(), timeout=3.0) < 3.0
            t0 = time.monotonic()
            agent.rescan_models(flush_missing=True)
            assert time.monotonic() - t0 < 1.0
            assert "busy" in agent.registry.names()  # still draining
        finally:
            runtime.predict_gate.set()
            caller.join(10)
        wait_until(lambda: "busy" not in agent.registry.names())


def test_autostart_from_package_and_config(make_package, agent_factory, pb, pb_modules):
    agent = agent_factory(autostart="listed")
    make_package("anomalib", "auto-pkg", autostart=True)
    make_package("anomalib", "listed")
    make_package("anomalib", "manual")
    wait_known(agent, "auto-pkg", "listed", "manual")
    with grpc.insecure_channel(agent.config.socket) as ch:
        stub = pb_modules[1].EdgeAgentStub(ch)
        assert wait_status(stub, pb, "auto-pkg", pb.RUNNING).status == pb.RUNNING
        assert wait_status(stub, pb, "listed", pb.RUNNING).status == pb.RUNNING
        assert stub.DescribeModel(pb.DescribeModelRequest(model_component="manual")).model_description.status == \
            pb.STOPPED


def test_manifest_name_not_directory_names_the_model(make_package, models_dir, agent):
    make_package("anomalib", "from-manifest", directory=models_dir / "some-directory")
    wait_known(agent, "from-manifest")
    assert json.loads((models_dir / "some-directory" / "manifest.json").read_text())["name"] == "from-manifest"
    assert agent.registry.names() == {"from-manifest"}


def test_root_missing_then_created(short_tmp, agent_factory, make_package, models_dir):
    shutil.rmtree(models_dir)
    agent = agent_factory()
    models_dir.mkdir()
    make_package("anomalib", "late")
    wait_known(agent, "late")  # found once the directory exists, without a restart


def test_unreadable_package_directory_with_a_real_service_user(model_files, short_tmp):
    """A package directory the agent's user may not read (a 0700 directory of another user): `serve` starts,
    serves the other models and picks up later ones; one log line about it, no traceback, no socket left.
    A real process and a real EACCES: as root (which reads everything) the agent runs without the
    CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH capabilities, so file permissions apply to it as to a service user."""
    from agent_process import AgentProcess, build_model

    models = short_tmp / "models"
    build_model(model_files["anomalib"], models / "readable", "readable")
    build_model(model_files["anomalib"], models / "private", "private")
    wrapper: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to drop root's file-permission override"
        wrapper = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
        os.chown(models / "private", 12345, 12345)  # another user's package
        os.chmod(models / "private", 0o700)
    else:
        os.chmod(models / "private", 0o000)
    try:
        with AgentProcess(short_tmp, models, wrapper=wrapper) as agent:
            agent.wait_ready()
            assert agent.wait_status("readable", "STOPPED")["status"] == "STOPPED"
            build_model(model_files["anomalib"], short_tmp / "staged", "later")
            os.rename(short_tmp / "staged", models / "later")
            assert agent.wait_status("later", "STOPPED")["status"] == "STOPPED"  # later scans still work
            assert agent.process.poll() is None
            assert agent.stop() == 0
        problems = [m for m in agent.messages() if "model package private" in m]
        assert len(problems) == 1 and "Permission denied" in problems[0], agent.output()
        assert "Traceback" not in agent.output()
        assert not (short_tmp / "agent.sock").exists()
    finally:
        os.chmod(models / "private", 0o755)
