"""Side-by-side timing shared by the benchmarks: two steps timed in alternation, GPU work waited for."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch


def time_interleaved(a: Callable[[], Any], b: Callable[[], Any], warmup: int, steps: int,
                     device: torch.device) -> tuple[list[float], list[float], Any, Any]:
    """Seconds per call of `a` and of `b`, alternating so that both see the same machine load (2 shared cores drift
    a lot); the first `warmup` calls of each are not timed. Also returns the first call's result of each."""
    first_a, first_b = a(), b()
    for _ in range(max(0, warmup - 1)):
        a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(steps):
        for fn, out in ((a, times[0]), (b, times[1])):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out.append(time.perf_counter() - t0)
    return times[0], times[1], first_a, first_b
