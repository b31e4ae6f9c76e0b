"""What every peer adapter shares: the Predictor to serve and the tensors it answers with.

The benchmark process (agent.tools.bench.peers) passes the model packages and the agent's ONNX Runtime
options in the environment as JSON, so that every server runs the same packages with the same session options
as the in-process floor: EDGE_AGENT_PEER_MODELS = {"name": "/path/to/package", ...},
EDGE_AGENT_PEER_RUNTIME = the OnnxRuntimeOptions fields. Imports nothing but numpy, Pillow and onnxruntime
(through agent.core / agent.runtime), which every peer's virtualenv has.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

#: V2 tensor names of the request and the answer; the client (agent.tools.bench.peers) uses the same.
INPUT = "frame"
OUTPUTS = ("score", "is_anomalous", "mask")


def load_predictors(only: str | None = None) -> dict[str, Any]:
    """name -> warmed-up Predictor for each package in EDGE_AGENT_PEER_MODELS (or just `only`)."""
    from agent.core.package import load_package
    from agent.core.pipeline import Predictor
    from agent.runtime.onnx import OnnxRuntime, OnnxRuntimeOptions

    options = json.loads(os.environ["EDGE_AGENT_PEER_RUNTIME"])
    runtime = OnnxRuntime(OnnxRuntimeOptions(
        providers=tuple(options["providers"]), intra_op_threads=int(options["intra_op_threads"]),
        inter_op_threads=int(options["inter_op_threads"]), allow_spinning=bool(options["allow_spinning"])))
    predictors = {}
    for name, path in json.loads(os.environ["EDGE_AGENT_PEER_MODELS"]).items():
        if only is not None and name != only:
            continue
        package = load_package(Path(path))
        predictor = Predictor(package, runtime.load(package))
        predictor.warmup(2, np.random.default_rng(0))
        predictors[name] = predictor
    return predictors


def infer(predictor: Any, frame: np.ndarray) -> dict[str, np.ndarray]:
    """The agent's work for one frame (HxWx3 uint8), answered as the three output tensors: the full-size
    mask inline, as the agent sends it to a byte_data client with a 64 MiB channel."""
    from agent.core.masks import MaskPolicy

    detection = predictor.predict(frame, policy=MaskPolicy(inline="full"))
    mask = detection.mask if detection.mask is not None else np.zeros((0, 0, 3), np.uint8)
    return {"score": np.array([detection.score], dtype=np.float32),
            "is_anomalous": np.array([detection.is_anomalous], dtype=bool),
            "mask": np.ascontiguousarray(mask, dtype=np.uint8)}
