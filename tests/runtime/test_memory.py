"""Allocator tuning (agent/runtime/memory.py): frame-size buffers come from the reusable heap, not fresh mmaps."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from agent.runtime.memory import tune_malloc

ROOT = Path(__file__).resolve().parents[2]
glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")

# In a fresh process: where does glibc put a 1080p RGB buffer (6.2 MB)? Inside the brk heap it is
# reused after free(); outside it is a private mmap that is unmapped on free() and faults on every page
# of its next use.
PROBE = """
import ctypes, sys
sys.path.insert(0, {root!r})
from agent.runtime.memory import tune_malloc
tuned = tune_malloc({mb})
libc = ctypes.CDLL(None)
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.sbrk.argtypes = (ctypes.c_size_t,), (ctypes.c_ssize_t,)
start = libc.sbrk(0)
address = libc.malloc(1920 * 1080 * 3)
print(tuned, start - (1 << 30) < address < libc.sbrk(0))
"""


def _probe(mb: int) -> str:
    result = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), mb=mb)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_zero_leaves_the_allocator_alone() -> None:
    assert tune_malloc(0) is False


@glibc
def test_frame_size_buffers_come_from_the_heap_once_tuned() -> None:
    assert _probe(0) == "False False"  # glibc's default: a fresh mmap for every 6.2 MB buffer
    assert _probe(17) == "True True"  # the default
    assert _probe(32) == "True True"
    assert _probe(4) == "True False"  # a threshold below the buffer's size changes nothing for it
