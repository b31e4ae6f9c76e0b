"""Input bitmaps (RGB888 from bytes or client-owned POSIX shared memory) and mask output.

Pixels are viewed in place (np.frombuffer / mmap), never copied before pre-processing.
Shared-memory segments belong to the client: we open them read-only (the mask segment
read-write), map only [offset, offset+size) and never unlink them.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInput

MIN_SIDE = 64
MAX_SIDE = 4096
SHM_DIR = "/dev/shm"
# shm_open names: one leading slash at most, then a plain file name.
_SHM_NAME = re.compile(r"^/?[A-Za-z0-9_.\-]{1,250}$")


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


def as_image(buffer: bytes | memoryview | mmap.mmap, width: int, height: int, offset: int = 0,
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


@contextmanager
def map_shm(handle: ShmHandle, *, writable: bool = False) -> Iterator[tuple[mmap.mmap, int]]:
    """Map the segment's [offset, offset+size) range; yields (mmap, start of the range inside it)."""
    path = shm_path(handle.name)
    if handle.size <= 0:
        raise InvalidInput(f"shared memory handle {handle.name!r} has size 0")
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidInput(f"shared memory segment {handle.name!r} does not exist") from None
    except PermissionError:
        raise InvalidInput(f"the agent may not {'write' if writable else 'read'} shared memory segment "
                           f"{handle.name!r} (check its mode and owner)") from None
    except OSError as exc:
        raise InvalidInput(f"cannot open shared memory segment {handle.name!r}: {exc.strerror}") from None
    try:
        seg_size = os.fstat(fd).st_size
        if handle.offset + handle.size > seg_size:
            raise InvalidInput(f"shared memory range offset {handle.offset} + size {handle.size} exceeds segment "
                               f"{handle.name!r} of {seg_size} bytes")
        # mmap offsets must be page aligned: map from the page holding `offset`.
        start = handle.offset - handle.offset % mmap.ALLOCATIONGRANULARITY
        delta = handle.offset - start
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mm = mmap.mmap(fd, delta + handle.size, flags=mmap.MAP_SHARED, prot=prot, offset=start)
    finally:
        os.close(fd)
    try:
        yield mm, delta
    finally:
        try:
            mm.close()
        except BufferError:
            # A view is still alive (an exception traceback holds it); unmapping happens when it dies.
            pass


@contextmanager
def shm_buffer(handle: ShmHandle, nbytes: int) -> Iterator[memoryview]:
    """A writable view of [offset, offset+nbytes) of the client's segment, so a mask can be rendered
    straight into it (no intermediate bytes, no second copy)."""
    if handle.size < nbytes:
        raise InvalidInput(f"mask shared memory handle {handle.name!r} has size {handle.size}, the mask needs "
                           f"{nbytes} bytes")
    with map_shm(handle, writable=True) as (mm, delta):
        base = memoryview(mm)
        view = base[delta:delta + nbytes]
        try:
            yield view
        finally:
            for v in (view, base):
                try:
                    v.release()
                except BufferError:
                    pass  # an array over it is still alive (a traceback holds it); map_shm copes


def write_shm(handle: ShmHandle, data: np.ndarray) -> None:
    """Copy an RGB888 mask into the client's segment at [offset, offset+size)."""
    nbytes = data.nbytes
    if handle.size < nbytes:
        raise InvalidInput(f"mask shared memory handle {handle.name!r} has size {handle.size}, the mask needs "
                           f"{nbytes} bytes")
    with map_shm(handle, writable=True) as (mm, delta):
        target = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=delta)
        target[:] = data.reshape(-1)
        del target
