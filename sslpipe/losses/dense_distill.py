"""Dense distillation: the student's feature map, resampled to the teacher's patch grid, matches the teacher's patch
tokens (LightlyTrain's `distillationv2`, for students that go on to detection or segmentation).

With F_s (B, C, h, w) the student's map after a 1x1 projection to the teacher's width D, resampled bilinearly to the
teacher's grid (H, W), and T (B, D, H, W) the teacher's patch tokens (the last `teacher_blocks` blocks concatenated),

    mse:    L = mean_{b, y, x, d} (F_s - LN(T))^2,   LN = layer normalisation over d without affine parameters,
    cosine: L = mean_{b, y, x} (1 - cos(F_s[b, :, y, x], T[b, :, y, x])).

LightlyTrain compares raw features by MSE; normalising the teacher's tokens per position (sslpipe's choice) makes
the loss the same size whatever the teacher's feature scale, so one weight fits any teacher.
"""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from sslpipe.losses.cosine_distill import cosine_distill_loss


def resample_to_grid(features: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, C, h, w) -> (B, C, H, W), bilinear without corner alignment (the identity when the grids agree)."""
    if tuple(features.shape[-2:]) == tuple(grid):
        return features
    return F.interpolate(features, size=grid, mode="bilinear", align_corners=False)


def dense_distill_loss(student: Tensor, teacher: Tensor, kind: Literal["mse", "cosine"] = "mse") -> Tensor:
    """student (B, D, h, w) projected map, teacher (B, D, H, W) patch tokens; the student is resampled to (H, W)."""
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"dense_distill_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         "need the same batch and width (project the student to the teacher's width first)")
    s = resample_to_grid(student.float(), tuple(teacher.shape[-2:])).permute(0, 2, 3, 1)
    t = teacher.float().permute(0, 2, 3, 1)
    if kind == "cosine":
        return cosine_distill_loss(s, t)
    if kind != "mse":
        raise ValueError(f"dense_distill_loss: kind must be mse or cosine, got {kind!r}")
    return F.mse_loss(s, F.layer_norm(t, t.shape[-1:]))
