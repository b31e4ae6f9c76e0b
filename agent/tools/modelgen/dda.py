"""DDA / Lookout for Vision style models and packages, for tests and demos.

DDA's supervised multi-head model ("mochi") outputs per-class *probabilities* (DDA applies no softmax):
a classification head [1,K] and/or a segmentation head [1,C,H,W], seg first when both are present.
The builders here emit exactly that contract from small hand-built graphs whose input is DDA's
pre-processed tensor (RGB, /255, ImageNet mean/std when the manifest says ``normalize: true``), and
:func:`write_dda_package` lays a package out as DDA does (``manifest.json`` + ``<stage type>/model.onnx``).
:func:`write_neo_package` writes the *layout* of a legacy Neo/DLR-compiled LFV package (placeholder
files: no real compiled artifact is public) for the tests that check such packages are recognised.
Sizes are (width, height) throughout this module, as in DDA's manifests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper

from agent.tools.modelgen.anomalib import GraphBuilder, _check_size, save_model

__all__ = [
    "build_dda_classifier",
    "build_dda_segmenter",
    "dda_manifest",
    "write_dda_package",
    "write_neo_package",
]


def _two_class(g: GraphBuilder, z: str, normal_index: int, output: str) -> str:
    """[1,2] probabilities from an anomaly logit z [1]: P(anomaly) = sigmoid(z) at 1 - normal_index."""
    zc = g.op("Unsqueeze", [z, g.const(f"{output}_axes", [1], dtype=np.int64)])  # [1,1]
    signs = [[0.5, -0.5]] if normal_index == 1 else [[-0.5, 0.5]]
    return g.op("Softmax", [g.op("Mul", [zc, g.const(f"{output}_signs", signs)])], output, axis=1)


def build_dda_classifier(path: Path, *, image_size: tuple[int, int] = (64, 48), normal_index: int = 1,
                         output_name: str = "cls") -> Path:
    """A classification-only mochi model: input ``input`` float32 [1,3,H,W] (DDA-pre-processed), output
    ``output_name`` float32 [1,2] class probabilities, the normal class at ``normal_index`` (real LFV
    packages have ``names: ["anomaly", "normal"]``, normal id 1).

    Anomaly logit ``z = 3 * (max_pixels(x_r - x_g) - 1) + 0.25 * mean(x * x)``: a red region on grey makes
    it large (ImageNet-normalised red has x_r - x_g ≈ 4.3), and the energy term makes the score depend on
    how the frame was resampled (INTER_AREA vs INTER_LINEAR on striped textures)."""
    h, w = _check_size(image_size[::-1])  # image_size is (width, height) here, as in the manifests
    if normal_index not in (0, 1):
        raise ValueError("normal_index must be 0 or 1")
    g = GraphBuilder()
    r, gr, b = "chan_r", "chan_g", "chan_b"
    g.nodes.append(helper.make_node("Split", ["input", g.const("split_sizes", [1, 1, 1], dtype=np.int64)],
                                    [r, gr, b], axis=1, name="split_rgb"))
    peak = g.op("ReduceMax", [g.op("Sub", [r, gr])], axes=[1, 2, 3], keepdims=0)  # [1]
    energy = g.op("ReduceMean", [g.op("Mul", ["input", "input"])], axes=[1, 2, 3], keepdims=0)  # [1]
    z = g.op("Add", [g.op("Mul", [g.op("Sub", [peak, g.const("one", 1.0)]), g.const("gain", 3.0)]),
                     g.op("Mul", [energy, g.const("energy_gain", 0.25)])])
    _two_class(g, z, normal_index, output_name)
    model = g.model([helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, h, w])],
                    [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [1, 2])],
                    graph_name="dda_classifier", doc=build_dda_classifier.__doc__ or "",
                    metadata={"generator": "agent.tools.modelgen.build_dda_classifier", "format": "dda"})
    return save_model(model, Path(path), external_data=False)


def build_dda_segmenter(path: Path, *, image_size: tuple[int, int] = (64, 48), n_classes: int = 3,
                        cls_head: bool = True, normal_index: int = 0) -> Path:
    """A segmentation mochi model: input ``input`` float32 [1,3,H,W]; outputs ``seg`` [1,C,H,W] per-pixel
    class probabilities (softmax over C of a 1x1 convolution) and, with ``cls_head``, ``cls`` [1,2]
    (seg first, as DDA reads them).

    Pixel logits: background 0; class 1 ``4 * (x_r - x_g) - 2`` (red), class 2 ``4 * (x_g - x_r) - 2``
    (green), class 3 ``4 * (x_b - x_r) - 2`` (blue). On ImageNet-normalised or 0..1 input a grey
    background is class 0 and pure red / green / blue regions are classes 1 / 2 / 3. The classification
    head's anomaly logit is ``20 * max_pixels(1 - P(background)) - 10``."""
    h, w = _check_size(image_size[::-1])  # image_size is (width, height) here, as in the manifests
    if not 2 <= n_classes <= 4:
        raise ValueError("n_classes must be 2..4")
    weights = np.zeros((n_classes, 3, 1, 1), dtype=np.float32)
    bias = np.zeros((n_classes,), dtype=np.float32)
    for k, (plus, minus) in enumerate(((0, 1), (1, 0), (2, 0))[: n_classes - 1], start=1):
        weights[k, plus, 0, 0], weights[k, minus, 0, 0], bias[k] = 4.0, -4.0, -2.0
    g = GraphBuilder()
    g.inits.append(helper.make_tensor("seg_w", TensorProto.FLOAT, list(weights.shape), weights.reshape(-1)))
    g.inits.append(helper.make_tensor("seg_b", TensorProto.FLOAT, list(bias.shape), bias))
    logits = g.op("Conv", ["input", "seg_w", "seg_b"], kernel_shape=[1, 1])
    g.op("Softmax", [logits], "seg", axis=1)
    outputs = [helper.make_tensor_value_info("seg", TensorProto.FLOAT, [1, n_classes, h, w])]
    if cls_head:
        background = g.op("Slice", ["seg", g.const("bg_start", [0], dtype=np.int64),
                                    g.const("bg_end", [1], dtype=np.int64), g.const("bg_axis", [1], dtype=np.int64)])
        defect = g.op("ReduceMax", [g.op("Sub", [g.const("unit", 1.0), background])], axes=[1, 2, 3], keepdims=0)
        z = g.op("Sub", [g.op("Mul", [defect, g.const("cls_gain", 20.0)]), g.const("cls_offset", 10.0)])
        _two_class(g, z, normal_index, "cls")
        outputs.append(helper.make_tensor_value_info("cls", TensorProto.FLOAT, [1, 2]))
    model = g.model([helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, h, w])], outputs,
                    graph_name="dda_segmenter", doc=build_dda_segmenter.__doc__ or "",
                    metadata={"generator": "agent.tools.modelgen.build_dda_segmenter", "format": "dda"})
    return save_model(model, Path(path), external_data=False)


