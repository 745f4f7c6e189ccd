"""Peak memory of a call as the operating system sees it: the rise of the process's resident set size (RSS) over its
value just before the call, sampled by a thread every few milliseconds. RSS rather than tracemalloc, because faiss
and BLAS allocate outside Python's allocator; large buffers are mapped and unmapped whole, so a call that follows
another starts from the same baseline once the first one's buffers are freed."""
from __future__ import annotations

import gc
import threading
import time
from typing import Any, Callable

import psutil

SAMPLE_S = 0.005


def peak_rss_increase(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(fn's result, seconds it took, peak RSS increase in MB during it)."""
    gc.collect()
    process = psutil.Process()
    base = peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(SAMPLE_S)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        watcher.join()
    peak = max(peak, process.memory_info().rss)
    return result, seconds, (peak - base) / 2**20
