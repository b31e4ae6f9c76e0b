"""Building and validating model packages."""

from __future__ import annotations

import json
import shutil

import pytest

from agent.core.package import build_package, load_package
from agent.errors import PackageError


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
    assert "#RRGGBB" in broken(**{"pixel_level_classes.colors": ["red", "#00FF00"]})
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
