"""Input bitmaps (RGB888 from bytes or client-owned POSIX shared memory) and mask output.

Inline bytes are viewed in place (np.frombuffer), never copied before pre-processing.

Shared-memory segments belong to the client, who can resize, replace or chmod them at any moment,
so the agent never maps them: a mapping of a file that shrinks under a request turns the next
access into SIGBUS, which kills the whole agent. Instead the agent copies the frame with
``preadv`` from the segment's file descriptor into a buffer it owns, and copies masks out with
``pwrite`` from a buffer it owns. A file read past the end of a segment returns fewer bytes (an
INVALID_ARGUMENT for that one request), never a signal. Descriptors are kept open between requests
(keyed by name, checked against the name's device and inode on every request) and buffers are
pooled, so a request costs an ``lstat``, one copy in and one copy out.

Opening a name cannot block (O_NONBLOCK: a FIFO renamed over a segment opens at once and is then
refused), cannot follow a symlink (O_NOFOLLOW), and what was opened is checked on the descriptor
(fstat: regular files only). No lock is held across any system call that touches the client's file.

Access rule (docs/shared-memory.md): the agent cannot learn which user is calling (grpcio exposes no
peer credentials for Unix sockets), so it reads a segment only if the segment's permission bits let
the agent's own user read it, and writes a mask only if they let it write — owner, group or other
bits as for an unprivileged process, even when the agent runs as root (root's override of the
permission bits is never used). The mask segment is checked before the model runs.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from agent.errors import InvalidInput

MIN_SIDE = 64
MAX_SIDE = 4096
SHM_DIR = "/dev/shm"
#: The largest frame (and mask) a request can carry: 4096x4096 RGB888, rows already 4-byte aligned.
MAX_FRAME_BYTES = MAX_SIDE * MAX_SIDE * 3
# shm_open names: one leading slash at most, then a plain file name.
_SHM_NAME = re.compile(r"^/?[A-Za-z0-9_.\-]{1,250}$")
# O_NONBLOCK: opening a FIFO (or a device) must return at once, not wait for a writer.
# O_NOFOLLOW: a symlink is refused. O_NOCTTY: a terminal renamed over a name never becomes ours.
#: Buffers per pwritev call: IOV_MAX on Linux and macOS (longer lists fail with EINVAL).
_IOV_MAX = 1024
_OPEN_FLAGS = os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)


@dataclass(frozen=True)
class ShmHandle:
    name: str
    size: int
    offset: int


def check_size(width: int, height: int) -> None:
    for what, value in (("width", width), ("height", height)):
        if not MIN_SIDE <= value <= MAX_SIDE:
            raise InvalidInput(f"bitmap {what} {value} is outside the supported {MIN_SIDE}..{MAX_SIDE} pixels")


def row_stride(width: int, nbytes: int, height: int) -> int:
    """Bytes per row: packed (w*3) or padded to 4 bytes (GStreamer RGB buffers); else InvalidInput."""
    packed = width * 3
    padded = (packed + 3) & ~3
    if nbytes == packed * height:
        return packed
    if nbytes == padded * height:
        return padded
    expected = f"{packed * height}" + (f" (or {padded * height} with rows padded to 4 bytes)" if padded != packed
                                       else "")
    raise InvalidInput(f"bitmap of {width}x{height} RGB888 needs {expected} bytes, got {nbytes}")


def as_image(buffer: bytes | memoryview | np.ndarray, width: int, height: int, offset: int = 0,
             nbytes: int | None = None) -> np.ndarray:
    """A HxWx3 uint8 view of packed or row-padded RGB888 bytes (no copy)."""
    check_size(width, height)
    nbytes = len(buffer) - offset if nbytes is None else nbytes
    stride = row_stride(width, nbytes, height)
    rows = np.frombuffer(buffer, dtype=np.uint8, count=stride * height, offset=offset).reshape(height, stride)
    return rows[:, : width * 3].reshape(height, width, 3)


def shm_path(name: str) -> str:
    if not isinstance(name, str) or not _SHM_NAME.match(name) or ".." in name or name.lstrip("/") in (".", ""):
        raise InvalidInput(f"shared memory name {name!r} is invalid: use a POSIX shm name like '/frames' "
                           "(no '/' after the leading one, no '..')")
    return os.path.join(SHM_DIR, name.lstrip("/"))


# -- who may do what -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    """A user and its groups, for checking permission bits the way the kernel does for a process
    without CAP_DAC_OVERRIDE: the owner bits if the user owns the file, else the group bits if one of
    its groups does, else the other bits. POSIX ACLs are not consulted (a refusal, never a grant)."""

    uid: int
    gids: frozenset[int]

    @classmethod
    def of_process(cls) -> Credentials:
        return cls(os.geteuid(), frozenset((os.getegid(), *os.getgroups())))

    def may(self, st: os.stat_result, access: int) -> bool:
        """access: os.R_OK and/or os.W_OK (4 and 2: the same values as the r and w permission bits)."""
        if st.st_uid == self.uid:
            bits = st.st_mode >> 6
        elif st.st_gid in self.gids:
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        return bits & access == access


# -- agent-owned buffers ---------------------------------------------------------------------------

class BufferPool:
    """Byte buffers the agent owns, for frames read from and masks written to shared memory.

    Reused across requests, so a request allocates (and page-faults) nothing after the first few:
    a 4096x4096 frame is 48 MiB, above glibc's mmap threshold, and a fresh one costs ~12,000 page
    faults. Idle buffers are kept up to ``max_idle_bytes`` in total (the least recently returned go
    first), so memory stays bounded by the peak number of concurrent shared-memory requests.
    """

    def __init__(self, max_idle_bytes: int = 2 * MAX_FRAME_BYTES) -> None:
        self._max_idle = max_idle_bytes
        self._lock = threading.Lock()
        self._idle: list[np.ndarray] = []  # oldest first
        self._idle_bytes = 0

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def acquire(self, nbytes: int) -> np.ndarray:
        """A uint8 array of exactly nbytes (a view of a pooled buffer at least that large)."""
        with self._lock:
            best = -1
            for i, buf in enumerate(self._idle):  # the smallest that fits: a few entries at most
                if buf.size >= nbytes and (best < 0 or buf.size < self._idle[best].size):
                    best = i
            if best >= 0:
                buf = self._idle.pop(best)
                self._idle_bytes -= buf.size
                return buf[:nbytes]
        # Outside the malloc heap: a long-lived buffer there would pin the heap's top, so that glibc
        # trims and re-grows (page-faults) the transient buffers above it on every request. Private
        # and anonymous: no file behind it that anyone could truncate.
        memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # fileno -1: anonymous
        return np.frombuffer(memory, dtype=np.uint8)[:nbytes]  # a view: release() keeps its base

    def release(self, view: np.ndarray) -> None:
        buf = view.base
        assert isinstance(buf, np.ndarray), "not a buffer from acquire()"
        if buf.size > self._max_idle:
            return
        with self._lock:
            self._idle.append(buf)
            self._idle_bytes += buf.size
            while self._idle_bytes > self._max_idle:
                self._idle_bytes -= self._idle.pop(0).size

    @contextmanager
    def borrowed(self, nbytes: int) -> Iterator[np.ndarray]:
        buf = self.acquire(nbytes)
        try:
            yield buf
        finally:
            self.release(buf)


# -- segments --------------------------------------------------------------------------------------

class _Segment:
    """One open descriptor of a client's segment, shared by the requests using it."""

    __slots__ = ("fd", "dev", "ino", "users", "dropped")

    def __init__(self, fd: int, st: os.stat_result) -> None:
        self.fd = fd
        self.dev, self.ino = st.st_dev, st.st_ino
        self.users = 1  # the request that opened it
        self.dropped = False  # evicted or replaced: closed when the last user lets go


