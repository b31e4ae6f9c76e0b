"""Standalone model discovery: every package directory under --models-dir is a model component.

Polled (no inotify dependency): a scan reads manifests and file stats only, so it is cheap.
A package that fails to parse — typically one still being copied — is reported once and the
model keeps whatever it had; only a directory that disappears removes its model.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from .errors import PackageError
from .model_package import MANIFEST, ModelPackage, load_package
from .registry import ModelRegistry

log = logging.getLogger(__name__)


class DirectoryWatcher:
    def __init__(self, root: Path, registry: ModelRegistry, interval_s: float) -> None:
        self.root = root
        self.registry = registry
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._known: dict[str, ModelPackage] = {}
        self._reported: set[str] = set()

    def scan(self) -> dict[str, ModelPackage]:
        """One pass: returns name → package and applies it to the registry."""
        found: dict[str, ModelPackage] = {}
        dirs_seen: set[str] = set()
        try:
            entries = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        except FileNotFoundError:
            entries = []
            self._report(str(self.root), f"models directory {self.root} does not exist (yet)")
        for directory in entries:
            if not (directory / MANIFEST).exists():
                continue
            dirs_seen.add(directory.name)
            try:
                package = load_package(directory)
            except PackageError as exc:
                self._report(f"{directory}:{exc.message}", f"model package {directory.name} skipped: {exc.message}")
                previous = self._known.get(directory.name)
                if previous is not None:
                    found[previous.name] = previous  # keep serving what worked until the copy is complete
                continue
            if package.name in found:
                self._report(f"dup:{package.name}", f"model package {directory} names model {package.name!r}, "
                                                    "already taken by another directory; ignored")
                continue
            found[package.name] = package
            self._known[directory.name] = package
        for gone in set(self._known) - dirs_seen:
            del self._known[gone]
        self.registry.sync(found)
        return found

    def _report(self, key: str, message: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.warning(message)

    def start(self) -> None:
        self.scan()
        self._thread = threading.Thread(target=self._run, name="model-discovery", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.scan()
            except Exception:  # keep watching whatever one scan hit
                log.exception("model discovery scan failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
