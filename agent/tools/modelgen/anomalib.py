"""Generators for anomalib-shaped ONNX exports (1.x and 2.x contracts).

Every model here is a small but *real* detector whose outputs can be
predicted exactly from the input image, so tests of the serving stack can
assert semantics and not only shapes.

The "distance detector" used by :func:`build_anomalib_v2`,
:func:`build_anomalib_v1` and :func:`build_tiny`
------------------------------------------------------------------------
Input is an RGB float32 tensor scaled to 0..1.  For every pixel::

    d(p)   = sqrt(sum_c ((x[c,p] - 0.5) * 1.0) ** 2)      # distance from mid-grey
    map(p) = clip((d(p) - 0.3) / 0.6 + 0.5, 0, 1)          # anomalib min-max normalisation

i.e. the baked "normal statistics" are a mean of 0.5 and an inverse std of
1.0 for every channel and pixel, the (raw) threshold is 0.3 and the
normalisation range is min=0, max=0.6.  Then::

    pred_score = max_p map(p)        pred_label = pred_score > 0.5
    anomaly_map = map                pred_mask  = map > 0.5   (i.e. d(p) > 0.3)

Worked examples (uint8 RGB values divided by 255):

* uniform mid-grey (128,128,128): d = 0.0034, map = 0.0057 everywhere, so
  ``pred_score < 0.2``, ``pred_label`` False, ``pred_mask`` all False;
* any saturated primary/secondary colour or black/white, e.g. red
  (255,0,0): d = 0.866, map = 1.0 -> a grey image with a 16x16 red square
  scores 1.0 (> 0.8), ``pred_label`` True and ``pred_mask`` is True on
  exactly the square's pixels.

:func:`reference_outputs` computes the same thing in numpy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "NORMAL_MEAN",
    "RAW_THRESHOLD",
    "RAW_MIN",
    "RAW_MAX",
    "V1_RAW_SCALE",
    "reference_distance",
    "reference_outputs",
    "build_anomalib_v2",
    "build_anomalib_v1",
    "build_tiny",
    "build_patchcore_like",
]

# The distance-detector constants (documented in the module docstring).
NORMAL_MEAN: float = 0.5
RAW_THRESHOLD: float = 0.3
RAW_MIN: float = 0.0
RAW_MAX: float = 0.6
# anomalib 1.x exports emit raw, un-normalised maps; scale the distance so
# the raw values live in a visibly different range (0..~34.6).
V1_RAW_SCALE: float = 40.0

# onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes IR 14 by default.
IR_VERSION = 9
OPSET = 17

V2_OUTPUTS = ("pred_score", "pred_label", "anomaly_map", "pred_mask")


# ---------------------------------------------------------------------------
# numpy reference
# ---------------------------------------------------------------------------


def _to_chw_float(image: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 (or float HxWx3 / 3xHxW in 0..1) -> float64 3xHxW in 0..1."""
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float64) / 255.0
    else:
        arr = arr.astype(np.float64)
    if arr.ndim != 3:
        raise ValueError(f"expected a single HxWx3 or 3xHxW image, got shape {arr.shape}")
    # HxWx3 is the project's image layout; 3xHxW is accepted for float tensors.
    if arr.shape[-1] == 3:
        arr = arr.transpose(2, 0, 1)
    elif arr.shape[0] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {arr.shape}")
    return arr


def reference_distance(image: np.ndarray) -> np.ndarray:
    """Raw per-pixel distance ``d`` (HxW float64) of the distance detector."""
    chw = _to_chw_float(image)
    return np.sqrt(((chw - NORMAL_MEAN) ** 2).sum(axis=0))


