"""DDA / Lookout for Vision model manifests (awslabs/DefectDetectionApplication, Apache-2.0).

What DDA reads, and so what this reader reads (docs/model-package.md, "DDA / Lookout for Vision packages"):

* ``model_graph``: ``model_graph_type`` ``single_stage_model_graph`` with one stage whose ``type`` is the
  supervised multi-head model (``mochi`` / ``supervised_multi_head_model``); ``image_level_classes`` and
  ``pixel_level_classes`` (``names``, ``normal_ids``) inside ``model_graph``;
* stage keys: ``threshold``, ``image_width``/``image_height`` (the model input), ``interpolation`` (an
  OpenCV code, default INTER_AREA), ``image_range_scale``, ``normalize`` (ImageNet), the head flags
  ``classification_head_enabled``/``segmentation_head_enabled``, ``class_normal_ids``, ``seg_normal_ids``,
  ``classification_logic``, ``raw_image_shape`` ([H, W] the mask is resized to), ``calibrated`` +
  ``max_val_score``/``calibrator_scaling``/``calibrator_shift``, ``seg_recall_bias``;
* top level (DDA's ONNX runtime, 2026): ``runtime`` (default ``dlr``), ``runtime_artifact`` (default
  ``model.onnx``) at ``<stage type>/<runtime_artifact>``, ``device`` (cpu | gpu/cuda | tensorrt/trt).

The project's own optional keys (``name``, ``model_version``, ``lookout_vision_model_arn``,
``description``, ``autostart``, ``execution``, ``files``, ``pixel_level_classes.colors``) are read too;
DDA ignores them. Neo/DLR-compiled packages become an unservable package (agent/core/formats/lfv.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.core import package as pkg
from agent.core.formats import lfv
from agent.errors import PackageError

#: DDA's MODEL_NAME_MAP (lyra_science_processing_utils/model_processors/__init__.py): nickname → long name.
STAGE_TYPES = {
    "mooncake": "unsupervised_contextual_spade",
    "cheesecake": "distance_based_classifier",
    "tiramisu": "hypercolumn_fid_classifier",
    "chocolatemousse": "imagestats_model",
    "jalebi": "unsupervised_pretrained_feature_gaussian",
    "baklava": "unsupervised_svdd",
    "torrone": "knn_feedback_model",
    "mochi": "supervised_multi_head_model",
    "dango": "supervised_multi_head_model_bbox",
}
#: The stage types served here: DDA's supervised multi-head model (what LFV trained and DDA packages).
SUPPORTED = ("mochi", "supervised_multi_head_model")
DEFAULT_ARTIFACT = "model.onnx"
#: cv2.INTER_AREA, DDA's default (basic_preprocessor.py).
INTER_AREA = 3


def is_dda(doc: Mapping[str, Any]) -> bool:
    """A manifest without our "format" key whose first stage has a DDA stage type."""
    graph = doc.get("model_graph")
    stages = graph.get("stages") if isinstance(graph, dict) else None
    if not isinstance(stages, list) or not stages or not isinstance(stages[0], dict):
        return False
    kind = stages[0].get("type")
    return isinstance(kind, str) and (kind in STAGE_TYPES or kind in STAGE_TYPES.values())


def device_providers(device: str | None) -> tuple[str, ...]:
    """DDA's OnnxRunner provider choice for the manifest's ``device`` (inference_runtimes.py)."""
    value = (device or "").strip().lower()
    if value == "cpu":
        return ("cpu",)
    if value in ("tensorrt", "trt"):
        return ("tensorrt", "cuda", "cpu")
    return ("cuda", "cpu")  # unset, "gpu", "cuda" and anything else: CUDA if available, then CPU


def _required(stage: Mapping[str, Any], key: str, where: str) -> Any:
    if stage.get(key) is None:
        raise PackageError(f"{where}.{key} is required by DDA's model graph and missing")
    return stage[key]


def _bool(stage: Mapping[str, Any], key: str, where: str) -> bool:
    value = _required(stage, key, where)
    if not isinstance(value, bool):
        raise PackageError(f"{where}.{key} must be true or false")
    return value


def parse(root: Path, doc: Mapping[str, Any], raw: bytes) -> pkg.ModelPackage:
    get = pkg.get_typed
    graph = get(doc, "model_graph", dict, "manifest", {})
    stages = get(graph, "stages", list, "model_graph", [])
    stage = stages[0]
    sw = "model_graph.stages[0]"
    stage_type = stage["type"]
    name = pkg.validate_name(get(doc, "name", str, "manifest") or root.name)
    stage_dir = root / pkg.safe_relative(stage_type, f"{sw}.type")

    unservable = ""
    graph_type = graph.get("model_graph_type")
    if graph_type != "single_stage_model_graph" or len(stages) != 1:
        unservable = (f"model_graph_type {graph_type!r} with {len(stages)} stage(s): this agent serves DDA's "
                      "single_stage_model_graph only")
    elif stage_type not in SUPPORTED:
        unservable = (f"stage type {stage_type!r} ({STAGE_TYPES.get(stage_type, stage_type)}) is not served; this "
                      "agent runs DDA's supervised multi-head model (mochi) only")
    elif stage.get("transform_preprocessing"):
        unservable = f"{sw}.transform_preprocessing {stage['transform_preprocessing']!r} is not supported"

    runtime = str(doc.get("runtime") or "").lower()
    artifact = get(doc, "runtime_artifact", str, "manifest", "") or DEFAULT_ARTIFACT
    model_file = stage_dir / pkg.safe_relative(artifact, "runtime_artifact")
    neo = lfv.neo_artifacts(stage_dir)
    if not unservable:
        if runtime in ("", "dlr"):
            # DDA reads a missing runtime as "dlr". Without Neo files but with the ONNX file, serve the ONNX.
            if neo and (runtime == "dlr" or not model_file.is_file()):
                unservable = lfv.legacy_message(stage_type, neo)
            elif runtime == "dlr":
                unservable = f"runtime 'dlr' (SageMaker Neo / DLR): {lfv.MIGRATION}"
        elif runtime != "onnx":
            unservable = f"runtime {runtime!r} is not supported: {lfv.MIGRATION}"
    if not unservable and not model_file.is_file():
        raise PackageError(f"model file {stage_type}/{artifact} is missing from {root} (DDA keeps the model at "
                           "<stage type>/<runtime_artifact>)")

    cls_head = bool(stage.get("classification_head_enabled", False))
    seg_head = bool(stage.get("segmentation_head_enabled", False))
    kind = "segmentation" if seg_head else "classification"
    pixel = pkg.class_table(doc, graph, "pixel_level_classes")
    image = pkg.class_table(doc, graph, "image_level_classes")
    names = tuple(str(n) for n in get(pixel, "names", list, "model_graph.pixel_level_classes", []))
    image_names = tuple(str(n) for n in get(image, "names", list, "model_graph.image_level_classes", []))
    dataset = get(doc, "dataset", dict, "manifest", {})
    common: dict[str, Any] = {
        "root": root, "name": name, "kind": kind,
        "model_file": model_file if model_file.is_file() or not neo else stage_dir,
        "arn": get(doc, "lookout_vision_model_arn", str, "manifest", ""),
        "model_version": str(doc.get("model_version", "")),
        "description": get(doc, "description", str, "manifest", ""),
        "input_name": "", "outputs": {},
        "class_names": names,
        "normal_ids": pkg.id_list(get(pixel, "normal_ids", list, "pixel_level_classes", []),
                                  "model_graph.pixel_level_classes.normal_ids"),
        "colors": pkg.parse_colors(pixel, names, "model_graph.pixel_level_classes"),
        "normalization": None, "score_activation": "none",
        "autostart": bool(doc.get("autostart", False)),
        "checksums": pkg.parse_checksums(doc),
        "format": "dda", "semantics": "dda",
        "image_class_names": image_names,
        "cls_head": cls_head, "seg_head": seg_head,
    }
    if unservable:
        # Listed (FAILED, with the reason) but never loaded: only what ListModels needs must be valid.
        fp_path = model_file if model_file.is_file() else (stage_dir if stage_dir.exists() else root / pkg.MANIFEST)
        return pkg.ModelPackage(
            **common, image_width=int(get(dataset, "image_width", int, "dataset", 0) or 1),
            image_height=int(get(dataset, "image_height", int, "dataset", 0) or 1), threshold=0.5,
            range_scale=True, mean=None, std=None, execution=pkg.ExecutionPrefs(),
            fingerprint=pkg.fingerprint(raw, fp_path), interpolation=INTER_AREA, unservable=unservable)

    # DDA's KeyErrors, as messages: these keys have no default in DDA's pre- and post-processing.
    width = _required(stage, "image_width", sw)
    height = _required(stage, "image_height", sw)
    if not all(isinstance(v, int) and not isinstance(v, bool) and pkg.MIN_SIDE <= v <= pkg.MAX_SIDE
               for v in (width, height)):
        raise PackageError(f"{sw}.image_width/image_height must be pixel counts, got {width!r}x{height!r}")
    range_scale = _bool(stage, "image_range_scale", sw)
    if not isinstance(stage.get("normalize"), bool):
        raise PackageError(f"{sw}.normalize must be true or false (DDA normalises with ImageNet mean/std)")
    mean, std = pkg.parse_normalize(stage, sw)
    cls_head = _bool(stage, "classification_head_enabled", sw)
    seg_head = _bool(stage, "segmentation_head_enabled", sw)
    if not (cls_head or seg_head):
        raise PackageError(f"{sw}: no heads are enabled (classification_head_enabled, segmentation_head_enabled)")
    declared = doc.get("kind")
    if declared is not None and declared != kind:
        raise PackageError(f"kind {declared!r} contradicts the stage's heads, which make it a {kind} model")
    class_normal_ids = pkg.id_list(_required(stage, "class_normal_ids", sw), f"{sw}.class_normal_ids") \
        if cls_head else ()
    logic, seg_normal_ids = pkg.parse_logic(stage, sw)
    if seg_head and stage.get("seg_recall_bias") is not None and seg_normal_ids is None:
        raise PackageError(f"{sw}.seg_recall_bias needs seg_normal_ids")
    calibration = None
    if stage.get("calibrated"):
        try:
            calibration = pkg.Calibration(float(stage["max_val_score"]), float(stage["calibrator_scaling"]),
                                          float(stage["calibrator_shift"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PackageError(f"{sw}.calibrated needs numeric max_val_score, calibrator_scaling and "
                               f"calibrator_shift ({exc})") from exc
    bias = get(stage, "seg_recall_bias", (int, float), sw, None)
    prefs = pkg.parse_execution(doc)
    if not prefs.providers:
        prefs = pkg.ExecutionPrefs(providers=device_providers(get(doc, "device", str, "manifest", None)),
                                   trt_fp16=prefs.trt_fp16, graph_optimization=prefs.graph_optimization)
    return pkg.ModelPackage(
        **{**common, "cls_head": cls_head, "seg_head": seg_head},
        image_width=width, image_height=height,
        threshold=pkg.parse_threshold(stage, sw, default=None),
        range_scale=range_scale, mean=mean, std=std, execution=prefs,
        fingerprint=pkg.fingerprint(raw, model_file),
        interpolation=pkg.parse_interpolation(stage, sw, INTER_AREA),
        class_normal_ids=class_normal_ids, seg_normal_ids=seg_normal_ids, classification_logic=logic,
        raw_image_shape=pkg.parse_raw_image_shape(stage, sw) if seg_head else None,
        calibration=calibration, seg_recall_bias=None if bias is None else float(bias),
    )


# ---------------------------------------------------------------------------------------------
# Writing DDA packages (edge-agent model build --format dda)


def manifest_for(src: Path, sig: Any, *, kind: str, outputs: Mapping[str, str], name: str, threshold: float | None,
                 classes: Any, colors: Any, image_size: tuple[int, int], normalize: str | None, description: str,
                 arn: str, model_version: str, autostart: bool, providers: list[str], class_normal_ids: Any,
                 image_classes: Any, seg_normal_ids: Any, classification_logic: str | None,
                 raw_image_size: tuple[int, int] | None, interpolation: str | int,
                 probe: pkg.ModelProbe | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """(manifest, package path → source path) of a DDA package for an ONNX model: the model at
    ``mochi/<file>``, the keys DDA requires, and ours (name, version, ARN, checksums) that DDA ignores.

    DDA applies no softmax and reads the outputs by position (seg first), so the model is run once with
    `probe` to check that its outputs are probabilities (not checked without a probe)."""
    if kind not in ("classification", "segmentation"):
        raise PackageError(f"DDA has no post-processing for {kind!r} models; write it with --format edge-agent")
    if not isinstance(interpolation, int):
        raise PackageError("DDA resizes with OpenCV: give an OpenCV interpolation (e.g. area), not 'bilinear'")
    w, h = image_size
    order = [n for n, _ in sig.outputs]
    seg_out = outputs.get("logits")
    cls_out = outputs.get("class_scores") if kind == "segmentation" else outputs.get("score")
    if seg_out is not None and cls_out is not None and order.index(seg_out) > order.index(cls_out):
        raise PackageError(f"DDA reads the segmentation output first, then the classification output; this model "
                           f"has them in the order {order}")
    if probe is not None:
        _check_probabilities(probe, src, sig, image_size, normalize == "imagenet", seg_out, cls_out)
    normal = [int(i) for i in (class_normal_ids if class_normal_ids is not None else [0])]
    stage: dict[str, Any] = {
        "type": "mochi",
        "input_shape": [1, 3, h, w],
        "image_width": w, "image_height": h,
        "interpolation": interpolation,
        "image_range_scale": True,
        "normalize": normalize == "imagenet",
        "threshold": 0.5 if threshold is None else float(threshold),
        "classification_head_enabled": cls_out is not None,
        "segmentation_head_enabled": seg_out is not None,
        "class_normal_ids": normal if cls_out is not None else [],
        "seg_normal_ids": [int(i) for i in seg_normal_ids] if seg_normal_ids is not None else (
            [0] if seg_out is not None else []),
    }
    if classification_logic is not None:
        stage["classification_logic"] = classification_logic
    graph: dict[str, Any] = {"model_graph_type": "single_stage_model_graph", "stages": [stage]}
    if cls_out is not None:
        graph["image_level_classes"] = {"names": list(image_classes or ["normal", "anomaly"]), "normal_ids": normal}
    dataset = {"image_width": w, "image_height": h}
    if seg_out is not None:
        if raw_image_size is None:
            raise PackageError("DDA resizes segmentation masks to raw_image_shape: give the camera frame size "
                               "(--raw-image-size WxH)")
        stage["raw_image_shape"] = [int(raw_image_size[1]), int(raw_image_size[0])]
        dataset = {"image_width": int(raw_image_size[0]), "image_height": int(raw_image_size[1])}
        names = list(classes) if classes else ["background", "anomaly"]
        graph["pixel_level_classes"] = {"names": names, "normal_ids": stage["seg_normal_ids"]}
        if colors:
            graph["pixel_level_classes"]["colors"] = [c.upper() for c in colors]
    doc: dict[str, Any] = {
        "model_graph": graph,
        "dataset": dataset,
        "runtime": "onnx",
        "runtime_artifact": src.name,
        # Ours; DDA ignores them.
        "name": name, "model_version": model_version, "lookout_vision_model_arn": arn, "description": description,
        "autostart": autostart,
    }
    if providers:  # DDA's device key: cpu, tensorrt, or (default) CUDA then CPU
        doc["device"] = "tensorrt" if providers[0] == "tensorrt" else providers[0] if providers[0] == "cpu" \
            else "cuda"
    files = {f"mochi/{rel}": rel for rel in [src.name, *sig.external_files]}
    return doc, files


def _check_probabilities(probe: pkg.ModelProbe, src: Path, sig: Any, image_size: tuple[int, int], imagenet: bool,
                         seg_out: str | None, cls_out: str | None) -> None:
    import numpy as np

    w, h = image_size
    rng = np.random.default_rng(0)
    x = rng.random((1, 3, h, w), dtype=np.float32)
    if imagenet:
        x = (x - np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)) / \
            np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
    wanted = [n for n in (seg_out, cls_out) if n is not None]
    try:
        results = probe.run(src, {sig.inputs[0][0]: x}, wanted)
    except Exception as exc:  # the runtime's own exception types
        raise PackageError(f"{src.name} could not be run to check its outputs: {str(exc).splitlines()[0]}") from exc
    values = {n: results[i] for i, n in enumerate(wanted)}
    for out, axis in ((cls_out, 1), (seg_out, 1)):
        if out is None:
            continue
        value = np.asarray(values[out], dtype=np.float64)
        value = value.reshape(1, -1) if value.ndim < 2 else value
        sums = value.sum(axis=axis)
        ok = value.min() >= -1e-6 and value.max() <= 1 + 1e-6 and (value.shape[axis] == 1 or
                                                                     np.allclose(sums, 1.0, atol=1e-3))
        if not ok:
            raise PackageError(f"output {out!r} is not per-class probabilities (values {value.min():.3g}.."
                               f"{value.max():.3g}); DDA applies no softmax: end the graph with a Softmax, or "
                               "write the package with --format edge-agent")
