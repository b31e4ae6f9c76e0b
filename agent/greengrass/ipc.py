"""What the agent needs from the Greengrass nucleus, and an adapter over awsiotsdk's IPC client.

`NucleusSession` is one live IPC connection, reduced to the operations the agent uses; the rest of
agent/greengrass depends only on it. `AwsNucleusSession` implements it over an injected
`GreengrassCoreIPCClientV2`; `aws_session_factory` connects one (with a lifecycle handler, so a
dropped connection is noticed: the client never reconnects by itself).

Every call is bounded by a timeout: the V2 client's synchronous methods wait forever, and a
nucleus that stops answering must not wedge a config apply or a deployment handshake.

A failed connect says why (docs/greengrass.md, "IPC connection"): `NucleusUnavailable` when nobody
listens on the socket (the nucleus is down or restarting: wait), `IdentityRefused` when the IPC server is
up but refuses the component's identity. Nucleus lite keeps SVCUIDs only in memory, so after its IPC daemon
(ggipcd) restarts it disconnects every client presenting the old one during the connect. A process in the
component's unit can still authenticate by `componentName` (lite checks its cgroup), which the factory
tries once before giving up; `GreengrassComponent` counts what is still refused.
"""

from __future__ import annotations

import json
import logging
import threading
import typing  # runtime-evaluated aliases below: collections.abc generics need Python >= 3.9
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0

PreUpdateHandler = typing.Callable[[str, bool], None]  # (deployment_id, is_ggc_restarting)
PostUpdateHandler = typing.Callable[[str], None]  # (deployment_id)
ConfigChangedHandler = typing.Callable[[typing.List[str]], None]  # (key path of the changed node)
ValidateHandler = typing.Callable[[str, typing.Dict[str, Any]], None]  # (deployment_id, whole proposed configuration)
ClosedHandler = typing.Callable[[], None]


