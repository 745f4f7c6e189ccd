"""Per-iteration learning rate and weight decay, plus the values a recipe schedules itself (EMA momentum, teacher
temperatures: `Recipe.schedule`), from the config and the run's geometry.

Fine-tuning recipes use the other learning-rate shapes of `optim.schedule` (step decay for ViTDet, poly for
Mask2Former and U2PL) and `optim.lr_scaling: none` (the published absolute rate).
"""
from __future__ import annotations

import math
from collections.abc import Callable

from sslpipe.config import RunConfig
from sslpipe.curves import cosine_schedule, linear_warmup

RecipeSchedule = Callable[[int, int, int], dict[str, float]]  # (it, steps_per_epoch, total) -> values


class Schedules:
    """All per-iteration values of a run.

    `steps_per_epoch` counts optimizer steps; `world_size` and `grad_accum_steps` enter the lr scaling rule: linear,
    lr = optim.lr * global batch / 256 (DINO/iBOT), or DINOv2's lr = optim.lr * sqrt(global batch / 1024), with
    global batch = batch_size * world_size * grad_accum_steps. Schedules span `train.epochs` epochs even when
    `train.max_steps` stops the run earlier. `recipe` adds the method's own values (`Recipe.schedule`).
    """

    def __init__(self, cfg: RunConfig, steps_per_epoch: int, world_size: int = 1,
                 recipe: RecipeSchedule | None = None) -> None:
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        o = cfg.optim
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
        self.recipe = recipe

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

    def __call__(self, it: int) -> dict[str, float]:
        values = {"lr": self.lr(it), "weight_decay": self.weight_decay(it),
                  "epoch": it // self.steps_per_epoch, "it": it}
        if self.recipe is not None:
            values.update(self.recipe(it, self.steps_per_epoch, self.total))
        return values
