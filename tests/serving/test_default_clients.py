"""Clients as they are written: default gRPC channel options (4 MiB receive limit), camera-size frames,
every model kind, DDA packages and legacy LFV components in the models directory."""

from __future__ import annotations

import json
import mmap
import os
import uuid

import grpc
import numpy as np
import pytest
from conftest import start, wait_known, wait_status

from agent.tools.modelgen.dda import (
    build_dda_classifier,
    build_dda_segmenter,
    dda_manifest,
    write_dda_package,
    write_neo_package,
)

DEFAULT_RECEIVE_LIMIT = 4 * 1024 * 1024
SIZES = [(640, 480), (1920, 1080), (4096, 4096)]
OWN_KINDS = ["anomalib", "anomalib_v1", "classification", "segmentation"]
DDA_KINDS = ["dda-classification", "dda-segmentation"]


def frame(width: int, height: int) -> np.ndarray:
    """Grey with a red box covering 1/4 x 1/4 of the frame: every kind's model flags it."""
    image = np.full((height, width, 3), 128, np.uint8)
    image[height // 8:height // 8 + height // 4, width // 8:width // 8 + width // 4] = (255, 0, 0)
    return image


def add_dda_packages(models_dir, tmp_path) -> None:
    cls = build_dda_classifier(tmp_path / "cls.onnx", image_size=(64, 48))
    seg = build_dda_segmenter(tmp_path / "seg.onnx", image_size=(64, 48))
    write_dda_package(models_dir / "dda-classification", cls, dda_manifest(kind="classification"))
    # Trained on 1080p camera frames: DDA resizes its masks to raw_image_shape.
    write_dda_package(models_dir / "dda-segmentation", seg,
                      dda_manifest(kind="segmentation", raw_image_shape=(1080, 1920), normal_index=0,
                                   classification_logic="cls_or_seg"))


def request(pb, name: str, image: np.ndarray, **kwargs):
    h, w = image.shape[:2]
    return pb.DetectAnomaliesRequest(model_component=name, bitmap=pb.Bitmap(width=w, height=h,
                                                                            byte_data=image.tobytes()), **kwargs)


def test_default_client_gets_every_frame_size_from_every_kind(make_package, models_dir, agent_factory, pb,
                                                              pb_modules, tmp_path):
    for kind in OWN_KINDS:
        make_package(kind)
    add_dda_packages(models_dir, tmp_path)
    names = [k.replace("_", "-") for k in OWN_KINDS] + DDA_KINDS
    agent = agent_factory()
    wait_known(agent, *names)
    with grpc.insecure_channel(agent.config.socket) as channel:  # no options: what the AWS samples do
        stub = pb_modules[1].EdgeAgentStub(channel)
        for name in names:
            start(stub, pb, name)
        for width, height in SIZES:
            image = frame(width, height)
            for name in names:
                call = stub.DetectAnomalies.with_call(request(pb, name, image), timeout=60)
                result = call[0].detect_anomaly_result
                assert call[1].code() == grpc.StatusCode.OK
                assert result.is_anomalous, (name, width, height)
                assert call[0].ByteSize() <= DEFAULT_RECEIVE_LIMIT
                if name in ("classification", "dda-classification"):
                    assert not result.HasField("anomaly_mask") and not result.anomalies
                    continue
                mask = result.anomaly_mask
                full = (1920, 1080) if name == "dda-segmentation" else (width, height)
                # The client tells a scaled mask by its width/height; decoding with them always works.
                pixels = np.frombuffer(mask.byte_data, np.uint8).reshape(mask.height, mask.width, 3)
                if full[0] * full[1] * 3 < 4_000_000:
                    assert (mask.width, mask.height) == full
                else:
                    assert mask.width < full[0] and mask.height < full[1]
                    assert mask.width / mask.height == pytest.approx(full[0] / full[1], rel=0.01)
                # Areas are the full-size mask's: the red box is 1/16 of the frame (up to model resolution).
                defect = sum(a.pixel_anomaly.total_percentage_area for a in result.anomalies[1:])
                assert defect == pytest.approx(1 / 16, abs=0.01), (name, width, height)
                assert (pixels != 255).any(axis=2).mean() == pytest.approx(defect, abs=0.02)


def test_inline_mask_settings(make_package, agent_factory, pb, pb_modules):
    make_package("segmentation", "seg")
    image = frame(1920, 1080)
    normal = np.full((480, 640, 3), 128, np.uint8)

    agent = agent_factory(inline_mask="full")
    wait_known(agent, "seg")
    with grpc.insecure_channel(agent.config.socket) as channel:
        full_stub = pb_modules[1].EdgeAgentStub(channel)
        start(full_stub, pb, "seg")
        with pytest.raises(grpc.RpcError) as info:  # what InlineMask=full costs a default client
            full_stub.DetectAnomalies(request(pb, "seg", image), timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with grpc.insecure_channel(agent.config.socket, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        result = pb_modules[1].EdgeAgentStub(ch).DetectAnomalies(request(pb, "seg", image), timeout=60)
        assert (result.detect_anomaly_result.anomaly_mask.width, result.detect_anomaly_result.anomaly_mask.height) \
            == (1920, 1080)

    agent.apply_config(agent.config.replace(inline_mask="none"))  # live setting
    result = full_stub_call(agent, pb_modules, pb, image)
    assert not result.HasField("anomaly_mask") and result.is_anomalous
    assert [a.name for a in result.anomalies] == ["background", "red"]

    agent.apply_config(agent.config.replace(inline_mask="fit", inline_mask_normal=False))
    result = full_stub_call(agent, pb_modules, pb, normal)
    assert not result.is_anomalous and not result.HasField("anomaly_mask")
    assert [a.name for a in result.anomalies] == ["background"]
    assert full_stub_call(agent, pb_modules, pb, image).anomaly_mask.width > 0


def full_stub_call(agent, pb_modules, pb, image):
    with grpc.insecure_channel(agent.config.socket) as channel:
        return pb_modules[1].EdgeAgentStub(channel).DetectAnomalies(request(pb, "seg", image), timeout=60) \
            .detect_anomaly_result


def test_overlay_of_a_scaled_mask_covers_the_frame(make_package, agent, stub, pb):
    """edge-agent detect --overlay: a mask scaled to fit is drawn over the whole full-size frame."""
    from agent.client import overlay

    make_package("segmentation", "seg")
    wait_known(agent, "seg")
    start(stub, pb, "seg")
    image = frame(1920, 1080)
    result = stub.DetectAnomalies(request(pb, "seg", image), timeout=60).detect_anomaly_result
    mask = np.frombuffer(result.anomaly_mask.byte_data, np.uint8).reshape(result.anomaly_mask.height,
                                                                          result.anomaly_mask.width, 3)
    assert mask.shape[:2] != image.shape[:2]
    drawn = np.asarray(overlay(image, mask))
    assert drawn.shape == image.shape
    assert (drawn != image).any(axis=2).mean() == pytest.approx(1 / 16, abs=0.01)


def test_shared_memory_mask_stays_full_size(make_package, agent, stub, pb):
    make_package("segmentation", "seg")
    wait_known(agent, "seg")
    start(stub, pb, "seg")
    width, height = 1920, 1080
    name = f"/edge-agent-test-{uuid.uuid4().hex[:8]}"
    path = f"/dev/shm/{name[1:]}"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, width * height * 3)
        result = stub.DetectAnomalies(request(pb, "seg", frame(width, height), anomaly_mask_params=pb.AnomalyMaskParams(
            shared_memory_handle=pb.SharedMemoryHandle(name=name, size=width * height * 3, offset=0))),
            timeout=60).detect_anomaly_result
        assert (result.anomaly_mask.width, result.anomaly_mask.height) == (width, height)
        assert not result.anomaly_mask.byte_data
        with mmap.mmap(fd, width * height * 3) as mm:
            pixels = np.frombuffer(mm, np.uint8).reshape(height, width, 3)
            assert (pixels != 255).any(axis=2).mean() == pytest.approx(result.anomalies[1].pixel_anomaly
                                                                        .total_percentage_area, abs=1e-6)
            del pixels
    finally:
        os.close(fd)
        os.unlink(path)


def test_legacy_neo_component_is_listed_failed_with_what_to_do(models_dir, agent, stub, pb, tmp_path):
    root = write_neo_package(models_dir / "legacy-lfv")
    wait_known(agent, "legacy-lfv")
    listed = {m.model_component: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert listed["legacy-lfv"].status == pb.FAILED
    message = listed["legacy-lfv"].status_message
    assert "Neo / DLR-compiled Lookout for Vision model" in message and "ONNX" in message
    assert stub.StartModel(pb.StartModelRequest(model_component="legacy-lfv")).status == pb.STARTING
    desc = wait_status(stub, pb, "legacy-lfv", pb.FAILED)
    assert desc.status == pb.FAILED and desc.status_message == message
    with pytest.raises(grpc.RpcError) as info:
        stub.DetectAnomalies(request(pb, "legacy-lfv", frame(640, 480)), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # The migration path of docs/model-package.md, step 3: the ONNX export into mochi/, Neo files out, "runtime":
    # "onnx" into the same manifest. The package is picked up in place and can be started.
    manifest = json.loads((root / "manifest.json").read_text())
    stage = manifest["model_graph"]["stages"][0]
    build_dda_classifier(root / "mochi" / "model.onnx", image_size=(stage["image_width"], stage["image_height"]))
    for neo in ("compiled.so", "compiled.params", "compiled.meta", "libdlr.so", "dlr.h"):
        (root / "mochi" / neo).unlink()
    manifest.update(runtime="onnx", runtime_artifact="model.onnx")
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert wait_status(stub, pb, "legacy-lfv", pb.STOPPED).status == pb.STOPPED
    start(stub, pb, "legacy-lfv")
    result = stub.DetectAnomalies(request(pb, "legacy-lfv", frame(640, 480)), timeout=30).detect_anomaly_result
    assert result.is_anomalous and result.anomaly_threshold == pytest.approx(0.7021560668945312)
