"""Execution providers: what the session really uses is reported, never a silent CPU fallback."""

from __future__ import annotations

import onnxruntime as ort
import pytest
from conftest import wait_known, wait_status


def cuda_really_works(model_file) -> bool:
    """Ask ONNX Runtime directly, the same way the agent does (a GPU machine says yes)."""
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        session = ort.InferenceSession(str(model_file), sess_options=so,
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception:
        return False
    return "CUDAExecutionProvider" in session.get_providers()


def test_cpu_only_is_reported_plainly(make_package, agent, stub, pb):
    make_package("anomalib", "widget")
    wait_known(agent, "widget")
    stub.StartModel(pb.StartModelRequest(model_component="widget"))
    desc = wait_status(stub, pb, "widget", pb.RUNNING)
    assert desc.status_message == "running on CPUExecutionProvider"
    assert agent.registry.describe("widget").providers == ("CPUExecutionProvider",)


@pytest.mark.parametrize("require", [False, True])
def test_gpu_request_never_falls_back_silently(make_package, agent_factory, pb, pb_modules, model_files, require):
    import grpc

    agent = agent_factory(execution_providers="cuda,cpu", require_accelerator=require)
    make_package("anomalib", "widget")
    wait_known(agent, "widget")
    with grpc.insecure_channel(agent.config.socket) as ch:
        stub = pb_modules[1].EdgeAgentStub(ch)
        stub.StartModel(pb.StartModelRequest(model_component="widget"))
        desc = wait_status(stub, pb, "widget", pb.FAILED if require else pb.RUNNING)
        desc = wait_status(stub, pb, "widget", pb.RUNNING) if desc.status == pb.STARTING else desc
    if cuda_really_works(model_files["anomalib"]):
        assert desc.status == pb.RUNNING
        assert desc.status_message.startswith("running on CUDAExecutionProvider")
    elif require:
        assert desc.status == pb.FAILED
        assert "RequireAccelerator" in desc.status_message and "no GPU execution provider" in desc.status_message
    else:
        assert desc.status == pb.RUNNING
        assert "CPU fallback" in desc.status_message and "CUDAExecutionProvider" in desc.status_message
