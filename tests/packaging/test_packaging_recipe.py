"""The model component recipe, its lifecycle scripts (run for real), the artifact zip, compilation."""

from __future__ import annotations

import json
import os
import re
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from agent.core.package import build_package, load_package
from agent.errors import PackageError
from agent.greengrass.recipe import both_nuclei_problems
from agent.packaging.compile import compile_model, resolve_target
from agent.packaging.output import build_artifact, check_artifact, deployment_request, local_deployment_command
from agent.packaging.recipe import (
    AGENT_COMPONENT,
    artifact_name,
    model_component_recipe,
    render_json,
    render_yaml,
)
from agent.tools.modelgen import build_anomalib_v2


def recipe(**kw):
    args = {"component_name": "demo.model", "component_version": "1.2.3",
            "artifact_uri": "s3://bkt/p/" + artifact_name("demo.model", "1.2.3"), "architecture": "aarch64",
            "description": "Demo model", "publisher": "ACME"}
    args.update(kw)
    return model_component_recipe(**args)


def test_recipe_shape() -> None:
    r = recipe()
    assert r["RecipeFormatVersion"] == "2020-01-25"
    assert (r["ComponentName"], r["ComponentVersion"]) == ("demo.model", "1.2.3")
    assert r["ComponentDescription"] == "Demo model" and r["ComponentPublisher"] == "ACME"
    assert r["ComponentConfiguration"] == {"DefaultConfiguration": {"Autostart": False}}
    assert r["ComponentDependencies"] == {AGENT_COMPONENT: {"VersionRequirement": ">=0.1.0 <1.0.0",
                                                            "DependencyType": "HARD"}}
    (manifest,) = r["Manifests"]
    assert manifest["Platform"] == {"os": "linux", "architecture": "aarch64", "runtime": "*"}  # both nuclei
    (artifact,) = manifest["Artifacts"]
    assert artifact["Uri"] == "s3://bkt/p/demo.model-1.2.3_greengrass_model_component.zip"
    assert artifact["Unarchive"] == "ZIP" and artifact["Permission"]["Read"] == "ALL"
    # Install only: a Shutdown/Run step would unpublish the model on restarts that skip Install.
    assert set(manifest["Lifecycle"]) == {"install"}
    assert both_nuclei_problems(r) == []
    assert recipe(autostart=True)["ComponentConfiguration"]["DefaultConfiguration"]["Autostart"] is True


def test_recipe_refuses_an_artifact_without_the_lfv_suffix() -> None:
    with pytest.raises(ValueError, match="greengrass_model_component.zip"):
        recipe(artifact_uri="s3://bkt/model.zip")


def test_yaml_and_json_render_the_same_recipe() -> None:
    r = recipe()
    assert yaml.safe_load(render_yaml(r)) == r  # the version stays a string, not a date
    assert json.loads(render_json(r)) == r
    assert render_yaml(r).startswith("RecipeFormatVersion: '2020-01-25'\n")


class Root:
    """A nucleus root as both nuclei lay it out, and their interpolation of the model component's install."""

    def __init__(self, root: Path, name: str = "demo.model") -> None:
        self.root, self.name = root, name
        self.agent_work = root / "work" / AGENT_COMPONENT

    def artifacts(self, version: str) -> Path:
        return self.root / "packages" / "artifacts" / self.name / version

    def decompressed(self, version: str) -> Path:
        return self.root / "packages" / "artifacts-unarchived" / self.name / version

    def install(self, version: str, package: Path, *, unarchived: bool, lite: bool = False) -> str:
        """Place the artifact (unpacked too when the nucleus unarchives: classic, lite cloud deployments), then
        run the install step the way the nucleus does (lite: paths end with `/`, script run by /bin/sh)."""
        zip_name = artifact_name(self.name, version)
        build_artifact(package, self.artifacts(version) / zip_name)
        self.decompressed(version).mkdir(parents=True, exist_ok=True)  # lite makes it, empty, for local ones
        if unarchived:
            with zipfile.ZipFile(self.artifacts(version) / zip_name) as z:
                z.extractall(self.decompressed(version) / zip_name[:-4])
        work = self.root / "work" / self.name
        work.mkdir(parents=True, exist_ok=True)
        slash = "/" if lite else ""
        values = {"{artifacts:decompressedPath}": f"{self.decompressed(version)}{slash}",
                  "{artifacts:path}": f"{self.artifacts(version)}{slash}", "{work:path}": f"{work}{slash}",
                  "{kernel:rootPath}": str(self.root)}
        script = recipe(component_version=version, artifact_uri=f"s3://b/{zip_name}")["Manifests"][0][
            "Lifecycle"]["install"]["Script"]
        for variable, value in values.items():
            script = script.replace(variable, value)
        assert not re.search(r"\{[\w.:-]+\}", script), script
        subprocess.run(["sh", "-c", script], cwd=work, check=True, timeout=20)
        return zip_name[:-4]


