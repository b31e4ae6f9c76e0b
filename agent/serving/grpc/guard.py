"""RequestGuard: the server's innermost interceptor, for every service on the socket (LFV API, health,
reflection). Two jobs:

* Request bodies that don't decode. grpcio answers a request deserializer that raises with INTERNAL
  ("Exception deserializing request!"), logs a traceback, and leaks ~19 KB per call inside the C core.
  Every deserializer is wrapped so that it never raises: it returns an `Undecodable` marker instead,
  and the handler answers INVALID_ARGUMENT saying what could not be decoded. Nothing leaks.
* Knowing when the server is quiet, so shutdown can wait for requests that already arrived
  (`quiesce()`) before grpc's stop() drops the calls it had not handed to the application yet.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc


class Undecodable:
    """What a tolerant deserializer returns for a body that isn't a valid message of its type."""

    __slots__ = ("type_name", "error", "size")

    def __init__(self, type_name: str, error: str, size: int) -> None:
        self.type_name = type_name
        self.error = error
        self.size = size

    @property
    def message(self) -> str:
        return (f"the request body ({self.size} bytes) is not a valid {self.type_name}: {self.error}. "
                "Check that string fields (e.g. model_component) are valid UTF-8 and that the client "
                "uses this service's .proto")


def tolerant(deserializer: Callable[[bytes], Any] | None, type_name: str = "") -> Callable[[bytes], Any] | None:
    """A deserializer that never raises (idempotent: a tolerant one is returned as it is)."""
    if deserializer is None or getattr(deserializer, "_tolerant", False):
        return deserializer
    name = type_name or _type_name(deserializer)

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a custom deserializer raises
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return Undecodable(name, detail, len(data))

    decode._tolerant = True  # type: ignore[attr-defined]
    return decode


def _type_name(deserializer: Callable[[bytes], Any]) -> str:
    owner = getattr(deserializer, "__self__", None)  # Message.FromString is bound to the message class
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "") or "request message"


def abort_undecodable(request: Undecodable, context: grpc.ServicerContext) -> None:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


class RequestGuard(grpc.ServerInterceptor):
    """Tolerant deserializers for every method, and a count of unary calls being handled."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._inflight = 0
        self._last_arrival = clock()

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        with self._cond:
            # Called by grpc's polling thread when a call is matched to a method: it has arrived.
            self._last_arrival = self._clock()
        handler = continuation(details)
        if handler is None:
            return None
        decode = tolerant(handler.request_deserializer)
        serialize = handler.response_serializer
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(_streaming(handler.stream_stream), decode, serialize)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(_streaming(handler.stream_unary), decode, serialize)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(_unary(handler.unary_stream), decode, serialize)
        return grpc.unary_unary_rpc_method_handler(self._counted(_unary(handler.unary_unary)), decode, serialize)

    def _counted(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            with self._cond:
                self._inflight += 1
            try:
                return behavior(request, context)
            finally:
                with self._cond:
                    self._inflight -= 1
                    self._cond.notify_all()

        return call

    @property
    def inflight(self) -> int:
        with self._cond:
            return self._inflight

    def quiesce(self, timeout: float, quiet_s: float = 0.1) -> bool:
        """Wait until no unary call is being handled and none arrived for quiet_s; False on timeout."""
        deadline = self._clock() + timeout
        with self._cond:
            while True:
                now = self._clock()
                calm = self._inflight == 0 and now - self._last_arrival >= quiet_s
                if calm:
                    return True
                if now >= deadline:
                    return False
                wake = deadline if self._inflight else min(deadline, self._last_arrival + quiet_s)
                self._cond.wait(max(wake - now, 0.001))


def _unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    def call(request: Any, context: grpc.ServicerContext, *rest: Any) -> Any:
        if isinstance(request, Undecodable):
            abort_undecodable(request, context)
        return behavior(request, context, *rest)

    _keep_attributes(behavior, call)
    return call


def _streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
    def call(requests: Iterator[Any], context: grpc.ServicerContext, *rest: Any) -> Any:
        def checked() -> Iterator[Any]:
            for request in requests:
                if isinstance(request, Undecodable):
                    abort_undecodable(request, context)
                yield request

        return behavior(checked(), context, *rest)

    _keep_attributes(behavior, call)
    return call


def _keep_attributes(behavior: Callable[..., Any], call: Callable[..., Any]) -> None:
    # Health Watch runs in grpc's non-blocking mode (a callback instead of a worker per watcher);
    # grpc looks for these attributes on the behavior, so they must survive the wrapping.
    for attr in ("experimental_non_blocking", "experimental_thread_pool"):
        if hasattr(behavior, attr):
            setattr(call, attr, getattr(behavior, attr))
