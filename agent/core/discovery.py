"""Model discovery: every package directory (or symlink to one) under a root is a model.

Standalone mode watches --models-dir; under Greengrass the agent watches `<its work dir>/models`,
where each model component's Install step publishes a symlink named after the component
(docs/greengrass.md). Polled (no inotify dependency): a scan reads manifests and file stats only,
so it is cheap. The rules (docs/model-package.md, "Models directory"):

* **What names a model.** Under Greengrass the entry's name (the component name). Standalone, the
  manifest's `name`. One *entry* (a directory or link in the root) owns a model name: the one that
  served it first (at start-up: the entry whose directory name is the model name, else the first in
  sorted order). Another entry naming the same model — a backup copy `models/redness-backup` — is
  a conflict: it is never loaded, the conflict is logged once and shown in the model's
  status_message until one of them is renamed or removed. Only the owning entry updated in place
  (or replaced by a new directory under the same name) swaps the model.
* **Incomplete or broken packages.** A package that fails to parse, cannot be read, or lists a file
  that is not there yet (typically one still being copied, or a broken new version) is reported
  once and the model keeps whatever it had. A standalone directory whose files changed since the
  previous scan is not applied until they stay the same for one scan, so a package being copied is
  not loaded half-written. A model that ended FAILED is started again when its package changes (it
  was asked to run: FAILED only follows a start).
* **Removal.** An entry that vanishes (deleted directory, removed or dangling symlink, a directory
  without manifest.json) removes its model only after `removal_grace_s`, so a package replaced by
  delete-then-copy, or a link briefly missing during a deployment, never drops a model that is
  serving. `scan(flush_missing=True)` removes vanished entries at once (after a Greengrass
  PostComponentUpdateEvent, when a missing link means the component is really gone).
* **Never blocked by a drain.** Removing a RUNNING model drains its in-flight requests (up to
  StopTimeoutSeconds); that runs on a removal thread, outside the scan lock, so scans and
  rescan-now callers (IPC events) never wait behind it.
* Symlinks are resolved before the package is read, so a package is always the version-specific
  directory the link pointed to at scan time, never a path that may flip under a loading model.
* One unreadable entry (permissions, I/O error, symlink loop) is reported once and skipped; it never
  stops the scan of the others, and an unreadable root leaves every model as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from agent.core.lifecycle import ModelRegistry, ModelStatus
from agent.core.package import MANIFEST, ModelPackage, load_package
from agent.errors import AgentError, PackageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conflict:
    """Another entry names a model that `owner` serves; it is ignored until resolved."""

    model: str
    owner: Path
    ignored: Path
    ignored_version: str


class _Unchanged(Exception):
    """An entry that is present but must not be applied this scan (unreadable, incomplete, settling)."""


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
        self._known: dict[str, ModelPackage] = {}  # entry name → last package applied from it
        self._settling: dict[str, str] = {}  # entry name → fingerprint seen once, applied when seen again
        self._missing_since: dict[str, float] = {}  # entry name → when it was first seen missing
        self._owner: dict[str, str] = {}  # model name → the entry that serves it
        self._applied: dict[str, str] = {}  # model name → fingerprint last handed to the registry
        self._reported: dict[str, str] = {}  # problem key → message, logged once while the problem lasts
        self._conflicts: dict[str, list[Conflict]] = {}
        self._entry_problems: dict[str, str] = {}  # entry name → why it can't be applied (this scan)
        self._removing: set[str] = set()
        self._removals = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-removal")
        self.scans = 0

    # -- public ----------------------------------------------------------------------------------
    def scan(self, flush_missing: bool = False) -> dict[str, ModelPackage]:
        """One pass: returns model name → package served, and applies it to the registry (removals of
        vanished models are started here and finish on the removal thread)."""
        with self._scan_lock:
            found = self._scan(flush_missing)
            if found is None:  # the root itself could not be read: change nothing
                return {name: self._known[entry] for name, entry in self._owner.items() if entry in self._known}
            gone = self._apply(found)
            self.scans += 1
        for name in gone:
            try:
                self._removals.submit(self._remove, name)
            except RuntimeError:  # stop() ran: the agent is shutting down and stops every model anyway
                break
        return found

    rescan = scan  # what event handlers call: "look now"

    def conflicts(self) -> dict[str, list[Conflict]]:
        """Model name → the entries that also claim it and are ignored (as of the last scan)."""
        with self._scan_lock:
            return {name: list(items) for name, items in self._conflicts.items()}

    def start(self) -> None:
        try:
            self.scan()
        except Exception:  # a bug in one scan must not keep the agent from serving; the poll retries
            log.exception("model discovery: the first scan of %s failed", self.root)
        self._thread = threading.Thread(target=self._run, name="model-discovery", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._removals.shutdown(wait=False)

    # -- one scan --------------------------------------------------------------------------------
    def _scan(self, flush_missing: bool) -> dict[str, ModelPackage] | None:
        first_scan = self.scans == 0
        seen_problems: set[str] = set()
        self._entry_problems = {}
        try:
            entries = sorted(p for p in self.root.iterdir() if not p.name.startswith("."))
        except FileNotFoundError:
            entries = []
            self._report("root", f"models directory {self.root} does not exist (yet)", seen_problems)
        except OSError as exc:
            self._report("root", f"models directory {self.root} cannot be read ({exc.strerror or exc}); "
                                 "models are kept as they are until it can", seen_problems)
            self._forget_problems(seen_problems)
            return None
        present: set[str] = set()
        candidates: dict[str, ModelPackage] = {}  # entry name → package it offers this scan
        for entry in entries:
            try:
                package = self._read(entry, first_scan, seen_problems)
            except _Unchanged:
                present.add(entry.name)
                previous = self._known.get(entry.name)
                if previous is not None:
                    candidates[entry.name] = previous  # keep serving what worked until the new one is complete
                continue
            if package is None:
                continue  # not a package (yet): counts as missing
            present.add(entry.name)
            candidates[entry.name] = package
            self._known[entry.name] = package

        now = self._clock()
        for entry_name in sorted(set(self._known) - present):
            since = self._missing_since.setdefault(entry_name, now)
            previous = self._known[entry_name]
            owner = self._owner.get(self._model_name(entry_name, previous)) == entry_name
            # The grace protects a model being served; an ignored duplicate that vanishes goes at once.
            if flush_missing or not owner or now - since >= self.removal_grace_s:
                if owner:
                    log.info("model package %s is gone%s; model %s goes with it unless another package "
                             "names it", entry_name, "" if flush_missing or since == now else
                             f" for {now - since:.0f}s", previous.name)
                del self._known[entry_name]
                del self._missing_since[entry_name]
                self._settling.pop(entry_name, None)
                self._prune(self.root / entry_name)
            else:
                if since == now and owner:
                    log.warning("model package %s vanished; model %s keeps serving and is removed if it is "
                                "still missing in %.0fs", entry_name, previous.name, self.removal_grace_s)
                candidates[entry_name] = previous
        for entry_name in present:
            self._missing_since.pop(entry_name, None)
        found = self._resolve_names(candidates, seen_problems)
        self._forget_problems(seen_problems)
        return found

    def _read(self, entry: Path, first_scan: bool, problems: set[str]) -> ModelPackage | None:
        """The entry's package; None if it is not a package (yet); _Unchanged if it is present but
        must not be applied now. Every OSError stays inside this entry."""
        key = f"entry:{entry.name}"
        try:
            is_link = entry.is_symlink()
            target = entry.resolve() if is_link else entry
            if not target.is_dir():
                if is_link and not target.exists():
                    return None  # dangling: the component is gone (or going); the grace decides
                self._report(key + ":file", f"{entry} is not a directory; not a model package (ignored)",
                             problems, level=logging.INFO)
                return None
            if not (target / MANIFEST).exists():
                self._report(key + ":manifest", f"{entry} has no {MANIFEST}; not a model package (yet)",
                             problems, level=logging.INFO)
                return None
            package = self._load(entry, target, problems)
            fingerprint = self._files_fingerprint(package, target)
        except PackageError as exc:
            self._report(f"{key}:{exc.message}", f"model package {entry.name} ({entry}) skipped: {exc.message}",
                         problems)
            self._entry_problems[entry.name] = f"package {entry} skipped: {exc.message}"
            raise _Unchanged from None
        except (OSError, RuntimeError) as exc:  # EACCES, EIO, ELOOP (RuntimeError before Python 3.13)
            reason = getattr(exc, "strerror", None) or str(exc)
            self._report(f"{key}:os:{reason}", f"model package {entry.name} ({entry}) cannot be read: {reason}; "
                                               "skipped until it can", problems)
            self._entry_problems[entry.name] = f"package {entry} cannot be read: {reason}"
            raise _Unchanged from None
        package = dataclasses.replace(package, fingerprint=fingerprint)
        previous = self._known.get(entry.name)
        if previous is not None and previous.fingerprint == fingerprint:
            self._settling.pop(entry.name, None)
            return previous
        if not is_link and not first_scan and self._settling.get(entry.name) != fingerprint:
            # Files changed since the last scan (or are new): wait until they stay the same for one scan,
            # so a package being copied is not loaded half-written. Links are published complete.
            self._settling[entry.name] = fingerprint
            raise _Unchanged
        self._settling.pop(entry.name, None)
        return package

    def _load(self, entry: Path, target: Path, problems: set[str]) -> ModelPackage:
        package = load_package(target)
        if self.name_from_entry and package.name != entry.name:
            self._report(f"name:{entry}", f"model package {entry.name} says its name is {package.name!r}; "
                                          f"serving it as {entry.name!r} (the component name)", problems,
                         level=logging.INFO)
            package = dataclasses.replace(package, name=entry.name)
        return package

    @staticmethod
    def _files_fingerprint(package: ModelPackage, target: Path) -> str:
        """The package's own fingerprint (manifest bytes, model file stat) plus the size and mtime of
        every file it lists and every top-level file, and the resolved directory: a data file still
        being copied, or a new version in a new directory behind the same link, is a change."""
        parts = [package.fingerprint, str(target)]
        listed = {str(rel) for rel in package.checksums}
        for rel in sorted(listed):
            try:
                st = (target / rel).stat()
            except FileNotFoundError:
                raise PackageError(f"file {rel!r} listed in the manifest is not there (yet)") from None
            parts.append(f"{rel}:{st.st_size}:{st.st_mtime_ns}")
        try:  # unlisted files too (a manifest without "files"), as far as the directory can be listed
            with os.scandir(target) as it:
                for item in sorted(it, key=lambda e: e.name):
                    if item.name not in listed and item.is_file(follow_symlinks=False):
                        st = item.stat(follow_symlinks=False)
                        parts.append(f"{item.name}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:  # search-only directory, or a file removed meanwhile: the next scan sees the rest
            parts.append("?")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def _model_name(self, entry_name: str, package: ModelPackage) -> str:
        return entry_name if self.name_from_entry else package.name

    def _resolve_names(self, candidates: dict[str, ModelPackage], problems: set[str]) -> dict[str, ModelPackage]:
        """One entry per model name: the current owner keeps it; a new name goes to the entry named like
        the model, else the first in sorted order. The others are conflicts."""
        claims: dict[str, list[str]] = {}
        for entry_name in sorted(candidates):
            claims.setdefault(self._model_name(entry_name, candidates[entry_name]), []).append(entry_name)
        found: dict[str, ModelPackage] = {}
        owners: dict[str, str] = {}
        conflicts: dict[str, list[Conflict]] = {}
        for name, entry_names in claims.items():
            owner = self._owner.get(name)
            if owner not in entry_names:
                owner = name if name in entry_names else entry_names[0]
            owners[name] = owner
            found[name] = candidates[owner]
            for other in entry_names:
                if other == owner:
                    continue
                ignored = candidates[other]
                conflict = Conflict(name, self.root / owner, self.root / other, ignored.version)
                conflicts.setdefault(name, []).append(conflict)
                self._report(f"conflict:{name}:{other}",
                             f"model package {conflict.ignored} (version {conflict.ignored_version}) also names "
                             f"model {name!r}, which {conflict.owner} serves; it is ignored until one of them is "
                             "renamed or removed", problems)
        for name in set(self._conflicts) - set(conflicts):
            if name in owners:
                log.info("model %s: package name conflict resolved; %s serves it", name, self.root / owners[name])
        self._owner = owners
        self._conflicts = conflicts
        return found

    # -- applying a scan -------------------------------------------------------------------------
    def _apply(self, found: dict[str, ModelPackage]) -> list[str]:
        """Hand new and changed packages to the registry; return the models to remove."""
        registry = self.registry
        known = registry.names()
        gone = sorted(n for n in known - set(found) if n not in self._removing)
        self._removing.update(gone)
        for name in gone:
            self._applied.pop(name, None)
        for name, package in sorted(found.items()):
            previous = self._applied.get(name)
            if name in known and previous == package.fingerprint:
                continue  # nothing new: a failed load or swap of this package is not retried every scan
            registry.upsert(package)
            self._applied[name] = package.fingerprint
            if previous is not None and previous != package.fingerprint and not package.unservable:
                self._restart_if_failed(name)
        for name in found:
            registry.report_package_problem(name, self._problem(name))
        return gone

    def _restart_if_failed(self, name: str) -> None:
        # FAILED only follows a start (StartModel, autostart, the RUNNING set): the package changed, so
        # the start is tried again with it (typically a package first seen half-copied, now complete).
        try:
            if self.registry.describe(name).status == ModelStatus.FAILED:
                log.info("model %s: package changed after a failed start; starting it again", name)
                self.registry.start(name)
        except AgentError:
            pass  # removed or started meanwhile

    def _problem(self, name: str) -> str:
        """What status_message should say about the model's packages: an unreadable update of the served
        location (the previous version keeps serving), other locations claiming the name."""
        parts = []
        owner = self._owner.get(name)
        if owner in self._entry_problems:
            parts.append(f"{self._entry_problems[owner]}; still serving the last package that could be read")
        conflicts = self._conflicts.get(name)
        if conflicts:
            others = ", ".join(f"{c.ignored} (version {c.ignored_version})" for c in conflicts)
            parts.append(f"package conflict: {others} also named {name!r} and ignored; {conflicts[0].owner} is "
                         "served")
        return "; ".join(parts)

    def _remove(self, name: str) -> None:
        try:
            if not self._stop.is_set():
                self.registry.remove(name)
        except Exception:  # a failing removal must not kill the removal thread
            log.exception("model %s: removal failed", name)
        finally:
            with self._scan_lock:
                self._removing.discard(name)

    def _prune(self, path: Path) -> None:
        if self.prune_dangling_links and path.is_symlink() and not path.exists():
            try:
                path.unlink()
            except OSError as exc:
                log.warning("cannot remove dangling model link %s: %s", path, exc.strerror or exc)

    # -- problems are logged once while they last ------------------------------------------------
    def _report(self, key: str, message: str, seen: set[str], level: int = logging.WARNING) -> None:
        seen.add(key)
        if key not in self._reported:
            self._reported[key] = message
            log.log(level, message)

    def _forget_problems(self, seen: set[str]) -> None:
        """Problems not seen in this scan are over: if one comes back it is logged again."""
        for key in [k for k in self._reported if k not in seen]:
            del self._reported[key]

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.scan()
            except Exception:  # keep watching whatever one scan hit
                log.exception("model discovery scan failed")

