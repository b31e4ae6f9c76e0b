"""agent.tools.modelgen: every generated model honours its export contract and its documented semantics
when run in onnxruntime (CPU)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from agent.tools.modelgen import (
    PadimModel,
    build_anomalib_v1,
    build_anomalib_v2,
    build_classifier,
    build_patchcore_like,
    build_segmenter,
    build_tiny,
    defective_texture,
    normal_texture,
    reference_classifier_logit,
    reference_outputs,
    reference_segmenter_logits,
    train_padim,
)
from agent.tools.modelgen.anomalib import MetadataStyle
from agent.tools.modelgen.padim import resize_matrix

V2_NAMES = ["pred_score", "pred_label", "anomaly_map", "pred_mask"]
V2_TYPES = ["tensor(float)", "tensor(bool)", "tensor(float)", "tensor(bool)"]


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def to_input(*images: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 RGB images -> float32 [N,3,H,W] in 0..1."""
    return np.stack([im.astype(np.float32).transpose(2, 0, 1) / 255.0 for im in images])


def run(sess: ort.InferenceSession, *images: np.ndarray, name: str = "input") -> dict[str, np.ndarray]:
    outs = sess.run(None, {name: to_input(*images)})
    names = [o.name for o in sess.get_outputs()]
    assert len(names) == len(outs)
    return dict(zip(names, outs))


def grey(h: int = 64, w: int = 64) -> np.ndarray:
    return np.full((h, w, 3), 128, dtype=np.uint8)


def grey_with_square(
    h: int = 64, w: int = 64, *, y: int = 20, x: int = 30, size: int = 16, colour: tuple[int, int, int] = (255, 0, 0)
) -> tuple[np.ndarray, np.ndarray]:
    img = grey(h, w)
    img[y : y + size, x : x + size] = colour
    mask = np.zeros((h, w), dtype=bool)
    mask[y : y + size, x : x + size] = True
    return img, mask


def assert_v2_contract(sess: ort.InferenceSession, n: int | str, h: int, w: int) -> None:
    (inp,) = sess.get_inputs()
    assert inp.name == "input" and inp.type == "tensor(float)" and inp.shape == [n, 3, h, w]
    outs = sess.get_outputs()
    assert [o.name for o in outs] == V2_NAMES
    assert [o.type for o in outs] == V2_TYPES
    assert [o.shape for o in outs] == [[n], [n], [n, 1, h, w], [n, 1, h, w]]


def assert_ir_opset(path: Path) -> None:
    model = onnx.load(str(path), load_external_data=False)
    assert model.ir_version <= 10 and [(o.domain, o.version) for o in model.opset_import] == [("", 17)]


# ---------------------------------------------------------------------------------------------
# anomalib 2.x


def test_anomalib_v2_contract_external_data_and_semantics(tmp_path: Path) -> None:
    path = build_anomalib_v2(tmp_path / "model.onnx")
    assert path == tmp_path / "model.onnx"
    data = tmp_path / "model.onnx.data"
    assert data.is_file() and data.stat().st_size >= 2 * 3 * 64 * 64 * 4  # mean + inverse std
    assert path.stat().st_size < 8192  # the weights really live outside the graph file
    assert_ir_opset(path)
    sess = session(path)
    assert_v2_contract(sess, 1, 64, 64)

    out = run(sess, grey())
    assert out["pred_score"].dtype == np.float32 and out["pred_label"].dtype == np.bool_
    assert out["pred_score"][0] < 0.2 and not out["pred_label"][0] and not out["pred_mask"].any()

    img, square = grey_with_square()
    out = run(sess, img)
    assert out["pred_score"][0] > 0.8 and out["pred_label"][0]
    np.testing.assert_array_equal(out["pred_mask"][0, 0], square)
    ref = reference_outputs(img)
    np.testing.assert_allclose(out["anomaly_map"], ref["anomaly_map"], atol=1e-5)
    np.testing.assert_allclose(out["pred_score"], ref["pred_score"], atol=1e-5)


