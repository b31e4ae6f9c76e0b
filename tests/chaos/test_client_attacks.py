"""Hostile and careless clients against a real `edge-agent serve` process (issue #10, "a client can
kill or hang the agent"): segments shrunk while requests are in flight, a FIFO renamed over a
segment's name, directories and devices as names, floods of made-up method names, and segments the
client could not read or write itself.

Each attack runs for a bounded time (quick: a few seconds, in the normal suite; soak: marked slow)
while a well-behaved control client sends valid shared-memory requests beside it. Afterwards the
agent must be alive, answer DescribeModel at once, have answered every bad request with its
documented status (never INTERNAL or UNKNOWN), have lost none of the control client's requests, and
its RSS must not have grown past a bound; at the end SIGTERM must stop it promptly. Figures:
CHAOS_REPORT=path (see harness.py) and docs/reliability.md.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from harness import (
    REPORT,
    AgentProcess,
    Segment,
    Tally,
    call,
    detect_request,
    frame,
    pb,
    run_for,
    running_agent,
)
from metrics_fixtures import short_tmp_dir

NOBODY = 65534
AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="the attack needs root: chown to another user, mknod")
QUICK, SOAK = pytest.param(1.5, id="quick"), pytest.param(45.0, id="soak", marks=pytest.mark.slow)
CONTROL = (640, 480)


@pytest.fixture(scope="module")
def chaos_agent(model_files: dict[str, Path]) -> Iterator[AgentProcess]:
    """One agent process for the module: each attack also has to leave it fit for the next one. At the
    end it must stop on SIGTERM within seconds (a request stuck in open() on a FIFO used to prevent that)."""
    with short_tmp_dir() as tmp, running_agent(tmp, model_files["anomalib"]) as agent:
        yield agent
        seconds = agent.stop()
        if REPORT:
            with open(REPORT, "a") as out:
                out.write(f'{{"attack": "sigterm after the attacks", "seconds": {seconds:.2f}}}\n')
        assert seconds < 10


@pytest.fixture
def names(request: pytest.FixtureRequest) -> Iterator[Callable[[str], str]]:
    """Unique /dev/shm names for this test; whatever they became is removed afterwards."""
    made: list[str] = []
    prefix = f"ea-chaos-{os.getpid()}-{re.sub(r'[^A-Za-z0-9]', '', request.node.name)[:40]}"

    def name(suffix: str) -> str:
        made.append(f"{prefix}-{suffix}")
        return "/" + made[-1]

    yield name
    for n in made:
        path = Path("/dev/shm", n)
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        elif path.exists() or path.is_symlink():
            path.unlink()


class Control:
    """A well-behaved client: a defect frame and a mask in its own segments, answers checked against
    the inline answer to the same frame (so a wrong or missing mask counts as data lost)."""

    def __init__(self, agent: AgentProcess, name: Callable[[str], str]) -> None:
        width, height = CONTROL
        image = frame(width, height, defect=True)
        self.nbytes = image.nbytes
        self.expected = agent.stub.DetectAnomalies(detect_request(width, height, data=image), timeout=30) \
            .detect_anomaly_result
        assert self.expected.is_anomalous and len(self.expected.anomaly_mask.byte_data) == self.nbytes
        self.frame = Segment(name("control-in"), self.nbytes, image)
        self.mask = Segment(name("control-mask"), self.nbytes)
        self.request = detect_request(width, height, shm=self.frame.handle(), mask=self.mask.handle())
        self.agent = agent

    def worker(self, tally: Tally) -> Callable[[threading.Event], None]:
        def work(stop: threading.Event) -> None:
            while not stop.is_set():
                self.mask.write(b"\0" * self.nbytes)
                code, details, reply = call(self.agent.stub.DetectAnomalies, self.request, timeout=15)
                if code != "OK":
                    tally.control(False, f"{code}: {details}")
                elif self.mask.read(self.nbytes) != self.expected.anomaly_mask.byte_data:
                    tally.control(False, "mask in shared memory differs from the inline mask")
                else:
                    result = reply.detect_anomaly_result
                    tally.control(result.is_anomalous and result.anomaly_score == self.expected.anomaly_score,
                                  f"score {result.anomaly_score} != {self.expected.anomaly_score}")
                stop.wait(0.01)
        return work

    def close(self) -> None:
        self.frame.close()
        self.mask.close()


def sender(agent: AgentProcess, tally: Tally, request: object, kinds: Counter[str],
           timeout: float = 30.0) -> Callable[[threading.Event], None]:
    """Sends `request` until stopped; tallies codes and what each refusal said (numbers stripped)."""
    def work(stop: threading.Event) -> None:
        while not stop.is_set():
            code, details, _ = call(agent.stub.DetectAnomalies, request, timeout=timeout)
            tally.add(code, details)
            if code != "OK":
                kinds[re.sub(r"'[^']*'|\d+", "#", details)] += 1
    return work


# -- SIGBUS: a segment shrunk under a request in flight ----------------------------------------------

@pytest.mark.parametrize("seconds", [QUICK, SOAK])
@pytest.mark.parametrize("size", [(640, 480), (4096, 4096)], ids=["640x480", "4096x4096"])
@pytest.mark.parametrize("target", ["input", "mask"])
def test_segment_shrunk_during_requests(chaos_agent, names, target, size, seconds):
    agent = chaos_agent
    width, height = size
    image = frame(width, height, defect=True)
    tally = Tally(f"shrink {target} segment {width}x{height}", {"OK", "INVALID_ARGUMENT"})
    frame_seg = Segment(names("in"), image.nbytes, image)
    mask_seg = Segment(names("mask"), image.nbytes)
    control = Control(agent, names)
    request = detect_request(width, height, shm=frame_seg.handle(), mask=mask_seg.handle())
    victim = frame_seg if target == "input" else mask_seg
    rng = np.random.default_rng(7)
    try:
        # Warm: two requests at once of this size, so the agent's buffer pool holds what the attack
        # will use and the RSS bound measures growth, not the first use.
        warm = [threading.Thread(target=call, args=(agent.stub.DetectAnomalies, request, 60)) for _ in range(2)]
        for t in warm:
            t.start()
        for t in warm:
            t.join()
        tally.rss_before = agent.rss_mb()

        def shrinker(stop: threading.Event) -> None:
            # What a client does that reallocates its buffer after a timeout (or a hostile one):
            # shrink, maybe to nothing, for a moment, then grow back.
            while not stop.is_set():
                victim.truncate(int(rng.integers(0, victim.size)))
                time.sleep(float(rng.uniform(0, 0.002)))
                victim.truncate(victim.size)
                time.sleep(float(rng.uniform(0, 0.002)))

        kinds: Counter[str] = Counter()
        tally.seconds = run_for(seconds, [shrinker, sender(agent, tally, request, kinds),
                                          sender(agent, tally, request, kinds), control.worker(tally)])
        tally.extra["refusals"] = dict(kinds)
        # 4096x4096: the buffer pool may keep up to two 48 MiB buffers (frames.py) beyond the warm-up's.
        tally.check(agent, rss_growth_mb=64 if width < 4096 else 128)
        for message in kinds:  # every refusal says what was wrong with the segment
            assert "exceeds segment" in message or "changed size during the request" in message \
                or "is empty" in message, message
    finally:
        frame_seg.close()
        mask_seg.close()
        control.close()


# -- permanent hang: a FIFO renamed over the name; directories, devices, links ----------------------

@pytest.mark.parametrize("seconds", [QUICK, SOAK])
def test_fifo_renamed_over_the_segment_name(chaos_agent, names, seconds):
    """The name flips between a segment and a FIFO (atomic renames) while requests for it flow. A FIFO
    opened without O_NONBLOCK blocks until a writer comes — forever — and used to do so inside the
    shared-memory lock, queueing every later shared-memory request behind it."""
    agent = chaos_agent
    width, height = 640, 480
    image = frame(width, height, defect=False)
    name, spare_fifo, spare_file = names("flip"), names("fifo"), names("file")
    path, fifo_path, file_path = (Path("/dev/shm" + n) for n in (name, spare_fifo, spare_file))
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)  # a plain segment to start with
    os.pwrite(fd, image.data, 0)
    os.close(fd)
    tally = Tally("FIFO renamed over the segment name", {"OK", "INVALID_ARGUMENT"})
    control = Control(agent, names)
    mask_seg = Segment(names("mask"), image.nbytes)
    rng = np.random.default_rng(11)
    try:
        tally.rss_before = agent.rss_mb()
        flips = 0

        def flipper(stop: threading.Event) -> None:
            nonlocal flips
            while not stop.is_set():
                os.mkfifo(fifo_path, 0o666)
                os.rename(fifo_path, path)
                time.sleep(float(rng.uniform(0, 0.003)))
                fd = os.open(file_path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
                os.pwrite(fd, image.data, 0)
                os.close(fd)
                os.rename(file_path, path)
                time.sleep(float(rng.uniform(0, 0.003)))
                flips += 1

        request = detect_request(width, height, shm=pb_handle(name, image.nbytes), mask=mask_seg.handle())
        kinds: Counter[str] = Counter()
        tally.seconds = run_for(seconds, [flipper, sender(agent, tally, request, kinds, timeout=10),
                                          sender(agent, tally, request, kinds, timeout=10), control.worker(tally)])
        tally.extra.update(flips=flips, refusals=dict(kinds))
        tally.check(agent, rss_growth_mb=32)
        assert tally.codes["INVALID_ARGUMENT"] > 0 and tally.codes["OK"] > 0, dict(tally.codes)
        assert all("is a FIFO" in k for k in kinds), kinds
    finally:
        control.close()
        mask_seg.close()


def pb_handle(name: str, size: int, offset: int = 0) -> pb.SharedMemoryHandle:
    return pb.SharedMemoryHandle(name=name, size=size, offset=offset)


@pytest.mark.parametrize("rounds", [pytest.param(5, id="quick"),
                                    pytest.param(500, id="soak", marks=pytest.mark.slow)])
def test_special_files_as_segment_names(chaos_agent, names, rounds):
    """Directories, FIFOs, symlinks, sockets and (as root) device nodes under /dev/shm, as the frame
    and as the mask target: refused at once with what they are, nothing opened that could block."""
    agent = chaos_agent
    width, height = 64, 64
    nbytes = width * height * 3
    good = Segment(names("good"), nbytes, frame(width, height, defect=False))
    specials: dict[str, str] = {}
    made = names("dir")
    Path("/dev/shm" + made).mkdir()
    specials[made] = "is a directory"
    made = names("fifo")
    os.mkfifo("/dev/shm" + made)
    specials[made] = "is a FIFO"
    made = names("link")
    os.symlink(good.path, "/dev/shm" + made)
    specials[made] = "is a symbolic link"
    made = names("sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind("/dev/shm" + made)
    specials[made] = "is a socket"
    if os.geteuid() == 0:
        for dev, what in (((1, 5), "zero"), ((5, 0), "tty")):  # /dev/zero; /dev/tty: opening it could grab a terminal
            made = names(what)
            os.mknod("/dev/shm" + made, 0o666 | stat.S_IFCHR, os.makedev(*dev))
            specials[made] = "is a character device"
    tally = Tally("directory / FIFO / symlink / socket / device as the name", {"INVALID_ARGUMENT"})
    tally.rss_before = agent.rss_mb()
    t0 = time.monotonic()
    try:
        for _ in range(rounds):
            for name, words in specials.items():
                handle = pb_handle(name, nbytes)
                for request in (detect_request(width, height, shm=handle),
                                detect_request(width, height, shm=good.handle(), mask=handle)):
                    code, details, _ = call(agent.stub.DetectAnomalies, request, timeout=10)
                    tally.add(code, details)
                    assert words in details, (name, code, details)
        tally.seconds = time.monotonic() - t0
        tally.extra["kinds"] = sorted(set(specials.values()))
        tally.check(agent, rss_growth_mb=32)
    finally:
        listener.close()
        good.close()


# -- unbounded metric labels ----------------------------------------------------------------------

@pytest.mark.parametrize("count", [pytest.param(2000, id="quick"),
                                   pytest.param(40000, id="soak", marks=pytest.mark.slow)])
def test_unknown_method_names_flood(chaos_agent, count):
    agent = chaos_agent
    before = agent.metrics()
    tally = Tally("unknown method names flood", {"UNIMPLEMENTED"})
    tally.rss_before = agent.rss_mb()
    sent = iter(range(count))
    lock = threading.Lock()

    def flood(stop: threading.Event) -> None:
        while not stop.is_set():
            with lock:
                i = next(sent, None)
            if i is None:
                return
            method = f"/AWS.LookoutVision.EdgeAgent/Chaos{i}" if i % 2 else f"/chaos.Made{i}.Up/M{i}"
            code, details, _ = call(agent.channel.unary_unary(method), b"", timeout=10)
            tally.add(code, details)

    tally.seconds = run_for(600, [flood] * 4)  # ends when the names run out
    t0 = time.monotonic()
    after = agent.metrics()
    scrape = time.monotonic() - t0
    tally.extra.update(metrics_bytes_before=len(before), metrics_bytes_after=len(after),
                       scrape_seconds=round(scrape, 3))
    tally.check(agent, rss_growth_mb=40 if count <= 2000 else 60)
    assert tally.sent == count
    assert "Chaos" not in after and "Made" not in after
    assert len(after) - len(before) < 4096, (len(before), len(after))
    assert agent.sample("grpc_server_handled_total", after, grpc_service="unknown", grpc_method="unknown",
                        grpc_type="unknown", grpc_code="UNIMPLEMENTED") >= count


# -- confused deputy: segments the client could not use itself ---------------------------------------

@AS_ROOT
@pytest.mark.parametrize("rounds", [pytest.param(10, id="quick"),
                                    pytest.param(1000, id="soak", marks=pytest.mark.slow)])
def test_segments_the_client_could_not_use(chaos_agent, names, rounds):
    """The agent runs as root here, like many edge installs. It must not read another user's private
    segment, nor write a mask into a root-owned read-only file, on a client's behalf — and a bad mask
    target is refused before the model runs (the inference histogram does not move)."""
    agent = chaos_agent  # started by this (root) test process, so running as root
    width, height = 64, 64
    image = frame(width, height, defect=True)
    nbytes = image.nbytes
    private = Segment(names("private-in"), nbytes, image, mode=0o600)
    os.fchown(private.fd, NOBODY, NOBODY)
    readable = Segment(names("root-0400-in"), nbytes, image, mode=0o400)
    rootmask = Segment(names("root-0400-mask"), nbytes, b"\xab" * nbytes, mode=0o400)
    othermask = Segment(names("nobody-0600-mask"), nbytes, b"\xab" * nbytes, mode=0o600)
    os.fchown(othermask.fd, NOBODY, NOBODY)
    openmask = Segment(names("nobody-0666-mask"), nbytes, b"\xab" * nbytes, mode=0o666)
    os.fchown(openmask.fd, NOBODY, NOBODY)
    cases = [  # (request, expected code, words)
        (detect_request(width, height, shm=private.handle()), "INVALID_ARGUMENT", "read it"),
        (detect_request(width, height, shm=readable.handle(), mask=rootmask.handle()), "INVALID_ARGUMENT",
         "write it"),
        (detect_request(width, height, data=image, mask=othermask.handle()), "INVALID_ARGUMENT", "write it"),
        # Allowed: what the permission bits give root's own uid, or give everyone.
        (detect_request(width, height, shm=readable.handle()), "OK", ""),
        (detect_request(width, height, data=image, mask=openmask.handle()), "OK", ""),
    ]
    tally = Tally("segments the client could not use (agent as root)", {"OK", "INVALID_ARGUMENT"})
    tally.rss_before = agent.rss_mb()
    t0 = time.monotonic()
    try:
        for _ in range(rounds):
            refused_before = agent.sample("edge_agent_inference_duration_seconds_count")
            for request, code, words in cases[:3]:
                got, details, _ = call(agent.stub.DetectAnomalies, request, timeout=10)
                tally.add(got, details)
                assert got == code and words in details, (got, details)
            # Refused before inference: not one inference ran for the three refused requests.
            assert agent.sample("edge_agent_inference_duration_seconds_count") == refused_before
            for request, code, _ in cases[3:]:
                got, details, _ = call(agent.stub.DetectAnomalies, request, timeout=10)
                tally.add(got, details)
                assert got == code, details
        tally.seconds = time.monotonic() - t0
        tally.check(agent, rss_growth_mb=32)
        assert rootmask.read(nbytes) == b"\xab" * nbytes and othermask.read(nbytes) == b"\xab" * nbytes
        assert openmask.read(nbytes) != b"\xab" * nbytes  # the mask landed where the client could write
    finally:
        for seg in (private, readable, rootmask, othermask, openmask):
            seg.close()
