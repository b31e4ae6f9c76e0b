"""recipe.yaml and gdk-config.json: they render, parse, cover both platforms, keep the rules of both nuclei
(classic and lite), fit lite's recipe buffer and stay in step with AgentConfig."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import AgentConfig
from agent.greengrass import COMPONENT_NAME
from agent.greengrass.component import ConfigSource
from agent.greengrass.recipe import (
    INSTALL_KEYS,
    INSTALL_SCRIPT,
    LITE_RECIPE_BUFFER,
    MACHINES,
    MAX_RECIPE_BYTES,
    PLATFORMS,
    both_nuclei_problems,
    check_size,
    default_configuration,
    render,
    setenv,
)

ROOT = Path(__file__).resolve().parents[2]
WHEEL = "edge_agent-1.2.3-py3-none-any.whl"
BASE = f"s3://my-bucket/{COMPONENT_NAME}/1.2.3"
URI = f"{BASE}/{WHEEL}"
WHEELHOUSES = {"x86_64": f"{BASE}/edge_agent-wheelhouse-x86_64.zip",
               "aarch64": f"{BASE}/edge_agent-wheelhouse-aarch64.zip"}
PLACEHOLDER = re.compile(r"\{([.\w-]+):([^:}]*)}")


@pytest.fixture(scope="module")
def recipe() -> dict[str, Any]:
    return yaml.safe_load(render((ROOT / "recipe.yaml").read_text(), "1.2.3", URI))


@pytest.fixture(scope="module")
def offline_recipe() -> dict[str, Any]:
    return yaml.safe_load(render((ROOT / "recipe.yaml").read_text(), "1.2.3", URI, wheelhouse_uris=WHEELHOUSES))


def manifest(recipe: dict[str, Any], os_name: str, arch: str) -> dict[str, Any]:
    found = [m for m in recipe["Manifests"]
             if m["Platform"] == {"os": os_name, "architecture": arch, "runtime": "*"}]
    assert len(found) == 1, f"one manifest for {os_name}/{arch}"
    return found[0]


def interpolate(text: str, config: dict[str, Any], work: str = "/gg/work/c", artifacts: str = "/gg/art") -> str:
    """The nucleus' same-component interpolation (KernelConfigResolver), enough for this recipe."""

    def value(m: re.Match[str]) -> str:
        namespace, key = m[1], m[2]
        if namespace == "configuration":
            v = config[key.lstrip("/")]
            return ("true" if v else "false") if isinstance(v, bool) else str(v)
        return {("work", "path"): work, ("artifacts", "path"): artifacts,
                ("artifacts", "decompressedPath"): artifacts + "-unarchived"}.get((namespace, key), m[0])

    return PLACEHOLDER.sub(value, text)


def test_top_level_fields(recipe: dict[str, Any]) -> None:
    assert recipe["RecipeFormatVersion"] == "2020-01-25"
    assert recipe["ComponentName"] == COMPONENT_NAME == "com.edgeagent.EdgeAgent"
    assert recipe["ComponentVersion"] == "1.2.3"
    # The lifecycle/configuration IPC the agent uses needs no authorization (reference §1.3).
    assert "accessControl" not in recipe["ComponentConfiguration"]["DefaultConfiguration"]
    assert "ComponentDependencies" not in recipe


