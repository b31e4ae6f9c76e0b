#!/usr/bin/env python3
"""The demo (README command 1): a real model, a real agent, a real client.

1. Train a PaDiM-style detector (agent.tools.modelgen.padim) on generated normal textures; export ONNX.
2. Package it with `edge-agent model build`.
3. Start `edge-agent serve` on a private socket with the package directory as --models-dir.
4. StartModel over gRPC and poll DescribeModel until RUNNING (as LFV clients do).
5. Run `edge-agent detect` on a normal and a defective image, with an overlay PNG.
6. Check that the two are told apart, stop the agent with SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from agent.client import channel
from agent.serving.grpc._generated import edge_agent_pb2 as pb
from agent.serving.grpc._generated import edge_agent_pb2_grpc as pb_grpc
from agent.tools.modelgen import defective_texture, normal_texture, train_padim

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent / "edge-agent"
MODEL = "demo-textile-inspector"


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    print("$ " + " ".join(args), flush=True)
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        sys.exit(f"command failed ({result.returncode}): {result.stderr.strip()}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "demo-out", help="output directory (default demo-out/)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    out: Path = args.out
    shutil.rmtree(out, ignore_errors=True)
    (out / "onnx").mkdir(parents=True)
    rng = np.random.default_rng(args.seed)
    size = (128, 128)

    step("1. training a PaDiM-style detector on 40 generated normal textile images")
    t0 = time.perf_counter()
    model = train_padim([normal_texture(rng, size) for _ in range(40)], image_size=size, rng=rng)
    onnx_path = model.export_onnx(out / "onnx" / "model.onnx", external_data=True)
    files = sorted(p.name for p in onnx_path.parent.iterdir())
    print(f"trained and exported in {time.perf_counter() - t0:.1f}s: {files}")

    step("2. packaging it")
    built = run(str(BIN), "model", "build", "--onnx", str(onnx_path), "--name", MODEL, "--out",
                str(out / "models" / MODEL), "--model-version", "1",
                "--arn", "arn:aws:lookoutvision:us-east-1:123456789012:model/textile/1")
    print(built.stdout.strip())

    normal = normal_texture(rng, size)
    defective, truth = defective_texture(rng, size)
    Image.fromarray(normal).save(out / "normal.png")
    Image.fromarray(defective).save(out / "defective.png")

    step("3. starting the agent")
    sock = f"unix:///tmp/edge-agent-demo-{os.getpid()}.sock"
    log = (out / "agent.log").open("w")
    agent = subprocess.Popen([str(BIN), "serve", "--socket", sock, "--models-dir", str(out / "models"),
                              "--work-dir", str(out / "work")], stdout=log, stderr=subprocess.STDOUT)
    try:
        with channel(sock) as ch:
            stub = pb_grpc.EdgeAgentStub(ch)
            deadline = time.monotonic() + 60
            while True:
                if agent.poll() is not None:
                    sys.exit(f"the agent exited with code {agent.returncode}; see {out / 'agent.log'}")
                if time.monotonic() > deadline:
                    sys.exit(f"the agent did not come up with the model; see {out / 'agent.log'}")
                try:
                    if stub.ListModels(pb.ListModelsRequest(), timeout=1).models:
                        break
                except grpc.RpcError:
                    pass  # not listening yet
                time.sleep(0.1)
            listed = stub.ListModels(pb.ListModelsRequest()).models
            states = [(m.model_component, pb.ModelStatus.Name(m.status)) for m in listed]
            print(f"agent up on {sock}; ListModels: {states}")

            step("4. StartModel, then DescribeModel until RUNNING")
            t0 = time.perf_counter()
            status = stub.StartModel(pb.StartModelRequest(model_component=MODEL)).status
            print(f"StartModel -> {pb.ModelStatus.Name(status)}")
            while True:
                desc = stub.DescribeModel(pb.DescribeModelRequest(model_component=MODEL)).model_description
                if desc.status != pb.STARTING:
                    break
                time.sleep(0.05)
            print(f"DescribeModel -> {pb.ModelStatus.Name(desc.status)} after {time.perf_counter() - t0:.2f}s "
                  f"({desc.status_message})")
            if desc.status != pb.RUNNING:
                sys.exit("the model did not start")

            step("5. edge-agent detect on a normal and a defective image")
            result = run(str(BIN), "detect", "--socket", sock, "--model", MODEL, str(out / "normal.png"),
                         str(out / "defective.png"), "--overlay", str(out / "overlay.png"))
            results = [json.loads(line) for line in result.stdout.splitlines()]
            for r in results:
                print(json.dumps(r))
    finally:
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=60)
        log.close()
    print(f"agent stopped with exit code {code}")

    step("6. verdict")
    by_name = {Path(r["image"]).name: r for r in results}
    n, d = by_name["normal.png"], by_name["defective.png"]
    print(f"normal:    anomalous={n['is_anomalous']} score={n['anomaly_score']:.3f}")
    print(f"defective: anomalous={d['is_anomalous']} score={d['anomaly_score']:.3f} "
          f"(true defect covers {truth.mean():.2%} of the image)")
    print(f"overlays:  {out / 'overlay-normal.png'}, {out / 'overlay-defective.png'}")
    if n["is_anomalous"] or not d["is_anomalous"] or code != 0:
        print("FAILED: the detector did not separate the images (or the agent did not stop cleanly)")
        return 1
    print("OK: the normal image passed and the defective one was flagged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
