"""ExecutionProviders auto on a machine without usable GPU libraries: no red ONNX Runtime lines, one clear log
line (issue #12 item 9). A real `edge-agent serve`, its whole output captured."""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort
from agent_process import AgentProcess, build_model, cli

from agent.runtime.onnx import probe_gpu_providers

NOISE = ("EP Error", "libcublas", "Failed to load library", "Failed to create CUDAExecutionProvider",
         "Please install TensorRT")


def test_auto_providers_load_quietly_and_say_which_are_used(model_files, short_tmp):
    build_model(model_files["anomalib"], short_tmp / "models" / "widget", "widget")
    with AgentProcess(short_tmp, short_tmp / "models", "--execution-providers", "auto") as agent:
        agent.wait_ready()
        started = cli("start-model", "widget", "--wait", "--socket", agent.socket)
        assert started.stdout == "RUNNING\n", started.stderr
        assert agent.stop() == 0
    output = agent.output()
    assert not [word for word in NOISE if word in output], output
    lines = [m for m in agent.messages() if "execution providers usable on this machine" in m]
    assert len(lines) == 1, output
    unusable = probe_gpu_providers(ort.get_available_providers(), Path(os.path.dirname(ort.__file__)) / "capi")
    for provider, why in unusable.items():  # the reason is the loader's own, in that one line
        assert provider in lines[0] and why in lines[0]
    running = [m for m in agent.messages() if "model widget RUNNING on" in m]
    on_cpu = "CUDAExecutionProvider" in unusable  # this machine: no GPU; a GPU machine: CUDA or TensorRT
    assert running and ("CPUExecutionProvider" in running[0]) == on_cpu, running
