"""ViTDet's Mask R-CNN: torchvision's MaskRCNN on the simple feature pyramid (docs/methods.md §5).

torchvision accepts any backbone with `out_channels` that returns an ordered dict of maps. The heads follow detectron2's
`configs/common/models/mask_rcnn_vitdet.py` (on `mask_rcnn_fpn.py`): RPN with 2 convs over all five levels (one anchor
size per level, aspect ratios 0.5/1/2), ROIAlignV2 (`aligned=True`: pixel centres at +0.5; 7x7 boxes, 14x14 masks,
sampling_ratio 0) on p2-p5 with FPN level assignment, a 4conv1fc box head and a 4-conv mask head, both with
LayerNorm, and L1 box-regression losses in the RPN and the box head (detectron2 `smooth_l1_beta=0`; torchvision's
smooth L1 with beta 1/9 is replaced). torchvision's own detection transform normalises (image_mean/std), resizes the
longer side to `max_size` and pads every image to the `fixed_size` square when given (detectron2's ViTDet
`square_pad`: the token grid of evaluation equals training's), else to a multiple of the pyramid's coarsest stride.

Remaining differences from detectron2, named: torchvision's box coder and samplers; images are fed as [0, 1] RGB and
normalised with the backbone's mean/std rather than detectron2's 0-255 pixel mean/std (same result). The L1 losses
are put in by subclassing torchvision's RPN and RoIHeads (`L1RegionProposalNetwork`, `L1RoIHeads`): the box
head's loss is recomputed from the predictor's recorded output, since torchvision computes it inside `forward`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import LevelMapper

from sslpipe.heads.vitdet import ViTDetPyramid


class ROIAlignV2(MultiScaleRoIAlign):
    """detectron2's `ROIPooler(pooler_type="ROIAlignV2")` over pyramid levels of known strides: each box goes to
    level floor(4 + log2(sqrt(area) / 224)) clamped to the levels given (FPN eq. 1, canonical box 224 at p4), and is
    pooled there by `roi_align(aligned=True)`. A MultiScaleRoIAlign (torchvision's MaskRCNN checks the type) whose
    forward pools with aligned=True at the pyramid's own strides instead of strides guessed from the image size."""

    def __init__(self, featmap_names: list[str], strides: list[int], output_size: int,
                 sampling_ratio: int = 0) -> None:
        super().__init__(list(featmap_names), output_size, sampling_ratio)
        self.strides = [int(s) for s in strides]
        self.map_levels = LevelMapper(int(math.log2(self.strides[0])), int(math.log2(self.strides[-1])))

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], 1) for i, b in enumerate(boxes)])
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        if not len(rois):
            return out
        levels = self.map_levels(boxes)
        for level, (feat, stride) in enumerate(zip(feats, self.strides)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(feat, rois[idx], self.output_size, spatial_scale=1.0 / stride,
                               sampling_ratio=self.sampling_ratio, aligned=True)
            out[idx] = pooled.to(out.dtype)
        return out


class L1RegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with detectron2's L1 box loss (`smooth_l1_beta=0`): sum over the sampled positive anchors
    divided by the number of sampled anchors, like torchvision's own normalisation."""

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos))[0]
        sampled = torch.cat([pos, torch.where(torch.cat(neg))[0]])
        targets = torch.cat(regression_targets)
        box_loss = F.l1_loss(pred_bbox_deltas[pos], targets[pos], reduction="sum") / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], torch.cat(labels)[sampled])
        return objectness_loss, box_loss


