"""Gram anchoring (DINOv3, Siméoni et al., arXiv 2508.10104, §4; official facebookresearch/dinov3
`dinov3/loss/gram_loss.py` and `train/ssl_meta_arch.py`): keep the patch-to-patch similarity structure of the
student's dense features close to that of an earlier "Gram teacher", which cures the degradation of dense features
in long runs without constraining the features themselves.

With S (P, D) the student's patch features of one image and T (P, D) the Gram teacher's (after the backbone's final
norm), row-normalised when `normalized`:

    G_s = S S^T,   G_t = T T^T,   L = mean over the P x P entries (and the images) of (G_s - G_t)^2

per image (`img_level`), or over the whole batch's patches at once (B*P x B*P). Options of the official loss:
`remove_neg` zeroes the negative similarities of both matrices; `remove_only_teacher_neg` zeroes the teacher's
negative ones only. (The official code then zeroes the student's entries where the teacher's are negative too, but it
tests the teacher's matrix after clamping it, so that line never fires: only the teacher's negatives go, as its comment
says; sslpipe does exactly that.) Computed in float32.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class GramLoss(nn.Module):
    def __init__(self, normalized: bool = True, img_level: bool = True, remove_neg: bool = False,
                 remove_only_teacher_neg: bool = False) -> None:
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("GramLoss: remove_neg and remove_only_teacher_neg exclude each other")
        self.normalized, self.img_level = normalized, img_level
        self.remove_neg, self.remove_only_teacher_neg = remove_neg, remove_only_teacher_neg

    def gram(self, feats: Tensor) -> Tensor:
        """Similarity matrix: (B, P, P) per image, or (B*P, B*P) over the batch."""
        x = feats.float()
        if self.normalized:
            x = F.normalize(x, dim=-1)
        if not self.img_level:
            x = x.flatten(0, -2)
        return x @ x.transpose(-1, -2)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """student, teacher (B, P, D) patch features of the same images (the teacher's without gradient)."""
        if student.shape != teacher.shape or student.dim() != 3:
            raise ValueError(f"GramLoss needs (B, P, D) features of one shape, got {tuple(student.shape)} and "
                             f"{tuple(teacher.shape)}")
        g_s, g_t = self.gram(student), self.gram(teacher.detach())
        if self.remove_neg:
            g_t, g_s = g_t.clamp_min(0), g_s.clamp_min(0)
        elif self.remove_only_teacher_neg:
            g_t = g_t.clamp_min(0)
        return F.mse_loss(g_s, g_t)