def reference_outputs(image: np.ndarray) -> dict[str, np.ndarray]:
    """numpy prediction of the v2 outputs (batch of 1) for ``image``.

    ``image`` is uint8 HxWx3 RGB (or float 0..1).  Returns a dict keyed like
    the ONNX outputs with the same shapes: pred_score [1], pred_label [1],
    anomaly_map [1,1,H,W], pred_mask [1,1,H,W].
    """
    d = reference_distance(image)
    amap = np.clip((d - RAW_THRESHOLD) / (RAW_MAX - RAW_MIN) + 0.5, 0.0, 1.0)
    score = np.array([amap.max()], dtype=np.float32)
    return {
        "pred_score": score,
        "pred_label": score > 0.5,
        "anomaly_map": amap[None, None].astype(np.float32),
        "pred_mask": (amap > 0.5)[None, None],
    }


# ---------------------------------------------------------------------------
# graph helpers (shared with classic.py / padim.py)
# ---------------------------------------------------------------------------


class GraphBuilder:
    """Tiny accumulator for nodes/initialisers so builders read top-down."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, name: str, value: np.ndarray | float | list, dtype: type = np.float32) -> str:
        arr: np.ndarray = np.asarray(value, dtype=dtype)
        tensor = numpy_helper.from_array(arr, name=name)
        if arr.size <= 16:
            # Scalars, axes and shape tensors become Constant nodes: they stay
            # inline when saving with external data (onnxruntime cannot infer
            # shapes from a Reshape/Resize shape tensor stored externally).
            self.nodes.append(helper.make_node("Constant", [], [name], name=name, value=tensor))
        else:
            self.inits.append(tensor)
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        if output is None:
            self._n += 1
            output = f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def model(
        self,
        inputs: list[onnx.ValueInfoProto],
        outputs: list[onnx.ValueInfoProto],
        *,
        graph_name: str,
        doc: str,
        metadata: dict[str, str] | None = None,
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, initializer=self.inits)
        model = helper.make_model(
            graph,
            ir_version=IR_VERSION,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="agent.tools.modelgen",
            doc_string=doc,
        )
        if metadata:
            helper.set_model_props(model, metadata)
        onnx.checker.check_model(model)
        return model


def save_model(model: onnx.ModelProto, path: Path, *, external_data: bool) -> Path:
    """Save ``model`` to ``path``; with ``external_data`` every initialiser
    goes to ``<path.name>.data`` beside it (e.g. ``model.onnx.data``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = path.with_name(path.name + ".data")
    # onnx appends to an existing external-data file, so a stale one from a
    # previous build would corrupt the offsets: always start fresh.
    if data_path.exists():
        data_path.unlink()
    if external_data:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_path.name,
            size_threshold=0,
        )
    else:
        onnx.save_model(model, str(path))
    # Path-based check also validates the external-data references.
    onnx.checker.check_model(str(path))
    return path


def batch_dim(dynamic_batch: bool) -> int | str:
    return "batch" if dynamic_batch else 1


def add_v2_postprocess(
    g: GraphBuilder,
    raw_map: str,
    *,
    threshold: float,
    vmin: float,
    vmax: float,
) -> None:
    """Append anomalib-2.x style normalisation + thresholding to ``raw_map``.

    ``raw_map`` is [N,1,H,W] float32.  Produces the four named outputs
    ``pred_score`` [N] = max(anomaly_map), ``pred_label`` [N] bool = score>0.5,
    ``anomaly_map`` = clip((raw - threshold)/(vmax - vmin) + 0.5, 0, 1) and
    ``pred_mask`` = anomaly_map > 0.5.
    """
    if not vmax > vmin:
        raise ValueError(f"normalisation range must be positive (min={vmin}, max={vmax})")
    t = g.const("norm_threshold", threshold)
    r = g.const("norm_range", vmax - vmin)
    half = g.const("half", 0.5)
    lo = g.const("clip_lo", 0.0)
    hi = g.const("clip_hi", 1.0)
    shifted = g.op("Sub", [raw_map, t])
    scaled = g.op("Div", [shifted, r])
    centred = g.op("Add", [scaled, half])
    g.op("Clip", [centred, lo, hi], "anomaly_map")
    # Image score = max of the normalised map (normalisation is monotone, so
    # this equals normalising the raw max with the same statistics).
    g.op("ReduceMax", ["anomaly_map"], "pred_score", axes=[1, 2, 3], keepdims=0)
    g.op("Greater", ["pred_score", half], "pred_label")
    g.op("Greater", ["anomaly_map", half], "pred_mask")


