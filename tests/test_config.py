"""AgentConfig: one declaration, three sources, clear errors."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import DEFAULT_SOCKET, AgentConfig
from agent.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_lookout_for_vision_compatible():
    config = AgentConfig()
    assert config.socket == DEFAULT_SOCKET == "unix:///tmp/aws.iot.lookoutvision.EdgeAgent.sock"
    assert config.socket_mode == 0o660
    assert config.max_message_bytes >= 4096 * 4096 * 3


def test_precedence_greengrass_env_cli():
    gg = {"MaxQueuedRequests": 4, "WarmupRuns": 2.0, "LogLevel": "debug", "SomeOtherToolKey": "ignored"}
    env = {"EDGE_AGENT_WARMUP_RUNS": "5", "EDGE_AGENT_REQUIRE_ACCELERATOR": "true"}
    parser = argparse.ArgumentParser()
    AgentConfig.add_arguments(parser)
    cli = vars(parser.parse_args(["--warmup-runs", "7", "--execution-providers", "cuda,cpu", "--tcp", ":5000"]))
    config = AgentConfig.from_sources(greengrass=gg, env=env, cli=cli)
    assert config.max_queue == 4  # only Greengrass set it
    assert config.log_level == "DEBUG"
    assert config.require_accelerator is True  # env
    assert config.warmup_runs == 7  # CLI beats env beats Greengrass
    assert config.execution_providers == ("cuda", "cpu")
    assert config.tcp == "127.0.0.1:5000"  # loopback unless a host is given


@pytest.mark.parametrize(("key", "value", "words"), [
    ("Socket", "/tmp/x.sock", "unix:// URI"),
    ("Socket", "unix://relative.sock", "absolute"),
    ("Socket", "unix:///" + "x" * 120, "at most 107"),
    ("SocketMode", "0666", "other users"),
    ("ExecutionProviders", "tensorrt,gpu", "unknown execution provider"),
    ("MaxConcurrentInferences", 0, "must be >= 1"),
    ("MaxQueuedRequests", -1, "must be >= 0"),
    ("RequireAccelerator", "maybe", "true or false"),
    ("TcpListener", "localhost", "HOST:PORT"),
    ("LogFormat", "xml", "plain or json"),
    ("WarmupRuns", True, "integer"),
    ("MallocMmapThresholdMB", 64, "at most 32"),
    ("MallocMmapThresholdMB", -1, "must be >= 0"),
])
def test_invalid_values_name_the_key(key, value, words):
    with pytest.raises(ConfigError) as info:
        AgentConfig.from_sources(greengrass={key: value})
    assert key in info.value.message and words in info.value.message


def test_configuration_docs_are_generated_from_the_config():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
