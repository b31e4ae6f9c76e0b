"""Serve the agent's Predictor with KServe's ModelServer (V2 gRPC on 127.0.0.1:--grpc-port).

Run with KServe's virtualenv and this source tree on PYTHONPATH (agent.tools.bench.peers does both).
KServe 0.21 hard-codes its bind addresses (REST `host="0.0.0.0"` in kserve/protocol/rest/server.py, gRPC
`[::]:port` in kserve/protocol/grpc/server.py); only loopback traffic is allowed here, so both are rewritten
to 127.0.0.1 before the servers start.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agent.tools.bench.peer_servers.common import infer, load_predictors

_DATATYPES = {"float32": "FP32", "bool": "BOOL", "uint8": "UINT8"}


def patch_bind_addresses(host: str = "127.0.0.1") -> None:
    import kserve.protocol.grpc.server as grpc_server
    import kserve.protocol.rest.server as rest_server

    rest_init = rest_server.RESTServer.__init__

    def rest_on_host(self: Any, *args: Any, **kwargs: Any) -> None:
        rest_init(self, *args, **kwargs)
        self.config.host = host  # the uvicorn.Config its _RefreshingServer also holds

    rest_server.RESTServer.__init__ = rest_on_host  # type: ignore[method-assign]
    make_server = grpc_server.aio.server

    def server_on_host(*args: Any, **kwargs: Any) -> Any:
        server = make_server(*args, **kwargs)
        add_port = server.add_insecure_port
        server.add_insecure_port = lambda address: add_port(f"{host}:{address.rsplit(':', 1)[1]}")
        return server

    grpc_server.aio = _AioWith(grpc_server.aio, server_on_host)


class _AioWith:
    """grpc.aio as kserve's grpc server module sees it, with `server` replaced (the real module stays as is)."""

    def __init__(self, aio: Any, server: Any) -> None:
        self._aio = aio
        self.server = server

    def __getattr__(self, name: str) -> Any:
        return getattr(self._aio, name)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    args = p.parse_args()
    sys.argv = sys.argv[:1]  # kserve parses sys.argv when imported
    import kserve
    from kserve import InferOutput, InferRequest, InferResponse

    patch_bind_addresses()

    class PredictorModel(kserve.Model):  # type: ignore[misc]
        def __init__(self, name: str, predictor: Any) -> None:
            super().__init__(name)
            self.predictor = predictor
            self.ready = True

        def predict(self, payload: InferRequest, headers: Any = None, response_headers: Any = None) -> Any:
            outputs = []
            for name, array in infer(self.predictor, payload.inputs[0].as_numpy()).items():
                out = InferOutput(name=name, shape=list(array.shape), datatype=_DATATYPES[str(array.dtype)])
                out.set_data_from_numpy(array, binary_data=True)
                outputs.append(out)
            return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs)

    models = [PredictorModel(name, predictor) for name, predictor in load_predictors().items()]
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port).start(models)


if __name__ == "__main__":
    main()
