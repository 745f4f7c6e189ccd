"""ViTDet fine-tuning: Mask R-CNN on the simple feature pyramid (`method: finetune_vitdet`; docs/methods.md §5).

Instance segmentation and detection from instance shards (`inst.png` ids + `seg.png` classes, class 0 = background):
one target per instance (its majority class, box = the mask's extent). The step returns the sum of torchvision's five
Mask R-CNN losses (RPN objectness and box, RoI class, box and mask), each logged. Evaluation: COCO box and mask AP
(torchmetrics + pycocotools). Published optimiser: AdamW 1e-4, weight decay 0.1 (0 on the ViT's norms and position
embeddings; the pyramid's and heads' channels-first LayerNorms are decayed, as detectron2's `LN`), layer decay 0.7,
250 warm-up iterations, step decay x0.1 at 88.9% and 96.3% of 100 epochs, batch 64, drop path 0.1, large-scale
jitter 0.1-2.0 at 1024 px (recipes/finetune_vitdet_coco_vit_base.yaml).
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, PositiveInt
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from sslpipe.data.targets import masks_to_targets
from sslpipe.eval.detection import DetectionMetric
from sslpipe.heads.maskrcnn import build_mask_rcnn
from sslpipe.heads.vitdet import ViTDetPyramid
from sslpipe.recipes.finetune import DENSE_UNREAD, DenseFinetuneRecipe, FinetuneConfig


class ViTDetConfig(FinetuneConfig):
    """`finetune_vitdet:` in a recipe: the shared fine-tuning settings plus Mask R-CNN's (docs/methods.md §5,
    detectron2 mask_rcnn_vitdet; defaults published). Always instance segmentation."""

    anchor_sizes: list[PositiveInt] = [32, 64, 128, 256, 512]  # one per pyramid level p2-p6
    rpn_batch_size_per_image: int = Field(256, gt=0)
    rpn_pre_nms_top_n: tuple[PositiveInt, PositiveInt] = (2000, 1000)  # (train, test)
    rpn_post_nms_top_n: tuple[PositiveInt, PositiveInt] = (1000, 1000)
    box_batch_size_per_image: int = Field(512, gt=0)
    box_head_convs: int = Field(4, ge=0)
    mask_head_convs: int = Field(4, ge=1)
    head_dim: int = Field(256, gt=0)
    fc_dim: int = Field(1024, gt=0)
    detections_per_img: int = Field(100, gt=0)


class ViTDetRecipe(DenseFinetuneRecipe):
    """`method: finetune_vitdet`."""

    config_key = "finetune_vitdet"
    config_section = ViTDetConfig
    unread = {**DENSE_UNREAD,
              **{f"eval.{key}": "Mask R-CNN fits each image into the img_size square itself"
                 for key in ("resize", "mode", "window", "stride_rate")}}

    normalize_images = False  # torchvision's detection transform normalises with the backbone's mean/std
    ddp_find_unused_parameters = True  # the mask head gets no gradient in a step without a positive proposal
    backbone_prefix = "backbone.backbone"
    top_block = True
    decayed_norms = (LayerNorm2d,)  # detectron2's pyramid and head `LN` is not a torch norm: it is decayed

    @property
    def needs_instances(self) -> bool:
        return True

    def build_head(self, pyramid: ViTDetPyramid) -> nn.Module:
        f = self.section
        return build_mask_rcnn(
            pyramid, len(self.class_names), min_size=f.img_size, max_size=f.img_size, image_mean=self.mean,
            image_std=self.std, anchor_sizes=f.anchor_sizes, rpn_batch_size_per_image=f.rpn_batch_size_per_image,
            rpn_pre_nms_top_n=tuple(f.rpn_pre_nms_top_n), rpn_post_nms_top_n=tuple(f.rpn_post_nms_top_n),
            box_batch_size_per_image=f.box_batch_size_per_image, box_detections_per_img=f.detections_per_img,
            box_head_convs=f.box_head_convs, mask_head_convs=f.mask_head_convs, head_dim=f.head_dim,
            fc_dim=f.fc_dim, fixed_size=f.img_size,
        )

    def transform(self, train: bool) -> Any:
        """Evaluation images stay at their native size: Mask R-CNN resizes them itself (longer side to
        finetune_vitdet.img_size, ViTDet's test ResizeShortestEdge with max_size), pads them to the img_size square (the
        token grid of training) and returns boxes and masks in input coordinates."""
        t = super().transform(train)
        t.eval_size = None
        return t

    def targets(self, batch: dict[str, Any]) -> list[dict[str, Tensor]]:
        out = []
        for inst, seg in zip(batch["inst"], batch["seg"]):
            t = masks_to_targets(inst.to(self.device), seg.to(self.device), 0, self.section.ignore_index)
            t["masks"] = t["masks"].to(torch.uint8)
            out.append(t)
        return out

    def step(self, batch: dict[str, Any], sched: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        images = [img[:, :h, :w] for img, (h, w) in zip(batch["images"].to(self.device), batch["sizes"])]
        losses = self.student(images, self.targets(batch))
        loss = sum(losses.values())
        return loss, {k: v.detach() for k, v in losses.items()}

    # ------------------------------------------------------------ evaluation
    def eval_metric(self) -> Any:
        return DetectionMetric(("bbox", "segm"))

    def eval_batch(self, model: nn.Module, batch: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        images = [img[:, :h, :w] for img, (h, w) in zip(batch["images"].to(self.device), batch["sizes"])]
        outputs = model(images)
        preds = []
        for out, seg in zip(outputs, batch["seg"]):
            masks = out["masks"][:, 0] >= 0.5  # the pasted probabilities, binarised as detectron2's paste
            if tuple(masks.shape[-2:]) != tuple(seg.shape):
                masks = torch.nn.functional.interpolate(masks[:, None].float(), size=tuple(seg.shape))[:, 0] > 0.5
            preds.append({"boxes": out["boxes"].cpu(), "scores": out["scores"].cpu(), "labels": out["labels"].cpu(),
                          "masks": masks.cpu()})
        targets = [masks_to_targets(inst, seg, 0, self.section.ignore_index, crowd)
                   for inst, seg, crowd in zip(batch["inst"], batch["seg"], batch["crowd"])]
        return preds, targets

    def overlays(self, batch: dict[str, Any], preds: Any, targets: Any) -> list[list[Tensor]]:
        from sslpipe.viz.overlays import SHOW_SCORE, instance_overlay

        n = len(self.class_names)
        rows = []
        for i, valid in enumerate(batch["sizes"]):
            image = self.display_image(batch["images"][i], valid)
            rows.append([image, instance_overlay(image, targets[i], n),
                         instance_overlay(image, preds[i], n, min_score=SHOW_SCORE, top_k=len(targets[i]["labels"]))])
        return rows