def test_anomalib_v2_dynamic_batch_inline(tmp_path: Path) -> None:
    path = build_anomalib_v2(tmp_path / "m.onnx", image_size=(48, 80), dynamic_batch=True, external_data=False)
    assert not (tmp_path / "m.onnx.data").exists()
    sess = session(path)
    assert_v2_contract(sess, "batch", 48, 80)
    rng = np.random.default_rng(0)
    images = [
        grey(48, 80),
        grey_with_square(48, 80, y=5, x=50, colour=(0, 255, 0))[0],
        rng.integers(0, 256, (48, 80, 3), dtype=np.uint8),
    ]
    out = run(sess, *images)
    assert out["pred_score"].shape == (3,) and out["pred_mask"].shape == (3, 1, 48, 80)
    for i, img in enumerate(images):
        ref = reference_outputs(img)
        np.testing.assert_allclose(out["anomaly_map"][i], ref["anomaly_map"][0], atol=1e-5)
        np.testing.assert_array_equal(out["pred_label"][i], ref["pred_label"][0])
    assert list(out["pred_label"][:2]) == [False, True]


def test_tiny_is_fast_and_has_the_v2_contract(tmp_path: Path) -> None:
    path = build_tiny(tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx.data").exists() and path.stat().st_size < 4096
    sess = session(path)
    assert_v2_contract(sess, 1, 224, 224)
    img, square = grey_with_square(224, 224, y=100, x=40)
    out = run(sess, img)
    assert out["pred_score"][0] > 0.8 and out["pred_label"][0]
    np.testing.assert_array_equal(out["pred_mask"][0, 0], square)
    assert run(sess, grey(224, 224))["pred_score"][0] < 0.2
    x = to_input(img)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        sess.run(None, {"input": x})
        times.append(time.perf_counter() - t0)
    assert np.median(times) < 0.010  # a few ms at most (typically ~0.3 ms)


def test_patchcore_like(tmp_path: Path) -> None:
    path = build_patchcore_like(tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx.data").stat().st_size > 4096 * 64 * 4  # the memory bank
    sess = session(path)
    assert_v2_contract(sess, 1, 256, 256)
    node_types = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    assert {"Conv", "MatMul", "ReduceMin", "Resize"} <= node_types

    assert run(sess, grey(256, 256))["pred_score"][0] < 0.2
    noisy = (128 + np.random.default_rng(1).integers(-6, 7, (256, 256, 3))).astype(np.uint8)
    assert run(sess, noisy)["pred_score"][0] < 0.5
    for colour in [(255, 0, 0), (0, 0, 255), (255, 255, 255)]:
        img, _ = grey_with_square(256, 256, y=100, x=60, colour=colour)
        out = run(sess, img)
        assert out["pred_score"][0] > 0.8 and out["pred_label"][0]
        assert out["pred_mask"][0, 0, 108, 68] and not out["pred_mask"][0, 0, 20, 200]
        assert not out["pred_mask"][0, 0, :80].any() and not out["pred_mask"][0, 0, :, 100:].any()
    x = to_input(grey(256, 256))
    sess.run(None, {"input": x})
    t0 = time.perf_counter()
    for _ in range(5):
        sess.run(None, {"input": x})
    assert (time.perf_counter() - t0) / 5 < 0.5  # ~25 ms on 2 cores; generous for slow CI


# ---------------------------------------------------------------------------------------------
# anomalib 1.x


def normalise(x: np.ndarray, threshold: float, lo: float, hi: float) -> np.ndarray:
    return np.clip((x - threshold) / (hi - lo) + 0.5, 0, 1)


def test_anomalib_v1_raw_map_and_metadata(tmp_path: Path) -> None:
    path = build_anomalib_v1(tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx.data").exists()
    sess = session(path)
    assert [(i.name, i.type, i.shape) for i in sess.get_inputs()] == [("input", "tensor(float)", [1, 3, 64, 64])]
    assert [(o.name, o.type, o.shape) for o in sess.get_outputs()] == [("output", "tensor(float)", [1, 1, 64, 64])]

    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["task"] == "segmentation"
    assert set(meta) == {"task", "image_threshold", "pixel_threshold", "pred_scores", "anomaly_maps"}
    assert set(meta["pred_scores"]) == set(meta["anomaly_maps"]) == {"min", "max"}

    img, square = grey_with_square()
    (raw,) = sess.run(None, {"input": to_input(img)})
    assert raw.max() > 30 and raw.min() < 1  # raw, un-normalised range
    amap = normalise(raw, meta["pixel_threshold"], meta["anomaly_maps"]["min"], meta["anomaly_maps"]["max"])
    score = normalise(raw.max(), meta["image_threshold"], meta["pred_scores"]["min"], meta["pred_scores"]["max"])
    assert score > 0.8
    np.testing.assert_array_equal(amap[0, 0] > 0.5, square)
    np.testing.assert_allclose(amap, reference_outputs(img)["anomaly_map"], atol=1e-5)
    (raw,) = sess.run(None, {"input": to_input(grey())})
    assert normalise(raw.max(), meta["image_threshold"], meta["pred_scores"]["min"], meta["pred_scores"]["max"]) < 0.2


@pytest.mark.parametrize(
    "style,keys",
    [
        ("dotted", {"pred_scores.min", "pred_scores.max", "anomaly_maps.min", "anomaly_maps.max"}),
        ("flat", {"min", "max"}),
    ],
)
def test_anomalib_v1_metadata_styles(tmp_path: Path, style: MetadataStyle, keys: set[str]) -> None:
    build_anomalib_v1(tmp_path / "model.onnx", metadata_style=style, external_data=True)
    assert (tmp_path / "model.onnx.data").is_file()
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert set(meta) == {"task", "image_threshold", "pixel_threshold"} | keys


# ---------------------------------------------------------------------------------------------
# classification / segmentation


def sigmoid(z: float) -> float:
    return float(1 / (1 + np.exp(-z)))


@pytest.mark.parametrize("score_rank,shape", [(1, [1]), (2, [1, 1])])
def test_classifier_probability(tmp_path: Path, score_rank: int, shape: list[int]) -> None:
    path = build_classifier(tmp_path / "model.onnx", input_name="images", score_rank=score_rank)
    sess = session(path)
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [("images", [1, 3, 64, 64])]
    assert [(o.name, o.type, o.shape) for o in sess.get_outputs()] == [("score", "tensor(float)", shape)]
    (p,) = sess.run(None, {"images": to_input(grey())})
    assert p.shape == tuple(shape) and p.item() < 0.01
    assert p.item() == pytest.approx(sigmoid(reference_classifier_logit(grey())), abs=1e-6)
    img, _ = grey_with_square()
    (p,) = sess.run(None, {"images": to_input(img)})
    assert p.item() > 0.99
    assert p.item() == pytest.approx(sigmoid(reference_classifier_logit(img)), abs=1e-6)


def test_classifier_logits(tmp_path: Path) -> None:
    sess = session(build_classifier(tmp_path / "model.onnx", output_name="logits", logits=True))
    assert [(o.name, o.shape) for o in sess.get_outputs()] == [("logits", [1, 2])]
    for img, anomalous in ((grey(), False), (grey_with_square()[0], True)):
        (logits,) = sess.run(None, {"input": to_input(img)})
        assert logits.shape == (1, 2) and int(logits.argmax()) == int(anomalous)
        prob = np.exp(logits) / np.exp(logits).sum()
        assert prob[0, 1] == pytest.approx(sigmoid(reference_classifier_logit(img)), abs=1e-5)


def test_segmenter_dominant_colours(tmp_path: Path) -> None:
    path = build_segmenter(tmp_path / "model.onnx", n_classes=3)
    sess = session(path)
    assert [(o.name, o.type, o.shape) for o in sess.get_outputs()] == [("logits", "tensor(float)", [1, 3, 64, 64])]
    img = grey()
    img[4:20, 4:20] = (255, 0, 0)  # 256 red pixels
    img[40:48, 30:38] = (0, 255, 0)  # 64 green pixels
    img[50:54, 50:54] = (0, 0, 255)  # blue: background with 3 classes
    img[0:2, 60:64] = (200, 40, 40)  # 8 more red-dominant pixels
    img[60:64, 0:4] = (150, 120, 120)  # reddish but not dominant by > 0.2: background
    (logits,) = sess.run(None, {"input": to_input(img)})
    np.testing.assert_allclose(logits, reference_segmenter_logits(img, 3), atol=1e-5)
    labels = logits[0].argmax(axis=0)
    assert np.bincount(labels.ravel(), minlength=3).tolist() == [64 * 64 - 264 - 64, 264, 64]
    assert (labels[4:20, 4:20] == 1).all() and (labels[40:48, 30:38] == 2).all()

    sess4 = session(build_segmenter(tmp_path / "four.onnx", n_classes=4))
    (logits4,) = sess4.run(None, {"input": to_input(img)})
    assert logits4.shape == (1, 4, 64, 64)
    assert np.bincount(logits4[0].argmax(axis=0).ravel(), minlength=4).tolist() == [
        64 * 64 - 264 - 64 - 16,
        264,
        64,
        16,
    ]


# ---------------------------------------------------------------------------------------------
# textures + PaDiM


def test_textures_are_deterministic_and_defects_are_local() -> None:
    for kind in ("textile", "wood", "metal"):
        a = normal_texture(np.random.default_rng(5), (96, 128), kind=kind)
        b = normal_texture(np.random.default_rng(5), (96, 128), kind=kind)
        assert a.shape == (96, 128, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
        assert a.std() > 5  # a texture, not a flat colour
        for defect in ("scratch", "blob"):
            img, mask = defective_texture(np.random.default_rng(5), (96, 128), kind=kind, defect=defect)
            assert mask.shape == (96, 128) and mask.dtype == np.bool_ and 20 < mask.sum() < 96 * 128 // 4
            changed = (img != a).any(axis=2)
            assert not (changed & ~mask).any()  # same base texture; only the defect differs
            assert changed[mask].mean() > 0.8
            assert not mask[:6].any() and not mask[:, :6].any() and not mask[-6:].any() and not mask[:, -6:].any()


@pytest.fixture(scope="module")
def padim(tmp_path_factory: pytest.TempPathFactory) -> tuple[PadimModel, float]:
    rng = np.random.default_rng(2024)
    train = [normal_texture(rng) for _ in range(20)]
    t0 = time.perf_counter()
    model = train_padim(train, image_size=(128, 128), rng=rng)
    return model, time.perf_counter() - t0


def test_resize_matrix_matches_onnxruntime() -> None:
    from onnx import TensorProto, helper

    node = helper.make_node(
        "Resize", ["x", "", "scales"], ["y"], mode="linear", coordinate_transformation_mode="half_pixel"
    )
    graph = helper.make_graph(
        [node],
        "r",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[onnx.numpy_helper.from_array(np.array([1, 1, 4, 4], np.float32), "scales")],
    )
    model = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(0).random((1, 1, 8, 5)).astype(np.float32)
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y[0, 0], resize_matrix(32, 8) @ x[0, 0] @ resize_matrix(20, 5).T, atol=1e-5)


def test_padim_separates_normal_from_defective(padim: tuple[PadimModel, float], tmp_path: Path) -> None:
    model, train_s = padim
    assert train_s < 30
    path = model.export_onnx(tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx.data").stat().st_size > model.inv_cov.size * 4
    assert_ir_opset(path)
    sess = session(path)
    assert_v2_contract(sess, 1, 128, 128)

    rng = np.random.default_rng(7)
    normals = [normal_texture(rng) for _ in range(10)]
    defects = [defective_texture(rng, defect=("scratch", "blob")[i % 2]) for i in range(10)]
    normal_scores: list[float] = []
    defect_scores: list[float] = []
    for img in normals + [d[0] for d in defects]:
        out = run(sess, img)
        ref = model.score_numpy(img)
        np.testing.assert_allclose(out["anomaly_map"], ref["anomaly_map"], atol=1e-3)
        np.testing.assert_allclose(out["pred_score"], ref["pred_score"], atol=1e-3)
        (normal_scores if len(normal_scores) < 10 else defect_scores).append(float(out["pred_score"][0]))
        assert out["pred_label"][0] == (out["pred_score"][0] > 0.5)
        np.testing.assert_array_equal(out["pred_mask"], out["anomaly_map"] > 0.5)
    print(f"\nPaDiM train {train_s:.2f}s; max normal {max(normal_scores):.3f}, min defective {min(defect_scores):.3f}")
    assert max(normal_scores) < 0.5 < min(defect_scores)
    assert min(defect_scores) - max(normal_scores) > 0.15

    # The map peaks on the defect (within the 4-px feature stride plus smoothing).
    for img, mask in defects:
        amap = run(sess, img)["anomaly_map"][0, 0]
        y, x = np.unravel_index(amap.argmax(), amap.shape)
        ys, xs = np.nonzero(mask)
        assert np.min(np.hypot(ys - y, xs - x)) <= 8


def test_padim_dynamic_batch_inline(padim: tuple[PadimModel, float], tmp_path: Path) -> None:
    model, _ = padim
    path = model.export_onnx(tmp_path / "m.onnx", external_data=False, dynamic_batch=True)
    assert not (tmp_path / "m.onnx.data").exists()
    sess = session(path)
    assert_v2_contract(sess, "batch", 128, 128)
    rng = np.random.default_rng(11)
    images = [normal_texture(rng), defective_texture(rng, defect="blob")[0], normal_texture(rng)]
    out = run(sess, *images)
    for i, img in enumerate(images):
        np.testing.assert_allclose(out["anomaly_map"][i], model.score_numpy(img)["anomaly_map"][0], atol=1e-3)
    assert out["pred_label"].tolist() == [False, True, False]
