"""COCO-style box and mask AP with torchmetrics' MeanAveragePrecision (pycocotools backend), not a hand-written AP.

Predictions and targets are torchvision-style dicts per image: `boxes` (N, 4) xyxy in pixels, `labels` (N,),
`scores` (N,) (predictions only), `masks` (N, H, W) bool for `segm` and `iscrowd` (N,) (targets only: COCO crowd
regions, which COCOeval matches without counting: a detection on one is neither a true nor a false positive; built by
`sslpipe.data.targets.masks_to_targets`). Results are reported under `bbox/...` and
`segm/...` with COCO's names: AP (IoU 0.50:0.95), AP50, AP75, APs/APm/APl (area < 32^2, < 96^2, larger), AR100.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

_NAMES = {"map": "AP", "map_50": "AP50", "map_75": "AP75", "map_small": "APs", "map_medium": "APm",
          "map_large": "APl", "mar_100": "AR100"}


class DetectionMetric:
    """Accumulates per-image predictions and targets; `compute()` -> {"bbox/AP": ..., "segm/AP50": ...} in [0, 1]
    (-1 where COCO has nothing to average, e.g. no large objects)."""

    def __init__(self, iou_types: Sequence[str] = ("bbox", "segm"), backend: str = "pycocotools") -> None:
        from torchmetrics.detection import MeanAveragePrecision

        self.iou_types = tuple(iou_types)
        self.metric = MeanAveragePrecision(iou_type=self.iou_types, backend=backend)

    @staticmethod
    def _cpu(items: list[dict[str, Tensor]], with_scores: bool) -> list[dict[str, Tensor]]:
        keys = ("boxes", "labels", "masks") + (("scores",) if with_scores else ("iscrowd",))
        out = []
        for item in items:
            d = {k: item[k].detach().cpu() for k in keys if k in item}
            if "masks" in d:
                d["masks"] = d["masks"].bool()
            d["labels"] = d["labels"].long()
            out.append(d)
        return out

    def update(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        self.metric.update(self._cpu(preds, True), self._cpu(targets, False))

    def reset(self) -> None:
        self.metric.reset()

    def compute(self) -> dict[str, float]:
        raw = self.metric.compute()
        out: dict[str, float] = {}
        for iou_type in self.iou_types:
            prefix = f"{iou_type}_" if len(self.iou_types) > 1 else ""
            for key, name in _NAMES.items():
                value = raw.get(prefix + key)
                if isinstance(value, Tensor) and value.numel() == 1:
                    out[f"{iou_type}/{name}"] = float(value)
        return out
