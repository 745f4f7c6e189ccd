"""Per-iteration schedules of DINO/iBOT: learning rate, weight decay, EMA momentum and teacher temperatures.

Written as closed-form functions of the iteration (instead of DINO's precomputed numpy arrays) so that resuming at any
global step needs nothing but the step. The values equal DINO's `utils.cosine_scheduler` element by element.

One deliberate difference: iBOT warms the teacher temperature up per *epoch*; here it moves per *iteration* (linear
from the warm-up value at iteration 0 to the final value at iteration W-1, W = round(warmup_teacher_temp_epochs *
steps_per_epoch), then constant), which is smoother; both reach the final temperature when the warm-up ends.
"""
from __future__ import annotations

import math

from sslpipe.config import Config


def linear_warmup(it: int, start: float, end: float, n: int) -> float:
    """`np.linspace(start, end, n)[it]`: reaches `end` at it = n-1."""
    if n <= 1:
        return start
    return start + (end - start) * it / (n - 1)


def cosine_schedule(it: int, base: float, final: float, total: int, warmup: int = 0, warmup_start: float = 0.0) -> float:
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


class Schedules:
    """All per-iteration values the trainer and recipes need, from the config and the run's geometry.

    `steps_per_epoch` counts optimizer steps; `world_size` and `grad_accum_steps` enter the linear lr scaling rule
    lr = optim.lr * batch_size * world_size * grad_accum_steps / 256. Schedules span `train.epochs` epochs even when
    `train.max_steps` stops the run earlier.
    """

    def __init__(self, cfg: Config, steps_per_epoch: int, world_size: int = 1) -> None:
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        o, lo = cfg.optim, cfg.loss
        self.steps_per_epoch = steps_per_epoch
        self.total = cfg.train.epochs * steps_per_epoch
        self.base_lr = o.lr * cfg.data.batch_size * world_size * cfg.train.grad_accum_steps / 256.0
        self.min_lr = o.min_lr
        self.warmup = int(round(o.warmup_epochs * steps_per_epoch))
        self.wd, self.wd_end = o.weight_decay, o.weight_decay_end
        self.m0, self.m_end = o.momentum_teacher, o.momentum_teacher_end
        self.temp_warmup = int(round(lo.warmup_teacher_temp_epochs * steps_per_epoch))
        self.temp = (lo.warmup_teacher_temp, lo.teacher_temp)
        self.patch_temp = (lo.warmup_teacher_patch_temp, lo.teacher_patch_temp)

    def lr(self, it: int) -> float:
        return cosine_schedule(it, self.base_lr, self.min_lr, self.total, self.warmup, 0.0)

    def weight_decay(self, it: int) -> float:
        return cosine_schedule(it, self.wd, self.wd_end, self.total)

    def momentum(self, it: int) -> float:
        """m = m_end - (m_end - m0) * (1 + cos(pi * it / T)) / 2; with m_end = 1 that is 1 - (1-m0)(1+cos(pi it/T))/2."""
        return cosine_schedule(it, self.m0, self.m_end, self.total)

    def teacher_temp(self, it: int, patch: bool = False) -> float:
        start, end = self.patch_temp if patch else self.temp
        return linear_warmup(it, start, end, self.temp_warmup) if it < self.temp_warmup else end

    def __call__(self, it: int) -> dict[str, float]:
        return {
            "lr": self.lr(it),
            "weight_decay": self.weight_decay(it),
            "momentum": self.momentum(it),
            "teacher_temp": self.teacher_temp(it),
            "teacher_patch_temp": self.teacher_temp(it, patch=True),
            "epoch": it // self.steps_per_epoch,
            "it": it,
        }
