"""ViTDet's Mask R-CNN: torchvision's MaskRCNN on the simple feature pyramid (docs/methods.md §5).

torchvision accepts any backbone with `out_channels` that returns an ordered dict of maps. The heads follow detectron2's
`configs/common/models/mask_rcnn_vitdet.py` (on `mask_rcnn_fpn.py`): RPN with 2 convs over all five levels (one anchor
size per level, aspect ratios 0.5/1/2), ROIAlignV2 (`aligned=True`: pixel centres at +0.5; 7x7 boxes, 14x14 masks,
sampling_ratio 0) on p2-p5 with FPN level assignment, a 4conv1fc box head and a 4-conv mask head, both with
LayerNorm, and L1 box-regression losses in the RPN and the box head (detectron2 `smooth_l1_beta=0`; torchvision's
smooth L1 with beta 1/9 is replaced). Mask targets and mask pasting are detectron2's too: a RoI's 28x28 target is
`roi_align(aligned=True)` of its gt mask then `>= 0.5` (binary, on the pixel-centre grid the features are pooled on;
`BitMasks.crop_and_resize`), and evaluation pastes a mask by sampling it bilinearly at each image pixel centre inside
the exact float box (`layers/mask_ops.py`); torchvision's soft `aligned=False` targets and its paste into a widened
integer box are replaced (an ideal mask head scored mask IoU 0.79 on an 8 px object with them, 1.0 now).
torchvision's own detection transform normalises (image_mean/std), resizes the longer side to `max_size` and pads every
image to the `fixed_size` square when given (detectron2's ViTDet `square_pad`: the token grid of evaluation equals
training's), else to a multiple of the pyramid's coarsest stride.

Remaining differences from detectron2, named: torchvision's box coder and samplers; images are fed as [0, 1] RGB and
normalised with the backbone's mean/std rather than detectron2's 0-255 pixel mean/std (same result); gt masks are
bitmaps, so targets follow detectron2's bitmap rule (`BitMasks`), while detectron2's COCO loader keeps polygons and
rasterises them inside each RoI (`PolygonMasks.crop_and_resize`; detectron2 reports no accuracy difference); the
model returns pasted masks as probabilities (torchvision's format) and the caller binarises them with `>= 0.5`
(detectron2 binarises inside its paste). The L1 losses and the mask loss are put in by subclassing torchvision's RPN,
RoIHeads and transform (`L1RegionProposalNetwork`, `L1RoIHeads`, `PixelCentrePasteTransform`): the box head's and
the mask head's losses are recomputed from the predictors' recorded outputs, since torchvision computes them inside
`forward`.
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
from torchvision.models.detection.transform import GeneralizedRCNNTransform
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


class RecordingMaskPredictor(MaskRCNNPredictor):
    """MaskRCNNPredictor that keeps its last training logits for `L1RoIHeads`' mask loss (cleared there after use);
    same layers and parameter names, so checkpoints are unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        logits = super().forward(x)
        if self.training:
            self.last_logits = logits
        return logits


def mask_targets(gt_masks: Tensor, boxes: Tensor, matched_idxs: Tensor, size: int) -> Tensor:
    """detectron2's mask targets (`BitMasks.crop_and_resize`): each RoI's matched (H, W) gt mask pooled over the RoI by
    `roi_align(aligned=True)` (pixel centres at +0.5, adaptive sampling) on a size x size grid, then `>= 0.5`. Binary
    targets on the grid ROIAlignV2 pools the mask features on; torchvision's (`aligned=False`, soft) sit half a
    pixel off and blur every border. Returns (R, size, size) floats of 0/1."""
    if not len(boxes):
        return boxes.new_zeros((0, size, size))
    used, index = torch.unique(matched_idxs, return_inverse=True)  # only the matched masks become floats
    rois = torch.cat([index.to(boxes.dtype)[:, None], boxes], 1)
    pooled = roi_align(gt_masks[used][:, None].to(boxes.dtype), rois, (size, size), spatial_scale=1.0,
                       sampling_ratio=0, aligned=True)[:, 0]
    return (pooled >= 0.5).to(boxes.dtype)