def dda_manifest(*, kind: str, image_size: tuple[int, int] = (64, 48), raw_image_shape: tuple[int, int] | None
                 = None, threshold: float = 0.5, pixel_names: tuple[str, ...] = ("background", "scratch", "dent"),
                 cls_head: bool = True, normal_index: int = 1, runtime: str | None = "onnx",
                 **stage: Any) -> dict[str, Any]:
    """A manifest.json as LFV / DDA write it (shapes from a real LFV package and DDA's notebooks).

    kind "classification": names ["anomaly", "normal"] with the normal class at ``normal_index``;
    kind "segmentation": ``pixel_level_classes`` inside ``model_graph``, ``raw_image_shape`` [H, W].
    Extra keyword arguments are stage keys (``interpolation``, ``classification_logic``, ...)."""
    w, h = image_size
    image_names = ["anomaly", "normal"] if normal_index == 1 else ["normal", "anomaly"]
    entry: dict[str, Any] = {
        "type": "mochi", "input_shape": [1, 3, h, w], "image_width": w, "image_height": h,
        "image_range_scale": True, "normalize": True, "threshold": threshold,
        "classification_head_enabled": cls_head if kind == "segmentation" else True,
        "segmentation_head_enabled": kind == "segmentation",
        "class_normal_ids": [normal_index], "seg_normal_ids": [0] if kind == "segmentation" else [],
    }
    graph: dict[str, Any] = {
        "model_graph_type": "single_stage_model_graph",
        "stages": [entry],
        "image_level_classes": {"names": image_names, "normal_ids": [normal_index]},
        "pixel_level_classes": {"names": list(pixel_names) if kind == "segmentation" else [], "normal_ids":
                                [0] if kind == "segmentation" else []},
    }
    raw_h, raw_w = raw_image_shape or (h, w)
    if kind == "segmentation":
        entry["raw_image_shape"] = [raw_h, raw_w]
    entry.update(stage)
    doc: dict[str, Any] = {
        "model_graph": graph,
        "compilable_models": [{"filename": "mochi.pt", "data_input_config": {"input": [1, 3, h, w]},
                               "framework": "PYTORCH"}],
        "dataset": {"image_width": raw_w, "image_height": raw_h},
    }
    if runtime is not None:
        doc.update(runtime=runtime, runtime_artifact="model.onnx")
    return doc


def write_dda_package(root: Path, model: Path, manifest: dict[str, Any]) -> Path:
    """A DDA package directory: ``manifest.json`` + ``<stage type>/<runtime_artifact>`` (DDA's layout)."""
    root = Path(root)
    stage_type = manifest["model_graph"]["stages"][0]["type"]
    target = root / stage_type / manifest.get("runtime_artifact", "model.onnx")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, target)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return root


def write_neo_package(root: Path, *, kind: str = "classification") -> Path:
    """The layout of a legacy LFV component's model (SageMaker Neo / DLR output under ``mochi/``, manifest
    without ``runtime``). The compiled files are placeholders: no real Neo-compiled LFV model is public."""
    root = Path(root)
    stage = root / "mochi"
    stage.mkdir(parents=True, exist_ok=True)
    for name in ("compiled.so", "compiled.params", "compiled.meta", "libdlr.so", "dlr.h"):
        (stage / name).write_bytes(b"placeholder for a SageMaker Neo artifact\n")
    manifest = dda_manifest(kind=kind, image_size=(1000, 1000), runtime=None, threshold=0.7021560668945312)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return root