@pytest.mark.parametrize(("os_name", "arch"), PLATFORMS)
def test_each_platform_installs_the_wheel_and_runs_the_agent(recipe: dict[str, Any], os_name: str, arch: str,
                                                             tmp_path: Path) -> None:
    m = manifest(recipe, os_name, arch)
    owner = {"Read": "OWNER", "Execute": "NONE"}
    assert m["Artifacts"] == [{"Uri": URI, "Permission": owner}, {"Uri": f"{BASE}/install.sh", "Permission": owner}]
    lifecycle = m["Lifecycle"]
    assert set(lifecycle) == {"install", "run"}  # lowercase: the only spelling lite reads; classic ignores case
    assert "edge-agent serve" in lifecycle["run"]["Script"]
    config = default_configuration()
    for system_ort, profile in ((False, "cpu"), (False, "gpu"), (True, "cpu")):
        config["UseSystemOnnxRuntime"], config["InstallProfile"] = system_ort, profile
        for step in ("install", "run"):
            script = interpolate(lifecycle[step]["Script"], config)
            assert not PLACEHOLDER.search(script), f"{step}: left {PLACEHOLDER.findall(script)}"
            check = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
            assert check.returncode == 0, f"{arch} {step} is not valid shell: {check.stderr}"
    install = lifecycle["install"]["Script"]
    assert install.startswith('sh "{artifacts:path}/install.sh" ')
    assert "{configuration:/UseSystemOnnxRuntime}" in install and "{configuration:/InstallProfile}" in install
    assert lifecycle["install"]["Timeout"] >= 600


def test_offline_build_adds_the_machines_wheelhouse(offline_recipe: dict[str, Any]) -> None:
    for os_name, arch in PLATFORMS:
        machine = MACHINES[arch]
        artifacts = manifest(offline_recipe, os_name, arch)["Artifacts"]
        assert artifacts[-1] == {"Uri": WHEELHOUSES[machine], "Unarchive": "ZIP",
                                 "Permission": {"Read": "OWNER", "Execute": "NONE"}}
        assert len(artifacts) == 3


def test_rendered_recipe_keeps_both_nuclei_rules_and_fits_lite(recipe: dict[str, Any],
                                                                offline_recipe: dict[str, Any]) -> None:
    assert both_nuclei_problems(recipe) == [] and both_nuclei_problems(offline_recipe) == []
    text = render((ROOT / "recipe.yaml").read_text(), "1.2.3", URI, wheelhouse_uris=WHEELHOUSES)
    assert check_size(text) == ""
    assert len(text.encode()) <= MAX_RECIPE_BYTES < LITE_RECIPE_BUFFER
    assert "#" not in text.replace("#/", ""), "comments count against lite's buffer: render drops them"
    assert "nucleus lite reads at most 8196" in check_size(text + "x" * (MAX_RECIPE_BYTES - len(text) + 1))


def test_both_nuclei_rules_catch_what_lite_rejects() -> None:
    bad = {"Manifests": [{
        "Platform": {"os": "linux", "architecture": "amd64"},
        "Lifecycle": {"Install": {"Script": "x || { echo no; exit 1; }"},
                      "run": {"Script": "ls {com.edgeagent.EdgeAgent:work:path}", "Setenv": {"A": "${HOME}"}}},
        "Artifacts": [{"URI": "s3://b/x.zip"}]}]}
    problems = "\n".join(both_nuclei_problems(bad))
    for expected in ("runtime", "'Install' must be lowercase", "Install Script has a `{`", "cross-component",
                     "run A has a `{`",
                     "`Uri`"):
        assert expected in problems, (expected, problems)


