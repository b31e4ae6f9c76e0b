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
        (short_tmp / "b").mkdir()
        Image.fromarray(grey_with_square(box=(40, 40, 56, 56))).save(short_tmp / "b" / "defect.png")
        # --socket as a bare path and as a URI; the overlay directory does not exist yet; two inputs share a name
        for extra, socket in (([], str(short_tmp / "cli.sock")), (["--shm"], sock)):
            out_dir = short_tmp / f"overlays{len(extra)}" / "new"
            result = cli("detect", "--socket", socket, "--model", "widget", str(normal), str(defect),
                         str(short_tmp / "b" / "defect.png"), "--overlay", str(out_dir / "ov.png"), *extra)
            assert result.returncode == 0, result.stderr
            lines = [json.loads(line) for line in result.stdout.splitlines()]
            assert [r["is_anomalous"] for r in lines] == [False, True, True]
            assert lines[1]["anomalies"][1] == {"name": "anomaly", "hex_color": "#23A436",
                                                "total_percentage_area": 0.0625}
            assert [r["overlay"] for r in lines] == [str(out_dir / n) for n in ("ov-normal.png", "ov-defect.png",
                                                                                 "ov-defect-2.png")]
            overlay = np.asarray(Image.open(out_dir / "ov-defect.png")).astype(int)
            assert overlay[8, 8].tolist() == [0x23, 0xA4, 0x36]  # the defect's outline, in its class colour
            assert overlay[16, 16].tolist() != [255, 0, 0] and overlay[16, 16][0] > 180  # lightly tinted: still red
            assert (overlay[40, 40] == 128).all()  # untouched elsewhere
            second = np.asarray(Image.open(out_dir / "ov-defect-2.png")).astype(int)
            assert second[40, 40].tolist() == [0x23, 0xA4, 0x36] and (second[10, 10] == 128).all()
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
