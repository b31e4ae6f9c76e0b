"""The agent component's recipe (recipe.yaml at the repository root), kept in step with AgentConfig.

recipe.yaml is written by hand (it carries comments and the lifecycle scripts), but two parts of
it are derived from AgentConfig and checked against it by the tests and `scripts/build-component
--check`, so they cannot drift:

* `ComponentConfiguration.DefaultConfiguration`: every AgentConfig Greengrass key at its default
  (`default_configuration()`), plus the recipe-only install keys `UseSystemOnnxRuntime` and `InstallProfile`.
* the Run step's `Setenv`: every key whose live change needs a restart, passed as its
  EDGE_AGENT_* variable (`setenv()`). Interpolating those keys into the lifecycle makes the
  nucleus restart the component when one of them changes, so they do take effect; keys that apply
  live are not interpolated (that would restart the agent on every change) and come over IPC.

`render()` fills in the version and the wheel's URI (scripts/build-component).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.config import ENV_PREFIX, AgentConfig, _snake
from agent.greengrass import COMPONENT_NAME

#: Keys the recipe has that AgentConfig does not: they steer the Install step only.
#: UseSystemOnnxRuntime: use a system-wide ONNX Runtime (JetPack's NVIDIA wheel) and install none;
#: InstallProfile: otherwise the extra that brings ONNX Runtime, "cpu" (onnxruntime) or "gpu" (onnxruntime-gpu).
INSTALL_KEYS: dict[str, Any] = {"UseSystemOnnxRuntime": False, "InstallProfile": "cpu"}
VERSION_PLACEHOLDER = "@COMPONENT_VERSION@"
WHEEL_URI_PLACEHOLDER = "@WHEEL_URI@"
PLATFORMS = (("linux", "aarch64"), ("linux", "amd64"))
__all__ = ["COMPONENT_NAME", "default_configuration", "setenv", "render", "INSTALL_KEYS", "PLATFORMS"]


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


def render(template: str, version: str, wheel_uri: str) -> str:
    """recipe.yaml with its version and artifact URI filled in."""
    return template.replace(VERSION_PLACEHOLDER, version).replace(WHEEL_URI_PLACEHOLDER, wheel_uri)
