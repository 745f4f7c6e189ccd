"""The recipe's metrics of one log line: each the mean over the window's steps and over the processes, as the loss is.

A recipe returns its metrics (iBOT's `loss_cls` / `loss_patch`, the Q-score terms, the health metrics) at every step
as 0-d tensors on the device. Logging only the last step's values of the main process would make the parts of the
loss not add up to the logged loss, and make them as noisy as one batch. They are summed on the device (no host
synchronisation inside a step) and averaged at the log step, with one reduce over the processes for the metrics every
process has (an occasional metric, such as a health metric computed at some steps only, is the mean of the steps
that computed it).
"""
from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import gather_object


class MetricWindow:
    """`add(metrics)` at each step, `means(accelerator)` at the log step (then the window starts again)."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self, accelerator: Any) -> dict[str, float]:
        """{metric: mean over this window's steps, and over the processes where every one has it}; resets."""
        local = {key: self.sums[key] / self.counts[key] for key in sorted(self.sums)}
        self.sums, self.counts = {}, {}
        shared = list(local)
        if accelerator.num_processes > 1:  # a collective needs the same keys, in the same order, on every process
            everyone = gather_object([shared])
            shared = [key for key in shared if all(key in keys for keys in everyone)]
        out = {key: float(value) for key, value in local.items() if key not in shared}
        if shared:
            stacked = torch.stack([torch.as_tensor(local[key], dtype=torch.float32).to(accelerator.device)
                                   for key in shared])
            out.update(zip(shared, accelerator.reduce(stacked, "mean").tolist()))
        return out
