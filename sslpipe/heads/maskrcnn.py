"""ViTDet's Mask R-CNN: torchvision's MaskRCNN on the simple feature pyramid (SPEC.md §5).

torchvision accepts any backbone with `out_channels` that returns an ordered dict of maps. The heads follow detectron2's
`configs/common/models/mask_rcnn_vitdet.py`: RPN with 2 convs over all five levels (one anchor size per level, aspect
ratios 0.5/1/2), RoIAlign (7x7 boxes, 14x14 masks, sampling_ratio 0) on p2-p5, a 4conv1fc box head and a 4-conv
mask head, both with LayerNorm. torchvision's own detection transform normalises (image_mean/std), resizes to
`min_size`/`max_size` and pads batches to a multiple of the pyramid's coarsest stride.

Differences from detectron2, named: torchvision's box coder, sampler and RoIAlign (aligned=False in MultiScaleRoIAlign)
are used as they are; detectron2 uses ROIAlignV2 (aligned=True). Images are fed as [0, 1] RGB and normalised with the
backbone's mean/std rather than detectron2's 0-255 pixel mean/std (same result).
"""
from __future__ import annotations

from collections.abc import Sequence

from timm.layers import LayerNorm2d
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from sslpipe.heads.vitdet import ViTDetPyramid


def build_mask_rcnn(pyramid: ViTDetPyramid, num_classes: int, *, min_size: int = 1024, max_size: int = 1024,
                    image_mean: Sequence[float] = (0.485, 0.456, 0.406),
                    image_std: Sequence[float] = (0.229, 0.224, 0.225),
                    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
                    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                    rpn_batch_size_per_image: int = 256, rpn_pre_nms_top_n: tuple[int, int] = (2000, 1000),
                    rpn_post_nms_top_n: tuple[int, int] = (1000, 1000), box_batch_size_per_image: int = 512,
                    box_detections_per_img: int = 100, box_score_thresh: float = 0.05,
                    box_head_convs: int = 4, mask_head_convs: int = 4, head_dim: int = 256,
                    fc_dim: int = 1024) -> MaskRCNN:
    """Mask R-CNN over a ViTDet pyramid; `num_classes` includes the background (torchvision's convention).

    Defaults are detectron2's COCO values at 1024 px (anchors 32-512 on p2-p6, RPN 2000/1000 pre-NMS and 1000
    post-NMS per image in training/testing, 256 RPN and 512 RoI samples per image, test score threshold 0.05).
    """
    names = list(pyramid.strides)
    if len(anchor_sizes) != len(names):
        raise ValueError(f"anchor_sizes needs one size per pyramid level {names}, got {list(anchor_sizes)}")
    anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), (tuple(aspect_ratios),) * len(names))
    roi_names = [n for n in names if n != names[-1]] if pyramid.fpn.top_block else names
    channels = pyramid.out_channels
    box_head = FastRCNNConvFCHead((channels, 7, 7), [head_dim] * box_head_convs, [fc_dim], norm_layer=LayerNorm2d)
    return MaskRCNN(
        pyramid,
        min_size=min_size, max_size=max_size, image_mean=list(image_mean), image_std=list(image_std),
        size_divisible=pyramid.size_divisibility,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=2),
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n[0], rpn_pre_nms_top_n_test=rpn_pre_nms_top_n[1],
        rpn_post_nms_top_n_train=rpn_post_nms_top_n[0], rpn_post_nms_top_n_test=rpn_post_nms_top_n[1],
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_roi_pool=MultiScaleRoIAlign(roi_names, output_size=7, sampling_ratio=0),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(fc_dim, num_classes),
        box_batch_size_per_image=box_batch_size_per_image, box_detections_per_img=box_detections_per_img,
        box_score_thresh=box_score_thresh,
        mask_roi_pool=MultiScaleRoIAlign(roi_names, output_size=14, sampling_ratio=0),
        mask_head=MaskRCNNHeads(channels, [head_dim] * mask_head_convs, 1, norm_layer=LayerNorm2d),
        mask_predictor=MaskRCNNPredictor(head_dim, head_dim, num_classes),
    )
