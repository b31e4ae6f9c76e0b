"""Masks and the verdict rule: pixel-identical to the resampler they follow, sized to what clients receive."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image
from textures import textures

from agent.core import masks
from agent.core.masks import MaskPolicy
from agent.core.pipeline import decide, override

RGB = masks.palette_rgb(masks.palette([]))


@pytest.mark.parametrize("src,dst", [((7, 5), (640, 480)), ((64, 48), (1920, 1080)), ((48, 64), (33, 17)),
                                     ((3, 3), (3, 3))])
def test_rendered_masks_equal_the_libraries_nearest_resize(src, dst):
    rng = np.random.default_rng(0)
    class_mask = rng.integers(0, 5, size=(src[1], src[0]), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(class_mask).resize(dst, Image.Resampling.NEAREST))
    np.testing.assert_array_equal(masks.render(class_mask, *dst, RGB, "pillow"), RGB[pil])
    ocv = cv2.resize(class_mask, dst, interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(masks.render(class_mask, *dst, RGB, "cv2"), RGB[ocv])
    counts = masks.class_counts(class_mask, *dst, "cv2")
    np.testing.assert_array_equal(counts[:5], np.bincount(ocv.ravel(), minlength=5))
    buffer = bytearray(dst[0] * dst[1] * 3)
    assert masks.render(class_mask, *dst, RGB, "cv2", memoryview(buffer)) is None
    np.testing.assert_array_equal(np.frombuffer(buffer, np.uint8).reshape(dst[1], dst[0], 3), RGB[ocv])


def test_fit_policy_sizes():
    policy = MaskPolicy()
    names = ["background", "anomaly"]
    assert policy.inline_size(640, 480, True, names) == (640, 480)
    w, h = policy.inline_size(1920, 1080, True, names)
    assert w * h * 3 + masks.response_overhead(names) <= policy.max_response_bytes
    assert w / h == pytest.approx(1920 / 1080, rel=0.01) and w > 1500
    w, h = policy.inline_size(4096, 4096, True, names)
    assert w == h and w * h * 3 <= policy.max_response_bytes
    assert policy.inline_size(64, 4096, True, names) == (64, 4096)  # 0.8 MB: fits
    assert policy.inline_size(4096, 1000, True, names)[0] < 4096
    assert MaskPolicy(inline="full").inline_size(4096, 4096, True, names) == (4096, 4096)
    assert MaskPolicy(inline="none").inline_size(64, 64, True, names) is None
    assert MaskPolicy(normal=False).inline_size(64, 64, False, names) is None
    assert MaskPolicy(normal=False).inline_size(64, 64, True, names) == (64, 64)
    with pytest.raises(ValueError, match="inline mask mode"):
        MaskPolicy(inline="half")


def test_verdict_rule_and_classification_logic():
    assert decide(0.49996, 0.5)[0] and not decide(0.49994, 0.5)[0]  # 4-digit rounding, equality = anomaly
    assert decide(1.3, 0.5) == (True, 1.0) and decide(-0.2, 0.5) == (False, 1.0)
    normal_mask, defect_mask = {0}, {0, 2}
    assert override(True, normal_mask, "cls_head", (0,)) is True
    assert override(True, normal_mask, "seg_head", (0,)) is False
    assert override(False, defect_mask, "seg_head", (0,)) is True
    assert override(True, normal_mask, "cls_and_seg", (0,)) is False
    assert override(True, defect_mask, "cls_and_seg", (0,)) is True
    assert override(False, defect_mask, "cls_or_seg", (0,)) is True
    assert override(False, normal_mask, "cls_or_seg", (0,)) is False
    assert override(False, {0, 2}, "seg_head", (0, 2)) is False  # normal pixel classes


class _Rows:
    """A MaskRows that keeps what it was given."""

    def write_rows(self, rows: np.ndarray, runs) -> None:
        self.full = np.repeat(rows, runs, axis=0)


@pytest.mark.parametrize("kind,size", [("anomalib", (1920, 1080)), ("segmentation", (301, 97)),
                                       ("segmentation", (64, 64))])
def test_mask_rows_repeat_to_the_rendered_mask(model_files, make_package, kind, size):
    from agent.core.pipeline import Predictor
    from agent.runtime.onnx import OnnxRuntime, OnnxRuntimeOptions

    package = make_package(kind)
    predictor = Predictor(package, OnnxRuntime(OnnxRuntimeOptions()).load(package))
    frame = np.random.default_rng(3).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    frame[size[1] // 4:size[1] // 2, size[0] // 3:size[0] // 2] = 255  # an anomaly for the tiny models
    inline = predictor.predict(frame, policy=MaskPolicy(inline="full"))
    sink = _Rows()
    rows = predictor.predict(frame, mask_out=sink)
    assert rows.mask is None and rows.mask_in_buffer and inline.mask is not None
    np.testing.assert_array_equal(sink.full.reshape(size[1], size[0], 3), inline.mask)
    assert rows.anomalies == inline.anomalies


@pytest.mark.parametrize("src,dst", [((224, 224), (1920, 1080)), ((224, 224), (1564, 879)), ((256, 256), (4096, 4096)),
                                     ((7, 5), (641, 479)), ((48, 64), (33, 17)), ((224, 224), (224, 1080))])
@pytest.mark.parametrize("resampler", ["pillow", "cv2"])
def test_widened_rows_and_full_masks_follow_the_resampler(src, dst, resampler):
    """masks.widen (the shared-memory rows) and masks.render take OpenCV's SIMD path where its nearest
    index map was checked equal to the resampler's; either way the pixels are the library's own resize."""
    class_mask = np.random.default_rng(1).integers(0, 7, size=(src[1], src[0]), dtype=np.uint8)
    if resampler == "pillow":
        full = np.asarray(Image.fromarray(class_mask).resize(dst, Image.Resampling.NEAREST))
        rows = np.asarray(Image.fromarray(class_mask).resize((dst[0], src[1]), Image.Resampling.NEAREST))
    else:
        full = cv2.resize(class_mask, dst, interpolation=cv2.INTER_NEAREST)
        rows = cv2.resize(class_mask, (dst[0], src[1]), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(masks.widen(class_mask, dst[0], RGB, resampler), RGB[rows])
    np.testing.assert_array_equal(masks.render(class_mask, *dst, RGB, resampler), RGB[full])
    buffer = bytearray(dst[0] * dst[1] * 3 + 5)  # larger than the mask: only the first bytes are written
    assert masks.render(class_mask, *dst, RGB, resampler, memoryview(buffer)) is None
    np.testing.assert_array_equal(np.frombuffer(buffer, np.uint8, count=full.size * 3).reshape(*full.shape, 3),
                                  RGB[full])
    assert bytes(buffer[-5:]) == bytes(5)
    # With the OpenCV the main suite and the newest passes install, the fast path is the one taken. OpenCV 4.5.1
    # (the py3.8 floor) maps some sizes differently from Pillow's NEAREST (224 -> 1080, 224 -> 1564, 48 -> 33):
    # there the check sends them down the index-map path, and the pixels asserted above are the same.
    if tuple(int(v) for v in cv2.__version__.split(".")[:2]) >= (5, 0) or resampler == "cv2":
        assert masks.opencv_matches(src[0], dst[0], resampler) and masks.opencv_matches(src[1], dst[1], resampler)


def test_predictor_reference_and_fast_reduce_tensors(model_files, make_package):
    """fast_reduce=False is the reference pipeline (Pillow alone); the default stays within 1/255."""
    from agent.core.pipeline import Predictor
    from agent.core.resize import ResizeWorkers
    from agent.runtime.onnx import OnnxRuntime, OnnxRuntimeOptions

    package = make_package("anomalib")
    session = OnnxRuntime(OnnxRuntimeOptions()).load(package)
    fast, reference = Predictor(package, session), Predictor(package, session, fast_reduce=False)
    image = textures(2100, 2100)["shapes"]  # a 3x3 reduction to 224x224
    resized = np.asarray(Image.fromarray(image).resize(reference.size, Image.Resampling.BILINEAR, reducing_gap=3.0))
    expected = (resized.transpose(2, 0, 1)[None].astype(np.float32) * reference._scale + reference._bias)
    np.testing.assert_allclose(reference.preprocess(image), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(fast.preprocess(image), expected, rtol=0, atol=float(reference._scale.max()) + 1e-6)
    # Row bands on extra threads (resize.ResizeWorkers) change nothing: the same tensor, bit for bit.
    workers = ResizeWorkers(2)
    try:
        banded = Predictor(package, session, resize_workers=workers)
        np.testing.assert_array_equal(banded.preprocess(image), fast.preprocess(image))
        frame = textures(1920, 1080)["noise"]
        np.testing.assert_array_equal(Predictor(package, session, fast_reduce=False, resize_workers=workers)
                                      .preprocess(frame), reference.preprocess(frame))
    finally:
        workers.close()
