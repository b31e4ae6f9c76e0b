"""Model packages: a directory with manifest.json + the ONNX file (+ its external .data file).

Two manifest formats are read:

* the project's own (``"format": "edge-agent/model-package"``): the Lookout for Vision / DDA model
  manifest's keys where they exist (``model_graph.stages[0]`` with ``threshold``, pre-processing and the
  class-normal keys, ``model_graph.image_level_classes`` / ``pixel_level_classes``, ``dataset``,
  ``runtime``, ``runtime_artifact``) plus what those lack (kind, output roles, colours, execution
  preferences, checksums);
* DDA / Lookout for Vision packages (no ``format`` key, a DDA stage type such as ``mochi``): read by
  agent/core/formats/dda.py with DDA's semantics, the model at ``<stage type>/<runtime_artifact>``.
  Neo/DLR-compiled legacy packages are recognised (agent/core/formats/lfv.py) and listed FAILED.

docs/model-package.md documents both.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

from agent.core.masks import DEFAULT_PALETTE
from agent.errors import ModelLoadError, PackageError

if TYPE_CHECKING:
    import numpy as np


class ModelProbe(Protocol):
    """What building a package asks of a runtime (agent.runtime.onnx.OnnxProbe), so the core needs none."""

    def check(self, model_file: Path) -> None:
        """Raise ModelLoadError, saying why, when the runtime cannot read the model."""

    def run(self, model_file: Path, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        """The named outputs of one run on the CPU."""

__all__ = ["DEFAULT_PALETTE", "ModelPackage", "build_package", "load_package"]

MANIFEST = "manifest.json"
FORMAT = "edge-agent/model-package"
#: 2 added the class-normal keys, classification_logic, raw_image_shape and cv2 interpolation codes.
FORMAT_VERSION = 2
#: Versions of FORMAT this agent reads; a newer one is refused (its keys could change results).
READABLE_VERSIONS = (1, 2)
KINDS = ("anomalib", "anomalib_v1", "classification", "segmentation")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
HEX_RE = re.compile(r"^#[0-9A-Fa-f]{6}$")
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
MIN_SIDE, MAX_SIDE = 1, 8192
PROVIDERS = ("tensorrt", "cuda", "cpu")
CLASSIFICATION_LOGIC = ("cls_head", "seg_head", "cls_and_seg", "cls_or_seg")
#: OpenCV interpolation codes (cv2.INTER_NEAREST .. INTER_NEAREST_EXACT) a stage's "interpolation" may name;
#: DDA passes the number straight to cv2.resize. The string "bilinear" means Pillow's bilinear (our own packages).
CV2_INTERPOLATIONS = {"nearest": 0, "linear": 1, "cubic": 2, "area": 3, "lanczos4": 4, "linear_exact": 5,
                      "nearest_exact": 6}


@dataclass(frozen=True)
class ExecutionPrefs:
    """What the package asks of the runtime; the agent's configuration can override providers."""

    providers: tuple[str, ...] = ()
    trt_fp16: bool = True
    gpu_code: str = ""
    trt_ver: str = ""
    cuda_ver: str = ""
    graph_optimization: str = "all"


@dataclass(frozen=True)
class Normalization:
    """anomalib 1.x metadata.json statistics, applied by the agent (v2 bakes them into the graph)."""

    image_threshold: float
    pixel_threshold: float
    score_min: float
    score_max: float
    map_min: float
    map_max: float


@dataclass(frozen=True)
class Calibration:
    """DDA's optional Platt calibration of the classification score (SKLearnScoreCalibration):
    p = 1 / (1 + exp(scaling * s + shift)), s = score / max_val_score when max_val_score > 1."""

    max_val_score: float
    scaling: float
    shift: float


