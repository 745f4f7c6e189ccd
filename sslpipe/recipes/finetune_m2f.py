"""Mask2Former fine-tuning on a ViTDet pyramid (`method: finetune_mask2former`; docs/methods.md §6,
docs/finetune.md).

`finetune_mask2former.task: semantic` trains on one mask per class present (label 255 ignored) and reports mIoU with the
per-class IoU table; `instance` trains on one mask per instance (thing classes = classes 1.. with class 0 the
background) and reports COCO mask/box AP. The loss is transformers' Mask2Former criterion (published weights, deep
supervision); the published optimiser is AdamW 1e-4, weight decay 0.05, backbone lr x0.1, full-model gradient clip 0.01,
poly decay (recipes/finetune_m2f_ade20k_vit_small.yaml).

Evaluation keeps the token grid of training (the ViT's position tables are never stretched to another grid):
semantic tasks slide windows of `img_size` (`eval.window`) over the image (after the optional `eval.resize`) at a
stride of 2/3 of the window (`eval.stride_rate`) and average the per-class scores where windows overlap, the protocol of
the official plain-ViT segmentation evaluations (BEiT, ViT-Adapter: 512 windows, stride 341 px; here
ceil(2/3 x 512) = 342); `eval.mode: whole` runs the image as it is.
Instance tasks fit the image into the img_size square (longer side resized, padded), as ViTDet's `square_pad`.

Named deviations: the official backbone multiplier 0.1 applies to the pretrained ViT trunk only; the simple feature
pyramid (new, randomly initialised) trains at the base rate like the pixel decoder. Mask2Former's own ADE20K test
(Swin backbones) runs the whole image at short side 512; a plain ViT trained on one grid needs the fixed-grid one.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from sslpipe.config import RunConfig
from sslpipe.data.targets import masks_to_targets
from sslpipe.eval.detection import DetectionMetric
from sslpipe.eval.seg_eval import slide_logits
from sslpipe.eval.segmentation import SegmentationMetric
from sslpipe.heads.mask2former import (
    build_mask2former,
    instance_inference,
    instance_targets,
    semantic_inference,
    semantic_targets,
)
from sslpipe.heads.vitdet import ViTDetPyramid
from sslpipe.recipes.finetune import (
    DENSE_UNREAD,
    DenseFinetuneRecipe,
    FinetuneConfig,
    crop_resize_logits,
    stack_or_none,
)

PAD_TO = 32  # inputs are padded to a multiple of the pyramid's coarsest stride (collate_dense's default)


def _pad_to(labels: Tensor, height: int, width: int, fill: int) -> Tensor:
    """(B, h, w) label maps padded bottom/right with `fill` to (B, height, width)."""
    return F.pad(labels, (0, width - labels.shape[-1], 0, height - labels.shape[-2]), value=fill)


class Mask2FormerConfig(FinetuneConfig):
    """`finetune_mask2former:` in a recipe: the shared fine-tuning settings plus Mask2Former's (docs/methods.md §6;
    defaults published). Semantic evaluation slides windows of `eval.window` (null: img_size) at a stride of
    `eval.stride_rate` (BEiT / ViT-Adapter ADE20K: 512 windows at 341 px; 2/3 here gives 342), or takes the
    `whole` image."""

    task: Literal["semantic", "instance"] = "semantic"
    num_queries: int = Field(100, gt=0)
    hidden_dim: int = Field(256, gt=0)
    num_heads: int = Field(8, gt=0)
    dim_feedforward: int = Field(2048, gt=0)
    decoder_layers: int = Field(10, ge=2)  # 9 masked-attention layers + the query-only prediction
    encoder_layers: int = Field(6, ge=1)
    encoder_feedforward_dim: int = Field(1024, gt=0)
    train_num_points: int = Field(12544, gt=0)
    oversample_ratio: float = Field(3.0, ge=1)
    importance_sample_ratio: float = Field(0.75, ge=0, le=1)
    class_weight: float = Field(2.0, ge=0)
    mask_weight: float = Field(5.0, ge=0)
    dice_weight: float = Field(5.0, ge=0)
    no_object_weight: float = Field(0.1, ge=0)
    test_topk: int = Field(100, gt=0)  # instance inference: top-k (query, class) pairs per image

    def check_run(self, run: RunConfig) -> None:
        """Instance evaluation fits the whole image into the training square: the sliding-window keys are unread."""
        if self.task == "instance":
            run.eval.refuse_unread_values("eval", dict.fromkeys(("mode", "window", "stride_rate"),
                                                                "finetune_mask2former.task=instance"))


class Mask2FormerRecipe(DenseFinetuneRecipe):
    """`method: finetune_mask2former`."""

    config_key = "finetune_mask2former"
    config_section = Mask2FormerConfig
    unread = DENSE_UNREAD

    normalize_images = True
    backbone_prefix = "model.pixel_level_module.encoder.pyramid.backbone"
    top_block = False  # Mask2Former reads p2-p5 only

    def num_labels(self) -> int:
        n = len(self.class_names)
        return n - 1 if self.needs_instances else n

    def build_head(self, pyramid: ViTDetPyramid) -> nn.Module:
        f = self.section
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
        """Target masks on the collated images' canvas: the crops' labels padded like the images (bottom/right, to a
        multiple of 32) with pixels of no mask, as the official `prepare_targets` pads its gt masks. The criterion
        samples predictions and targets at the same relative points, so unpadded targets would be stretched over
        the padded canvas whenever img_size is not a multiple of 32."""
        height, width = batch["images"].shape[-2:]
        ignore = self.section.ignore_index
        seg = _pad_to(torch.stack(batch["seg"]), height, width, ignore).to(self.device)
        if self.needs_instances:
            inst = _pad_to(stack_or_none(batch["inst"]), height, width, 0).to(self.device)
            return instance_targets(inst, seg, 1, ignore)
        return semantic_targets(seg, ignore)

    def step(self, batch: dict[str, Any], sched: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        mask_labels, class_labels = self.targets(batch)
        out = self.student(pixel_values=batch["images"].to(self.device), mask_labels=mask_labels,
                           class_labels=class_labels)
        return out.loss, {"gt_masks": sum(len(c) for c in class_labels) / len(class_labels)}

    # ------------------------------------------------------------ evaluation
    def eval_metric(self) -> Any:
        if self.needs_instances:
            return DetectionMetric(("bbox", "segm"))
        return SegmentationMetric(len(self.class_names), self.section.ignore_index, self.class_names)

    def eval_batch(self, model: nn.Module, batch: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        """One image at a time on the training grid (module docstring): semantic scores by sliding img_size windows
        (or the whole image), instance predictions on the image fitted into the img_size square."""
        f = self.section
        preds, targets = [], []
        for i, (valid, seg) in enumerate(zip(batch["sizes"], batch["seg"])):
            image = batch["images"][i: i + 1, :, : valid[0], : valid[1]].to(self.device)
            size = tuple(seg.shape)
            if self.needs_instances:
                cls, masks = self.square_logits(model, image, size)
                pred = instance_inference(cls, masks[None], size, f.test_topk)[0]
                preds.append({k: v.cpu() for k, v in pred.items()})
                targets.append(masks_to_targets(batch["inst"][i], seg, 1, f.ignore_index, batch["crowd"][i]))
            else:
                scores = self.semantic_scores(model, image)
                if tuple(scores.shape[-2:]) != size:
                    scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
                preds.append(scores.argmax(1)[0].cpu())
                targets.append(seg)
        return preds, targets

    def semantic_scores(self, model: nn.Module, image: Tensor) -> Tensor:
        """(1, K, h, w) per-class scores of one normalised image (1, 3, h, w): `slide` windows of img_size (an image
        smaller than a window is padded, centred) or the `whole` image; each input is padded to a multiple of 32, as
        in training, and its scores cropped back."""
        f = self.section

        def scores(x: Tensor) -> Tensor:
            h, w = x.shape[-2:]
            padded = F.pad(x, (0, (-w) % PAD_TO, 0, (-h) % PAD_TO))
            out = model(pixel_values=padded)
            return semantic_inference(out.class_queries_logits.float(), out.masks_queries_logits.float(),
                                      tuple(padded.shape[-2:]))[..., :h, :w]

        e = self.cfg.eval
        if (e.mode or "slide") == "slide":
            return slide_logits(scores, image, e.window or f.img_size, e.stride_rate)
        return scores(image)

    def square_logits(self, model: nn.Module, image: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(class logits (1, Q, K+1), mask logits (Q, *size)) of one image with its longer side resized to img_size
        and padded to the img_size square (ViTDet's square pad; further to a multiple of 32, as in training), masks
        brought back to the label's `size`."""
        side = self.section.img_size
        canvas = -(-side // PAD_TO) * PAD_TO
        h, w = image.shape[-2:]
        scale = side / max(h, w)
        fitted = (max(1, round(h * scale)), max(1, round(w * scale)))
        if fitted != (h, w):
            image = F.interpolate(image, size=fitted, mode="bilinear", align_corners=False, antialias=scale < 1)
        out = model(pixel_values=F.pad(image, (0, canvas - fitted[1], 0, canvas - fitted[0])))
        masks = crop_resize_logits(out.masks_queries_logits[0].float(), fitted, (canvas, canvas), size)
        return out.class_queries_logits.float(), masks

    def overlays(self, batch: dict[str, Any], preds: Any, targets: Any) -> list[list[Tensor]]:
        from sslpipe.viz.overlays import SHOW_SCORE, instance_overlay, semantic_overlay

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
                rows.append([image, semantic_overlay(image, targets[i], n, self.section.ignore_index),
                             semantic_overlay(image, preds[i], n, self.section.ignore_index)])
        return rows

    def flat_metrics(self, result: dict[str, Any]) -> dict[str, float]:
        out = super().flat_metrics(result)
        for name, iou in result.get("per_class", {}).items():
            out[f"iou/{name}"] = iou
        return out
