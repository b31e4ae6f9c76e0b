"""Losing and regaining the nucleus: lite's forgotten SVCUIDs, refusals vs. a nucleus that is down, and no
lock held across an IPC call. Real awsiotsdk client against the wire-level fake nucleus (tests/gg_nucleus.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gg_nucleus import OP_GET_CONFIGURATION, OP_SUBSCRIBE_TO_CONFIGURATION_UPDATE, FakeNucleus, until

from agent.app import Agent
from agent.greengrass import COMPONENT_NAME, detect
from agent.greengrass.component import EXIT_IDENTITY_REFUSED, Backoff, ConfigSource, GreengrassComponent
from agent.greengrass.ipc import (
    IdentityRefused,
    NucleusUnavailable,
    aws_session_factory,
    unit_component_name,
)
from agent.greengrass.recipe import default_configuration

TOKEN = "QWERTYUIOPASDFGH"
WAIT_S = 5.0

pytestmark = pytest.mark.timeout(60)


def config(workdir: Path, **changes: Any) -> dict[str, Any]:
    doc = default_configuration()
    doc.update(Socket=f"unix://{workdir}/agent.sock", MetricsPort=-1, **changes)
    return doc


@pytest.fixture
def nucleus(short_tmp: Path) -> Iterator[FakeNucleus]:
    with FakeNucleus(str(short_tmp / "ipc.socket"), TOKEN, COMPONENT_NAME, config(short_tmp)) as fake:
        fake.refuse_by_closing = True  # as nucleus lite's ggipcd does
        yield fake


class Following:
    """A GreengrassComponent following the fake nucleus for a real (unstarted) Agent."""

    def __init__(self, nucleus: FakeNucleus, workdir: Path, *, component_name: str = COMPONENT_NAME,
                 refusals: int = 5) -> None:
        connect = aws_session_factory(nucleus.socket_path, TOKEN, component_name=component_name,
                                      connect_timeout_s=2.0, call_timeout_s=5.0)
        self.component = GreengrassComponent(connect, ConfigSource(workdir / "work", env={}, cli={}),
                                             backoff=Backoff(0.05, 0.2), max_identity_refusals=refusals)
        self.agent = Agent(self.component.initial_config(timeout_s=WAIT_S))
        self.component.attach(self.agent)
        assert self.component.wait_connected(WAIT_S)

    def __enter__(self) -> Following:
        return self

    def __exit__(self, *exc: object) -> None:
        self.component.stop()


def test_connect_errors_say_down_or_refused(nucleus: FakeNucleus, short_tmp: Path) -> None:
    with pytest.raises(IdentityRefused, match="refused the connection: AWS_IO_SOCKET_CLOSED"):
        aws_session_factory(nucleus.socket_path, "WRONG-TOKEN", connect_timeout_s=2.0)(lambda: None)
    nucleus.refuse_by_closing = False  # the classic nucleus: a CONNECT_ACK without CONNECTION_ACCEPTED
    with pytest.raises(IdentityRefused):
        aws_session_factory(nucleus.socket_path, "WRONG-TOKEN", connect_timeout_s=2.0)(lambda: None)
    with pytest.raises(NucleusUnavailable):
        aws_session_factory(str(short_tmp / "nobody.socket"), TOKEN, connect_timeout_s=2.0)(lambda: None)
    nucleus.stop()  # the socket file is gone; a listening-then-closed socket path refuses the same way
    with pytest.raises(NucleusUnavailable):
        aws_session_factory(nucleus.socket_path, TOKEN, connect_timeout_s=2.0)(lambda: None)


def test_forgotten_svcuid_reconnects_in_place_by_component_name(nucleus: FakeNucleus, short_tmp: Path) -> None:
    """Lite's ggipcd restarted: the old SVCUID is unknown, a componentName connect from the unit is not."""
    nucleus.accept_component_names = {COMPONENT_NAME}
    with Following(nucleus, short_tmp) as f:
        nucleus.forget_svcuid()
        assert nucleus.disconnect_all() == 1
        assert until(lambda: f.component.sessions == 2 and f.component.wait_connected(0))
        by_name = [a for a in nucleus.connect_attempts if a.component_name == COMPONENT_NAME]
        assert [a.accepted for a in nucleus.connect_attempts[-2:]] == [False, True] and by_name[-1].accepted
        # The new session is fully followed: a live change arrives and is applied.
        nucleus.wait_for_subscriber(OP_SUBSCRIBE_TO_CONFIGURATION_UPDATE, timeout=WAIT_S)
        nucleus.set_configuration(config(short_tmp, WarmupRuns=6))
        assert until(lambda: f.agent.config.warmup_runs == 6)
        assert f.component.exit_status == 0 and f.component.identity_refusals == 0
        assert not f.agent.wait(0)
        # The stale token is not tried first again: the next reconnect goes straight in by name.
        before = len(nucleus.connect_attempts)
        nucleus.disconnect_all()
        assert until(lambda: f.component.sessions == 3 and f.component.wait_connected(0))
        assert [(a.component_name, a.accepted) for a in nucleus.connect_attempts[before:]] == [(COMPONENT_NAME, True)]


