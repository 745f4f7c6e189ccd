"""Mask2Former (Cheng et al., CVPR 2022; docs/methods.md §6) on a ViTDet pyramid, through transformers' implementation.

transformers' `Mask2FormerForUniversalSegmentation` is a maintained, CPU-capable port of the official model (pure
PyTorch multi-scale deformable attention): pixel decoder (6 deformable-attention layers over 1/8, 1/16, 1/32, FPN to
1/4, per-pixel embedding), masked-attention decoder (learnable query features + query positions, cross -> self -> FFN,
round-robin over 3 scales, attention mask = previous mask prediction resized to the level with sigmoid < 0.5 blocked,
detached, a query whose mask blocks everything attends everywhere), class head (K + 1) and 3-layer mask MLP, and the
loss (Hungarian matching with cost 2 * class + 5 * sigmoid-BCE + 5 * dice on `train_num_points` shared random points;
class CE weight 2 with no-object weight 0.1; mask BCE + dice weight 5 on importance-sampled points, 3K candidates,
0.75K most uncertain by -|logit| + 0.25K uniform; normalised by the number of target masks, all 10 predictions
deep-supervised). It is used as it is, but for one mend; this module otherwise only adapts the backbone and the
targets. The mend: the loss's mask count. The official criterion sums the target masks of all processes and divides by
the number of processes once; transformers 5.x averages them over processes (accelerate's `reduce`) and then divides
by the number of processes again, so with W processes the mask and dice losses came out W times too large against the
class loss (huggingface/transformers#26844). `num_masks` replaces it.

Attaching our backbone: the model is built offline from a `Mask2FormerConfig` whose backbone is a stand-in (a tiny
transformers ResNet config with the pyramid's channel counts, so no hub look-up happens and the pixel decoder is sized
right), and the stand-in is then replaced by `PyramidEncoder`: building the real encoder inside the model would let
the model's weight init (`post_init`) overwrite the pretrained backbone.

Targets follow the official dataset mappers: semantic = one binary mask per class present in the label map (ignore
pixels are negatives of every mask); instance = one mask per instance id with its thing class.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from sslpipe.heads.vitdet import ViTDetPyramid

PYRAMID_LEVELS = ("p2", "p3", "p4", "p5")


class PyramidEncoder(nn.Module):
    """A ViTDet pyramid in the shape of a transformers backbone: `.channels` (4 ints) and `forward(pixel_values)`
    returning `BackboneOutput(feature_maps=(1/4, 1/8, 1/16, 1/32 maps))`."""

    def __init__(self, pyramid: ViTDetPyramid, levels: Sequence[str] = PYRAMID_LEVELS) -> None:
        super().__init__()
        strides = [pyramid.strides.get(name) for name in levels]
        if strides != [4, 8, 16, 32]:
            raise ValueError(f"Mask2Former needs pyramid levels at strides 4/8/16/32, got {dict(zip(levels, strides))}")
        self.pyramid = pyramid
        self.levels = tuple(levels)
        self.channels = [pyramid.out_channels] * len(levels)

    def forward(self, pixel_values: Tensor) -> Any:
        from transformers.modeling_outputs import BackboneOutput

        maps = self.pyramid(pixel_values)
        return BackboneOutput(feature_maps=tuple(maps[name] for name in self.levels))


def build_mask2former(pyramid: ViTDetPyramid, num_labels: int, *, hidden_dim: int = 256, num_queries: int = 100,
                      decoder_layers: int = 10, encoder_layers: int = 6, num_heads: int = 8,
                      dim_feedforward: int = 2048, encoder_feedforward_dim: int = 1024,
                      train_num_points: int = 12544, oversample_ratio: float = 3.0,
                      importance_sample_ratio: float = 0.75, class_weight: float = 2.0, mask_weight: float = 5.0,
                      dice_weight: float = 5.0, no_object_weight: float = 0.1, ignore_index: int = 255) -> nn.Module:
    """transformers' Mask2FormerForUniversalSegmentation (published defaults, docs/methods.md §6) with `pyramid` as
    encoder.

    `decoder_layers` counts the query-only prediction too (official DEC_LAYERS 10 = 9 layers + 1), as in
    transformers. `hidden_dim` is also the pixel decoder's width and the mask-embedding size (official 256 for all).
    """
    from transformers import Mask2FormerForUniversalSegmentation
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "resnet is not a supported backbone": it is only the stand-in
    try:
        model = Mask2FormerForUniversalSegmentation(_config(
            pyramid.out_channels, num_labels, hidden_dim=hidden_dim, num_queries=num_queries,
            decoder_layers=decoder_layers, encoder_layers=encoder_layers, num_attention_heads=num_heads,
            dim_feedforward=dim_feedforward, encoder_feedforward_dim=encoder_feedforward_dim,
            train_num_points=train_num_points, oversample_ratio=oversample_ratio,
            importance_sample_ratio=importance_sample_ratio, class_weight=class_weight, mask_weight=mask_weight,
            dice_weight=dice_weight, no_object_weight=no_object_weight, ignore_value=ignore_index))
    finally:
        hf_logging.set_verbosity(verbosity)
    model.model.pixel_level_module.encoder = PyramidEncoder(pyramid)
    model.criterion.get_num_masks = num_masks
    return model


def num_masks(class_labels: Sequence[Tensor], device: torch.device) -> Tensor:
    """The loss's normaliser, as the official criterion: the target masks of every process's batch, summed, divided
    by the number of processes, at least 1 (module docstring)."""
    count = torch.as_tensor(float(sum(len(classes) for classes in class_labels)), device=device)
    processes = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        processes = dist.get_world_size()
    return torch.clamp(count / processes, min=1)


def _config(channels: int, num_labels: int, *, hidden_dim: int, **kwargs: Any) -> Any:
    """The model config with a stand-in backbone of `channels` per level (never used, see the module docstring)."""
    from transformers import Mask2FormerConfig, ResNetConfig

    stand_in = ResNetConfig(embedding_size=8, hidden_sizes=[channels] * 4, depths=[1] * 4,
                            layer_type="basic", out_features=["stage1", "stage2", "stage3", "stage4"])
    return Mask2FormerConfig(backbone_config=stand_in, num_labels=num_labels, feature_size=hidden_dim,
                             mask_feature_size=hidden_dim, hidden_dim=hidden_dim, dropout=0.0,
                             use_auxiliary_loss=True, **kwargs)


# ---------------------------------------------------------------------------------------------------- targets
def semantic_targets(labels: Tensor, ignore_index: int = 255) -> tuple[list[Tensor], list[Tensor]]:
    """(B, H, W) class maps -> per image (binary masks (N, H, W) float, classes (N,) long) of the classes present.

    Ignored pixels belong to no mask (official MaskFormerSemanticDatasetMapper)."""
    masks, classes = [], []
    for lab in labels:
        present = torch.unique(lab)
        present = present[present != ignore_index]
        classes.append(present.long())
        masks.append((lab[None] == present[:, None, None]).float())
    return masks, classes


def instance_targets(instances: Tensor, semantic: Tensor, class_offset: int = 1,
                     ignore_index: int = 255) -> tuple[list[Tensor], list[Tensor]]:
    """(B, H, W) instance ids (0 = none) + class maps -> per image (masks (N, H, W), thing classes (N,)); an instance's
    class is the majority semantic class under it minus `class_offset` (1 when class 0 is the background)."""
    from sslpipe.data.targets import masks_to_targets

    masks, classes = [], []
    for inst, sem in zip(instances, semantic):
        target = masks_to_targets(inst, sem, class_offset, ignore_index)
        masks.append(target["masks"].float())
        classes.append(target["labels"])
    return masks, classes


# -------------------------------------------------------------------------------------------------- inference
def semantic_inference(class_logits: Tensor, mask_logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Official `semantic_inference`: per-class scores sum_q softmax(class_q)[c] * sigmoid(mask_q) at `size`.

    class_logits (B, Q, K + 1), mask_logits (B, Q, h, w) -> (B, K, H, W); argmax over K is the prediction."""
    masks = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False).sigmoid()
    probs = class_logits.softmax(-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", probs, masks)


def instance_inference(class_logits: Tensor, mask_logits: Tensor, size: tuple[int, int],
                       topk: int = 100) -> list[dict[str, Tensor]]:
    """Official `instance_inference` per image: the top-k (query, class) pairs by class probability, masks = logit >
    0, score = class probability x mean mask probability inside the mask; boxes span the mask pixels (x2 = last
    column + 1). Returns torchmetrics-style dicts: boxes, scores, labels, masks (bool)."""
    from torchvision.ops import masks_to_boxes

    masks_all = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    out = []
    for cls, masks in zip(class_logits, masks_all):
        q, k1 = cls.shape
        scores = cls.softmax(-1)[:, :-1]
        labels = torch.arange(k1 - 1, device=cls.device).repeat(q)
        top_scores, top = scores.flatten().topk(min(topk, scores.numel()))
        m = masks[top // (k1 - 1)]
        binary = m > 0
        mask_score = (m.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        nonempty = binary.flatten(1).any(1)
        boxes = torch.zeros(len(top), 4, device=cls.device)
        if nonempty.any():
            boxes[nonempty] = masks_to_boxes(binary[nonempty]).float() + torch.tensor([0.0, 0.0, 1.0, 1.0],
                                                                                    device=cls.device)
        out.append({"boxes": boxes, "scores": top_scores * mask_score, "labels": labels[top], "masks": binary})
    return out
