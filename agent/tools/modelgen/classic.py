"""Generators for plain (non-anomalib) classification and segmentation models.

Both are exact, hand-built functions of the input so tests can predict their
outputs pixel for pixel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from agent.tools.modelgen.anomalib import (
    RAW_THRESHOLD,
    GraphBuilder,
    _add_distance,
    _check_size,
    reference_distance,
    save_model,
)

__all__ = [
    "CLASSIFIER_GAIN",
    "SEGMENTER_GAIN",
    "SEGMENTER_MARGIN",
    "reference_classifier_logit",
    "reference_segmenter_logits",
    "build_classifier",
    "build_segmenter",
]

# Classifier: z = GAIN * (max_pixel_distance_from_grey - 0.3).
CLASSIFIER_GAIN: float = 20.0
# Segmenter: logit_k = GAIN * (dominance of channel k-1 - MARGIN).
SEGMENTER_GAIN: float = 10.0
SEGMENTER_MARGIN: float = 0.2


def reference_classifier_logit(image: np.ndarray) -> float:
    """numpy value of ``z`` for :func:`build_classifier` (uint8 HxWx3 RGB)."""
    return float(CLASSIFIER_GAIN * (reference_distance(image).max() - RAW_THRESHOLD))


def build_classifier(
    path: Path,
    *,
    image_size: tuple[int, int] = (64, 64),
    input_name: str = "input",
    output_name: str = "score",
    logits: bool = False,
    score_rank: int = 1,
    external_data: bool = False,
) -> Path:
    """Write a plain image classifier (anomalous vs. normal).

    Contract: input ``input_name`` float32 [1,3,H,W] RGB 0..1 (no mean/std
    normalisation).  With ``z = 20 * (max_p ||rgb(p) - 0.5||_2 - 0.3)``:

    * ``logits=False``: output ``output_name`` float32 = ``sigmoid(z)``, the
      anomaly probability, shape [1] (``score_rank=1``) or [1,1]
      (``score_rank=2``);
    * ``logits=True``: output ``output_name`` float32 [1,2] = ``[-z/2, z/2]``
      so ``softmax(...)[1] = sigmoid(z)`` and class 1 means anomalous.

    Examples: uniform (128,128,128) grey -> z = -5.93, probability 0.0027
    (class 0); a grey image with any saturated-colour pixel, e.g. a red 16x16
    square -> z = 11.3, probability 0.99999 (class 1).  The decision boundary
    is a pixel at colour distance 0.3 from mid-grey, as in the anomalib
    builders.  :func:`reference_classifier_logit` gives ``z`` in numpy.
    """
    h, w = _check_size(image_size)
    if score_rank not in (1, 2):
        raise ValueError("score_rank must be 1 ([1]) or 2 ([1,1])")
    g = GraphBuilder()
    d = _add_distance(g, input_name, h, w, full_stats=True)
    dmax = g.op("ReduceMax", [d], axes=[1, 2, 3], keepdims=0)  # [1]
    z = g.op("Mul", [g.op("Sub", [dmax, g.const("threshold", RAW_THRESHOLD)]), g.const("gain", CLASSIFIER_GAIN)])
    if logits:
        zc = g.op("Unsqueeze", [z, g.const("unsq_axes", [1], dtype=np.int64)])  # [1,1]
        # [-z/2, z/2]: symmetric logits whose softmax is [1-sigmoid(z), sigmoid(z)].
        g.op("Mul", [zc, g.const("logit_signs", [[-0.5, 0.5]])], output_name)
        out_shape = [1, 2]
    else:
        p = g.op("Sigmoid", [z])
        if score_rank == 2:
            g.op("Unsqueeze", [p, g.const("unsq_axes", [1], dtype=np.int64)], output_name)
        else:
            g.op("Identity", [p], output_name)
        out_shape = [1] if score_rank == 1 else [1, 1]
    model = g.model(
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, 3, h, w])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, out_shape)],
        graph_name="classifier_distance",
        doc=build_classifier.__doc__ or "",
        metadata={"generator": "agent.tools.modelgen.build_classifier", "format": "classification"},
    )
    return save_model(model, Path(path), external_data=external_data)


def reference_segmenter_logits(image: np.ndarray, n_classes: int = 3) -> np.ndarray:
    """numpy value of the ``logits`` [1,C,H,W] of :func:`build_segmenter`.

    ``image`` is uint8 HxWx3 RGB (divided by 255) or float HxWx3 in 0..1.
    """
    arr = np.asarray(image)
    x = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)
    x = x.transpose(2, 0, 1)
    out = [np.zeros(x.shape[1:])]
    for c in range(n_classes - 1):
        others = np.max(np.delete(x, c, axis=0), axis=0)
        out.append(SEGMENTER_GAIN * (x[c] - others - SEGMENTER_MARGIN))
    return np.stack(out)[None].astype(np.float32)


def build_segmenter(
    path: Path,
    *,
    image_size: tuple[int, int] = (64, 64),
    n_classes: int = 3,
    input_name: str = "input",
    output_name: str = "logits",
    external_data: bool = False,
) -> Path:
    """Write a semantic-segmentation model that labels dominant colours.

    Contract: input ``input_name`` float32 [1,3,H,W] RGB scaled to 0..1 and
    *not* ImageNet-normalised (the caller must not apply mean/std); output
    ``output_name`` float32 [1,C,H,W] logits, C = ``n_classes`` in 2..4.

    Class 0 is background with logit 0.  Class k >= 1 is "channel k-1
    dominates": ``logit_k = 10 * (x[k-1] - max(other two channels) - 0.2)``
    (k=1 red, k=2 green, k=3 blue).  So argmax over classes is k exactly
    where channel k-1 exceeds both other channels by more than 0.2, and 0
    elsewhere (at most one channel can dominate a pixel).  E.g. with
    ``n_classes=3``: a grey background with a pure-red 16x16 square and a
    pure-green 8x8 square gives a mask of 256 class-1 pixels, 64 class-2
    pixels and the rest class 0; (200,40,40) is red, (150,120,120) is
    background.  :func:`reference_segmenter_logits` gives the logits in
    numpy.
    """
    h, w = _check_size(image_size)
    if not 2 <= n_classes <= 4:
        raise ValueError("n_classes must be 2..4 (background + up to R, G, B)")
    g = GraphBuilder()
    r, gr, b = "chan_r", "chan_g", "chan_b"
    g.nodes.append(
        helper.make_node(
            "Split",
            [input_name, g.const("split_sizes", [1, 1, 1], dtype=np.int64)],
            [r, gr, b],
            axis=1,
            name="split_rgb",
        )
    )
    chans = [r, gr, b]
    # Background logit: a constant 0 plane, built from the input so it
    # follows the input shape without a large initialiser.
    zero = g.op("Mul", [r, g.const("zero", 0.0)])
    outs = [zero]
    gain = g.const("gain", SEGMENTER_GAIN)
    margin = g.const("margin", SEGMENTER_MARGIN)
    for k in range(1, n_classes):
        c = k - 1
        others = [chans[j] for j in range(3) if j != c]
        dom = g.op("Sub", [chans[c], g.op("Max", others)])
        outs.append(g.op("Mul", [g.op("Sub", [dom, margin]), gain]))
    g.op("Concat", outs, output_name, axis=1)
    model = g.model(
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, 3, h, w])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [1, n_classes, h, w])],
        graph_name="segmenter_dominant_colour",
        doc=build_segmenter.__doc__ or "",
        metadata={"generator": "agent.tools.modelgen.build_segmenter", "format": "segmentation"},
    )
    return save_model(model, Path(path), external_data=external_data)
