"""iBOT loss (Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022; official bytedance/ibot
main_ibot.py iBOTLoss; docs/methods.md §1 "Loss").

With teacher targets P_t = softmax((t - C) / tau_t) (detached) and student log-probs log_softmax(s / tau_s):
    L_cls   = mean over pairs (teacher global view q, student view v != q; 2 global + n_local views) of
              mean_b CE(P_t^cls[q, b], s^cls[v, b])
    L_patch = mean over global views q of mean_b [ sum_{i masked} CE(P_t^patch[q, b, i], s^patch[q, b, i])
                                                   / max(1, #masked(q, b)) ]   (images without a mask count as 0)
    L = lambda1 * L_cls + lambda2 * L_patch
Centres (momentum 0.9, all-reduced): C_cls (1, K) <- batch mean of teacher CLS logits; C_patch (1, 1, Kp) <- batch
mean of each image's mean patch logit over ALL patches.

Written here rather than assembled from lightly: lightly's IBOTPatchLoss gives the same patch value per view (it also
divides by the whole batch including unmasked images, tested), but its centre is the mean over the MASKED teacher
tokens only (docs/methods.md §1: over all patches of each image) and it updates the centre inside ``forward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslpipe.data.collate import mask_batch_fields
from sslpipe.losses.center import move_center, pending_buffer, record_rows
from sslpipe.losses.dino import cross_view_ce


class IBOTLoss(nn.Module):
    """iBOT CLS + masked-patch self-distillation; buffers ``center`` (1, K) and ``center2`` (1, 1, Kp)."""

    center: Tensor
    center2: Tensor

    def __init__(self, out_dim: int, patch_out_dim: int, n_global: int, n_local: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, center_momentum2: float = 0.9, lambda1: float = 1.0,
                 lambda2: float = 1.0) -> None:
        super().__init__()
        if n_global < 1 or n_global + n_local < 2:
            raise ValueError(f"IBOTLoss needs >= 1 global crop and >= 2 crops in all, got {n_global}+{n_local}")
        self.n_global, self.n_local = n_global, n_local
        self.student_temp = student_temp
        self.center_momentum, self.center_momentum2 = center_momentum, center_momentum2
        self.lambda1, self.lambda2 = lambda1, lambda2
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim))
        self.register_buffer("pending", pending_buffer(out_dim), persistent=False)  # `sslpipe.losses.center`
        self.register_buffer("pending2", pending_buffer(patch_out_dim), persistent=False)

    def forward(self, student_cls: Tensor, student_patch: Tensor, teacher_cls: Tensor, teacher_patch: Tensor,
                masks: Tensor, teacher_temp: float, teacher_patch_temp: float,
                student_local_cls: Tensor | None = None, mask_indices: Tensor | None = None,
                masks_weight: Tensor | None = None) -> dict[str, Tensor]:
        """All view tensors crop-major (crop 0 of every image, then crop 1, ...):

        student_cls / teacher_cls (n_global*B, K); student_patch / teacher_patch (n_global*B, N, Kp), or
        student_patch as the (M, Kp) rows at ``mask_indices`` (what `IBOTHead` computes with them);
        masks bool (n_global*B, Hp, Wp) or (n_global*B, N), True = masked; student_local_cls (n_local*B, K) or None
        when n_local == 0; mask_indices (M,) and masks_weight (M,) as the loader computes them from ``masks``
        (`sslpipe.data.collate.mask_batch_fields`: the masked positions of the flattened (n_global*B*N) patches and
        1 / #masked of their crop), so that the step selects the masked rows without a device synchronisation;
        computed here from ``masks`` when not given. Returns ``loss`` = lambda1*cls + lambda2*patch and the
        unweighted ``cls`` and ``patch``.
        """
        G = self.n_global
        GB, N = teacher_patch.shape[:2]
        B = GB // G
        rows = student_patch.dim() == 2  # the masked rows only (`IBOTHead` with mask_indices)
        if rows and mask_indices is None:
            raise ValueError("IBOTLoss: student_patch holds masked rows only; pass the mask_indices they were taken at")
        if (GB % G or teacher_cls.shape[0] != GB or student_cls.shape[0] != GB
                or (not rows and student_patch.shape[:2] != (GB, N))
                or (rows and student_patch.shape[0] != mask_indices.shape[0])):
            raise ValueError(f"IBOTLoss: inconsistent shapes student_cls {tuple(student_cls.shape)}, student_patch "
                             f"{tuple(student_patch.shape)}, teacher_cls {tuple(teacher_cls.shape)}, teacher_patch "
                             f"{tuple(teacher_patch.shape)} for {G} global crops")
        if masks.shape[0] != GB or masks[0].numel() != N:
            raise ValueError(f"IBOTLoss: masks {tuple(masks.shape)} do not match {GB} crops of {N} patches")
        n_local = 0 if student_local_cls is None else student_local_cls.shape[0] // B
        if n_local != self.n_local:
            raise ValueError(f"IBOTLoss was built for {self.n_local} local crops, got {n_local}")

        # CLS term over all (q, v != q) pairs.
        t_cls = F.softmax((teacher_cls.float() - self.center) / teacher_temp, dim=-1).detach()
        s_cls = student_cls if student_local_cls is None else torch.cat([student_cls, student_local_cls])
        s_cls = F.log_softmax(s_cls.float() / self.student_temp, dim=-1)
        loss_cls = cross_view_ce(t_cls.view(G, B, -1), s_cls.view(G + n_local, B, -1))

        # Patch term, same view, masked patches only (only those rows go through the softmax), each weighted by
        # 1 / #masked of its view: the sum over a view's masked patches is their mean.
        if mask_indices is None or masks_weight is None:
            fields = mask_batch_fields(masks.reshape(GB, N))
            mask_indices, masks_weight = fields["mask_indices"], fields["masks_weight"]
        t_rows = teacher_patch.flatten(0, 1).index_select(0, mask_indices).float()
        s_rows = (student_patch if rows else student_patch.flatten(0, 1).index_select(0, mask_indices)).float()
        t_p = F.softmax((t_rows - self.center2[0]) / teacher_patch_temp, dim=-1).detach()
        s_p = F.log_softmax(s_rows / self.student_temp, dim=-1)
        ce = -(t_p * s_p).sum(dim=-1)  # (#masked,)
        loss_patch = (ce * masks_weight).sum() / GB  # = mean over views of the batch mean
        loss = self.lambda1 * loss_cls + self.lambda2 * loss_patch
        return {"loss": loss, "cls": loss_cls, "patch": loss_patch}

    def record_center(self, teacher_cls: Tensor, teacher_patch: Tensor) -> None:
        """Count teacher_cls (n_global*B, K) and each image's mean patch logits of teacher_patch (n_global*B, N, Kp)
        towards the step's centre update (`update_center`)."""
        record_rows(self.pending, teacher_cls)
        record_rows(self.pending2, teacher_patch.float().mean(dim=1))

    def update_center(self) -> None:
        """After the optimizer step: both centres move to the step's global-batch means (momentum update)."""
        move_center(self.center, self.pending, self.center_momentum)
        move_center(self.center2, self.pending2, self.center_momentum2)
