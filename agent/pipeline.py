"""The inference pipeline of one loaded model: pre-process → runtime → post-process → result.

Everything that can be decided once (input name, target size, per-channel scale/bias lookup
tables, output names, palette) is prepared when the model starts, not per request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .errors import InferenceFailed, ModelLoadError
from .model_package import DEFAULT_PALETTE, ModelPackage
from .runtime.base import RuntimeSession

Clock = Callable[[], float]


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
    #: RGB888 mask bytes of the input's size, or None for models without a mask.
    mask: bytes | None = None
    mask_width: int = 0
    mask_height: int = 0
    #: Seconds per stage: preprocess, inference, postprocess.
    timings: dict[str, float] = field(default_factory=dict)


def decide(score: float, threshold: float) -> tuple[bool, float]:
    """LFV's rule: anomalous when round(score, 4) >= round(threshold, 4); confidence is the chosen side's."""
    score = min(max(score, 0.0), 1.0)
    anomalous = round(score, 4) >= round(threshold, 4)
    return anomalous, score if anomalous else 1.0 - score


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


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
        self._luts = self._lookup_tables(package)
        self._outputs = self._output_names(package, [o.name for o in session.outputs])
        self._names = list(self._outputs.values())
        colors = list(package.colors) or list(DEFAULT_PALETTE)
        n = max(len(package.class_names), 2)
        colors += [DEFAULT_PALETTE[(i % (len(DEFAULT_PALETTE) - 1)) + 1] for i in range(len(colors), 256)]
        self._colors = [c.upper() for c in colors[:256]]
        self._palette = [int(c[i:i + 2], 16) for c in self._colors for i in (1, 3, 5)]
        self._class_names = list(package.class_names) + [f"class_{i}" for i in range(len(package.class_names), n)]
        self._normal = np.array(sorted(set(package.normal_ids)), dtype=np.int64)

    # -- set-up ------------------------------------------------------------------------------
    @staticmethod
    def _lookup_tables(package: ModelPackage) -> np.ndarray:
        """uint8 → float lookup per channel, fusing /255 and mean/std into one gather."""
        values = np.arange(256, dtype=np.float64)
        if package.range_scale:
            values = values / 255.0
        mean = package.mean or (0.0, 0.0, 0.0)
        std = package.std or (1.0, 1.0, 1.0)
        return np.stack([(values - mean[c]) / std[c] for c in range(3)]).astype(np.float32)

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
        for c in range(3):
            np.take(self._luts[c], image[:, :, c], out=tensor[0, c])
        return tensor if self.input_dtype == np.float32 else tensor.astype(self.input_dtype)

    def predict(self, image: np.ndarray) -> Detection:
        """image: HxWx3 uint8 RGB (any strides). Raises InferenceFailed when the runtime fails."""
        t0 = self.clock()
        tensor = self.preprocess(image)
        t1 = self.clock()
        try:
            values = self.session.predict({self.input_name: tensor}, self._names)
        except Exception as exc:
            raise InferenceFailed(f"inference failed: {str(exc).strip().splitlines()[0] if str(exc) else exc!r}") \
                from exc
        t2 = self.clock()
        outputs = dict(zip(self._outputs.keys(), values, strict=True))
        try:
            detection = self.postprocess(outputs, image.shape[1], image.shape[0])
        except (ValueError, IndexError) as exc:
            raise InferenceFailed(f"model output does not fit a {self.package.kind} model: {exc}") from exc
        t3 = self.clock()
        detection.timings = {"preprocess": t1 - t0, "inference": t2 - t1, "postprocess": t3 - t2}
        return detection

    def postprocess(self, out: Mapping[str, np.ndarray], width: int, height: int) -> Detection:
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
            self._render_mask(detection, class_mask, width, height)
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

    def _render_mask(self, detection: Detection, class_mask: np.ndarray, width: int, height: int) -> None:
        small = Image.fromarray(np.ascontiguousarray(class_mask), "L")
        full = small if small.size == (width, height) else small.resize((width, height), Image.Resampling.NEAREST)
        counts = full.histogram()  # 256 bins, counted in C
        total = float(width * height)
        detection.anomalies = [
            Anomaly(self._class_names[i] if i < len(self._class_names) else f"class_{i}", counts[i] / total,
                    self._colors[i])
            for i in range(256) if i == 0 or counts[i]
        ]
        full.putpalette(self._palette)
        detection.mask = full.convert("RGB").tobytes()
        detection.mask_width, detection.mask_height = width, height

    def warmup(self, runs: int, rng: np.random.Generator) -> None:
        """A few runs on random frames so the first client request doesn't pay for lazy initialisation."""
        width, height = self.size
        for _ in range(runs):
            self.predict(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