def test_refused_identity_stops_the_agent_with_status_75(nucleus: FakeNucleus, short_tmp: Path) -> None:
    with Following(nucleus, short_tmp, refusals=3) as f:
        nucleus.forget_svcuid()
        nucleus.disconnect_all()
        assert f.agent.wait(WAIT_S), "the agent was not asked to stop"
        assert f.component.exit_status == EXIT_IDENTITY_REFUSED == 75
        assert f.component.identity_refusals == 3
        refused = [a for a in nucleus.connect_attempts if not a.accepted]
        assert len(refused) == 6  # each refusal: the token, then the component name


def test_a_nucleus_that_is_down_is_waited_for(nucleus: FakeNucleus, short_tmp: Path) -> None:
    """Connection refused (nobody listening) is a restart in progress, never a reason to exit."""
    with Following(nucleus, short_tmp, refusals=2) as f:
        nucleus.stop()
        time.sleep(1.5)  # ~10 connects with this backoff
        assert f.component.identity_refusals == 0 and f.component.exit_status == 0 and not f.agent.wait(0)
        back = FakeNucleus(nucleus.socket_path, TOKEN, COMPONENT_NAME, config(short_tmp, WarmupRuns=4))
        with back:
            assert until(lambda: f.agent.config.warmup_runs == 4)
        assert f.component.exit_status == 0


def test_no_lock_is_held_across_an_ipc_call(nucleus: FakeNucleus, short_tmp: Path) -> None:
    """A GetConfiguration the nucleus is slow to answer blocks neither a newer read nor stop(); the older
    answer, arriving last, is not applied over the newer one."""
    f = Following(nucleus, short_tmp)
    try:
        nucleus.wait_for_subscriber(OP_SUBSCRIBE_TO_CONFIGURATION_UPDATE, timeout=WAIT_S)
        reads = len(nucleus.requests_for(OP_GET_CONFIGURATION))
        nucleus.delay_responses(OP_GET_CONFIGURATION, 1.5)
        nucleus.set_configuration(config(short_tmp, WarmupRuns=7))  # its read is held 1.5 s
        nucleus.wait_for_request(OP_GET_CONFIGURATION, count=reads + 1, timeout=WAIT_S)
        nucleus.set_configuration(config(short_tmp, WarmupRuns=9))  # answered at once
        assert until(lambda: f.agent.config.warmup_runs == 9, timeout=1.0), "the newer read waited for the older"
        time.sleep(1.7)  # the held answer (WarmupRuns 7) has arrived by now
        assert f.agent.config.warmup_runs == 9
        nucleus.delay_responses(OP_GET_CONFIGURATION, 3.0)
        nucleus.set_configuration(config(short_tmp, WarmupRuns=5))
        nucleus.wait_for_request(OP_GET_CONFIGURATION, count=reads + 3, timeout=WAIT_S)
    finally:
        started = time.monotonic()
        f.component.stop()
        took = time.monotonic() - started
    assert took < 1.0, f"stop() waited {took:.2f} s for an IPC call"


def test_component_name_comes_from_lites_unit(tmp_path: Path) -> None:
    assert unit_component_name("0::/gglite-ab12.slice/ggl.com.edgeagent.EdgeAgent.service\n") == \
        "com.edgeagent.EdgeAgent"
    assert unit_component_name("1:name=systemd:/system.slice/ggl.com.x.Y.install.service\n") == "com.x.Y"
    assert unit_component_name("0::/user.slice/session-1.scope\n") == ""
    cgroup = tmp_path / "cgroup"
    cgroup.write_text("0::/system.slice/ggl.com.example.Renamed.service\n")
    env = {"SVCUID": TOKEN, "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT": "/x/ipc.socket"}
    found = detect(env, tmp_path, cgroup)
    assert found is not None and found.component_name == "com.example.Renamed"
    found = detect(env, tmp_path, tmp_path / "missing")
    assert found is not None and found.component_name == COMPONENT_NAME  # the classic nucleus: no lite unit
