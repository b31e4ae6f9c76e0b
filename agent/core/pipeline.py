"""The inference pipeline of one loaded model: pre-process → runtime → post-process → result.

Everything that can be decided once (input name, target size, per-channel scale/bias, output names,
palette) is prepared when the model starts, not per request. Two sets of rules turn outputs into a
result (docs/model-package.md): the project's kinds (anomalib, anomalib_v1, classification,
segmentation) and DDA's supervised multi-head model (semantics "dda": per-class probabilities, no
softmax, the score summed over the classes outside class_normal_ids). Both share the verdict rule, the
classification_logic override and the masks (agent/core/masks.py).
"""

from __future__ import annotations

import math
import time
import typing  # runtime-evaluated aliases below: collections.abc generics need Python >= 3.9
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from agent.core import masks
from agent.core.masks import MaskPolicy
from agent.core.package import ModelPackage
from agent.core.resize import Frame, ResizeWorkers, pillow_bilinear, whole
from agent.errors import InferenceFailed, ModelLoadError
from agent.runtime.base import RuntimeSession

Clock = typing.Callable[[], float]


class MaskRows(Protocol):
    """Where a full-size mask can go as its distinct rows plus how often each repeats (e.g.
    frames.MaskTarget, which writes them into a client's segment with pwritev): a nearest-neighbour
    upscale repeats every model row many times, so the full-size mask is never built."""

    def write_rows(self, rows: np.ndarray, runs: Sequence[int]) -> None: ...

#: DDA's fixed ImageNet statistics (basic_preprocessor.py), float32 (3,1,1) as DDA computes with them.
_DDA_MEAN = np.array([[[0.485]], [[0.456]], [[0.406]]], dtype=np.float32)
_DDA_STD = np.array([[[0.229]], [[0.224]], [[0.225]]], dtype=np.float32)


@dataclass(frozen=True)
class Anomaly:
    name: str
    area: float  # fraction 0..1 of the (full-size) mask
    color: str  # "#RRGGBB"


@dataclass
class Detection:
    is_anomalous: bool
    confidence: float
    score: float
    threshold: float
    anomalies: list[Anomaly] = field(default_factory=list)
    #: RGB888 mask (height x width x 3 uint8, C-contiguous) to send inline, or None: models without a mask,
    #: masks the MaskPolicy leaves out, and masks rendered into the caller's buffer (see mask_in_buffer).
    mask: np.ndarray | None = None
    #: Size of `mask` (or of the mask in the caller's buffer); smaller than mask_full_size when scaled to fit.
    mask_width: int = 0
    mask_height: int = 0
    #: The mask's full size (the frame's, or the package's raw_image_shape), which the areas refer to.
    mask_full_size: tuple[int, int] = (0, 0)
    #: Seconds per stage: preprocess, inference, postprocess.
    timings: dict[str, float] = field(default_factory=dict)
    #: True when the full-size mask was written into Predictor.predict's mask_out.
    mask_in_buffer: bool = False

    @property
    def has_mask(self) -> bool:
        return self.mask is not None or self.mask_in_buffer


def decide(score: float, threshold: float) -> tuple[bool, float]:
    """LFV's / DDA's rule: anomalous when round(score, 4) >= round(threshold, 4); confidence is the chosen
    side's, on the score clipped to 0..1 (utils/__init__.py of DDA's lyra_science_processing_utils)."""
    anomalous = round(score, 4) >= round(threshold, 4)
    return anomalous, confidence(score, anomalous)


def confidence(score: float, anomalous: bool) -> float:
    clipped = min(max(score, 0.0), 1.0)
    return clipped if anomalous else 1.0 - clipped


