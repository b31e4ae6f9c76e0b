"""Checks behind `edge-agent deploy --local`: the command it prints must work.

greengrass-cli (and nucleus lite's ggl-cli) take one recipe directory and one artifact directory,
and find a recipe only as ``<Name>-<Version>.yaml|.yml|.json`` there. So before printing the
command: every component named must be in the local store (``$EDGE_AGENT_HOME/greengrass``), the
agent version merged along must be there too (imported from a `scripts/build-component` output
with ``--agent-build``), and that agent version must satisfy what each model component requires
of it, or Greengrass refuses the deployment in dependency resolution.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.packaging.errors import ResourceNotFoundException, ValidationException
from agent.packaging.recipe import AGENT_COMPONENT
from agent.packaging.versions import parse_version, satisfies

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


def recipes_dir(home: Path) -> Path:
    return home / "greengrass" / "recipes"


def artifacts_dir(home: Path) -> Path:
    return home / "greengrass" / "artifacts"


def _load_recipe(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        if path.suffix == ".json":
            recipe = json.loads(text)
        else:
            import yaml

            recipe = yaml.safe_load(text)
    except (OSError, ValueError) as exc:
        raise ValidationException(f"the recipe {path} can't be read: {exc}") from None
    except Exception as exc:  # yaml.YAMLError without importing yaml at module level
        raise ValidationException(f"the recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(recipe, dict):
        raise ValidationException(f"the recipe {path} is not a recipe (a mapping)")
    return recipe


def find_recipe(home: Path, name: str, version: str) -> Path | None:
    for suffix in RECIPE_SUFFIXES:
        path = recipes_dir(home) / f"{name}-{version}{suffix}"
        if path.is_file():
            return path
    return None


def stored_components(home: Path) -> list[str]:
    """NAME=VERSION of every recipe in the local store, for error messages."""
    try:
        files = sorted(p for p in recipes_dir(home).iterdir() if p.suffix in RECIPE_SUFFIXES)
    except OSError:
        return []
    out = []
    for path in files:
        name, sep, version = path.stem.rpartition("-")
        if sep:
            out.append(f"{name}={version}")
    return out


def agent_requirement(recipe: Mapping[str, Any], agent_component: str = AGENT_COMPONENT) -> str | None:
    deps = recipe.get("ComponentDependencies") or {}
    dep = deps.get(agent_component) if isinstance(deps, Mapping) else None
    if isinstance(dep, Mapping) and isinstance(dep.get("VersionRequirement"), str):
        return str(dep["VersionRequirement"])
    return None


def check_agent_version(agent_version: str) -> None:
    """ValidationException unless the agent version is major.minor.patch."""
    try:
        parse_version(agent_version)
    except ValueError:
        raise ValidationException(f"--agent-version {agent_version!r} is not a version (major.minor.patch)") \
            from None


def check_local_deployment(home: Path, components: Mapping[str, str], agent_version: str | None,
                           agent_build: Path | None = None, agent_component: str = AGENT_COMPONENT) -> list[str]:
    """Refuse what greengrass-cli would fail on; returns notes for stderr (e.g. the agent imported)."""
    notes: list[str] = []
    if agent_version is not None:
        check_agent_version(agent_version)
    for name, version in sorted(components.items()):
        path = find_recipe(home, name, version)
        if path is None:
            known = ", ".join(stored_components(home)) or "none"
            raise ResourceNotFoundException(
                f"component {name} version {version} is not in the local component store {recipes_dir(home)} "
                f"(start-model-packaging-job with local output puts components there); it has: {known}")
        requirement = agent_requirement(_load_recipe(path), agent_component)
        if agent_version and requirement and name != agent_component:
            try:
                ok = satisfies(agent_version, requirement)
            except ValueError:
                notes.append(f"can't check {name} {version}'s requirement {requirement!r} on {agent_component}")
                ok = True
            if not ok:
                raise ValidationException(
                    f"component {name} {version} requires {agent_component} {requirement}, which "
                    f"--agent-version {agent_version} does not satisfy: Greengrass would refuse the deployment")
    if agent_version and agent_component not in components and find_recipe(home, agent_component,
                                                                              agent_version) is None:
        if agent_build is None:
            raise ResourceNotFoundException(
                f"the agent component {agent_component} {agent_version} is not in the local component store "
                f"{recipes_dir(home)}: build it with `scripts/build-component` and add --agent-build "
                "greengrass-build (its output folder), or use --no-agent if the device already runs the agent")
        notes.append(import_agent_build(home, agent_build, agent_version, agent_component))
    return notes


def import_agent_build(home: Path, build: Path, version: str, agent_component: str = AGENT_COMPONENT) -> str:
    """Copy a `scripts/build-component` output (recipes/recipe.yaml + artifacts/<name>/<version>/)
    into the local store under the file name greengrass-cli looks for."""
    recipes = sorted(p for p in (build / "recipes").glob("*") if p.suffix in RECIPE_SUFFIXES) \
        if (build / "recipes").is_dir() else []
    found = []
    for path in recipes:
        recipe = _load_recipe(path)
        if recipe.get("ComponentName") == agent_component:
            found.append((str(recipe.get("ComponentVersion")), path))
    match = [path for v, path in found if v == version]
    if not match:
        have = ", ".join(v for v, _ in found) or "no agent recipe"
        raise ValidationException(f"--agent-build {build} holds {have}, not {agent_component} {version} "
                                  "(build it with `scripts/build-component`, or pass its version as --agent-version)")
    source_artifacts = build / "artifacts" / agent_component / version
    if not source_artifacts.is_dir():
        raise ValidationException(f"--agent-build {build} has no artifacts folder {source_artifacts}")
    dest_artifacts = artifacts_dir(home) / agent_component / version
    dest_artifacts.mkdir(parents=True, exist_ok=True)
    for item in source_artifacts.iterdir():
        if item.is_file():
            shutil.copyfile(item, dest_artifacts / item.name)
    recipes_dir(home).mkdir(parents=True, exist_ok=True)
    dest = recipes_dir(home) / f"{agent_component}-{version}{match[0].suffix}"
    # The recipe last: its presence is what makes the component present in the store.
    shutil.copyfile(match[0], dest)
    return f"imported {agent_component} {version} from {build} into {recipes_dir(home).parent}"