def test_install_script_is_posix_sh_and_refuses_bad_settings(tmp_path: Path) -> None:
    assert subprocess.run(["sh", "-n", str(INSTALL_SCRIPT)], capture_output=True).returncode == 0
    art = tmp_path / "art"
    art.mkdir()
    (art / WHEEL).write_bytes(b"")
    for args, message in ((["false", "tpu"], "InstallProfile must be cpu or gpu, not 'tpu'"),
                          (["maybe", "cpu"], "UseSystemOnnxRuntime must be true or false")):
        done = subprocess.run(["sh", str(INSTALL_SCRIPT), f"{art}/", str(tmp_path / "dec"), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 1 and message in done.stderr
        assert not (tmp_path / "venv").exists()


def test_default_configuration_is_agentconfig_at_its_defaults(recipe: dict[str, Any]) -> None:
    defaults = recipe["ComponentConfiguration"]["DefaultConfiguration"]
    assert defaults == default_configuration()
    assert set(defaults) - set(INSTALL_KEYS) == set(AgentConfig.keys()), "recipe keys != AgentConfig keys"
    assert defaults["Socket"] == "unix:///tmp/aws.iot.lookoutvision.EdgeAgent.sock"
    # The defaults read back as AgentConfig's defaults (WorkDir/ModelsDir: the component's work dir).
    config = ConfigSource(Path("/gg/work/c"), env={}, cli={}).build(defaults)
    expected = AgentConfig().replace(work_dir="/gg/work/c", models_dir="/gg/work/c/models")
    assert config == expected


def test_setenv_carries_exactly_the_restart_only_keys(recipe: dict[str, Any]) -> None:
    restart_keys = {k for k, f in AgentConfig.keys().items() if f.metadata["restart"]}
    for os_name, arch in PLATFORMS:
        env = manifest(recipe, os_name, arch)["Lifecycle"]["run"]["Setenv"]
        agent_env = {k: v for k, v in env.items() if k.startswith("EDGE_AGENT_")}
        assert agent_env == setenv()
        assert {v[len("{configuration:/"):-1] for v in agent_env.values()} == restart_keys


def test_interpolated_setenv_parses_even_with_java_number_formatting() -> None:
    # The nucleus may hold numbers as doubles; Java renders them as 16.0 or 6.711296E7 in Setenv.
    config = {**default_configuration(), "GrpcWorkers": 16.0, "MaxMessageBytes": "6.711296E7"}
    env = {k: interpolate(v, config) for k, v in setenv().items()}
    parsed = ConfigSource(Path("/gg/work/c"), env=env, cli={}).build({})
    assert parsed.grpc_workers == 16 and parsed.max_message_bytes == 67112960
    assert parsed.socket_mode == 0o660 and parsed.work_dir == "/gg/work/c"


def test_recipe_check_script_agrees() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "build-component"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_gdk_config_builds_with_the_script() -> None:
    doc = json.loads((ROOT / "gdk-config.json").read_text())
    component = doc["component"][COMPONENT_NAME]
    assert component["build"]["build_system"] == "custom"
    command = component["build"]["custom_build_command"]
    assert "scripts/build-component" in command and (ROOT / "scripts" / "build-component").is_file()
    assert re.fullmatch(r"\d+\.\d+\.\d+", component["version"])
    # GDK's minimum version: GDK CLI before 1.2.2 rejected the `Uri` key (aws-greengrass-gdk-cli issue #142),
    # which nucleus lite needs.
    assert doc["gdk_version"] == "1.2.2"


def _build_component_module() -> Any:
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("build_component", str(ROOT / "scripts" / "build-component"))
    spec = importlib.util.spec_from_loader("build_component", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_wheelhouse_requirements_are_the_devices_not_the_build_hosts() -> None:
    """pip download --platform evaluates markers on the build host; the builder evaluates them for the device."""
    import email

    bc = _build_component_module()
    with_extras = email.message_from_string(
        "Metadata-Version: 2.1\nName: edge-agent\nRequires-Python: >=3.8\n"
        "Requires-Dist: numpy>=1.24\nRequires-Dist: importlib-metadata; python_version < '3.10'\n"
        "Requires-Dist: pywin32; sys_platform == 'win32'\nProvides-Extra: cpu\n"
        "Requires-Dist: onnxruntime>=1.16; extra == 'cpu'\nProvides-Extra: gpu\n"
        "Requires-Dist: onnxruntime-gpu>=1.16; extra == 'gpu'\nProvides-Extra: packaging\n"
        "Requires-Dist: boto3>=1.34; extra == 'packaging'\n")
    assert bc.device_requirements(with_extras, "aarch64", "3.8", "cpu") == [
        "importlib-metadata", "numpy>=1.24", "onnxruntime>=1.16"]
    assert bc.device_requirements(with_extras, "x86_64", "3.11", "gpu") == ["numpy>=1.24", "onnxruntime-gpu>=1.16"]
    # A wheel without the extras (ONNX Runtime chosen by machine markers): the profile decides, as install.sh does.
    legacy = email.message_from_string(
        "Metadata-Version: 2.1\nName: edge-agent\nRequires-Dist: grpcio>=1.60\n"
        "Requires-Dist: onnxruntime-gpu>=1.17; platform_machine == 'x86_64'\n"
        "Requires-Dist: onnxruntime>=1.17; platform_machine != 'x86_64'\n")
    assert bc.device_requirements(legacy, "x86_64", "3.11", "cpu") == ["grpcio>=1.60", "onnxruntime"]
    assert bc.device_requirements(legacy, "aarch64", "3.11", "gpu") == ["grpcio>=1.60", "onnxruntime-gpu"]


def _wheel(folder: Path, name: str, version: str, metadata: str = "", script: bool = False) -> Path:
    """A minimal pure-Python wheel (what install.sh and pip need of one)."""
    import zipfile

    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    module = name.replace("-", "_")
    files = {f"{module}.py": "def main():\n    return 0\n",
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{metadata}",
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n"}
    if script:
        files[f"{dist}.dist-info/entry_points.txt"] = f"[console_scripts]\n{name} = {module}:main\n"
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{n},,\n" for n in [*files, f"{dist}.dist-info/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for n, text in files.items():
            z.writestr(n, text)
    return path


def test_install_script_installs_offline_from_the_wheelhouse(tmp_path: Path) -> None:
    """install.sh as a lite local deployment runs it: the wheelhouse zip left packed, paths ending in `/`, no
    network configured for pip (an index would fail: --no-index). Then unchanged reruns are skipped."""
    import zipfile

    art, dec, work, wheels = (tmp_path / n for n in ("art", "dec", "work", "wheels"))
    for d in (art, dec, work, wheels):
        d.mkdir()
    _wheel(art, "edge-agent", "1.0.0", "Provides-Extra: cpu\nRequires-Dist: onnxruntime; extra == 'cpu'\n"
                                       "Provides-Extra: gpu\nRequires-Dist: onnxruntime-gpu; extra == 'gpu'\n",
           script=True)
    _wheel(wheels, "onnxruntime", "9.9.9")
    with zipfile.ZipFile(art / "edge_agent-wheelhouse-x86_64.zip", "w") as z:
        for w in wheels.iterdir():
            z.write(w, w.name)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
           "PIP_CONFIG_FILE": "/dev/null", "PIP_INDEX_URL": "http://127.0.0.1:9/nowhere"}

    def install(profile: str = "cpu") -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", str(INSTALL_SCRIPT), f"{art}/", f"{dec}/", "false", profile], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300)

    done = install()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "unpacking edge_agent-wheelhouse-x86_64.zip" in done.stdout and "offline, from" in done.stdout
    site = next((work / "venv" / "lib").glob("python3*/site-packages"))
    assert (site / "onnxruntime.py").is_file() and (work / "venv" / "bin" / "edge-agent").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["venv"]  # its unpacked wheelhouse is gone
    again = install()
    assert again.returncode == 0 and "already installed" in again.stdout and "unpacking" not in again.stdout
    # A profile the wheelhouse cannot serve fails with a message, and leaves nothing unpacked behind.
    gpu = install("gpu")
    assert gpu.returncode == 1 and "the wheelhouse has no onnxruntime_gpu wheel" in gpu.stderr
    assert not (work / "wheelhouse").exists()
    # The classic nucleus (and lite's cloud deployments) unpacked it already: used in place.
    with zipfile.ZipFile(art / "edge_agent-wheelhouse-x86_64.zip") as z:
        z.extractall(dec / "edge_agent-wheelhouse-x86_64")
    shutil.rmtree(work / "venv")
    done = install()
    assert done.returncode == 0 and "unpacking" not in done.stdout
    assert f"offline, from {dec}/edge_agent-wheelhouse-x86_64" in done.stdout
