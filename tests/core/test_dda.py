"""DDA / Lookout for Vision packages: read as DDA reads them, answered as DDA answers.

Each test builds a DDA-layout package (manifest.json + mochi/model.onnx, agent.tools.modelgen.dda) and
compares the agent's Predictor (real ONNX Runtime) with tests/dda_oracle.py, a line-by-line
re-implementation of DDA's pre- and post-processing (Apache-2.0, attributed there).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dda_oracle import DEFAULT_ANOMALY_MASK_PALETTE, dda_preprocess, get_stage, run_dda

from agent.core import masks
from agent.core.masks import MaskPolicy
from agent.core.package import load_package
from agent.core.pipeline import Predictor
from agent.errors import PackageError
from agent.runtime.onnx import OnnxRuntime, OnnxRuntimeOptions
from agent.tools.modelgen.dda import (
    build_dda_classifier,
    build_dda_segmenter,
    dda_manifest,
    write_dda_package,
    write_neo_package,
)

RUNTIME = OnnxRuntime(OnnxRuntimeOptions(providers=("cpu",)))
FULL = MaskPolicy(inline="full")


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dda-onnx")
    return {
        "cls": build_dda_classifier(root / "cls.onnx", normal_index=1),
        "seg_cls": build_dda_segmenter(root / "seg_cls.onnx", n_classes=3, cls_head=True),
        "seg": build_dda_segmenter(root / "seg.onnx", n_classes=3, cls_head=False),
    }


def package(tmp_path: Path, model: Path, manifest: dict, name: str = "dda") -> Path:
    return write_dda_package(tmp_path / name, model, manifest)


def predictor(root: Path) -> Predictor:
    pkg = load_package(root)
    return Predictor(pkg, RUNTIME.load(pkg))


def grey(w: int, h: int) -> np.ndarray:
    return np.full((h, w, 3), 128, np.uint8)


def with_box(image: np.ndarray, color: tuple[int, int, int], x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    image = image.copy()
    image[y0:y1, x0:x1] = color
    return image


def stripes(w: int, h: int, period: int = 3) -> np.ndarray:
    """Vertical stripes: resampling them with INTER_AREA and INTER_LINEAR gives clearly different tensors."""
    image = grey(w, h)
    image[:, (np.arange(w) % period) == 0] = (250, 20, 30)
    return image


def same_verdict(detection, oracle) -> None:
    assert detection.score == pytest.approx(min(max(oracle["score"], 0.0), 1.0), abs=1e-7)
    assert detection.is_anomalous == oracle["is_anomalous"]
    assert detection.confidence == pytest.approx(oracle["confidence"], abs=1e-7)


def test_palette_is_ddas_verbatim():
    assert [tuple(c) for c in DEFAULT_ANOMALY_MASK_PALETTE.tolist()] == list(masks.DDA_PALETTE_RGB)
    assert masks.DEFAULT_PALETTE[12] == "#007AFF"  # where the old 20-colour palette differed
    assert len(masks.palette([])) == 256 and masks.palette([])[104] == masks.DEFAULT_PALETTE[1]


def test_classification_package_is_read_as_dda_reads_it(onnx_models, tmp_path):
    root = package(tmp_path, onnx_models["cls"], dda_manifest(kind="classification", normal_index=1))
    pkg = load_package(root)
    assert (pkg.format, pkg.semantics, pkg.kind) == ("dda", "dda", "classification")
    assert pkg.model_file == root / "mochi" / "model.onnx"
    assert pkg.name == "dda" and pkg.class_normal_ids == (1,) and pkg.image_class_names == ("anomaly", "normal")
    assert pkg.interpolation == 3 and pkg.resampler == "cv2"  # DDA's default INTER_AREA
    assert pkg.execution.providers == ("cuda", "cpu")  # no device: CUDA if available, then CPU


@pytest.mark.parametrize("device,providers", [("cpu", ("cpu",)), ("GPU", ("cuda", "cpu")),
                                              ("tensorrt", ("tensorrt", "cuda", "cpu")), ("trt", ("tensorrt",
                                                                                                  "cuda", "cpu"))])
def test_device_maps_to_execution_providers(onnx_models, tmp_path, device, providers):
    manifest = dda_manifest(kind="classification")
    manifest["device"] = device
    assert load_package(package(tmp_path, onnx_models["cls"], manifest)).execution.providers == providers


def test_classification_scores_verdicts_match_dda(onnx_models, tmp_path):
    """Normal class at index 1 (as in real LFV packages): a red defect is anomalous, grey is normal."""
    root = package(tmp_path, onnx_models["cls"], dda_manifest(kind="classification", normal_index=1))
    model = predictor(root)
    images = [grey(640, 480), with_box(grey(640, 480), (255, 0, 0), 100, 100, 200, 180), stripes(640, 480),
              stripes(100, 75, 2), np.random.default_rng(1).integers(0, 256, (97, 131, 3), dtype=np.uint8),
              grey(64, 48)]
    verdicts = []
    for image in images:
        detection = model.predict(image, policy=FULL)
        same_verdict(detection, run_dda(root, image))
        assert detection.anomalies == [] and detection.mask is None
        verdicts.append(detection.is_anomalous)
    assert verdicts[0] is False and verdicts[1] is True


@pytest.mark.parametrize("interpolation", [None, 0, 1, 2, 3, 4])
def test_preprocessing_is_opencvs_resize_bit_for_bit(onnx_models, tmp_path, interpolation):
    extra = {} if interpolation is None else {"interpolation": interpolation}
    manifest = dda_manifest(kind="classification", **extra)
    root = package(tmp_path, onnx_models["cls"], manifest)
    model = predictor(root)
    for image in (stripes(640, 480), stripes(1920, 1080, 5), stripes(50, 40)):
        np.testing.assert_array_equal(model.preprocess(image), dda_preprocess(image, get_stage(manifest)))


def test_interpolation_changes_scores_as_in_dda(onnx_models, tmp_path):
    """Why OpenCV itself: on a striped texture INTER_AREA and INTER_LINEAR give different scores."""
    image = stripes(640, 480)
    scores = {}
    for code in (1, 3):
        root = package(tmp_path, onnx_models["cls"], dda_manifest(kind="classification", interpolation=code),
                       name=f"i{code}")
        scores[code] = predictor(root).predict(image).score
        assert scores[code] == pytest.approx(run_dda(root, image)["score"], abs=1e-7)
    assert abs(scores[1] - scores[3]) > 1e-3


@pytest.mark.parametrize("logic", [None, "cls_head", "seg_head", "cls_and_seg", "cls_or_seg"])
def test_segmentation_with_classification_head_matches_dda(onnx_models, tmp_path, logic):
    extra = {} if logic is None else {"classification_logic": logic}
    manifest = dda_manifest(kind="segmentation", raw_image_shape=(96, 128), normal_index=0, **extra)
    root = package(tmp_path, onnx_models["seg_cls"], manifest)
    model = predictor(root)
    base = grey(128, 96)
    images = [base, with_box(base, (255, 0, 0), 10, 10, 40, 30), with_box(with_box(base, (255, 0, 0), 10, 10, 40, 30),
                                                                           (0, 255, 0), 70, 50, 120, 90),
              with_box(base, (200, 60, 60), 60, 40, 61, 41)]  # one pixel: lost by the model's 2x downscale
    for image in images:
        detection = model.predict(image, policy=FULL)
        oracle = run_dda(root, image)
        same_verdict(detection, oracle)
        assert [a.name for a in detection.anomalies] == [n for n, _, _ in oracle["anomalies"]]
        assert [a.color for a in detection.anomalies] == [c for _, _, c in oracle["anomalies"]]
        assert [a.area for a in detection.anomalies] == pytest.approx([a for _, a, _ in oracle["anomalies"]])
        assert (detection.mask_width, detection.mask_height) == (128, 96)
        np.testing.assert_array_equal(detection.mask, oracle["color_mask"])
    names = [a.name for a in model.predict(images[2]).anomalies]
    assert names == ["background", "scratch", "dent"]  # model_graph.pixel_level_classes, not class_N


def test_segmentation_only_score_is_ddas_mean_and_logic_decides(onnx_models, tmp_path):
    """DDA's quirk: without a classification head the score is the mean of the probability tensor (1/C for
    softmax outputs), so the verdict comes from classification_logic: seg_head."""
    for logic in (None, "seg_head"):
        extra = {} if logic is None else {"classification_logic": logic}
        manifest = dda_manifest(kind="segmentation", cls_head=False, raw_image_shape=(48, 64), **extra)
        root = package(tmp_path, onnx_models["seg"], manifest, name=f"seg-{logic}")
        model = predictor(root)
        for image in (grey(64, 48), with_box(grey(64, 48), (255, 0, 0), 5, 5, 20, 20)):
            detection = model.predict(image, policy=FULL)
            oracle = run_dda(root, image)
            same_verdict(detection, oracle)
            assert detection.score == pytest.approx(1 / 3, abs=1e-6)
        if logic == "seg_head":
            assert model.predict(with_box(grey(64, 48), (255, 0, 0), 5, 5, 20, 20)).is_anomalous
            assert not model.predict(grey(64, 48)).is_anomalous


def test_calibration_and_recall_bias_match_dda(onnx_models, tmp_path):
    manifest = dda_manifest(kind="segmentation", raw_image_shape=(48, 64), normal_index=0, calibrated=True,
                            max_val_score=1.0, calibrator_scaling=-8.0, calibrator_shift=4.0, seg_recall_bias=0.3,
                            classification_logic="cls_or_seg")
    root = package(tmp_path, onnx_models["seg_cls"], manifest)
    model = predictor(root)
    for image in (grey(64, 48), with_box(grey(64, 48), (160, 110, 110), 5, 5, 30, 30),
                  with_box(grey(64, 48), (255, 0, 0), 5, 5, 20, 20)):
        detection = model.predict(image, policy=FULL)
        oracle = run_dda(root, image)
        same_verdict(detection, oracle)
        np.testing.assert_array_equal(detection.mask, oracle["color_mask"])


def test_mask_is_resized_to_raw_image_shape_like_dda(onnx_models, tmp_path):
    manifest = dda_manifest(kind="segmentation", raw_image_shape=(96, 128), normal_index=0)
    root = package(tmp_path, onnx_models["seg_cls"], manifest)
    detection = predictor(root).predict(with_box(grey(256, 192), (255, 0, 0), 20, 20, 80, 60), policy=FULL)
    assert (detection.mask_width, detection.mask_height) == (128, 96) == detection.mask_full_size
    assert sum(a.area for a in detection.anomalies) == pytest.approx(1.0)


def test_legacy_neo_package_is_recognised_not_skipped(tmp_path):
    pkg = load_package(write_neo_package(tmp_path / "legacy"))
    assert pkg.unservable.startswith("a SageMaker Neo / DLR-compiled Lookout for Vision model (mochi/compiled.so")
    assert "ONNX" in pkg.unservable and "docs/model-package.md" in pkg.unservable
    with pytest.raises(PackageError, match="Neo"):
        pkg.verify_files()  # what a StartModel would hit


def test_other_unservable_dda_packages_say_why(onnx_models, tmp_path):
    manifest = dda_manifest(kind="classification", runtime="pytorch")
    assert "runtime 'pytorch' is not supported" in load_package(package(tmp_path, onnx_models["cls"], manifest,
                                                                         "pt")).unservable
    manifest = dda_manifest(kind="classification")
    manifest["model_graph"]["stages"][0]["type"] = "dango"
    assert "not served" in load_package(write_dda_package(tmp_path / "bbox", onnx_models["cls"], manifest)).unservable


def test_dda_manifest_errors_name_the_key(onnx_models, tmp_path):
    manifest = dda_manifest(kind="classification")
    del manifest["model_graph"]["stages"][0]["class_normal_ids"]
    with pytest.raises(PackageError, match="class_normal_ids is required"):
        load_package(package(tmp_path, onnx_models["cls"], manifest, "a"))
    manifest = dda_manifest(kind="classification")
    root = package(tmp_path, onnx_models["cls"], manifest, "b")
    (root / "mochi" / "model.onnx").rename(root / "model.onnx")  # the old agent's expectation
    with pytest.raises(PackageError, match="mochi/model.onnx is missing"):
        load_package(root)
    manifest = dda_manifest(kind="classification", classification_logic="majority")
    with pytest.raises(PackageError, match="classification_logic"):
        load_package(package(tmp_path, onnx_models["cls"], manifest, "c"))
    manifest = dda_manifest(kind="classification")
    manifest["kind"] = "anomalib"
    with pytest.raises(PackageError, match="contradicts"):
        load_package(package(tmp_path, onnx_models["cls"], manifest, "d"))


def test_missing_runtime_with_only_an_onnx_file_is_served(onnx_models, tmp_path):
    root = package(tmp_path, onnx_models["cls"], dda_manifest(kind="classification", runtime=None))
    pkg = load_package(root)
    assert not pkg.unservable and pkg.model_file.name == "model.onnx"
    assert json.loads((root / "manifest.json").read_text()).get("runtime") is None