@dataclass(frozen=True)
class ModelPackage:
    """A validated model package on disk."""

    root: Path
    name: str
    kind: str
    model_file: Path
    arn: str
    model_version: str
    description: str
    image_width: int
    image_height: int
    threshold: float
    range_scale: bool
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    input_name: str
    outputs: Mapping[str, str]
    class_names: tuple[str, ...]
    normal_ids: tuple[int, ...]
    colors: tuple[str, ...]
    normalization: Normalization | None
    score_activation: str
    execution: ExecutionPrefs
    autostart: bool
    checksums: Mapping[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    #: FORMAT, or "dda" for a DDA / Lookout for Vision manifest.
    format: str = FORMAT
    #: How outputs become score and mask: "edge-agent" (the kinds' table) or "dda" (DDA's multi-head rules).
    semantics: str = "edge-agent"
    #: Resizing of frames to the model: "bilinear" (Pillow) or an OpenCV INTER_* code (cv2.resize).
    interpolation: str | int = "bilinear"
    #: Image-level (classification head) classes: names and the indexes that mean "normal".
    image_class_names: tuple[str, ...] = ()
    class_normal_ids: tuple[int, ...] = (0,)
    #: Pixel classes that are normal for classification_logic (None: no override, as in DDA).
    seg_normal_ids: tuple[int, ...] | None = None
    classification_logic: str | None = None
    #: (height, width) the class mask is resized to (DDA: the camera image's size); None = the frame's size.
    raw_image_shape: tuple[int, int] | None = None
    #: DDA multi-head flags (semantics "dda").
    cls_head: bool = False
    seg_head: bool = False
    calibration: Calibration | None = None
    seg_recall_bias: float | None = None
    #: Why the agent cannot run this package (e.g. a Neo/DLR-compiled LFV model); it is listed FAILED.
    unservable: str = ""

    @property
    def version(self) -> str:
        """What logs, metrics and status messages call this package: its model_version, else its fingerprint."""
        return self.model_version or self.fingerprint

    @property
    def resampler(self) -> str:
        """Which library's resampling this package follows: "pillow" or "cv2" (also for its masks)."""
        return "cv2" if isinstance(self.interpolation, int) else "pillow"

    def verify_files(self) -> None:
        """Check every listed file against its sha256 (done at load, off the request path)."""
        if self.unservable:
            raise PackageError(self.unservable)
        for rel, expected in self.checksums.items():
            path = self.root / rel
            if not path.is_file():
                raise PackageError(f"{self.name}: file {rel!r} listed in the manifest is missing")
            if sha256_file(path) != expected:
                raise PackageError(f"{self.name}: {rel!r} does not match its sha256 in the manifest (corrupt or "
                                   "half-copied package)")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safe_relative(rel: str, what: str) -> PurePosixPath:
    """A relative path from outside (manifest, archive member) that stays inside its directory."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel or "\x00" in rel:
        raise PackageError(f"{what} {rel!r} must be a relative path inside the package (no '..', not absolute)")
    return p


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise PackageError(f"model name {name!r} must be 1-128 characters of letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    return name


def _get(mapping: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    """mapping[key] checked against kind (bool is never taken for int), or default when absent/null."""
    value = mapping.get(key)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise PackageError(f"{where}.{key} has the wrong type ({type(value).__name__})")
    return value


def _triple(value: Any, where: str) -> tuple[float, float, float]:
    if not (isinstance(value, Sequence) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
        raise PackageError(f"{where} must be a list of 3 numbers")
    return (float(value[0]), float(value[1]), float(value[2]))


get_typed = _get  # for the format readers (agent/core/formats)


def id_list(value: Any, where: str) -> tuple[int, ...]:
    """A list of class indexes (non-negative ints)."""
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                              for i in value):
        raise PackageError(f"{where} must be a list of class indexes (integers >= 0), got {value!r}")
    return tuple(value)


def class_table(doc: Mapping[str, Any], graph: Mapping[str, Any], key: str) -> dict[str, Any]:
    """model_graph.<key> (where LFV / DDA keep it), else a top-level <key> (packages built before format 2)."""
    table = _get(graph, key, dict, "model_graph", None)
    if table is None:
        table = _get(doc, key, dict, "manifest", None)
    return dict(table) if table is not None else {}


def parse_threshold(stage: Mapping[str, Any], where: str, default: float | None = 0.5) -> float:
    value = _get(stage, "threshold", (int, float), where, default)
    if value is None:
        raise PackageError(f"{where}.threshold is required")
    threshold = float(value)
    if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise PackageError(f"{where}.threshold must be within 0..1, got {threshold}")
    return threshold


def parse_normalize(stage: Mapping[str, Any], where: str) -> tuple[Any, Any]:
    """(mean, std) or (None, None): normalize is true / "imagenet" (DDA's fixed ImageNet statistics),
    an object with mean and std, or false / null."""
    normalize = stage.get("normalize")
    if not normalize:
        return None, None
    if normalize is True or normalize == "imagenet":
        normalize = IMAGENET
    if not isinstance(normalize, dict):
        raise PackageError(f"{where}.normalize must be an object with mean and std, 'imagenet', true or null")
    mean = _triple(normalize.get("mean"), f"{where}.normalize.mean")
    std = _triple(normalize.get("std"), f"{where}.normalize.std")
    if any(s <= 0 for s in std):
        raise PackageError(f"{where}.normalize.std must be positive")
    return mean, std


def parse_interpolation(stage: Mapping[str, Any], where: str, default: str | int) -> str | int:
    """"bilinear" (Pillow, the project's own packages) or an OpenCV INTER_* code (number or name)."""
    value = stage.get("interpolation", default)
    if value is None:
        value = default
    if isinstance(value, str) and value.lower() in CV2_INTERPOLATIONS:
        return CV2_INTERPOLATIONS[value.lower()]
    if value == "bilinear":
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value in CV2_INTERPOLATIONS.values():
        return value
    raise PackageError(f"{where}.interpolation {value!r} must be \"bilinear\" or an OpenCV interpolation code "
                       f"0..6 or name ({', '.join(CV2_INTERPOLATIONS)})")


def parse_raw_image_shape(stage: Mapping[str, Any], where: str) -> tuple[int, int] | None:
    value = stage.get("raw_image_shape")
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                  and MIN_SIDE <= v <= MAX_SIDE for v in value)):
        raise PackageError(f"{where}.raw_image_shape must be [height, width] in pixels, got {value!r}")
    return (value[0], value[1])


def parse_logic(stage: Mapping[str, Any], where: str) -> tuple[str | None, tuple[int, ...] | None]:
    """(classification_logic, seg_normal_ids): DDA overrides the verdict only when both are present."""
    logic = _get(stage, "classification_logic", str, where, None)
    if logic is not None and logic not in CLASSIFICATION_LOGIC:
        raise PackageError(f"{where}.classification_logic {logic!r} must be one of {list(CLASSIFICATION_LOGIC)}")
    seg_normal = stage.get("seg_normal_ids")
    return logic, (None if seg_normal is None else id_list(seg_normal, f"{where}.seg_normal_ids"))


def parse_colors(classes: Mapping[str, Any], names: tuple[str, ...], where: str) -> tuple[str, ...]:
    colors = tuple(_get(classes, "colors", list, where, []))
    for c in colors:
        if not isinstance(c, str) or not HEX_RE.match(c):
            raise PackageError(f"{where}.colors entry {c!r} is not #RRGGBB")
    if colors and len(colors) < len(names):
        raise PackageError(f"{where} has {len(names)} names but only {len(colors)} colors")
    return tuple(c.upper() for c in colors)


def parse_execution(doc: Mapping[str, Any]) -> ExecutionPrefs:
    execution = _get(doc, "execution", dict, "manifest", {})
    providers = tuple(str(p).lower() for p in _get(execution, "providers", list, "execution", []))
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise PackageError(f"execution.providers {unknown} are not execution providers; use {list(PROVIDERS)}")
    return ExecutionPrefs(
        providers=providers,
        trt_fp16=bool(execution.get("trt_fp16", True)),
        gpu_code=str(execution.get("gpu_code", "")),
        trt_ver=str(execution.get("trt_ver", "")),
        cuda_ver=str(execution.get("cuda_ver", "")),
        graph_optimization=str(execution.get("graph_optimization", "all")),
    )


def parse_checksums(doc: Mapping[str, Any]) -> dict[str, str]:
    files = _get(doc, "files", dict, "manifest", {})
    for rel in files:
        safe_relative(rel, "files entry")
    return {str(k): str(v) for k, v in files.items()}


def fingerprint(raw: bytes, path: Path) -> str:
    """Changes when the manifest or the model file (size, mtime) changes: what discovery compares."""
    stat = path.stat()
    return hashlib.sha256(raw + f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def load_package(root: Path | str) -> ModelPackage:
    """Read and validate <root>/manifest.json; raises PackageError saying what is wrong."""
    root = Path(root)
    path = root / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PackageError(f"{root}: no {MANIFEST}") from None
    except OSError as exc:
        raise PackageError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise PackageError(f"{path}: the manifest must be a JSON object")
    fmt = doc.get("format")
    if fmt is None:
        from agent.core.formats import dda

        if dda.is_dda(doc):
            return dda.parse(root, doc, raw)
    elif fmt != FORMAT:
        raise PackageError(f"manifest format {fmt!r} is unknown; this agent reads {FORMAT!r} and DDA / Lookout for "
                           "Vision manifests")
    version = doc.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PackageError(f"format_version {version!r} must be a positive integer")
    if version not in READABLE_VERSIONS:
        readable = ", ".join(str(v) for v in READABLE_VERSIONS)
        raise PackageError(f"format_version {version} is newer than this agent reads ({readable} of {FORMAT}); "
                           "upgrade the agent or rebuild the package with it")
    return _parse(root, doc, raw)


def _parse(root: Path, doc: Mapping[str, Any], raw: bytes) -> ModelPackage:
    where = "manifest"
    if doc.get("runtime", "onnx") != "onnx":
        raise PackageError(f"runtime {doc.get('runtime')!r} is not supported; this agent runs ONNX models")
    name = validate_name(_get(doc, "name", str, where) or root.name)
    kind = _get(doc, "kind", str, where, "anomalib")
    if kind not in KINDS:
        raise PackageError(f"kind {kind!r} is not one of {list(KINDS)}")
    artifact = _get(doc, "runtime_artifact", str, where)
    if not artifact:
        raise PackageError("manifest.runtime_artifact (the ONNX file) is required")
    model_file = root / safe_relative(artifact, "runtime_artifact")
    if not model_file.is_file():
        raise PackageError(f"model file {artifact!r} is missing from {root}")

    graph = _get(doc, "model_graph", dict, where, {})
    stages = _get(graph, "stages", list, "model_graph", [{}]) or [{}]
    stage = stages[0]
    if not isinstance(stage, dict):
        raise PackageError("model_graph.stages[0] must be an object")
    sw = "model_graph.stages[0]"
    dataset = _get(doc, "dataset", dict, where, {})
    width = _get(stage, "image_width", int, sw, _get(dataset, "image_width", int, "dataset"))
    height = _get(stage, "image_height", int, sw, _get(dataset, "image_height", int, "dataset"))
    if width is None or height is None:
        raise PackageError("the model input size is missing (model_graph.stages[0].image_width/image_height)")
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise PackageError(f"model input size {width}x{height} is out of range")
    threshold = parse_threshold(stage, sw)
    mean, std = parse_normalize(stage, sw)

    outputs = _get(doc, "outputs", dict, where, {})
    for role, out in outputs.items():
        if not isinstance(out, str) or not out:
            raise PackageError(f"outputs.{role} must name a model output")

    pixel = class_table(doc, graph, "pixel_level_classes")
    default_names = ["background", "anomaly"] if kind != "classification" else []
    names = tuple(str(n) for n in _get(pixel, "names", list, "pixel_level_classes", default_names))
    normal_ids = id_list(_get(pixel, "normal_ids", list, "pixel_level_classes", [0]), "pixel_level_classes.normal_ids")
    colors = parse_colors(pixel, names, "pixel_level_classes")
    if not all(i < max(len(names), 1) for i in normal_ids):
        raise PackageError("pixel_level_classes.normal_ids must be indexes into names")
    image = class_table(doc, graph, "image_level_classes")
    image_names = tuple(str(n) for n in _get(image, "names", list, "image_level_classes", []))
    # The classification head's normal classes: the stage's class_normal_ids (what DDA scores with), else
    # image_level_classes.normal_ids, else (packages before format 2) pixel_level_classes.normal_ids.
    class_normal = stage.get("class_normal_ids")
    if class_normal is None:
        class_normal = image.get("normal_ids")
    class_normal_ids = id_list(class_normal, f"{sw}.class_normal_ids") if class_normal is not None else normal_ids
    logic, seg_normal_ids = parse_logic(stage, sw)

    normalization = None
    if kind == "anomalib_v1":
        normalization = _parse_normalization(_get(doc, "normalization", dict, where, None))

    activation = _get(doc, "score_activation", str, where, "none")
    if activation not in ("none", "sigmoid", "softmax"):
        raise PackageError(f"score_activation {activation!r} must be none, sigmoid or softmax")
    return ModelPackage(
        root=root,
        name=name,
        kind=kind,
        model_file=model_file,
        arn=_get(doc, "lookout_vision_model_arn", str, where, ""),
        model_version=str(doc.get("model_version", "")),
        description=_get(doc, "description", str, where, ""),
        image_width=width,
        image_height=height,
        threshold=threshold,
        range_scale=bool(stage.get("image_range_scale", True)),
        mean=mean,
        std=std,
        input_name=_get(doc, "input", str, where, ""),
        outputs=dict(outputs),
        class_names=names,
        normal_ids=normal_ids,
        colors=colors,
        normalization=normalization,
        score_activation=activation,
        execution=parse_execution(doc),
        autostart=bool(doc.get("autostart", False)),
        checksums=parse_checksums(doc),
        fingerprint=fingerprint(raw, model_file),
        interpolation=parse_interpolation(stage, sw, "bilinear"),
        image_class_names=image_names,
        class_normal_ids=class_normal_ids,
        seg_normal_ids=seg_normal_ids,
        classification_logic=logic,
        raw_image_shape=parse_raw_image_shape(stage, sw),
    )


def _parse_normalization(meta: Mapping[str, Any] | None) -> Normalization:
    """Accept anomalib 1.x metadata.json, nested ({"pred_scores": {"min":..}}) or flat ("pred_scores.min")."""
    if not meta:
        raise PackageError("an anomalib_v1 package needs 'normalization' (the export's metadata.json values)")

    def num(*keys: str) -> float:
        for key in keys:
            node: Any = meta
            for part in key.split("/"):
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, (int, float)) and not isinstance(node, bool):
                return float(node)
        raise PackageError(f"normalization lacks {keys[0].replace('/', '.')}")

    n = Normalization(
        image_threshold=num("image_threshold"),
        pixel_threshold=num("pixel_threshold", "image_threshold"),
        score_min=num("pred_scores/min", "pred_scores.min", "min"),
        score_max=num("pred_scores/max", "pred_scores.max", "max"),
        map_min=num("anomaly_maps/min", "anomaly_maps.min", "pred_scores/min", "min"),
        map_max=num("anomaly_maps/max", "anomaly_maps.max", "pred_scores/max", "max"),
    )
    if n.score_max <= n.score_min or n.map_max <= n.map_min:
        raise PackageError("normalization max must be greater than min")
    return n


# ---------------------------------------------------------------------------------------------
# Building packages from ONNX files (edge-agent model build, and the packaging jobs)


@dataclass(frozen=True)
class OnnxSignature:
    inputs: list[tuple[str, list[int | str]]]
    outputs: list[tuple[str, list[int | str]]]
    external_files: list[str]


def inspect_onnx(path: Path) -> OnnxSignature:
    """Input/output names and shapes and external data files of an ONNX model, read without its weights (and
    without the `onnx` package, which a device install lacks: agent/core/onnx_graph.py)."""
    from agent.core.onnx_graph import read_signature

    sig = read_signature(str(path), path.name)
    return OnnxSignature(
        inputs=sig.inputs,
        outputs=sig.outputs,
        external_files=sorted({str(safe_relative(f, "external data location")) for f in sig.external_files}),
    )


def detect_kind(sig: OnnxSignature, has_metadata: bool) -> str:
    names = {n for n, _ in sig.outputs}
    if "pred_score" in names or "anomaly_map" in names:
        return "anomalib"
    if has_metadata:
        return "anomalib_v1"
    for _, shape in sig.outputs:
        if len(shape) == 4 and isinstance(shape[1], int) and shape[1] > 1:
            return "segmentation"
    return "classification"


def parse_size(text: str) -> tuple[int, int]:
    """"WxH" (e.g. "320x240") → (width, height); PackageError saying the expected form otherwise."""
    w, sep, h = str(text).strip().lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or not (MIN_SIDE <= int(w) <= MAX_SIDE
                                                            and MIN_SIDE <= int(h) <= MAX_SIDE):
        raise PackageError(f"image size {text!r} must be WIDTHxHEIGHT in pixels, e.g. 320x240")
    return int(w), int(h)


def _make_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named directory created with mode 0777 less the umask (tempfile.mkdtemp makes 0700,
    which would keep the service user from reading a package another user built)."""
    for _ in range(100):
        path = parent / f"{prefix}{os.urandom(4).hex()}"
        try:
            path.mkdir(mode=0o777)
            return path
        except FileExistsError:
            continue
    raise PackageError(f"cannot create a temporary directory in {parent}")


def build_package(
    onnx_path: Path | str,
    out_dir: Path | str,
    *,
    name: str,
    kind: str = "auto",
    threshold: float | None = None,
    classes: Sequence[str] | None = None,
    colors: Sequence[str] | None = None,
    image_size: tuple[int, int] | None = None,
    normalize: str | None = None,
    description: str = "",
    arn: str = "",
    model_version: str = "1",
    autostart: bool = False,
    execution: Mapping[str, Any] | None = None,
    score_activation: str = "auto",
    extra: Mapping[str, Any] | None = None,
    package_format: str = "edge-agent",
    class_normal_ids: Sequence[int] | None = None,
    image_classes: Sequence[str] | None = None,
    seg_normal_ids: Sequence[int] | None = None,
    classification_logic: str | None = None,
    raw_image_size: tuple[int, int] | None = None,
    interpolation: str | int | None = None,
    probe: ModelProbe | None = None,
) -> ModelPackage:
    """Write a model package for an ONNX model into out_dir (created; must not exist or be empty).

    kind "auto" recognises anomalib 2.x exports by their outputs, anomalib 1.x by the metadata.json
    beside the model, segmentation by a [N,C,H,W] output, else classification. External data
    files are copied along. score_activation "auto" applies softmax to a classifier's 2-class
    output (logits) and nothing to a single score. Settings are checked against the ONNX graph
    (fixed input size, class channels, output order). package_format "dda" writes DDA's layout and
    manifest (agent/core/formats/dda.py) for a model whose outputs are probabilities. The result is
    loaded back with load_package, so it is valid.

    probe: what the runtime says of the model before anything is written: whether it can read it at all,
    and, for DDA packages, one run to check the outputs are probabilities. `model build` and packaging jobs
    pass ONNX Runtime's (agent.runtime.onnx.OnnxProbe: devices have no `onnx` package to check with); None
    skips both checks.
    """
    src = Path(onnx_path)
    if not src.is_file():
        raise PackageError(f"{src} does not exist")
    validate_name(name)
    if package_format not in ("edge-agent", "dda"):
        raise PackageError(f"package format {package_format!r} must be edge-agent or dda")
    sig = inspect_onnx(src)
    metadata_file = src.parent / "metadata.json"
    if kind == "auto":
        kind = detect_kind(sig, metadata_file.is_file())
    if kind not in KINDS:
        raise PackageError(f"kind {kind!r} is not one of {list(KINDS)}")
    for rel in sig.external_files:
        if not (src.parent / rel).is_file():
            raise PackageError(f"{src.name} keeps its weights in {rel!r}, which is not beside it")
    if probe is not None:
        try:
            probe.check(src)
        except ModelLoadError as exc:
            raise PackageError(f"{src.name}: {exc}") from exc
    if len(sig.inputs) != 1:
        raise PackageError(f"expected a model with one image input, found {[n for n, _ in sig.inputs]}")
    input_name, input_shape = sig.inputs[0]
    if len(input_shape) != 4 or isinstance(input_shape[1], int) and input_shape[1] != 3:
        raise PackageError(f"input {input_name!r} has shape {input_shape}; expected [N,3,H,W]")
    fixed_h, fixed_w = input_shape[2], input_shape[3]
    fixed = isinstance(fixed_h, int) and isinstance(fixed_w, int) and fixed_h > 0 and fixed_w > 0
    if image_size is None:
        if not fixed:
            raise PackageError(f"input {input_name!r} has a dynamic size {input_shape}; give the image size")
        image_size = (int(fixed_w), int(fixed_h))
    elif fixed and tuple(image_size) != (fixed_w, fixed_h):
        raise PackageError(f"image size {image_size[0]}x{image_size[1]} does not fit the model: its input "
                           f"{input_name!r} is fixed at {fixed_w}x{fixed_h} (leave the image size out)")
    providers = [str(p).lower() for p in (execution or {}).get("providers", [])]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise PackageError(f"execution providers {unknown} are unknown; choose from {list(PROVIDERS)}")
    if classification_logic is not None and classification_logic not in CLASSIFICATION_LOGIC:
        raise PackageError(f"classification logic {classification_logic!r} must be one of "
                           f"{list(CLASSIFICATION_LOGIC)}")
    if interpolation is None:
        interpolation = "area" if package_format == "dda" else "bilinear"
    interp = parse_interpolation({"interpolation": interpolation}, "interpolation", "bilinear")
    outputs = _output_roles(kind, sig)
    if kind == "segmentation":
        channels = dict(sig.outputs)[outputs["logits"]][1]
        if isinstance(channels, int) and channels < 2:
            raise PackageError(f"a segmentation model needs a [N,C,H,W] output with C >= 2 class channels; "
                               f"{outputs['logits']!r} has {channels} (an anomaly map? use --kind anomalib or "
                               "classification)")
        if classes and isinstance(channels, int) and len(classes) != channels:
            raise PackageError(f"{len(classes)} class names for {channels} class channels of {outputs['logits']!r}")
    if package_format == "dda":
        from agent.core.formats import dda

        dda_doc, files_map = dda.manifest_for(src, sig, kind=kind, outputs=outputs, name=name, threshold=threshold,
                                          classes=classes, colors=colors, image_size=image_size, normalize=normalize,
                                          description=description, arn=arn, model_version=model_version,
                                          autostart=autostart, providers=providers, class_normal_ids=class_normal_ids,
                                          image_classes=image_classes, seg_normal_ids=seg_normal_ids,
                                          classification_logic=classification_logic, raw_image_size=raw_image_size,
                                          interpolation=interp, probe=probe)
        return _write_package(src, out_dir, dda_doc, files_map)

    stage: dict[str, Any] = {
        "type": kind,
        "threshold": 0.5 if threshold is None else float(threshold),
        "image_width": image_size[0],
        "image_height": image_size[1],
        "image_range_scale": True,
        "normalize": IMAGENET if normalize == "imagenet" else None,
        "interpolation": interp,
    }
    graph: dict[str, Any] = {"model_graph_type": "single_stage_model_graph", "stages": [stage]}
    doc: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "model_version": model_version,
        "lookout_vision_model_arn": arn,
        "description": description,
        "runtime": "onnx",
        "runtime_artifact": src.name,
        "kind": kind,
        "input": input_name,
        "outputs": outputs,
        "dataset": {"image_width": image_size[0], "image_height": image_size[1]},
        "model_graph": graph,
        "autostart": autostart,
    }
    if class_normal_ids is not None:
        stage["class_normal_ids"] = [int(i) for i in class_normal_ids]
    if seg_normal_ids is not None:
        stage["seg_normal_ids"] = [int(i) for i in seg_normal_ids]
    if classification_logic is not None:
        stage["classification_logic"] = classification_logic
    if raw_image_size is not None:
        stage["raw_image_shape"] = [int(raw_image_size[1]), int(raw_image_size[0])]
    if image_classes:
        graph["image_level_classes"] = {"names": list(image_classes),
                                        "normal_ids": [int(i) for i in (class_normal_ids or [0])]}
    scores = outputs.get("score") or outputs.get("class_scores")
    if scores is not None and (kind == "classification" or "class_scores" in outputs):
        if score_activation == "auto":
            shape = dict(sig.outputs)[scores]
            last = shape[-1] if shape else 1
            score_activation = "softmax" if isinstance(last, int) and last >= 2 else "none"
        doc["score_activation"] = score_activation
    if kind != "classification":
        names = list(classes) if classes else ["background", "anomaly"]
        graph["pixel_level_classes"] = {"names": names, "normal_ids": [0]}
        if colors:
            graph["pixel_level_classes"]["colors"] = [c.upper() for c in colors]
    if kind == "anomalib_v1":
        if not metadata_file.is_file():
            raise PackageError("an anomalib 1.x export needs the metadata.json written beside the model")
        try:
            doc["normalization"] = json.loads(metadata_file.read_text())
        except json.JSONDecodeError as exc:
            raise PackageError(f"{metadata_file}: not valid JSON: {exc}") from exc
    if execution:
        doc["execution"] = {**execution, **({"providers": providers} if providers else {})}
    if extra:
        doc.update(extra)
    return _write_package(src, out_dir, doc, {rel: rel for rel in [src.name, *sig.external_files]})


def _write_package(src: Path, out_dir: Path | str, doc: dict[str, Any], files_map: Mapping[str, str]) -> ModelPackage:
    """Copy files (package path → path beside src) and write the manifest, beside out_dir then renamed into
    place, so a watcher never sees half a package; directories get 0777 less the umask."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise PackageError(f"{out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_dir(out.parent, f".{out.name}.")
    try:
        files = {}
        for rel, source in files_map.items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src.parent / source, dest)
            files[rel] = sha256_file(dest)
        doc["files"] = files
        (tmp / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n")
        package = load_package(tmp)  # validate what we wrote, with the same rules as the agent
        if package.unservable:
            raise PackageError(package.unservable)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    del package
    return load_package(out)


def _output_roles(kind: str, sig: OnnxSignature) -> dict[str, str]:
    names = [n for n, _ in sig.outputs]
    if kind == "anomalib":
        roles: dict[str, str] = {r: r for r in ("pred_score", "anomaly_map", "pred_mask") if r in names}
        if "pred_score" not in roles and "anomaly_map" not in roles:
            raise PackageError(f"anomalib export without pred_score or anomaly_map outputs: {names}")
        return {{"pred_score": "score", "anomaly_map": "anomaly_map", "pred_mask": "mask"}[k]: v
                for k, v in roles.items()}
    if kind == "anomalib_v1":
        return {"anomaly_map": names[0]}
    if kind == "segmentation":
        seg = [n for n, shape in sig.outputs if len(shape) == 4]
        if not seg:
            raise PackageError(f"segmentation model without a [N,C,H,W] output: {names}")
        seg_roles = {"logits": seg[0]}
        heads = [n for n, shape in sig.outputs if len(shape) in (1, 2) and n != seg[0]]
        if heads:  # a classification head beside the segmentation head scores the image
            seg_roles["class_scores"] = heads[0]
        return seg_roles
    return {"score": names[0]}
