"""The one view of distillation: a random resized crop and a flip, which teacher and student both see ("consistent"
teaching, Beyer et al. 2022: the teacher labels exactly the crop the student learns from). Crops stay uint8 through
the loader, at the larger of the two networks' sizes; the recipe mixes them up, resizes them for the smaller network
and normalises them for each on the device.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from sslpipe.data.fast_views import as_array, resize_square, resized_crop_params


class ConsistentView:
    """sample_fn of the stream: `{"view": uint8 (3, size, size), "label": int}` (a class, so workers can pickle it).
    Randomness from torch's generator, which the stream seeds per worker and epoch."""

    def __init__(self, size: int, scale: tuple[float, float], hflip: float = 0.5) -> None:
        self.size, self.scale, self.hflip = size, tuple(scale), hflip

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        image = as_array(raw["image"])
        top, left, h, w = resized_crop_params(image.shape[0], image.shape[1], self.scale)
        crop = resize_square(image[top:top + h, left:left + w], self.size)
        if self.hflip > 0 and float(torch.rand(1)) < self.hflip:
            crop = np.ascontiguousarray(crop[:, ::-1])
        return {"view": torch.from_numpy(crop).permute(2, 0, 1), "label": int(raw["label"])}


def collate_views(samples: list[dict[str, Any]]) -> dict[str, Tensor]:
    """`views` uint8 (B, 3, S, S) and `labels` (B,)."""
    return {"views": torch.stack([s["view"] for s in samples]),
            "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long)}
