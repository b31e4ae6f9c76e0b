"""Admission: the one place that decides whether a DetectAnomalies request runs, waits or is refused.

Two bounds, both checked before a request waits for anything:

* `Capacity` is server-wide: how many DetectAnomalies requests may be admitted (running or queued) at
  once over all models. The composition root sizes it below the gRPC worker pool, so that a request
  waiting here always holds a worker it was given, nothing queues invisibly in front of the agent, and
  some workers always stay free for StartModel/StopModel/DescribeModel/ListModels and health checks.
* `Gate` is per model: `concurrency` requests run, up to `queue` wait in FIFO order, the rest are
  refused at once (RESOURCE_EXHAUSTED).

Both honour the caller: a request whose caller has gone (cancelled, disconnected) is not run, and one
whose deadline passes while it waits, or that cannot finish before its deadline even on the fastest
recent run time, is refused with DEADLINE_EXCEEDED instead of being run for nobody.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from agent.core.pipeline import Clock
from agent.errors import CallCancelled, DeadlineExceeded, Overloaded

#: How often a queued request looks whether its caller is still there (a cancelled call has no
#: other way to wake a thread blocked here).
POLL_S = 0.05
#: Run times remembered per model; their minimum is the lower bound used for "cannot finish in time".
HISTORY = 16


class Caller(Protocol):
    """What admission needs to know about the caller; grpc.ServicerContext has both methods."""

    def time_remaining(self) -> float | None: ...

    def is_active(self) -> bool: ...


class Capacity:
    """A server-wide count of admitted requests with a hard limit (no waiting: full means refuse)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"capacity must be >= 1, got {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self.used = 0

    def take(self) -> bool:
        with self._lock:
            if self.used >= self.limit:
                return False
            self.used += 1
            return True

    def give(self) -> None:
        with self._lock:
            self.used -= 1


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.granted = False


class Gate:
    """Per-model admission: `concurrency` requests run, up to `queue` wait (FIFO), the rest are refused.

    A freed slot is handed straight to the longest-waiting request, so a newcomer can't overtake the
    queue and a request's place in it is what the deadline estimate assumes.
    """

    def __init__(self, concurrency: int, queue: int, capacity: Capacity | None = None) -> None:
        self.concurrency = concurrency
        self.queue = queue
        self._capacity = capacity
        self._lock = threading.Lock()
        self._free = concurrency
        self._waiters: deque[_Waiter] = deque()
        self._runs: deque[float] = deque(maxlen=HISTORY)
        self.active = 0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def fastest_run(self) -> float | None:
        """The shortest of the recent run times (seconds), or None before the first run."""
        with self._lock:
            return min(self._runs) if self._runs else None

    @contextmanager
    def slot(self, clock: Clock, caller: Caller | None = None) -> Iterator[float]:
        """Run the body in one of the model's slots; yields the seconds spent waiting for it.

        Raises Overloaded (queue or server full), DeadlineExceeded (the deadline passed while waiting,
        or leaves less than the fastest recent run) or CallCancelled (the caller is gone); in each case
        nothing was run."""
        if caller is not None and not caller.is_active():
            raise CallCancelled("the caller went away before the request was admitted; not run")
        waiter = self._admit(caller)
        waited = 0.0
        if waiter is not None:
            start = clock()
            self._wait(waiter, caller)
            waited = clock() - start
        # A slot is ours now; one last look at the caller before spending it.
        try:
            self._check_still_worth_running(caller)
        except BaseException:
            self._release(None)
            raise
        began = clock()
        ran: float | None = None
        try:
            yield waited
            ran = clock() - began
        finally:
            self._release(ran)

    # -- internals -----------------------------------------------------------------------------
    def _admit(self, caller: Caller | None) -> _Waiter | None:
        with self._lock:
            if self._free > 0:
                self._take_capacity()
                self._free -= 1
                self.active += 1
                return None
            if len(self._waiters) >= self.queue:
                raise Overloaded(f"the model's request queue is full ({self.queue} waiting, {self.active} "
                                 "running): the agent can't keep up with the rate of DetectAnomalies calls; "
                                 "retry later or raise MaxQueuedRequests")
            self._check_deadline(caller, ahead=len(self._waiters))
            self._take_capacity()
            waiter = _Waiter()
            self._waiters.append(waiter)
            return waiter

    def _take_capacity(self) -> None:
        if self._capacity is not None and not self._capacity.take():
            raise Overloaded(f"the agent is already handling {self._capacity.limit} DetectAnomalies calls "
                             "(its limit, set by GrpcWorkers); retry later")

    def _check_deadline(self, caller: Caller | None, ahead: int) -> None:
        """Refuse if the caller's deadline leaves less time than the requests ahead plus this one need,
        at the fastest recent run time (a lower bound: a refused request could not have made it)."""
        if caller is None or not self._runs:
            return
        remaining = caller.time_remaining()
        if remaining is None:
            return
        fastest = min(self._runs)
        needed = (ahead // self.concurrency + 1) * fastest
        if remaining < needed:
            raise DeadlineExceeded(f"the call's deadline leaves {max(remaining, 0.0):.3f}s, but with {ahead} "
                                   f"request(s) queued ahead it needs at least {needed:.3f}s (runs take "
                                   f"{fastest:.3f}s or more); not run")

    def _wait(self, waiter: _Waiter, caller: Caller | None) -> None:
        while not waiter.event.wait(POLL_S if caller is not None else None):
            assert caller is not None
            try:
                if not caller.is_active():
                    raise CallCancelled("the caller went away while the request waited for a slot; not run")
                remaining = caller.time_remaining()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded("the call's deadline passed while the request waited for one of the "
                                           "model's inference slots; not run")
                with self._lock:
                    ahead = self._waiters.index(waiter) if not waiter.granted else 0
                    if not waiter.granted:
                        self._check_deadline(caller, ahead)
            except BaseException:
                with self._lock:
                    if not waiter.granted:
                        self._waiters.remove(waiter)
                        if self._capacity is not None:
                            self._capacity.give()
                        raise
                # Granted between the check and the lock: the slot is ours, give it back properly.
                self._release(None)
                raise

    def _check_still_worth_running(self, caller: Caller | None) -> None:
        if caller is None:
            return
        if not caller.is_active():
            raise CallCancelled("the caller went away while the request waited for a slot; not run")
        remaining = caller.time_remaining()
        if remaining is None:
            return
        fastest = self.fastest_run()
        if remaining <= 0 or (fastest is not None and remaining < fastest):
            raise DeadlineExceeded(f"the call's deadline leaves {max(remaining, 0.0):.3f}s, less than the "
                                   f"fastest recent run ({fastest or 0.0:.3f}s); not run")

    def _release(self, ran: float | None) -> None:
        with self._lock:
            if ran is not None:
                self._runs.append(ran)
            self.active -= 1
            if self._capacity is not None:
                self._capacity.give()
            if self._waiters:
                waiter = self._waiters.popleft()
                waiter.granted = True
                self.active += 1
                waiter.event.set()
            else:
                self._free += 1
