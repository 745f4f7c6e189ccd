"""Distillation through soft pseudo-labels over a queue of teacher features (LightlyTrain's `distillationv1`, after
Beyer et al., "Knowledge distillation: A good teacher is patient and consistent", CVPR 2022, arXiv 2106.05237).

Beyer et al. match the student's class predictions to the teacher's on the same (mixed-up) crop. Without labels
there is no classifier; LightlyTrain uses the teacher's own recent features as one: a queue Q (K, D) of
L2-normalised teacher features acts as K pseudo-classes. With t the teacher's normalised feature and s the student's
projected, normalised feature of the same image,

    p_t = softmax(Q t / tau),    L = - mean_images sum_k p_t[k] log softmax(Q s / tau)[k],    tau = 0.07,

a cross-entropy whose minimum puts s where t is, measured only along the directions the data occupies. The queue is
filled with the current batch before the loss (so an empty slot, zero, is a constant logit). sslpipe's choice: the
queue holds the teacher features of every process (all-gathered), so all processes share one queue and a run on P
processes computes what one process computes on the global batch (LightlyTrain keeps a queue per GPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class QueueDistillLoss(nn.Module):
    """Cross-entropy between the teacher's and the student's softmax over a FIFO queue of teacher features."""

    def __init__(self, dim: int, queue_size: int, temperature: float = 0.07) -> None:
        super().__init__()
        if queue_size < 1 or temperature <= 0:
            raise ValueError(f"QueueDistillLoss needs queue_size >= 1 and temperature > 0, got {queue_size}, "
                             f"{temperature}")
        self.temperature = temperature
        self.register_buffer("queue", torch.zeros(queue_size, dim))

    @torch.no_grad()
    def enqueue(self, teacher: Tensor) -> None:
        """Put the newest features (M, D), L2-normalised, at the front; the oldest fall off the end."""
        teacher = F.normalize(teacher.float(), dim=-1)
        keep = self.queue.shape[0] - teacher.shape[0]
        if keep <= 0:
            self.queue.copy_(teacher[: self.queue.shape[0]])
        else:
            self.queue.copy_(torch.cat([teacher, self.queue[:keep]]))

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """student (B, D) projected features, teacher (B, D) features of the same images; both are L2-normalised
        here. Call `enqueue` with this step's (gathered) teacher features first."""
        s = F.normalize(student.float(), dim=-1)
        t = F.normalize(teacher.float(), dim=-1)
        targets = torch.softmax(t @ self.queue.T / self.temperature, dim=-1)
        return -(targets * torch.log_softmax(s @ self.queue.T / self.temperature, dim=-1)).sum(-1).mean()