def v2_outputs(n: int | str, h: int, w: int) -> list[onnx.ValueInfoProto]:
    return [
        helper.make_tensor_value_info("pred_score", TensorProto.FLOAT, [n]),
        helper.make_tensor_value_info("pred_label", TensorProto.BOOL, [n]),
        helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [n, 1, h, w]),
        helper.make_tensor_value_info("pred_mask", TensorProto.BOOL, [n, 1, h, w]),
    ]


def _check_size(image_size: tuple[int, int]) -> tuple[int, int]:
    h, w = (int(v) for v in image_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return h, w


def _add_distance(g: GraphBuilder, x: str, h: int, w: int, *, full_stats: bool, scale: float = 1.0) -> str:
    """Raw map d = scale * ||(x - mean) * inv_std||_2 over channels -> [N,1,H,W].

    ``full_stats`` bakes per-pixel statistics ([1,3,H,W] tensors, like a
    model's learnt weights, and large enough to exercise external data);
    otherwise per-channel [1,3,1,1] constants keep the model tiny.  The
    values are the same either way (mean 0.5, inverse std 1.0).
    """
    shape = (1, 3, h, w) if full_stats else (1, 3, 1, 1)
    mean = g.const("normal_mean", np.full(shape, NORMAL_MEAN))
    inv_std = g.const("normal_inv_std", np.ones(shape))
    diff = g.op("Sub", [x, mean])
    z = g.op("Mul", [diff, inv_std])
    sq = g.op("Mul", [z, z])
    axes = g.const("sum_axes_c", [1], dtype=np.int64)
    ssum = g.op("ReduceSum", [sq, axes], keepdims=1)
    d = g.op("Sqrt", [ssum])
    if scale != 1.0:
        d = g.op("Mul", [d, g.const("raw_scale", scale)])
    return d


# ---------------------------------------------------------------------------
# public builders
# ---------------------------------------------------------------------------


def build_anomalib_v2(
    path: Path,
    *,
    image_size: tuple[int, int] = (64, 64),
    dynamic_batch: bool = False,
    external_data: bool = True,
    input_name: str = "input",
) -> Path:
    """Write an anomalib 2.x-style export of the distance detector.

    Contract: input ``input`` float32 [N,3,H,W] RGB 0..1 (N = 1, or the
    symbolic ``batch`` when ``dynamic_batch``); outputs, in order,
    ``pred_score`` float32 [N], ``pred_label`` bool [N], ``anomaly_map``
    float32 [N,1,H,W], ``pred_mask`` bool [N,1,H,W].

    Semantics (see module docstring; :func:`reference_outputs` in numpy):
    ``anomaly_map = clip((||rgb - 0.5||_2 - 0.3)/0.6 + 0.5, 0, 1)`` per pixel;
    uniform (128,128,128) grey -> pred_score 0.0057 (< 0.2), label False,
    empty mask; a saturated red 16x16 square on that grey -> pred_score 1.0,
    label True, mask exactly the square.

    With ``external_data`` (default) the baked [1,3,H,W] mean and inverse-std
    tensors are stored in ``<name>.data`` beside ``path``.  Returns ``path``.
    """
    h, w = _check_size(image_size)
    n = batch_dim(dynamic_batch)
    g = GraphBuilder()
    raw = _add_distance(g, input_name, h, w, full_stats=True)
    add_v2_postprocess(g, raw, threshold=RAW_THRESHOLD, vmin=RAW_MIN, vmax=RAW_MAX)
    model = g.model(
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [n, 3, h, w])],
        v2_outputs(n, h, w),
        graph_name="anomalib_v2_distance",
        doc=build_anomalib_v2.__doc__ or "",
        metadata={"generator": "agent.tools.modelgen.build_anomalib_v2", "format": "anomalib-2.x"},
    )
    return save_model(model, Path(path), external_data=external_data)


