"""CutMix of unlabelled images with their pseudo-labels (official U2PL `u2pl/dataset/augmentation.py:
generate_cutout_mask` and `generate_unsup_data(mode="cutmix")`).

Image i keeps its pixels outside a rectangle of half its area and takes, inside it, the pixels of image (i + 1) mod B;
every dense map passed along (pseudo-label, confidence, validity, ...) is mixed with the same rectangle, so image,
label and confidence stay aligned. Rectangle (per image, as the code): area = H*W/2, width w uniform in
[W/2 + 1, W - 1], height round(area / w), top-left uniform over the positions that keep it inside the image. Drawn
with torch's RNG (the code uses numpy's), so a resumed run draws the same boxes (the trainer restores torch's RNG).
"""
from __future__ import annotations

import torch
from torch import Tensor


def cutmix_box(height: int, width: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the pasted rectangle."""
    area = height * width / 2
    lo = width // 2 + 1
    w = int(torch.randint(lo, max(lo + 1, width), (1,), generator=generator)) if width > 2 else width
    h = min(height, int(round(area / w)))
    x0 = int(torch.randint(0, width - w + 1, (1,), generator=generator))
    y0 = int(torch.randint(0, height - h + 1, (1,), generator=generator))
    return y0, y0 + h, x0, x0 + w


def cutmix_masks(batch: int, height: int, width: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> Tensor:
    """(B, H, W) bool: True where image i keeps its own pixel, False inside its rectangle (partner's pixels)."""
    keep = torch.ones(batch, height, width, dtype=torch.bool, device=device)
    for i in range(batch):
        y0, y1, x0, x1 = cutmix_box(height, width, generator)
        keep[i, y0:y1, x0:x1] = False
    return keep


def apply_cutmix(keep: Tensor, images: Tensor, *dense: Tensor) -> tuple[Tensor, ...]:
    """Mix `images` (B, C, H, W) and each dense map (B, H, W) or (B, K, H, W) with partner (i + 1) mod B where
    `keep` is False. Returns (images, *dense) mixed."""
    out = []
    for x in (images, *dense):
        partner = torch.roll(x, shifts=-1, dims=0)  # partner[i] = x[(i + 1) % B]
        k = keep if x.dim() == 3 else keep[:, None]
        out.append(torch.where(k, x, partner))
    return tuple(out)
