"""Resizing frames to a model's input size as Pillow's BILINEAR (reducing_gap 3.0) does, faster.

The project's own packages ("bilinear" resampler) were made with Pillow's
``Image.resize(size, BILINEAR, reducing_gap=3.0)``: an integer-factor box reduction of the frame
(``Image.reduce``), then an antialiased bilinear (triangle filter) resize of the reduced image, first
along rows, then along columns. At camera sizes this is most of a small model's request time, all of it
in single-threaded C. Two things make it faster here without changing what a model sees:

* **Row bands in parallel** (``ResizeWorkers``): every output row depends only on the input rows under
  its filter, so the output is cut into bands and each band is computed from just the input rows it
  needs, by Pillow itself, on its own thread (Pillow releases the GIL while it resizes). The band's
  position is passed to Pillow as the resize box, so each band uses the very filter weights of the
  whole-frame resize. Pillow reads box coordinates as float32: a band boundary at a dyadic fraction of
  the output height (bands are a power of two, and the height divisible by their count) keeps them
  exact, and the result is Pillow's to the bit; other boundaries shift a weight by ~1e-7 and a pixel by
  at most 1 grey level (tests/core/test_resize.py checks both).
* **OpenCV for large reductions** (``reduce_frame``): when the box reduction averages at least
  ``FAST_REDUCE_MIN_PIXELS`` pixels per output pixel, it runs on the 3-byte frame with OpenCV's SIMD
  integer-factor INTER_AREA instead of Pillow's copy into 4-byte RGBX pixels and scalar reduce; OpenCV
  rounds exact-half block means differently, so a value can be 1 above Pillow's.
"""

from __future__ import annotations

import contextlib
import os
import threading
import typing
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from PIL import Image

#: Pillow's reducing_gap for "bilinear" packages: an integer-factor box reduction first, so large frames
#: resize fast (and the result is what the project's packages were made with).
REDUCING_GAP = 3.0
#: reduce_frame is used when Pillow's reduction averages at least this many pixels per output pixel.
#: Below it OpenCV's reduction is no faster than Pillow's (1920x1080 -> 224: a 2x1 reduction, measured
#: 2.7-5.4 ms against 2.2 ms + the RGBX copy; docs/benchmarks-notes.md).
FAST_REDUCE_MIN_PIXELS = 4
#: Frames smaller than this are resized on the request's own thread. At 640x480 (1.5 ms of resize) two
#: bands saved ~0.4 ms in process but nothing measurable end to end with one client, and cost 3-6 % of
#: the throughput with four (bench-ab, docs/benchmarks-notes.md); from 1280x720 on they pay.
BAND_MIN_PIXELS = 500_000
#: Each band gets at least this many output rows (a 224-row model: at most 28 bands).
BAND_MIN_ROWS = 8
#: The most threads ResizeWorkers' automatic choice uses per request (measured gains flatten beyond).
AUTO_MAX_THREADS = 4

T = typing.TypeVar("T")


class RowSource(typing.Protocol):
    """A frame whose rows are read on demand (frames.SegmentFrame: a client's shared-memory segment), so
    each row band reads just its rows, on its own thread."""

    shape: tuple[int, int, int]

    def rows(self, first: int, stop: int) -> typing.ContextManager[np.ndarray]: ...

    def whole(self) -> np.ndarray: ...


Frame = typing.Union[np.ndarray, RowSource]


def whole(image: Frame) -> np.ndarray:
    """The whole frame as an HxWx3 array (a RowSource reads it)."""
    return image if isinstance(image, np.ndarray) else image.whole()


def _rows(image: Frame, first: int, stop: int) -> typing.ContextManager[np.ndarray]:
    if isinstance(image, np.ndarray):
        return contextlib.nullcontext(image[first:stop])
    return image.rows(first, stop)


