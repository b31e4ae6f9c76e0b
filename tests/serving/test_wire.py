"""The hand-assembled DetectAnomalies response (agent/serving/grpc/wire.py) parses to exactly the message
protobuf itself would build, for the shapes a mask can have."""

from __future__ import annotations

import numpy as np
import pytest

from agent.core.pipeline import Anomaly, Detection
from agent.serving.grpc._generated import edge_agent_pb2 as pb
from agent.serving.grpc.servicer import to_response
from agent.serving.grpc.wire import InlineMaskResponse, serialize_detect_response


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
