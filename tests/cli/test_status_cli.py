"""`edge-agent status` run as a user runs it: whose metrics it shows, an absent agent, a closed pipe."""

from __future__ import annotations

import subprocess
import sys

from agent_process import ROOT, AgentProcess, build_model, cli
from conftest import wait_known


def test_status_without_an_agent_says_only_that(short_tmp):
    result = cli("status", "--socket", str(short_tmp / "none.sock"), "--interval", "0")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"edge-agent status: agent not reachable on unix://{short_tmp}/none.sock (UNAVAILABLE: No such file or "
        "directory)"]


def test_status_never_shows_another_agents_metrics(model_files, short_tmp, agent_factory, make_package):
    other = agent_factory()  # in this process, with its own metrics endpoint and model
    make_package("anomalib", "others-model")
    wait_known(other, "others-model")
    other_url = other.metrics_server.url
    root = short_tmp / "a"
    root.mkdir()
    build_model(model_files["anomalib"], root / "models" / "mine", "mine")
    with AgentProcess(root, root / "models") as mine:
        mine.wait_ready()
        mine.wait_status("mine", "STOPPED")

        wrong = cli("status", "--socket", mine.socket, "--metrics-url", other_url, "--interval", "0")
        assert wrong.returncode == 0, wrong.stderr
        assert "others-model" not in wrong.stdout and "come from another process" in wrong.stdout
        assert "(not this agent's)" in wrong.stdout

        guessed = cli("status", "--socket", mine.socket, "--interval", "0")
        assert guessed.returncode == 0, guessed.stderr
        assert "metrics not shown" in guessed.stdout and "--metrics-url" in guessed.stdout
        assert "up " not in guessed.stdout.splitlines()[0]  # no uptime of some other process

        right = cli("status", "--socket", mine.socket, "--metrics-url", mine.metrics_url, "--interval", "0")
        assert right.returncode == 0, right.stderr
        header = right.stdout.splitlines()
        assert ", up " in header[0] and header[1] == f"metrics {mine.metrics_url}"
        assert any(line.split()[:2] == ["mine", "STOPPED"] for line in header), right.stdout
        assert "!" not in right.stdout
        assert mine.stop() == 0


def test_status_into_a_closed_pipe_is_quiet(agent):
    """`edge-agent status | head`: the reader went away; no BrokenPipeError traceback."""
    command = (f"{sys.executable} -m agent status --socket {agent.config.socket} --metrics-url "
               f"{agent.metrics_server.url} --interval 0 | true")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert "Exception ignored" not in result.stderr, result.stderr
