"""Per-image training targets from an instance-id map and a class map, the torchvision detection format.

Mask R-CNN trains on them, Mask2Former's instance targets are built from them and the COCO AP metric
(`sslpipe.eval.detection`) scores against them: one builder, below all three.
"""
from __future__ import annotations

import torch
from torch import Tensor


def masks_to_targets(instances: Tensor, semantic: Tensor, class_offset: int = 0, ignore_index: int = 255,
                     crowd: dict[int, int] | None = None) -> dict[str, Tensor]:
    """One image's (H, W) instance ids (0 = none) + class map -> {boxes, labels, masks, iscrowd}: one entry per
    instance, its class = the majority semantic class under it minus `class_offset` (instances whose majority class is
    the background, 0, or with only ignore under them, are dropped, whatever the offset); boxes span the mask's
    pixels (x2 = last column + 1, COCO's box of a mask). `crowd` ({instance id: class}, COCO crowd regions, whose
    pixels are ignore in the class map) adds those as `iscrowd` = 1 entries for evaluation; without it they are
    dropped (training)."""
    ids = torch.unique(instances)
    ids = ids[ids > 0]
    masks = instances[None] == ids[:, None, None]
    labels, keep, is_crowd = [], [], []
    for instance_id, mask in zip(ids.tolist(), masks):
        if crowd and instance_id in crowd:
            label = crowd[instance_id] - class_offset
        else:
            values = semantic[mask]
            values = values[values != ignore_index]
            label = int(torch.mode(values).values) - class_offset if values.numel() else -1 - class_offset
        keep.append(label + class_offset > 0)
        labels.append(label)
        is_crowd.append(bool(crowd) and instance_id in crowd)
    keep_t = torch.tensor(keep, dtype=torch.bool, device=instances.device)
    masks = masks[keep_t]
    boxes = torch.zeros(len(masks), 4, device=instances.device)
    if len(masks):
        from torchvision.ops import masks_to_boxes

        boxes = masks_to_boxes(masks).float()
        boxes[:, 2:] += 1
    labels_t = torch.tensor([c for c, k in zip(labels, keep) if k], dtype=torch.long, device=instances.device)
    crowd_t = torch.tensor([c for c, k in zip(is_crowd, keep) if k], dtype=torch.long, device=instances.device)
    return {"boxes": boxes, "labels": labels_t, "masks": masks, "iscrowd": crowd_t}
