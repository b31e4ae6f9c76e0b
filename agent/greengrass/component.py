"""The agent as a Greengrass component: configuration, deployments and the IPC connection.

`GreengrassComponent` owns one `NucleusSession` at a time:

* configuration: GetConfiguration → AgentConfig (keys = AgentConfig's Greengrass keys);
  SubscribeToConfigurationUpdate → re-read and apply live what can be (Agent.apply_config), log
  the keys that need a restart; SubscribeToValidateConfigurationUpdates → REJECTED with the
  ConfigError message for invalid values, before the nucleus applies them.
* deployments: PreComponentUpdateEvent → DeferComponentUpdate at once, recheck_after_ms=0 (go
  ahead), or a bounded defer while a model is being loaded or swapped; PostComponentUpdateEvent →
  rescan the models dir now, dropping entries that vanished without waiting out the grace period.
* connection: the IPC client never reconnects by itself; when the connection (or any of its
  subscriptions) drops, a new session is connected with exponential backoff, subscriptions are
  made again and the configuration re-read (updates may have been missed). The gRPC service keeps
  serving throughout: nothing here touches it.

Depends on the core (AgentConfig, the agent's control surface), never the reverse.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.config import AgentConfig, parse_bool
from agent.errors import ConfigError
from agent.greengrass.ipc import NotFound, NucleusError, NucleusSession, SessionFactory

log = logging.getLogger(__name__)

#: While a model loads, how long the nucleus is asked to wait before asking again, and for how long at most.
DEFER_RECHECK_MS = 2000
MAX_DEFER_S = 60.0
MODELS_SUBDIR = "models"


class BusyRegistry(Protocol):
    def busy(self) -> list[str]: ...


class AgentControl(Protocol):
    """What the component needs from the running agent (agent.app.Agent)."""

    config: AgentConfig

    @property
    def registry(self) -> BusyRegistry: ...

    def apply_config(self, new: AgentConfig) -> list[str]: ...

    def rescan_models(self, flush_missing: bool = False) -> None: ...


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: initial_s, doubling up to max_s; reset after a successful connect."""

    initial_s: float = 0.2
    max_s: float = 10.0

    def delays(self) -> Any:
        delay = self.initial_s
        while True:
            yield delay
            delay = min(delay * 2, self.max_s)


class ConfigSource:
    """Turns the component's Greengrass configuration into an AgentConfig.

    Precedence is AgentConfig's (defaults < Greengrass < EDGE_AGENT_* environment < command line).
    Under Greengrass an empty WorkDir means the component's work dir and an empty ModelsDir means
    `<component work dir>/models`, where model components publish their packages."""

    def __init__(self, work_path: Path, env: Mapping[str, str] | None = None,
                 cli: Mapping[str, Any] | None = None) -> None:
        self.work_path = work_path
        self.env = env
        self.cli = cli

    def build(self, greengrass: Mapping[str, Any]) -> AgentConfig:
        return self.resolve_paths(AgentConfig.from_sources(greengrass=greengrass, env=self.env, cli=self.cli))

    def resolve_paths(self, config: AgentConfig) -> AgentConfig:
        changes: dict[str, str] = {}
        if not config.work_dir:
            changes["work_dir"] = str(self.work_path)
        if not config.models_dir:
            changes["models_dir"] = str(self.work_path / MODELS_SUBDIR)
        return config.replace(**changes) if changes else config

    @staticmethod
    def validate(proposed: Mapping[str, Any]) -> str:
        """'' if the proposed Greengrass configuration is valid, else why not (the ConfigError message)."""
        try:
            AgentConfig.from_sources(greengrass=proposed)
        except ConfigError as exc:
            return exc.message
        return ""


