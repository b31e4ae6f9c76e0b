"""The inference pipeline of one loaded model: pre-process → runtime → post-process → result.

Everything that can be decided once (input name, target size, per-channel scale/bias lookup
tables, output names, palette) is prepared when the model starts, not per request.
"""

from __future__ import annotations

import functools
import math
import time
import typing  # runtime-evaluated aliases below: collections.abc generics need Python >= 3.9
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from agent.core.package import DEFAULT_PALETTE, ModelPackage
from agent.errors import InferenceFailed, ModelLoadError
from agent.runtime.base import RuntimeSession

Clock = typing.Callable[[], float]


@dataclass(frozen=True)
class Anomaly:
    name: str
    area: float  # fraction 0..1 of the image
    color: str  # "#RRGGBB"


@dataclass
class Detection:
    is_anomalous: bool
    confidence: float
    score: float
    threshold: float
    anomalies: list[Anomaly] = field(default_factory=list)
    #: RGB888 mask of the input's size (height x width x 3 uint8, C-contiguous), or None for models
    #: without a mask (and when it was rendered into the caller's buffer: see mask_in_buffer).
    mask: np.ndarray | None = None
    mask_width: int = 0
    mask_height: int = 0
    #: Seconds per stage: preprocess, inference, postprocess.
    timings: dict[str, float] = field(default_factory=dict)
    #: True when the mask (mask_width x mask_height RGB888) was written into Predictor.predict's mask_out.
    mask_in_buffer: bool = False

    @property
    def has_mask(self) -> bool:
        return self.mask is not None or self.mask_in_buffer


def decide(score: float, threshold: float) -> tuple[bool, float]:
    """LFV's rule: anomalous when round(score, 4) >= round(threshold, 4); confidence is the chosen side's."""
    score = min(max(score, 0.0), 1.0)
    anomalous = round(score, 4) >= round(threshold, 4)
    return anomalous, score if anomalous else 1.0 - score


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@functools.lru_cache(maxsize=64)
def _nearest_runs(src: int, dst: int) -> tuple[int, ...]:
    """How many of `dst` target pixels each of `src` source pixels becomes under PIL's NEAREST resize
    (taken from PIL itself, so masks stay pixel-identical to Image.resize(..., NEAREST))."""
    ramp = Image.fromarray(np.arange(src, dtype=np.int32).reshape(1, src), "I")
    index = np.asarray(ramp.resize((dst, 1), Image.Resampling.NEAREST)).reshape(-1)
    runs = np.bincount(index, minlength=src)
    if np.any(np.diff(index) < 0):
        raise AssertionError("nearest-neighbour index map is not monotonic")
    return tuple(int(r) for r in runs)


@functools.lru_cache(maxsize=64)
def _nearest_index(src: int, dst: int) -> np.ndarray:
    """The source index of each target pixel under PIL's NEAREST resize."""
    index = np.repeat(np.arange(src, dtype=np.intp), _nearest_runs(src, dst))
    index.setflags(write=False)
    return index


