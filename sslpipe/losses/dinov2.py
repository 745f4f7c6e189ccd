"""DINOv2 loss (Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024, §4; official
facebookresearch/dinov2 dinov2/train/ssl_meta_arch.py `forward_backward`, dinov2/loss/*.py).

Teacher targets P_t come from the teacher's logits t by one of two centerings, with one temperature tau_t for CLS and
patches:
    softmax:         P_t = softmax((t - C) / tau_t), C a running mean (DINO / iBOT, momentum 0.9)
    sinkhorn_knopp:  P_t = SK(t / tau_t), 3 iterations over the global batch (`sslpipe.losses.sinkhorn`)
and the student's log-probabilities are log_softmax(s / tau_s), tau_s = 0.1. Then
    L_dino  = mean over pairs (teacher global view q, student view v != q) of mean_b CE(P_t[q, b], s[v, b])
    L_ibot  = 1/(n_global * B) * sum over masked patches i of image b: CE(P_t^patch[i], s^patch[i]) / #masked(b)
    L_koleo = sum over global crops c of KoLeo(student backbone CLS tokens of crop c)   (`sslpipe.losses.koleo`)
    L = w_dino * L_dino + w_ibot * L_ibot + w_koleo * L_koleo      (1, 1, 0.1)
The patch targets and predictions exist only at masked positions: the teacher sees the unmasked crop and both heads
read the tokens where the student saw the mask token. Images without a mask contribute 0 to L_ibot but count in the
n_global * B divisor (the official `forward_masked` divides by all global crops).

Centres (softmax centering only; SK needs none), updated after the step: C_cls (1, K) <- the global-batch mean of the
teacher CLS logits; C_patch (1, 1, Kp) <- the mean of the teacher logits over the masked patches (each process's
mean, averaged over processes, as the official `reduce_center_update`). DINOv2's iBOT centre thus differs from
iBOT's (`sslpipe.losses.ibot`: each image's mean over ALL its patches).

Deviation: without local crops the official code divides the two global-pair terms by 3 (its local-term count is
`max(n_local * 2, 1)`); here L_dino is always the mean over the pairs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslpipe.data.collate import mask_weights
from sslpipe.losses.center import move_center, pending_buffer, record_rows
from sslpipe.losses.dino import cross_view_ce
from sslpipe.losses.koleo import KoLeoLoss
from sslpipe.losses.sinkhorn import sinkhorn_knopp

Centering = Literal["sinkhorn_knopp", "softmax"]


class DINOv2Loss(nn.Module):
    """DINO CLS + iBOT masked-patch distillation + KoLeo; buffers ``center`` (1, K) and ``center2`` (1, 1, Kp)."""

    center: Tensor
    center2: Tensor

    def __init__(self, out_dim: int, patch_out_dim: int, n_global: int, n_local: int, *,
                 centering: Centering = "sinkhorn_knopp", sinkhorn_iterations: int = 3, student_temp: float = 0.1,
                 center_momentum: float = 0.9, center_momentum2: float = 0.9, dino_weight: float = 1.0,
                 ibot_weight: float = 1.0, koleo_weight: float = 0.1, padded_rows: bool = False) -> None:
        super().__init__()
        if n_global < 1 or n_global + n_local < 2:
            raise ValueError(f"DINOv2Loss needs >= 1 global crop and >= 2 crops in all, got {n_global}+{n_local}")
        if centering not in ("sinkhorn_knopp", "softmax"):
            raise ValueError(f"DINOv2Loss: centering must be 'sinkhorn_knopp' or 'softmax', got {centering!r}")
        self.n_global, self.n_local = n_global, n_local
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations
        self.student_temp = student_temp
        self.center_momentum, self.center_momentum2 = center_momentum, center_momentum2
        self.dino_weight, self.ibot_weight, self.koleo_weight = dino_weight, ibot_weight, koleo_weight
        # the patch rows may hold padding of weight 0 (`dinov2.pad_masked_patches`), which Sinkhorn-Knopp must leave
        # out; without it Sinkhorn-Knopp is not told (it would cost a pass over the (M, Kp) logits)
        self.padded_rows = padded_rows
        self.koleo = KoLeoLoss()
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim))
        self.register_buffer("pending", pending_buffer(out_dim), persistent=False)  # `sslpipe.losses.center`
        self.register_buffer("pending2", pending_buffer(patch_out_dim), persistent=False)

    @torch.no_grad()
    def teacher_targets(self, logits: Tensor, center: Tensor, teacher_temp: float | Tensor,
                        valid: Tensor | None = None) -> Tensor:
        """Centered, sharpened teacher distributions (float32) of logits (rows, K); ``center`` (1, K); ``valid``
        (rows,) the rows that count (Sinkhorn-Knopp leaves the others out of the balancing)."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, teacher_temp, self.sinkhorn_iterations, valid=valid)
        return F.softmax((logits.float() - center) / teacher_temp, dim=-1)

    def forward(self, student_cls: Tensor, teacher_cls: Tensor, student_patch: Tensor, teacher_patch: Tensor,
                masks: Tensor, student_cls_tokens: Tensor, teacher_temp: float | Tensor,
                student_local_cls: Tensor | None = None, masks_weight: Tensor | None = None) -> dict[str, Tensor]:
        """View tensors crop-major (crop 0 of every image, then crop 1, ...):

        student_cls / teacher_cls (n_global*B, K) head logits of the global crops; student_local_cls (n_local*B, K)
        or None; masks bool (n_global*B, N) or (n_global*B, Hp, Wp), True = masked; student_patch / teacher_patch
        (M, Kp) patch-head logits at the M masked positions, in the order of ``masks.nonzero()``;
        student_cls_tokens (n_global*B, D) the student backbone's CLS tokens; masks_weight (M,) 1 / #masked of each
        row's crop, as the collate computes it (`sslpipe.data.collate.mask_batch_fields`; from ``masks`` when
        None, which costs a device synchronisation); rows of weight 0 are padding, which no term reads;
        teacher_temp a number or a 0-d tensor. Returns ``loss`` and the unweighted terms ``dino``, ``ibot`` and
        ``koleo``.
        """
        G = self.n_global
        GB = teacher_cls.shape[0]
        B = GB // G
        M = int(student_patch.shape[0])
        if GB % G or student_cls.shape[0] != GB or student_cls_tokens.shape[0] != GB or masks.shape[0] != GB:
            raise ValueError(f"DINOv2Loss: inconsistent shapes student_cls {tuple(student_cls.shape)}, teacher_cls "
                             f"{tuple(teacher_cls.shape)}, masks {tuple(masks.shape)}, CLS tokens "
                             f"{tuple(student_cls_tokens.shape)} for {G} global crops")
        if teacher_patch.shape[0] != M:
            raise ValueError(f"DINOv2Loss: {M} student and {teacher_patch.shape[0]} teacher patch rows")
        n_local = 0 if student_local_cls is None else student_local_cls.shape[0] // B
        if n_local != self.n_local:
            raise ValueError(f"DINOv2Loss was built for {self.n_local} local crops, got {n_local}")

        t_cls = self.teacher_targets(teacher_cls, self.center, teacher_temp)
        s_cls = student_cls if student_local_cls is None else torch.cat([student_cls, student_local_cls])
        s_cls = F.log_softmax(s_cls.float() / self.student_temp, dim=-1)
        loss_dino = cross_view_ce(t_cls.view(G, B, -1), s_cls.view(G + n_local, B, -1))

        if masks_weight is None:
            masks_weight = mask_weights(masks)
        if masks_weight.shape[0] != M:
            raise ValueError(f"DINOv2Loss: {M} patch rows but {masks_weight.shape[0]} mask weights")
        # sum_i w_i CE_i as one dot product of the weighted targets with the log-probabilities, without a product
        # matrix and its row sums: the (M, Kp) matrices are large (M ~5000, Kp 65536 on a GPU batch)
        valid = masks_weight > 0 if self.padded_rows else None
        t_patch = self.teacher_targets(teacher_patch, self.center2[0], teacher_temp, valid=valid)
        t_patch.mul_(masks_weight.unsqueeze(1))
        s_patch = F.log_softmax(student_patch.float() / self.student_temp, dim=-1)
        with torch.autocast(s_patch.device.type, enabled=False):
            loss_ibot = -torch.dot(t_patch.flatten(), s_patch.flatten()) / GB

        # the official code computes KoLeo only with a positive weight (ssl_meta_arch.py `do_koleo`)
        loss_koleo = (self.koleo(student_cls_tokens, n_crops=G) if self.koleo_weight > 0
                      else student_cls_tokens.new_zeros((), dtype=torch.float32))
        loss = self.dino_weight * loss_dino + self.ibot_weight * loss_ibot + self.koleo_weight * loss_koleo
        return {"loss": loss, "dino": loss_dino, "ibot": loss_ibot, "koleo": loss_koleo}

    def record_center(self, teacher_cls: Tensor, teacher_patch: Tensor, masks_weight: Tensor | None = None) -> None:
        """Softmax centering: count teacher_cls (n_global*B, K) and the masked teacher patch logits (M, Kp; with
        ``masks_weight`` (M,), its rows of weight 0, the padding, do not count) towards the step's centre update
        (`update_center`); Sinkhorn-Knopp centering keeps no centre, so this does nothing."""
        if self.centering == "softmax":
            record_rows(self.pending, teacher_cls)
            record_rows(self.pending2, teacher_patch, masks_weight)

    def update_center(self) -> None:
        """After the optimizer step (softmax centering): the CLS centre moves to the step's global-batch mean, the
        patch centre to the mean over processes of each one's mean masked patch logits (official
        `ibot_patch_loss.py`)."""
        if self.centering == "softmax":
            move_center(self.center, self.pending, self.center_momentum)
            move_center(self.center2, self.pending2, self.center_momentum2, per_process=True)
