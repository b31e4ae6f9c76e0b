"""Building and validating model packages."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest

from agent.core.package import build_package, load_package
from agent.core.pipeline import Predictor
from agent.errors import PackageError
from agent.runtime.onnx import OnnxProbe


def test_auto_detects_kinds_and_copies_external_data(model_files, short_tmp):
    expected = {"anomalib": "anomalib", "anomalib_v1": "anomalib_v1", "classification": "classification",
                "classification_logits": "classification", "segmentation": "segmentation"}
    for source, kind in expected.items():
        package = build_package(model_files[source], short_tmp / source, name=source.replace("_", "-"))
        assert package.kind == kind
        manifest = json.loads((package.root / "manifest.json").read_text())
        assert manifest["runtime"] == "onnx" and manifest["model_graph"]["stages"][0]["threshold"] == 0.5
        for rel in manifest["files"]:
            assert (package.root / rel).is_file()
    assert (short_tmp / "anomalib" / "model.onnx.data").is_file()
    assert load_package(short_tmp / "classification_logits").score_activation == "softmax"
    assert load_package(short_tmp / "classification").score_activation == "none"


def test_build_errors_leave_nothing_behind(model_files, short_tmp):
    not_onnx = short_tmp / "junk.onnx"
    not_onnx.write_bytes(b"\x00garbage")
    with pytest.raises(PackageError, match="not a readable ONNX model"):
        build_package(not_onnx, short_tmp / "out1", name="junk")
    assert not (short_tmp / "out1").exists()

    lonely = short_tmp / "lonely"
    lonely.mkdir()
    shutil.copy(model_files["anomalib"], lonely / "model.onnx")  # without its model.onnx.data
    with pytest.raises(PackageError, match="model.onnx.data"):
        build_package(lonely / "model.onnx", short_tmp / "out2", name="lonely")
    assert not (short_tmp / "out2").exists()

    with pytest.raises(PackageError, match="model name"):
        build_package(model_files["anomalib"], short_tmp / "out3", name="../evil")
    assert [p.name for p in short_tmp.iterdir() if p.name.startswith(".")] == []


def test_manifest_validation_messages(model_files, short_tmp):
    package = build_package(model_files["anomalib"], short_tmp / "pkg", name="pkg")
    manifest = json.loads((package.root / "manifest.json").read_text())

    def broken(**changes):
        doc = json.loads(json.dumps(manifest))
        for dotted, value in changes.items():
            node = doc
            *path, last = dotted.split(".")
            for part in path:
                node = node[int(part)] if part.isdigit() else node[part]
            node[last] = value
        (package.root / "manifest.json").write_text(json.dumps(doc))
        with pytest.raises(PackageError) as info:
            load_package(package.root)
        return info.value.message

    assert "relative path inside the package" in broken(runtime_artifact="../../etc/passwd")
    assert "relative path inside the package" in broken(runtime_artifact="/etc/passwd")
    assert "not supported" in broken(runtime="dlr")
    assert "kind" in broken(kind="detector")
    assert "threshold must be within 0..1" in broken(**{"model_graph.stages.0.threshold": 3})
    assert "#RRGGBB" in broken(**{"model_graph.pixel_level_classes.colors": ["red", "#00FF00"]})
    assert "newer than this agent reads" in broken(format_version=3)
    assert "format 'someone-else/package' is unknown" in broken(format="someone-else/package")
    assert "classification_logic" in broken(**{"model_graph.stages.0.classification_logic": "vote"})
    assert "interpolation" in broken(**{"model_graph.stages.0.interpolation": "bicubic-ish"})
    assert "execution providers" in broken(execution={"providers": ["gpu"]})
    assert "wrong type" in broken(**{"dataset.image_width": "wide", "model_graph.stages.0.image_width": None})
    (package.root / "manifest.json").write_text("{not json")
    with pytest.raises(PackageError, match="not valid JSON"):
        load_package(package.root)


def test_corrupt_file_is_caught_by_its_checksum(model_files, short_tmp):
    package = build_package(model_files["anomalib"], short_tmp / "pkg", name="pkg")
    package.verify_files()
    with (package.root / "model.onnx.data").open("r+b") as fh:
        fh.write(b"\xff\xff")
    with pytest.raises(PackageError, match="sha256"):
        package.verify_files()


def test_format_1_packages_still_read(model_files, short_tmp):
    """Packages built before format 2 kept pixel_level_classes at the top level."""
    package = build_package(model_files["segmentation"], short_tmp / "pkg", name="pkg", classes=["bg", "r", "g"])
    doc = json.loads((package.root / "manifest.json").read_text())
    doc["pixel_level_classes"] = doc["model_graph"].pop("pixel_level_classes")
    doc["format_version"] = 1
    (package.root / "manifest.json").write_text(json.dumps(doc))
    old = load_package(package.root)
    assert old.class_names == ("bg", "r", "g") and old.interpolation == "bilinear" and old.resampler == "pillow"


def test_build_honours_the_umask(model_files, short_tmp):
    old = os.umask(0o022)
    try:
        package = build_package(model_files["anomalib"], short_tmp / "pkg", name="pkg")
    finally:
        os.umask(old)
    assert stat.S_IMODE(package.root.stat().st_mode) == 0o755  # not 0700: the service user can read it
    assert stat.S_IMODE((package.root / "model.onnx").stat().st_mode) == 0o644


def test_build_checks_settings_against_the_graph(model_files, short_tmp):
    with pytest.raises(PackageError, match="fixed at 64x64"):
        build_package(model_files["classification"], short_tmp / "a", name="a", image_size=(320, 240))
    with pytest.raises(PackageError, match="C >= 2 class channels"):
        build_package(model_files["anomalib_v1"], short_tmp / "b", name="b", kind="segmentation")
    with pytest.raises(PackageError, match="execution providers"):
        build_package(model_files["classification"], short_tmp / "c", name="c", execution={"providers": ["gpu"]})
    with pytest.raises(PackageError, match="2 class names for 3 class channels"):
        build_package(model_files["segmentation"], short_tmp / "d", name="d", classes=["bg", "red"])
    with pytest.raises(PackageError, match="DDA has no post-processing"):
        build_package(model_files["anomalib"], short_tmp / "e", name="e", package_format="dda", probe=OnnxProbe())
    with pytest.raises(PackageError, match="not per-class probabilities"):  # logits: DDA would sum them as is
        build_package(model_files["classification_logits"], short_tmp / "f", name="f", package_format="dda",
                      probe=OnnxProbe())
    assert [p.name for p in short_tmp.iterdir()] == []


def test_own_packages_honour_class_normal_ids_logic_and_raw_shape(model_files, short_tmp):
    from agent.runtime.onnx import OnnxRuntime, OnnxRuntimeOptions

    runtime = OnnxRuntime(OnnxRuntimeOptions(providers=("cpu",)))
    grey = np.full((64, 64, 3), 128, np.uint8)
    red = grey.copy()
    red[8:24, 8:24] = (255, 0, 0)

    def predictor(package):
        return Predictor(package, runtime.load(package))

    default = predictor(build_package(model_files["classification_logits"], short_tmp / "a", name="a"))
    flipped = predictor(build_package(model_files["classification_logits"], short_tmp / "b", name="b",
                                      class_normal_ids=[1], image_classes=["anomaly", "normal"]))
    assert default.predict(red).is_anomalous and not default.predict(grey).is_anomalous
    assert flipped.predict(grey).is_anomalous and not flipped.predict(red).is_anomalous
    assert flipped.predict(grey).score == pytest.approx(1 - default.predict(grey).score, abs=1e-6)

    seg = predictor(build_package(model_files["segmentation"], short_tmp / "c", name="c",
                                  classes=["background", "red", "green"], threshold=1.0, seg_normal_ids=[0],
                                  classification_logic="cls_or_seg", raw_image_size=(32, 16)))
    detection = seg.predict(red)
    assert detection.is_anomalous  # the score (below threshold 1.0) says normal, the mask says anomaly
    assert (detection.mask_width, detection.mask_height) == (32, 16)
    assert not seg.predict(grey).is_anomalous


def test_dda_format_round_trip(short_tmp):
    """model build --format dda writes what DDA runs (the oracle), and the agent serves it identically."""
    from dda_oracle import run_dda

    from agent.runtime.onnx import OnnxRuntime, OnnxRuntimeOptions
    from agent.tools.modelgen.dda import build_dda_segmenter

    onnx_file = build_dda_segmenter(short_tmp / "src" / "model.onnx", image_size=(64, 48))
    package = build_package(onnx_file, short_tmp / "dda", name="dda", package_format="dda", probe=OnnxProbe(),
                            normalize="imagenet",
                            classes=["background", "scratch", "dent"], raw_image_size=(128, 96), threshold=0.6,
                            classification_logic="cls_and_seg")
    assert package.format == "dda" and package.model_file == short_tmp / "dda" / "mochi" / "model.onnx"
    manifest = json.loads((short_tmp / "dda" / "manifest.json").read_text())
    stage = manifest["model_graph"]["stages"][0]
    assert stage["type"] == "mochi" and stage["raw_image_shape"] == [96, 128] and stage["interpolation"] == 3
    assert manifest["runtime"] == "onnx" and "format" not in manifest
    assert set(manifest["model_graph"]) <= {"model_graph_type", "stages", "image_level_classes",
                                            "pixel_level_classes", "bbox_level_classes"}
    model = Predictor(package, OnnxRuntime(OnnxRuntimeOptions(providers=("cpu",))).load(package))
    image = np.full((96, 128, 3), 128, np.uint8)
    for box, color in ((None, None), ((10, 10, 50, 40), (255, 0, 0)), ((60, 30, 100, 90), (0, 255, 0))):
        if box:
            image = image.copy()
            image[box[1]:box[3], box[0]:box[2]] = color
        detection = model.predict(image)
        oracle = run_dda(short_tmp / "dda", image)
        assert detection.score == pytest.approx(oracle["score"], abs=1e-7)
        assert detection.is_anomalous == oracle["is_anomalous"]
        assert [(a.name, a.color) for a in detection.anomalies] == [(n, c) for n, _, c in oracle["anomalies"]]
        np.testing.assert_array_equal(detection.mask, oracle["color_mask"])


@pytest.mark.parametrize("args,message", [
    (["--image-size", "224"], "is not WIDTHxHEIGHT"),
    (["--image-size", "224,224"], "is not WIDTHxHEIGHT"),
    (["--providers", "gpu"], "unknown execution provider(s) ['gpu']"),
])
def test_model_build_cli_rejects_bad_settings_with_usage_errors(model_files, short_tmp, capsys, args, message):
    from agent.cli import main

    with pytest.raises(SystemExit) as info:
        main(["model", "build", "--onnx", str(model_files["classification"]), "--name", "m", "--out",
              str(short_tmp / "m"), *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_model_build_cli_reports_graph_mismatch(model_files, short_tmp, capsys):
    from agent.cli import main

    code = main(["model", "build", "--onnx", str(model_files["classification"]), "--name", "m", "--out",
                 str(short_tmp / "m"), "--image-size", "320x240"])
    assert code == 2 and "fixed at 64x64" in capsys.readouterr().err
    assert main(["model", "build", "--onnx", str(model_files["segmentation"]), "--name", "d", "--out",
                 str(short_tmp / "d"), "--format", "dda", "--raw-image-size", "128x96"]) == 2
    assert "not per-class probabilities" in capsys.readouterr().err
