"""The hand-assembled DetectAnomalies response (agent/serving/grpc/wire.py) parses to exactly the message
protobuf itself would build, for the shapes a mask can have."""

from __future__ import annotations

import numpy as np
import pytest

from agent.core.pipeline import Anomaly, Detection
from agent.serving.grpc._generated import edge_agent_pb2 as pb
from agent.serving.grpc.servicer import to_response
from agent.serving.grpc.wire import (
    DetectRequestView,
    InlineMaskResponse,
    _header,
    decode_detect_request,
    serialize_detect_response,
)


def _reference(detection: Detection) -> pb.DetectAnomaliesResponse:
    """What the response is, built the plain protobuf way."""
    assert detection.mask is not None
    result = pb.DetectAnomalyResult(
        is_anomalous=detection.is_anomalous, confidence=detection.confidence, anomaly_score=detection.score,
        anomaly_threshold=detection.threshold,
        anomaly_mask=pb.Bitmap(width=detection.mask_width, height=detection.mask_height,
                               byte_data=detection.mask.tobytes()),
        anomalies=[pb.Anomaly(name=a.name, pixel_anomaly=pb.PixelAnomaly(total_percentage_area=a.area,
                                                                         hex_color=a.color))
                   for a in detection.anomalies])
    return pb.DetectAnomaliesResponse(detect_anomaly_result=result)


@pytest.mark.parametrize(("width", "height"), [(1, 1), (3, 5), (64, 48), (640, 480), (1000, 700)])
@pytest.mark.parametrize("anomalous", [False, True])
def test_inline_mask_response_parses_to_the_protobuf_message(width: int, height: int, anomalous: bool) -> None:
    rng = np.random.default_rng(width * height)
    mask = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    anomalies = [Anomaly("background", 0.75, "#ffffff")] + ([Anomaly("scratch", 0.25, "#ff0000")] if anomalous
                                                            else [])
    detection = Detection(anomalous, 0.9 if anomalous else 0.1, 0.875, 0.5, anomalies, mask, width, height)
    reply = to_response(detection, None)
    assert isinstance(reply, InlineMaskResponse)
    wire = serialize_detect_response(reply)
    parsed = pb.DetectAnomaliesResponse.FromString(wire)
    assert parsed == _reference(detection)
    assert parsed.detect_anomaly_result.anomaly_mask.byte_data == mask.tobytes()
    assert reply.to_message() == parsed
    # Re-serialising the parsed message canonically gives the same bytes, only in field-number order.
    assert len(parsed.SerializeToString()) == len(wire)


def test_responses_without_an_inline_mask_are_plain_messages() -> None:
    plain = to_response(Detection(False, 0.8, 0.2, 0.5), None)
    assert isinstance(plain, pb.DetectAnomaliesResponse)
    assert not plain.detect_anomaly_result.HasField("anomaly_mask")
    assert serialize_detect_response(plain) == plain.SerializeToString()


def test_a_mask_that_is_not_contiguous_is_refused_loudly() -> None:
    mask = np.zeros((4, 6, 3), dtype=np.uint8)[:, ::2]
    with pytest.raises(TypeError):
        InlineMaskResponse(pb.DetectAnomaliesResponse(), mask, 3, 4).SerializeToString()


# -- requests in: decode_detect_request ---------------------------------------------------------------

def _as_message(decoded: pb.DetectAnomaliesRequest | DetectRequestView) -> pb.DetectAnomaliesRequest:
    if isinstance(decoded, DetectRequestView):
        message = pb.DetectAnomaliesRequest()
        message.CopyFrom(decoded.message)
        assert decoded.message.bitmap.WhichOneof("data") is None
        message.bitmap.byte_data = bytes(decoded.byte_data)
        return message
    return decoded


def _key(number: int, wire: int) -> bytes:
    return bytes([number << 3 | wire])