class RecordingPredictor(FastRCNNPredictor):
    """FastRCNNPredictor that keeps its last box regression for `L1RoIHeads` (cleared there after use)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        scores, deltas = super().forward(x)
        self.last_deltas = deltas
        return scores, deltas


class L1RoIHeads(RoIHeads):
    """torchvision's RoIHeads with detectron2's L1 box-regression loss (`smooth_l1_beta=0`): the sum of |delta -
    target| of each sampled foreground RoI's own class, divided by the number of sampled RoIs (as torchvision and
    detectron2 normalise). torchvision computes its smooth-L1 inside `forward`; it is replaced by this one."""

    def select_training_samples(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> tuple:
        out = super().select_training_samples(proposals, targets)
        self.sampled = (out[2], out[3])  # labels, regression targets
        return out

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        result, losses = super().forward(features, proposals, image_shapes, targets)
        if self.training:
            labels, regression_targets = (torch.cat(t) for t in self.sampled)
            deltas = self.box_predictor.last_deltas
            fg = torch.where(labels > 0)[0]
            deltas = deltas.reshape(len(labels), -1, 4)[fg, labels[fg]]
            losses["loss_box_reg"] = F.l1_loss(deltas, regression_targets[fg], reduction="sum") / labels.numel()
            del self.sampled, self.box_predictor.last_deltas
        return result, losses


def build_mask_rcnn(pyramid: ViTDetPyramid, num_classes: int, *, min_size: int = 1024, max_size: int = 1024,
                    image_mean: Sequence[float] = (0.485, 0.456, 0.406),
                    image_std: Sequence[float] = (0.229, 0.224, 0.225),
                    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
                    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                    rpn_batch_size_per_image: int = 256, rpn_pre_nms_top_n: tuple[int, int] = (2000, 1000),
                    rpn_post_nms_top_n: tuple[int, int] = (1000, 1000), box_batch_size_per_image: int = 512,
                    box_detections_per_img: int = 100, box_score_thresh: float = 0.05,
                    box_head_convs: int = 4, mask_head_convs: int = 4, head_dim: int = 256,
                    fc_dim: int = 1024, fixed_size: int | None = None) -> MaskRCNN:
    """Mask R-CNN over a ViTDet pyramid; `num_classes` includes the background (torchvision's convention).

    Defaults are detectron2's COCO values at 1024 px (anchors 32-512 on p2-p6, RPN 2000/1000 pre-NMS and 1000
    post-NMS per image in training/testing, 256 RPN and 512 RoI samples per image, test score threshold 0.05).
    `fixed_size`: pad every (resized) image to this square, rounded up to the coarsest stride (ViTDet's square pad;
    give the training crop, with max_size no larger).
    """
    names = list(pyramid.strides)
    if len(anchor_sizes) != len(names):
        raise ValueError(f"anchor_sizes needs one size per pyramid level {names}, got {list(anchor_sizes)}")
    anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), (tuple(aspect_ratios),) * len(names))
    roi_names = [n for n in names if n != names[-1]] if pyramid.fpn.top_block else names
    roi_strides = [pyramid.strides[n] for n in roi_names]
    channels = pyramid.out_channels
    box_head = FastRCNNConvFCHead((channels, 7, 7), [head_dim] * box_head_convs, [fc_dim], norm_layer=LayerNorm2d)
    divisible = pyramid.size_divisibility
    if fixed_size is not None:
        if max_size > fixed_size:
            raise ValueError(f"max_size {max_size} > fixed_size {fixed_size}: resized images would not fit the square")
        divisible = -(-fixed_size // divisible) * divisible
    model = MaskRCNN(
        pyramid,
        min_size=min_size, max_size=max_size, image_mean=list(image_mean), image_std=list(image_std),
        size_divisible=divisible,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=2),
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n[0], rpn_pre_nms_top_n_test=rpn_pre_nms_top_n[1],
        rpn_post_nms_top_n_train=rpn_post_nms_top_n[0], rpn_post_nms_top_n_test=rpn_post_nms_top_n[1],
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_roi_pool=ROIAlignV2(roi_names, roi_strides, output_size=7, sampling_ratio=0),
        box_head=box_head,
        box_predictor=RecordingPredictor(fc_dim, num_classes),
        box_batch_size_per_image=box_batch_size_per_image, box_detections_per_img=box_detections_per_img,
        box_score_thresh=box_score_thresh,
        mask_roi_pool=ROIAlignV2(roi_names, roi_strides, output_size=14, sampling_ratio=0),
        mask_head=MaskRCNNHeads(channels, [head_dim] * mask_head_convs, 1, norm_layer=LayerNorm2d),
        mask_predictor=MaskRCNNPredictor(head_dim, head_dim, num_classes),
    )
    # detectron2's L1 box losses: torchvision builds its RPN and RoIHeads inside MaskRCNN; the subclasses add no
    # state, only the loss, so the built modules take their class
    model.rpn.__class__ = L1RegionProposalNetwork
    model.roi_heads.__class__ = L1RoIHeads
    return model
