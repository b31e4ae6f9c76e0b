"""`edge-agent detect`: a small LFV client — one JSON result per image, optional overlay PNG."""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from agent.core.frames import SHM_DIR
from agent.serving.grpc._generated import edge_agent_pb2 as pb
from agent.serving.grpc._generated import edge_agent_pb2_grpc as pb_grpc


@contextmanager
def shm_segment(name: str, size: int) -> Iterator[mmap.mmap]:
    """A client-owned POSIX shm segment (created, mapped, unlinked on exit) — what LFV clients do."""
    path = os.path.join(SHM_DIR, name.lstrip("/"))
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o660)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    try:
        yield mm
    finally:
        mm.close()
        os.unlink(path)


def channel(socket: str) -> grpc.Channel:
    """A channel to the agent: `unix:///path`, a bare socket path, or HOST:PORT (agent.cli.common.socket_uri)."""
    from agent.cli.common import socket_uri

    return grpc.insecure_channel(socket_uri(socket),
                                 options=[("grpc.max_receive_message_length", 64 * 1024 * 1024 + 4096),
                                          ("grpc.max_send_message_length", 64 * 1024 * 1024 + 4096)])


def detect(stub: pb_grpc.EdgeAgentStub, model: str, image: np.ndarray, use_shm: bool, timeout: float = 60.0) \
        -> tuple[pb.DetectAnomalyResult, np.ndarray | None]:
    """Send one HxWx3 RGB image; returns the result and the mask (HxWx3) if the model made one."""
    height, width = image.shape[:2]
    data = np.ascontiguousarray(image, dtype=np.uint8)
    if not use_shm:
        request = pb.DetectAnomaliesRequest(model_component=model, bitmap=pb.Bitmap(
            width=width, height=height, byte_data=data.tobytes()))
        result = stub.DetectAnomalies(request, timeout=timeout).detect_anomaly_result
        mask = None
        if result.anomaly_mask.byte_data:
            mask = np.frombuffer(result.anomaly_mask.byte_data, np.uint8).reshape(
                result.anomaly_mask.height, result.anomaly_mask.width, 3)
        return result, mask
    base = f"/edge-agent-detect-{os.getpid()}"
    with shm_segment(base + "-in", data.nbytes) as frame, shm_segment(base + "-mask", data.nbytes) as mask_mm:
        frame[:] = data.tobytes()
        request = pb.DetectAnomaliesRequest(
            model_component=model,
            bitmap=pb.Bitmap(width=width, height=height, shared_memory_handle=pb.SharedMemoryHandle(
                name=base + "-in", size=data.nbytes, offset=0)),
            anomaly_mask_params=pb.AnomalyMaskParams(shared_memory_handle=pb.SharedMemoryHandle(
                name=base + "-mask", size=data.nbytes, offset=0)))
        result = stub.DetectAnomalies(request, timeout=timeout).detect_anomaly_result
        mask = None
        if result.anomaly_mask.HasField("shared_memory_handle"):
            mw, mh = result.anomaly_mask.width, result.anomaly_mask.height  # the frame's, or raw_image_shape
            mask = np.frombuffer(mask_mm, np.uint8, count=mw * mh * 3).reshape(mh, mw, 3).copy()
        return result, mask


def result_json(path: str, result: pb.DetectAnomalyResult) -> dict[str, Any]:
    return {
        "image": path,
        "is_anomalous": result.is_anomalous,
        "confidence": round(result.confidence, 6),
        "anomaly_score": round(result.anomaly_score, 6),
        "anomaly_threshold": round(result.anomaly_threshold, 6),
        "anomalies": [{"name": a.name, "hex_color": a.pixel_anomaly.hex_color,
                       "total_percentage_area": round(a.pixel_anomaly.total_percentage_area, 6)}
                      for a in result.anomalies],
    }


def overlay(image: np.ndarray, mask: np.ndarray | None, tint: float = 0.2) -> Image.Image:
    """The image with each anomaly outlined in its class colour and lightly tinted inside (white = background).

    The outline is what shows where the defect is: a heavy tint mixes the class colour with the defect's own
    (a red defect under LFV's green turned olive); a light one keeps the defect's colour recognisable."""
    if mask is None:
        return Image.fromarray(image)
    if mask.shape[:2] != image.shape[:2]:  # scaled to fit the response (InlineMask=fit) or raw_image_shape
        mask = np.asarray(Image.fromarray(mask).resize((image.shape[1], image.shape[0]), Image.Resampling.NEAREST))
    out = image.astype(np.float32)
    hit = np.any(mask != 255, axis=2)
    out[hit] = (1 - tint) * out[hit] + tint * mask[hit].astype(np.float32)
    # Outline: anomaly pixels next to a pixel of another colour (background or another class), thickened
    # to about 1/256 of the image so it stays visible on large frames.
    edge = np.zeros_like(hit)
    for axis in (0, 1):
        for step in (1, -1):
            neighbour = np.roll(mask, step, axis=axis)
            differs = np.any(neighbour != mask, axis=2)
            # np.roll wraps around: the wrapped row/column is not a neighbour
            if axis == 0:
                differs[0 if step == 1 else -1, :] = False
            else:
                differs[:, 0 if step == 1 else -1] = False
            edge |= differs
    edge &= hit
    for _ in range(max(1, round(min(hit.shape) / 256)) - 1):
        grown = edge.copy()
        grown[1:] |= edge[:-1]
        grown[:-1] |= edge[1:]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        edge = grown & hit
    out[edge] = mask[edge]
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def overlay_paths(out: Path, images: list[str]) -> list[Path]:
    """Where each image's overlay goes: OUT itself for one image; OUT-<image stem><suffix> for several, with
    -2, -3... after a stem that repeats (a/part.png and b/part.png must not overwrite one file)."""
    if len(images) == 1:
        return [out]
    suffix = out.suffix or ".png"
    seen: dict[str, int] = {}
    paths = []
    for image in images:
        stem = Path(image).stem
        seen[stem] = seen.get(stem, 0) + 1
        name = f"{out.stem}-{stem}" + (f"-{seen[stem]}" if seen[stem] > 1 else "")
        paths.append(out.with_name(name + suffix))
    return paths


def run(args: argparse.Namespace) -> int:
    failures = 0
    overlays = overlay_paths(args.overlay, args.images) if args.overlay else []
    if overlays:
        try:
            args.overlay.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"edge-agent detect: cannot create the --overlay directory {args.overlay.parent}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 1
    with channel(args.socket) as ch:
        stub = pb_grpc.EdgeAgentStub(ch)
        for i, path in enumerate(args.images):
            try:
                image = np.asarray(Image.open(path).convert("RGB"))
                result, mask = detect(stub, args.model, image, args.shm, args.timeout)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    from agent.cli.models import unavailable_reason

                    print(f"edge-agent detect: agent not reachable on {args.socket} "
                          f"({unavailable_reason(exc.details())})", file=sys.stderr)
                    return 1
                print(f"{path}: {exc.code().name}: {exc.details()}", file=sys.stderr)
                failures += 1
                continue
            except OSError as exc:
                print(f"{path}: cannot read image: {exc}", file=sys.stderr)
                failures += 1
                continue
            line = result_json(path, result)
            if overlays:
                try:
                    overlay(image, mask).save(overlays[i])
                    line["overlay"] = str(overlays[i])
                except (OSError, ValueError) as exc:
                    print(f"{path}: cannot write the overlay {overlays[i]}: {exc}", file=sys.stderr)
                    failures += 1
            print(json.dumps(line))
    return 1 if failures else 0