class GreengrassComponent:
    def __init__(
        self,
        connect: SessionFactory,
        source: ConfigSource,
        *,
        backoff: Backoff = Backoff(),
        clock: Callable[[], float] = time.monotonic,
        defer_recheck_ms: int = DEFER_RECHECK_MS,
        max_defer_s: float = MAX_DEFER_S,
    ) -> None:
        self._connect = connect
        self.source = source
        self._backoff = backoff
        self._clock = clock
        self._defer_recheck_ms = defer_recheck_ms
        self._max_defer_s = max_defer_s
        self._agent: AgentControl | None = None
        self._lock = threading.RLock()  # session swap, config refresh
        self._session: NucleusSession | None = None
        self._generation = 0
        self._lost_cb: Callable[[], None] = lambda: None
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._applied_gg: dict[str, Any] = {}  # the Greengrass configuration last applied
        self._announced_restart: dict[str, Any] = {}  # restart-only keys already logged, with their value
        self._defer_started: dict[str, float] = {}  # deployment id → first time we deferred it
        self.sessions = 0  # connections made (for status and tests)

    # -- start-up ------------------------------------------------------------------------------
    def initial_config(self, timeout_s: float = 10.0) -> AgentConfig:
        """The configuration to start with: the nucleus' if it answers within timeout_s, else the
        environment and defaults (the recipe's Setenv carries the restart-only keys), corrected by
        the first successful connection later. Raises ConfigError if the configuration is invalid."""
        deadline = self._clock() + timeout_s
        delays = self._backoff.delays()
        while True:
            try:
                session = self._open_session()
                gg = session.get_configuration()
                break
            except NucleusError as exc:
                wait = min(next(delays), deadline - self._clock())
                if wait <= 0:
                    log.warning("no configuration from the nucleus (%s); starting from the environment and "
                                "defaults, and retrying in the background", exc.message)
                    return self.source.build({})
                self._stop.wait(wait)
        self._applied_gg = dict(gg)
        return self.source.build(gg)

    def attach(self, agent: AgentControl) -> None:
        """Start following the nucleus for this (started) agent."""
        self._agent = agent
        self._thread = threading.Thread(target=self._run, name="greengrass-ipc", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._lost.set()  # wakes the IPC thread
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._close_session()

    def wait_connected(self, timeout: float) -> bool:
        """True once subscriptions are in place (tests, status)."""
        return self._connected.wait(timeout)

    # -- connection ----------------------------------------------------------------------------
    def _open_session(self) -> NucleusSession:
        with self._lock:
            if self._session is None:
                self._generation += 1
                generation = self._generation
                self._lost.clear()
                # Callbacks of a closed session can still arrive (the SDK runs them on its executor):
                # only the current session's loss counts.
                self._lost_cb = lambda: self._on_lost(generation)
                self._session = self._connect(self._lost_cb)
                self.sessions += 1
            return self._session

    def _close_session(self) -> None:
        with self._lock:
            session, self._session = self._session, None
            self._connected.clear()
        if session is not None:
            session.close()

    def _on_lost(self, generation: int) -> None:
        with self._lock:
            if generation != self._generation or self._lost.is_set():
                return
            self._lost.set()
        if not self._stop.is_set():
            log.warning("lost the Greengrass IPC connection; reconnecting (the gRPC service keeps serving)")

    def _run(self) -> None:
        delays = self._backoff.delays()
        while not self._stop.is_set():
            try:
                session = self._open_session()
                self._subscribe_all(session)
                self._refresh_config()  # whatever changed while we were not subscribed
                if self.sessions > 1:
                    log.info("Greengrass IPC connection re-established")
                self._connected.set()
                delays = self._backoff.delays()
                self._lost.wait()
            except NucleusError as exc:
                log.warning("Greengrass IPC: %s", exc.message)
            except Exception:  # never let the IPC thread die: the agent would silently stop following deployments
                log.exception("Greengrass IPC session failed")
            self._close_session()
            if not self._stop.is_set():
                self._stop.wait(next(delays))

    def _subscribe_all(self, session: NucleusSession) -> None:
        # Each subscription is optional: a nucleus without one (Greengrass Lite has no component
        # updates or validation) must not keep the agent reconnecting forever. A lost connection
        # still sets `_lost` (and raises here), which reconnects.
        lost = self._lost_cb
        subscriptions: list[tuple[str, Callable[[], None]]] = [
            ("configuration validation",
             lambda: session.subscribe_to_validate_configuration_updates(self._on_validate, lost)),
            ("configuration updates", lambda: session.subscribe_to_configuration_update(self._on_config_changed, lost)),
            ("component updates (model components are then followed by polling only)",
             lambda: session.subscribe_to_component_updates(self._on_pre_update, self._on_post_update, lost)),
        ]
        for what, subscribe in subscriptions:
            try:
                subscribe()
            except NucleusError as exc:
                if self._lost.is_set():
                    raise
                log.warning("Greengrass IPC: no %s: %s", what, exc.message)

    # -- configuration -------------------------------------------------------------------------
    def _on_config_changed(self, key_path: list[str]) -> None:
        log.debug("configuration changed at /%s", "/".join(key_path))
        try:
            self._refresh_config()
        except NucleusError as exc:
            log.warning("cannot re-read the configuration: %s", exc.message)

    def _refresh_config(self) -> None:
        agent = self._agent
        with self._lock:
            session = self._session
            if session is None or agent is None:
                return
            gg = session.get_configuration()
            try:
                new = self.source.build(gg)
            except ConfigError as exc:
                # Validation normally rejects this before it is applied; a local deployment or a first
                # install skips validation. Keep running on the last good configuration.
                log.error("ignoring invalid configuration from the nucleus, keeping the current one: %s",
                          exc.message)
                return
            self._announce_restart_keys(gg)
            self._applied_gg = dict(gg)
            later = agent.apply_config(new)
            for key in later:
                if key not in self._announced_restart:
                    self._announced_restart[key] = getattr(new, AgentConfig.keys()[key].name)
                    log.warning("%s changed; it takes effect when the agent restarts", key)

    def _announce_restart_keys(self, gg: Mapping[str, Any]) -> None:
        """Say which changed keys need a restart. They are compared in the Greengrass configuration
        itself: the recipe's Setenv also passes them as EDGE_AGENT_* variables, which outrank it, so
        the effective AgentConfig would not show the change. (A Setenv change makes the nucleus
        restart the component, so the new value does take effect.)"""
        for key, f in AgentConfig.keys().items():
            if f.metadata["restart"] and key in gg and gg.get(key) != self._applied_gg.get(key, gg.get(key)):
                if self._announced_restart.get(key) != gg.get(key):
                    self._announced_restart[key] = gg.get(key)
                    log.warning("%s changed to %r; it needs an agent restart (the nucleus restarts the "
                                "component, as the recipe passes %s through Setenv)", key, gg.get(key), key)

    def _on_validate(self, deployment_id: str, proposed: dict[str, Any]) -> None:
        reason = self.source.validate(proposed)
        if reason:
            log.warning("rejecting configuration of deployment %s: %s", deployment_id, reason)
        session = self._session
        if session is None:
            return
        try:
            session.send_configuration_validity_report(deployment_id, not reason, reason)
        except NucleusError as exc:
            log.warning("cannot report configuration validity: %s", exc.message)

    # -- deployments ---------------------------------------------------------------------------
    def _on_pre_update(self, deployment_id: str, ggc_restarting: bool) -> None:
        agent = self._agent
        busy = agent.registry.busy() if agent is not None else []
        now = self._clock()
        started = self._defer_started.setdefault(deployment_id, now) if busy else None
        if busy and started is not None and now - started < self._max_defer_s:
            recheck, message = self._defer_recheck_ms, f"edge agent is loading model(s) {', '.join(busy)}"
            log.info("deployment %s: asking the nucleus to wait %d ms (%s)", deployment_id, recheck, message)
        else:
            recheck, message = 0, "edge agent ready for the update"
            self._defer_started.pop(deployment_id, None)
            log.info("deployment %s: ready for the update%s", deployment_id,
                     " (the nucleus restarts too)" if ggc_restarting else "")
        session = self._session
        if session is None:
            return
        try:
            session.defer_component_update(deployment_id, recheck, message)
        except NucleusError as exc:
            log.warning("deployment %s: DeferComponentUpdate: %s", deployment_id, exc.message)

    def _on_post_update(self, deployment_id: str) -> None:
        log.info("deployment %s finished; rescanning model components", deployment_id)
        self._defer_started.pop(deployment_id, None)
        agent = self._agent
        if agent is not None:
            agent.rescan_models(flush_missing=True)

    # -- model components ----------------------------------------------------------------------
    def component_autostart(self, component_name: str) -> bool:
        """The model component's own `Autostart` configuration (False if it has none)."""
        session = self._session
        if session is None:
            raise NucleusError("not connected to the nucleus")
        try:
            value = session.get_configuration(component_name=component_name, key_path=["Autostart"])
        except NotFound:
            return False
        try:
            return parse_bool(value.get("Autostart", False))
        except ValueError:
            log.warning("model component %s: Autostart=%r is not a boolean; ignored", component_name,
                        value.get("Autostart"))
            return False
