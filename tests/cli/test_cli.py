"""The edge-agent command line against a real agent process."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import grey_with_square
from PIL import Image

CLI = [sys.executable, "-m", "agent"]
ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_build_serve_detect_and_sigterm(model_files, short_tmp, pb, pb_modules):
    import grpc

    built = cli("model", "build", "--onnx", str(model_files["anomalib"]), "--name", "widget", "--out",
                str(short_tmp / "models" / "widget"), "--autostart")
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["kind"] == "anomalib"

    sock = f"unix://{short_tmp}/cli.sock"
    agent = subprocess.Popen([*CLI, "serve", "--socket", sock, "--models-dir", str(short_tmp / "models"),
                              "--execution-providers", "cpu", "--work-dir", str(short_tmp / "work"),
                              "--metrics-port", "0", "--log-format", "json"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        with grpc.insecure_channel(sock) as ch:
            stub = pb_modules[1].EdgeAgentStub(ch)
            deadline = time.monotonic() + 30
            while True:
                assert agent.poll() is None, agent.stdout.read()
                assert time.monotonic() < deadline, "agent did not autostart the model"
                try:
                    desc = stub.DescribeModel(pb.DescribeModelRequest(model_component="widget"), timeout=1)
                    if desc.model_description.status == pb.RUNNING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        normal, defect = short_tmp / "normal.png", short_tmp / "defect.png"
        Image.fromarray(grey_with_square(box=None)).save(normal)
        Image.fromarray(grey_with_square(box=(8, 8, 24, 24))).save(defect)
        for extra in ([], ["--shm"]):
            result = cli("detect", "--socket", sock, "--model", "widget", str(normal), str(defect), "--overlay",
                         str(short_tmp / "ov.png"), *extra)
            assert result.returncode == 0, result.stderr
            lines = [json.loads(line) for line in result.stdout.splitlines()]
            assert [r["is_anomalous"] for r in lines] == [False, True]
            assert lines[1]["anomalies"][1] == {"name": "anomaly", "hex_color": "#23A436",
                                                "total_percentage_area": 0.0625}
            overlay = np.asarray(Image.open(short_tmp / "ov-defect.png"))
            assert not (overlay[10, 10] == grey_with_square()[10, 10]).all()  # tinted where the defect is
            assert (overlay[40, 40] == 128).all()  # untouched elsewhere
        assert not [p for p in os.listdir("/dev/shm") if p.startswith("edge-agent-detect-")]
        missing = cli("detect", "--socket", sock, "--model", "nope", str(normal))
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    finally:
        agent.send_signal(signal.SIGTERM)
        out, _ = agent.communicate(timeout=60)
    assert agent.returncode == 0, out
    logs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any("serving on" in entry["message"] for entry in logs)
    assert any("stopped" in entry["message"] for entry in logs)
    if platform.libc_ver()[0] == "glibc":  # MallocMmapThresholdMB's default was applied at start
        assert any("buffers up to 17 MiB are reused" in entry["message"] for entry in logs)
    assert not Path(f"{short_tmp}/cli.sock").exists()


def test_serve_rejects_bad_config_with_a_clear_message(short_tmp):
    result = cli("serve", "--socket", "tcp://0.0.0.0:1", timeout=60)
    assert result.returncode == 2
    assert "Socket" in result.stderr and "unix://" in result.stderr
