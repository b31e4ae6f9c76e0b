"""The Unix socket: permissions, stale files, refusing to steal a live socket."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from agent.app import Agent
from agent.config import AgentConfig
from agent.errors import ConfigError


def test_socket_mode_is_owner_and_group_only(agent):
    mode = os.stat(agent.config.socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


def test_configured_group_and_mode(agent_factory):
    gid = os.getgid()
    agent = agent_factory(socket_group=str(gid), socket_mode="0600")
    st = os.stat(agent.config.socket_path)
    assert st.st_gid == gid and stat.S_IMODE(st.st_mode) == 0o600


def test_stale_socket_is_replaced(short_tmp, agent_factory):
    path = short_tmp / "stale.sock"
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(path))  # bound but never listening, like a crashed agent's file
    leftover.close()
    agent = agent_factory(socket=f"unix://{path}")
    assert agent.addresses[0] == f"unix://{path}"
    assert stat.S_ISSOCK(os.stat(path).st_mode)


def test_live_socket_and_regular_file_are_not_taken(short_tmp, agent):
    config = AgentConfig.from_sources(cli={"socket": agent.config.socket, "execution_providers": "cpu"})
    with pytest.raises(ConfigError, match="another process is serving"):
        Agent(config).start()
    plain = short_tmp / "not-a-socket"
    plain.write_text("user data")
    config = AgentConfig.from_sources(cli={"socket": f"unix://{plain}", "execution_providers": "cpu"})
    with pytest.raises(ConfigError, match="not a socket"):
        Agent(config).start()
    assert plain.read_text() == "user data"


def test_optional_tcp_listener(agent_factory, pb, pb_modules):
    import grpc

    agent = agent_factory(tcp="127.0.0.1:0")
    host_port = agent.addresses[1]
    assert host_port.startswith("127.0.0.1:") and not host_port.endswith(":0")
    with grpc.insecure_channel(host_port) as ch:
        assert list(pb_modules[1].EdgeAgentStub(ch).ListModels(pb.ListModelsRequest()).models) == []


def test_world_accessible_mode_is_rejected():
    with pytest.raises(ConfigError, match="SocketMode"):
        AgentConfig.from_sources(cli={"socket_mode": "0666"})
