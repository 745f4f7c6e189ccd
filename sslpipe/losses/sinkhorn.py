"""Sinkhorn-Knopp centering of teacher outputs (DINOv2: Oquab et al., "DINOv2: Learning Robust Visual Features
without Supervision", TMLR 2024, §4 after SwAV, Caron et al. 2020; official facebookresearch/dinov2
dinov2/loss/dino_clstoken_loss.py and ibot_patch_loss.py `sinkhorn_knopp_teacher`).

Replaces DINO's "subtract a running centre, then softmax" by a balanced soft assignment of the B teacher rows (of all
processes) to the K prototypes. The official code starts from Q = exp(t / tau)^T (K x B) normalised to sum 1 and
repeats n times (n = 3 in DINOv2)
    Q <- Q / (row sums) / K      (every prototype gets mass 1/K; row sums over all processes)
    Q <- Q / (column sums) / B   (every teacher row gets mass 1/B; B = the global row count)
and returns (B Q)^T, each row a distribution over the prototypes.

Computed here in the same order as scalings of a fixed matrix, P = diag(u) E diag(v) with E = exp(t / tau) (B x K):
v <- 1 / (E^T u) (all-reduced), u <- 1 / (E v), each a matrix-vector product, so a step reads E once instead of
rewriting the whole matrix (the teacher's patch logits are ~5000 x 65536 per GPU batch). Factors that the next
normalisation cancels are left out (the total, 1/K, 1/B, and exp(-max_k / tau) for each prototype k) and v is
rescaled to mean 1 (another), so the targets equal the official ones up to float rounding (tested). Two gains
beyond speed: the logits are shifted per prototype by their maximum over the global batch before the exponential,
so exp never overflows (the official code gives inf for logits above ~3.5 at tau = 0.04 in float32); and no row
count is needed. lightly's `swav_loss.sinkhorn` (the same values on one process, tested) sets B to the local rows
times the world size, which differs from the global count whenever processes hold different numbers of rows, as the
masked patches of the iBOT term do (tested over two processes).

Padded rows: ``valid`` (B,) marks the rows that count. The others (the zero-weight padding that keeps a batch's
masked-patch count fixed, `sslpipe.data.collate.mask_batch_fields`) start with u = 0, take no prototype mass and get
all-zero targets, so the valid rows' targets equal those computed without the padding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, teacher_temp: float | Tensor, n_iterations: int = 3,
                   valid: Tensor | None = None) -> Tensor:
    """Teacher targets (B, K) from this process's teacher logits (B, K); float32, rows sum to 1 (rows that
    ``valid`` (B,) marks False: 0, and they take no part). ``teacher_temp`` a number or a 0-d tensor (a compiled
    step takes it as a tensor, so that the warm-up schedule does not recompile it)."""
    if logits.dim() != 2:
        raise ValueError(f"sinkhorn_knopp expects logits (rows, prototypes), got shape {tuple(logits.shape)}")
    with torch.autocast(logits.device.type, enabled=False):  # keep the products in float32
        shift = (logits.amax(dim=0, keepdim=True).float() if logits.shape[0]
                 else logits.new_full((1, logits.shape[1]), float("-inf"), dtype=torch.float32))
        if valid is not None:  # padding repeats a counted row; a process with none counted leaves the max to others
            shift = torch.where(valid.any(), shift, float("-inf"))
        if _distributed():
            dist.all_reduce(shift, op=dist.ReduceOp.MAX)
        # E = exp((t - shift) / tau) in one pass from the (possibly half-precision) logits; each prototype's
        # largest entry over the global batch is 1
        if isinstance(teacher_temp, Tensor):  # a new tensor: float32 logits are the caller's (health metrics)
            e = (logits.float() - shift).div_(teacher_temp)
        else:
            e = torch.add(-shift / teacher_temp, logits, alpha=1.0 / teacher_temp)
        if valid is not None:  # no counted row anywhere: the shift is -inf; E = 1 then, and the targets 0
            e.clamp_(max=0.0)
        e.exp_()
        keep = e.new_ones(e.shape[0]) if valid is None else valid.to(e.dtype)
        u = keep
        tiny = torch.finfo(e.dtype).tiny
        for _ in range(n_iterations):
            mass = e.t().mv(u)  # per prototype
            if _distributed():
                dist.all_reduce(mass)
            v = torch.where(mass > 0, mass.reciprocal(), 0.0)  # 0: no counted row anywhere (padding alone)
            v /= v.mean().clamp(min=tiny)  # a scale the row step cancels: keeps u and v from drifting apart
            u = torch.where(keep > 0, e.mv(v).reciprocal(), 0.0)  # per teacher row; 0 for the padding
        return e.mul_(u.unsqueeze(1)).mul_(v)
