"""Per-iteration schedules of DINO/iBOT: learning rate, weight decay, EMA momentum and teacher temperatures.

Written as closed-form functions of the iteration (instead of DINO's precomputed numpy arrays) so that resuming at any
global step needs nothing but the step. The values equal DINO's `utils.cosine_scheduler` element by element.

One deliberate difference: iBOT warms the teacher temperature up per *epoch*; here it moves per *iteration* (linear
from the warm-up value at iteration 0 to the final value at iteration W-1, W = round(warmup_teacher_temp_epochs *
steps_per_epoch), then constant), which is smoother; both reach the final temperature when the warm-up ends. As in
iBOTLoss, the patch temperature is held at its warm-up value for `masking.pred_start_epoch` epochs and only then
warms up (the CLS temperature starts at once).

Fine-tuning recipes use the other learning-rate shapes of `optim.schedule` (step decay for ViTDet, poly for
Mask2Former and U2PL) and `optim.lr_scaling: none` (the published absolute rate).
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

    `steps_per_epoch` counts optimizer steps; `world_size` and `grad_accum_steps` enter the lr scaling rule: linear,
    lr = optim.lr * global batch / 256 (DINO/iBOT), or DINOv2's lr = optim.lr * sqrt(global batch / 1024), with
    global batch = batch_size * world_size * grad_accum_steps. Schedules span `train.epochs` epochs even when
    `train.max_steps` stops the run earlier.
    """

    def __init__(self, cfg: Config, steps_per_epoch: int, world_size: int = 1) -> None:
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        o, lo = cfg.optim, cfg.loss
        self.steps_per_epoch = steps_per_epoch
        self.total = cfg.train.epochs * steps_per_epoch
        self.global_batch = cfg.data.batch_size * world_size * cfg.train.grad_accum_steps
        self.base_lr = {"linear": o.lr * self.global_batch / 256.0,
                        "sqrt_wrt_1024": o.lr * math.sqrt(self.global_batch / 1024.0)}.get(o.lr_scaling, o.lr)
        self.min_lr = o.min_lr
        self.shape = o.schedule
        self.warmup = o.warmup_iters if o.warmup_iters is not None else int(round(o.warmup_epochs * steps_per_epoch))
        self.milestones = sorted(int(round(e * steps_per_epoch)) for e in o.step_epochs)
        self.gamma, self.power = o.step_gamma, o.poly_power
        self.wd, self.wd_end = o.weight_decay, o.weight_decay_end
        self.m0, self.m_end = o.momentum_teacher, o.momentum_teacher_end
        self.temp_warmup = int(round(lo.warmup_teacher_temp_epochs * steps_per_epoch))
        self.patch_temp_start = int(round(cfg.masking.pred_start_epoch * steps_per_epoch))
        self.temp = (lo.warmup_teacher_temp, lo.teacher_temp)
        self.patch_temp = (lo.warmup_teacher_patch_temp, lo.teacher_patch_temp)

    def lr(self, it: int) -> float:
        """Linear warm-up from 0, then the configured shape; `lr_scale` of a parameter group multiplies this."""
        if self.shape == "cosine":
            return cosine_schedule(it, self.base_lr, self.min_lr, self.total, self.warmup, 0.0)
        if it < self.warmup:
            return linear_warmup(it, 0.0, self.base_lr, self.warmup)
        if self.shape == "step":
            return self.base_lr * self.gamma ** sum(it >= m for m in self.milestones)
        if self.shape == "poly":
            n = max(self.total - self.warmup, 1)
            frac = min(max(it - self.warmup, 0) / n, 1.0)
            return self.min_lr + (self.base_lr - self.min_lr) * (1.0 - frac) ** self.power
        return self.base_lr

    def weight_decay(self, it: int) -> float:
        return cosine_schedule(it, self.wd, self.wd_end, self.total)

    def momentum(self, it: int) -> float:
        """m = m_end - (m_end - m0) * (1 + cos(pi * it / T)) / 2; with m_end = 1 that is 1 - (1-m0)(1+cos(pi it/T))/2."""
        return cosine_schedule(it, self.m0, self.m_end, self.total)

    def teacher_temp(self, it: int, patch: bool = False) -> float:
        """CLS: warm-up from iteration 0. Patch: held at its warm-up value until pred_start_epoch, then warms up."""
        start, end = self.patch_temp if patch else self.temp
        if patch:
            if it < self.patch_temp_start:
                return start
            it -= self.patch_temp_start
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
