"""The wire contract: names and numbers LFV clients depend on, and stubs that match the proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent.serving.grpc._generated import edge_agent_pb2 as committed

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_the_generator():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_wire_names_and_numbers(pb):
    d = pb.DESCRIPTOR
    assert d.package == "AWS.LookoutVision"
    service = d.services_by_name["EdgeAgent"]
    assert service.full_name == "AWS.LookoutVision.EdgeAgent"
    assert sorted(m.name for m in service.methods) == ["DescribeModel", "DetectAnomalies", "ListModels",
                                                        "StartModel", "StopModel"]
    assert {v.name: v.number for v in d.enum_types_by_name["ModelStatus"].values} == {
        "STOPPED": 0, "STARTING": 1, "RUNNING": 2, "FAILED": 3, "STOPPING": 4}
    assert (pb.STOPPED, pb.STARTING, pb.RUNNING, pb.FAILED, pb.STOPPING) == (0, 1, 2, 3, 4)

    def fields(message: str) -> dict[str, tuple[int, int]]:
        return {f.name: (f.number, f.type) for f in d.message_types_by_name[message].fields}

    F = pb.DESCRIPTOR.message_types_by_name["Bitmap"].fields_by_name["width"]
    t = F.__class__
    assert fields("SharedMemoryHandle") == {"name": (1, t.TYPE_STRING), "size": (2, t.TYPE_UINT64),
                                            "offset": (3, t.TYPE_UINT64)}
    assert fields("Bitmap") == {"width": (1, t.TYPE_INT32), "height": (2, t.TYPE_INT32),
                                "byte_data": (3, t.TYPE_BYTES), "shared_memory_handle": (4, t.TYPE_MESSAGE)}
    assert fields("AnomalyMaskParams") == {"shared_memory_handle": (2, t.TYPE_MESSAGE),
                                           "shared_memory_handle_draft": (3, t.TYPE_MESSAGE)}
    assert fields("PixelAnomaly") == {"total_percentage_area": (1, t.TYPE_FLOAT), "hex_color": (2, t.TYPE_STRING)}
    assert fields("Anomaly") == {"name": (1, t.TYPE_STRING), "pixel_anomaly": (2, t.TYPE_MESSAGE)}
    assert fields("DetectAnomaliesRequest") == {"model_component": (1, t.TYPE_STRING), "bitmap": (2, t.TYPE_MESSAGE),
                                                "anomaly_mask_params": (3, t.TYPE_MESSAGE)}
    assert fields("DetectAnomalyResult") == {
        "is_anomalous": (1, t.TYPE_BOOL), "confidence": (2, t.TYPE_FLOAT), "anomaly_mask": (3, t.TYPE_MESSAGE),
        "anomalies": (4, t.TYPE_MESSAGE), "anomaly_score": (5, t.TYPE_FLOAT), "anomaly_threshold": (6, t.TYPE_FLOAT)}
    meta = {"model_component": (1, t.TYPE_STRING), "lookout_vision_model_arn": (2, t.TYPE_STRING),
            "status": (3, t.TYPE_ENUM), "status_message": (4, t.TYPE_STRING)}
    assert fields("ModelMetadata") == meta and fields("ModelDescription") == meta
    for name in ("StartModelRequest", "StopModelRequest", "DescribeModelRequest"):
        assert fields(name) == {"model_component": (1, t.TYPE_STRING)}
    assert fields("ListModelsResponse") == {"models": (1, t.TYPE_MESSAGE)}
    assert fields("DescribeModelResponse") == {"model_description": (1, t.TYPE_MESSAGE)}
    assert fields("DetectAnomaliesResponse") == {"detect_anomaly_result": (1, t.TYPE_MESSAGE)}


def test_committed_stubs_serialise_like_client_stubs(pb):
    # A request built with the client's stubs decodes field for field with the agent's.
    req = pb.DetectAnomaliesRequest(model_component="m", bitmap=pb.Bitmap(width=64, height=64, byte_data=b"x"),
                                    anomaly_mask_params=pb.AnomalyMaskParams(
                                        shared_memory_handle=pb.SharedMemoryHandle(name="/m", size=3, offset=1)))
    ours = committed.DetectAnomaliesRequest.FromString(req.SerializeToString())
    assert ours.anomaly_mask_params.shared_memory_handle.name == "/m"
    assert ours.bitmap.byte_data == b"x"
