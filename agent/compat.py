"""The few standard-library features newer than Python 3.8 (the oldest supported) that the agent relies on."""

from __future__ import annotations

import queue
import sys
from concurrent.futures import ThreadPoolExecutor


def shutdown_cancelling(executor: ThreadPoolExecutor, *, wait: bool) -> None:
    """executor.shutdown(wait=wait, cancel_futures=True): queued work is cancelled, running work finishes.

    Python 3.8 has no cancel_futures; there the queue is drained the way 3.9's implementation does it.
    """
    if sys.version_info >= (3, 9):
        executor.shutdown(wait=wait, cancel_futures=True)
        return
    while True:
        try:
            item = executor._work_queue.get_nowait()
        except queue.Empty:
            break
        if item is not None:
            item.future.cancel()
    executor.shutdown(wait=wait)
