"""Admission: how many DetectAnomalies requests one model runs at once, and how many may wait."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from agent.core.pipeline import Clock
from agent.errors import Overloaded


class Gate:
    """Per-model admission: `concurrency` requests run, up to `queue` wait, the rest are refused."""

    def __init__(self, concurrency: int, queue: int) -> None:
        self._slots = threading.Semaphore(concurrency)
        self._queue = queue
        self._cond = threading.Condition()
        self.waiting = 0
        self.active = 0

    @contextmanager
    def slot(self, clock: Clock) -> Iterator[float]:
        """Yields the seconds spent waiting for a slot; raises Overloaded when the queue is full."""
        waited = 0.0
        with self._cond:
            if not self._slots.acquire(blocking=False):
                if self.waiting >= self._queue:
                    raise Overloaded("the model's request queue is full: the agent can't keep up with the rate of "
                                     "DetectAnomalies calls; retry later or raise MaxQueuedRequests")
                self.waiting += 1
                queued = True
            else:
                queued = False
                self.active += 1
        if queued:
            start = clock()
            self._slots.acquire()
            waited = clock() - start
            with self._cond:
                self.waiting -= 1
                self.active += 1
        try:
            yield waited
        finally:
            self._slots.release()
            with self._cond:
                self.active -= 1
                self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until nothing runs or waits; False if that took longer than timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.active == 0 and self.waiting == 0, timeout)
