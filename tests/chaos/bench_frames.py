"""Micro-benchmark: reading a frame from (and writing a mask into) a client's shared-memory segment,
the agent's way (preadv into a pooled buffer, pwrite out; agent/core/frames.py) against the way it
used to be (a cached mmap of the whole segment, viewed in place) — which a client could turn into
SIGBUS by shrinking its segment.

Not a test (it measures time on whatever machine runs it): ``python tests/chaos/bench_frames.py``.
It prints, per frame size, the median time of

* ``read``: the frame from the segment, ready as an HxWx3 array;
* ``read+pre``: the same plus the resize to a 256x256 model input the pipeline does next (PIL bilinear,
  as agent/core/pipeline.py) — what a request really pays, since the copy warms the cache for it;
* ``mask``: an HxWx3 mask into the client's mask segment;

for both ways, interleaved (A B A B ...) so machine load drifts hit both, and the ratio new/old.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from agent.core.frames import SharedMemory, ShmHandle, as_image

#: frame → (width, height, default timed rounds)
SIZES = {"640x480": (640, 480, 300), "1920x1080": (1920, 1080, 100), "4096x4096": (4096, 4096, 20)}


class MappedSegments:
    """The old read path, reduced to its cost: lstat the name, reuse a cached whole-segment mapping."""

    def __init__(self) -> None:
        self._maps: dict[tuple[str, bool], tuple[tuple[int, int, int], memoryview]] = {}

    def region(self, name: str, size: int, writable: bool) -> memoryview:
        path = "/dev/shm/" + name.lstrip("/")
        st = os.stat(path, follow_symlinks=False)
        ident = (st.st_dev, st.st_ino, st.st_size)
        cached = self._maps.get((path, writable))
        if cached is None or cached[0] != ident:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
            try:
                prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
                cached = (ident, memoryview(mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=prot)))
            finally:
                os.close(fd)
            self._maps[(path, writable)] = cached
        return cached[1][:size]


def preprocess(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image, "RGB").resize((256, 256), Image.Resampling.BILINEAR,
                                                           reducing_gap=3.0))


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(size_name: str, rounds: int) -> dict[str, tuple[float, float]]:
    width, height, _ = SIZES[size_name]
    nbytes = width * height * 3
    frame = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    mask = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    base = f"/ea-bench-frames-{os.getpid()}"
    paths = []
    for suffix, data in (("-in", frame), ("-mask", np.zeros(nbytes, np.uint8))):
        path = "/dev/shm" + base + suffix
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
        os.pwrite(fd, data.data, 0)
        os.close(fd)
        paths.append(path)
    try:
        old, new = MappedSegments(), SharedMemory()
        handle, mask_handle = ShmHandle(base + "-in", nbytes, 0), ShmHandle(base + "-mask", nbytes, 0)

        def old_read() -> np.ndarray:
            return as_image(old.region(handle.name, nbytes, False), width, height)

        def new_read() -> None:
            with new.frame(handle, width, height):
                pass

        def old_read_pre() -> None:
            preprocess(old_read())

        def new_read_pre() -> None:
            with new.frame(handle, width, height) as image:
                preprocess(image)

        def old_mask() -> None:
            out = np.frombuffer(old.region(mask_handle.name, nbytes, True), np.uint8).reshape(height, width, 3)
            out[:] = mask  # the old path rendered the mask straight into the mapping

        def new_mask() -> None:
            with new.mask_target(mask_handle, nbytes) as target:
                target.buffer.reshape(height, width, 3)[:] = mask  # rendered into the agent's buffer ...
                target.commit()  # ... and written out

        results = {}
        for what, a, b in (("read", old_read, new_read), ("read+pre", old_read_pre, new_read_pre),
                           ("mask", old_mask, new_mask)):
            a(), b()  # warm: mappings made, pages touched, buffers pooled
            ta, tb = [], []
            for _ in range(rounds):
                ta.append(timed(a))
                tb.append(timed(b))
            results[what] = (statistics.median(ta), statistics.median(tb))
        written = np.fromfile(paths[1], np.uint8)
        assert np.array_equal(written, mask.reshape(-1)), "mask not written"
        return results
    finally:
        for path in paths:
            os.unlink(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=0, help="timed rounds per size (default: 300 / 100 / 20)")
    args = p.parse_args()
    print(f"{'frame':<10} {'step':<9} {'mmap (old)':>12} {'pread (new)':>12} {'new/old':>8}")
    for size_name, (_, _, default_rounds) in SIZES.items():
        for what, (a, b) in bench(size_name, args.rounds or default_rounds).items():
            print(f"{size_name:<10} {what:<9} {a * 1e3:>9.3f} ms {b * 1e3:>9.3f} ms {b / a:>8.2f}")


if __name__ == "__main__":
    main()
