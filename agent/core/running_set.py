"""Which models should be RUNNING survives agent restarts (kill -9, crash, nucleus restart, upgrade).

LFV's agent keeps started models running across restarts; clients don't call StartModel again.
`RunningModels` is a RegistryListener that records the names of the models asked to run (started:
STARTING or RUNNING, by StartModel, autostart or this set) in `<WorkDir>/running-models.json`, and
on the next start starts each recorded model as soon as discovery first reports it (model
components may publish their packages after the agent is up; a package may still be being copied).
A StopModel or the model's removal takes it out; the agent's own shutdown does not (`freeze()`).
Both modes use it: standalone (`--models-dir`) and Greengrass, where it can also ask the model
component's own configuration (`Autostart`) whether a new model should start. One work dir belongs
to one agent: two agents sharing it would share (and overwrite) the set.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agent.core.lifecycle import ModelInfo, ModelRegistry, ModelStatus
from agent.errors import AgentError

log = logging.getLogger(__name__)

STATE_FILE = "running-models.json"


class RunningModels:
    """RegistryListener persisting the set of models asked to run; `freeze()` before shutdown, so the
    agent stopping its models on the way out does not erase what must run again."""

    def __init__(self, path: Path, registry: ModelRegistry,
                 component_autostart: Callable[[str], bool] | None = None) -> None:
        """`component_autostart(name)` says whether a newly seen model should start (it may do IPC:
        it runs on a worker thread, never on the discovery or request path)."""
        self.path = path
        self._registry = registry
        self._component_autostart = component_autostart
        self._lock = threading.Lock()
        self._running = self._read()
        self._restore = set(self._running)  # recorded names not yet seen by this process
        self._seen: set[str] = set()
        self._frozen = False
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-autostart")
        if self._restore:
            log.info("models that were RUNNING before the restart start again when found: %s",
                     ", ".join(sorted(self._restore)))

    @property
    def names(self) -> set[str]:
        with self._lock:
            return set(self._running)

    def _read(self) -> set[str]:
        try:
            doc = json.loads(self.path.read_text())
            return {str(n) for n in doc.get("running", [])}
        except FileNotFoundError:
            return set()
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("ignoring unreadable %s (%s): no model is restarted", self.path, exc)
            return set()

    def _write(self) -> None:
        # Atomic replace: a crash mid-write leaves the previous file, never a torn one.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"running": sorted(self._running)}) + "\n")
        os.replace(tmp, self.path)

    def _update(self, name: str, running: bool) -> None:
        with self._lock:
            if self._frozen or (name in self._running) == running:
                return
            (self._running.add if running else self._running.discard)(name)
            try:
                self._write()
            except OSError as exc:
                log.error("cannot record running models in %s: %s", self.path, exc.strerror or exc)

    def freeze(self) -> None:
        """Stop recording: the shutdown that follows stops every model, which is not a client's choice."""
        with self._lock:
            self._frozen = True
        self._worker.shutdown(wait=False, cancel_futures=True)

    # -- RegistryListener -----------------------------------------------------------------------
    def on_status(self, info: ModelInfo) -> None:
        name = info.name
        with self._lock:
            first_sight = name not in self._seen
            self._seen.add(name)
            restore = first_sight and name in self._restore
            self._restore.discard(name)
        if info.status in (ModelStatus.STARTING, ModelStatus.RUNNING):
            self._update(name, True)  # asked to run: a load that fails (FAILED) is tried again after a restart
        elif info.status == ModelStatus.STOPPING or (info.status == ModelStatus.STOPPED and not first_sight):
            self._update(name, False)  # a StopModel (or a removal): don't bring it back after a restart
        if first_sight and info.status == ModelStatus.STOPPED:
            if restore or self._component_autostart is not None:
                try:
                    self._worker.submit(self._maybe_start, name, restore)
                except RuntimeError:  # frozen: shutting down
                    pass

    def on_loaded(self, info: ModelInfo, load_seconds: float, warmup_seconds: float) -> None:
        pass

    def on_swap(self, info: ModelInfo, ok: bool, reason: str) -> None:
        pass

    def on_removed(self, name: str) -> None:
        self._update(name, False)
        with self._lock:
            self._seen.discard(name)  # a later component of that name is a new model

    def _maybe_start(self, name: str, restore: bool) -> None:
        why = "it was RUNNING before the restart" if restore else ""
        if not why and self._component_autostart is not None:
            try:
                if self._component_autostart(name):
                    why = "its component configuration says Autostart"
            except Exception as exc:  # IPC down: the model stays STOPPED, a client can start it
                log.warning("model %s: cannot read its component's Autostart setting: %s", name,
                            getattr(exc, "message", None) or exc)
        if not why:
            return
        try:
            self._registry.start(name)
            log.info("model %s starting: %s", name, why)
        except AgentError:
            pass  # already starting/running (package or Autostart key said so), or removed meanwhile