class NucleusError(Exception):
    """An IPC call failed (nucleus error, timeout or lost connection); `message` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(NucleusError):
    """The nucleus answered ResourceNotFoundError (unknown component or key)."""


class NucleusUnavailable(NucleusError):
    """Nobody accepts connections on the IPC socket (no socket file, connection refused, connect timeout)."""


class IdentityRefused(NucleusError):
    """The IPC server accepted the socket connection but refused the component's identity: lite closes the
    socket during the connect (its SVCUID is unknown, e.g. after a ggipcd restart), the classic nucleus
    answers a CONNECT_ACK without CONNECTION_ACCEPTED."""


#: awscrt error names of a socket nobody listens on (the nucleus is down or not started yet).
_UNAVAILABLE = {"AWS_IO_SOCKET_CONNECTION_REFUSED", "AWS_IO_FILE_VALIDATION_FAILURE", "AWS_IO_SOCKET_TIMEOUT",
                "AWS_ERROR_FILE_INVALID_PATH", "AWS_IO_SOCKET_INVALID_ADDRESS", "AWS_IO_NO_PERMISSION"}
#: ... and of a server that hung up during the connect handshake (lite refusing an identity).
_REFUSED = {"AWS_IO_SOCKET_CLOSED", "AWS_ERROR_IO_SOCKET_CLOSED", "AWS_IO_BROKEN_PIPE",
            "AWS_IO_SOCKET_NOT_CONNECTED"}


def classify_connect_error(exc: BaseException, where: str) -> NucleusError:
    """The NucleusError a failed connect stands for (see the module docstring)."""
    from awsiot.eventstreamrpc import AccessDeniedError

    reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    # AwsCrtError carries the name; some awscrt paths raise a RuntimeError("44 (AWS_ERROR_...): ...").
    name = getattr(exc, "name", "") or next((n for n in (*_REFUSED, *_UNAVAILABLE) if n in reason), "")
    if isinstance(exc, AccessDeniedError) or name in _REFUSED:
        return IdentityRefused(f"the nucleus at {where} refused the connection: {name or reason}")
    if name in _UNAVAILABLE or isinstance(exc, (TimeoutError, FileNotFoundError, ConnectionRefusedError)) or \
            type(exc).__name__ == "TimeoutError":
        return NucleusUnavailable(f"cannot connect to the nucleus at {where}: {name or reason}")
    return NucleusError(f"cannot connect to the nucleus at {where}: {name or reason}")


class NucleusSession(Protocol):
    """One connection to the nucleus. Handlers run on the client's executor threads (never on
    its event-loop thread), so they may call back into the session."""

    def get_configuration(self, component_name: str | None = None,
                          key_path: list[str] | None = None) -> dict[str, Any]: ...

    def subscribe_to_configuration_update(self, on_change: ConfigChangedHandler,
                                          on_closed: ClosedHandler) -> None: ...

    def subscribe_to_validate_configuration_updates(self, on_validate: ValidateHandler,
                                                    on_closed: ClosedHandler) -> None: ...

    def send_configuration_validity_report(self, deployment_id: str, accepted: bool, message: str) -> None: ...

    def subscribe_to_component_updates(self, on_pre: PreUpdateHandler, on_post: PostUpdateHandler,
                                       on_closed: ClosedHandler) -> None: ...

    def defer_component_update(self, deployment_id: str, recheck_after_ms: int, message: str) -> None: ...

    def close(self) -> None: ...


#: Connects a new session; the argument is called (once, from a client thread) when the connection drops.
SessionFactory = typing.Callable[[typing.Callable[[], None]], NucleusSession]


class AwsNucleusSession:
    """NucleusSession over awsiotsdk's GreengrassCoreIPCClientV2 (injected, owned: close() closes it)."""

    def __init__(self, client: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        from awsiot.greengrasscoreipc import model

        self._client = client
        self._model = model
        self._timeout_s = timeout_s
        self._operations: list[Any] = []  # open subscriptions, closed with the session

    def _wait(self, future: Any, what: str) -> Any:
        from awsiot.greengrasscoreipc.model import ResourceNotFoundError

        try:
            return future.result(self._timeout_s)
        except ResourceNotFoundError as exc:
            raise NotFound(f"{what}: {exc.message or 'not found'}") from exc
        except Exception as exc:  # GreengrassCoreIPCError, ConnectionClosedError, TimeoutError, ...
            # The SDK's error classes have an empty str(); `.message` carries the nucleus' reason.
            reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            raise NucleusError(f"{what} failed: {reason}") from exc

    def get_configuration(self, component_name: str | None = None,
                          key_path: list[str] | None = None) -> dict[str, Any]:
        future = self._client.get_configuration_async(component_name=component_name, key_path=key_path)
        response = self._wait(future, "GetConfiguration")
        return dict(response.value or {})

    def _subscribe(self, what: str, method: Callable[..., Any], on_event: Callable[[Any], None],
                   on_closed: ClosedHandler) -> None:
        def event(item: Any) -> None:
            try:
                on_event(item)
            except Exception:  # a handler bug must not kill the subscription (the SDK would print and go on)
                log.exception("%s event handler failed", what)

        def error(exc: Exception) -> bool:
            log.warning("%s stream error: %s", what, getattr(exc, "message", None) or exc)
            return True  # close the stream; on_closed then resubscribes

        # A subscription the nucleus refused also "closes"; only the end of an accepted one is a loss
        # (else a nucleus without the operation, e.g. Greengrass Lite, would cause endless reconnects).
        # The response completes on the event-loop thread before the close is handed to the executor.
        accepted = threading.Event()

        def closed() -> None:
            if accepted.is_set():
                on_closed()

        future, operation = method(on_stream_event=event, on_stream_error=error, on_stream_closed=closed)
        future.add_done_callback(lambda f: None if f.cancelled() or f.exception() else accepted.set())
        self._wait(future, what)
        self._operations.append(operation)

    def subscribe_to_configuration_update(self, on_change: ConfigChangedHandler, on_closed: ClosedHandler) -> None:
        def event(item: Any) -> None:
            update = item.configuration_update_event
            if update is not None:
                on_change(list(update.key_path or []))

        self._subscribe("SubscribeToConfigurationUpdate", self._client.subscribe_to_configuration_update_async,
                        event, on_closed)

    def subscribe_to_validate_configuration_updates(self, on_validate: ValidateHandler,
                                                    on_closed: ClosedHandler) -> None:
        def event(item: Any) -> None:
            proposal = item.validate_configuration_update_event
            if proposal is not None:
                on_validate(proposal.deployment_id or "", dict(proposal.configuration or {}))

        self._subscribe("SubscribeToValidateConfigurationUpdates",
                        self._client.subscribe_to_validate_configuration_updates_async, event, on_closed)

    def send_configuration_validity_report(self, deployment_id: str, accepted: bool, message: str) -> None:
        status = (self._model.ConfigurationValidityStatus.ACCEPTED if accepted
                  else self._model.ConfigurationValidityStatus.REJECTED)
        report = self._model.ConfigurationValidityReport(status=status, deployment_id=deployment_id,
                                                         message=message or None)
        self._wait(self._client.send_configuration_validity_report_async(configuration_validity_report=report),
                   "SendConfigurationValidityReport")

    def subscribe_to_component_updates(self, on_pre: PreUpdateHandler, on_post: PostUpdateHandler,
                                       on_closed: ClosedHandler) -> None:
        def event(item: Any) -> None:
            if item.pre_update_event is not None:
                pre = item.pre_update_event
                on_pre(pre.deployment_id or "", bool(pre.is_ggc_restarting))
            elif item.post_update_event is not None:
                on_post(item.post_update_event.deployment_id or "")

        self._subscribe("SubscribeToComponentUpdates", self._client.subscribe_to_component_updates_async,
                        event, on_closed)

    def defer_component_update(self, deployment_id: str, recheck_after_ms: int, message: str) -> None:
        future = self._client.defer_component_update_async(deployment_id=deployment_id, message=message or None,
                                                           recheck_after_ms=recheck_after_ms)
        self._wait(future, "DeferComponentUpdate")

    def close(self) -> None:
        # Close the connection first and wait (bounded) for it: the SDK hands the streams' "closed"
        # callbacks to the executor, which V2Client.close() would already have shut down (noisy errors).
        try:
            self._client.client.close().result(self._timeout_s)
        except Exception as exc:  # already closed (lost connection), or the close itself failed
            log.debug("closing the IPC connection: %s", exc)
        self._operations.clear()
        executor = getattr(self._client, "executor", None)
        if executor is not None:
            executor.shutdown(wait=False)  # may run on one of its own threads: don't wait for itself


def aws_session_factory(socket_path: str, svcuid: str, *, component_name: str = "",
                        connect_timeout_s: float = DEFAULT_TIMEOUT_S,
                        call_timeout_s: float = DEFAULT_TIMEOUT_S) -> SessionFactory:
    """A SessionFactory connecting awsiotsdk's client to the nucleus at socket_path with token svcuid; when
    the token is refused and component_name is given, once more as `{"componentName": component_name}`."""

    def attempt(on_lost: Callable[[], None], payload: dict[str, str]) -> NucleusSession:
        from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup, SocketDomain, SocketOptions
        from awsiot.eventstreamrpc import Connection, LifecycleHandler, MessageAmendment
        from awsiot.greengrasscoreipc.client import GreengrassCoreIPCClient
        from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

        class Lifecycle(LifecycleHandler):  # type: ignore[misc]
            def on_disconnect(self, reason: Exception | None) -> None:
                if reason is not None:  # None = we closed it ourselves
                    on_lost()

        # What awsiot.greengrasscoreipc.connect() does, with the connect payload ours to choose.
        elg = EventLoopGroup(num_threads=1)
        options = SocketOptions()
        options.domain = SocketDomain.Local
        body = json.dumps(payload).encode()
        bootstrap = ClientBootstrap(elg, DefaultHostResolver(elg))
        connection = Connection(host_name=socket_path, port=0, bootstrap=bootstrap, socket_options=options,
                                connect_message_amender=lambda: MessageAmendment(payload=body))
        try:
            connection.connect(Lifecycle()).result(connect_timeout_s)
        except BaseException as exc:
            connection.close()
            if not isinstance(exc, Exception):
                raise
            raise classify_connect_error(exc, socket_path) from exc
        return AwsNucleusSession(GreengrassCoreIPCClientV2(client=GreengrassCoreIPCClient(connection)),
                                 timeout_s=call_timeout_s)

    by_token, by_name = {"authToken": svcuid}, {"componentName": component_name}
    # Once the token was refused and the name accepted, the token stays unknown to this nucleus: try the name
    # first from then on (fewer refused connects, less noise at every later reconnect).
    order = [by_token, by_name]

    def connect(on_lost: Callable[[], None]) -> NucleusSession:
        first, second = order
        try:
            return attempt(on_lost, first)
        except IdentityRefused as exc:
            if not component_name:
                raise
            log.info("%s; connecting %s instead", exc.message,
                     f"as component {component_name} (nucleus lite forgets SVCUIDs when its IPC server restarts)"
                     if second is by_name else "with the SVCUID")
        session = attempt(on_lost, second)
        order.reverse()
        if second is by_name:
            log.warning("Greengrass IPC: the nucleus no longer knew this component's SVCUID; connected as "
                        "component %s", component_name)
        return session

    return connect


def unit_component_name(cgroup_text: str) -> str:
    """The component nucleus lite runs this process for, from /proc/self/cgroup (its systemd unit is
    ggl.<Name>.service, .install.service or .bootstrap.service); '' if none."""
    import re

    for line in cgroup_text.splitlines():
        match = re.search(r"/ggl\.(.+?)(?:\.install|\.bootstrap)?\.service(?:/|$)", line)
        if match:
            return match.group(1)
    return ""
