"""agent.core.frames against real POSIX shared-memory files in /dev/shm: frames copied into agent-owned
buffers, masks written with pwrite, descriptors cached per name, and every way a client's segment can
be hostile (shrunk, swapped for a FIFO, a directory, a device, a symlink, or not the client's to give)."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.core.frames import BufferPool, Credentials, SharedMemory, ShmHandle, _Segment
from agent.errors import InvalidInput

NOBODY = 65534
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="chown/mknod to another user needs root")


@pytest.fixture
def shm_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """A unique /dev/shm name, removed (whatever it became) after the test."""
    name = f"ea-frames-{os.getpid()}-{request.node.name[:40]}"
    yield "/" + name
    path = Path("/dev/shm", name)
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    elif path.exists() or path.is_symlink():
        path.unlink()


def segment(name: str, data: bytes, mode: int = 0o600) -> Path:
    path = Path("/dev/shm", name.lstrip("/"))
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, mode)
    try:
        os.pwrite(fd, data, 0)
        os.fchmod(fd, mode)  # not narrowed by the umask
    finally:
        os.close(fd)
    return path


def image(width: int = 80, height: int = 64) -> np.ndarray:
    return np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)


def open_fds() -> int:
    """Descriptors this process has open on this module's segments (other threads' files don't count)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("/dev/shm/ea-frames-")
        except OSError:  # closed since listed
            pass
    return count


def test_frame_is_copied_from_the_range_into_an_agent_buffer(shm_name):
    img = image()
    offset = 4096 + 100  # not page aligned: nothing is mapped, so nothing needs to be
    path = segment(shm_name, b"\xee" * offset + img.tobytes() + b"\xee" * 10)
    shm = SharedMemory()
    handle = ShmHandle(shm_name, img.nbytes, offset)
    with shm.frame(handle, 80, 64) as frame:
        assert np.array_equal(frame, img)
        # A copy: the client rewriting its segment mid-request cannot change what the model sees.
        os.truncate(path, 0)
        assert np.array_equal(frame, img)


def test_padded_rows_from_shared_memory(shm_name):
    img = image(65, 64)  # 195 bytes a row, padded to 196
    padded = np.full((64, 196), 7, np.uint8)
    padded[:, :195] = img.reshape(64, -1)
    segment(shm_name, padded.tobytes())
    with SharedMemory().frame(ShmHandle(shm_name, padded.nbytes, 0), 65, 64) as frame:
        assert np.array_equal(frame, img)


