"""Install profiles and declared version ranges (issues 14, 15): what each extra brings, and that the lowest
versions the compatibility pass installs are exactly pyproject's floors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Python 3.8's stdlib has no tomllib; pyproject's dependency tables are simple enough to read as text.
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def _table(start: str) -> str:
    text = PYPROJECT[PYPROJECT.index(start) + len(start):]
    return text[:text.index("\n[")] if "\n[" in text else text


def _list(text: str, key: str) -> list[str]:
    body = re.search(rf"^{key} = \[(.*?)^\]", text, re.S | re.M)
    assert body, key
    return re.findall(r'^\s*"([^"]+)"', body.group(1), re.M)


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_core_install_is_what_a_device_serves_with():
    core = {_name(r) for r in _list(_table("[project]"), "dependencies")}
    assert core == {"grpcio", "protobuf", "numpy", "pillow", "opencv-python-headless", "prometheus-client",
                    "grpcio-health-checking", "grpcio-reflection", "awsiotsdk"}
    extras = _table("[project.optional-dependencies]")
    assert [_name(r) for r in _list(extras, "cpu")] == ["onnxruntime"]
    # Both builds ship the module `onnxruntime`: the gpu profile must never pull the CPU one too.
    assert [_name(r) for r in _list(extras, "gpu")] == ["onnxruntime-gpu"]
    assert {_name(r) for r in _list(extras, "packaging")} == {"pyyaml", "boto3"}
    dev = _list(extras, "dev")
    assert "edge-agent[cpu,packaging,modelgen]" in dev and not any("gpu" in r for r in dev)


def test_lowest_constraints_are_the_declared_floors():
    pins = {}
    for line in (ROOT / "tests" / "compat" / "lowest-py38.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    floors = {}
    for requirement in _list(_table("[project]"), "dependencies") + [
            r for key in ("cpu", "gpu", "packaging", "modelgen")
            for r in _list(_table("[project.optional-dependencies]"), key)]:
        floor = re.search(r">=([0-9.]+)", requirement)
        assert floor, f"{requirement} declares no lower bound"
        floors[_name(requirement)] = floor.group(1)
    floors.pop("onnxruntime-gpu")  # its 1.16 floor is exercised through onnxruntime 1.16 (same code, CPU build)

    def norm(v: str) -> tuple[int, ...]:
        parts = [int(p) for p in v.split(".")]
        return tuple(parts + [0] * (3 - len(parts)))

    assert {n: norm(v) for n, v in floors.items()} == {n: norm(pins[n]) for n in floors}


def test_model_build_needs_no_onnx_package(model_files, tmp_path):
    # A device profile has ONNX Runtime but not `onnx`: block the import and build a package from an export.
    code = ("import sys; sys.modules['onnx'] = None\n"
            "from agent.core.package import build_package\n"
            f"p = build_package({str(model_files['anomalib'])!r}, {str(tmp_path / 'pkg')!r}, name='widget')\n"
            "print(p.kind, sorted(p.outputs.items()), 'onnx' in sys.modules and sys.modules['onnx'] is not None)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == (
        "anomalib [('anomaly_map', 'anomaly_map'), ('mask', 'pred_mask'), ('score', 'pred_score')] False")
