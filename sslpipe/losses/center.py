"""The teacher centre of DINO, iBOT and DINOv2's softmax centering, moved once per optimizer step.

    C <- m C + (1 - m) mean of the teacher rows of the step, over all processes

The official loops update it inside the loss's forward, once per step, as they take one batch per step. Under
gradient accumulation a step is several batches: their rows are summed as they come (`record_rows`, into a pending
(1, K + 1) buffer: the sum and, last, the count) and the centre moves once, after the optimizer step
(`move_center`), as it would for the whole batch at once. Each batch of the step is centred with the step's centre,
as the rows of one large batch are. One all-reduce carries sums and counts together.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def pending_buffer(width: int) -> Tensor:
    """A (1, width + 1) zero buffer: the sum of the rows recorded since the centre last moved, and their count."""
    return torch.zeros(1, width + 1)


@torch.no_grad()
def record_rows(pending: Tensor, rows: Tensor, weight: Tensor | None = None) -> None:
    """Add `rows` (N, K) to `pending`; `weight` (N,): rows of weight 0 (padding) are left out. No host sync."""
    rows = rows.float()
    if weight is None:
        pending[:, :-1] += rows.sum(dim=0, keepdim=True)
        pending[:, -1] += rows.shape[0]
    else:
        counted = (weight > 0).float()
        pending[:, :-1] += (counted @ rows).unsqueeze(0)
        pending[:, -1] += counted.sum()


@torch.no_grad()
def move_center(center: Tensor, pending: Tensor, momentum: float, per_process: bool = False) -> None:
    """center <- momentum * center + (1 - momentum) * the mean of the pending rows over all processes; pending is
    cleared. `per_process`: the mean of each process's own mean (DINOv2's patch centre, `ibot_patch_loss.py`
    `apply_center_update`), else of all rows (DINO's `update_center`). Nothing pending: the centre stays."""
    total = pending.clone()
    if per_process:
        count = total[:, -1:]
        total = torch.cat([total[:, :-1] / count.clamp(min=1), (count > 0).float()], dim=1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    count = total[:, -1:]
    mean = (total[:, :-1] / count.clamp(min=1)).view_as(center)
    center.copy_(torch.where(count.view(-1)[0] > 0, momentum * center + (1 - momentum) * mean, center))
    pending.zero_()
