"""Dense (segmentation / instance) samples for fine-tuning and the linear segmentation probe: the training view and
the batch layout.

Training view (`DenseTransform(train=True)`): scale jitter (the longer side becomes `size * s`, s uniform in
`scale_range`: ViTDet's large-scale jitter), horizontal flip, random crop / pad to `size` x `size` (image pad = the
mean colour, label pad = ignore, instance pad = 0). Named deviation: Mask2Former's ADE20K pipeline (short-side
jitter, 512 crop with cat_max_ratio 1.0, ColorAugSSD) is replaced by this one jitter-crop-flip for every dense task.
Evaluation view: only the optional short-side resize of the image (labels stay at their native size).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode


class DenseTransform:
    """Raw stream sample -> {"image": float (3, H, W), "seg": long (H, W), "inst": long (H, W) or None, "key"}.

    train: jitter / flip / crop-pad to `size` (module docstring); eval: only the optional short-side resize of the
    image to `eval_size` (labels stay at their native size: metrics are computed there). `normalize=False` leaves
    images in [0, 1] (torchvision's detectors normalise themselves).
    """

    def __init__(self, size: int, scale_range: tuple[float, float], hflip: float, mean: tuple[float, ...],
                 std: tuple[float, ...], ignore_index: int = 255, train: bool = True, eval_size: int | None = None,
                 normalize: bool = True, need_inst: bool = False) -> None:
        self.size, self.scale_range, self.hflip = size, tuple(scale_range), hflip
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        self.ignore_index, self.train, self.eval_size = ignore_index, train, eval_size
        self.normalize, self.need_inst = normalize, need_inst

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        if "seg" not in raw:
            raise ValueError(f"sample {raw['key']} of {raw['url']} has no seg.png: fine-tuning needs segmentation "
                             "shards (`sslpipe shards --seg-list ...` or `--dataset scenes`)")
        if self.need_inst and "inst" not in raw:
            raise ValueError(f"sample {raw['key']} of {raw['url']} has no inst.png (instance ids): instance tasks need "
                             "shards with instance maps (`sslpipe shards --dataset scenes`)")
        for name in ("seg", "inst"):
            if name in raw and raw[name].size != raw["image"].size:
                raise ValueError(f"sample {raw['key']} of {raw['url']}: its {name}.png is {raw[name].size[0]}x"
                                 f"{raw[name].size[1]} px, its image {raw['image'].size[0]}x{raw['image'].size[1]}: a "
                                 "label map must be the size of its image (rewrite the shards with `sslpipe shards`)")
        img = TF.pil_to_tensor(raw["image"])
        seg = torch.from_numpy(np.asarray(raw["seg"], dtype=np.uint8).copy())[None]
        inst = torch.from_numpy(np.asarray(raw["inst"], dtype=np.float32).copy())[None] if "inst" in raw else None
        if self.train:
            img, seg, inst = self._jitter(img, seg, inst)
        elif self.eval_size:
            img = TF.resize(img, self.eval_size, antialias=True)
        image = img.float() / 255.0
        if self.normalize:
            image = (image - self.mean) / self.std
        if self.train:
            image, seg, inst = self._pad(image, seg, inst)
        return {"image": image, "seg": seg[0].long(), "inst": inst[0].long() if inst is not None else None,
                "crowd": raw.get("crowd", {}), "key": raw["key"]}

    def _jitter(self, img: Tensor, seg: Tensor, inst: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        h, w = img.shape[-2:]
        s = float(torch.empty(()).uniform_(*self.scale_range))
        factor = self.size * s / max(h, w)
        size = [max(1, round(h * factor)), max(1, round(w * factor))]
        img = TF.resize(img, size, antialias=True)
        # NEAREST_EXACT samples pixel centres as the image's resize does (NEAREST shifts edges by up to a pixel)
        seg = TF.resize(seg, size, interpolation=InterpolationMode.NEAREST_EXACT)
        inst = TF.resize(inst, size, interpolation=InterpolationMode.NEAREST_EXACT) if inst is not None else None
        if float(torch.rand(())) < self.hflip:
            img, seg = TF.horizontal_flip(img), TF.horizontal_flip(seg)
            inst = TF.horizontal_flip(inst) if inst is not None else None
        y = int(torch.randint(0, max(size[0] - self.size, 0) + 1, ()))
        x = int(torch.randint(0, max(size[1] - self.size, 0) + 1, ()))
        crop = (slice(None), slice(y, y + self.size), slice(x, x + self.size))
        return img[crop], seg[crop], inst[crop] if inst is not None else None

    def _pad(self, image: Tensor, seg: Tensor, inst: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        h, w = image.shape[-2:]
        if (h, w) == (self.size, self.size):
            return image, seg, inst
        fill = torch.zeros(3, 1, 1) if self.normalize else self.mean
        canvas = fill.expand(3, self.size, self.size).clone()
        canvas[:, :h, :w] = image
        seg_canvas = torch.full((1, self.size, self.size), self.ignore_index, dtype=seg.dtype)
        seg_canvas[:, :h, :w] = seg
        inst_canvas = None
        if inst is not None:
            inst_canvas = torch.zeros((1, self.size, self.size), dtype=inst.dtype)
            inst_canvas[:, :h, :w] = inst
        return canvas, seg_canvas, inst_canvas


def collate_dense(samples: list[dict[str, Any]], pad_to: int = 32) -> dict[str, Any]:
    """Images padded (zeros, bottom/right) to a common size that is a multiple of `pad_to`; `sizes` = each image's
    valid (h, w); `seg`/`inst` stay lists (native sizes; stack them when they agree); `crowd` = each image's
    {instance id: class} of crowd regions (COCO; empty otherwise)."""
    sizes = [tuple(s["image"].shape[-2:]) for s in samples]
    height = -(-max(h for h, _ in sizes) // pad_to) * pad_to
    width = -(-max(w for _, w in sizes) // pad_to) * pad_to
    images = samples[0]["image"].new_zeros(len(samples), 3, height, width)
    for i, s in enumerate(samples):
        images[i, :, : sizes[i][0], : sizes[i][1]] = s["image"]
    return {"images": images, "sizes": sizes, "seg": [s["seg"] for s in samples],
            "inst": [s["inst"] for s in samples] if all(s["inst"] is not None for s in samples) else None,
            "crowd": [s["crowd"] for s in samples], "keys": [s["key"] for s in samples]}
