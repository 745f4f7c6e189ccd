"""What the [CLS] token looks at: the self-attention of the last block, per head (DINO's visualize_attention.py).

timm's attention modules run fused scaled-dot-product attention, which never forms the attention matrix. For the map,
the last block runs once on timm's unfused path (`fused_attn = False`), where the softmax attention passes through
`attn_drop`; a hook there reads it. The matrix is therefore timm's own, whatever the block adds to q and k: q/k norms,
the q and v biases of EVA-style blocks, and the rotary position embedding of RoPE ViTs (DINOv3: `*_dinov3`). The
[CLS] row over the patch tokens is the map. DINO's thresholded variant keeps, per map, the patches holding `MASS`
(60%) of its attention.

A ViT without a class token (global average pooling, as `sslpipe import` builds for I-JEPA-style checkpoints) has no
[CLS] row: row 0 would be the top-left patch's query. Its map is the attention each patch receives, averaged over
all patch queries (`received_attention`), and the caption says so.

CNNs have no attention; the class-agnostic stand-in is the L2 norm of the last feature map at each position (where
the activations are strong), with the same mass threshold.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from sslpipe.models.backbones import has_class_token
from sslpipe.viz.figures import heatmap, masked
from sslpipe.viz.overlays import save_rows
from sslpipe.viz.pca import patch_features

MASS = 0.6  # DINO's --threshold: keep the patches that hold 60% of the attention mass


def has_attention(model: nn.Module) -> bool:
    """A timm ViT whose last block has an attention with an unfused path (VisionTransformer, DeiT, DINOv2 with
    registers, EVA and DINOv3 RoPE ViTs)."""
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) > 0 else None
    return hasattr(attn, "fused_attn") and isinstance(getattr(attn, "attn_drop", None), nn.Dropout)


def patch_grid(model: nn.Module, x: Tensor) -> tuple[int, int]:
    """(h, w) patch grid of a ViT for input x (B, 3, H, W)."""
    ph, pw = model.patch_embed.patch_size
    return x.shape[-2] // ph, x.shape[-1] // pw


@torch.no_grad()
def last_attention(model: nn.Module, x: Tensor) -> Tensor:
    """The last block's softmax attention, (B, heads, tokens, tokens), for inputs x (B, 3, H, W)."""
    if not has_attention(model):
        raise ValueError(f"{type(model).__name__} has no timm attention blocks (blocks[-1].attn with attn_drop)")
    attn = model.blocks[-1].attn
    caught: list[Tensor] = []
    fused, attn.fused_attn = attn.fused_attn, False
    hook = attn.attn_drop.register_forward_hook(lambda _m, _args, out: caught.append(out))
    try:
        model.forward_features(x)
    finally:
        hook.remove()
        attn.fused_attn = fused
    return caught[0]


def cls_attention(model: nn.Module, x: Tensor) -> Tensor:
    """The last block's [CLS] attention over the patches, (B, heads, h, w), for inputs x (B, 3, H, W)."""
    if not has_class_token(model):
        raise ValueError(f"{type(model).__name__} has no [CLS] token: use received_attention")
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    h, w = patch_grid(model, x)
    return last_attention(model, x)[:, :, 0, prefix:].reshape(x.shape[0], -1, h, w)


def received_attention(model: nn.Module, x: Tensor) -> Tensor:
    """For a ViT without a [CLS] token: the last block's attention each patch receives, averaged over the patch
    queries, (B, heads, h, w) (register tokens, if any, left out as queries and as keys)."""
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    h, w = patch_grid(model, x)
    return last_attention(model, x)[:, :, prefix:, prefix:].mean(dim=2).reshape(x.shape[0], -1, h, w)


def mass_mask(maps: Tensor, mass: float = MASS) -> Tensor:
    """DINO's thresholded attention: per map (..., h, w), the patches whose largest values sum to `mass` of it."""
    flat = maps.flatten(-2).float()
    values, order = flat.sort(dim=-1)
    values = values / values.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    keep_sorted = values.cumsum(dim=-1) > (1 - mass)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(maps.shape)


@torch.no_grad()
def feature_norm(model: nn.Module, x: Tensor) -> Tensor:
    """CNN stand-in for attention: the L2 norm over channels of the last feature map, (B, 1, h, w)."""
    return patch_features(model, x).norm(dim=-1)[:, None]


def draw_attention(model: nn.Module, x: Tensor, images: Sequence[Tensor], path: str | Path,
                   mass: float = MASS) -> Path:
    """Two rows per image: its attention maps (every head, then their mean), and below each map the image with only
    the patches holding `mass` of that map left bright. ViTs without a [CLS] token: the attention each patch
    receives (`received_attention`); CNNs: the feature-norm map instead."""
    if has_attention(model):
        cls = has_class_token(model)
        maps = cls_attention(model, x) if cls else received_attention(model, x)
        maps = torch.cat([maps, maps.mean(dim=1, keepdim=True)], dim=1)
        titles = ("image", *(f"head {i + 1}" for i in range(maps.shape[1] - 1)), "mean of heads")
        grid = f"{maps.shape[-2]}x{maps.shape[-1]} patches"
        what = (f"[CLS] self-attention of the last block over the {grid}, per head." if cls else
                f"{type(model).__name__} has no [CLS] token: the last block's self-attention each of the {grid} "
                "receives, averaged over all patch queries, per head.")
        what += f" Below each map: the patches holding {mass:.0%} of its attention (DINO's thresholded map)."
    else:
        maps = feature_norm(model, x)
        titles = ("image", "feature norm")
        what = (f"{type(model).__name__} has no attention: L2 norm of the last feature map "
                f"({maps.shape[-2]}x{maps.shape[-1]}) instead. Below: the positions holding {mass:.0%} of it.")
    keep = mass_mask(maps, mass)
    rows = []
    for image, image_maps, image_keep in zip(images, maps.cpu(), keep.cpu()):
        size = tuple(image.shape[-2:])
        rows.append([image, *(heatmap(m, size) for m in image_maps)])
        rows.append([image, *(masked(image, k) for k in image_keep)])
    return save_rows(rows, path, titles=titles, caption=what)
