"""DINO self-distillation loss (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021;
official facebookresearch/dino main_dino.py DINOLoss).

    P_t^q = softmax((t_q - C) / tau_t)   (detached; q = global views)
    log P_s^v = log_softmax(s_v / tau_s) (v = all student views)
    L = mean_{(q, v), v != q} mean_b [ - sum_k P_t^q[b, k] log P_s^v[b, k] ]
    C <- m C + (1 - m) mean over the global batch of t   (all-reduced across processes)

Equal in value to lightly's DINOLoss given the same centre (tested), but written here because lightly updates the
centre inside ``forward`` (no way to keep the loss and the centre update apart, e.g. under gradient accumulation)
and counts its temperature warm-up in epochs; here the teacher temperature comes from the trainer's per-iteration
schedule, each batch's teacher logits are recorded (``record_center``) and the centre moves once per optimizer step
(``update_center``, `sslpipe.losses.center`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslpipe.losses.center import move_center, pending_buffer, record_rows


def cross_view_ce(teacher_probs: Tensor, student_logp: Tensor) -> Tensor:
    """Mean over pairs (q, v != q) of the batch-mean cross-entropy.

    teacher_probs (Q, B, K), student_logp (V, B, K) with V >= Q and view q of both being the same crop.
    """
    Q, B = teacher_probs.shape[:2]
    V = student_logp.shape[0]
    n_terms = Q * V - Q
    if n_terms == 0:
        raise ValueError(f"the loss needs at least 2 views in total, got {Q} teacher and {V} student view(s)")
    with torch.autocast(teacher_probs.device.type, enabled=False):  # keep the K-long sums in float32
        ce = -torch.einsum("qbk,vbk->qv", teacher_probs.float(), student_logp.float()) / B
    same = torch.zeros_like(ce, dtype=torch.bool)
    same[torch.arange(Q), torch.arange(Q)] = True
    return ce.masked_fill(same, 0.0).sum() / n_terms


class DINOLoss(nn.Module):
    """DINO loss with a teacher centre (buffer ``center`` (1, K), checkpointed with the state dict)."""

    center: Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("pending", pending_buffer(out_dim), persistent=False)  # `sslpipe.losses.center`

    def forward(self, student_out: Tensor, teacher_out: Tensor, teacher_temp: float, n_crops: int,
                n_global: int) -> Tensor:
        """student_out (n_crops*B, K) crop-major, globals first; teacher_out (n_global*B, K) crop-major."""
        if student_out.shape[0] % n_crops or teacher_out.shape[0] != n_global * (student_out.shape[0] // n_crops):
            raise ValueError(f"DINOLoss: student_out {tuple(student_out.shape)} / teacher_out "
                             f"{tuple(teacher_out.shape)} do not hold {n_crops} / {n_global} crop-major views")
        B = student_out.shape[0] // n_crops
        t = F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1).detach()
        s = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
        return cross_view_ce(t.view(n_global, B, -1), s.view(n_crops, B, -1))

    def record_center(self, teacher_out: Tensor) -> None:
        """Count the batch's teacher logits towards the step's centre update (`update_center`)."""
        record_rows(self.pending, teacher_out)

    def update_center(self) -> None:
        """After the optimizer step: C <- m C + (1 - m) * the mean teacher logits of the step over all processes."""
        move_center(self.center, self.pending, self.center_momentum)
