"""ONNX IR versions newer than the installed ONNX Runtime reads (issue 14).

anomalib 2.x / torch >= 2.5 exports are IR 10; ONNX Runtime 1.16-1.17 (JetPack 5) refuse anything above IR 9.
In the Python 3.8 compatibility pass (scripts/test) these tests run on ONNX Runtime 1.16.0, where the IR-10 model
takes the downgrade path; IR 99 is refused by every ONNX Runtime, so the default interpreter takes it too.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import detect, grey_with_square, start, wait_known, wait_status
from onnx import TensorProto, helper

from agent.core.package import build_package
from agent.errors import ModelLoadError, PackageError
from agent.runtime.onnx import OnnxProbe, check_loadable
from agent.tools.modelgen import build_anomalib_v2


@pytest.fixture
def stub_for(pb_modules):
    """stub_for(agent): an EdgeAgentStub (client stubs compiled from proto/) on that agent's socket."""
    channels = []

    def make(agent):
        channels.append(grpc.insecure_channel(agent.config.socket))
        return pb_modules[1].EdgeAgentStub(channels[-1])

    yield make
    for channel in channels:
        channel.close()


def anomalib_export(path: Path, ir_version: int, *, int4_weight: bool = False, opset: int | None = None) -> Path:
    """An anomalib 2.x-shaped export (weights in model.onnx.data) stamped with ir_version, as torch writes it."""
    build_anomalib_v2(path, external_data=True)
    model = onnx.load(str(path), load_external_data=False)
    model.ir_version = ir_version
    if opset is not None:
        model.opset_import[0].version = opset
    if int4_weight:
        # An INT4 initializer (IR 10's new type): an IR 9 runtime cannot hold it, so no downgrade.
        # Built field by field: onnx < 1.16 (the Python 3.8 pass) has no INT4 in its helpers.
        weight = model.graph.initializer.add()
        weight.name, weight.data_type, weight.raw_data = "int4_weight", 22, b"\x21"
        weight.dims.append(2)
    onnx.save(model, str(path))
    return path