def override(anomalous: bool, present: set[int], logic: str, seg_normal_ids: tuple[int, ...]) -> bool:
    """DDA's _overide_class_label: the verdict combined with the mask's (normal iff every class present in
    the resized mask is in seg_normal_ids)."""
    if logic == "cls_head":
        return anomalous
    seg_anomalous = not present <= set(seg_normal_ids)
    if logic == "seg_head":
        return seg_anomalous
    if logic == "cls_and_seg":
        return anomalous and seg_anomalous
    return anomalous or seg_anomalous  # cls_or_seg (the package reader admits nothing else)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class Predictor:
    """Runs one package's model on HxWx3 uint8 RGB images. Thread-safe (no per-call state)."""

    def __init__(self, package: ModelPackage, session: RuntimeSession, clock: Clock = time.perf_counter, *,
                 fast_reduce: bool = True, resize_workers: ResizeWorkers | None = None) -> None:
        """fast_reduce: for "bilinear" (Pillow) packages, do Pillow's reducing_gap box reduction with
        OpenCV on the 3-byte frame when it is large (resize.reduce_frame: within 1 grey level of Pillow's
        output). False: Pillow alone, the reference pipeline (the benchmark's floor uses it).
        resize_workers: threads that resize row bands of large frames alongside the request's own
        (resize.pillow_bilinear); None: the request's thread alone."""
        self.package = package
        self.session = session
        self.clock = clock
        inputs = list(session.inputs)
        if len(inputs) != 1:
            raise ModelLoadError(f"model has {len(inputs)} inputs; an image model needs exactly one")
        spec = inputs[0]
        if package.input_name and package.input_name != spec.name:
            raise ModelLoadError(f"manifest input {package.input_name!r} is not the model's input {spec.name!r}")
        self.input_name = spec.name
        self.input_dtype = np.float16 if spec.dtype == "tensor(float16)" else np.float32
        self.size = (package.image_width, package.image_height)
        self._dda = package.semantics == "dda"
        self._resampler = package.resampler
        self._fast_reduce = fast_reduce
        self._resize_workers = resize_workers
        # /255 and mean/std fused into one multiply-add per channel in float32 over the whole CHW
        # tensor (a per-channel lookup-table gather with np.take measured 2-3x slower).
        self._scale, self._bias = self._affine(package)
        self._outputs = self._output_names(package, [o.name for o in session.outputs])
        self._names = list(self._outputs.values())
        self._colors = masks.palette(list(package.colors))
        self._palette_rgb = masks.palette_rgb(self._colors)
        n = max(len(package.class_names), 2)
        self._class_names = list(package.class_names) + [f"class_{i}" for i in range(len(package.class_names), n)]
        self._normal = np.array(sorted(set(package.normal_ids)), dtype=np.int64)
        self._class_normal = np.array(sorted(set(package.class_normal_ids)), dtype=np.int64)
        # DDA lists classes (and sends a mask) only when pixel_level_classes.names is not empty.
        self._lists_classes = bool(package.class_names) or not self._dda

    # -- set-up ------------------------------------------------------------------------------
    @staticmethod
    def _affine(package: ModelPackage) -> tuple[np.ndarray, np.ndarray]:
        """(scale, bias) per channel, shaped [3,1,1]: tensor = pixel * scale + bias."""
        mean = np.asarray(package.mean or (0.0, 0.0, 0.0), dtype=np.float64)
        std = np.asarray(package.std or (1.0, 1.0, 1.0), dtype=np.float64)
        step = 1.0 / 255.0 if package.range_scale else 1.0
        return ((step / std).astype(np.float32).reshape(3, 1, 1), (-mean / std).astype(np.float32).reshape(3, 1, 1))

    @staticmethod
    def _output_names(package: ModelPackage, available: list[str]) -> dict[str, str]:
        if package.semantics == "dda":
            # DDA's runners return the outputs in graph order: [seg, cls] with both heads (seg first).
            heads = ["seg", "cls"] if package.cls_head and package.seg_head else ["seg" if package.seg_head else "cls"]
            if len(available) < len(heads):
                raise ModelLoadError(f"the manifest enables {' and '.join(heads)} heads but the model has "
                                     f"{len(available)} output(s) {available}")
            return {role: available[i] for i, role in enumerate(heads)}
        roles = dict(package.outputs)
        if not roles:
            if package.kind == "anomalib":
                roles = {r: o for r, o in (("score", "pred_score"), ("anomaly_map", "anomaly_map"),
                                           ("mask", "pred_mask")) if o in available}
            elif package.kind == "segmentation":
                roles = {"logits": available[0]}
            elif package.kind == "anomalib_v1":
                roles = {"anomaly_map": available[0]}
            else:
                roles = {"score": available[0]}
        missing = [o for o in roles.values() if o not in available]
        if missing:
            raise ModelLoadError(f"manifest names outputs {missing} the model does not have (it has {available})")
        needed = {"anomalib": ("score", "anomaly_map"), "anomalib_v1": ("anomaly_map",),
                  "segmentation": ("logits",), "classification": ("score",)}[package.kind]
        if not any(r in roles for r in needed):
            raise ModelLoadError(f"a {package.kind} model needs an output for one of {list(needed)}")
        if package.kind == "anomalib" and "mask" in roles and "anomaly_map" in roles:
            del roles["anomaly_map"]  # pred_mask already is the thresholded map: don't fetch both
        return roles

    def mask_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the full-size mask for a frame: the package's raw_image_shape (DDA resizes its
        masks to it), else the frame's size."""
        raw = self.package.raw_image_shape
        return (raw[1], raw[0]) if raw is not None else (width, height)

    # -- per request ---------------------------------------------------------------------------
    def _resize(self, image: Frame) -> np.ndarray:
        width, height = self.size
        if image.shape[1] == width and image.shape[0] == height:
            return whole(image)
        if self._resampler == "cv2":
            image = whole(image)
            import cv2

            # cv2.resize as DDA calls it (dsize = (width, height)), on the uint8 RGB frame.
            src = image if image.flags.c_contiguous else np.ascontiguousarray(image)
            return np.asarray(cv2.resize(src, (width, height), interpolation=int(self.package.interpolation)))
        return pillow_bilinear(image, (width, height), self._fast_reduce, self._resize_workers)

    def preprocess(self, image: Frame) -> np.ndarray:
        width, height = self.size
        image = self._resize(image)
        if self._dda:
            # DDA's BasicPreProcessor arithmetic, step by step, so scores match it to the last bit.
            tensor = np.expand_dims(image, axis=0).transpose((0, 3, 1, 2)).astype(np.float32)
            if self.package.range_scale:
                tensor /= 255.0
            if self.package.mean is not None:
                tensor = (tensor - _DDA_MEAN) / _DDA_STD
            return tensor if self.input_dtype == np.float32 else tensor.astype(self.input_dtype)
        tensor = np.empty((1, 3, height, width), dtype=np.float32)
        chw = tensor[0]
        np.copyto(chw, image.transpose(2, 0, 1), casting="unsafe")  # uint8 HWC -> float32 CHW, one pass
        chw *= self._scale
        chw += self._bias
        return tensor if self.input_dtype == np.float32 else tensor.astype(self.input_dtype)

    def predict(self, image: Frame, mask_out: memoryview | MaskRows | None = None,
                policy: MaskPolicy | None = None) -> Detection:
        """image: HxWx3 uint8 RGB (any strides), or a frame read on demand (frames.SegmentFrame). Raises
        InferenceFailed when the runtime fails.

        mask_out: a writable buffer of at least mask_size()'s W*H*3 bytes, into which the full-size mask
        is rendered, or a MaskRows, which gets its rows (`Detection.mask` stays None, `mask_in_buffer` is
        True either way). Otherwise `policy` (default: MaskPolicy()) decides the inline mask."""
        t0 = self.clock()
        tensor = self.preprocess(image)
        t1 = self.clock()
        try:
            values = self.session.predict({self.input_name: tensor}, self._names)
        except Exception as exc:
            raise InferenceFailed(f"inference failed: {str(exc).strip().splitlines()[0] if str(exc) else exc!r}") \
                from exc
        t2 = self.clock()
        if len(values) != len(self._outputs):
            raise InferenceFailed(f"the runtime returned {len(values)} outputs for {len(self._outputs)} requested")
        outputs = {role: values[i] for i, role in enumerate(self._outputs)}
        try:
            detection = self.postprocess(outputs, image.shape[1], image.shape[0], mask_out, policy)
        except (ValueError, IndexError) as exc:
            raise InferenceFailed(f"model output does not fit a {self.package.kind} model: {exc}") from exc
        t3 = self.clock()
        detection.timings = {"preprocess": t1 - t0, "inference": t2 - t1, "postprocess": t3 - t2}
        return detection

    def postprocess(self, out: Mapping[str, np.ndarray], width: int, height: int,
                    mask_out: memoryview | MaskRows | None = None, policy: MaskPolicy | None = None) -> Detection:
        score, class_mask = self._dda_outputs(out) if self._dda else self._outputs_by_kind(out)
        if not math.isfinite(score):
            raise ValueError(f"score is {score}")
        package = self.package
        full_w, full_h = self.mask_size(width, height)
        counts = None
        if class_mask is not None:
            counts = masks.class_counts(class_mask, full_w, full_h, self._resampler)
        anomalous = round(score, 4) >= round(package.threshold, 4)
        # DDA overrides the verdict with the mask only for a score <= 1 and when both keys are given.
        if counts is not None and score <= 1.0 and package.classification_logic and package.seg_normal_ids is not None:
            present = {int(i) for i in np.flatnonzero(counts)}
            anomalous = override(anomalous, present, package.classification_logic, package.seg_normal_ids)
        detection = Detection(anomalous, confidence(score, anomalous), min(max(score, 0.0), 1.0), package.threshold)
        if class_mask is not None and counts is not None and self._lists_classes:
            self._mask_out(detection, class_mask, counts, full_w, full_h, mask_out, policy or MaskPolicy())
        return detection

    def _outputs_by_kind(self, out: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray | None]:
        """The project's kinds (docs/model-package.md, "Kinds")."""
        kind = self.package.kind
        class_mask: np.ndarray | None = None
        if kind == "anomalib":
            if "mask" in out:
                class_mask = np.asarray(out["mask"]).reshape(out["mask"].shape[-2:]).astype(np.uint8)
            elif "anomaly_map" in out:
                amap = np.asarray(out["anomaly_map"])
                class_mask = (amap.reshape(amap.shape[-2:]) >= 0.5).astype(np.uint8)
            if "score" in out:
                score = float(np.asarray(out["score"]).reshape(-1)[0])
            else:
                score = float(np.max(out["anomaly_map"]))
        elif kind == "anomalib_v1":
            score, class_mask = self._normalise_v1(np.asarray(out["anomaly_map"], dtype=np.float32))
        elif kind == "segmentation":
            logits = np.asarray(out["logits"], dtype=np.float32)[0]  # [C,h,w]
            class_mask = _class_ids(logits.argmax(axis=0))
            if "class_scores" in out:  # a classification head scores the image
                score = self._class_score(np.asarray(out["class_scores"], dtype=np.float32).reshape(-1))
            else:
                probs = _softmax(logits, axis=0)
                score = float((1.0 - probs[self._normal].sum(axis=0)).max())
        else:
            score = self._class_score(np.asarray(out["score"], dtype=np.float32).reshape(-1))
        return score, class_mask

    def _dda_outputs(self, out: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray | None]:
        """DDA's SupervisedMultiHeadPostProcessor: no softmax (the graph outputs probabilities); the score is
        the classification head's probability mass outside class_normal_ids (optionally calibrated), or,
        for a segmentation-only model, the mean of the whole segmentation tensor (DDA's rule: 1/C for a
        softmax output, so such models decide through classification_logic)."""
        package = self.package
        score = None
        if "cls" in out:
            pred = np.asarray(out["cls"])
            pred = pred.reshape(1, -1) if pred.ndim != 2 else pred
            anomaly_ids = [c for c in range(pred.shape[1]) if c not in package.class_normal_ids]
            score = float(np.sum(np.take(pred, anomaly_ids, axis=1), axis=1)[0])
            if package.calibration is not None:
                score = _calibrate(score, package)
        class_mask = None
        if "seg" in out:
            seg = np.asarray(out["seg"])
            if seg.ndim != 4:
                raise ValueError(f"the segmentation output has shape {list(seg.shape)}, not [1,C,H,W]")
            if score is None:
                score = float(np.mean(seg))
            if package.seg_recall_bias is not None:
                seg = np.array(seg, copy=True)
                normal = set(package.seg_normal_ids or ())
                for i in range(seg.shape[1]):
                    if i not in normal:
                        seg[0][i][:, :] += package.seg_recall_bias
            class_mask = _class_ids(np.argmax(seg.squeeze(0), axis=0))
        if score is None:
            raise ValueError("no classification or segmentation output")
        return score, class_mask

    def _normalise_v1(self, amap: np.ndarray) -> tuple[float, np.ndarray | None]:
        """anomalib 1.x: min-max normalise around the thresholds (as its inferencers did) so 0.5 = threshold."""
        norm = self.package.normalization
        assert norm is not None  # load_package guarantees it for anomalib_v1
        raw_score = float(amap.max())
        score = min(max((raw_score - norm.image_threshold) / (norm.score_max - norm.score_min) + 0.5, 0.0), 1.0)
        if amap.ndim < 2 or amap.shape[-1] == 1 and amap.shape[-2] == 1:
            return score, None
        pixels = amap.reshape(amap.shape[-2:])
        mask = ((pixels - norm.pixel_threshold) / (norm.map_max - norm.map_min) + 0.5 >= 0.5).astype(np.uint8)
        return score, mask

    def _class_score(self, values: np.ndarray) -> float:
        activation = self.package.score_activation
        if values.size == 1:
            v = float(values[0])
            return 1.0 / (1.0 + math.exp(-v)) if activation == "sigmoid" else v
        probs = _softmax(values, axis=0) if activation == "softmax" else values
        return float(1.0 - probs[self._class_normal[self._class_normal < probs.size]].sum())

    def _mask_out(self, detection: Detection, class_mask: np.ndarray, counts: np.ndarray, width: int, height: int,
                  mask_out: memoryview | MaskRows | None, policy: MaskPolicy) -> None:
        """Areas (at full size) and the mask: full size into mask_out, or inline at the policy's size."""
        total = float(width * height)
        # DDA lists every class present; the project's own kinds always list the background first.
        listed = [i for i in range(256) if counts[i] or (i == 0 and not self._dda)]
        detection.anomalies = [
            Anomaly(self._class_names[i] if i < len(self._class_names) else f"class_{i}", float(counts[i]) / total,
                    self._colors[i])
            for i in listed
        ]
        detection.mask_full_size = (width, height)
        if isinstance(mask_out, memoryview):
            masks.render(class_mask, width, height, self._palette_rgb, self._resampler, mask_out)
        elif mask_out is not None:
            # Coloured at model height and full width; masks.render's row runs, left for the sink to repeat.
            h = class_mask.shape[0]
            rows = masks.widen(class_mask, width, self._palette_rgb, self._resampler).reshape(h, width * 3)
            mask_out.write_rows(rows, masks.nearest_runs(h, height, self._resampler))
        if mask_out is not None:
            detection.mask_in_buffer = True
            detection.mask_width, detection.mask_height = width, height
            return
        size = policy.inline_size(width, height, detection.is_anomalous, [a.name for a in detection.anomalies])
        if size is None:
            return
        detection.mask = masks.render(class_mask, size[0], size[1], self._palette_rgb, self._resampler)
        detection.mask_width, detection.mask_height = size

    def warmup(self, runs: int, rng: np.random.Generator) -> None:
        """A few runs on random frames so the first client request doesn't pay for lazy initialisation."""
        width, height = self.mask_size(*self.size) if self._dda else self.size
        for _ in range(runs):
            self.predict(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _class_ids(argmax: np.ndarray) -> np.ndarray:
    """An argmax class map as uint8 class ids (masks and palettes have 256 entries)."""
    if argmax.size and int(argmax.max()) > 255:
        raise ValueError("more than 256 classes")
    return argmax.astype(np.uint8)


def _calibrate(score: float, package: ModelPackage) -> float:
    """DDA's SKLearnScoreCalibration (sklearn sigmoid calibration): 1 / (1 + exp(a*s + b))."""
    cal = package.calibration
    assert cal is not None
    s = score / cal.max_val_score if cal.max_val_score > 1 else score
    z = cal.scaling * s + cal.shift
    return 0.0 if z > 700 else 1.0 / (1.0 + math.exp(z))
