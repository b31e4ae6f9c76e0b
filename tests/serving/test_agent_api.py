"""The LFV EdgeAgent API end to end: real server, real Unix socket, stubs compiled from proto/."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import detect, grey_with_square, start, wait_known, wait_status
from runtimes import ControlledRuntime

from agent.tools.modelgen.classic import reference_classifier_logit


def code_of(call, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


def test_list_describe_start_detect_stop(make_package, agent, stub, pb):
    make_package("anomalib", "widget")
    wait_known(agent, "widget")
    listed = stub.ListModels(pb.ListModelsRequest()).models
    assert [(m.model_component, m.status) for m in listed] == [("widget", pb.STOPPED)]
    assert listed[0].lookout_vision_model_arn == "arn:aws:lookoutvision:us-east-1:123456789012:model/test/widget"

    # The AWS sample's start_model_if_needed() relies on STARTING being visible right after StartModel.
    assert stub.StartModel(pb.StartModelRequest(model_component="widget")).status == pb.STARTING
    assert stub.DescribeModel(pb.DescribeModelRequest(model_component="widget")).model_description.status in (
        pb.STARTING, pb.RUNNING)
    desc = wait_status(stub, pb, "widget", pb.RUNNING)
    assert desc.status == pb.RUNNING
    assert "CPUExecutionProvider" in desc.status_message

    normal = detect(stub, pb, "widget", grey_with_square(box=None))
    assert not normal.is_anomalous
    assert normal.anomaly_score < 0.2 and normal.anomaly_threshold == pytest.approx(0.5)
    assert normal.confidence == pytest.approx(1 - normal.anomaly_score, abs=1e-6)

    defect = detect(stub, pb, "widget", grey_with_square(box=(8, 8, 24, 24)))
    assert defect.is_anomalous and defect.anomaly_score == pytest.approx(1.0)
    assert defect.confidence == pytest.approx(defect.anomaly_score)
    assert [a.name for a in defect.anomalies] == ["background", "anomaly"]
    assert [a.pixel_anomaly.hex_color for a in defect.anomalies] == ["#FFFFFF", "#23A436"]
    assert defect.anomalies[1].pixel_anomaly.total_percentage_area == pytest.approx(256 / 4096)
    mask = np.frombuffer(defect.anomaly_mask.byte_data, np.uint8).reshape(64, 64, 3)
    assert (defect.anomaly_mask.width, defect.anomaly_mask.height) == (64, 64)
    assert (mask[8:24, 8:24] == [0x23, 0xA4, 0x36]).all()
    assert (mask[30:, 30:] == 255).all()

    assert stub.StopModel(pb.StopModelRequest(model_component="widget")).status == pb.STOPPED
    assert stub.DescribeModel(pb.DescribeModelRequest(model_component="widget")).model_description.status == \
        pb.STOPPED


def test_mask_is_scaled_to_the_input_size(make_package, agent, stub, pb):
    make_package("anomalib", "widget")
    wait_known(agent, "widget")
    start(stub, pb, "widget")
    # 256x128 input, model runs at 64x64: the square covers x 64..128, y 32..64 of the input.
    image = grey_with_square(256, 128, box=(64, 32, 128, 64))
    result = detect(stub, pb, "widget", image)
    assert (result.anomaly_mask.width, result.anomaly_mask.height) == (256, 128)
    mask = np.frombuffer(result.anomaly_mask.byte_data, np.uint8).reshape(128, 256, 3)
    hit = (mask != 255).any(axis=2)
    assert hit[36:60, 68:124].all() and not hit[:, :56].any() and not hit[72:, :].any()
    assert result.anomalies[1].pixel_anomaly.total_percentage_area == pytest.approx(hit.mean(), abs=1e-6)
    assert result.anomalies[1].pixel_anomaly.total_percentage_area == pytest.approx(64 * 32 / (256 * 128), rel=0.15)


def test_status_codes(make_package, agent_factory, pb, pb_modules):
    runtime = ControlledRuntime()
    agent = agent_factory(runtime=runtime, max_concurrency=1, max_queue=0)
    make_package("anomalib", "widget")
    make_package("classification", "other")
    wait_known(agent, "widget", "other")
    with grpc.insecure_channel(agent.config.socket) as ch:
        stub = pb_modules[1].EdgeAgentStub(ch)
        image = grey_with_square()
        nf = grpc.StatusCode.NOT_FOUND
        fp = grpc.StatusCode.FAILED_PRECONDITION
        ia = grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(stub.StartModel, pb.StartModelRequest(model_component="nope"))[0] == nf
        assert code_of(stub.StopModel, pb.StopModelRequest(model_component="nope"))[0] == nf
        assert code_of(stub.DescribeModel, pb.DescribeModelRequest(model_component="nope"))[0] == nf
        assert code_of(detect, stub, pb, "nope", image)[0] == nf
        assert code_of(stub.DescribeModel, pb.DescribeModelRequest(model_component=""))[0] == ia

        # STOPPED: detect and stop are refused.
        code, details = code_of(detect, stub, pb, "widget", image)
        assert code == fp and "STOPPED" in details
        assert code_of(stub.StopModel, pb.StopModelRequest(model_component="widget"))[0] == fp

        # STARTING (the load is held): start and detect are refused; stop cancels the load.
        runtime.load_gate = threading.Event()
        assert stub.StartModel(pb.StartModelRequest(model_component="widget")).status == pb.STARTING
        code, details = code_of(stub.StartModel, pb.StartModelRequest(model_component="widget"))
        assert code == fp and "STARTING" in details
        assert code_of(detect, stub, pb, "widget", image)[0] == fp
        assert stub.StopModel(pb.StopModelRequest(model_component="widget")).status == pb.STOPPED
        desc = stub.DescribeModel(pb.DescribeModelRequest(model_component="widget")).model_description
        assert desc.status == pb.STOPPED and "cancelled" in desc.status_message
        assert stub.StartModel(pb.StartModelRequest(model_component="widget")).status == pb.STARTING
        runtime.load_gate.set()
        assert wait_status(stub, pb, "widget", pb.RUNNING).status == pb.RUNNING
        code, details = code_of(stub.StartModel, pb.StartModelRequest(model_component="widget"))
        assert code == fp and "RUNNING" in details

        # Invalid bitmaps, each with a message naming the problem.
        for bitmap, words in (
            (pb.Bitmap(width=63, height=64, byte_data=b"\0" * 63 * 64 * 3), "width 63"),
            (pb.Bitmap(width=64, height=4097, byte_data=b"\0"), "height 4097"),
            (pb.Bitmap(width=64, height=64, byte_data=b"\0" * 100), "needs 12288 bytes, got 100"),
            (pb.Bitmap(width=64, height=64), "no data"),
            (pb.Bitmap(width=64, height=64, shared_memory_handle=pb.SharedMemoryHandle(name="/a/b", size=12288)),
             "invalid"),
            (pb.Bitmap(width=64, height=64, shared_memory_handle=pb.SharedMemoryHandle(name="/..", size=12288)),
             "invalid"),
            (pb.Bitmap(width=64, height=64, shared_memory_handle=pb.SharedMemoryHandle(name="/ea-missing",
                                                                                        size=12288)),
             "does not exist"),
        ):
            code, details = code_of(stub.DetectAnomalies, pb.DetectAnomaliesRequest(model_component="widget",
                                                                                     bitmap=bitmap))
            assert code == ia, (bitmap, details)
            assert words in details

        # Overload: one slot, no queue, the slot held by a blocked request → RESOURCE_EXHAUSTED.
        runtime.predict_gate = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(detect, stub, pb, "widget", image)
            deadline = time.monotonic() + 5
            while runtime.active == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            code, details = code_of(detect, stub, pb, "widget", image)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in details
            runtime.predict_gate.set()
            assert held.result(10).is_anomalous
        runtime.predict_gate = None

        # An inference failure is INTERNAL, and the model keeps serving.
        runtime.fail_next = 1
        code, details = code_of(detect, stub, pb, "widget", image)
        assert code == grpc.StatusCode.INTERNAL and "simulated device error" in details
        assert detect(stub, pb, "widget", image).is_anomalous
        assert stub.DescribeModel(pb.DescribeModelRequest(model_component="widget")).model_description.status == \
            pb.RUNNING
        assert stub.StopModel(pb.StopModelRequest(model_component="widget")).status == pb.STOPPED


def test_padded_rows_are_accepted(make_package, agent, stub, pb):
    make_package("anomalib", "widget")
    wait_known(agent, "widget")
    start(stub, pb, "widget")
    width, height = 65, 64  # 195 bytes per row, padded to 196 (GStreamer RGB buffers)
    image = grey_with_square(width, height, box=(8, 8, 24, 24))
    padded = np.zeros((height, 196), np.uint8)
    padded[:, :195] = image.reshape(height, -1)
    padded[:, 195] = 7  # padding bytes must be ignored
    req = pb.DetectAnomaliesRequest(model_component="widget", bitmap=pb.Bitmap(width=width, height=height,
                                                                               byte_data=padded.tobytes()))
    padded_result = stub.DetectAnomalies(req).detect_anomaly_result
    packed_result = detect(stub, pb, "widget", image)
    assert padded_result.anomaly_score == pytest.approx(packed_result.anomaly_score)
    assert padded_result.anomaly_mask.byte_data == packed_result.anomaly_mask.byte_data


def test_shared_memory_input_and_mask(make_package, agent, stub, pb):
    from agent.client import shm_segment

    make_package("anomalib", "widget")
    wait_known(agent, "widget")
    start(stub, pb, "widget")
    image = grey_with_square(128, 96, box=(16, 16, 48, 48))
    seg_in, seg_mask = f"/ea-test-in-{os.getpid()}", f"/ea-test-mask-{os.getpid()}"  # parallel runs don't collide
    offset = 4096 + 100  # not page aligned
    with shm_segment(seg_in, offset + image.nbytes) as frame, \
            shm_segment(seg_mask, 64 + image.nbytes) as mask_seg:
        frame[offset:offset + image.nbytes] = image.tobytes()
        for field in ("shared_memory_handle", "shared_memory_handle_draft"):
            mask_seg[:] = b"\0" * len(mask_seg)
            params = pb.AnomalyMaskParams(**{field: pb.SharedMemoryHandle(name=seg_mask,
                                                                          size=image.nbytes, offset=64)})
            req = pb.DetectAnomaliesRequest(
                model_component="widget",
                bitmap=pb.Bitmap(width=128, height=96, shared_memory_handle=pb.SharedMemoryHandle(
                    name=seg_in, size=image.nbytes, offset=offset)),
                anomaly_mask_params=params)
            result = stub.DetectAnomalies(req).detect_anomaly_result
            assert result.is_anomalous
            assert result.anomaly_mask.WhichOneof("data") == "shared_memory_handle"
            assert result.anomaly_mask.shared_memory_handle.name == seg_mask
            assert not result.anomaly_mask.byte_data
            mask = np.frombuffer(mask_seg, np.uint8, count=image.nbytes, offset=64).reshape(96, 128, 3)
            inline = detect(stub, pb, "widget", image)
            assert mask.tobytes() == inline.anomaly_mask.byte_data, field
            del mask
        # The agent never unlinks the client's segments.
        assert Path("/dev/shm" + seg_in).exists() and Path("/dev/shm" + seg_mask).exists()

        # A range past the end of the segment, and a mask segment that is too small.
        bad = pb.DetectAnomaliesRequest(model_component="widget", bitmap=pb.Bitmap(
            width=128, height=96, shared_memory_handle=pb.SharedMemoryHandle(
                name=seg_in, size=image.nbytes, offset=offset + 1)))
        code, details = code_of(stub.DetectAnomalies, bad)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "exceeds segment" in details
        small = pb.DetectAnomaliesRequest(
            model_component="widget",
            bitmap=pb.Bitmap(width=128, height=96, byte_data=image.tobytes()),
            anomaly_mask_params=pb.AnomalyMaskParams(shared_memory_handle=pb.SharedMemoryHandle(
                name=seg_mask, size=100, offset=0)))
        code, details = code_of(stub.DetectAnomalies, small)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "needs 36864 bytes" in details


def test_anomalib_v1_export(make_package, agent, stub, pb):
    make_package("anomalib_v1", "legacy")
    wait_known(agent, "legacy")
    start(stub, pb, "legacy")
    normal = detect(stub, pb, "legacy", grey_with_square(box=None))
    defect = detect(stub, pb, "legacy", grey_with_square(box=(0, 0, 16, 16)))
    assert not normal.is_anomalous and normal.anomaly_score < 0.2
    assert defect.is_anomalous and defect.anomaly_score > 0.8
    assert defect.anomalies[1].pixel_anomaly.total_percentage_area == pytest.approx(256 / 4096)


def test_classification_models(make_package, agent, stub, pb):
    make_package("classification", "cls")
    make_package("classification_logits", "cls-logits")
    wait_known(agent, "cls", "cls-logits")
    for name in ("cls", "cls-logits"):
        start(stub, pb, name)
        for image in (grey_with_square(box=None), grey_with_square(box=(0, 0, 4, 4))):
            z = reference_classifier_logit(image)
            expected = 1 / (1 + np.exp(-z))
            result = detect(stub, pb, name, image)
            assert result.anomaly_score == pytest.approx(min(max(expected, 0), 1), abs=1e-4)
            assert result.is_anomalous == (round(expected, 4) >= 0.5)
            assert not result.anomalies and not result.anomaly_mask.byte_data


def test_segmentation_model(make_package, agent, stub, pb):
    make_package("segmentation", "seg", colors=["#ffffff", "#ff0000", "#00ff00"])
    wait_known(agent, "seg")
    start(stub, pb, "seg")
    image = grey_with_square(box=(0, 0, 16, 16))
    image[40:48, 40:48] = (0, 255, 0)
    result = detect(stub, pb, "seg", image)
    assert result.is_anomalous
    got = {a.name: (a.pixel_anomaly.hex_color, a.pixel_anomaly.total_percentage_area) for a in result.anomalies}
    assert [a.name for a in result.anomalies] == ["background", "red", "green"]
    assert got["red"] == ("#FF0000", pytest.approx(256 / 4096))
    assert got["green"] == ("#00FF00", pytest.approx(64 / 4096))
    assert got["background"][1] == pytest.approx(1 - 320 / 4096)
    normal = detect(stub, pb, "seg", grey_with_square(box=None))
    assert not normal.is_anomalous
    assert [a.name for a in normal.anomalies] == ["background"]


def test_largest_image_inline(make_package, agent, stub, pb, pb_modules):
    make_package("anomalib", "widget")
    wait_known(agent, "widget")
    start(stub, pb, "widget")
    image = grey_with_square(4096, 4096, box=(1024, 1024, 2048, 2048))
    # The 48 MiB inline mask needs a client that accepts large messages (or a mask shm handle).
    limit = 64 * 1024 * 1024
    with grpc.insecure_channel(agent.config.socket, options=[("grpc.max_receive_message_length", limit),
                                                             ("grpc.max_send_message_length", limit)]) as ch:
        result = detect(pb_modules[1].EdgeAgentStub(ch), pb, "widget", image)
    assert result.is_anomalous
    assert result.anomalies[1].pixel_anomaly.total_percentage_area == pytest.approx(1 / 16, rel=0.02)


def test_concurrent_requests_run_in_parallel(make_package, agent_factory, pb, pb_modules):
    runtime = ControlledRuntime()
    runtime.predict_delay = 0.02
    agent = agent_factory(runtime=runtime, max_concurrency=4, max_queue=64)
    make_package("anomalib", "widget")
    wait_known(agent, "widget")
    with grpc.insecure_channel(agent.config.socket) as ch:
        stub = pb_modules[1].EdgeAgentStub(ch)
        start(stub, pb, "widget")
        images = [grey_with_square(box=None), grey_with_square(box=(8, 8, 24, 24))]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: detect(stub, pb, "widget", images[i % 2]), range(80)))
    assert [r.is_anomalous for r in results] == [i % 2 == 1 for i in range(80)]
    assert runtime.max_active >= 2  # LFV serialised calls per model; we run them side by side
    assert runtime.max_active <= 4


def test_model_that_fails_to_load(make_package, models_dir, agent, stub, pb):
    make_package("anomalib", "good")
    broken = make_package("classification", "broken")
    (broken.root / "model.onnx").write_bytes(b"this is not an onnx model")
    wait_known(agent, "good", "broken")
    assert stub.StartModel(pb.StartModelRequest(model_component="broken")).status == pb.STARTING
    desc = wait_status(stub, pb, "broken", pb.FAILED)
    assert desc.status == pb.FAILED
    assert "sha256" in desc.status_message or "ONNX Runtime" in desc.status_message
    start(stub, pb, "good")
    assert detect(stub, pb, "good", grey_with_square()).is_anomalous
    # FAILED models can be started again (and fail again with a message).
    assert stub.StartModel(pb.StartModelRequest(model_component="broken")).status == pb.STARTING
    assert wait_status(stub, pb, "broken", pb.FAILED).status == pb.FAILED


def test_reused_and_replaced_shared_memory_segments(make_package, agent, stub, pb):
    """Clients reuse one segment per stream (the agent keeps it mapped) and may recreate or resize it
    under the same name: every request must see the bytes that are there now."""
    from agent.client import shm_segment

    make_package("anomalib", "widget")
    wait_known(agent, "widget")
    start(stub, pb, "widget")
    name = f"/ea-reuse-{os.getpid()}"
    normal, defect = grey_with_square(box=None), grey_with_square(box=(8, 8, 24, 24))

    def request(width: int = 64, height: int = 64) -> object:
        return pb.DetectAnomaliesRequest(model_component="widget", bitmap=pb.Bitmap(
            width=width, height=height, shared_memory_handle=pb.SharedMemoryHandle(
                name=name, size=width * height * 3, offset=0)))

    with shm_segment(name, normal.nbytes) as seg:
        for image in (normal, defect, normal, defect):  # same segment, new frame each time
            seg[:] = image.tobytes()
            assert stub.DetectAnomalies(request()).detect_anomaly_result.is_anomalous == (image is defect)
    big = grey_with_square(128, 128, box=(0, 0, 16, 16))
    with shm_segment(name, big.nbytes) as seg:  # recreated under the same name, larger
        seg[:] = big.tobytes()
        result = stub.DetectAnomalies(request(128, 128)).detect_anomaly_result
        assert result.is_anomalous and result.anomaly_mask.width == 128
        with pytest.raises(grpc.RpcError) as info:  # the old size no longer fits a 256x256 frame
            stub.DetectAnomalies(request(256, 256))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with shm_segment(name, normal.nbytes) as seg:  # and smaller again
        seg[:] = normal.tobytes()
        assert not stub.DetectAnomalies(request()).detect_anomaly_result.is_anomalous
