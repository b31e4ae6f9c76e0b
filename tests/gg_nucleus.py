"""A wire-level fake Greengrass v2 nucleus IPC server for tests.

The real `awsiot.greengrasscoreipc` client (awscrt event-stream RPC over a Unix socket) connects
to this server exactly as it would to the Java nucleus: CONNECT/CONNECT_ACK handshake with the
SVCUID token, then one event-stream per operation. The fake implements the lifecycle and
configuration operations an inference agent uses, with the nucleus' semantics and error shapes
(see `ConfigStoreIPCEventStreamAgent` / `LifecycleIPCEventStreamAgent` in aws-greengrass-nucleus),
plus helpers that play the nucleus' side of a deployment: configuration validation, pre/post
component-update notifications and server-side disconnects.

Threading model: all socket I/O runs on one asyncio loop in a private thread. Observable state
(records, configuration, pending deployment handshakes) is guarded by one condition variable, so
test threads can read it and wait on it with deadlines. Test-thread helpers that must write to a
socket hand the work to the loop thread, because asyncio transports are not thread-safe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import functools
import itertools
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

# tests/ is on sys.path (pytest rootdir-relative import of a dir without __init__.py), so the
# helper modules import each other by plain name.
import gg_eventstream as es

_T = TypeVar("_T")

# --- service model names --------------------------------------------------------------------

SERVICE = "aws.greengrass#GreengrassCoreIPC"

OP_GET_CONFIGURATION = "aws.greengrass#GetConfiguration"
OP_UPDATE_CONFIGURATION = "aws.greengrass#UpdateConfiguration"
OP_SUBSCRIBE_TO_CONFIGURATION_UPDATE = "aws.greengrass#SubscribeToConfigurationUpdate"
OP_SUBSCRIBE_TO_VALIDATE_CONFIGURATION_UPDATES = "aws.greengrass#SubscribeToValidateConfigurationUpdates"
OP_SEND_CONFIGURATION_VALIDITY_REPORT = "aws.greengrass#SendConfigurationValidityReport"
OP_SUBSCRIBE_TO_COMPONENT_UPDATES = "aws.greengrass#SubscribeToComponentUpdates"
OP_DEFER_COMPONENT_UPDATE = "aws.greengrass#DeferComponentUpdate"
OP_UPDATE_STATE = "aws.greengrass#UpdateState"

# Event shape sent on each streaming operation after its initial response.
STREAM_EVENT_TYPES: dict[str, str] = {
    OP_SUBSCRIBE_TO_CONFIGURATION_UPDATE: "aws.greengrass#ConfigurationUpdateEvents",
    OP_SUBSCRIBE_TO_VALIDATE_CONFIGURATION_UPDATES: "aws.greengrass#ValidateConfigurationUpdateEvents",
    OP_SUBSCRIBE_TO_COMPONENT_UPDATES: "aws.greengrass#ComponentUpdatePolicyEvents",
}

ERR_SERVICE = "aws.greengrass#ServiceError"
ERR_RESOURCE_NOT_FOUND = "aws.greengrass#ResourceNotFoundError"
ERR_INVALID_ARGUMENTS = "aws.greengrass#InvalidArgumentsError"
ERR_UNAUTHORIZED = "aws.greengrass#UnauthorizedError"

KEY_NOT_FOUND = "Key not found"  # the nucleus' exact message
ACCESS_CONTROL_KEY = "accessControl"  # UpdateConfiguration may not touch it
REPORTED_LIFECYCLE_STATES = ("RUNNING", "ERRORED")

# How long a rejected client gets to close its side before the server drops the socket. Closing
# first makes the client see AWS_IO_SOCKET_CLOSED instead of the AccessDeniedError it should.
_REJECT_LINGER_S = 2.0


# --- records exposed to tests ----------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """One operation request as it arrived on the wire (first message of a stream)."""

    operation: str
    payload: dict[str, Any]
    connection_id: int
    stream_id: int
    model_type: str | None


@dataclass(frozen=True)
class SentEvent:
    """One stream event the fake pushed to a subscriber."""

    operation: str
    payload: dict[str, Any]
    connection_id: int
    stream_id: int


@dataclass(frozen=True)
class ConnectAttempt:
    connection_id: int
    auth_token: str | None
    version: str | None
    accepted: bool
    component_name: str | None = None  # a lite-style {"componentName": ...} connect


@dataclass(frozen=True)
class DeferRequest:
    deployment_id: str | None
    message: str | None
    recheck_after_ms: int | None
    connection_id: int


@dataclass(frozen=True)
class ValidityReport:
    deployment_id: str
    status: str | None
    message: str | None


class IpcError(Exception):
    """A modelled Greengrass error; sent as APPLICATION_ERROR with TERMINATE_STREAM."""

    def __init__(self, model_type: str, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.model_type = model_type
        self.message = message
        self.fields = fields

    def payload(self) -> dict[str, Any]:
        # The Java nucleus sends the framework fields (_message, _errorCode, _service) next to
        # the modelled ones; the Python client only reads the modelled `message`.
        body: dict[str, Any] = {
            "_service": SERVICE,
            "_message": self.message,
            "_errorCode": self.model_type.split("#", 1)[-1],
            "message": self.message,
        }
        body.update({k: v for k, v in self.fields.items() if v is not None})
        return body


# --- per-connection state (touched only on the loop thread, read under the lock) --------------


@dataclass(eq=False)
class _Stream:
    conn: _Connection
    stream_id: int
    operation: str
    request: dict[str, Any]
    open: bool = True
    # Streaming ops only emit events after their initial response went out (nucleus
    # `afterHandleRequest`); otherwise the client would take an event for the response.
    active: bool = False


@dataclass(eq=False)
class _Connection:
    conn_id: int
    writer: asyncio.StreamWriter
    component: str | None = None
    streams: dict[int, _Stream] = field(default_factory=dict)
    closed: bool = False

    def write(self, data: bytes) -> None:
        if not self.closed and not self.writer.is_closing():
            self.writer.write(data)


# --- configuration tree helpers -------------------------------------------------------------


def _deep_merge(target: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _deep_merge(target[key], value)
        else:
            target[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)


def _leaf_paths(value: Any, prefix: list[str]) -> list[list[str]]:
    if isinstance(value, dict) and value:
        paths: list[list[str]] = []
        for key, child in value.items():
            paths += _leaf_paths(child, prefix + [key])
        return paths
    return [prefix]


def _changed_paths(old: Any, new: Any, prefix: list[str] | None = None) -> list[list[str]]:
    """Key paths of changed leaves, like the nucleus' per-node change events.

    An added subtree reports each of its leaves (the nucleus suppresses `interiorAdded` but fires
    for every leaf set under it); a removed node reports the node itself.
    """
    prefix = prefix or []
    if isinstance(old, dict) and isinstance(new, dict):
        paths: list[list[str]] = []
        for key in list(old) + [k for k in new if k not in old]:
            if key not in new:
                paths.append(prefix + [key])
            elif key not in old:
                paths += _leaf_paths(new[key], prefix + [key])
            else:
                paths += _changed_paths(old[key], new[key], prefix + [key])
        return paths
    return [] if old == new else [prefix]


def _lookup(config: Mapping[str, Any], key_path: list[str]) -> tuple[bool, Any]:
    node: Any = config
    for key in key_path:
        if not isinstance(node, Mapping) or key not in node:
            return False, None
        node = node[key]
    return True, node


class FakeNucleus:
    """Fake Greengrass nucleus IPC endpoint for one component.

    Args:
        socket_path: Unix socket to listen on (keep it under 108 bytes; use a dir in /tmp).
        svcuid: the auth token the component must present (its `SVCUID`).
        component_name: identity that token maps to; GetConfiguration defaults to it.
        config: the component's initial `configuration` namespace.
        other_configs: configurations of other components, readable (and subscribable) by name.
    """

    def __init__(
        self,
        socket_path: str,
        svcuid: str,
        component_name: str,
        config: Mapping[str, Any] | None = None,
        *,
        other_configs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        if len(os.fsencode(socket_path)) >= 108:
            raise ValueError(f"AF_UNIX path too long ({len(socket_path)} bytes): {socket_path}")
        self.socket_path = socket_path
        self.svcuid = svcuid
        self.component_name = component_name
        # Nucleus lite emulation (docs/greengrass.md): ggipcd refuses an unknown SVCUID by closing the socket
        # during the connect (no CONNECT_ACK), and accepts {"componentName": NAME} from a process in the
        # component's systemd unit (it checks the cgroup; here: names listed in accept_component_names).
        self.refuse_by_closing = False
        self.accept_component_names: set[str] = set()
        # operation -> seconds to hold each of its next answers (a nucleus that is slow to answer)
        self._delays: dict[str, list[float]] = {}

        self._cond = threading.Condition(threading.RLock())
        self._configs: dict[str, dict[str, Any]] = {
            name: copy.deepcopy(dict(cfg)) for name, cfg in (other_configs or {}).items()
        }
        self._configs[component_name] = copy.deepcopy(dict(config or {}))

        self._connections: dict[int, _Connection] = {}
        self._conn_ids = itertools.count(1)
        self._accepted_total = 0
        self._ping_count = 0

        self._requests: list[RecordedRequest] = []
        self._connect_attempts: list[ConnectAttempt] = []
        self._defer_requests: list[DeferRequest] = []
        self._state_updates: list[str] = []
        self._validity_reports: list[ValidityReport] = []
        self._sent_events: list[SentEvent] = []
        self._protocol_errors: list[str] = []
        # deploymentId -> report (None until the component answers the validate event)
        self._pending_validations: dict[str, ValidityReport | None] = {}
        # deploymentId -> True once acknowledged with a non-null recheckAfterMs
        self._pending_pre_updates: dict[str, bool] = {}
        # operation -> errors to answer its next requests with (fault injection)
        self._injected_errors: dict[str, list[IpcError]] = {}

        self._handlers: dict[str, Callable[[_Connection, _Stream], dict[str, Any]]] = {
            OP_GET_CONFIGURATION: self._op_get_configuration,
            OP_UPDATE_CONFIGURATION: self._op_update_configuration,
            OP_SUBSCRIBE_TO_CONFIGURATION_UPDATE: self._op_subscribe_to_configuration_update,
            OP_SUBSCRIBE_TO_VALIDATE_CONFIGURATION_UPDATES: self._op_subscribe_empty,
            OP_SEND_CONFIGURATION_VALIDITY_REPORT: self._op_send_configuration_validity_report,
            OP_SUBSCRIBE_TO_COMPONENT_UPDATES: self._op_subscribe_empty,
            OP_DEFER_COMPONENT_UPDATE: self._op_defer_component_update,
            OP_UPDATE_STATE: self._op_update_state,
        }

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 5.0) -> FakeNucleus:
        """Start listening; returns once the socket accepts connections."""
        if self._thread is not None:
            raise RuntimeError("FakeNucleus already started")
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)  # a stale socket file makes bind() fail
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="fake-gg-nucleus", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), loop).result(timeout)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close every connection and the listener, then end the loop thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            if not thread.is_alive():
                loop.close()
            self._loop = None
            self._thread = None
            if os.path.exists(self.socket_path):
                os.unlink(self.socket_path)

    def __enter__(self) -> FakeNucleus:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ observations (thread-safe)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._cond:
            return list(self._requests)

    def requests_for(self, operation: str) -> list[RecordedRequest]:
        with self._cond:
            return [r for r in self._requests if r.operation == operation]

    @property
    def connect_attempts(self) -> list[ConnectAttempt]:
        with self._cond:
            return list(self._connect_attempts)

    @property
    def defer_requests(self) -> list[DeferRequest]:
        with self._cond:
            return list(self._defer_requests)

    @property
    def state_updates(self) -> list[str]:
        with self._cond:
            return list(self._state_updates)

    @property
    def validity_reports(self) -> list[ValidityReport]:
        with self._cond:
            return list(self._validity_reports)

    def sent_events(self, operation: str | None = None) -> list[SentEvent]:
        """Stream events pushed so far, optionally only those of one subscription operation."""
        with self._cond:
            return [e for e in self._sent_events if operation is None or e.operation == operation]

    @property
    def protocol_errors(self) -> list[str]:
        with self._cond:
            return list(self._protocol_errors)

    @property
    def ping_count(self) -> int:
        with self._cond:
            return self._ping_count

    @property
    def connection_count(self) -> int:
        """Live connections that completed the handshake."""
        with self._cond:
            return sum(1 for c in self._connections.values() if c.component and not c.closed)

    @property
    def accepted_connection_total(self) -> int:
        """Handshakes accepted since start (grows on every client reconnect)."""
        with self._cond:
            return self._accepted_total

    def configuration(self, component_name: str | None = None) -> dict[str, Any]:
        """A deep copy of a component's current configuration (own component by default)."""
        with self._cond:
            return copy.deepcopy(self._configs[component_name or self.component_name])

    def subscriber_count(self, operation: str) -> int:
        with self._cond:
            return len(self._open_streams(operation))

    # ------------------------------------------------------------------ bounded waits

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Wait until `predicate()` holds (re-checked on every state change); False on timeout."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def wait_for_connections(self, count: int = 1, timeout: float = 5.0) -> None:
        if not self.wait_for(lambda: self.connection_count >= count, timeout):
            raise TimeoutError(f"{self.connection_count} live connections after {timeout}s, wanted {count}")

    def wait_for_accepted_total(self, total: int, timeout: float = 5.0) -> None:
        if not self.wait_for(lambda: self._accepted_total >= total, timeout):
            raise TimeoutError(f"{self._accepted_total} accepted handshakes after {timeout}s, wanted {total}")

    def wait_for_subscriber(self, operation: str, count: int = 1, timeout: float = 5.0) -> None:
        if not self.wait_for(lambda: len(self._open_streams(operation)) >= count, timeout):
            raise TimeoutError(f"no {count} open {operation} subscription(s) after {timeout}s")

    def wait_for_request(self, operation: str, count: int = 1, timeout: float = 5.0) -> list[RecordedRequest]:
        """Wait until `count` requests for `operation` were received; return all of them."""
        if not self.wait_for(lambda: len(self.requests_for(operation)) >= count, timeout):
            raise TimeoutError(f"fewer than {count} {operation} request(s) after {timeout}s")
        return self.requests_for(operation)

    # ------------------------------------------------------------------ nucleus-side actions

    def set_configuration(self, config: Mapping[str, Any], component_name: str | None = None) -> list[list[str]]:
        """Replace a component's configuration (as a deployment does) and notify subscribers.

        Returns the changed key paths, one ConfigurationUpdateEvent per path per subscriber.
        """
        component = component_name or self.component_name
        return self._in_loop(lambda: self._replace_config(component, copy.deepcopy(dict(config))))

    def propose_configuration(
        self,
        new_config: Mapping[str, Any],
        timeout: float = 5.0,
        *,
        deployment_id: str | None = None,
        require_validator: bool = True,
    ) -> tuple[str, str | None]:
        """Play the nucleus' dynamic configuration validation for the own component.

        Sends a ValidateConfigurationUpdateEvent with the whole proposed configuration and waits
        (bounded) for SendConfigurationValidityReport. Only an ACCEPTED configuration is applied,
        after which ConfigurationUpdateEvents go out. Returns (status, message).

        With no validation subscriber the nucleus applies the config unvalidated; that is what
        `require_validator=False` does (returning ("ACCEPTED", None)). By default the helper
        instead waits up to `timeout` for a subscriber, because a test usually means to
        exercise the component's validator. Raises TimeoutError if no subscriber or no report.
        """
        deployment_id = deployment_id or str(uuid.uuid4())
        proposed = copy.deepcopy(dict(new_config))
        deadline = _Deadline(timeout)
        op = OP_SUBSCRIBE_TO_VALIDATE_CONFIGURATION_UPDATES
        if require_validator:
            self.wait_for_subscriber(op, timeout=deadline.remaining())
        elif self.subscriber_count(op) == 0:
            self.set_configuration(proposed)
            return "ACCEPTED", None

        event = {"validateConfigurationUpdateEvent": {"configuration": proposed, "deploymentId": deployment_id}}

        def send() -> int:
            with self._cond:
                self._pending_validations[deployment_id] = None
            return self._send_event_to(op, event)

        if self._in_loop(send) == 0:
            with self._cond:
                self._pending_validations.pop(deployment_id, None)
            raise TimeoutError("validation subscriber went away before the event was sent")
        with self._cond:
            got = self._cond.wait_for(
                lambda: self._pending_validations.get(deployment_id) is not None, deadline.remaining()
            )
            report = self._pending_validations.pop(deployment_id, None)
        if not got or report is None:
            raise TimeoutError(f"no configuration validity report for {deployment_id} within {timeout}s")
        if report.status == "ACCEPTED":
            self.set_configuration(proposed)
        return report.status or "", report.message

    def send_pre_update(
        self,
        deployment_id: str,
        is_ggc_restarting: bool = False,
        timeout: float = 5.0,
    ) -> list[DeferRequest]:
        """Send PreComponentUpdateEvent to every component-update subscriber and wait for defers.

        Like `UpdateSystemPolicyService`, waits (bounded by `timeout`) until the component has
        answered with DeferComponentUpdate carrying a non-null recheckAfterMs; a defer without
        recheckAfterMs is ignored by the nucleus, so it does not end the wait here either.
        Returns the defers received for this deployment (possibly empty on timeout). A later
        defer for this deployment gets the nucleus' "Time limit ... exceeded" ServiceError.
        """
        event = {"preUpdateEvent": {"deploymentId": deployment_id, "isGgcRestarting": is_ggc_restarting}}

        def send() -> tuple[int, int]:
            with self._cond:
                self._pending_pre_updates[deployment_id] = False
                already = len(self._defer_requests)
            return self._send_event_to(OP_SUBSCRIBE_TO_COMPONENT_UPDATES, event), already

        notified, first_index = self._in_loop(send)
        with self._cond:
            if notified:
                self._cond.wait_for(lambda: self._pending_pre_updates.get(deployment_id, False), timeout)
            self._pending_pre_updates.pop(deployment_id, None)
            return [d for d in self._defer_requests[first_index:] if d.deployment_id == deployment_id]

    def send_post_update(self, deployment_id: str) -> int:
        """Send PostComponentUpdateEvent to every subscriber; returns how many were notified."""
        event = {"postUpdateEvent": {"deploymentId": deployment_id}}
        return self._in_loop(lambda: self._send_event_to(OP_SUBSCRIBE_TO_COMPONENT_UPDATES, event))

    def forget_svcuid(self, new_svcuid: str | None = None) -> None:
        """What a restart of lite's IPC daemon does: the token issued before is unknown from now on."""
        with self._cond:
            self.svcuid = new_svcuid or uuid.uuid4().hex[:16]

    def delay_responses(self, operation: str, seconds: float, *, times: int = 1) -> None:
        """Hold the answer to the next `times` requests for `operation` for `seconds` (the loop keeps serving)."""
        with self._cond:
            self._delays.setdefault(operation, []).extend(seconds for _ in range(times))

    def inject_error(
        self, operation: str, model_type: str = ERR_SERVICE, message: str = "Injected failure", *, times: int = 1
    ) -> None:
        """Answer the next `times` requests for `operation` with a modelled error instead.

        E.g. `inject_error(OP_SUBSCRIBE_TO_COMPONENT_UPDATES, ERR_UNAUTHORIZED, "...")` to test a
        component's retry or degrade path. The request is still recorded.
        """
        with self._cond:
            self._injected_errors.setdefault(operation, []).extend(IpcError(model_type, message) for _ in range(times))

    def close_subscriptions(self, operation: str | None = None) -> int:
        """Server-side close (empty TERMINATE_STREAM message) of open subscriptions."""

        def close() -> int:
            closed = 0
            with self._cond:
                for stream in self._open_streams(operation):
                    stream.conn.write(
                        es.rpc_message(
                            es.MessageType.APPLICATION_MESSAGE,
                            stream_id=stream.stream_id,
                            flags=es.MessageFlag.TERMINATE_STREAM,
                        )
                    )
                    self._close_stream(stream)
                    closed += 1
                self._cond.notify_all()
            return closed

        return self._in_loop(close)

    def disconnect_all(self) -> int:
        """Close every client connection from the server side; keeps listening for new ones."""

        def disconnect() -> int:
            with self._cond:
                conns = [c for c in self._connections.values() if not c.closed]
                for conn in conns:
                    self._drop_connection(conn)
                self._cond.notify_all()
            return len(conns)

        return self._in_loop(disconnect)

    # ------------------------------------------------------------------ loop-thread internals

    def _in_loop(self, fn: Callable[[], _T], timeout: float = 5.0) -> _T:
        loop = self._loop
        if loop is None:
            raise RuntimeError("FakeNucleus is not running")
        result: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(fn())
            except BaseException as exc:  # handed back to the calling thread
                result.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return result.result(timeout)

    async def _listen(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve_connection, path=self.socket_path)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        with self._cond:
            for conn in list(self._connections.values()):
                self._drop_connection(conn)
            self._cond.notify_all()
        # Closed transports feed EOF to the readers, so the connection tasks end by themselves;
        # cancelling them instead makes asyncio log the CancelledError from its done-callback.
        tasks = list(self._conn_tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        conn = _Connection(next(self._conn_ids), writer)
        with self._cond:
            self._connections[conn.conn_id] = conn
        try:
            if await self._handshake(conn, reader):
                while not conn.closed:
                    message = await self._read_message(reader)
                    if message is None:
                        break
                    self._handle_message(conn, message)
        except es.FrameError as exc:
            self._protocol_error(conn, str(exc))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away mid-frame
        finally:
            with self._cond:
                self._drop_connection(conn)
                self._connections.pop(conn.conn_id, None)
                self._cond.notify_all()
            self._conn_tasks.discard(task)

    @staticmethod
    async def _read_message(reader: asyncio.StreamReader) -> es.Message | None:
        try:
            prelude = await reader.readexactly(es.PRELUDE_LEN)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None  # clean EOF between frames
            raise
        total, _ = es.parse_prelude(prelude)
        rest = await reader.readexactly(total - es.PRELUDE_LEN)
        return es.decode_message(prelude + rest)

    async def _handshake(self, conn: _Connection, reader: asyncio.StreamReader) -> bool:
        message = await self._read_message(reader)
        if message is None:
            return False
        if message.message_type != es.MessageType.CONNECT or message.stream_id != 0:
            self._protocol_error(conn, f"first message was type {message.message_type}, not CONNECT")
            return False
        token: str | None = None
        name: str | None = None
        try:
            body = json.loads(message.payload.decode("utf-8") or "{}")
            token = body.get("authToken") if isinstance(body, dict) else None
            name = body.get("componentName") if isinstance(body, dict) else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
        version = message.header(es.HDR_VERSION)
        version_str = version if isinstance(version, str) else None
        with self._cond:
            known = (token is not None and token == self.svcuid) or (
                token is None and name is not None and name in self.accept_component_names)
        accepted = version_str == es.RPC_VERSION and known
        with self._cond:
            self._connect_attempts.append(ConnectAttempt(conn.conn_id, token, version_str, accepted, name))
            if accepted:
                conn.component = self.component_name
                self._accepted_total += 1
            self._cond.notify_all()
        if not accepted and self.refuse_by_closing:
            conn.closed = True
            conn.writer.close()  # lite: "failed authentication", the client sees AWS_IO_SOCKET_CLOSED
            return False
        conn.write(
            es.rpc_message(
                es.MessageType.CONNECT_ACK,
                flags=es.MessageFlag.CONNECTION_ACCEPTED if accepted else es.MessageFlag.NONE,
            )
        )
        if not accepted:
            # Let the client read the rejection and hang up itself (see _REJECT_LINGER_S).
            try:
                await asyncio.wait_for(reader.read(), _REJECT_LINGER_S)
            except (asyncio.TimeoutError, ConnectionError):
                pass
        return accepted

    def _protocol_error(self, conn: _Connection, reason: str) -> None:
        with self._cond:
            self._protocol_errors.append(reason)
            conn.write(
                es.rpc_message(
                    es.MessageType.PROTOCOL_ERROR,
                    headers=[es.Header.string(es.HDR_CONTENT_TYPE, es.CONTENT_TYPE_TEXT)],
                    payload=reason.encode(),
                )
            )
            self._drop_connection(conn)
            self._cond.notify_all()

    def _drop_connection(self, conn: _Connection) -> None:
        """Mark closed and close the transport; caller holds the lock, on the loop thread."""
        if conn.closed:
            return
        for stream in list(conn.streams.values()):
            self._close_stream(stream)
        conn.closed = True
        conn.writer.close()

    def _handle_message(self, conn: _Connection, message: es.Message) -> None:
        mtype = message.message_type
        if mtype == es.MessageType.PING:
            with self._cond:
                self._ping_count += 1
                self._cond.notify_all()
            echoed = [h for h in message.headers if not h.name.startswith(":")]
            conn.write(es.rpc_message(es.MessageType.PING_RESPONSE, headers=echoed, payload=message.payload))
        elif mtype == es.MessageType.PING_RESPONSE:
            pass
        elif mtype in (es.MessageType.APPLICATION_MESSAGE, es.MessageType.APPLICATION_ERROR) and message.stream_id > 0:
            self._handle_stream_message(conn, message)
        else:
            self._protocol_error(conn, f"unexpected message type {mtype} on stream {message.stream_id}")

    def _handle_stream_message(self, conn: _Connection, message: es.Message) -> None:
        stream = conn.streams.get(message.stream_id)
        if stream is not None:
            # No Greengrass operation streams requests, so a follow-up message can only be the
            # client closing its side (ClientOperation.close()).
            if message.flags & es.MessageFlag.TERMINATE_STREAM:
                with self._cond:
                    self._close_stream(stream)
                    self._cond.notify_all()
            return
        operation = message.header(es.HDR_OPERATION)
        if not isinstance(operation, str):
            self._protocol_error(conn, f"stream {message.stream_id} opened without an operation header")
            return
        model_type = message.header(es.HDR_SERVICE_MODEL_TYPE)
        try:
            payload = json.loads(message.payload.decode("utf-8") or "{}")
            if not isinstance(payload, dict):
                raise ValueError("request body is not a JSON object")
        except (UnicodeDecodeError, ValueError) as exc:
            payload = {}
            parse_error: Exception | None = exc
        else:
            parse_error = None
        stream = _Stream(conn, message.stream_id, operation, payload)
        streaming = operation in STREAM_EVENT_TYPES
        with self._cond:
            self._requests.append(
                RecordedRequest(
                    operation,
                    payload,
                    conn.conn_id,
                    message.stream_id,
                    model_type if isinstance(model_type, str) else None,
                )
            )
            if streaming:
                conn.streams[stream.stream_id] = stream
            self._cond.notify_all()
        try:
            if parse_error is not None:
                raise IpcError(ERR_SERVICE, f"Failed to deserialize request: {parse_error}")
            with self._cond:
                queued = self._injected_errors.get(operation)
                injected = queued.pop(0) if queued else None
            if injected is not None:
                raise injected
            handler = self._handlers.get(operation)
            if handler is None:
                # What the nucleus' DefaultOperationHandler answers for anything it doesn't serve.
                raise IpcError(ERR_SERVICE, f"Operation {operation} is not supported by Greengrass")
            response = handler(conn, stream)
        except IpcError as err:
            with self._cond:
                self._close_stream(stream)
                self._cond.notify_all()
            self._send_json(
                conn, stream.stream_id, es.MessageType.APPLICATION_ERROR, err.model_type, err.payload(), terminate=True
            )
            return
        with self._cond:
            held = self._delays.get(operation)
            delay = held.pop(0) if held else 0.0

        def answer() -> None:
            if conn.closed:
                return
            self._send_json(
                conn,
                stream.stream_id,
                es.MessageType.APPLICATION_MESSAGE,
                operation + "Response",
                response,
                terminate=not streaming,
            )
            with self._cond:
                stream.active = streaming
                self._cond.notify_all()

        if delay > 0 and self._loop is not None:
            self._loop.call_later(delay, answer)
        else:
            answer()

    @staticmethod
    def _send_json(
        conn: _Connection,
        stream_id: int,
        mtype: es.MessageType,
        model_type: str,
        body: Mapping[str, Any],
        *,
        terminate: bool,
    ) -> None:
        # An empty response must still be the JSON text "{}": the client json.loads() it.
        conn.write(
            es.rpc_message(
                mtype,
                stream_id=stream_id,
                flags=es.MessageFlag.TERMINATE_STREAM if terminate else es.MessageFlag.NONE,
                headers=[
                    es.Header.string(es.HDR_CONTENT_TYPE, es.CONTENT_TYPE_JSON),
                    es.Header.string(es.HDR_SERVICE_MODEL_TYPE, model_type),
                ],
                payload=json.dumps(body).encode("utf-8"),
            )
        )

    def _open_streams(self, operation: str | None) -> list[_Stream]:
        """Active subscriptions (optionally of one operation); caller holds the lock."""
        return [
            s
            for c in self._connections.values()
            if not c.closed
            for s in c.streams.values()
            if s.open and s.active and (operation is None or s.operation == operation)
        ]

    def _close_stream(self, stream: _Stream) -> None:
        stream.open = False
        stream.conn.streams.pop(stream.stream_id, None)

    def _send_event_to(
        self, operation: str, event: Mapping[str, Any], select: Callable[[_Stream], bool] | None = None
    ) -> int:
        """Push one stream event to matching subscribers (loop thread); returns how many."""
        with self._cond:
            targets = [s for s in self._open_streams(operation) if select is None or select(s)]
            self._sent_events += [
                SentEvent(operation, copy.deepcopy(dict(event)), s.conn.conn_id, s.stream_id) for s in targets
            ]
            self._cond.notify_all()
        for stream in targets:
            self._send_json(
                stream.conn,
                stream.stream_id,
                es.MessageType.APPLICATION_MESSAGE,
                STREAM_EVENT_TYPES[operation],
                event,
                terminate=False,
            )
        return len(targets)

    def _replace_config(self, component: str, new_config: dict[str, Any]) -> list[list[str]]:
        with self._cond:
            old = self._configs.get(component, {})
            self._configs[component] = new_config
            self._cond.notify_all()
        changed = _changed_paths(old, new_config)
        self._notify_config_changes(component, changed)
        return changed

    def _notify_config_changes(self, component: str, changed: list[list[str]]) -> None:
        for path in changed:
            event = {"configurationUpdateEvent": {"componentName": component, "keyPath": path}}
            self._send_event_to(
                OP_SUBSCRIBE_TO_CONFIGURATION_UPDATE,
                event,
                functools.partial(self._config_subscription_matches, component=component, path=path),
            )

    def _config_subscription_matches(self, stream: _Stream, component: str, path: list[str]) -> bool:
        wanted_component = stream.request.get("componentName") or stream.conn.component
        wanted_path = list(stream.request.get("keyPath") or [])
        return wanted_component == component and path[: len(wanted_path)] == wanted_path

    # ------------------------------------------------------------------ operation handlers

    def _op_get_configuration(self, conn: _Connection, stream: _Stream) -> dict[str, Any]:
        component = stream.request.get("componentName") or conn.component
        key_path = list(stream.request.get("keyPath") or [])
        with self._cond:
            config = self._configs.get(component or "")
            if config is None:
                raise IpcError(ERR_RESOURCE_NOT_FOUND, KEY_NOT_FOUND)
            found, node = _lookup(config, key_path)
            if not found:
                raise IpcError(ERR_RESOURCE_NOT_FOUND, KEY_NOT_FOUND)
            # The nucleus wraps a leaf as {leafName: value} and returns containers as they are.
            value = node if isinstance(node, dict) else {key_path[-1]: node}
            return {"componentName": component, "value": copy.deepcopy(value)}

    def _op_update_configuration(self, conn: _Connection, stream: _Stream) -> dict[str, Any]:
        request = stream.request
        if request.get("timestamp") is None:
            raise IpcError(ERR_INVALID_ARGUMENTS, "Timestamp is required")
        value = request.get("valueToMerge")
        if value is None:
            raise IpcError(ERR_INVALID_ARGUMENTS, "ValueToMerge is required")
        if request.get("componentName") not in (None, conn.component):
            raise IpcError(ERR_INVALID_ARGUMENTS, "Cross component updates are not allowed")
        key_path = list(request.get("keyPath") or [])
        touches_acl = (key_path[:1] == [ACCESS_CONTROL_KEY]) or (
            not key_path and isinstance(value, dict) and ACCESS_CONTROL_KEY in value
        )
        if touches_acl:
            raise IpcError(
                ERR_INVALID_ARGUMENTS, f"Config update is not allowed for following fields [{ACCESS_CONTROL_KEY}]"
            )
        component = conn.component or self.component_name
        with self._cond:
            new_config = copy.deepcopy(self._configs.get(component, {}))
            found, node = _lookup(new_config, key_path)
            if key_path and found and not isinstance(node, dict):
                # keyPath names a leaf: the nucleus merges {leaf: valueToMerge} into its parent.
                _, parent = _lookup(new_config, key_path[:-1])
                parent[key_path[-1]] = copy.deepcopy(value)
            else:
                if not isinstance(value, dict):
                    raise IpcError(ERR_INVALID_ARGUMENTS, "valueToMerge must be an object for a container node")
                target = new_config
                for key in key_path:  # create missing containers, like lookupTopics()
                    if not isinstance(target.get(key), dict):
                        target[key] = {}
                    target = target[key]
                _deep_merge(target, value)
        self._replace_config(component, new_config)
        return {}

    def _op_subscribe_to_configuration_update(self, conn: _Connection, stream: _Stream) -> dict[str, Any]:
        component = stream.request.get("componentName") or conn.component
        key_path = list(stream.request.get("keyPath") or [])
        with self._cond:
            config = self._configs.get(component or "")
            # The nucleus cannot watch a node that does not exist yet.
            if config is None or not _lookup(config, key_path)[0]:
                raise IpcError(ERR_RESOURCE_NOT_FOUND, KEY_NOT_FOUND)
        return {}

    def _op_subscribe_empty(self, conn: _Connection, stream: _Stream) -> dict[str, Any]:
        return {}

    def _op_send_configuration_validity_report(self, conn: _Connection, stream: _Stream) -> dict[str, Any]:
        report = stream.request.get("configurationValidityReport") or {}
        deployment_id = report.get("deploymentId")
        if deployment_id is None:
            raise IpcError(
                ERR_INVALID_ARGUMENTS,
                "Cannot accept configuration validity report, the deployment ID provided was null",
            )
        with self._cond:
            recorded = ValidityReport(deployment_id, report.get("status"), report.get("message"))
            self._validity_reports.append(recorded)
            if deployment_id not in self._pending_validations:
                raise IpcError(ERR_INVALID_ARGUMENTS, "Validation request either timed out or was never made")
            self._pending_validations[deployment_id] = recorded
            self._cond.notify_all()
        return {}

    def _op_defer_component_update(self, conn: _Connection, stream: _Stream) -> dict[str, Any]:
        request = stream.request
        deployment_id = request.get("deploymentId")
        recheck = request.get("recheckAfterMs")
        with self._cond:
            self._defer_requests.append(DeferRequest(deployment_id, request.get("message"), recheck, conn.conn_id))
            self._cond.notify_all()
            if not any(s.conn is conn for s in self._open_streams(OP_SUBSCRIBE_TO_COMPONENT_UPDATES)):
                raise IpcError(ERR_INVALID_ARGUMENTS, "Component is not subscribed to component update events")
            if deployment_id is None:
                raise IpcError(ERR_INVALID_ARGUMENTS, "Deployment ID is required")
            if deployment_id not in self._pending_pre_updates:
                raise IpcError(ERR_SERVICE, "Time limit to respond to PreComponentUpdateEvent exceeded")
            if recheck is not None:  # the nucleus ignores a defer without recheckAfterMs
                self._pending_pre_updates[deployment_id] = True
        return {}

    def _op_update_state(self, conn: _Connection, stream: _Stream) -> dict[str, Any]:
        state = stream.request.get("state")
        if state not in REPORTED_LIFECYCLE_STATES:
            raise IpcError(ERR_INVALID_ARGUMENTS, f"Invalid state {state!r}")
        with self._cond:
            self._state_updates.append(state)
            self._cond.notify_all()
        return {}


class _Deadline:
    """Splits one timeout across several consecutive waits."""

    def __init__(self, timeout: float) -> None:
        self._end = time.monotonic() + timeout

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())


def until(predicate: Callable[[], Any], timeout: float = 5.0) -> bool:
    """Poll predicate every 10 ms until it is true or timeout passes; its last value (the component tests' wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())
