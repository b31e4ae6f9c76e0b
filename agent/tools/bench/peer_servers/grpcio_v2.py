"""A hand-written V2 ModelInfer server on plain grpcio: the reference row of scripts/bench-peers.

What a minimal server costs with the same wire as the peers (V2 raw tensors) and the same Predictor: grpcio's
generic handlers, a thread pool, `np.frombuffer` in and `tobytes()` out; no model repository, metrics, health or
admission. Runs in the agent's own virtualenv (it needs grpcio and protobuf, which the peers' virtualenvs
bring in other versions) on a Unix socket.
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures
from typing import Any

import grpc
import numpy as np

from agent.tools.bench.peer_servers.common import INPUT, infer, load_predictors

DATATYPES = {"float32": "FP32", "bool": "BOOL", "uint8": "UINT8"}


class V2Servicer:
    """ModelInfer for every predictor by model name; other V2 methods are not served."""

    def __init__(self, predictors: dict[str, Any]) -> None:
        from agent.tools.bench.peers import v2_messages

        self.predictors = predictors
        self.request_cls, self.response_cls = v2_messages()

    def outputs(self, model: str, frame: np.ndarray) -> dict[str, np.ndarray]:
        return infer(self.predictors[model], frame)

    def infer(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.model_name not in self.predictors:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model_name!r}")
        if len(request.inputs) != 1 or request.inputs[0].name != INPUT or request.inputs[0].datatype != "UINT8" \
                or len(request.raw_input_contents) != 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"expected one raw UINT8 input {INPUT!r} [H, W, 3]")
        shape = tuple(request.inputs[0].shape)
        raw = request.raw_input_contents[0]
        if len(shape) != 3 or shape[2] != 3 or int(np.prod(shape)) != len(raw):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"shape {list(shape)} does not match {len(raw)} bytes")
        response = self.response_cls(model_name=request.model_name, id=request.id)
        for name, array in self.outputs(request.model_name, np.frombuffer(raw, np.uint8).reshape(shape)).items():
            response.outputs.add(name=name, datatype=DATATYPES[str(array.dtype)], shape=list(array.shape))
            response.raw_output_contents.append(array.tobytes())
        return response

    def handler(self) -> grpc.GenericRpcHandler:
        from agent.tools.bench.peers import V2_SERVICE

        method = grpc.unary_unary_rpc_method_handler(self.infer, request_deserializer=self.request_cls.FromString,
                                                     response_serializer=lambda m: m.SerializeToString())
        return grpc.method_handlers_generic_handler(V2_SERVICE, {"ModelInfer": method})


def serve(servicer: V2Servicer, address: str, workers: int = 4) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(workers))
    server.add_generic_rpc_handlers((servicer.handler(),))
    server.add_insecure_port(address)
    server.start()
    return server


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True, help="unix:///path/to.sock")
    args = p.parse_args()
    server = serve(V2Servicer(load_predictors()), args.address)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(2).wait()


if __name__ == "__main__":
    main()