def _close_all(cache: OrderedDict[tuple[str, bool], _Segment], lock: threading.Lock) -> None:
    with lock:
        closing = [s.fd for s in cache.values() if s.users == 0]
        for segment in cache.values():
            segment.dropped = True  # one still in use is closed by its last request
        cache.clear()
    for fd in closing:
        os.close(fd)


class SegmentFrame:
    """A frame in a client's segment whose rows are copied into agent buffers when asked for.

    Thread-safe: row ranges may be read from several threads at once (positional reads of one
    descriptor). Every buffer is the agent's own; the segment is never mapped (module docstring)."""

    def __init__(self, shm: SharedMemory, segment: _Segment, handle: ShmHandle, width: int, height: int,
                 stride: int) -> None:
        self._shm, self._segment, self._handle = shm, segment, handle
        self._stride = stride
        self.shape = (height, width, 3)
        self._whole: np.ndarray | None = None

    @contextmanager
    def rows(self, first: int, stop: int) -> Iterator[np.ndarray]:
        """Rows [first, stop) as a (stop - first) x W x 3 array, valid inside the with-block."""
        height, width = self.shape[:2]
        if not 0 <= first < stop <= height:
            raise ValueError(f"rows {first}..{stop} are not inside a frame of {height} rows")
        nbytes = (stop - first) * self._stride
        with self._shm.pool.borrowed(nbytes) as buf:
            self._shm._pread(self._segment, buf.data, self._handle, first * self._stride)
            yield buf.reshape(stop - first, self._stride)[:, :width * 3].reshape(stop - first, width, 3)

    def whole(self) -> np.ndarray:
        """The whole frame (read once, kept until the frame is closed)."""
        if self._whole is None:
            buf = self._shm.pool.acquire(self._handle.size)
            try:
                self._shm._pread(self._segment, buf.data, self._handle)
            except BaseException:
                self._shm.pool.release(buf)
                raise
            self._whole = buf
        return as_image(self._whole, self.shape[1], self.shape[0])

    def _close(self) -> None:
        if self._whole is not None:
            self._shm.pool.release(self._whole)
            self._whole = None


