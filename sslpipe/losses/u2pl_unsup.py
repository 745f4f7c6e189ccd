"""U2PL's unsupervised loss on reliable pseudo-labels (Wang et al., "Semi-Supervised Semantic Segmentation Using
Unreliable Pseudo-Labels", CVPR 2022, Sec. 3.2, eqs. 2, 6-8; official Haochen-Wang409/U2PL @ab3d2be,
`u2pl/utils/loss_helper.py: compute_unsupervised_loss`, schedule in `train_semi.py`).

    H(p_ij) = - sum_c p_ij(c) log(p_ij(c) + 1e-10)                 (teacher probabilities; the code's epsilon)
    alpha_t = (100 - drop_percent) * (1 - t / T)                    (percent of unreliable pixels, t = epoch)
    gamma_t = np.percentile(H over the valid pixels, 100 - alpha_t)
    reliable_ij = valid_ij and H(p_ij) < gamma_t                     (pixels with H >= gamma_t are ignored)
    L_u = sum_{ij reliable} CE(student_ij, yhat_ij) / #valid pixels

With drop_percent 80 the top 20% most uncertain pixels are dropped at epoch 0, decaying linearly to none at the end.

Paper vs code (named deviation; the paper is followed, docs/methods.md §3): the paper averages the per-pixel CE over all
pixels of the batch (eq. 2: 1/|B_u| sum_i 1/(HW) sum_j, ignored pixels contributing 0); the official code takes the mean
CE over the *reliable* pixels and multiplies it by B*H*W / #reliable, i.e. it weighs L_u up by (#all / #reliable)^2
(x1.56 at epoch 0). Here "all pixels" means the valid ones: pixels padded by the crop (no image there) carry no
pseudo-label and count nowhere (the code lets the teacher label the padding).

`percentile` is numpy's default ("linear") percentile written in torch so that it runs on the device (the code copies
the entropy map to the host for `np.percentile`); tests check it against numpy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = 255
ENTROPY_EPS = 1e-10


def entropy_map(prob: Tensor, dim: int = 1) -> Tensor:
    """-sum_c p log(p + 1e-10) over `dim` (U2PL's pixel entropy), in float32."""
    p = prob.float()
    return -(p * torch.log(p + ENTROPY_EPS)).sum(dim)


def percentile(values: Tensor, q: float) -> Tensor:
    """`np.percentile(values, q)` (linear interpolation between order statistics) of a 1-d tensor, on its device.
    An empty tensor has no percentile: the caller must check."""
    if values.numel() == 0:
        raise ValueError("percentile of an empty set of pixels")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    s = torch.sort(values.float().flatten()).values
    pos = (s.numel() - 1) * q / 100.0
    lo = int(pos // 1)
    hi = min(lo + 1, s.numel() - 1)
    frac = pos - lo
    return s[lo] + (s[hi] - s[lo]) * frac


def drop_percent_at(epoch: int, epochs: int, drop_percent: float = 80.0) -> float:
    """The percentile of the entropy above which pixels are unreliable at `epoch` (train_semi.py): 100 - (100 -
    drop_percent) * (1 - epoch / epochs); 80 at epoch 0, rising linearly towards 100 (at 100 only the
    pixels at the maximum entropy are dropped, as in the code)."""
    return 100.0 - (100.0 - drop_percent) * (1.0 - epoch / epochs)


def reliable_mask(entropy: Tensor, valid: Tensor, percent: float) -> Tensor:
    """Valid pixels whose entropy is below the `percent` percentile of the valid pixels' entropies (the code ignores
    H >= threshold). All False when no pixel is valid."""
    if not bool(valid.any()):
        return torch.zeros_like(valid)
    thresh = percentile(entropy[valid], percent)
    return valid & (entropy < thresh)


def unsupervised_loss(logits: Tensor, pseudo: Tensor, entropy: Tensor, percent: float) -> tuple[Tensor, Tensor]:
    """L_u of the module docstring and the reliable mask.

    logits (B, C, H, W) student predictions at the label size; pseudo (B, H, W) long pseudo-labels (255 = no label,
    e.g. padding); entropy (B, H, W) of the teacher's probabilities; percent = `drop_percent_at(...)`.
    """
    valid = pseudo != IGNORE_INDEX
    reliable = reliable_mask(entropy, valid, percent)
    target = torch.where(reliable, pseudo, torch.full_like(pseudo, IGNORE_INDEX))
    ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return ce / valid.sum().clamp(min=1), reliable
