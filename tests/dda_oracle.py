"""Test oracle: DDA's pre- and post-processing re-implemented with numpy + cv2, line by line.

Copied into the tests from the project's research notes (/work/research/dda_reference.py) and used by
tests/core/test_dda.py and tests/serving/test_default_clients.py to compute what DDA would answer.
Attribution: derived from awslabs/DefectDetectionApplication (Apache-2.0), see below.

Reference (test-oracle) re-implementation of DDA's pre- and post-processing.

Mirrors awslabs/DefectDetectionApplication (Apache-2.0), snapshot commit
d1e46b5ef7b06292ac7231bc134fa749fbdcd6e2, files under src/backend/:
  lyra_science_processing_utils/model_processors/basic_preprocessor.py          (BP)
  lyra_science_processing_utils/model_processors/supervised_multihead_postprocessor.py (SMP)
  lyra_science_processing_utils/model_graphs/single_stage_model_graph.py        (SSG)
  lyra_science_processing_utils/model_config.py                                 (MC)
  lyra_science_processing_utils/utils/__init__.py                               (UT)
  lyra_science_processing_utils/utils/score_calibrator.py                       (CAL)
  lyra_anomalies_mask_utils/__init__.py                                         (AMU)
  dda_triton/resources_for_copy/lfv_model_template.py                           (LMT)
Copyright 2025 Amazon Web Services, Inc. Licensed under the Apache License, Version 2.0
(http://www.apache.org/licenses/LICENSE-2.0). This file is a derivative re-implementation for
testing purposes; line numbers in comments refer to the snapshot above.

Only numpy and cv2 (opencv-python-headless) are needed. Covers the single-stage "mochi"
(supervised_multi_head_model) path: classification head, segmentation head, or both.
Not covered: polar transform_preprocessing, two-stage graphs, bbox ("dango"), other stage types.

`manifest` arguments are the whole manifest.json dict ({"model_graph": ..., ...}); `stage`
arguments are one entry of manifest["model_graph"]["stages"].
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

# BP:34-35 - fixed ImageNet constants, shape (3,1,1), float32. Not configurable in the manifest.
MEAN = np.array([[[0.485]], [[0.456]], [[0.406]]], dtype=np.float32)
STD = np.array([[[0.229]], [[0.224]], [[0.225]]], dtype=np.float32)

# AMU:6-114 - DEFAULT_ANOMALY_MASK_PALETTE, 104 RGB entries, index = class id.
DEFAULT_ANOMALY_MASK_PALETTE = np.array(
    [
        [255, 255, 255], [35, 164, 54], [20, 163, 179], [247, 105, 2], [147, 128, 255],
        [189, 16, 224], [70, 124, 230], [160, 147, 8], [0, 148, 189], [204, 119, 0],
        [88, 86, 214], [214, 28, 176], [0, 122, 255], [138, 110, 0], [44, 160, 44],
        [49, 130, 189], [230, 85, 13], [130, 105, 255], [255, 46, 220], [37, 50, 234],
        [124, 159, 30], [84, 166, 17], [24, 165, 153], [246, 103, 60], [163, 88, 255],
        [255, 67, 103], [109, 128, 252], [152, 152, 27], [65, 117, 5], [0, 152, 194],
        [173, 73, 74], [108, 115, 255], [252, 59, 220], [67, 59, 247], [159, 150, 30],
        [44, 170, 44], [24, 160, 175], [230, 115, 0], [132, 116, 212], [222, 115, 122],
        [148, 103, 189], [99, 121, 57], [149, 149, 9], [44, 147, 165], [132, 60, 57],
        [50, 48, 197], [222, 94, 184], [82, 84, 163], [117, 136, 68], [49, 163, 84],
        [20, 149, 243], [231, 111, 113], [38, 36, 148], [234, 98, 157], [107, 110, 207],
        [123, 150, 49], [62, 156, 43], [71, 156, 205], [190, 78, 22], [93, 91, 215],
        [123, 65, 115], [136, 139, 215], [122, 141, 52], [70, 164, 72], [64, 154, 196],
        [172, 118, 79], [126, 64, 203], [165, 81, 148], [51, 150, 255], [140, 109, 49],
        [63, 149, 55], [31, 119, 180], [214, 39, 40], [251, 70, 206], [206, 109, 189],
        [117, 107, 177], [173, 145, 52], [76, 166, 58], [0, 160, 204], [235, 109, 0],
        [207, 99, 144], [207, 114, 193], [132, 127, 184], [180, 133, 24], [133, 155, 59],
        [0, 112, 143], [184, 132, 127], [255, 79, 77], [57, 59, 121], [182, 138, 43],
        [124, 126, 2], [0, 144, 184], [166, 87, 8], [90, 142, 214], [214, 97, 107],
        [142, 44, 157], [120, 120, 38], [84, 141, 22], [0, 109, 139], [235, 112, 5],
        [48, 150, 209], [140, 86, 75], [114, 24, 119], [133, 136, 2],
    ],
    dtype=np.uint8,
)
assert DEFAULT_ANOMALY_MASK_PALETTE.shape == (104, 3)

BLANK_CLASSES = {"names": [], "normal_ids": []}  # MC:31-34


# ----------------------------------------------------------------------------------------------
# Manifest helpers
# ----------------------------------------------------------------------------------------------
def get_stage(manifest: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """MC:43-56 - returns stage `index` with the three class dicts merged in (as ModelConfig does)."""
    graph = manifest["model_graph"]
    stage = dict(graph["stages"][index])
    for key in ("image_level_classes", "pixel_level_classes", "bbox_level_classes"):
        stage[key] = graph.get(key, BLANK_CLASSES)
    return stage


def pixel_level_class_names(manifest: dict[str, Any]) -> list[str]:
    """MC:93-94 (get_pixel_level_classes) - names only; normal_ids are never used by DDA."""
    return list(manifest["model_graph"].get("pixel_level_classes", BLANK_CLASSES)["names"])


# ----------------------------------------------------------------------------------------------
# Pre-processing
# ----------------------------------------------------------------------------------------------
def dda_preprocess(image: np.ndarray, stage: dict[str, Any]) -> np.ndarray:
    """BasicPreProcessor.__call__ (BP:40-78), single-stage path (resize_to_height=None).

    :param image: uint8, (H,W) or (H,W,C) with C in {1,3,4}. Must already be RGB(A) - DDA does no
        BGR->RGB here (file loading does it: UT:74-86).
    :returns: float32 (1,3,image_height,image_width).
    """
    # BP:47-49 shape validation
    if (len(image.shape) == 3 and image.shape[2] not in [1, 3, 4]) or len(image.shape) not in [2, 3]:
        raise ValueError(f"Expected an image with shape (H,W,3) or (H,W), instead got {image.shape}")
    # BP:51 interpolation: stage['interpolation'] (cv2 int code) or INTER_AREA (=3)
    interpolation = stage["interpolation"] if "interpolation" in stage else cv2.INTER_AREA
    # BP:59-60 resize FIRST, dsize=(width, height)
    out = cv2.resize(image, (stage["image_width"], stage["image_height"]), interpolation=interpolation)
    # BP:62-67 channel fix-ups after resize (cv2.resize drops a trailing 1-channel axis)
    if len(out.shape) == 2 or out.shape[2] == 1:
        out = cv2.cvtColor(out, cv2.COLOR_GRAY2RGB)
    if out.shape[2] == 4:
        out = cv2.cvtColor(out, cv2.COLOR_RGBA2RGB)
    # BP:70 -> (1,C,H,W) float32
    out = np.expand_dims(out, axis=0).transpose((0, 3, 1, 2)).astype(np.float32)
    # BP:72-73 (key required; truthiness)
    if stage["image_range_scale"]:
        out /= 255.0
    # BP:75-76 (key required; truthiness) - result stays float32 (MEAN/STD are float32)
    if stage["normalize"]:
        out = (out - MEAN) / STD
    return out


# ----------------------------------------------------------------------------------------------
# Score helpers
# ----------------------------------------------------------------------------------------------
def get_final_anomaly_pred(pred: np.ndarray, ignore_channels: Sequence[int]) -> np.ndarray:
    """SMP:99-111 _get_final_anomaly_pred: sum over non-normal channels of pred[0]. No softmax."""
    n_channels = pred.shape[1]
    anomaly_ids = [c for c in range(n_channels) if c not in ignore_channels]
    pred = np.take(pred, anomaly_ids, axis=1)
    return np.sum(pred, axis=1)[0]


def calibrate_score(score: float, stage: dict[str, Any]) -> float:
    """SMP:43-45,61-62 + CAL:66-87 - sklearn CalibratedClassifierCV(method='sigmoid') with
    a_ = calibrator_scaling, b_ = calibrator_shift: p = 1 / (1 + exp(a*s + b)), where
    s = score / max_val_score if max_val_score > 1 else score."""
    max_val = stage["max_val_score"]
    s = score / max_val if max_val > 1 else score
    a, b = float(stage["calibrator_scaling"]), float(stage["calibrator_shift"])
    z = a * float(s) + b
    # sklearn's expit(-z); written overflow-safe
    return float(1.0 / (1.0 + math.exp(z))) if z < 700 else 0.0


def get_label(score: float, threshold: float) -> str:
    """UT:31-36 - 4-digit rounding; equality => 'anomaly'."""
    return "normal" if round(score, 4) < round(threshold, 4) else "anomaly"


def get_confidence(score: float, label: str) -> float:
    """UT:38-43 - clip to [0,1]; normal -> 1-score, anomaly -> score."""
    score = max(min(score, 1.0), 0.0)
    return 1 - score if label == "normal" else score


def override_class_label(label: str, mask: np.ndarray | None, classification_logic: str | None,
                         seg_normal_ids: Sequence[int]) -> str:
    """SSG:74-92 _overide_class_label."""
    if mask is None or classification_logic == "cls_head":
        return label
    labels = np.unique(mask)
    seg_label = "normal" if set(labels.tolist()) <= set(seg_normal_ids) else "anomaly"
    if classification_logic == "seg_head":
        return seg_label
    if classification_logic == "cls_and_seg":
        return "normal" if label != seg_label else label
    if classification_logic == "cls_or_seg":
        return "anomaly" if label != seg_label else label
    raise ValueError(f"Unrecongized classification logic {classification_logic}")


# ----------------------------------------------------------------------------------------------
# SupervisedMultiHeadPostProcessor + SingleStageModelGraph.predict
# ----------------------------------------------------------------------------------------------
def _multihead_postprocess(outputs: Sequence[np.ndarray], stage: dict[str, Any],
                           mask_out_hw: tuple[int, int] | None) -> tuple[float | None, np.ndarray | None]:
    """SMP:49-97. Returns (score, class-index mask or None)."""
    score = None
    mask = None
    calibrated = stage.get("calibrated", False)  # SMP:41
    cls_on = stage["classification_head_enabled"]
    seg_on = stage["segmentation_head_enabled"]
    if cls_on and seg_on:
        mask, score = outputs[0], outputs[1]  # SMP:59 - ORDER: seg output FIRST, cls output SECOND
        score = get_final_anomaly_pred(score, stage["class_normal_ids"])
        if calibrated:
            score = calibrate_score(score, stage)
    elif cls_on:
        score = get_final_anomaly_pred(outputs[0], stage["class_normal_ids"])  # SMP:63-65
        if calibrated:
            score = calibrate_score(score, stage)
    elif seg_on:
        mask = outputs[0]  # SMP:68-69
    else:
        raise ValueError("No heads were enabled for supervised multi-head model")
    if mask is not None:
        mask = np.array(mask, copy=True)  # DDA mutates in place (recall bias); don't touch caller data
        if score is None:
            score = np.mean(mask)  # SMP:73-74 - mean of the raw (1,C,h,w) tensor
        bias = stage.get("seg_recall_bias", None)  # SMP:46,76-79
        if bias is not None:
            for i in range(mask[0].shape[0]):
                if i not in stage["seg_normal_ids"]:
                    mask[0][i][:, :] += bias
        mask = np.argmax(mask.squeeze(0), axis=0)  # SMP:80 - (h,w) int64
        # SMP:93 - resize to raw_image_shape ([H,W]) reversed -> dsize (W,H), nearest.
        # (The oracle lets callers pass the actual camera image size instead; DDA always uses the manifest.)
        hw = mask_out_hw if mask_out_hw is not None else tuple(stage["raw_image_shape"])
        # cv2 < 4.? rejects int64; DDA relies on the installed cv2 accepting it. int32 is value-identical.
        mask = cv2.resize(mask.astype(np.int32), (int(hw[1]), int(hw[0])), interpolation=cv2.INTER_NEAREST)
    score = score if score is None else float(score)  # SMP:94
    return score, mask


def _finalize(score: float | None, mask: np.ndarray | None, stage: dict[str, Any]):
    """SSG:54-56,115-119 - label, optional override, confidence (in that order)."""
    threshold = stage["threshold"]
    classification_logic = stage.get("classification_logic")
    seg_normal_ids = stage.get("seg_normal_ids")
    label = None
    confidence = None
    if score is not None:
        label = get_label(score, threshold)
        if score <= 1.0 and classification_logic is not None and seg_normal_ids is not None:
            label = override_class_label(label, mask, classification_logic, seg_normal_ids)
        confidence = get_confidence(score, label)
    return label, confidence


def dda_postprocess_classification(outputs: Sequence[np.ndarray], manifest: dict[str, Any]) -> dict[str, Any]:
    """Classification-only mochi model. outputs[0]: (1,K) class probabilities (already softmaxed
    by the graph). Returns dict(score, is_anomalous, confidence, label)."""
    stage = get_stage(manifest, 0)
    score, mask = _multihead_postprocess(outputs, stage, mask_out_hw=(1, 1))
    label, confidence = _finalize(score, mask, stage)
    return {"score": score, "is_anomalous": label == "anomaly", "confidence": confidence, "label": label}


def convert_index_mask_to_color_mask(mask: np.ndarray,
                                     palette: np.ndarray = DEFAULT_ANOMALY_MASK_PALETTE) -> np.ndarray:
    """AMU:117-136 - uint8 cast then palette lookup -> (H,W,3) uint8 RGB."""
    if mask.dtype != np.dtype(np.uint8):
        mask = mask.astype(np.uint8)
    max_value_in_mask = int(mask.max())
    return palette[: max_value_in_mask + 1][mask]


def get_classes_areas(mask: np.ndarray) -> list[tuple[int, float]]:
    """AMU:164-183 - (class_index, fraction of pixels) for every class present, INCLUDING normal ones."""
    if len(mask.shape) != 2:
        raise ValueError(f"Unexpected mask shape ${mask.shape}.")
    image_area = mask.shape[1] * mask.shape[0]
    pixels_per_class = np.bincount(mask.ravel())
    return [(i, c / image_area) for i, c in enumerate(pixels_per_class) if c > 0]


def hex_color_string(color: Sequence[int]) -> str:
    """AMU:186-203 - '#RRGGBB' uppercase."""
    if len(color) != 3:
        raise ValueError(f"Unexpected color format {color}. Color must contain 3 int elements.")
    for channel in color:
        if not isinstance(channel, int) or channel > 255 or channel < 0:
            raise ValueError(f"Unexpected color format {color}. Color must contain 3 int elements in range [0, 255].")
    return f"#{color[0]:02X}{color[1]:02X}{color[2]:02X}"


def dda_postprocess_segmentation(outputs: Sequence[np.ndarray], manifest: dict[str, Any],
                                 image_hw: tuple[int, int] | None = None) -> dict[str, Any]:
    """Segmentation mochi model (with or without classification head).

    outputs: [seg (1,C,h,w) per-class probabilities, cls (1,K)] when both heads are enabled
    (seg FIRST), or [seg] for seg-only. image_hw: size to resize the class mask to; None => the
    stage's raw_image_shape, which is exactly what DDA does (SMP:93).

    Returns dict(score, is_anomalous, confidence, label, class_mask (H,W) int32,
    color_mask (H,W,3) uint8 or None, anomalies=[(name, area_fraction, hex)]).
    """
    stage = get_stage(manifest, 0)
    score, mask = _multihead_postprocess(outputs, stage, mask_out_hw=image_hw)
    label, confidence = _finalize(score, mask, stage)
    names = pixel_level_class_names(manifest)
    anomalies: list[tuple[str, float, str]] = []
    color_mask = None
    # LMT:305-319 - only if a mask exists AND pixel_level_classes.names is non-empty
    if mask is not None and len(names):
        color_mask = convert_index_mask_to_color_mask(mask)
        anomalies = [
            (names[i], area, hex_color_string(DEFAULT_ANOMALY_MASK_PALETTE[i].tolist()))
            for i, area in get_classes_areas(mask)
        ]
    return {
        "score": score,
        "is_anomalous": label == "anomaly",
        "confidence": confidence,
        "label": label,
        "class_mask": mask,
        "color_mask": color_mask,
        "anomalies": anomalies,
    }


def anomalies_json(anomalies: list[tuple[str, float, str]]) -> str:
    """LMT:310-321 - the JSON the Triton base model emits (json.dumps default separators)."""
    return json.dumps([{"name": n, "total_percentage_area": a, "hex_color": h} for n, a, h in anomalies])


def run_dda(root: Any, image: np.ndarray) -> dict[str, Any]:
    """What DDA answers for an RGB frame and a package directory: manifest → <stage type>/<runtime_artifact>
    in ONNX Runtime (all outputs, graph order, as DDA's OnnxRunner) → the post-processing above."""
    from pathlib import Path

    import onnxruntime as ort

    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text())
    stage = get_stage(manifest)
    session = ort.InferenceSession(str(root / stage["type"] / (manifest.get("runtime_artifact") or "model.onnx")),
                                   providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: dda_preprocess(image, stage)})
    if stage["segmentation_head_enabled"]:
        return dda_postprocess_segmentation(outputs, manifest)
    return dda_postprocess_classification(outputs, manifest)
