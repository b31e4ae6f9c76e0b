"""Process-wide allocator tuning for frame-size buffers (applied once by `edge-agent serve`).

Why: every byte_data request allocates frame-size buffers (the received message, protobuf's copy, the
mask, the serialised response: 0.9 MB each at 640x480, 6.2 MB at 1080p). glibc serves allocations above
its mmap threshold with a fresh mmap and returns them with munmap on free, so every 4 KiB page of every
such buffer faults on first touch, on every request. Its dynamic threshold only sometimes adapts (it
depends on the order of earlier frees), so the agent's speed depended on its allocation history: at
1080p the same agent took ~30 or ~4,000 page faults per request (and 2.0 or 3.1 CPU ticks) from one
start to the next (docs/benchmarks-notes.md). A fixed threshold above the frame size, with a trim
threshold above that, makes the freed buffers reusable by the next request.

Why 17 MiB: it covers 640x480 and 1080p frames and Pillow's image memory, which comes in blocks of
16 MiB (a 4096x4096 frame is four of them while it is resized). At 8 MiB those blocks were mmap'ed afresh
on every request: 16,388 page faults per 4096x4096 shm request and 2.2x the p50 of the untuned agent;
at 17 MiB 0.3 faults and 0.75x (A/B, side by side).

Memory: freed memory up to about `2 x threshold` per malloc arena stays mapped, and the agent's gRPC
threads use several arenas. Measured with 4 clients sending 4096x4096, 1080p and 640x480 frames inline
(a plateau in every case, not growth): 618-681 MB at 17 MiB, 245-252 MB at 8 MiB, 733-795 MB with
glibc's defaults, whose dynamic threshold climbs to 32 MiB by itself. Set MallocMmapThresholdMB 0 to
keep glibc's defaults, or lower it where memory matters more than big-frame speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

from agent.config import MAX_MMAP_THRESHOLD_MB

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold_mb: int) -> bool:
    """Set glibc's mmap and trim thresholds; False (and a log line) where that is not possible.
    0 leaves the allocator alone."""
    if mmap_threshold_mb <= 0:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError):
        log.info("not glibc (%s): allocator thresholds left as they are", name)
        return False
    threshold = min(mmap_threshold_mb, MAX_MMAP_THRESHOLD_MB) << 20  # AgentConfig already refuses more
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if not (mallopt(_M_MMAP_THRESHOLD, threshold) and mallopt(_M_TRIM_THRESHOLD, 2 * threshold)):
        log.warning("glibc %s refused mallopt thresholds of %d / %d bytes; defaults kept", version, threshold,
                    2 * threshold)
        return False
    log.info("glibc %s: buffers up to %d MiB are reused between requests (mmap threshold)", version,
             threshold >> 20)
    return True