class MaskTarget:
    """The client's mask segment, opened and checked before inference. The mask reaches it in one of
    two ways, both copied into the segment by ``commit`` (after the model's slot is released):

    * ``write_rows(rows, runs)``: the mask as its distinct rows and how often each repeats (a
      nearest-neighbour upscale repeats every model row many times). ``commit`` writes it with
      ``pwritev`` over iovecs that all point into those few rows: one copy of the mask into the
      segment, none into an agent buffer (a 4096x4096 mask is 48 MiB; its distinct rows ~3 MiB).
    * ``buffer``: a pooled agent buffer of the mask's size (taken on first use) to render into.
    """

    def __init__(self, shm: SharedMemory, segment: _Segment, handle: ShmHandle, nbytes: int) -> None:
        self._shm = shm
        self._segment = segment
        self.handle = handle
        self.nbytes = nbytes
        self._buffer: np.ndarray | None = None
        self._rows: tuple[np.ndarray, Sequence[int]] | None = None

    @property
    def buffer(self) -> np.ndarray:
        if self._buffer is None:
            self._buffer = self._shm.pool.acquire(self.nbytes)
        return self._buffer

    def write_rows(self, rows: np.ndarray, runs: Sequence[int]) -> None:
        """Keep the mask as rows (n x row_bytes, C-contiguous uint8) with row i repeated runs[i] times
        (sum(runs) rows in all) until ``commit``. Nothing is copied here."""
        if len(runs) != rows.shape[0]:
            raise ValueError(f"{len(runs)} runs for {rows.shape[0]} rows")
        self._rows = (np.ascontiguousarray(rows), runs)

    def commit(self, mask: np.ndarray | None = None) -> None:
        """Write the mask (``mask`` if given, else the rows given to write_rows, else ``buffer``) at the
        handle's offset."""
        if mask is None and self._rows is not None:
            rows, runs = self._rows
            row_bytes = rows.nbytes // max(rows.shape[0], 1)
            nbytes = row_bytes * sum(runs)
            self._check_fits(nbytes)
            flat = rows.reshape(-1).data.cast("B") if rows.size else memoryview(b"")
            views = [flat[i * row_bytes:(i + 1) * row_bytes] for i in range(rows.shape[0])]
            iovecs = [views[i] for i, run in enumerate(runs) for _ in range(run)]
            self._shm._pwritev(self._segment, iovecs, nbytes, self.handle)
            return
        data = self.buffer if mask is None else mask.reshape(-1)
        self._check_fits(data.nbytes)
        self._shm._pwritev(self._segment, [data.data], data.nbytes, self.handle)

    def _check_fits(self, nbytes: int) -> None:
        if nbytes > self.handle.size:
            raise InvalidInput(f"mask shared memory handle {self.handle.name!r} has size {self.handle.size}, "
                               f"the mask needs {nbytes} bytes")

    def _close(self) -> None:
        if self._buffer is not None:
            self._shm.pool.release(self._buffer)
            self._buffer = None
        self._rows = None