def refuses(model_file: Path) -> bool:
    """Does the installed ONNX Runtime refuse this file's IR version by itself?"""
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        ort.InferenceSession(str(model_file), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        return "IR version" in str(exc)
    return False


@pytest.mark.parametrize("ir_version", [10, 99])
def test_newer_ir_model_is_served_when_it_uses_nothing_newer(ir_version, tmp_path, models_dir, agent_factory,
                                                             stub_for, pb, caplog):
    src = anomalib_export(tmp_path / "export" / "model.onnx", ir_version)
    refused = refuses(src)
    if ir_version == 99 or ort.__version__.startswith(("1.16.", "1.17.")):
        assert refused, f"ONNX Runtime {ort.__version__} accepted IR {ir_version}"
    caplog.set_level(logging.INFO, logger="agent.runtime.onnx")
    build_package(src, models_dir / "widget", name="widget")  # model build checks it loads, too
    agent = agent_factory()
    wait_known(agent, "widget")
    stub = stub_for(agent)
    desc = start(stub, pb, "widget")
    assert desc.status_message == "running on CPUExecutionProvider"
    assert detect(stub, pb, "widget", grey_with_square()).is_anomalous
    assert not detect(stub, pb, "widget", grey_with_square(box=None)).is_anomalous
    downgraded = [r.getMessage() for r in caplog.records if "loading it as IR" in r.getMessage()]
    if refused:
        assert downgraded and f"ONNX IR version {ir_version} is newer than ONNX Runtime {ort.__version__}" \
            in downgraded[-1]
    else:
        assert downgraded == []


def test_model_that_needs_the_newer_ir_fails_saying_why(tmp_path, models_dir, agent_factory, stub_for, pb):
    src = anomalib_export(tmp_path / "export" / "model.onnx", 99, int4_weight=True)
    with pytest.raises(ModelLoadError) as info:
        check_loadable(src)
    message = str(info.value)
    assert "IR version 99" in message and "4-bit" in message and "int4_weight" in message
    assert "Re-export the model without those" in message

    with pytest.raises(PackageError, match="4-bit"):
        build_package(src, tmp_path / "pkg", name="widget", probe=OnnxProbe())  # as `model build` does

    # A package whose model was replaced by such an export (build it from the IR 9 file, then swap the file in,
    # as a hand-made package would have it): StartModel ends FAILED with the same explanation.
    good = tmp_path / "good" / "model.onnx"
    build_anomalib_v2(good, external_data=True)
    package = build_package(good, models_dir / "widget", name="widget")
    data = src.read_bytes()
    package.model_file.write_bytes(data)
    manifest = json.loads((package.root / "manifest.json").read_text())
    manifest["files"][package.model_file.name] = hashlib.sha256(data).hexdigest()
    (package.root / "manifest.json").write_text(json.dumps(manifest))
    agent = agent_factory()
    wait_known(agent, "widget")
    stub = stub_for(agent)
    stub.StartModel(pb.StartModelRequest(model_component="widget"))
    desc = wait_status(stub, pb, "widget", pb.FAILED)
    assert desc.status == pb.FAILED
    assert "cannot be loaded as IR" in desc.status_message and "4-bit" in desc.status_message
    assert "Re-export" in desc.status_message


def test_opset_newer_than_the_runtime_knows_says_which_to_export_with(tmp_path):
    # torch's dynamo exporter (anomalib 2.7) writes IR 10 at opset 18+; opset 21 is past ONNX Runtime 1.16's 19.
    src = anomalib_export(tmp_path / "export" / "model.onnx", 10, opset=21)
    with pytest.raises(ModelLoadError) as info:
        check_loadable(src)
    message = str(info.value)
    assert "onnxruntime::" not in message  # the reason, without ONNX Runtime's C++ prefix
    if ort.__version__.startswith(("1.16.", "1.17.")):
        assert "supports ONNX opsets up to 19" in message and "opset_version=19 or lower" in message
    else:
        # A runtime that knows opset 21 reads the graph, and finds the opset-17 ReduceMax (axes attribute) wrong.
        assert "ReduceMax" in message


def test_int4_cast_and_overloads_are_newer_features(tmp_path):
    from agent.core.onnx_graph import newer_ir_features, with_ir_version

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    plain = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    assert newer_ir_features(plain.SerializeToString()) == []

    cast = helper.make_model(helper.make_graph([helper.make_node("Cast", ["x"], ["q"], to=22),
                                                helper.make_node("Cast", ["q"], ["y"], to=1)], "g", [x], [y]))
    assert newer_ir_features(cast.SerializeToString()) == ["a 4-bit or newer type (Cast to=22)"]

    # NodeProto.overload is field 8 (onnx >= 1.16; written by hand so that onnx 1.15 makes the same bytes).
    node = onnx.NodeProto.FromString(helper.make_node("Identity", ["x"], ["y"]).SerializeToString() + b"\x42\x02v2")
    overloaded = helper.make_model(helper.make_graph([node], "g", [x], [y]))
    assert newer_ir_features(overloaded.SerializeToString()) == ["an overloaded function call (Identity)"]

    # Inside a subgraph (If branch) too.
    branch = helper.make_graph([helper.make_node("Cast", ["x"], ["b"], to=21)], "then", [],
                               [helper.make_tensor_value_info("b", 21, [1])])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    nested = helper.make_model(helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)], "g", [cond, x], [y]))
    assert any("4-bit" in f for f in newer_ir_features(nested.SerializeToString()))

    # with_ir_version changes that one field and nothing else.
    plain.ir_version = 10
    patched = onnx.load_from_string(with_ir_version(plain.SerializeToString(), 9))
    assert patched.ir_version == 9
    patched.ir_version = 10
    assert patched.SerializeToString() == plain.SerializeToString()


def test_reads_the_graph_like_onnx_does(model_files):
    from agent.core.onnx_graph import read_header, read_signature

    for kind, path in model_files.items():
        model = onnx.load(str(path), load_external_data=False)
        sig = read_signature(str(path), path.name)
        init = {t.name for t in model.graph.initializer}

        def dims(vi):
            return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                    for d in vi.type.tensor_type.shape.dim]

        assert sig.inputs == [(i.name, dims(i)) for i in model.graph.input if i.name not in init], kind
        assert sig.outputs == [(o.name, dims(o)) for o in model.graph.output], kind
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        assert sig.external_files == sorted(locations), kind
        header = read_header(path.read_bytes())
        assert header.ir_version == model.ir_version and header.onnx_opset == model.opset_import[0].version

    with pytest.raises(PackageError, match="not a readable ONNX model"):
        read_signature(b"\xff" * 64, "junk.onnx")
    with pytest.raises(PackageError, match="not a readable ONNX model"):
        read_signature(np.arange(10, dtype=np.uint8).tobytes(), "junk.onnx")
