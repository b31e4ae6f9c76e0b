"""What the agent needs from the Greengrass nucleus, and an adapter over awsiotsdk's IPC client.

`NucleusSession` is one live IPC connection, reduced to the operations the agent uses; the rest of
agent/greengrass depends only on it. `AwsNucleusSession` implements it over an injected
`GreengrassCoreIPCClientV2`; `aws_session_factory` connects one (with a lifecycle handler, so a
dropped connection is noticed: the client never reconnects by itself).

Every call is bounded by a timeout: the V2 client's synchronous methods wait forever, and a
nucleus that stops answering must not wedge a config apply or a deployment handshake.
"""

from __future__ import annotations

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


def aws_session_factory(socket_path: str, svcuid: str, *, connect_timeout_s: float = DEFAULT_TIMEOUT_S,
                        call_timeout_s: float = DEFAULT_TIMEOUT_S) -> SessionFactory:
    """A SessionFactory connecting awsiotsdk's client to the nucleus at socket_path with token svcuid."""

    def connect(on_lost: Callable[[], None]) -> NucleusSession:
        from awsiot.eventstreamrpc import LifecycleHandler
        from awsiot.greengrasscoreipc import connect as ipc_connect
        from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

        class Lifecycle(LifecycleHandler):  # type: ignore[misc]
            def on_disconnect(self, reason: Exception | None) -> None:
                if reason is not None:  # None = we closed it ourselves
                    on_lost()

        try:
            v1 = ipc_connect(ipc_socket=socket_path, authtoken=svcuid, lifecycle_handler=Lifecycle(),
                             timeout=connect_timeout_s)
        except Exception as exc:
            reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            raise NucleusError(f"cannot connect to the nucleus at {socket_path}: {reason}") from exc
        return AwsNucleusSession(GreengrassCoreIPCClientV2(client=v1), timeout_s=call_timeout_s)

    return connect