class SharedMemory:
    """Reads frames from, and writes masks into, clients' POSIX shared-memory segments.

    Clients reuse one segment per camera or stream (the GStreamer LFV client writes every frame into
    the same one), so its descriptor stays open between requests (up to ``max_segments``): a request
    then costs one lstat of the name, checked against the open descriptor's device and inode — a
    client that recreates its segment under the same name gets it reopened; one that merely resizes
    it keeps the descriptor (reads are bounds-checked on every request).
    """

    def __init__(self, max_segments: int = 16, *, pool: BufferPool | None = None,
                 credentials: Credentials | None = None) -> None:
        self._max = max_segments
        self._lock = threading.Lock()  # guards _cache and the segments' users/dropped, never held across I/O
        self._cache: OrderedDict[tuple[str, bool], _Segment] = OrderedDict()
        self.pool = pool or BufferPool()
        self.credentials = credentials or Credentials.of_process()
        # Descriptors are closed when the SharedMemory goes away (or on close()), not left to leak.
        self._finalizer = weakref.finalize(self, _close_all, self._cache, self._lock)

    def close(self) -> None:
        self._finalizer()

    @property
    def open_segments(self) -> int:
        return len(self._cache)

    # -- frames in -------------------------------------------------------------------------------
    @contextmanager
    def frame(self, handle: ShmHandle, width: int, height: int) -> Iterator[np.ndarray]:
        """The HxWx3 image in the handle's range, copied into an agent-owned buffer that stays valid
        (and is not reused) until the with-block ends."""
        with self.frame_rows(handle, width, height) as frame:
            yield frame.whole()

    @contextmanager
    def frame_rows(self, handle: ShmHandle, width: int, height: int) -> Iterator[SegmentFrame]:
        """The HxWx3 image in the handle's range, read on demand: SegmentFrame.rows() copies a range of
        rows (a resize's row bands read their own rows, in parallel, while they are hot in the cache),
        SegmentFrame.whole() all of it. Valid until the with-block ends."""
        check_size(width, height)
        stride = row_stride(width, handle.size, height)
        segment = self._acquire(handle, writable=False)
        frame = SegmentFrame(self, segment, handle, width, height, stride)
        try:
            yield frame
        finally:
            frame._close()
            self._release(segment)

    # -- masks out -------------------------------------------------------------------------------
    @contextmanager
    def mask_target(self, handle: ShmHandle, nbytes: int) -> Iterator[MaskTarget]:
        """Open and check the mask segment for a mask of nbytes (before the model runs)."""
        if handle.size < nbytes:
            raise InvalidInput(f"mask shared memory handle {handle.name!r} has size {handle.size}, the mask needs "
                               f"{nbytes} bytes")
        segment = self._acquire(handle, writable=True)
        target = MaskTarget(self, segment, handle, nbytes)
        try:
            yield target
        finally:
            target._close()
            self._release(segment)

    def write(self, handle: ShmHandle, data: np.ndarray) -> None:
        """Copy an RGB888 mask into the client's segment at [offset, offset+nbytes)."""
        with self.mask_target(handle, data.nbytes) as target:
            target.commit(data)

    # -- descriptors -----------------------------------------------------------------------------
    def _acquire(self, handle: ShmHandle, *, writable: bool) -> _Segment:
        """An open, checked descriptor of the handle's segment; the caller must _release it."""
        name = handle.name
        path = shm_path(name)
        if handle.size <= 0:
            raise InvalidInput(f"shared memory handle {name!r} has size 0")
        try:
            # lstat never opens (so never blocks): it tells whether the name still is the segment
            # we have open, and gives today's mode and size. What a fresh open() returns is checked
            # again on its descriptor below, so a rename between the two cannot slip anything past.
            st = os.lstat(path)
        except FileNotFoundError:
            raise InvalidInput(f"shared memory segment {name!r} does not exist") from None
        except OSError as exc:
            raise InvalidInput(f"cannot open shared memory segment {name!r}: {exc.strerror}") from None
        self._check(st, handle, writable)
        key = (path, writable)
        with self._lock:
            segment = self._cache.get(key)
            if segment is not None and segment.dev == st.st_dev and segment.ino == st.st_ino:
                segment.users += 1
                self._cache.move_to_end(key)
                return segment
        segment = self._open(path, handle, writable)
        closing: list[int] = []
        with self._lock:
            old = self._cache.pop(key, None)
            if old is not None:
                closing += self._drop(old)
            self._cache[key] = segment
            while len(self._cache) > self._max:
                closing += self._drop(self._cache.popitem(last=False)[1])
        for fd in closing:
            os.close(fd)
        return segment

    def _open(self, path: str, handle: ShmHandle, writable: bool) -> _Segment:
        name = handle.name
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | _OPEN_FLAGS)
        except FileNotFoundError:
            raise InvalidInput(f"shared memory segment {name!r} does not exist") from None
        except PermissionError:
            raise InvalidInput(f"the agent may not {'write' if writable else 'read'} shared memory segment "
                               f"{name!r} (check its mode and owner)") from None
        except OSError as exc:  # ELOOP (a symlink), EISDIR, ENXIO (a socket), ...
            raise InvalidInput(f"cannot open shared memory segment {name!r}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)  # what was really opened: the name may have been renamed over since lstat
            self._check(st, handle, writable)
        except BaseException:
            os.close(fd)
            raise
        return _Segment(fd, st)

    def _check(self, st: os.stat_result, handle: ShmHandle, writable: bool) -> None:
        name = handle.name
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput(f"{name!r} is a {_kind(st.st_mode)}, not a shared memory segment")
        access = os.W_OK if writable else os.R_OK
        if not self.credentials.may(st, access):
            verb = "write" if writable else "read"
            raise InvalidInput(
                f"shared memory segment {name!r} (owner uid {st.st_uid}, group {st.st_gid}, mode "
                f"{stat.S_IMODE(st.st_mode):04o}) does not let the agent's user (uid {self.credentials.uid}) "
                f"{verb} it; the agent {verb}s only segments whose permission bits allow it, without root's "
                "override: give the agent's user or group access")
        if st.st_size == 0:
            raise InvalidInput(f"shared memory segment {name!r} is empty")
        if handle.offset + handle.size > st.st_size:
            raise InvalidInput(f"shared memory range offset {handle.offset} + size {handle.size} exceeds segment "
                               f"{name!r} of {st.st_size} bytes")

    def _release(self, segment: _Segment) -> None:
        with self._lock:
            segment.users -= 1
            closing = segment.dropped and segment.users == 0
        if closing:
            os.close(segment.fd)

    @staticmethod
    def _drop(segment: _Segment) -> list[int]:
        """Mark an evicted segment; its descriptor to close now if no request uses it (lock held)."""
        segment.dropped = True
        return [segment.fd] if segment.users == 0 else []

    # -- I/O -------------------------------------------------------------------------------------
    @staticmethod
    def _pread(segment: _Segment, buf: memoryview, handle: ShmHandle, start: int = 0) -> None:
        """Fill buf from the handle's range, `start` bytes into it."""
        done, total = 0, len(buf)
        try:
            while done < total:
                n = _preadv(segment.fd, buf[done:], handle.offset + start + done)
                if n == 0:  # end of file: the client shrank the segment since the checks
                    raise _changed(handle)
                done += n
        except OSError as exc:
            raise InvalidInput(f"cannot read shared memory segment {handle.name!r}: {exc.strerror}") from None

    @staticmethod
    def _pwritev(segment: _Segment, iovecs: list[memoryview], total: int, handle: ShmHandle) -> None:
        """Write the buffers one after another at the handle's offset (IOV_MAX at a time; a short write
        continues where it stopped)."""
        # A write past the end would grow the file again rather than fault; refuse a segment that
        # shrank below the handle's range instead of silently re-growing it. (A shrink in the
        # microseconds between this fstat and the write can only regrow the client's own file up
        # to the size it had when the request was checked.)
        try:
            if os.fstat(segment.fd).st_size < handle.offset + handle.size:
                raise _changed(handle)
            done, i = 0, 0
            while done < total:
                n = _pwritev_some(segment.fd, iovecs[i:i + _IOV_MAX], handle.offset + done)
                if n <= 0:
                    raise _changed(handle)
                done += n
                while n > 0:  # skip the buffers written; cut the one written partly
                    if n >= len(iovecs[i]):
                        n -= len(iovecs[i])
                        i += 1
                    else:
                        iovecs[i] = iovecs[i][n:]
                        n = 0
        except OSError as exc:
            raise InvalidInput(f"cannot write the mask into shared memory segment {handle.name!r}: "
                               f"{exc.strerror}") from None


def _changed(handle: ShmHandle) -> InvalidInput:
    return InvalidInput(f"shared memory segment {handle.name!r} changed size during the request: the range "
                        f"offset {handle.offset} + size {handle.size} is no longer inside it")


def _preadv(fd: int, buf: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buf], offset)
    data = os.pread(fd, len(buf), offset)  # platforms without preadv: one extra copy
    buf[:len(data)] = data
    return len(data)


def _pwritev_some(fd: int, buffers: list[memoryview], offset: int) -> int:
    if hasattr(os, "pwritev"):
        return os.pwritev(fd, buffers, offset)
    return os.pwrite(fd, b"".join(buffers), offset)  # platforms without pwritev: one extra copy


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symbolic link"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"