class Predictor:
    """Runs one package's model on HxWx3 uint8 RGB images. Thread-safe (no per-call state)."""

    def __init__(self, package: ModelPackage, session: RuntimeSession, clock: Clock = time.perf_counter) -> None:
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
        # /255 and mean/std fused into one multiply-add per channel in float32 over the whole CHW
        # tensor (a per-channel lookup-table gather with np.take measured 2-3x slower).
        self._scale, self._bias = self._affine(package)
        self._outputs = self._output_names(package, [o.name for o in session.outputs])
        self._names = list(self._outputs.values())
        colors = list(package.colors) or list(DEFAULT_PALETTE)
        n = max(len(package.class_names), 2)
        colors += [DEFAULT_PALETTE[(i % (len(DEFAULT_PALETTE) - 1)) + 1] for i in range(len(colors), 256)]
        self._colors = [c.upper() for c in colors[:256]]
        self._palette_rgb = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in self._colors],
                                     dtype=np.uint8)
        self._class_names = list(package.class_names) + [f"class_{i}" for i in range(len(package.class_names), n)]
        self._normal = np.array(sorted(set(package.normal_ids)), dtype=np.int64)

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

    # -- per request ---------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> np.ndarray:
        width, height = self.size
        if image.shape[1] != width or image.shape[0] != height:
            pil = Image.fromarray(image if image.flags.c_contiguous else np.ascontiguousarray(image), "RGB")
            # reducing_gap: integer-factor box reduction first, so large frames resize fast.
            image = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0))
        tensor = np.empty((1, 3, height, width), dtype=np.float32)
        chw = tensor[0]
        np.copyto(chw, image.transpose(2, 0, 1), casting="unsafe")  # uint8 HWC -> float32 CHW, one pass
        chw *= self._scale
        chw += self._bias
        return tensor if self.input_dtype == np.float32 else tensor.astype(self.input_dtype)

    def predict(self, image: np.ndarray, mask_out: memoryview | None = None) -> Detection:
        """image: HxWx3 uint8 RGB (any strides). Raises InferenceFailed when the runtime fails.

        mask_out: a writable buffer of at least H*W*3 bytes (e.g. the client's shared-memory mask
        segment): the mask is rendered straight into it instead of a new array (`Detection.mask` stays
        None, `mask_in_buffer` is True)."""
        t0 = self.clock()
        tensor = self.preprocess(image)
        t1 = self.clock()
        try:
            values = self.session.predict({self.input_name: tensor}, self._names)
        except Exception as exc:
            raise InferenceFailed(f"inference failed: {str(exc).strip().splitlines()[0] if str(exc) else exc!r}") \
                from exc
        t2 = self.clock()
        outputs = dict(zip(self._outputs.keys(), values))
        try:
            detection = self.postprocess(outputs, image.shape[1], image.shape[0], mask_out)
        except (ValueError, IndexError) as exc:
            raise InferenceFailed(f"model output does not fit a {self.package.kind} model: {exc}") from exc
        t3 = self.clock()
        detection.timings = {"preprocess": t1 - t0, "inference": t2 - t1, "postprocess": t3 - t2}
        return detection

    def postprocess(self, out: Mapping[str, np.ndarray], width: int, height: int,
                    mask_out: memoryview | None = None) -> Detection:
        kind = self.package.kind
        threshold = self.package.threshold
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
            class_mask = logits.argmax(axis=0).astype(np.uint8)
            probs = _softmax(logits, axis=0)
            score = float((1.0 - probs[self._normal].sum(axis=0)).max())
        else:
            score = self._class_score(np.asarray(out["score"], dtype=np.float32).reshape(-1))
        if not math.isfinite(score):
            raise ValueError(f"score is {score}")
        anomalous, confidence = decide(score, threshold)
        detection = Detection(anomalous, confidence, min(max(score, 0.0), 1.0), threshold)
        if class_mask is not None:
            self._render_mask(detection, class_mask, width, height, mask_out)
        return detection

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
        return float(1.0 - probs[self._normal[self._normal < probs.size]].sum())

    def _render_mask(self, detection: Detection, class_mask: np.ndarray, width: int, height: int,
                     mask_out: memoryview | None = None) -> None:
        """Nearest-neighbour upscale of the class mask to the input size, as palette RGB888.

        Nearest upscaling maps each source row (column) to a run of consecutive target rows (columns).
        So: colour the small mask, widen it column run by column run (h x W), then fill each run of
        target rows with one broadcast copy of its source row. Areas come from the small mask weighted
        by run lengths (exact). This is ~10-50x cheaper than resizing a full-size PIL image, converting
        P -> RGB (4 bytes a pixel) and serialising it, and writes the frame-size mask exactly once.
        """
        h, w = class_mask.shape
        row_runs = _nearest_runs(h, height)
        col_runs = _nearest_runs(w, width)
        counts = np.bincount(class_mask.reshape(-1), weights=np.outer(row_runs, col_runs).reshape(-1),
                             minlength=256)
        total = float(width * height)
        detection.anomalies = [
            Anomaly(self._class_names[i] if i < len(self._class_names) else f"class_{i}", float(counts[i]) / total,
                    self._colors[i])
            for i in range(256) if i == 0 or counts[i]
        ]
        if width != w:  # widen the 1-byte class ids first, then colour: h x width x 3
            class_mask = np.take(class_mask, _nearest_index(w, width), axis=1)
        wide = np.take(self._palette_rgb, class_mask, axis=0)
        nbytes = width * height * 3
        if mask_out is not None:
            full = np.frombuffer(mask_out, dtype=np.uint8, count=nbytes).reshape(height, width, 3)
        else:
            full = np.empty((height, width, 3), dtype=np.uint8)
        if height == h:
            full[:] = wide
        else:
            start = 0
            for r, run in enumerate(row_runs):
                if run:
                    full[start:start + run] = wide[r]
                    start += run
        if mask_out is not None:
            del full  # release the caller's buffer
            detection.mask_in_buffer = True
        else:
            detection.mask = full
        detection.mask_width, detection.mask_height = width, height

    def warmup(self, runs: int, rng: np.random.Generator) -> None:
        """A few runs on random frames so the first client request doesn't pay for lazy initialisation."""
        width, height = self.size
        for _ in range(runs):
            self.predict(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
