"""The package layout keeps its promises: the core is transport-neutral, and commands import only what they use."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOREIGN = ("grpc", "prometheus_client", "awsiot", "awscrt", "boto3", "botocore", "yaml")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_core_and_runtime_import_no_transport_or_tooling():
    offenders = {}
    for folder in ("core", "runtime"):
        for path in sorted((ROOT / "agent" / folder).rglob("*.py")):
            bad = sorted(n for n in _imports(path) if n.split(".")[0] in FOREIGN
                         or n.startswith(("agent.serving", "agent.greengrass", "agent.packaging", "agent.tools",
                                          "agent.cli", "agent.app")))
            if bad:
                offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}


def test_core_reaches_the_runtime_only_through_its_interface():
    """The core uses agent.runtime.base (load / predict / unload); ONNX Runtime itself is the composition root's
    and the adapters' choice (what building a package asks of it is injected: build_package(probe=...))."""
    offenders = {}
    for path in sorted((ROOT / "agent" / "core").rglob("*.py")):
        bad = sorted(n for n in _imports(path) if n.split(".")[0] in ("onnxruntime", "onnx")
                     or n.startswith("agent.runtime.") and n != "agent.runtime.base")
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}


def _modules_after(argv: list[str]) -> set[str]:
    code = ("import sys; from agent.cli import build_parser; build_parser(sys.argv[1:]); "
            "print('\\n'.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, check=True)
    return set(out.stdout.split())


def test_cli_imports_only_the_chosen_command():
    help_modules = _modules_after(["--help"])
    assert not {m for m in help_modules if m.startswith(("agent.tools", "agent.packaging", "agent.app", "grpc",
                                                          "numpy", "onnxruntime", "boto3", "yaml"))}
    serve_modules = _modules_after(["serve"])
    assert "agent.cli.serve" in serve_modules
    assert not {m for m in serve_modules if m.startswith(("agent.tools", "agent.packaging", "agent.client",
                                                           "boto3", "yaml", "onnx"))}
    packaging = _modules_after(["start-model-packaging-job"])
    assert "agent.packaging.cli" in packaging and "agent.tools.bench.benchmark" not in packaging
