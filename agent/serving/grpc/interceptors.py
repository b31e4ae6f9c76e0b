"""gRPC server interceptors: RPC counts and latency by method and status code (into AgentMetrics), and the
model log context of each call."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from agent.logs import model_context
from agent.serving.metrics import CURRENT_CALL, DETECT_METHOD, AgentMetrics, CallMark

#: The labels (grpc_service, grpc_method, grpc_type) of every call to a method the server does not have.
UNKNOWN_METHOD = ("unknown", "unknown", "unknown")


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every RPC (grpc_server_started/handled_total, grpc_server_handling_seconds) and sets the
    model log context from the request's model_component, if it has one.

    Aborted calls are counted with the code they were aborted with; an unexpected exception counts as
    UNKNOWN (what grpc sends); a method the server doesn't know counts as UNIMPLEMENTED, under the
    fixed labels UNKNOWN_METHOD (never the client's method name).
    """

    def __init__(self, metrics: AgentMetrics) -> None:
        self._m = metrics

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        method: str = details.method
        service, _, name = method.lstrip("/").rpartition("/")
        handler = continuation(details)
        if handler is None:
            # grpc answers UNIMPLEMENTED itself. The method name is whatever the client sent: as a
            # label value it would add a series per name, without bound (40,000 names made an 18.9 MB
            # /metrics). All unknown methods share one fixed label set; the known ones are a closed list.
            labels = UNKNOWN_METHOD
            self._m.grpc_started.labels(*labels).inc()
            self._m.grpc_handled.labels(*labels, grpc.StatusCode.UNIMPLEMENTED.name).inc()
            return None
        if handler.request_streaming and handler.response_streaming:
            kind, behavior, factory = "bidi_stream", handler.stream_stream, grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            kind, behavior, factory = "client_stream", handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            kind, behavior, factory = "server_stream", handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            kind, behavior, factory = "unary", handler.unary_unary, grpc.unary_unary_rpc_method_handler
        labels = (service, name, kind)
        if kind == "unary":
            wrapped = self._unary(behavior, labels, method == DETECT_METHOD)
        else:
            wrapped = self._streaming(behavior, labels)
        return factory(wrapped, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    def _unary(self, behavior: Callable[..., Any], labels: tuple[str, str, str], detect: bool) -> Callable[..., Any]:
        m = self._m

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            m.grpc_started.labels(*labels).inc()
            mark = CallMark() if detect else None
            token = CURRENT_CALL.set(mark)
            failed = False
            start = m._clock()
            try:
                with model_context(getattr(request, "model_component", "") or None):
                    return behavior(request, context)
            except Exception:
                failed = True
                raise
            finally:
                # Recorded before grpc sends the response, so a client that got its answer sees the count.
                elapsed = m._clock() - start
                CURRENT_CALL.reset(token)
                code = _code(context, failed)
                m.grpc_handled.labels(*labels, code).inc()
                m.grpc_handling.labels(*labels).observe(elapsed)
                if mark is not None and mark.model:
                    m.requests.labels(mark.model, mark.version, code).inc()
                    if code == "OK" and mark.ok:
                        m.request_duration.labels(mark.model, mark.version).observe(elapsed)

        return call

    def _streaming(self, behavior: Callable[..., Any], labels: tuple[str, str, str]) -> Callable[..., Any]:
        m = self._m

        def call(request: Any, context: grpc.ServicerContext, *callback: Any) -> Any:
            m.grpc_started.labels(*labels).inc()
            start = m._clock()
            # "failed": the handler raised; "finished": its response stream ran to the end. A stream
            # that terminates with neither, and no code set, was cancelled by the client (or by
            # shutdown) — always the case for health Watch in non-blocking mode.
            state = {"failed": False, "finished": False}

            def done() -> None:  # grpc calls this when the RPC terminates, however it ends
                code = _code(context, state["failed"])
                if code == "OK" and not state["finished"]:
                    code = grpc.StatusCode.CANCELLED.name
                m.grpc_handled.labels(*labels, code).inc()
                m.grpc_handling.labels(*labels).observe(m._clock() - start)

            context.add_callback(done)
            try:
                result = behavior(request, context, *callback)
            except Exception:
                state["failed"] = True
                raise
            if callback or result is None:
                return result
            return _guard(result, state)

        # Keep health Watch's non-blocking mode (it passes a send_response_callback instead of
        # occupying a worker thread per watcher); grpc looks for these attributes on the behavior.
        for attr in ("experimental_non_blocking", "experimental_thread_pool"):
            if hasattr(behavior, attr):
                setattr(call, attr, getattr(behavior, attr))
        return call


def _guard(responses: Iterable[Any], state: dict[str, bool]) -> Iterator[Any]:
    try:
        yield from responses
    except Exception:
        state["failed"] = True
        raise
    state["finished"] = True


def _code(context: grpc.ServicerContext, failed: bool) -> str:
    code = context.code()
    if code is None:
        return "UNKNOWN" if failed else "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)
