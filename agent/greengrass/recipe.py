"""The agent component's recipe (recipe.yaml at the repository root), kept in step with AgentConfig.

recipe.yaml is written by hand (it carries comments and the lifecycle scripts), but two parts of
it are derived from AgentConfig and checked against it by the tests and `scripts/build-component
--check`, so they cannot drift:

* `ComponentConfiguration.DefaultConfiguration`: every AgentConfig Greengrass key at its default
  (`default_configuration()`), plus the recipe-only install key `UseSystemOnnxRuntime`.
* the Run step's `Setenv`: every key whose live change needs a restart, passed as its
  EDGE_AGENT_* variable (`setenv()`). Interpolating those keys into the lifecycle makes the
  nucleus restart the component when one of them changes, so they do take effect; keys that apply
  live are not interpolated (that would restart the agent on every change) and come over IPC.

`render()` turns it into the recipe that is deployed (scripts/build-component): version and artifact
URIs filled in, the wheelhouse artifact of an offline build added to each manifest, comments dropped
(nucleus lite reads a recipe into an 8,196-byte buffer: `check_size()`), and checks that it keeps the
rules both nuclei share (`both_nuclei_problems()`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.config import ENV_PREFIX, AgentConfig, _snake
from agent.greengrass import COMPONENT_NAME

#: Keys the recipe has that AgentConfig does not: they steer the Install step (install.sh) only.
#: UseSystemOnnxRuntime: use a system-wide ONNX Runtime (JetPack's NVIDIA wheel) and install none;
#: InstallProfile: otherwise the extra that brings ONNX Runtime, "cpu" (onnxruntime) or "gpu" (onnxruntime-gpu).
INSTALL_KEYS: dict[str, Any] = {"UseSystemOnnxRuntime": False, "InstallProfile": "cpu"}
VERSION_PLACEHOLDER = "@COMPONENT_VERSION@"
WHEEL_URI_PLACEHOLDER = "@WHEEL_URI@"
INSTALL_URI_PLACEHOLDER = "@INSTALL_URI@"
PLATFORMS = (("linux", "aarch64"), ("linux", "amd64"))
#: Greengrass architecture name -> the machine name wheels and `uname -m` use.
MACHINES = {"aarch64": "aarch64", "amd64": "x86_64"}
#: The Install step, shipped as an artifact (agent/greengrass/install.sh).
INSTALL_SCRIPT = Path(__file__).with_name("install.sh")
#: Nucleus lite's recipe-runner and ggdeploymentd read a recipe into an 8,196-byte buffer; a larger one fails
#: the deployment. Keep a margin for longer bucket names and versions than the ones a build was checked with.
LITE_RECIPE_BUFFER = 8196
MAX_RECIPE_BYTES = 7168
__all__ = ["COMPONENT_NAME", "default_configuration", "setenv", "render", "INSTALL_KEYS", "PLATFORMS",
           "MACHINES", "wheelhouse_name", "check_size", "both_nuclei_problems", "MAX_RECIPE_BYTES"]


def _recipe_value(key: str, value: Any) -> Any:
    if key == "WorkDir":
        return ""  # under Greengrass: the component's work dir (AgentConfig's default is a home-dir path)
    if key == "SocketMode":
        return f"0{value:o}"  # octal as text: a JSON number 432 would not read as a mode
    if isinstance(value, tuple):
        return ",".join(value)
    return value


def default_configuration() -> dict[str, Any]:
    """DefaultConfiguration as recipe.yaml must have it: AgentConfig's keys at their defaults."""
    doc = {f.metadata["key"]: _recipe_value(f.metadata["key"], f.default) for f in dataclasses.fields(AgentConfig)}
    doc.update(INSTALL_KEYS)
    return doc


def env_name(key: str) -> str:
    return ENV_PREFIX + _snake(key).upper()


def setenv() -> dict[str, str]:
    """The Run step's Setenv: the restart-only keys, interpolated from the configuration."""
    return {env_name(key): f"{{configuration:/{key}}}" for key, f in AgentConfig.keys().items()
            if f.metadata["restart"]}


