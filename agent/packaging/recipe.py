"""The model component's Greengrass recipe: built in one place, used by packaging jobs and tests.

Contract with the agent component (docs/packaging.md, "Model component contract"):

* The artifact is ``<Name>-<Version>_greengrass_model_component.zip`` (the LFV/DDA suffix), with
  ``Unarchive: ZIP``; Greengrass unpacks it to ``{artifacts:decompressedPath}/<zip stem>/``, which
  holds the model package at its top level (manifest.json + model files).
* ``Install`` publishes that directory into the agent's models directory as a symlink named after
  the component, replaced atomically (``ln -sfn`` to a hidden temporary name, then ``mv -T``), so
  the agent's watcher never sees a missing or half-written entry and hot-swaps a RUNNING model.
* No Shutdown (and no Run) step, on purpose: an Install-only component ends FINISHED, and the
  nucleus runs a new version's Install without any Shutdown in between (docs/greengrass.md). A
  Shutdown that removed the link would run on restarts that do not re-run Install (an agent
  upgrade restarting its HARD dependents) and orphan the model. A removed component's artifacts
  are deleted by the nucleus; the dangling link is the agent's removal signal.
* The agent is a HARD dependency: that is what makes ``{com.edgeagent.EdgeAgent:work:path}``
  resolvable here (the nucleus interpolates cross-component variables of direct dependencies only).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from agent import __version__
from agent.packaging.versions import compatible_requirement

AGENT_COMPONENT = "com.edgeagent.EdgeAgent"
# Derived from the agent's version (the one constant), so the agent built by default satisfies it.
AGENT_VERSION_REQUIREMENT = compatible_requirement(__version__)
ARTIFACT_SUFFIX = "greengrass_model_component.zip"
RECIPE_FORMAT_VERSION = "2020-01-25"
DEFAULT_PUBLISHER = "edge-agent"
MODELS_SUBDIR = "models"


def artifact_name(component_name: str, component_version: str) -> str:
    """The zip's file name; unique per name and version so one S3 prefix can hold many."""
    return f"{component_name}-{component_version}_{ARTIFACT_SUFFIX}"


def artifact_stem(zip_name: str) -> str:
    """The directory Greengrass unpacks the zip into (file name minus its last extension)."""
    return zip_name[: -len(".zip")] if zip_name.endswith(".zip") else zip_name


def models_dir_variable(agent_component: str = AGENT_COMPONENT) -> str:
    return f"{{{agent_component}:work:path}}/{MODELS_SUBDIR}"


def install_script(component_name: str, stem: str, agent_component: str = AGENT_COMPONENT) -> str:
    """Publish the unpacked package as <agent work>/models/<component_name>, atomically."""
    models = models_dir_variable(agent_component)
    tmp = f"{models}/.{component_name}.tmp"
    return (f'mkdir -p "{models}" && '
            f'ln -sfn "{{artifacts:decompressedPath}}/{stem}" "{tmp}" && '
            f'mv -Tf "{tmp}" "{models}/{component_name}"')


def model_component_recipe(
    *,
    component_name: str,
    component_version: str,
    artifact_uri: str,
    architecture: str,
    os: str = "linux",
    description: str = "",
    publisher: str = DEFAULT_PUBLISHER,
    autostart: bool = False,
    agent_component: str = AGENT_COMPONENT,
    agent_version_requirement: str = AGENT_VERSION_REQUIREMENT,
) -> dict[str, Any]:
    """The recipe (RecipeFormatVersion 2020-01-25) of a model component.

    artifact_uri is where the zip lives (``s3://bucket/prefix/<artifact_name(...)>``); its last
    path segment must end with ``greengrass_model_component.zip``. architecture is Greengrass's
    name (``aarch64`` | ``amd64``).
    """
    zip_name = artifact_uri.rsplit("/", 1)[-1]
    if not zip_name.endswith(ARTIFACT_SUFFIX):
        raise ValueError(f"artifact {zip_name!r} must end with {ARTIFACT_SUFFIX!r}")
    stem = artifact_stem(zip_name)
    return {
        "RecipeFormatVersion": RECIPE_FORMAT_VERSION,
        "ComponentName": component_name,
        "ComponentVersion": component_version,
        "ComponentDescription": description or f"Model component {component_name} for the edge agent",
        "ComponentPublisher": publisher,
        "ComponentConfiguration": {"DefaultConfiguration": {"Autostart": bool(autostart)}},
        "ComponentDependencies": {
            agent_component: {"VersionRequirement": agent_version_requirement, "DependencyType": "HARD"},
        },
        "Manifests": [{
            "Platform": {"os": os, "architecture": architecture},
            "Lifecycle": {
                "Install": {"Script": install_script(component_name, stem, agent_component)},
            },
            "Artifacts": [{
                "URI": artifact_uri,
                "Unarchive": "ZIP",
                # Read: ALL so the agent (another component, maybe another user) can read the files.
                "Permission": {"Read": "ALL", "Execute": "NONE"},
            }],
        }],
    }


def render_json(recipe: Mapping[str, Any]) -> str:
    return json.dumps(recipe, indent=2) + "\n"


def render_yaml(recipe: Mapping[str, Any]) -> str:
    import yaml

    # sort_keys=False keeps the documented order (RecipeFormatVersion first); width avoids folding scripts.
    return str(yaml.safe_dump(dict(recipe), sort_keys=False, default_flow_style=False, width=100000))