def _package(root: Path, version: str) -> Path:
    pkg = root / f"pkg-{version}"
    pkg.mkdir(parents=True)
    (pkg / "manifest.json").write_text(version)
    (pkg / "model.onnx").write_bytes(b"\0" * 10)
    return pkg


@pytest.mark.parametrize("unarchived", [True, False], ids=["nucleus-unpacked", "lite-local-deployment"])
def test_lifecycle_publishes_and_swaps_the_model_link(tmp_path: Path, unarchived: bool) -> None:
    gg = Root(tmp_path / "gg")
    for version in ("1.0.0", "1.0.1"):
        stem = gg.install(version, _package(tmp_path, version), unarchived=unarchived, lite=not unarchived)
        link = gg.agent_work / "models" / "demo.model"
        assert link.is_symlink() and (link / "manifest.json").read_text() == version
        expected = gg.decompressed(version) / stem if unarchived else gg.root / "work" / "demo.model" / stem
        assert link.resolve() == expected.resolve()
        assert oct((link / "model.onnx").stat().st_mode & 0o777) == "0o644"  # readable by the agent's user
    assert sorted(os.listdir(gg.agent_work / "models")) == ["demo.model"]  # no temporary link left behind


def test_self_unpacked_package_is_reused_on_reinstall(tmp_path: Path) -> None:
    """Install re-runs on every nucleus start: lite's local deployment unpacks once, then only relinks."""
    gg = Root(tmp_path / "gg")
    stem = gg.install("1.0.0", _package(tmp_path, "1.0.0"), unarchived=False, lite=True)
    unpacked = gg.root / "work" / "demo.model" / stem
    marker = unpacked / "seen"
    marker.write_text("x")
    gg.install("1.0.0", tmp_path / "pkg-1.0.0", unarchived=False, lite=True)
    assert marker.exists()


def test_install_script_quotes_paths_with_spaces(tmp_path: Path) -> None:
    gg = Root(tmp_path / "green grass")
    stem = gg.install("1.2.3", _package(tmp_path, "1.2.3"), unarchived=True)
    assert (gg.agent_work / "models" / "demo.model").resolve() == (gg.decompressed("1.2.3") / stem).resolve()


def test_artifact_zip_is_safe_and_reproducible(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "manifest.json").write_text("{}")
    (pkg / "sub" / "w.bin").write_bytes(b"\0" * 10)
    names = build_artifact(pkg, tmp_path / "a.zip")
    assert names == ["manifest.json", "sub/w.bin"]
    build_artifact(pkg, tmp_path / "b.zip")
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    assert check_artifact(tmp_path / "a.zip") == names
    (pkg / "link").symlink_to("/etc/passwd")
    with pytest.raises(PackageError, match="symlink"):
        build_artifact(pkg, tmp_path / "c.zip")


@pytest.mark.parametrize("member", ["../evil", "/abs/evil", "a/../../evil"])
def test_check_artifact_refuses_escaping_members(tmp_path: Path, member: str) -> None:
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("manifest.json", "{}")
        zf.writestr(member, "x")
    with pytest.raises(PackageError, match="relative path"):
        check_artifact(path)


