"""Admission (agent/core/admission.py) with real threads: bounded FIFO queue, the server-wide capacity,
deadlines and cancelled callers. Every refusal must leave nothing run and every count back at zero."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from agent.core.admission import POLL_S, Capacity, Gate
from agent.errors import CallCancelled, DeadlineExceeded, Overloaded

clock = time.perf_counter


class FakeCaller:
    """The two methods of grpc.ServicerContext admission uses: a deadline and whether the client is there."""

    def __init__(self, timeout: float | None = None) -> None:
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.active = True

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def is_active(self) -> bool:
        return self.active


def hold(gate: Gate, release: threading.Event, started: threading.Event, caller: FakeCaller | None = None,
         log: list[str] | None = None, tag: str = "") -> None:
    with gate.slot(clock, caller):
        if log is not None:
            log.append(tag)
        started.set()
        release.wait(5)


def wait_for(predicate, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_bounded_queue_is_fifo_and_refuses_at_once():
    capacity = Capacity(10)
    gate = Gate(1, 2, capacity)
    release = threading.Event()
    order: list[str] = []
    with ThreadPoolExecutor(3) as pool:
        first = threading.Event()
        futures = [pool.submit(hold, gate, release, first, None, order, "a")]
        first.wait(2)
        for queued, tag in enumerate(("b", "c"), start=1):
            futures.append(pool.submit(hold, gate, release, threading.Event(), None, order, tag))
            wait_for(lambda n=queued: gate.waiting == n)
        assert (gate.active, gate.waiting, capacity.used) == (1, 2, 3)
        t0 = time.monotonic()
        with pytest.raises(Overloaded, match="queue is full"), gate.slot(clock):
            pass
        assert time.monotonic() - t0 < 0.05  # refused at once, not after a wait
        release.set()
        for f in futures:
            f.result(5)
    assert order == ["a", "b", "c"]
    assert (gate.active, gate.waiting, capacity.used) == (0, 0, 0)


def test_capacity_is_shared_by_all_models():
    capacity = Capacity(2)
    gates = [Gate(2, 16, capacity), Gate(2, 16, capacity)]
    release = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        started = [threading.Event(), threading.Event()]
        futures = [pool.submit(hold, gates[i], release, started[i]) for i in range(2)]
        for event in started:
            assert event.wait(2)
        with pytest.raises(Overloaded, match="already handling 2 DetectAnomalies calls"), gates[0].slot(clock):
            pass
        release.set()
        for f in futures:
            f.result(5)
    assert capacity.used == 0


def test_deadline_passing_while_queued_is_not_run():
    gate = Gate(1, 4, Capacity(4))
    release, started = threading.Event(), threading.Event()
    ran = []
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(hold, gate, release, started)
        started.wait(2)
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="deadline passed while the request waited"):
            with gate.slot(clock, FakeCaller(timeout=0.2)):
                ran.append(1)
        assert 0.15 < time.monotonic() - t0 < 0.2 + 3 * POLL_S
        release.set()
        holder.result(5)
    assert ran == [] and (gate.active, gate.waiting) == (0, 0)


def test_request_that_cannot_finish_in_time_is_refused_early():
    gate = Gate(1, 8, Capacity(8))
    with gate.slot(clock):
        time.sleep(0.3)  # the fastest run so far: 0.3 s
    assert gate.fastest_run() >= 0.3
    # Idle gate, 0.2 s left, runs take >= 0.3 s: can't make it.
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="fastest recent run"), gate.slot(clock, FakeCaller(timeout=0.2)):
        pytest.fail("must not run")
    # One running, 0.5 s left: a queued request would need >= 0.6 s (the one ahead + itself).
    release, started = threading.Event(), threading.Event()
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(hold, gate, release, started)
        started.wait(2)
        with pytest.raises(DeadlineExceeded, match="with 0 request"), gate.slot(clock, FakeCaller(timeout=0.5)):
            pytest.fail("must not run")
        release.set()
        holder.result(5)
    assert time.monotonic() - t0 < 1.0  # both refusals were immediate (the holder ran ~0.3 s at most)
    with gate.slot(clock, FakeCaller(timeout=5.0)) as waited:  # enough time: runs
        assert waited == 0.0


def test_cancelled_caller_is_not_run():
    gate = Gate(1, 4, Capacity(4))
    gone = FakeCaller()
    gone.active = False
    with pytest.raises(CallCancelled), gate.slot(clock, gone):
        pytest.fail("must not run")
    # Cancelled while queued: leaves the queue within a poll interval, the slot goes to the next one.
    release, started = threading.Event(), threading.Event()
    leaver = FakeCaller()
    with ThreadPoolExecutor(3) as pool:
        holder = pool.submit(hold, gate, release, started)
        started.wait(2)
        ran: list[str] = []

        def queued(caller: FakeCaller, tag: str) -> None:
            with gate.slot(clock, caller):
                ran.append(tag)

        f1 = pool.submit(queued, leaver, "leaver")
        wait_for(lambda: gate.waiting == 1)
        f2 = pool.submit(queued, FakeCaller(), "stayer")
        wait_for(lambda: gate.waiting == 2)
        leaver.active = False
        with pytest.raises(CallCancelled):
            f1.result(2)
        assert gate.waiting == 1
        release.set()
        holder.result(5)
        f2.result(5)
    assert ran == ["stayer"] and (gate.active, gate.waiting) == (0, 0)


def test_many_threads_keep_counts_exact():
    """Bounded stress: 24 threads, mixed deadlines and cancellations; afterwards every count is zero and
    no more than `concurrency` ever ran at once."""
    capacity = Capacity(12)
    gate = Gate(2, 6, capacity)
    lock = threading.Lock()
    state = {"now": 0, "max": 0}
    outcomes: dict[str, int] = {}

    def call(i: int) -> None:
        caller = FakeCaller(timeout=0.05 + 0.01 * (i % 7)) if i % 3 else FakeCaller()
        if i % 5 == 0:
            threading.Timer(0.02, lambda: setattr(caller, "active", False)).start()
        try:
            with gate.slot(clock, caller):
                with lock:
                    state["now"] += 1
                    state["max"] = max(state["max"], state["now"])
                time.sleep(0.01)
                with lock:
                    state["now"] -= 1
            kind = "ok"
        except (Overloaded, DeadlineExceeded, CallCancelled) as exc:
            kind = type(exc).__name__
        with lock:
            outcomes[kind] = outcomes.get(kind, 0) + 1

    for _ in range(3):
        with ThreadPoolExecutor(24) as pool:
            list(pool.map(call, range(24)))
    assert sum(outcomes.values()) == 72 and outcomes.get("ok", 0) > 0
    assert state["max"] <= 2
    assert (gate.active, gate.waiting, capacity.used) == (0, 0, 0)
