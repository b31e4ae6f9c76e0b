"""Standalone discovery: packages added, removed and replaced while the agent runs."""

from __future__ import annotations

import os
import shutil
import threading
import time

import grpc
import pytest
from conftest import detect, grey_with_square, start, wait_known, wait_status


def wait_until(predicate, timeout: float = 5.0) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "condition not met in time"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_added_and_removed_packages(make_package, models_dir, agent, stub, pb):
    make_package("anomalib", "first")
    wait_known(agent, "first")
    seconds = None
    make_package("classification", "second")
    seconds = wait_until(lambda: "second" in agent.registry.names(), timeout=2.0)
    assert seconds < 2.0
    start(stub, pb, "first")
    shutil.rmtree(models_dir / "first")
    wait_until(lambda: "first" not in agent.registry.names(), timeout=2.0)
    names = [m.model_component for m in stub.ListModels(pb.ListModelsRequest()).models]
    assert names == ["second"]
    with pytest.raises(grpc.RpcError) as info:
        detect(stub, pb, "first", grey_with_square())
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_half_copied_package_is_ignored_until_complete(models_dir, make_package, agent, short_tmp):
    (models_dir / "partial").mkdir()
    (models_dir / "partial" / "manifest.json").write_text('{"name": "partial", ')  # still being written
    make_package("anomalib", "ok")
    wait_known(agent, "ok")
    time.sleep(0.5)
    assert agent.registry.names() == {"ok"}


def test_replaced_package_of_running_model_swaps_without_failures(make_package, models_dir, agent, stub, pb,
                                                                  short_tmp):
    make_package("anomalib", "widget", model_version="1", threshold=0.5)
    wait_known(agent, "widget")
    start(stub, pb, "widget")
    failures: list[Exception] = []
    thresholds: list[float] = []
    stop = threading.Event()

    def client() -> None:
        image = grey_with_square()
        while not stop.is_set():
            try:
                thresholds.append(detect(stub, pb, "widget", image).anomaly_threshold)
            except grpc.RpcError as exc:  # any failure across the swap is a defect
                failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(thresholds) > 20)
        # Replace the package the way a deployment tool would: build beside, then rename over.
        staged = make_package("anomalib", "widget", directory=short_tmp / "staged", model_version="2",
                              threshold=0.7, arn="arn:aws:lookoutvision:us-east-1:123456789012:model/test/v2")
        old = models_dir / "widget.old"
        os.rename(models_dir / "widget", old)
        os.rename(staged.root, models_dir / "widget")
        shutil.rmtree(old)
        wait_until(lambda: thresholds and thresholds[-1] == pytest.approx(0.7), timeout=5.0)
        count = len(thresholds)
        wait_until(lambda: len(thresholds) > count + 20)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert failures == []
    switched = thresholds.index(next(t for t in thresholds if t == pytest.approx(0.7)))
    assert all(t == pytest.approx(0.7) for t in thresholds[switched + 3:])  # in-flight old ones finish first
    desc = wait_status(stub, pb, "widget", pb.RUNNING)
    assert desc.lookout_vision_model_arn.endswith("/v2")


def test_failed_new_version_keeps_the_old_one(make_package, models_dir, agent, stub, pb, short_tmp):
    make_package("anomalib", "widget", model_version="1")
    wait_known(agent, "widget")
    start(stub, pb, "widget")
    staged = make_package("anomalib", "widget", directory=short_tmp / "staged", model_version="2")
    (staged.root / "model.onnx.data").write_bytes(b"corrupt")
    os.rename(models_dir / "widget", short_tmp / "old")
    os.rename(staged.root, models_dir / "widget")
    wait_until(lambda: "failed" in agent.registry.describe("widget").status_message)
    desc = stub.DescribeModel(pb.DescribeModelRequest(model_component="widget")).model_description
    assert desc.status == pb.RUNNING
    assert "still serving the previous version" in desc.status_message
    assert detect(stub, pb, "widget", grey_with_square()).is_anomalous


def test_autostart_from_package_and_config(make_package, agent_factory, pb, pb_modules):
    agent = agent_factory(autostart="listed")
    make_package("anomalib", "auto-pkg", autostart=True)
    make_package("anomalib", "listed")
    make_package("anomalib", "manual")
    wait_known(agent, "auto-pkg", "listed", "manual")
    with grpc.insecure_channel(agent.config.socket) as ch:
        stub = pb_modules[1].EdgeAgentStub(ch)
        assert wait_status(stub, pb, "auto-pkg", pb.RUNNING).status == pb.RUNNING
        assert wait_status(stub, pb, "listed", pb.RUNNING).status == pb.RUNNING
        assert stub.DescribeModel(pb.DescribeModelRequest(model_component="manual")).model_description.status == \
            pb.STOPPED