class ResizeWorkers:
    """Threads that resize row bands of one frame alongside the request's own thread.

    `threads` is how many threads one request's resize may use, its own included (1: no extra thread).
    A request cuts its frame only into as many bands as there are idle threads to take them (reserve()):
    when every thread is busy with other requests' bands, as under a full load of concurrent clients, the
    frame is resized in one piece on the request's thread, without the cost of cutting it (measured at
    640x480 with 4 clients on 2 cores: splitting anyway lost 6 % throughput). One instance serves every
    model of the agent; the composition root makes it and closes it."""

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"resize threads must be at least 1, got {threads}")
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="resize") if threads > 1 else None
        self._lock = threading.Lock()
        self._idle = threads - 1  # pool threads not reserved by a request

    @staticmethod
    def auto_threads() -> int:
        """The CPUs this process may run on, at most AUTO_MAX_THREADS."""
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            cpus = os.cpu_count() or 1
        return max(1, min(cpus, AUTO_MAX_THREADS))

    def reserve(self, wanted: int) -> int:
        """Up to `wanted` idle pool threads for one request's bands (0 when all are taken). Each reserved
        thread is given back by run() (one per extra job) or release()."""
        with self._lock:
            got = min(wanted, self._idle)
            self._idle -= got
            return got

    def reserve_bands(self, wanted: int) -> int:
        """How many bands a frame is cut into, at most `wanted` (a power of two): 1 plus the idle pool threads
        reserved here for the other bands (a power of two too, so band boundaries stay dyadic)."""
        if wanted < 2:
            return 1
        helpers = self.reserve(wanted - 1)
        bands = 1 << ((helpers + 1).bit_length() - 1)
        self.release(helpers + 1 - bands)
        return bands

    def release(self, count: int) -> None:
        with self._lock:
            self._idle += count

    def run(self, jobs: typing.Sequence[typing.Callable[[], T]]) -> list[T]:
        """Every job's result, in order: jobs[0] on this thread, the others on pool threads reserved for them
        (reserve(len(jobs) - 1) beforehand; each is given back when its job is done).

        A job the pool has not started by the time this thread is done with its own is taken back and
        run here, so a request never waits for a pool thread to become free."""
        pending = [(self._submit(job), job) for job in jobs[1:]]  # no loop variable left naming a future
        # No band outlives run(), not even when one fails: a band may read from a frame (a client's
        # segment) that is closed as soon as this returns.
        try:
            mine = jobs[0]()
        except BaseException:
            self._settle(pending)
            raise
        results = [mine]
        error = self._collect(pending, results)
        if error is not None:
            try:
                raise error
            finally:
                error = None  # the traceback holds this frame: no local may name the exception (a cycle)
        return results

    def _submit(self, job: typing.Callable[[], T]) -> Future[T] | None:
        """The job on a reserved pool thread, or None (its thread given back) when the pool is closed."""
        if self._pool is not None:
            try:
                return self._pool.submit(self._reserved, job)
            except RuntimeError:  # closed (the agent is stopping): run everything on the request's thread
                pass
        self.release(1)
        return None

    def _settle(self, pending: list[tuple[Future[T] | None, typing.Callable[[], T]]]) -> None:
        """Take back the bands not started, wait for the others (the request's own error is the one raised)."""
        for future, _ in pending:
            if future is not None and future.cancel():
                self.release(1)
            elif future is not None:
                future.exception()
        pending.clear()

    def _collect(self, pending: list[tuple[Future[T] | None, typing.Callable[[], T]]],
                 results: list[T]) -> BaseException | None:
        """Every other band's result appended to results (a band not started yet is run here); the first
        band error, returned once every band has ended.

        Failures are frequent (a client shrinking its segment mid-request fails a band), so no reference
        cycle may keep one alive: a failed band's traceback holds its frame buffer (25 MB for half a 4096²
        frame), which otherwise waits for the garbage collector (measured: +300 MB RSS under that attack).
        Hence a failed band's exception is taken with Future.exception() (Future.result() raising it would put
        its own frame, which holds the future, into the traceback), and the locals naming them are cleared."""
        error: BaseException | None = None
        while pending:
            future, job = pending.pop(0)
            try:
                if future is not None and future.cancel():
                    self.release(1)
                    future = None
                if future is None:
                    results.append(job())
                elif future.exception() is None:  # waits; a failed band's error is taken without raising it
                    results.append(future.result())  # here: Future.result()'s frame would hold the future
                else:
                    error = error or future.exception()
            except BaseException as exc:
                error = error or exc
            finally:
                future = job = None  # type: ignore[assignment]
        try:
            return error
        finally:
            error = None  # this frame is in the error's traceback

    def _reserved(self, job: typing.Callable[[], T]) -> T:
        try:
            return job()
        finally:
            self.release(1)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def reduce_factors(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
    """Pillow's Image.resize(size, BILINEAR, reducing_gap=REDUCING_GAP) reduction factors for a full frame."""
    return (int(width / size[0] / REDUCING_GAP) or 1, int(height / size[1] / REDUCING_GAP) or 1)


def pillow_bilinear(image: Frame, size: tuple[int, int], fast_reduce: bool = True,
                    workers: ResizeWorkers | None = None) -> np.ndarray:
    """image (HxWx3 uint8, or a RowSource) resized to size (w, h) as Pillow's BILINEAR with reducing_gap=3.0
    does it.

    fast_reduce: when the reduction is large, reduce_frame does Pillow's box reduction on the 3-byte frame
    (within 1 grey level of Pillow's output per channel), else Pillow does it (exact).
    workers: cut frames of BAND_MIN_PIXELS or more into row bands resized in parallel (exact where the band
    boundaries are dyadic fractions of the output height, else within 1 grey level)."""
    height, width = image.shape[:2]
    fx, fy = reduce_factors(width, height, size)
    opencv = fast_reduce and fx * fy >= FAST_REDUCE_MIN_PIXELS
    if workers is not None:
        bands = workers.reserve_bands(_band_count(workers.threads, size[1], width * height))
        if bands > 1:
            cuts = [size[1] * k // bands for k in range(bands + 1)]
            jobs = [_band_job(image, size, fx, fy, opencv, cuts[k], cuts[k + 1]) for k in range(bands)]
            return np.concatenate(workers.run(jobs))
    image = whole(image)
    if opencv:
        reduced = reduce_frame(image, fx, fy)
        return np.asarray(Image.fromarray(reduced, "RGB").resize(
            size, Image.Resampling.BILINEAR, box=(0, 0, width / fx, height / fy)))
    return np.asarray(_pil(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP))


def _band_count(threads: int, out_height: int, pixels: int) -> int:
    """A power of two (so band boundaries are dyadic fractions of the height) of at most `threads` bands of
    at least BAND_MIN_ROWS rows; 1 for small frames."""
    if threads < 2 or pixels < BAND_MIN_PIXELS:
        return 1
    bands = 1
    while bands * 2 <= threads and out_height // (bands * 2) >= BAND_MIN_ROWS:
        bands *= 2
    return bands


def _band_job(image: Frame, size: tuple[int, int], fx: int, fy: int, opencv: bool, first: int,
              stop: int) -> typing.Callable[[], np.ndarray]:
    """Output rows [first, stop) of pillow_bilinear(image, size): Pillow's resize of just the input rows
    under those rows' filter (read by the band's own thread from a RowSource), with the whole frame's filter
    positions passed as the box."""
    height, width = image.shape[:2]
    # The box of the resize after the reduction, as Pillow computes it and reads it (float32).
    box_w, box_h = float(np.float32(width / fx)), float(np.float32(height / fy))
    reduced_h = -(-height // fy)
    scale = box_h / size[1]
    support = max(scale, 1.0)  # the triangle filter's half-width, in reduced rows
    # Pillow's own bounds of the first and last output row's filter (precompute_coeffs), one row wider.
    lo = max(int((first + 0.5) * scale - support + 0.5) - 1, 0)
    hi = min(int((stop - 0.5) * scale + support + 0.5) + 1, reduced_h)
    top, bottom = box_h * first / size[1] - lo, box_h * stop / size[1] - lo

    def job() -> np.ndarray:
        with _rows(image, lo * fy, min(hi * fy, height)) as rows:
            if opencv:
                pil = Image.fromarray(reduce_frame(rows, fx, fy), "RGB")
            else:
                pil = _pil(rows)
                if fx * fy > 1:
                    pil = pil.reduce((fx, fy))
        return np.asarray(pil.resize((size[0], stop - first), Image.Resampling.BILINEAR,
                                     box=(0.0, top, box_w, bottom)))

    return job


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image if image.flags.c_contiguous else np.ascontiguousarray(image), "RGB")


def reduce_frame(image: np.ndarray, fx: int, fy: int) -> np.ndarray:
    """Pillow's Image.reduce((fx, fy)) of a whole HxWx3 uint8 frame: the mean of each fx x fy block,
    the last column and row of blocks averaging the pixels there are. Full blocks go through OpenCV's
    integer-factor INTER_AREA (SIMD, no RGBX copy), whose rounding differs from Pillow's fixed-point
    one: a value can be 1 above Pillow's. Partial blocks (few) are averaged here exactly as Pillow does."""
    import cv2

    height, width = image.shape[:2]
    cols, rows = width // fx, height // fy  # full blocks
    out = np.empty((-(-height // fy), -(-width // fx), 3), dtype=np.uint8)
    if cols and rows:
        main = image[:rows * fy, :cols * fx]
        out[:rows, :cols] = cv2.resize(main if main.strides[1] == 3 else np.ascontiguousarray(main), (cols, rows),
                                       interpolation=cv2.INTER_AREA)
    if cols * fx < width:  # right column of partial blocks (fewer than fx pixels wide)
        strip = image[:, cols * fx:]
        out[:rows, cols] = _block_means(strip[:rows * fy].reshape(rows, fy, -1, 3))
        if rows * fy < height:
            out[rows, cols] = _block_means(strip[rows * fy:].reshape(1, -1, strip.shape[1], 3))[0]
    if rows * fy < height:  # bottom row of partial blocks
        strip = image[rows * fy:, :cols * fx]
        out[rows, :cols] = _block_means(strip.reshape(strip.shape[0], cols, fx, 3).transpose(1, 0, 2, 3))
    return out


def _block_means(blocks: np.ndarray) -> np.ndarray:
    """blocks: N x a x b x 3 uint8 -> N x 3 means, rounded exactly as Pillow's reduce does it (Reduce.c:
    (sum + n/2) times a float32-computed 2**32 / (256 n), shifted right by 24; one below the rounded mean
    when sum + n/2 is a multiple of n, for n not a power of two)."""
    n = blocks.shape[1] * blocks.shape[2]
    multiplier = int(np.float32(4.0 * (1 << 30)) / np.float32(256 * n))
    sums = blocks.sum(axis=(1, 2), dtype=np.uint64)
    return ((sums + n // 2) * multiplier >> 24).astype(np.uint8)

