"""KoLeo regulariser (Sablayrolles et al., "Spreading vectors for similarity search", ICLR 2019; used by DINOv2,
Oquab et al. 2024, §4; official facebookresearch/dinov2 dinov2/loss/koleo_loss.py and train/ssl_meta_arch.py).

The Kozachenko-Leonenko differential-entropy estimator as a loss: on L2-normalised features x_1..x_n,
    L = -1/n * sum_i log(min_{j != i} ||x_i - x_j||_2 + eps),    eps = 1e-8,
which pushes every feature away from its nearest neighbour, spreading the batch over the sphere. DINOv2 applies it to
the student's backbone CLS tokens of each global crop on its own (never between two crops of one image) and sums over
the crops: L_koleo = sum_c L(x^c), weighted by 0.1 in the total loss.

Built on lightly's `KoLeoLoss`, which computes the same value as the official code (tested): the same normalisation
eps, nearest neighbour by the largest inner product, the same pairwise-distance eps. Two differences, both in
lightly's favour: it fills the diagonal with -2 instead of -1 (the official code can pick a sample as its own
neighbour when every other inner product is exactly -1), and here it always runs in float32 with autocast off (the
official code turns autocast off but keeps a half-precision input in half precision).
"""

from __future__ import annotations

import torch
from lightly.loss import KoLeoLoss as LightlyKoLeoLoss
from torch import Tensor, nn


class KoLeoLoss(nn.Module):
    """KoLeo over each crop's rows of crop-major features, summed over the crops."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.koleo = LightlyKoLeoLoss(p=2, eps=eps)

    def forward(self, features: Tensor, n_crops: int = 1) -> Tensor:
        """features (n_crops * B, D) crop-major (crop 0 of every image, then crop 1, ...); B >= 2."""
        if features.dim() != 2 or features.shape[0] % n_crops or features.shape[0] // n_crops < 2:
            raise ValueError(f"KoLeoLoss needs (n_crops * B, D) features with B >= 2 per crop, got "
                             f"{tuple(features.shape)} for {n_crops} crop(s)")
        with torch.autocast(features.device.type, enabled=False):
            return sum(self.koleo(chunk) for chunk in features.float().chunk(n_crops))