def mask_loss(mask_logits: Tensor, proposals: list[Tensor], gt_masks: list[Tensor], gt_labels: list[Tensor],
              matched_idxs: list[Tensor]) -> Tensor:
    """detectron2's `mask_rcnn_loss`: mean binary cross-entropy of each foreground RoI's own-class mask logits
    against `mask_targets` (torchvision's `maskrcnn_loss` with its soft targets replaced)."""
    size = mask_logits.shape[-1]
    labels = torch.cat([gt[idx] for gt, idx in zip(gt_labels, matched_idxs)])
    targets = torch.cat([mask_targets(m, p, idx, size) for m, p, idx in zip(gt_masks, proposals, matched_idxs)])
    if not targets.numel():
        return mask_logits.sum() * 0
    logits = mask_logits[torch.arange(len(labels), device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


class L1RoIHeads(RoIHeads):
    """torchvision's RoIHeads with detectron2's L1 box-regression loss (`smooth_l1_beta=0`): the sum of |delta -
    target| of each sampled foreground RoI's own class, divided by the number of sampled RoIs (as torchvision and
    detectron2 normalise), and detectron2's binary pixel-centre mask targets (`mask_loss`). torchvision computes both
    losses inside `forward`; they are recomputed here from the predictors' recorded outputs and replace its own. Its
    mask loss is handed 1x1 stand-ins of the gt masks (views, nothing is copied) so that the full-size masks are
    turned into floats only once, here."""

    def select_training_samples(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> tuple:
        out = super().select_training_samples(proposals, targets)
        self.sampled = out  # proposals, matched gt indices, labels, regression targets
        return out

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        masked = self.training and self.has_mask() and targets is not None
        inner = [{**t, "masks": t["masks"][:, :1, :1]} for t in targets] if masked else targets
        result, losses = super().forward(features, proposals, image_shapes, inner)
        if self.training:
            sampled_proposals, matched_idxs, sampled_labels, sampled_targets = self.sampled
            labels, regression_targets = torch.cat(sampled_labels), torch.cat(sampled_targets)
            deltas = self.box_predictor.last_deltas
            fg = torch.where(labels > 0)[0]
            deltas = deltas.reshape(len(labels), -1, 4)[fg, labels[fg]]
            losses["loss_box_reg"] = F.l1_loss(deltas, regression_targets[fg], reduction="sum") / labels.numel()
            del self.box_predictor.last_deltas
            if masked:
                pos = [torch.where(lab > 0)[0] for lab in sampled_labels]
                losses["loss_mask"] = mask_loss(
                    self.mask_predictor.last_logits, [p[i] for p, i in zip(sampled_proposals, pos)],
                    [t["masks"] for t in targets], [t["labels"] for t in targets],
                    [m[i] for m, i in zip(matched_idxs, pos)])
                del self.mask_predictor.last_logits
            del self.sampled
        return result, losses


def paste_masks(masks: Tensor, boxes: Tensor, image_shape: tuple[int, int]) -> Tensor:
    """detectron2's paste (`layers/mask_ops.py`): (N, 1, M, M) mask probabilities -> (N, 1, H, W), each sampled
    bilinearly (grid_sample, zeros outside) at the image's pixel centres (i + 0.5) mapped into its exact float box.
    torchvision's `paste_masks_in_image` instead resizes the mask, widened by a cell, onto the integer box, which
    moves small objects' borders by a pixel. Each mask is only sampled over its box +- 1 pixel (everything else is
    below 0.5): one at a time on a CPU, as detectron2, in chunks of about 1 GiB of sampling grid elsewhere."""
    n, (height, width) = len(masks), image_shape
    out = torch.zeros((n, 1, height, width), dtype=torch.float32, device=masks.device)
    if not n:
        return out
    masks = masks.reshape(n, 1, *masks.shape[-2:]).float()
    boxes = boxes.float()
    step = 1 if masks.device.type == "cpu" else max(1, (1 << 30) // (12 * height * width))
    for start in range(0, n, step):
        chunk = slice(start, start + step)
        x0, y0, x1, y1 = boxes[chunk].unbind(1)
        left, top = max(int(x0.min().floor()) - 1, 0), max(int(y0.min().floor()) - 1, 0)
        right, bottom = min(int(x1.max().ceil()) + 1, width), min(int(y1.max().ceil()) + 1, height)
        if right <= left or bottom <= top:
            continue
        xs = torch.arange(left, right, device=masks.device, dtype=torch.float32) + 0.5
        ys = torch.arange(top, bottom, device=masks.device, dtype=torch.float32) + 0.5
        gx = (xs[None] - x0[:, None]) / (x1 - x0).clamp(min=1e-6)[:, None] * 2 - 1  # (k, w): -1, 1 = box edges
        gy = (ys[None] - y0[:, None]) / (y1 - y0).clamp(min=1e-6)[:, None] * 2 - 1
        grid = torch.stack([gx[:, None, :].expand(-1, len(ys), -1), gy[:, :, None].expand(-1, -1, len(xs))], -1)
        out[chunk, :, top:bottom, left:right] = F.grid_sample(masks[chunk], grid, align_corners=False)
    return out


class PixelCentrePasteTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform with detectron2's mask paste (`paste_masks`) in `postprocess`: boxes are
    scaled back to each original image as before, then the masks pasted into them."""

    def postprocess(self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        masks = [pred.pop("masks", None) for pred in result]
        result = super().postprocess(result, image_shapes, original_image_sizes)
        for pred, mask, size in zip(result, masks, original_image_sizes):
            if mask is not None:
                pred["masks"] = paste_masks(mask, pred["boxes"], size)
        return result


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
        mask_predictor=RecordingMaskPredictor(head_dim, head_dim, num_classes),
    )
    # detectron2's L1 box losses, mask targets and mask paste: torchvision builds its RPN, RoIHeads and transform
    # inside MaskRCNN; the subclasses add no state, only the rules, so the built modules take their class
    model.rpn.__class__ = L1RegionProposalNetwork
    model.roi_heads.__class__ = L1RoIHeads
    model.transform.__class__ = PixelCentrePasteTransform
    return model
