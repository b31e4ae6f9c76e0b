"""DirectoryWatcher as Greengrass uses it: component symlinks, removal grace, flush at post-update."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.core.discovery import DirectoryWatcher
from agent.core.lifecycle import ModelRegistry, RegistrySettings
from agent.core.package import build_package
from agent.runtime.onnx import OnnxRuntime, OnnxRuntimeOptions
from agent.tools.modelgen import build_anomalib_v2


class Registry(ModelRegistry):
    """The real registry (models stay STOPPED: nothing is loaded)."""

    def __init__(self) -> None:
        super().__init__(OnnxRuntime(OnnxRuntimeOptions(providers=("cpu",))), RegistrySettings())

    @property
    def last(self) -> dict:
        return {name: self.package(name) for name in self.names()}

    def wait_gone(self, name: str, timeout: float = 5.0) -> None:
        """Removals run on the watcher's removal thread (a drain must not hold up scans)."""
        deadline = time.monotonic() + timeout
        while name in self.names():
            assert time.monotonic() < deadline, f"{name} was not removed"
            time.sleep(0.01)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("unarchived")
    onnx = build_anomalib_v2(root / "src" / "model.onnx", image_size=(32, 32))
    out = {}
    for version in ("1.0.0", "1.1.0"):
        # Same name in the manifest on purpose: the component (link) name is what counts.
        out[version] = root / version / "pkg"
        build_package(onnx, out[version], name="from-manifest", model_version=version)
    yield out


def publish(models: Path, name: str, target: Path) -> None:
    """What the model component's Install step does: ln -sfn to a hidden name, then rename over."""
    models.mkdir(exist_ok=True)
    tmp = models / f".{name}.tmp"
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, models / name)


def watcher(models: Path, registry: Registry, clock: Clock) -> DirectoryWatcher:
    return DirectoryWatcher(models, registry, 1.0, removal_grace_s=60.0, name_from_entry=True,
                            prune_dangling_links=True, clock=clock)


def test_link_name_is_the_model_name_and_a_new_target_is_a_new_version(tmp_path: Path,
                                                                       versions: dict[str, Path]) -> None:
    registry, clock = Registry(), Clock()
    w = watcher(tmp_path / "models", registry, clock)
    publish(tmp_path / "models", "com.example.M", versions["1.0.0"])
    w.scan()
    first = registry.last["com.example.M"]
    assert first.root == versions["1.0.0"].resolve() and first.model_version == "1.0.0"
    publish(tmp_path / "models", "com.example.M", versions["1.1.0"])
    w.scan()
    second = registry.last["com.example.M"]
    assert second.model_version == "1.1.0" and second.fingerprint != first.fingerprint
    assert list(registry.last) == ["com.example.M"]  # the temporary link is never a model


def test_vanished_link_keeps_serving_for_the_grace_period(tmp_path: Path, versions: dict[str, Path]) -> None:
    registry, clock = Registry(), Clock()
    models = tmp_path / "models"
    w = watcher(models, registry, clock)
    publish(models, "com.example.M", versions["1.0.0"])
    w.scan()
    (models / "com.example.M").unlink()  # e.g. a recipe whose Shutdown removes the link before Install
    clock.now += 30
    assert "com.example.M" in w.scan()
    publish(models, "com.example.M", versions["1.1.0"])  # ...and the new version's Install brings it back
    assert w.scan()["com.example.M"].model_version == "1.1.0"
    (models / "com.example.M").unlink()
    w.scan()
    clock.now += 61
    assert w.scan() == {}
    registry.wait_gone("com.example.M")


def test_post_update_flush_removes_at_once_and_prunes_dangling_links(tmp_path: Path,
                                                                     versions: dict[str, Path]) -> None:
    registry, clock = Registry(), Clock()
    models = tmp_path / "models"
    w = watcher(models, registry, clock)
    target = tmp_path / "copy"
    shutil.copytree(versions["1.0.0"], target)
    publish(models, "com.example.M", target)
    w.scan()
    shutil.rmtree(target)  # the nucleus deleted the removed component's artifacts
    assert "com.example.M" in w.scan()  # dangling: grace period first
    assert w.scan(flush_missing=True) == {}
    registry.wait_gone("com.example.M")
    assert not os.path.lexists(models / "com.example.M")