MetadataStyle = Literal["nested", "dotted", "flat"]


def v1_metadata(style: MetadataStyle = "nested") -> dict:
    """The anomalib 1.x ``metadata.json`` content for :func:`build_anomalib_v1`.

    Styles (all carry ``task``, ``image_threshold``, ``pixel_threshold``):

    * ``"nested"``: ``{"pred_scores": {"min", "max"}, "anomaly_maps": {"min", "max"}}``;
    * ``"dotted"``: ``"pred_scores.min"``, ``"pred_scores.max"``,
      ``"anomaly_maps.min"``, ``"anomaly_maps.max"`` -- what anomalib 1.x's
      exporter actually writes (the MinMax metric's flattened state_dict,
      read back by its ``Inferencer._normalize``);
    * ``"flat"``: ``"min"``, ``"max"`` -- the anomalib 0.x form, one range
      shared by scores and maps.
    """
    t = V1_RAW_SCALE * RAW_THRESHOLD
    lo = V1_RAW_SCALE * RAW_MIN
    hi = V1_RAW_SCALE * RAW_MAX
    base: dict = {"task": "segmentation", "image_threshold": t, "pixel_threshold": t}
    if style == "nested":
        base["pred_scores"] = {"min": lo, "max": hi}
        base["anomaly_maps"] = {"min": lo, "max": hi}
    elif style == "dotted":
        base.update({"pred_scores.min": lo, "pred_scores.max": hi, "anomaly_maps.min": lo, "anomaly_maps.max": hi})
    elif style == "flat":
        base.update({"min": lo, "max": hi})
    else:
        raise ValueError(f"unknown metadata style {style!r}")
    return base


def build_anomalib_v1(
    path: Path,
    *,
    image_size: tuple[int, int] = (64, 64),
    external_data: bool = False,
    metadata_style: MetadataStyle = "nested",
) -> Path:
    """Write an anomalib 1.x-style export plus ``metadata.json`` beside it.

    Contract: input ``input`` float32 [1,3,H,W] RGB 0..1; one output
    ``output`` float32 [1,1,H,W] = the *raw* map ``40 * ||rgb - 0.5||_2``
    (range 0..34.64).  ``metadata.json`` (see :func:`v1_metadata`; default
    nested style) holds ``task="segmentation"``, ``image_threshold =
    pixel_threshold = 12.0`` and min 0.0 / max 24.0 for both ``pred_scores``
    and ``anomaly_maps``.

    Normalising with anomalib's ``clip((x - thr)/(max - min) + 0.5, 0, 1)``
    gives exactly the v2 semantics of :func:`build_anomalib_v2`: grey
    (128,128,128) -> raw 0.136, normalised 0.0057; saturated red -> raw
    34.64, normalised 1.0; image score = max of the map.
    """
    h, w = _check_size(image_size)
    g = GraphBuilder()
    _add_distance(g, "input", h, w, full_stats=True, scale=V1_RAW_SCALE)
    # Rename the last node's output to the public name.
    g.nodes[-1].output[0] = "output"
    model = g.model(
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, h, w])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, h, w])],
        graph_name="anomalib_v1_distance",
        doc=build_anomalib_v1.__doc__ or "",
        metadata={"generator": "agent.tools.modelgen.build_anomalib_v1", "format": "anomalib-1.x"},
    )
    out = save_model(model, Path(path), external_data=external_data)
    (out.parent / "metadata.json").write_text(json.dumps(v1_metadata(metadata_style), indent=2) + "\n")
    return out


