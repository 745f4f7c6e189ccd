"""Semantic segmentation metrics: dataset-level IoU per class and mIoU (torchmetrics), with a printable table.

torchmetrics' `MulticlassJaccardIndex(ignore_index=255)` accumulates one confusion matrix over the whole data set (the
mmseg/detectron2 protocol), unlike `segmentation.MeanIoU`, which averages per image and has no ignore index. mIoU
is the mean IoU over the classes that occur in the ground truth or the predictions (union > 0), as torchmetrics'
`average="macro"` and mmseg do; classes with an empty union are reported as NaN. detectron2's `SemSegEvaluator`
(Mask2Former's own evaluation) averages over the classes present in the ground truth only, so a class predicted but
absent from every label counts here (IoU 0) and not there: the two agree on a full ADE20K or VOC val set, where every
class occurs, and can differ on a small subset (`eval.max_val`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class SegmentationMetric:
    """Accumulates (B, H, W) predicted and target class maps; `compute()` gives mIoU, pixel accuracy and IoU per
    class. Pixels whose target is `ignore_index` are skipped; predictions must be in [0, num_classes)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None,
                 device: torch.device | str = "cpu") -> None:
        from torchmetrics.classification import MulticlassJaccardIndex

        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.metric = MulticlassJaccardIndex(num_classes, average="none", ignore_index=ignore_index,
                                             validate_args=False).to(device)

    def update(self, preds: Tensor | Sequence[Tensor], target: Tensor | Sequence[Tensor]) -> None:
        """(B, H, W) tensors, or lists of (H, W) maps whose sizes may differ from image to image."""
        if not isinstance(preds, Tensor):
            for p, t in zip(preds, target, strict=True):
                self.update(p[None], t[None])
            return
        if preds.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(preds.shape)} != target shape {tuple(target.shape)}")
        self.metric.update(preds.long(), target.long().to(preds.device))

    def reset(self) -> None:
        self.metric.reset()

    def compute(self) -> dict:
        """{"mIoU", "pixel_acc", "per_class": {name: IoU or NaN}} (fractions in [0, 1])."""
        per_class = self.metric.compute().double().cpu()
        confmat = self.metric.confmat.double().cpu()
        union = confmat.sum(0) + confmat.sum(1) - confmat.diag()
        present = union > 0
        per_class[~present] = float("nan")
        total = confmat.sum()
        return {
            "mIoU": float(per_class[present].mean()) if present.any() else float("nan"),
            "pixel_acc": float(confmat.diag().sum() / total) if total > 0 else float("nan"),
            "per_class": {name: float(v) for name, v in zip(self.class_names, per_class)},
        }


def format_iou_table(result: dict) -> str:
    """The per-class IoU table of `SegmentationMetric.compute()` as aligned text (percent), mIoU last."""
    names = list(result["per_class"])
    width = max([len(n) for n in names] + [10])
    lines = [f"{'class':<{width}}  IoU (%)"]
    for name, iou in result["per_class"].items():
        lines.append(f"{name:<{width}}  {'n/a' if math.isnan(iou) else f'{100 * iou:6.2f}'}")
    lines.append(f"{'mIoU':<{width}}  {100 * result['mIoU']:6.2f}")
    lines.append(f"{'pixel acc':<{width}}  {100 * result['pixel_acc']:6.2f}")
    return "\n".join(lines)
