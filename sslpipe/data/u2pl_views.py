"""U2PL's joint image + label augmentation, step for step the official one (Haochen-Wang409/U2PL @ab3d2be
`u2pl/dataset/augmentation.py`, composed by `pascal_voc.py: build_transfrom`): Normalize, RandResize,
RandomHorizontalFlip, Crop(type="rand"). Shared by U2PL and its supervised-only baseline (the official train_sup.py
builds the same transform).

- normalise: (x / 255 - mean) / std, before the geometry (as the code), so that padding 0 is the mean colour;
- scale (RandResize): with probability 1/2 uniform in [scale_range[0], 1], else uniform in [1, scale_range[1]]. With
  [0.5, 2.0] half the crops are shrunk and the mean scale is 1.125 (a uniform draw on [0.5, 2] would shrink a third,
  mean 1.25). New size int(side * s) (truncated); image bilinear (align_corners=False, no antialias), label nearest;
- flip: horizontal with probability `hflip`;
- crop: a side shorter than the crop is padded evenly (pad // 2 before, the rest after): image with 0, label with
  `label_pad`; then a crop at a uniform random offset. The official Crop pads labels with 0 (background) whatever
  its `ignore_label` argument says (its `self.ignore_label = 0`, "change to 0"), so `label_pad` 0 is the official
  default; 255 ignores the padding instead.

Written by hand because torchvision has neither piece: its RandomCrop(pad_if_needed) pads the missing size on *both*
sides and so places a small image anywhere in the crop (the code centres it), and it has no two-sided scale draw.
Randomness comes from torch's global RNG (seeded per loader worker by sslpipe.data.stream).

Unlabelled images (`unlabeled`) go through the same geometry with two more maps: `valid` (False on padding: the recipe
gives it no pseudo-label) and, when the shard has a seg.png, its ground truth (255 on padding). The ground truth is a
diagnostic only (pseudo-label accuracy); it does not change the random draws, so an image crops the same with or
without it.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

IGNORE_INDEX = 255


def check_scale_range(scale_range: Sequence[float]) -> tuple[float, float]:
    """(lo, hi) with 0 < lo <= 1 <= hi: RandResize draws below and above 1, so the range must contain 1."""
    lo, hi = (float(s) for s in scale_range)
    if not 0 < lo <= 1.0 <= hi:
        raise ValueError(f"u2pl.scale_range must satisfy 0 < lo <= 1 <= hi (U2PL's RandResize draws the scale from "
                         f"[lo, 1] or [1, hi] with equal chance), got {list(scale_range)}")
    return lo, hi


def draw_scale(scale_range: Sequence[float], generator: torch.Generator | None = None) -> float:
    """One RandResize scale: uniform in [lo, 1] with probability 1/2, else uniform in [1, hi]."""
    lo, hi = check_scale_range(scale_range)
    side, u = torch.rand(2, generator=generator).tolist()
    return lo + (1.0 - lo) * u if side < 0.5 else 1.0 + (hi - 1.0) * u


def _label_tensor(seg: Image.Image) -> Tensor:
    """(H, W) long class indices (palette images keep their indices)."""
    return torch.from_numpy(np.array(seg if seg.mode in ("L", "P") else seg.convert("L"), dtype=np.int64))


class U2PLSegTransform:
    """The module docstring's augmentation; `train=False` only normalises (evaluation at native size)."""

    def __init__(self, crop_size: int | tuple[int, int], scale_range: Sequence[float] = (0.5, 2.0),
                 label_pad: int = 0, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), hflip: float = 0.5, train: bool = True) -> None:
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.scale_range = check_scale_range(scale_range)
        if not 0 <= label_pad <= 255:
            raise ValueError(f"u2pl.label_pad must be a label value in 0..255, got {label_pad}")
        self.label_pad, self.hflip, self.train = label_pad, hflip, train
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def _image(self, image: Image.Image) -> Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        rgb = np.array(image if image.mode == "RGB" else image.convert("RGB"))
        return (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0 - self.mean) / self.std

    def _geometry(self, image: Tensor, maps: Tensor, fills: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Resize, flip, pad and crop `image` (3, H, W) and `maps` (K, H, W) alike; map k is padded with fills[k]."""
        s = draw_scale(self.scale_range)
        h, w = image.shape[-2:]
        size = (max(1, int(h * s)), max(1, int(w * s)))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        maps = F.interpolate(maps[None].float(), size=size, mode="nearest")[0]
        if float(torch.rand(())) < self.hflip:
            image, maps = image.flip(-1), maps.flip(-1)
        ch, cw = self.crop_size
        pad_h, pad_w = max(ch - size[0], 0), max(cw - size[1], 0)
        if pad_h or pad_w:
            border = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
            image = F.pad(image, border, value=0.0)
            maps = torch.stack([F.pad(m, border, value=float(f)) for m, f in zip(maps, fills)])
        h, w = image.shape[-2:]
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return image[:, top:top + ch, left:left + cw], maps[:, top:top + ch, left:left + cw]

    def __call__(self, image: Image.Image, seg: Image.Image) -> tuple[Tensor, Tensor]:
        """-> (image float (3, H, W) normalised, label long (H, W); `label_pad` where padded)."""
        if image.size != seg.size:
            raise ValueError(f"U2PLSegTransform: image size {image.size} != label size {seg.size}")
        img, lab = self._image(image), _label_tensor(seg)
        if not self.train:
            return img, lab
        img, maps = self._geometry(img, lab[None], [self.label_pad])
        return img, maps[0].long()

    def unlabeled(self, image: Image.Image, seg: Image.Image | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """-> (image, valid (H, W) bool: False on padding, ground truth (H, W) long: 255 on padding and everywhere
        when `seg` is None). The same random draws whether or not `seg` is given."""
        img = self._image(image)
        if seg is not None and image.size != seg.size:
            raise ValueError(f"U2PLSegTransform: image size {image.size} != label size {seg.size}")
        truth = _label_tensor(seg) if seg is not None else torch.full(img.shape[-2:], IGNORE_INDEX, dtype=torch.long)
        if not self.train:
            return img, torch.ones_like(truth, dtype=torch.bool), truth
        maps = torch.stack([torch.ones_like(truth), truth])
        img, maps = self._geometry(img, maps, [0, IGNORE_INDEX])
        return img, maps[0] > 0, maps[1].long()