FRAME = bytes(range(256)) * 50
PLAIN = pb.DetectAnomaliesRequest(model_component="cam-1", bitmap=pb.Bitmap(width=64, height=48, byte_data=FRAME))
MASK = pb.AnomalyMaskParams(shared_memory_handle=pb.SharedMemoryHandle(name="/m", size=9, offset=3))
SHM = pb.Bitmap(width=2, height=3, shared_memory_handle=pb.SharedMemoryHandle(name="/f", size=18))
LAYOUTS = {
    "plain": PLAIN.SerializeToString(),
    "with mask params": pb.DetectAnomaliesRequest(model_component="ü", bitmap=PLAIN.bitmap,
                                                  anomaly_mask_params=MASK).SerializeToString(),
    "fields reversed": _header(3, len(MASK.SerializeToString())) + MASK.SerializeToString()
    + PLAIN.SerializeToString(),
    "byte_data first in the bitmap": pb.DetectAnomaliesRequest(model_component="x").SerializeToString()
    + _header(2, len(_header(3, len(FRAME))) + len(FRAME) + 4) + _header(3, len(FRAME)) + FRAME
    + _key(1, 0) + b"\x05" + _key(2, 0) + b"\x07",
    "unknown fields": PLAIN.SerializeToString() + _key(9, 0) + b"\x01" + _key(10, 2) + b"\x02ab",
    "empty byte_data": pb.DetectAnomaliesRequest(bitmap=pb.Bitmap(width=1, byte_data=b"")).SerializeToString(),
    "bitmap twice (merged)": PLAIN.SerializeToString() + pb.DetectAnomaliesRequest(
        bitmap=pb.Bitmap(height=7, byte_data=b"abc")).SerializeToString(),
    "byte_data then shm (oneof: last wins)": PLAIN.SerializeToString() + pb.DetectAnomaliesRequest(
        bitmap=SHM).SerializeToString(),
    "shm then byte_data": pb.DetectAnomaliesRequest(bitmap=SHM).SerializeToString() + PLAIN.SerializeToString(),
    "shm only": pb.DetectAnomaliesRequest(model_component="a", bitmap=SHM, anomaly_mask_params=MASK)
    .SerializeToString(),
    "no bitmap": pb.DetectAnomaliesRequest(model_component="a").SerializeToString(),
    "empty": b"",
    "bitmap as a varint": _key(2, 0) + b"\x05",
    "byte_data as a varint": _key(2, 2) + b"\x02" + _key(3, 0) + b"\x05",
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_decoded_requests_equal_protobufs_parse(layout: str) -> None:
    raw = LAYOUTS[layout]
    decoded = decode_detect_request(raw)
    assert _as_message(decoded) == pb.DetectAnomaliesRequest.FromString(raw)
    if layout in ("plain", "with mask params", "fields reversed", "byte_data first in the bitmap",
                  "unknown fields", "empty byte_data"):
        assert isinstance(decoded, DetectRequestView)  # the fast path: the frame is not copied
        assert decoded.byte_data.obj is raw


@pytest.mark.parametrize("raw", [
    pb.DetectAnomaliesRequest(model_component="x", bitmap=PLAIN.bitmap).SerializeToString()[:-10],  # truncated
    _key(1, 2) + b"\x02\xff\xfe" + PLAIN.SerializeToString(),  # model_component not UTF-8, frame in place
    _key(2, 2) + b"\x05" + _key(3, 2) + b"\x09abc",  # byte_data runs past its bitmap
    _key(2, 3) + b"\x00",  # a group: not proto3
    b"\xff" * 11,  # a varint that never ends
])
def test_undecodable_requests_raise_as_protobuf_does(raw: bytes) -> None:
    with pytest.raises(Exception) as ours:
        decode_detect_request(raw)
    with pytest.raises(Exception) as theirs:
        pb.DetectAnomaliesRequest.FromString(raw)
    assert type(ours.value) is type(theirs.value)
