"""start-model / stop-model / describe-model / list-models as a user runs them: subprocesses against a real
agent on a real socket; the RUNNING set surviving kill -9 with real `edge-agent serve` processes."""

from __future__ import annotations

import json
import signal

from agent_process import AgentProcess, build_model, cli
from conftest import wait_known


def test_start_describe_list_stop(make_package, agent_factory):
    agent = agent_factory()
    make_package("anomalib", "widget")
    make_package("classification", "other")
    wait_known(agent, "widget", "other")
    bare = agent.config.socket_path  # a bare path works as well as unix:///path

    started = cli("start-model", "widget", "--socket", bare)
    assert (started.returncode, started.stdout) == (0, "STARTING\n"), started.stderr
    waited = cli("start-model", "widget", "--wait", "--socket", bare)  # already starting/running: fine
    assert (waited.returncode, waited.stdout) == (0, "RUNNING\n"), waited.stderr

    desc = cli("describe-model", "widget", "--socket", agent.config.socket)
    assert desc.returncode == 0, desc.stderr
    assert json.loads(desc.stdout) == {
        "model_component": "widget", "status": "RUNNING", "status_message": "running on CPUExecutionProvider",
        "lookout_vision_model_arn": "arn:aws:lookoutvision:us-east-1:123456789012:model/test/widget"}

    listed = cli("list-models", "--socket", bare)
    assert listed.returncode == 0, listed.stderr
    assert [(m["model_component"], m["status"]) for m in json.loads(listed.stdout)["models"]] == [
        ("other", "STOPPED"), ("widget", "RUNNING")]

    stopped = cli("stop-model", "widget", "--socket", bare)
    assert (stopped.returncode, stopped.stdout) == (0, "STOPPED\n"), stopped.stderr
    again = cli("stop-model", "widget", "--socket", bare)
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.startswith("edge-agent: FAILED_PRECONDITION: ") and len(again.stderr.splitlines()) == 1


def test_errors_are_one_line_and_not_found_lists_the_known_models(make_package, agent_factory, short_tmp):
    agent = agent_factory()
    make_package("anomalib", "widget")
    wait_known(agent, "widget")
    for command in (["start-model", "nope"], ["start-model", "nope", "--wait", "--timeout", "5"],
                    ["stop-model", "nope"], ["describe-model", "nope"]):
        result = cli(*command, "--socket", agent.config.socket)
        assert result.returncode == 1, (command, result.stderr)
        assert result.stderr.splitlines() == [
            "edge-agent: NOT_FOUND: model component 'nope' not found; known models: widget"], command
    missing = cli("list-models", "--socket", str(short_tmp / "none.sock"))
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.startswith(f"edge-agent: agent not reachable on unix://{short_tmp}/none.sock (")
    assert len(missing.stderr.splitlines()) == 1
    no_name = cli("describe-model", "--socket", agent.config.socket)
    assert no_name.returncode == 1 and "NAME" in no_name.stderr and "--project-name" in no_name.stderr


def test_start_model_wait_fails_when_the_model_fails(make_package, agent_factory):
    agent = agent_factory()
    package = make_package("anomalib", "broken")
    (package.root / "model.onnx.data").write_bytes(b"corrupt")
    wait_known(agent, "broken")
    result = cli("start-model", "broken", "--wait", "--socket", agent.config.socket)
    assert result.returncode == 1 and result.stdout == "FAILED\n"
    assert "edge-agent: model broken is FAILED: " in result.stderr and "sha256" in result.stderr


def test_registry_answers_with_project_name(short_tmp, model_files):
    env = {"EDGE_AGENT_HOME": str(short_tmp / "registry"), "EDGE_AGENT_PACKAGING_MODE": "local"}
    assert cli("create-project", "--project-name", "demo", env=env).returncode == 0
    created = cli("create-model", "--project-name", "demo", "--onnx", str(model_files["anomalib"]), env=env)
    assert created.returncode == 0, created.stderr
    listed = cli("list-models", "--project-name", "demo", env=env)
    assert listed.returncode == 0, listed.stderr
    assert [m["ModelVersion"] for m in json.loads(listed.stdout)["Models"]] == ["1"]
    described = cli("describe-model", "--project-name", "demo", "--model-version", "1", env=env)
    assert described.returncode == 0 and json.loads(described.stdout)["ModelDescription"]["ModelVersion"] == "1"
    incomplete = cli("describe-model", "--project-name", "demo", env=env)
    assert incomplete.returncode == 2 and "needs --model-version" in incomplete.stderr


def test_running_models_come_back_after_kill_9(model_files, short_tmp):
    """Standalone: the models asked to run are remembered under --work-dir; after kill -9 the agent starts
    them again by itself, and a stopped one stays stopped."""
    models = short_tmp / "models"
    build_model(model_files["anomalib"], models / "kept", "kept")
    build_model(model_files["anomalib"], models / "stopped", "stopped")
    with AgentProcess(short_tmp, models) as first:
        first.wait_ready()
        for name in ("kept", "stopped"):
            result = cli("start-model", name, "--wait", "--socket", first.socket)
            assert result.stdout == "RUNNING\n", result.stderr
        assert cli("stop-model", "stopped", "--socket", first.socket).stdout == "STOPPED\n"
        state = json.loads((short_tmp / "work" / "running-models.json").read_text())
        assert state == {"running": ["kept"]}
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert (short_tmp / "agent.sock").exists()  # kill -9 leaves the socket file: the next agent replaces it
    with AgentProcess(short_tmp, models) as second:
        second.wait_ready()
        assert second.wait_status("kept", "RUNNING")["status"] == "RUNNING"
        assert second.describe("stopped")["status"] == "STOPPED"
        assert any("start again when found: kept" in m for m in second.messages())
        assert second.stop() == 0