def build_tiny(
    path: Path,
    *,
    image_size: tuple[int, int] = (224, 224),
    dynamic_batch: bool = False,
) -> Path:
    """Write a minimal v2-contract model for benchmarks (well under 1 ms on CPU at 224x224).

    Same contract and exact semantics as :func:`build_anomalib_v2` (distance
    from mid-grey), but the statistics are per-channel [1,3,1,1] constants and
    the model is stored inline (no external data), so it is ~1 kB and its
    cost is a handful of elementwise ops.
    """
    h, w = _check_size(image_size)
    n = batch_dim(dynamic_batch)
    g = GraphBuilder()
    raw = _add_distance(g, "input", h, w, full_stats=False)
    add_v2_postprocess(g, raw, threshold=RAW_THRESHOLD, vmin=RAW_MIN, vmax=RAW_MAX)
    model = g.model(
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [n, 3, h, w])],
        v2_outputs(n, h, w),
        graph_name="tiny_distance",
        doc=build_tiny.__doc__ or "",
        metadata={"generator": "agent.tools.modelgen.build_tiny", "format": "anomalib-2.x"},
    )
    return save_model(model, Path(path), external_data=False)


# ---------------------------------------------------------------------------
# PatchCore-like
# ---------------------------------------------------------------------------


def conv2d_numpy(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, *, stride: int, pad: int) -> np.ndarray:
    """NCHW convolution with zero padding, matching ONNX ``Conv`` (float64).

    Small or strided kernels loop over taps; large stride-1 kernels use an
    FFT correlation (both far faster in numpy than a sliding-window einsum).
    """
    n, c, _, _ = x.shape
    f, c2, kh, kw = weight.shape
    if c != c2:
        raise ValueError("channel mismatch")
    xp = np.pad(np.asarray(x, dtype=np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    hp, wp = xp.shape[2:]
    if stride > 1 or kh * kw <= 9:
        # Small or strided kernels: one BLAS product per tap, only at the
        # output positions.
        ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
        acc = np.zeros((f, n, ho, wo))
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, :, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
                acc += np.tensordot(weight[:, :, i, j], patch, axes=([1], [1]))
        out = acc.transpose(1, 0, 2, 3)
        if bias is not None:
            out = out + bias[None, :, None, None]
        return out
    # Large stride-1 kernels: FFT correlation, much faster than 81 taps.
    shape = (hp + kh - 1, wp + kw - 1)  # full linear size: no circular wrap-around
    # Correlation == convolution with the flipped kernel.
    wf = np.fft.rfft2(weight[:, :, ::-1, ::-1], s=shape)
    out = np.empty((n, f, hp - kh + 1, wp - kw + 1))
    for s0 in range(0, n, 16):  # chunk the batch to bound memory
        xf = np.fft.rfft2(xp[s0 : s0 + 16], s=shape)
        full = np.fft.irfft2(np.einsum("nchw,fchw->nfhw", xf, wf, optimize=True), s=shape)
        out[s0 : s0 + 16] = full[:, :, kh - 1 : hp, kw - 1 : wp]
    out = out[:, :, ::stride, ::stride]
    if bias is not None:
        out = out + bias[None, :, None, None]
    return out


def avgpool_numpy(x: np.ndarray, k: int, stride: int, pad: int) -> np.ndarray:
    """ONNX ``AveragePool`` with ``count_include_pad=0`` (the default)."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ones = np.pad(np.ones(x.shape[2:]), pad)
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    cnt = np.lib.stride_tricks.sliding_window_view(ones, (k, k))[::stride, ::stride].sum(axis=(-1, -2))
    return win.sum(axis=(-1, -2)) / cnt


def _patchcore_features_numpy(
    x: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray
) -> tuple[np.ndarray, tuple[int, int]]:
    """[N,3,H,W] -> ([N*h*w, C] patch features, (h, w)), as in the ONNX graph."""
    f = np.maximum(conv2d_numpy(x, w1, b1, stride=2, pad=1), 0)
    f = np.maximum(conv2d_numpy(f, w2, b2, stride=2, pad=1), 0)
    f = avgpool_numpy(f, 3, 1, 1)
    n, c, h, w = f.shape
    return f.transpose(0, 2, 3, 1).reshape(-1, c), (h, w)


def _nn_distance(feats: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Distance of each feature row to its nearest bank row (float32 maths:
    only used for calibration, where speed matters more than the last digit)."""
    f32, b32 = feats.astype(np.float32), bank.astype(np.float32)
    partial = (b32**2).sum(1)[None] - 2 * (f32 @ b32.T)
    d2 = partial.min(axis=1).astype(np.float64) + (feats**2).sum(1)
    return np.sqrt(np.maximum(d2, 0.0))


def build_patchcore_like(
    path: Path,
    *,
    image_size: tuple[int, int] = (256, 256),
    bank: int = 4096,
    feature_dim: int = 64,
    dynamic_batch: bool = False,
    external_data: bool = True,
    seed: int = 0,
) -> Path:
    """Write a v2-contract model with a PatchCore-like compute profile.

    Graph: Conv(3->16, 3x3, s2)+ReLU -> Conv(16->``feature_dim``, 3x3,
    s2)+ReLU -> AvgPool 3x3 (neighbourhood aggregation) -> patch features at
    1/4 resolution -> squared L2 distance to a ``bank`` x ``feature_dim``
    memory bank via MatMul -> ReduceMin -> Sqrt -> bilinear Resize to HxW ->
    the same normalisation/thresholding as :func:`build_anomalib_v2`.
    Contract identical to :func:`build_anomalib_v2` (names, dtypes, shapes).

    The conv weights are random (fixed by ``seed``) and the memory bank holds
    features of near-uniform mid-grey "normal" images; the threshold and
    range are calibrated at build time (in numpy) so that: a uniform
    (128,128,128) image scores < 0.2 (label False, empty mask), mid-grey
    with +-6 levels of uniform noise scores < 0.5, and a
    saturated red / green / blue / black / white 16x16 square on that grey
    scores > 0.8 (label True) with ``pred_mask`` True at the square's centre
    and False far away from it (the mask is blurred by ~4-8 px at the square's
    edges by the receptive field and the upsampling).  Cost at 256x256 with
    the defaults is ~2.2 GFLOP, almost all in the 4096x64 @ 64x4096 MatMul
    (~25 ms on a 2-core CPU).  Building takes ~1-2 s (numpy calibration).
    """
    h, w = _check_size(image_size)
    if h % 4 or w % 4 or min(h, w) < 32:
        raise ValueError("image_size must be >= 32 and divisible by 4 (two stride-2 convs)")
    n = batch_dim(dynamic_batch)
    rng = np.random.default_rng(seed)
    c1 = 16
    w1 = rng.normal(0, np.sqrt(2.0 / 27), (c1, 3, 3, 3))
    b1 = rng.normal(0, 0.1, c1)
    w2 = rng.normal(0, np.sqrt(2.0 / (9 * c1)), (feature_dim, c1, 3, 3))
    b2 = rng.normal(0, 0.1, feature_dim)

    def grey_images(k: int) -> np.ndarray:
        # "Normal" population: near-uniform mid-grey with a little sensor noise.
        base = rng.uniform(0.47, 0.53, (k, 1, 1, 1)) + rng.normal(0, 0.005, (k, 3, 1, 1))
        return np.clip(base + rng.normal(0, 0.015, (k, 3, h, w)), 0, 1)

    # Memory bank: every distinct feature of an exact 128/255 grey image
    # (border locations differ because of zero padding) plus a random subset
    # of features of the noisy normal population.
    exact, (fh, fw) = _patchcore_features_numpy(np.full((1, 3, h, w), 128 / 255), w1, b1, w2, b2)
    exact = np.unique(np.round(exact, 6), axis=0)
    pool, _ = _patchcore_features_numpy(grey_images(3), w1, b1, w2, b2)
    take = max(bank - len(exact), 0)
    idx = rng.choice(len(pool), size=take, replace=take > len(pool))
    mem = np.concatenate([exact, pool[idx]])[:bank]

    # Calibrate on held-out normals vs. coloured squares.
    normal_max = _nn_distance(_patchcore_features_numpy(grey_images(2), w1, b1, w2, b2)[0], mem).max()
    # One calibration image per saturated colour: a 16x16 square in the
    # centre of the grey image (scored in one batch).
    colours = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 0), (1, 1, 1)]
    imgs = np.full((len(colours), 3, h, w), 128 / 255)
    cy, cx = h // 2, w // 2
    for i, col in enumerate(colours):
        imgs[i, :, cy - 8 : cy + 8, cx - 8 : cx + 8] = np.asarray(col, dtype=np.float64)[:, None, None]
    dmaps = _nn_distance(_patchcore_features_numpy(imgs, w1, b1, w2, b2)[0], mem).reshape(len(colours), -1)
    defect_scores = dmaps.max(axis=1)
    defect_min = float(min(defect_scores))
    if not defect_min > normal_max:
        raise RuntimeError("patchcore-like calibration failed to separate normal/defect; try another seed")
    threshold = (normal_max + defect_min) / 2
    span = 1.25 * (defect_min - normal_max)  # maps normal_max -> 0.1, defect_min -> 0.9
    vmin, vmax = threshold - span / 2, threshold + span / 2

    g = GraphBuilder()
    f = g.op(
        "Conv",
        ["input", g.const("conv1_w", w1), g.const("conv1_b", b1)],
        kernel_shape=[3, 3],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
    )
    f = g.op("Relu", [f])
    f = g.op(
        "Conv",
        [f, g.const("conv2_w", w2), g.const("conv2_b", b2)],
        kernel_shape=[3, 3],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
    )
    f = g.op("Relu", [f])
    f = g.op("AveragePool", [f], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    f = g.op("Transpose", [f], perm=[0, 2, 3, 1])
    f = g.op("Reshape", [f, g.const("patch_shape", [-1, feature_dim], dtype=np.int64)])  # [P, C]
    # ||f - b||^2 = ||f||^2 - 2 f.b + ||b||^2  (MatMul is the PatchCore cost)
    fsq = g.op("ReduceSum", [g.op("Mul", [f, f]), g.const("axis1", [1], dtype=np.int64)], keepdims=1)
    cross = g.op("MatMul", [f, g.const("memory_bank_t", mem.T)])
    d2 = g.op(
        "Add",
        [g.op("Sub", [fsq, g.op("Mul", [cross, g.const("two", 2.0)])]), g.const("bank_sq", (mem**2).sum(1)[None])],
    )
    dmin = g.op("ReduceMin", [d2], axes=[1], keepdims=1)
    dist = g.op("Sqrt", [g.op("Max", [dmin, g.const("zero", 0.0)])])
    fmap = g.op("Reshape", [dist, g.const("map_shape", [-1, 1, fh, fw], dtype=np.int64)])
    raw = g.op(
        "Resize",
        [fmap, "", g.const("resize_scales", [1.0, 1.0, h / fh, w / fw])],
        mode="linear",
        coordinate_transformation_mode="half_pixel",
    )
    add_v2_postprocess(g, raw, threshold=threshold, vmin=vmin, vmax=vmax)
    model = g.model(
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [n, 3, h, w])],
        v2_outputs(n, h, w),
        graph_name="patchcore_like",
        doc=build_patchcore_like.__doc__ or "",
        metadata={"generator": "agent.tools.modelgen.build_patchcore_like", "format": "anomalib-2.x"},
    )
    return save_model(model, Path(path), external_data=external_data)
