"""Semantic segmentation evaluation of a network that returns {"pred": logits at any stride}: whole-image or
sliding-window inference, mIoU and the per-class IoU table through `sslpipe.eval.segmentation.SegmentationMetric`.

Inference follows the official U2PL `eval.py`: logits are upsampled bilinearly (align_corners=True) to the input
size; `slide` pads an image smaller than the crop (zeros after normalisation, centred), runs crops of `crop` pixels
at a stride of ceil(crop * stride_rate) (2/3), averages the logits where crops overlap and removes the padding. Images
are evaluated at their native size (no resize), labels 255 are ignored.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslpipe.eval.segmentation import SegmentationMetric


def whole_logits(model: nn.Module, images: Tensor) -> Tensor:
    """(B, K, H, W) logits of the model on the whole images, upsampled to their size."""
    pred = model(images)["pred"].float()
    return F.interpolate(pred, size=images.shape[-2:], mode="bilinear", align_corners=True)


def slide_logits(logits_fn: Callable[[Tensor], Tensor], image: Tensor, crop: int, stride_rate: float = 2 / 3) -> Tensor:
    """(1, K, H, W) scores of one image (1, 3, H, W) by sliding crops (module docstring; U2PL eval.py
    `scale_crop_process`, mmseg `slide_inference`): `logits_fn` maps a (1, 3, crop, crop) window to (1, K, crop,
    crop) scores, which are averaged where windows overlap."""
    h, w = image.shape[-2:]
    pad_h, pad_w = max(crop - h, 0), max(crop - w, 0)
    top, left = pad_h // 2, pad_w // 2
    if pad_h or pad_w:
        image = F.pad(image, (left, pad_w - left, top, pad_h - top), value=0.0)
    H, W = image.shape[-2:]
    stride = int(math.ceil(crop * stride_rate))
    rows = int(math.ceil((H - crop) / stride)) + 1
    cols = int(math.ceil((W - crop) / stride)) + 1
    total, count = None, torch.zeros(1, 1, H, W, device=image.device)
    for r in range(rows):
        y1 = min(r * stride + crop, H)
        y0 = y1 - crop
        for c in range(cols):
            x1 = min(c * stride + crop, W)
            x0 = x1 - crop
            logits = logits_fn(image[:, :, y0:y1, x0:x1])
            if total is None:
                total = torch.zeros(1, logits.shape[1], H, W, device=image.device)
            total[:, :, y0:y1, x0:x1] += logits
            count[:, :, y0:y1, x0:x1] += 1
    return (total / count)[:, :, top: top + h, left: left + w]


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, mode: str = "whole", crop: int | None = None,
            stride_rate: float = 2 / 3) -> Tensor:
    """(B, H, W) class maps."""
    if mode == "whole":
        return whole_logits(model, images).argmax(1)
    if mode != "slide" or crop is None:
        raise ValueError(f"eval mode must be 'whole' or 'slide' with a crop size, got {mode!r} crop={crop}")
    return torch.cat([slide_logits(lambda x: whole_logits(model, x), images[i:i + 1], crop, stride_rate).argmax(1)
                      for i in range(images.shape[0])])


def _groups(images: list[Tensor], labels: list[Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive runs of equal-size images stacked into batches."""
    i = 0
    while i < len(images):
        j = i + 1
        while j < len(images) and images[j].shape == images[i].shape:
            j += 1
        yield torch.stack(images[i:j]), torch.stack(labels[i:j])
        i = j


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, batches: Iterable[tuple[list[Tensor], list[Tensor]]], num_classes: int,
                          *, class_names: list[str] | None = None, ignore_index: int = 255, mode: str = "whole",
                          crop: int | None = None, stride_rate: float = 2 / 3, device: torch.device | str = "cpu",
                          max_images: int | None = None, progress: bool = False) -> dict[str, Any]:
    """mIoU / pixel accuracy / per-class IoU (`SegmentationMetric.compute()`) over `batches` of (images, labels)
    lists (normalised (3, H, W) images, (H, W) long labels). The model is put in eval mode and restored."""
    from tqdm.auto import tqdm

    metric = SegmentationMetric(num_classes, ignore_index, class_names)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for images, labels in tqdm(batches, desc="eval", disable=not progress, unit="batch"):
            if max_images is not None:
                images, labels = images[: max_images - seen], labels[: max_images - seen]
            for x, y in _groups(list(images), list(labels)):
                pred = predict(model, x.to(device), mode, crop, stride_rate).cpu()
                metric.update(pred, y)
            seen += len(images)
            if max_images is not None and seen >= max_images:
                break
    finally:
        model.train(was_training)
    return metric.compute()
