"""The agent's Greengrass side (agent/greengrass) against the fake nucleus, with the real awsiotsdk client.

Connect with SVCUID, configuration read / live update / validation, pre-update + defer,
post-update, lost connection and reconnect with backoff. The agent here is a real (unstarted)
agent.app.Agent, so live configuration goes through Agent.apply_config.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gg_nucleus import (
    OP_GET_CONFIGURATION,
    OP_SUBSCRIBE_TO_COMPONENT_UPDATES,
    OP_SUBSCRIBE_TO_CONFIGURATION_UPDATE,
    OP_SUBSCRIBE_TO_VALIDATE_CONFIGURATION_UPDATES,
    FakeNucleus,
    until,
)

from agent.app import Agent
from agent.config import AgentConfig
from agent.greengrass import COMPONENT_NAME, detect
from agent.greengrass.component import Backoff, ConfigSource, GreengrassComponent
from agent.greengrass.ipc import aws_session_factory
from agent.greengrass.recipe import default_configuration

TOKEN = "QWERTYUIOPASDFGH"
MODEL = "com.example.BottleModel"
WAIT_S = 5.0
FAST_BACKOFF = Backoff(0.05, 0.2)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def workdir(short_tmp: Path) -> Path:
    return short_tmp  # AF_UNIX paths must stay under 108 bytes: not pytest's tmp_path


def initial_config(workdir: Path) -> dict[str, Any]:
    config = default_configuration()
    config.update(Socket=f"unix://{workdir}/agent.sock", MetricsPort=-1, MaxQueuedRequests=5)
    return config


@pytest.fixture
def nucleus(workdir: Path) -> Iterator[FakeNucleus]:
    with FakeNucleus(str(workdir / "ipc.socket"), TOKEN, COMPONENT_NAME, initial_config(workdir),
                     other_configs={MODEL: {"Autostart": True}}) as fake:
        yield fake


class Harness:
    """A GreengrassComponent attached to a real Agent (not serving: no socket, no models)."""

    def __init__(self, nucleus: FakeNucleus, workdir: Path, *, backoff: Backoff = FAST_BACKOFF,
                 initial_timeout_s: float = WAIT_S) -> None:
        self.nucleus = nucleus
        self.component = GreengrassComponent(
            aws_session_factory(nucleus.socket_path, TOKEN, connect_timeout_s=2.0, call_timeout_s=2.0),
            ConfigSource(workdir / "work", env={}, cli={}), backoff=backoff, defer_recheck_ms=300, max_defer_s=1.0)
        self.config = self.component.initial_config(timeout_s=initial_timeout_s)
        self.agent = Agent(self.config)  # never started: no socket, no models loaded
        self.rescans: list[bool] = []
        self.rescanned = threading.Event()
        self.busy: list[str] = []
        self.agent.rescan_models = self._rescan  # type: ignore[method-assign]
        self.agent.registry.busy = lambda: list(self.busy)  # type: ignore[method-assign]

    def _rescan(self, flush_missing: bool = False) -> None:
        self.rescans.append(flush_missing)
        self.rescanned.set()

    def attach(self) -> Harness:
        self.component.attach(self.agent)
        assert self.component.wait_connected(WAIT_S)
        return self

    def close(self) -> None:
        self.component.stop()


@pytest.fixture
def harness(nucleus: FakeNucleus, workdir: Path) -> Iterator[Harness]:
    h = Harness(nucleus, workdir).attach()
    try:
        yield h
    finally:
        h.close()


# --- detection and start-up ------------------------------------------------------------------


def test_detect_needs_both_nucleus_variables(workdir: Path) -> None:
    assert detect({}, workdir) is None
    assert detect({"SVCUID": TOKEN}, workdir) is None
    env = detect({"SVCUID": TOKEN, "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT": "/gg/ipc.socket"}, workdir)
    assert env is not None and env.svcuid == TOKEN and env.socket_path == "/gg/ipc.socket" and env.work_path == workdir


def test_connects_with_svcuid_and_reads_configuration(harness: Harness, workdir: Path) -> None:
    assert [a.auth_token for a in harness.nucleus.connect_attempts] == [TOKEN]
    assert harness.nucleus.connect_attempts[0].accepted
    assert harness.nucleus.requests_for(OP_GET_CONFIGURATION)
    config = harness.config
    assert config.max_queue == 5
    assert config.socket == f"unix://{workdir}/agent.sock"
    # Empty WorkDir / ModelsDir mean the component's work dir and <work dir>/models.
    assert config.work_dir == str(workdir / "work")
    assert config.models_dir == str(workdir / "work" / "models")
    for op in (OP_SUBSCRIBE_TO_CONFIGURATION_UPDATE, OP_SUBSCRIBE_TO_VALIDATE_CONFIGURATION_UPDATES,
               OP_SUBSCRIBE_TO_COMPONENT_UPDATES):
        assert harness.nucleus.subscriber_count(op) == 1


def test_no_nucleus_at_start_falls_back_then_connects(workdir: Path) -> None:
    nucleus = FakeNucleus(str(workdir / "ipc.socket"), TOKEN, COMPONENT_NAME, initial_config(workdir))
    h = Harness(nucleus, workdir, initial_timeout_s=0.5)  # nobody listens yet: initial_config gives up
    try:
        assert h.config.max_queue == AgentConfig().max_queue  # defaults (+ environment)
        h.component.attach(h.agent)
        nucleus.start()
        assert h.component.wait_connected(WAIT_S)
        assert until(lambda: h.agent.config.max_queue == 5)  # the nucleus' value, applied live
    finally:
        h.close()
        nucleus.stop()


def test_component_autostart_reads_the_model_components_configuration(harness: Harness) -> None:
    assert harness.component.component_autostart(MODEL) is True
    assert harness.component.component_autostart("com.example.Unknown") is False


# --- configuration -----------------------------------------------------------------------------


@pytest.fixture
def root_log_level() -> Iterator[None]:
    level = logging.getLogger().level  # LogLevel applies to the root logger: restore it for other tests
    try:
        yield
    finally:
        logging.getLogger().setLevel(level)


def test_live_update_applies_what_it_can_and_names_restart_keys(harness: Harness, workdir: Path, root_log_level: None,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    new = initial_config(workdir)
    new.update(MaxQueuedRequests=9, LogLevel="DEBUG", ExecutionProviders=["cpu"], ModelRemovalGraceSeconds=3,
               Socket=f"unix://{workdir}/other.sock")
    with caplog.at_level(logging.INFO, logger="agent"):
        harness.nucleus.set_configuration(new)
        assert until(lambda: harness.agent.config.max_queue == 9)
    config = harness.agent.config
    assert config.log_level == "DEBUG" and config.execution_providers == ("cpu",) and config.removal_grace_s == 3
    assert harness.agent.registry.settings.max_queue == 9
    assert harness.agent.runtime.options.providers == ("cpu",)  # type: ignore[attr-defined]
    assert config.socket == f"unix://{workdir}/agent.sock"  # needs a restart: unchanged
    assert any("Socket" in r.getMessage() and "restart" in r.getMessage() for r in caplog.records)


def test_invalid_configuration_is_rejected_with_the_reason(harness: Harness, workdir: Path) -> None:
    bad = initial_config(workdir)
    bad["MaxConcurrentInferences"] = 0
    status, message = harness.nucleus.propose_configuration(bad, timeout=WAIT_S)
    assert status == "REJECTED"
    assert message is not None and "MaxConcurrentInferences" in message and ">= 1" in message
    assert harness.nucleus.configuration()["MaxConcurrentInferences"] == 2  # not applied

    good = initial_config(workdir)
    good["MaxConcurrentInferences"] = 4
    assert harness.nucleus.propose_configuration(good, timeout=WAIT_S)[0] == "ACCEPTED"
    assert until(lambda: harness.agent.config.max_concurrency == 4)


# --- deployments -------------------------------------------------------------------------------


def test_pre_update_is_acknowledged_at_once(harness: Harness) -> None:
    started = time.monotonic()
    defers = harness.nucleus.send_pre_update("deploy-1", timeout=WAIT_S)
    elapsed = time.monotonic() - started
    assert [d.recheck_after_ms for d in defers] == [0]
    assert elapsed < 1.0, f"acknowledged after {elapsed:.2f}s"


def test_pre_update_is_deferred_while_a_model_loads_but_not_forever(harness: Harness) -> None:
    harness.busy = [MODEL]
    first = harness.nucleus.send_pre_update("deploy-2", timeout=WAIT_S)
    assert [d.recheck_after_ms for d in first] == [300]
    assert first[0].message is not None and MODEL in first[0].message
    # The nucleus asks again after recheckAfterMs; once the load is over the agent lets it proceed.
    harness.busy = []
    assert [d.recheck_after_ms for d in harness.nucleus.send_pre_update("deploy-2", timeout=WAIT_S)] == [0]
    # A load that never ends does not hold a deployment back longer than max_defer_s.
    harness.busy = [MODEL]
    rechecks = []
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        rechecks += [d.recheck_after_ms for d in harness.nucleus.send_pre_update("deploy-3", timeout=WAIT_S)]
        if rechecks[-1] == 0:
            break
        time.sleep(rechecks[-1] / 1000)
    assert rechecks[0] == 300 and rechecks[-1] == 0


def test_post_update_rescans_models_now(harness: Harness) -> None:
    assert harness.nucleus.send_post_update("deploy-4") == 1
    assert harness.rescanned.wait(WAIT_S)
    assert harness.rescans == [True]


# --- connection loss ---------------------------------------------------------------------------


def test_reconnects_after_the_nucleus_drops_the_connection(harness: Harness, workdir: Path) -> None:
    nucleus = harness.nucleus
    assert nucleus.disconnect_all() == 1
    nucleus.wait_for_accepted_total(2, timeout=WAIT_S)
    nucleus.wait_for_subscriber(OP_SUBSCRIBE_TO_COMPONENT_UPDATES, timeout=WAIT_S)
    nucleus.wait_for_subscriber(OP_SUBSCRIBE_TO_CONFIGURATION_UPDATE, timeout=WAIT_S)
    assert harness.component.wait_connected(WAIT_S)
    # The new session works end to end: deployments and configuration updates.
    assert [d.recheck_after_ms for d in nucleus.send_pre_update("deploy-5", timeout=WAIT_S)] == [0]
    new = initial_config(workdir)
    new["WarmupRuns"] = 7
    nucleus.set_configuration(new)
    assert until(lambda: harness.agent.config.warmup_runs == 7)
    assert harness.component.sessions == 2


def test_configuration_missed_while_disconnected_is_picked_up(harness: Harness, workdir: Path) -> None:
    nucleus = harness.nucleus
    nucleus.stop()  # the nucleus goes away (restart): the agent retries with backoff
    assert until(lambda: not harness.component.wait_connected(0))
    restarted = FakeNucleus(nucleus.socket_path, TOKEN, COMPONENT_NAME, {**initial_config(workdir),
                                                                          "MaxQueuedRequests": 11})
    with restarted:
        assert harness.component.wait_connected(WAIT_S)
        assert until(lambda: harness.agent.config.max_queue == 11)
        restarted.wait_for_subscriber(OP_SUBSCRIBE_TO_COMPONENT_UPDATES, timeout=WAIT_S)


def test_server_closing_a_subscription_resubscribes(harness: Harness) -> None:
    nucleus = harness.nucleus
    assert nucleus.close_subscriptions(OP_SUBSCRIBE_TO_COMPONENT_UPDATES) == 1
    nucleus.wait_for_subscriber(OP_SUBSCRIBE_TO_COMPONENT_UPDATES, timeout=WAIT_S)
    assert [d.recheck_after_ms for d in nucleus.send_pre_update("deploy-6", timeout=WAIT_S)] == [0]


def test_a_nucleus_without_component_updates_is_still_followed(nucleus: FakeNucleus, workdir: Path) -> None:
    # Greengrass Lite answers SubscribeToComponentUpdates with an error: no reconnect loop, config still live.
    nucleus.inject_error(OP_SUBSCRIBE_TO_COMPONENT_UPDATES, message="Operation not supported", times=1000)
    h = Harness(nucleus, workdir).attach()
    try:
        time.sleep(0.5)  # room for a (wrong) reconnect loop to show
        assert h.component.sessions == 1
        new = initial_config(workdir)
        new["WarmupRuns"] = 9
        nucleus.set_configuration(new)
        assert until(lambda: h.agent.config.warmup_runs == 9)
    finally:
        h.close()
