"""Closed-form curves of the iteration that schedules are made of: linear warm-up and DINO's cosine.

Functions of the iteration (instead of DINO's precomputed numpy arrays), so that resuming at any global step needs
nothing but the step; the values equal DINO's `utils.cosine_scheduler` element by element. The engine builds the
learning rate and weight decay from them, the teacher-student recipes their EMA momentum and teacher temperatures.
"""
from __future__ import annotations

import math


def linear_warmup(it: int, start: float, end: float, n: int) -> float:
    """`np.linspace(start, end, n)[it]`: reaches `end` at it = n-1."""
    if n <= 1:
        return start
    return start + (end - start) * it / (n - 1)


def cosine_schedule(it: int, base: float, final: float, total: int, warmup: int = 0,
                    warmup_start: float = 0.0) -> float:
    """DINO `utils.cosine_scheduler(base, final, epochs, niter, warmup_epochs, start_warmup_value)[it]`.

    Warm-up: linear from `warmup_start` to `base` over `warmup` iterations (endpoint included); then
    final + (base - final) * (1 + cos(pi * i / (total - warmup))) / 2 with i = it - warmup. Past the end: `final`.
    """
    if it < warmup:
        return linear_warmup(it, warmup_start, base, warmup)
    n = total - warmup
    if n <= 0 or it >= total:
        return final
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * (it - warmup) / n))


def warmed_up(it: int, start: float, end: float, warmup: int, delay: int = 0) -> float:
    """`start` for the first `delay` iterations, then linear to `end` over `warmup` iterations, then `end`."""
    it -= delay
    if it < 0:
        return start
    return linear_warmup(it, start, end, warmup) if it < warmup else end
