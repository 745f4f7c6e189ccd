"""Mask2Former fine-tuning on a ViTDet pyramid (`method: finetune_mask2former`; SPEC.md §6, docs/finetune.md).

`finetune.task: semantic` trains on one mask per class present (label 255 ignored) and reports mIoU with the per-class
IoU table; `instance` trains on one mask per instance (thing classes = classes 1.. with class 0 the background) and
reports COCO mask/box AP. The loss is transformers' Mask2Former criterion (published weights, deep supervision); the
published optimiser is AdamW 1e-4, weight decay 0.05, backbone lr x0.1, full-model gradient clip 0.01, poly decay
(recipes/finetune_m2f_ade20k_vit_small.yaml).

Named deviation: the official backbone multiplier 0.1 applies to the pretrained ViT trunk only; the simple feature
pyramid (new, randomly initialised) trains at the base rate like the pixel decoder.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sslpipe.eval.detection import DetectionMetric, masks_to_targets
from sslpipe.eval.segmentation import SegmentationMetric
from sslpipe.heads.mask2former import (
    build_mask2former,
    instance_inference,
    instance_targets,
    semantic_inference,
    semantic_targets,
)
from sslpipe.heads.vitdet import ViTDetPyramid
from sslpipe.recipes.finetune import DenseFinetuneRecipe, crop_resize_logits, stack_or_none


class Mask2FormerRecipe(DenseFinetuneRecipe):
    """`method: finetune_mask2former`."""

    normalize_images = True
    backbone_prefix = "model.pixel_level_module.encoder.pyramid.backbone"
    top_block = False  # Mask2Former reads p2-p5 only

    def num_labels(self) -> int:
        n = len(self.class_names)
        return n - 1 if self.needs_instances else n

    def build_head(self, pyramid: ViTDetPyramid) -> nn.Module:
        f = self.cfg.finetune
        return build_mask2former(
            pyramid, self.num_labels(), hidden_dim=f.hidden_dim, num_queries=f.num_queries,
            decoder_layers=f.decoder_layers, encoder_layers=f.encoder_layers, num_heads=f.num_heads,
            dim_feedforward=f.dim_feedforward, encoder_feedforward_dim=f.encoder_feedforward_dim,
            train_num_points=f.train_num_points, oversample_ratio=f.oversample_ratio,
            importance_sample_ratio=f.importance_sample_ratio, class_weight=f.class_weight,
            mask_weight=f.mask_weight, dice_weight=f.dice_weight, no_object_weight=f.no_object_weight,
            ignore_index=f.ignore_index,
        )

    def targets(self, batch: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        seg = torch.stack(batch["seg"]).to(self.device)
        if self.needs_instances:
            return instance_targets(stack_or_none(batch["inst"]).to(self.device), seg, 1,
                                    self.cfg.finetune.ignore_index)
        return semantic_targets(seg, self.cfg.finetune.ignore_index)

    def step(self, batch: dict[str, Any], sched: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        mask_labels, class_labels = self.targets(batch)
        out = self.student(pixel_values=batch["images"].to(self.device), mask_labels=mask_labels,
                           class_labels=class_labels)
        return out.loss, {"gt_masks": sum(len(c) for c in class_labels) / len(class_labels)}

    # ------------------------------------------------------------ evaluation
    def eval_metric(self) -> Any:
        if self.needs_instances:
            return DetectionMetric(("bbox", "segm"))
        return SegmentationMetric(len(self.class_names), self.cfg.finetune.ignore_index, self.class_names)

    def eval_batch(self, model: nn.Module, batch: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        images = batch["images"].to(self.device)
        out = model(pixel_values=images)
        preds, targets = [], []
        for i, (valid, seg) in enumerate(zip(batch["sizes"], batch["seg"])):
            masks = crop_resize_logits(out.masks_queries_logits[i].float(), valid, tuple(images.shape[-2:]),
                                       tuple(seg.shape))
            cls = out.class_queries_logits[i: i + 1].float()
            if self.needs_instances:
                pred = instance_inference(cls, masks[None], tuple(seg.shape), self.cfg.finetune.test_topk)[0]
                preds.append({k: v.cpu() for k, v in pred.items()})
                targets.append(masks_to_targets(batch["inst"][i], seg, 1, self.cfg.finetune.ignore_index))
            else:
                preds.append(semantic_inference(cls, masks[None], tuple(seg.shape)).argmax(1)[0].cpu())
                targets.append(seg)
        return preds, targets

    def overlays(self, batch: dict[str, Any], preds: Any, targets: Any) -> list[list[Tensor]]:
        from sslpipe.predict import SHOW_SCORE, instance_overlay, semantic_overlay

        rows = []
        n = len(self.class_names)
        for i, valid in enumerate(batch["sizes"]):
            image = self.display_image(batch["images"][i], valid)
            if tuple(image.shape[-2:]) != tuple(batch["seg"][i].shape):
                image = torch.nn.functional.interpolate(image[None].float(), size=tuple(batch["seg"][i].shape),
                                                        mode="bilinear").round().clamp(0, 255).to(torch.uint8)[0]
            if self.needs_instances:
                rows.append([image, instance_overlay(image, targets[i], n, offset=1),
                             instance_overlay(image, preds[i], n, offset=1, min_score=SHOW_SCORE,
                                              top_k=len(targets[i]["labels"]))])
            else:
                rows.append([image, semantic_overlay(image, targets[i], n, self.cfg.finetune.ignore_index),
                             semantic_overlay(image, preds[i], n, self.cfg.finetune.ignore_index)])
        return rows

    def flat_metrics(self, result: dict[str, Any]) -> dict[str, float]:
        out = super().flat_metrics(result)
        for name, iou in result.get("per_class", {}).items():
            out[f"iou/{name}"] = iou
        return out
