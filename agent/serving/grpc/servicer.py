"""A thin servicer: protobuf ⇄ core dataclasses, AgentError → gRPC status. No logic of its own."""

from __future__ import annotations

import functools
import logging
import typing  # runtime-evaluated aliases below: collections.abc generics need Python >= 3.9
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from agent.core.frames import ShmHandle
from agent.core.inference import DetectRequest, InferenceService
from agent.core.lifecycle import ModelInfo, ModelRegistry
from agent.core.pipeline import Detection
from agent.errors import AgentError, InvalidInput
from agent.serving.grpc._generated import edge_agent_pb2 as pb
from agent.serving.grpc._generated import edge_agent_pb2_grpc as pb_grpc
from agent.serving.grpc.guard import Undecodable, abort_undecodable, tolerant
from agent.serving.grpc.status import grpc_status
from agent.serving.grpc.wire import (
    DetectRequestView,
    InlineMaskResponse,
    decode_detect_request,
    serialize_detect_response,
)

log = logging.getLogger(__name__)
Handler = TypeVar("Handler", bound=typing.Callable[..., Any])


def _rpc(method: Handler) -> Handler:
    """Map AgentError to its status; anything unexpected becomes INTERNAL and is logged, never a crash."""

    @functools.wraps(method)
    def wrapper(self: EdgeAgentServicer, request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            abort_undecodable(request, context)
        try:
            return method(self, request, context)
        except AgentError as exc:
            context.abort(grpc_status(exc.code), exc.message)
        except Exception as exc:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}: {type(exc).__name__}")

    return wrapper  # type: ignore[return-value]


def _handle(msg: pb.SharedMemoryHandle, what: str) -> ShmHandle:
    if not msg.name:
        raise InvalidInput(f"{what} shared_memory_handle has no name")
    return ShmHandle(msg.name, int(msg.size), int(msg.offset))


def to_request(request: pb.DetectAnomaliesRequest | DetectRequestView) -> DetectRequest:
    data: bytes | memoryview | None = None
    shm = mask_shm = None
    if isinstance(request, DetectRequestView):  # byte_data located in the received bytes (wire.py)
        data, request = request.byte_data, request.message
    bitmap = request.bitmap
    which = bitmap.WhichOneof("data")  # None for a DetectRequestView's message
    if which == "byte_data":
        data = bitmap.byte_data
    elif which == "shared_memory_handle":
        shm = _handle(bitmap.shared_memory_handle, "bitmap")
    params = request.anomaly_mask_params
    if params.HasField("shared_memory_handle"):
        mask_shm = _handle(params.shared_memory_handle, "anomaly_mask_params")
    elif params.HasField("shared_memory_handle_draft"):
        mask_shm = _handle(params.shared_memory_handle_draft, "anomaly_mask_params")
    return DetectRequest(request.model_component, bitmap.width, bitmap.height, data, shm, mask_shm)


def to_response(detection: Detection, mask_shm: ShmHandle | None) -> pb.DetectAnomaliesResponse | InlineMaskResponse:
    """The DetectAnomalies response. An inline mask stays out of the protobuf message (wire.py says why)."""
    response = pb.DetectAnomaliesResponse()
    result = response.detect_anomaly_result  # filled in place: a separate message would be copied
    result.is_anomalous = detection.is_anomalous
    result.confidence = detection.confidence
    result.anomaly_score = detection.score
    result.anomaly_threshold = detection.threshold
    for anomaly in detection.anomalies:  # listed even when the mask policy leaves the inline mask out
        result.anomalies.add(name=anomaly.name, pixel_anomaly=pb.PixelAnomaly(
            total_percentage_area=anomaly.area, hex_color=anomaly.color))
    if not detection.has_mask:
        return response
    if mask_shm is None and detection.mask is not None:
        return InlineMaskResponse(response, detection.mask, detection.mask_width, detection.mask_height)
    mask = result.anomaly_mask
    mask.width, mask.height = detection.mask_width, detection.mask_height
    if mask_shm is not None:
        mask.shared_memory_handle.name = mask_shm.name
        mask.shared_memory_handle.size = detection.mask_width * detection.mask_height * 3
        mask.shared_memory_handle.offset = mask_shm.offset
    return response


def _metadata(info: ModelInfo, cls: type) -> Any:
    return cls(model_component=info.name, lookout_vision_model_arn=info.arn, status=info.status.name,
               status_message=info.status_message)


class EdgeAgentServicer(pb_grpc.EdgeAgentServicer):
    def __init__(self, registry: ModelRegistry, inference: InferenceService) -> None:
        self.registry = registry
        self.inference = inference

    @_rpc
    def DetectAnomalies(self, request: pb.DetectAnomaliesRequest, context: grpc.ServicerContext) -> Any:
        req = to_request(request)
        return to_response(self.inference.detect(req, context), req.mask_shm)

    @_rpc
    def StartModel(self, request: pb.StartModelRequest, context: grpc.ServicerContext) -> Any:
        return pb.StartModelResponse(status=self.registry.start(_name(request.model_component)).name)

    @_rpc
    def StopModel(self, request: pb.StopModelRequest, context: grpc.ServicerContext) -> Any:
        return pb.StopModelResponse(status=self.registry.stop(_name(request.model_component)).name)

    @_rpc
    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> Any:
        return pb.ListModelsResponse(models=[_metadata(i, pb.ModelMetadata) for i in self.registry.models()])

    @_rpc
    def DescribeModel(self, request: pb.DescribeModelRequest, context: grpc.ServicerContext) -> Any:
        info = self.registry.describe(_name(request.model_component))
        return pb.DescribeModelResponse(model_description=_metadata(info, pb.ModelDescription))


def add_to_server(servicer: EdgeAgentServicer, server: grpc.Server) -> None:
    """The generated add_EdgeAgentServicer_to_server, except that DetectAnomalies' responses go through
    serialize_detect_response (so an InlineMaskResponse can be returned), and that request bodies that don't
    decode become INVALID_ARGUMENT (guard.py says why). Same service, methods, types."""
    def unary(method: Callable[..., Any], request: Any, serialize: Callable[[Any], bytes],
              deserialize: Callable[[bytes], Any] | None = None) -> grpc.RpcMethodHandler:
        decode = tolerant(deserialize or request.FromString, request.DESCRIPTOR.full_name)
        return grpc.unary_unary_rpc_method_handler(method, request_deserializer=decode,
                                                   response_serializer=serialize)

    handlers = {
        "DetectAnomalies": unary(servicer.DetectAnomalies, pb.DetectAnomaliesRequest, serialize_detect_response,
                                 decode_detect_request),
        "StartModel": unary(servicer.StartModel, pb.StartModelRequest, pb.StartModelResponse.SerializeToString),
        "StopModel": unary(servicer.StopModel, pb.StopModelRequest, pb.StopModelResponse.SerializeToString),
        "ListModels": unary(servicer.ListModels, pb.ListModelsRequest, pb.ListModelsResponse.SerializeToString),
        "DescribeModel": unary(servicer.DescribeModel, pb.DescribeModelRequest,
                               pb.DescribeModelResponse.SerializeToString),
    }
    service = pb.DESCRIPTOR.services_by_name["EdgeAgent"]
    assert set(handlers) == {m.name for m in service.methods}, "a method of the proto has no handler"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.63: dispatch without a generic lookup
        server.add_registered_method_handlers(service.full_name, handlers)


def _name(name: str) -> str:
    if not name:
        raise InvalidInput("model_component is empty")
    return name
