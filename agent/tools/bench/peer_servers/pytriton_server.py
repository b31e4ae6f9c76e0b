"""Serve the agent's Predictor with Triton Inference Server 2.51 through PyTriton (V2 gRPC on 127.0.0.1).

Run with PyTriton's virtualenv, this source tree on PYTHONPATH and LD_LIBRARY_PATH starting with the
interpreter's libdir (agent.tools.bench.peers sets all three): PyTriton's bundled python-backend stub otherwise
loads the system's libpython of the same minor version (triton-inference-server/pytriton#51).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from agent.tools.bench.peer_servers.common import INPUT, infer, load_predictors


def callable_for(predictor: Any) -> Any:
    def infer_func(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        return [infer(predictor, request[INPUT]) for request in requests]

    return infer_func


def main() -> None:
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    p = argparse.ArgumentParser()
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--workspace", type=Path, required=True)
    args = p.parse_args()
    config = TritonConfig(http_address="127.0.0.1", http_port=args.http_port, grpc_address="127.0.0.1",
                          grpc_port=args.grpc_port, metrics_address="127.0.0.1", metrics_port=args.metrics_port)
    predictors = load_predictors()
    with Triton(config=config, workspace=args.workspace) as triton:
        for name, predictor in predictors.items():
            triton.bind(model_name=name, infer_func=callable_for(predictor),
                        inputs=[Tensor(name=INPUT, dtype=np.uint8, shape=(-1, -1, 3))],
                        outputs=[Tensor(name="score", dtype=np.float32, shape=(1,)),
                                 Tensor(name="is_anomalous", dtype=np.bool_, shape=(1,)),
                                 Tensor(name="mask", dtype=np.uint8, shape=(-1, -1, 3))],
                        config=ModelConfig(batching=False))
        triton.serve()


if __name__ == "__main__":
    main()