def test_rows_of_a_segment_frame_are_read_on_demand_from_any_thread(shm_name):
    """frame_rows(): row ranges (packed or padded rows, at an offset) copied into pooled agent buffers when
    asked for, from several threads at once; whole() once; every buffer back in the pool afterwards."""
    img = image(65, 120)  # 195 bytes a row, padded to 196
    padded = np.full((120, 196), 7, np.uint8)
    padded[:, :195] = img.reshape(120, -1)
    segment(shm_name, b"\xee" * 333 + padded.tobytes())
    shm = SharedMemory(pool=BufferPool())
    got: dict[tuple[int, int], bool] = {}
    with shm.frame_rows(ShmHandle(shm_name, padded.nbytes, 333), 65, 120) as frame:
        assert frame.shape == (120, 65, 3)

        def read(first: int, stop: int) -> None:
            for _ in range(50):
                with frame.rows(first, stop) as rows:
                    got[first, stop] = got.get((first, stop), True) and np.array_equal(rows, img[first:stop])

        threads = [threading.Thread(target=read, args=r) for r in ((0, 7), (5, 64), (60, 120), (119, 120))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == {(0, 7): True, (5, 64): True, (60, 120): True, (119, 120): True}
        assert np.array_equal(frame.whole(), img) and frame.whole() is not None
        with pytest.raises(ValueError, match="not inside a frame of 120 rows"):
            with frame.rows(100, 121):
                pass
    # The whole-frame buffer and the row buffers (at least the largest) are back in the pool.
    assert shm.pool.idle_bytes >= padded.nbytes + 60 * 196


def test_rows_read_after_the_segment_shrank_are_invalid_argument(shm_name):
    img = image(80, 100)
    path = segment(shm_name, img.tobytes())
    with SharedMemory().frame_rows(ShmHandle(shm_name, img.nbytes, 0), 80, 100) as frame:
        with frame.rows(0, 10) as rows:
            assert np.array_equal(rows, img[:10])
        os.truncate(path, 80 * 3 * 50)  # the client shrinks it mid-request: half the rows are gone
        with frame.rows(10, 50) as rows:
            assert np.array_equal(rows, img[10:50])
        with pytest.raises(InvalidInput, match="changed size during the request"):
            with frame.rows(40, 60):
                pass
        with pytest.raises(InvalidInput, match="changed size during the request"):
            frame.whole()


def test_descriptor_is_kept_while_the_name_is_the_same_segment_and_reopened_when_replaced(shm_name):
    img = image()
    segment(shm_name, img.tobytes())
    shm = SharedMemory()
    handle = ShmHandle(shm_name, img.nbytes, 0)
    before = open_fds()
    for _ in range(5):
        with shm.frame(handle, 80, 64):
            pass
    assert shm.open_segments == 1 and open_fds() == before + 1
    # Grown in place: same inode, same descriptor, new bytes read.
    bigger = image(96, 64)
    segment_path = Path("/dev/shm", shm_name.lstrip("/"))
    fd = os.open(segment_path, os.O_RDWR)
    os.pwrite(fd, bigger.tobytes(), 0)
    os.close(fd)
    with shm.frame(ShmHandle(shm_name, bigger.nbytes, 0), 96, 64) as frame:
        assert np.array_equal(frame, bigger)
    assert open_fds() == before + 1
    # Recreated under the same name (a new inode): reopened, the old descriptor closed.
    segment_path.unlink()
    other = image(80, 64)[::-1].copy()
    segment(shm_name, other.tobytes())
    with shm.frame(handle, 80, 64) as frame:
        assert np.array_equal(frame, other)
    assert open_fds() == before + 1
    shm.close()
    assert open_fds() == before


def test_cache_is_bounded_and_a_segment_in_use_is_closed_only_by_its_last_user(shm_name):
    img = image()
    names = [f"{shm_name}-{i}" for i in range(4)]
    for name in names:
        segment(name, img.tobytes())
    try:
        shm = SharedMemory(max_segments=2)
        before = open_fds()
        with shm.frame(ShmHandle(names[0], img.nbytes, 0), 80, 64) as held:
            for name in names[1:]:  # evicts names[0] while it is still being used
                with shm.frame(ShmHandle(name, img.nbytes, 0), 80, 64):
                    pass
            assert np.array_equal(held, img)
            assert open_fds() == before + 3  # two cached + the evicted one still in use
        assert open_fds() == before + 2
    finally:
        for name in names:
            os.unlink("/dev/shm" + name)


def test_shrunk_between_the_checks_and_the_read_is_invalid_argument_not_sigbus(shm_name):
    img = image()
    path = segment(shm_name, img.tobytes())

    class ShrinkingClient(SharedMemory):
        """Shrinks the segment right after it was opened and checked: the window in which a mapped
        segment would have faulted (SIGBUS) on the next access."""

        def _acquire(self, handle: ShmHandle, *, writable: bool) -> _Segment:
            opened = super()._acquire(handle, writable=writable)
            os.truncate(path, 100)
            return opened

    with pytest.raises(InvalidInput, match="changed size during the request"):
        with ShrinkingClient().frame(ShmHandle(shm_name, img.nbytes, 0), 80, 64):
            pass
    # And the plain case: already smaller when the request arrives.
    with pytest.raises(InvalidInput, match="exceeds segment"):
        with SharedMemory().frame(ShmHandle(shm_name, img.nbytes, 0), 80, 64):
            pass


def test_mask_is_written_at_the_offset_and_a_shrunk_mask_segment_is_not_regrown(shm_name):
    path = segment(shm_name, b"\x11" * 200)
    shm = SharedMemory()
    mask = np.arange(96, dtype=np.uint8)
    handle = ShmHandle(shm_name, 100, 50)
    with shm.mask_target(handle, mask.nbytes) as target:
        target.buffer[:] = mask
        target.commit()
    data = path.read_bytes()
    assert data[:50] == b"\x11" * 50 and data[50:146] == mask.tobytes() and data[146:] == b"\x11" * 54
    shm.write(handle, mask[::-1].copy())
    assert path.read_bytes()[50:146] == mask[::-1].tobytes()
    with shm.mask_target(handle, mask.nbytes) as target:
        os.truncate(path, 60)  # the client shrinks it while the model runs
        with pytest.raises(InvalidInput, match="changed size during the request"):
            target.commit()
    assert path.stat().st_size == 60


def test_mask_too_small_for_the_mask(shm_name):
    segment(shm_name, b"\0" * 100)
    with pytest.raises(InvalidInput, match="has size 100, the mask needs 300 bytes"):
        with SharedMemory().mask_target(ShmHandle(shm_name, 100, 0), 300):
            pass


def test_fifo_directory_symlink_are_refused_without_blocking(shm_name):
    path = Path("/dev/shm", shm_name.lstrip("/"))
    shm = SharedMemory()
    handle = ShmHandle(shm_name, 80 * 64 * 3, 0)

    def refused(match: str) -> None:
        for writable in (False, True):
            with pytest.raises(InvalidInput, match=match):
                if writable:
                    with shm.mask_target(handle, handle.size):
                        pass
                else:
                    with shm.frame(handle, 80, 64):
                        pass

    os.mkfifo(path)
    refused("is a FIFO, not a shared memory segment")
    # The race the lstat cannot see: the name is a FIFO by the time it is opened. The open must not
    # block (no writer will ever come) and what was opened is refused on its descriptor.
    for writable in (False, True):
        done: list[BaseException] = []

        def race(w: bool = writable, out: list[BaseException] = done) -> None:
            try:
                shm._open(str(path), handle, w)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                out.append(exc)

        t = threading.Thread(target=race, daemon=True)
        t.start()
        t.join(5)
        assert not t.is_alive(), "open() of a FIFO blocked"
        assert isinstance(done[0], InvalidInput) and "is a FIFO" in done[0].message
    path.unlink()
    path.mkdir()
    refused("is a directory")
    path.rmdir()
    target = segment(shm_name + "-target", b"\0" * handle.size)
    try:
        path.symlink_to(target)
        refused("is a symbolic link")
        with pytest.raises(InvalidInput, match="cannot open"):  # O_NOFOLLOW, should it get that far
            shm._open(str(path), handle, False)
    finally:
        target.unlink()


@ROOT_ONLY
def test_device_node_is_refused(shm_name):
    path = Path("/dev/shm", shm_name.lstrip("/"))
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero: reads would "succeed" forever
    handle = ShmHandle(shm_name, 80 * 64 * 3, 0)
    with pytest.raises(InvalidInput, match="is a character device"):
        with SharedMemory().frame(handle, 80, 64):
            pass
    with pytest.raises(InvalidInput, match="is a character device"):
        SharedMemory()._open(str(path), handle, True)


def test_permission_bits_decide_without_privileges(shm_name):
    path = segment(shm_name, b"\0" * 300, mode=0o644)
    st = path.stat()
    me = Credentials(st.st_uid, frozenset({st.st_gid}))
    stranger = Credentials(st.st_uid + 12345, frozenset({st.st_gid + 12345}))
    member = Credentials(st.st_uid + 12345, frozenset({st.st_gid}))
    assert me.may(st, os.R_OK) and me.may(st, os.W_OK)
    assert stranger.may(st, os.R_OK) and not stranger.may(st, os.W_OK)
    os.chmod(path, 0o460)  # owner r only, group rw: the owner is judged by the owner bits alone
    st = path.stat()
    assert me.may(st, os.R_OK) and not me.may(st, os.W_OK)
    assert member.may(st, os.R_OK | os.W_OK) and not stranger.may(st, os.R_OK)

    # Through SharedMemory, with the credentials of a user who is not the owner.
    os.chmod(path, 0o644)
    as_stranger = SharedMemory(credentials=stranger)
    assert as_stranger._acquire(ShmHandle(shm_name, 300, 0), writable=False)  # others may read: so may we
    with pytest.raises(InvalidInput, match=r"mode 0644\) does not let the agent's user .* write it"):
        with as_stranger.mask_target(ShmHandle(shm_name, 300, 0), 300):
            pass


@ROOT_ONLY
def test_root_agent_does_not_use_its_override(shm_name):
    """Running as root, the agent reads and writes only what the permission bits allow root's own
    uid and groups: not another user's private segment, not a root-owned read-only mask target."""
    img = image(64, 64)
    shm = SharedMemory()
    assert shm.credentials.uid == 0
    path = segment(shm_name, img.tobytes(), mode=0o600)
    os.chown(path, NOBODY, NOBODY)
    handle = ShmHandle(shm_name, img.nbytes, 0)
    with pytest.raises(InvalidInput, match=r"owner uid 65534, group 65534, mode 0600\) does not let the agent's "
                                           r"user \(uid 0\) read it"):
        with shm.frame(handle, 64, 64):
            pass
    os.chmod(path, 0o604)  # world-readable: any client could read it itself
    with shm.frame(handle, 64, 64) as frame:
        assert np.array_equal(frame, img)
    # A mask target owned by root, read-only: refused, and not touched.
    os.chown(path, 0, 0)
    os.chmod(path, 0o400)
    with pytest.raises(InvalidInput, match="write it"):
        with shm.mask_target(handle, img.nbytes):
            pass
    assert path.read_bytes() == img.tobytes()
    # Refused on the cached descriptor too: the mode is checked on every request, not once.
    os.chmod(path, 0o600)
    with shm.mask_target(handle, img.nbytes):
        pass
    os.chmod(path, 0o400)
    with pytest.raises(InvalidInput, match="write it"):
        with shm.mask_target(handle, img.nbytes):
            pass


def test_buffer_pool_reuses_and_bounds_idle_memory():
    pool = BufferPool(max_idle_bytes=1000)
    a = pool.acquire(600)
    base = a.base
    pool.release(a)
    b = pool.acquire(500)  # fits in the idle 600-byte buffer: reused
    assert b.base is base and b.size == 500
    c = pool.acquire(600)  # the other is taken: a new one
    assert c.base is not base
    pool.release(b)
    pool.release(c)
    assert pool.idle_bytes <= 1000  # two 600-byte buffers do not both stay
    big = pool.acquire(5000)
    pool.release(big)  # larger than the whole bound: never kept
    assert pool.idle_bytes <= 1000


def test_mask_rows_are_repeated_into_the_segment_with_pwritev(shm_name):
    # 3 distinct rows repeated into 2,500 target rows: more iovecs than one pwritev call takes (1024).
    rows = np.arange(3 * 12, dtype=np.uint8).reshape(3, 12)
    runs = (1000, 0, 1500)
    nbytes = 12 * sum(runs)
    path = segment(shm_name, b"\x11" * (nbytes + 40))
    handle = ShmHandle(shm_name, nbytes, 20)
    shm = SharedMemory()
    with shm.mask_target(handle, nbytes) as target:
        target.write_rows(rows, runs)
        target.commit()
    assert shm.pool.idle_bytes == 0  # no agent buffer of the mask's size was taken
    data = path.read_bytes()
    expected = np.repeat(rows, runs, axis=0).tobytes()
    assert data[:20] == b"\x11" * 20 and data[20:20 + nbytes] == expected and data[20 + nbytes:] == b"\x11" * 20
    with shm.mask_target(handle, nbytes) as target:
        target.write_rows(rows, runs)
        os.truncate(path, 60)  # shrunk while the model ran: refused, not regrown
        with pytest.raises(InvalidInput, match="changed size during the request"):
            target.commit()
    assert path.stat().st_size == 60
    with pytest.raises(ValueError, match="2 runs for 3 rows"):
        with shm.mask_target(ShmHandle(shm_name, 60, 0), 36) as target:
            target.write_rows(rows, (1, 2))
