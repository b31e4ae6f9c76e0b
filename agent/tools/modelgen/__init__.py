"""Deterministic ONNX model generators with the I/O contracts of real exports.

No weights or datasets are downloaded: every model is built from numpy
arrays with the ``onnx`` helper API (IR version 9, opset 17, so onnxruntime
>= 1.16 can load them).  See each builder's docstring for its exact
input/output contract and the outputs that given images produce.

* :func:`build_anomalib_v2` / :func:`build_tiny` / :func:`build_patchcore_like`
  -- anomalib 2.x contract (pred_score, pred_label, anomaly_map, pred_mask);
* :func:`build_anomalib_v1` -- anomalib 1.x raw map + ``metadata.json``;
* :func:`build_classifier`, :func:`build_segmenter` -- plain models;
* :func:`train_padim` -- a real PaDiM-style detector trained in numpy;
* :func:`normal_texture`, :func:`defective_texture` -- procedural images.
"""

from agent.tools.modelgen.anomalib import (
    build_anomalib_v1,
    build_anomalib_v2,
    build_patchcore_like,
    build_tiny,
    reference_outputs,
    v1_metadata,
)
from agent.tools.modelgen.classic import (
    build_classifier,
    build_segmenter,
    reference_classifier_logit,
    reference_segmenter_logits,
)
from agent.tools.modelgen.padim import PadimModel, train_padim
from agent.tools.modelgen.textures import defective_texture, normal_texture

__all__ = [
    "build_anomalib_v1",
    "build_anomalib_v2",
    "build_patchcore_like",
    "build_tiny",
    "reference_outputs",
    "v1_metadata",
    "build_classifier",
    "build_segmenter",
    "reference_classifier_logit",
    "reference_segmenter_logits",
    "PadimModel",
    "train_padim",
    "normal_texture",
    "defective_texture",
]
