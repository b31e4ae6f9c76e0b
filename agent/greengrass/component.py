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
  serving throughout: nothing here touches it. A nucleus that is down (nobody listening) is waited for;
  one that is up but keeps refusing the component's identity (nucleus lite after its IPC server
  restarted, when the componentName connect is refused too) cannot be fixed from inside: after
  `max_identity_refusals` consecutive refusals the agent stops with exit status 75 (EX_TEMPFAIL), and the
  nucleus restarts the component with a fresh identity.
* locking: `_lock` guards only the session slot; no lock is held across an IPC call (a nucleus that
  stops answering must not block a reconnect or stop()). Configuration reads carry a sequence number
  so a slow, older read is never applied over a newer one.

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
from agent.greengrass.ipc import IdentityRefused, NotFound, NucleusError, NucleusSession, SessionFactory

log = logging.getLogger(__name__)

#: While a model loads, how long the nucleus is asked to wait before asking again, and for how long at most.
DEFER_RECHECK_MS = 2000
MAX_DEFER_S = 60.0
MODELS_SUBDIR = "models"
#: Consecutive connects refused although the nucleus listens, before the agent exits for a fresh identity
#: (~3 s with the default backoff: 0.2 s doubling). A nucleus that is down does not count.
MAX_IDENTITY_REFUSALS = 5
#: sysexits' EX_TEMPFAIL: the nucleus treats any non-zero exit of a running component as an error and
#: restarts it (classic: ERRORED -> restart; lite: systemd Restart=on-failure).
EXIT_IDENTITY_REFUSED = 75


class BusyRegistry(Protocol):
    def busy(self) -> list[str]: ...


class AgentControl(Protocol):
    """What the component needs from the running agent (agent.app.Agent)."""

    config: AgentConfig

    @property
    def registry(self) -> BusyRegistry: ...

    def apply_config(self, new: AgentConfig) -> list[str]: ...

    def rescan_models(self, flush_missing: bool = False) -> None: ...

    def request_stop(self) -> None: ...


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
        max_identity_refusals: int = MAX_IDENTITY_REFUSALS,
    ) -> None:
        self._connect = connect
        self.source = source
        self._backoff = backoff
        self._clock = clock
        self._defer_recheck_ms = defer_recheck_ms
        self._max_defer_s = max_defer_s
        self._agent: AgentControl | None = None
        self._max_identity_refusals = max_identity_refusals
        self._lock = threading.Lock()  # the session slot and its generation; never held across IPC
        self._apply_lock = threading.Lock()  # orders configuration applies (local work only)
        self._reads = 0  # configuration reads started; the sequence number of each
        self._applied_read = 0  # the sequence number of the read last applied
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
        self.identity_refusals = 0  # consecutive refused connects
        #: 0, or EXIT_IDENTITY_REFUSED once the agent was asked to stop for a fresh identity: serve's exit status.
        self.exit_status = 0

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
            if self._session is not None:
                return self._session
            self._generation += 1
            generation = self._generation
            self._lost.clear()
            # Callbacks of a closed session can still arrive (the SDK runs them on its executor):
            # only the current session's loss counts.
            lost_cb: Callable[[], None] = lambda: self._on_lost(generation)  # noqa: E731
            self._lost_cb = lost_cb
        session = self._connect(lost_cb)  # no lock held: a connect may take its whole timeout
        with self._lock:
            if self._generation == generation and self._session is None and not self._stop.is_set():
                self._session = session
                self.sessions += 1
                return session
        session.close()  # stop() (or another connect) came first
        raise NucleusError("the connection was replaced or the component stopped while connecting")

    def _close_session(self) -> None:
        with self._lock:
            session, self._session = self._session, None
            self._generation += 1  # a connect in progress must not install its session
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
        failure = ""  # the kind of the last failed attempt
        while not self._stop.is_set():
            kind = ""
            try:
                session = self._open_session()
                self.identity_refusals = 0
                self._subscribe_all(session)
                self._refresh_config()  # whatever changed while we were not subscribed
                if self.sessions > 1:
                    log.info("Greengrass IPC connection re-established")
                self._connected.set()
                delays = self._backoff.delays()
                self._lost.wait()
            except IdentityRefused as exc:
                kind = "refused"
                self.identity_refusals += 1
                log.warning("Greengrass IPC: %s (%d of %d)", exc.message, self.identity_refusals,
                            self._max_identity_refusals)
                if self.identity_refusals >= self._max_identity_refusals:
                    self._give_up(exc)
                    return
            except NucleusError as exc:
                kind = type(exc).__name__
                log.warning("Greengrass IPC: %s", exc.message)
            except Exception:  # never let the IPC thread die: the agent would silently stop following deployments
                kind = "bug"
                log.exception("Greengrass IPC session failed")
            self._close_session()
            if kind != failure:
                # Something changed (e.g. the nucleus is back after a restart, but refuses us): start the backoff
                # over, so that refusals are counted at the short delays, not after a long outage's 10 s.
                failure, delays = kind, self._backoff.delays()
            if not self._stop.is_set():
                self._stop.wait(next(delays))

    def _give_up(self, exc: IdentityRefused) -> None:
        """The nucleus is up but will not take this process back: stop, non-zero, so it restarts the
        component with a fresh identity (the models it ran start again from the persisted RUNNING set)."""
        log.error("Greengrass IPC: the nucleus refused this component's identity %d times in a row (%s); "
                  "exiting with status %d so that the nucleus restarts it with a fresh one",
                  self.identity_refusals, exc.message, EXIT_IDENTITY_REFUSED)
        self.exit_status = EXIT_IDENTITY_REFUSED
        self._close_session()
        agent = self._agent
        if agent is not None:
            agent.request_stop()

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
            self._reads += 1
            read = self._reads
        if session is None or agent is None:
            return
        gg = session.get_configuration()  # no lock held across the call
        with self._apply_lock:
            if read < self._applied_read:
                return  # a later read was applied while this one was on the wire
            self._applied_read = read
            try:
                new = self.source.build(gg)
            except ConfigError as exc:
                # Validation normally rejects this before it is applied; a local deployment, a first
                # install or nucleus lite (no validation at all) does not. Keep the last good configuration.
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