# ---------------------------------------------------------------------------------------------
# Compilation


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("pkg")
    onnx_path = build_anomalib_v2(root / "src" / "model.onnx", image_size=(64, 64))
    return build_package(onnx_path, root / "package", name="model")


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def test_cpu_compilation_optimises_and_keeps_outputs(package, tmp_path: Path) -> None:
    target = resolve_target({"TargetPlatform": {"Os": "LINUX", "Arch": "X86_64"}})
    assert target.options == {"mcpu": "core-avx2"}  # LFV's default for CPU targets
    result = compile_model(package, target, tmp_path / "out")
    assert result.record["graph_optimization"] == {"offline": "extended", "on_device": "all"}
    assert "mcpu" in result.record["not_applied"]
    assert result.execution == {"providers": ["cpu"], "graph_optimization": "all"}
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    ours, theirs = _run(package.model_file, x), _run(result.model_file, x)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=1e-4, atol=1e-5)
    assert set(result.files) <= {p.name for p in (tmp_path / "out").iterdir()}


def test_nvidia_compilation_records_the_tensorrt_settings(package, tmp_path: Path) -> None:
    target = resolve_target({"TargetPlatform": {"Os": "LINUX", "Arch": "X86_64", "Accelerator": "NVIDIA"},
                             "CompilerOptions": json.dumps({"gpu-code": "sm_80", "trt-ver": "8.2.0",
                                                            "cuda-ver": "11.2", "fp16": False})})
    result = compile_model(package, target, tmp_path / "out")
    assert result.execution == {"providers": ["tensorrt", "cuda", "cpu"], "trt_fp16": False, "gpu_code": "sm_80",
                                "trt_ver": "8.2.0", "cuda_ver": "11.2", "graph_optimization": "all"}
    # The graph goes unchanged to the device, where TensorRT builds its engine.
    assert result.model_file.read_bytes() == package.model_file.read_bytes()
    assert sorted(result.files) == ["model.onnx", "model.onnx.data"]


def test_jetson_xavier_means_aarch64_nvidia() -> None:
    target = resolve_target({"TargetDevice": "jetson_xavier"})
    assert (target.os, target.architecture, target.accelerator) == ("linux", "aarch64", "NVIDIA")
    assert target.options["gpu-code"] == "sm_72" and target.options["cuda-ver"] == "10.2"


def test_packaged_manifest_configures_the_agent(package, tmp_path: Path) -> None:
    """The execution object written by a job parses into the core's ExecutionPrefs."""
    target = resolve_target({"TargetDevice": "jetson_xavier"})
    result = compile_model(package, target, tmp_path / "compiled")
    doc = json.loads((package.root / "manifest.json").read_text())
    doc["execution"] = result.execution
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    for name in result.files:
        (pkg / name).write_bytes((tmp_path / "compiled" / name).read_bytes())
    (pkg / "manifest.json").write_text(json.dumps(doc))
    prefs = load_package(pkg).execution
    assert prefs.providers == ("tensorrt", "cuda", "cpu")
    assert (prefs.gpu_code, prefs.trt_ver, prefs.cuda_ver, prefs.trt_fp16) == ("sm_72", "8.2.1", "10.2", True)


# ---------------------------------------------------------------------------------------------
# Deployments (request shape; the AWS call itself is in test_packaging_aws.py)


def test_deployment_request_adds_the_agent_and_policies() -> None:
    req = deployment_request("arn:aws:iot:us-east-1:1:thing/dev", {"demo.model": "1.0.0"}, agent_version="0.1.0",
                             timeout_s=90)
    assert req["components"] == {"demo.model": {"componentVersion": "1.0.0"},
                                 AGENT_COMPONENT: {"componentVersion": "0.1.0"}}
    assert req["deploymentPolicies"] == {"failureHandlingPolicy": "ROLLBACK",
                                         "componentUpdatePolicy": {"timeoutInSeconds": 90,
                                                                   "action": "NOTIFY_COMPONENTS"}}
    cmd = local_deployment_command(Path("/h"), {"demo.model": "1.0.0"}, agent_version="0.1.0")
    assert cmd[1:7] == ["deployment", "create", "--recipeDir", "/h/greengrass/recipes", "--artifactDir",
                        "/h/greengrass/artifacts"]
    assert cmd[7:] == ["--merge", "demo.model=1.0.0", "--merge", f"{AGENT_COMPONENT}=0.1.0"]
