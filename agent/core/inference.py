"""The DetectAnomalies use case, transport-neutral: request in, Detection out.

Order of checks: the model must exist and be RUNNING (the request then holds that version until
it is done, whatever happens to the model meanwhile), then the bitmap must be valid (and, from
shared memory, readable by the agent), then a mask segment must be writable; then the request is
admitted (agent/core/admission.py: run now, wait in the model's bounded queue, or be refused; never
run for a caller that has gone or whose deadline it can't meet), runs, and the mask goes back
inline or into the caller's shared-memory segment.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Protocol

from agent.core.admission import Caller
from agent.core.frames import SharedMemory, ShmHandle, as_image, check_size
from agent.core.lifecycle import ModelRegistry, RunningModel
from agent.core.masks import MaskPolicy
from agent.core.pipeline import Clock, Detection
from agent.core.resize import Frame
from agent.errors import InvalidInput


@dataclass(frozen=True)
class DetectRequest:
    model: str
    width: int
    height: int
    data: bytes | memoryview | None = None  # RGB888 rows (a memoryview of the received request: no copy)
    shm: ShmHandle | None = None
    mask_shm: ShmHandle | None = None


class DetectObserver(Protocol):
    """Metrics hook: called once per request that reached a running model."""

    def on_detect(self, model: str, version: str, detection: Detection | None, queue_wait: float,
                  read_seconds: float, pixels: int) -> None: ...


_FULL = MaskPolicy(inline="full")


class InferenceService:
    def __init__(self, registry: ModelRegistry, *, clock: Clock = time.perf_counter,
                 observer: DetectObserver | None = None, shared_memory: SharedMemory | None = None,
                 mask_policy: MaskPolicy | None = None) -> None:
        self.registry = registry
        self.mask_policy = mask_policy or MaskPolicy()  # inline masks (settings InlineMask*); replaced live
        self.clock = clock
        self.observer = observer
        self.shm = shared_memory or SharedMemory()

    def detect(self, request: DetectRequest, caller: Caller | None = None) -> Detection:
        """Run one request. `caller` (the gRPC context) gives its deadline and whether it is still there."""
        if not request.model:
            raise InvalidInput("model_component is empty")
        with self.registry.lease(request.model) as model:
            return self._detect(request, model, caller)

    def _detect(self, request: DetectRequest, model: RunningModel, caller: Caller | None) -> Detection:
        if (request.data is None) == (request.shm is None):
            raise InvalidInput("bitmap has no data: set byte_data or shared_memory_handle")
        check_size(request.width, request.height)
        detection: Detection | None = None
        waited = read = 0.0
        try:
            with ExitStack() as frames:
                t0 = self.clock()
                image: Frame
                if request.shm is not None:
                    # Opened and checked here; its rows are copied into agent-owned buffers (frames.py says
                    # why) by pre-processing, each row band reading its own rows on its own thread.
                    image = frames.enter_context(self.shm.frame_rows(request.shm, request.width, request.height))
                else:
                    assert request.data is not None
                    image = as_image(request.data, request.width, request.height)
                read = self.clock() - t0
                mask = None
                policy = self.mask_policy
                if request.mask_shm is not None:  # opened and access-checked before the model runs
                    policy = _FULL  # the caller's segment always gets the full-size mask
                    mask_w, mask_h = model.predictor.mask_size(request.width, request.height)
                    mask = frames.enter_context(self.shm.mask_target(request.mask_shm, mask_w * mask_h * 3))
                with model.gate.slot(self.clock, caller) as waited:
                    detection = model.predictor.predict(image, mask, policy)  # mask: its rows, not yet written
                if mask is not None and detection.has_mask:
                    mask.commit(detection.mask)  # the mask's rows, or a mask the model made itself
                return detection
        finally:
            if self.observer is not None:
                self.observer.on_detect(model.name, model.version, detection, waited, read,
                                        request.width * request.height)
