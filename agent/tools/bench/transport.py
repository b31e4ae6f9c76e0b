"""The benchmark's transport reference: the agent's gRPC server with no model behind it.

`python -m agent.tools.bench.transport --socket unix:///path` serves the EdgeAgent service with the agent's own
server set-up (`build_server`: options, worker threads) and response serialiser, but DetectAnomalies only
parses the request and answers with a canned result of the same size: for byte_data requests an inline mask
of the size the agent's InlineMask policy gives that frame (the same EDGE_AGENT_INLINE_* settings apply),
the mask handle for shared-memory ones. No model, validation, metrics or
shared-memory access. What a request costs here is what grpcio alone costs on this machine, so
`edge-agent bench` can show how much of the agent's overhead is transport and how much is the agent's own
(docs/benchmarks.md, "grpcio bound").
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import Any

import grpc
import numpy as np

from agent.app import mask_policy
from agent.config import AgentConfig
from agent.core.masks import MaskPolicy
from agent.runtime.memory import tune_malloc
from agent.serving.grpc._generated import edge_agent_pb2 as pb
from agent.serving.grpc.server import build_server
from agent.serving.grpc.servicer import EdgeAgentServicer, add_to_server
from agent.serving.grpc.wire import DetectRequestView, InlineMaskResponse


class TransportOnlyServicer(EdgeAgentServicer):
    """DetectAnomalies answers without a model; the other methods are the base class's (unused)."""

    #: The benchmark models' class names (background and one anomaly class): the inline mask's size budget.
    NAMES = ["background", "anomaly"]

    def __init__(self, policy: MaskPolicy) -> None:
        self._policy = policy
        self._masks: dict[tuple[int, int], np.ndarray] = {}

    def DetectAnomalies(self, request: pb.DetectAnomaliesRequest | DetectRequestView,  # noqa: N802
                        context: grpc.ServicerContext) -> Any:
        # The agent's own request decoder (add_to_server): byte_data arrives as a view of the received bytes.
        inline = isinstance(request, DetectRequestView)
        message = request.message if isinstance(request, DetectRequestView) else request
        bitmap = message.bitmap
        width, height = bitmap.width, bitmap.height
        response = pb.DetectAnomaliesResponse()
        result = response.detect_anomaly_result
        result.anomaly_score, result.anomaly_threshold, result.confidence = 0.1, 0.5, 0.9
        if inline or bitmap.WhichOneof("data") == "byte_data":
            _ = request.byte_data if isinstance(request, DetectRequestView) else bitmap.byte_data  # as the agent
            size = self._policy.inline_size(width, height, True, self.NAMES)
            if size is None:
                return response
            mask = self._masks.get(size)
            if mask is None:
                mask = self._masks[size] = np.zeros((size[1], size[0], 3), dtype=np.uint8)
            return InlineMaskResponse(response, mask, *size)
        handle = result.anomaly_mask.shared_memory_handle
        handle.CopyFrom(message.anomaly_mask_params.shared_memory_handle)
        result.anomaly_mask.width, result.anomaly_mask.height = width, height
        return response


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.tools.bench.transport", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="unix:///absolute/path.sock")
    args = parser.parse_args(argv)
    config = AgentConfig.from_sources(cli={"socket": args.socket}, env=os.environ)
    tune_malloc(config.malloc_mmap_threshold_mb)  # as `edge-agent serve` does
    server = build_server(config)
    add_to_server(TransportOnlyServicer(mask_policy(config)), server)
    server.add_insecure_port(config.socket)
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
