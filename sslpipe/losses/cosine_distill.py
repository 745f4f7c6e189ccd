"""Feature distillation by cosine similarity: the student's projected feature points where the teacher's does.

    L = mean_i (1 - cos(s_i, t_i))

The plain variant of `method: distill` (global features) and of its dense term when `dense_loss: cosine` (every patch
position of the student's resampled feature map against the teacher's patch token there). Scale-free, so the teacher's
feature norm (a ViT's LayerNorm output, a CNN's pooled ReLU features) needs no normalisation.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def cosine_distill_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """student and teacher (..., D) of the same shape; the mean of 1 - cosine over all leading positions."""
    if student.shape != teacher.shape:
        raise ValueError(f"cosine_distill_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         "differ in shape")
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