def wheelhouse_name(machine: str) -> str:
    """The offline wheelhouse artifact of one machine (x86_64 | aarch64)."""
    return f"edge_agent-wheelhouse-{machine}.zip"


def render(template: str, version: str, wheel_uri: str, install_uri: str = "",
           wheelhouse_uris: Mapping[str, str] | None = None) -> str:
    """The recipe as deployed: recipe.yaml with its version and artifact URIs filled in and, per manifest,
    the wheelhouse zip of its machine when `wheelhouse_uris` (machine -> URI) has one; without comments.

    install_uri defaults to install.sh beside the wheel."""
    import yaml

    install_uri = install_uri or f"{wheel_uri.rsplit('/', 1)[0]}/{INSTALL_SCRIPT.name}"
    text = (template.replace(VERSION_PLACEHOLDER, version).replace(WHEEL_URI_PLACEHOLDER, wheel_uri)
            .replace(INSTALL_URI_PLACEHOLDER, install_uri))
    recipe = yaml.safe_load(text)
    for manifest in recipe["Manifests"]:
        uri = (wheelhouse_uris or {}).get(MACHINES.get(manifest["Platform"].get("architecture", ""), ""))
        if uri:
            manifest["Artifacts"].append({"Uri": uri, "Unarchive": "ZIP",
                                          "Permission": {"Read": "OWNER", "Execute": "NONE"}})
    # width: never fold a long Script line (a folded plain scalar reads back the same, but stays legible).
    return "---\n" + str(yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False, width=100000))


def check_size(rendered: str, limit: int = MAX_RECIPE_BYTES) -> str:
    """'' if the rendered recipe fits nucleus lite with margin, else why not."""
    size = len(rendered.encode())
    if size > limit:
        return (f"the rendered recipe is {size} bytes; nucleus lite reads at most {LITE_RECIPE_BUFFER} and this "
                f"build allows {limit} (margin for longer URIs): shorten recipe.yaml")
    return ""


_VARIABLE = re.compile(r"\{[\w.-]+(?::[^{}\s:]*)+\}")  # {namespace:key} or {component:namespace:key}


def both_nuclei_problems(recipe: Mapping[str, Any]) -> list[str]:
    """Where a parsed recipe breaks a rule that nucleus lite enforces and the classic nucleus shares
    (docs/greengrass.md, "One recipe for both nuclei")."""
    problems = []
    for i, manifest in enumerate(recipe.get("Manifests", [])):
        where = f"Manifests[{i}] ({manifest.get('Platform', {}).get('architecture')})"
        if manifest.get("Platform", {}).get("runtime") not in ("*", "aws_nucleus_lite"):
            problems.append(f"{where}: Platform.runtime must be \"*\" (lite skips a manifest without it)")
        for phase, step in manifest.get("Lifecycle", {}).items():
            if phase != phase.lower():
                problems.append(f"{where}: lifecycle phase {phase!r} must be lowercase (lite ignores it)")
            if not isinstance(step, dict):
                problems.append(f"{where}: {phase} must be a mapping with Script")
                continue
            for key, value in [("Script", step.get("Script", "")), *step.get("Setenv", {}).items()]:
                if "{" in _VARIABLE.sub("", str(value)) or "}" in _VARIABLE.sub("", str(value)):
                    problems.append(f"{where}: {phase} {key} has a `{{` that is not a recipe variable (lite "
                                    "reads every `{` as one)")
                for var in _VARIABLE.findall(str(value)):
                    if var.count(":") > 1 and not var.startswith("{configuration:"):
                        problems.append(f"{where}: {phase} {key} uses the cross-component variable {var} (lite "
                                        "has none)")
        for artifact in manifest.get("Artifacts", []):
            if "Uri" not in artifact:
                problems.append(f"{where}: artifact {artifact} must spell its URI key `Uri` (lite)")
    return problems
