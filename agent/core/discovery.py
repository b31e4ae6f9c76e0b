"""Model discovery: every package directory (or symlink to one) under a root is a model.

Standalone mode watches --models-dir; under Greengrass the agent watches `<its work dir>/models`,
where each model component's Install step publishes a symlink named after the component
(docs/greengrass.md). Polled (no inotify dependency): a scan reads manifests and file stats only,
so it is cheap.

* A package that fails to parse (typically one still being copied, or a broken new version) is
  reported once and the model keeps whatever it had.
* An entry that vanishes (deleted directory, removed or dangling symlink) removes its model only
  after `removal_grace_s`, so a package being replaced by delete-then-create, or a link briefly
  missing during a deployment, never drops a model that is serving. `scan(flush_missing=True)`
  removes vanished entries at once (after a Greengrass PostComponentUpdateEvent, when a missing
  link means the component is really gone).
* Symlinks are resolved before the package is read, so a package is always the version-specific
  directory the link pointed to at scan time, never a path that may flip under a loading model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.core.lifecycle import ModelRegistry
from agent.core.package import MANIFEST, ModelPackage, load_package
from agent.errors import PackageError

log = logging.getLogger(__name__)


class DirectoryWatcher:
    def __init__(
        self,
        root: Path,
        registry: ModelRegistry,
        interval_s: float,
        *,
        removal_grace_s: float = 0.0,
        name_from_entry: bool = False,
        prune_dangling_links: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`name_from_entry`: the entry's name is the model name (Greengrass: the component name),
        whatever the manifest says. `prune_dangling_links`: delete a symlink whose target is gone once
        its model is removed (the nucleus deleted a removed component's artifacts)."""
        self.root = root
        self.registry = registry
        self.interval_s = interval_s  # read on every loop, so a live config change applies
        self.removal_grace_s = removal_grace_s
        self.name_from_entry = name_from_entry
        self.prune_dangling_links = prune_dangling_links
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._scan_lock = threading.Lock()  # the poll thread and rescan-now callers (IPC events)
        self._known: dict[str, ModelPackage] = {}  # entry name → last package that parsed
        self._missing_since: dict[str, float] = {}  # entry name → when it was first seen missing
        self._reported: set[str] = set()
        self.scans = 0

    def scan(self, flush_missing: bool = False) -> dict[str, ModelPackage]:
        """One pass: returns name → package and applies it to the registry."""
        with self._scan_lock:
            found = self._scan(flush_missing)
            self.registry.sync(found)
            self.scans += 1
            return found

    rescan = scan  # what event handlers call: "look now"

    def _scan(self, flush_missing: bool) -> dict[str, ModelPackage]:
        found: dict[str, ModelPackage] = {}
        present: set[str] = set()
        try:
            entries = sorted(p for p in self.root.iterdir() if not p.name.startswith("."))
        except FileNotFoundError:
            entries = []
            self._report(str(self.root), f"models directory {self.root} does not exist (yet)")
        for entry in entries:
            target = entry.resolve() if entry.is_symlink() else entry
            if not target.is_dir() or not (target / MANIFEST).exists():
                continue  # dangling link, stray file or a directory still being filled: counts as missing
            present.add(entry.name)
            try:
                package = self._load(entry, target)
            except PackageError as exc:
                self._report(f"{target}:{exc.message}", f"model package {entry.name} ({target}) skipped: "
                                                        f"{exc.message}")
                previous = self._known.get(entry.name)
                if previous is not None:
                    found[previous.name] = previous  # keep serving what worked until the new one is complete
                continue
            if package.name in found:
                self._report(f"dup:{package.name}", f"model package {entry} names model {package.name!r}, "
                                                    "already taken by another entry; ignored")
                continue
            found[package.name] = package
            self._known[entry.name] = package
        now = self._clock()
        for entry_name in sorted(set(self._known) - present):
            since = self._missing_since.setdefault(entry_name, now)
            previous = self._known[entry_name]
            if flush_missing or now - since >= self.removal_grace_s:
                log.info("model package %s is gone%s; removing model %s", entry_name,
                         "" if flush_missing else f" for {now - since:.0f}s", previous.name)
                del self._known[entry_name]
                del self._missing_since[entry_name]
                self._prune(self.root / entry_name)
            elif previous.name not in found:
                if since == now:
                    log.warning("model package %s vanished; model %s keeps serving and is removed if it is "
                                "still missing in %.0fs", entry_name, previous.name, self.removal_grace_s)
                found[previous.name] = previous
        for entry_name in present:
            self._missing_since.pop(entry_name, None)
        return found

    def _load(self, entry: Path, target: Path) -> ModelPackage:
        package = load_package(target)
        changes: dict[str, Any] = {}
        if self.name_from_entry and package.name != entry.name:
            self._report(f"name:{entry}", f"model package {entry.name} says its name is {package.name!r}; "
                                          f"serving it as {entry.name!r} (the component name)")
            changes["name"] = entry.name
        if target != entry:
            # Two versions can have byte-identical manifests and models: fold the resolved directory
            # into the fingerprint so a new version (a new directory) is always picked up, and the
            # model never keeps pointing at a directory the nucleus may delete later.
            digest = hashlib.sha256(f"{package.fingerprint}:{target}".encode()).hexdigest()[:16]
            changes["fingerprint"] = digest
        return dataclasses.replace(package, **changes) if changes else package

    def _prune(self, path: Path) -> None:
        if self.prune_dangling_links and path.is_symlink() and not path.exists():
            try:
                path.unlink()
            except OSError as exc:
                log.warning("cannot remove dangling model link %s: %s", path, exc.strerror or exc)

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
