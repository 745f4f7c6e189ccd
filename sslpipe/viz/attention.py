"""What the [CLS] token looks at: the self-attention of the last block, per head (DINO's visualize_attention.py).

timm's `Attention` runs fused scaled-dot-product attention, which never forms the attention matrix, so it is computed
here from the block's own weights on the block's own input: `norm1` of the tokens entering the last block (caught by a
hook on the attention module, so the patch embedding, prefix tokens and position embeddings are timm's), then
q, k = qkv(x) (with timm's q/k norms), softmax(q k^T * scale); the [CLS] row over the patch tokens is the map.
DINO's thresholded variant keeps, per map, the patches holding `MASS` (60%) of its attention.

CNNs have no attention; the class-agnostic stand-in is the L2 norm of the last feature map at each position (where
the activations are strong), with the same mass threshold.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from sslpipe.viz.figures import heatmap, masked
from sslpipe.viz.overlays import save_rows
from sslpipe.viz.pca import patch_features

MASS = 0.6  # DINO's --threshold: keep the patches that hold 60% of the attention mass


def has_attention(model: nn.Module) -> bool:
    """A timm ViT whose last block has a qkv attention (VisionTransformer, DeiT, DINOv2-style with registers)."""
    blocks = getattr(model, "blocks", None)
    return blocks is not None and len(blocks) > 0 and hasattr(getattr(blocks[-1], "attn", None), "qkv")


def patch_grid(model: nn.Module, x: Tensor) -> tuple[int, int]:
    """(h, w) patch grid of a ViT for input x (B, 3, H, W)."""
    ph, pw = model.patch_embed.patch_size
    return x.shape[-2] // ph, x.shape[-1] // pw


def attention_from_input(attn: nn.Module, tokens: Tensor) -> Tensor:
    """The softmax attention (B, heads, N, N) of a timm `Attention` on its input tokens (B, N, C), from its weights."""
    B, N, _ = tokens.shape
    qkv = attn.qkv(tokens).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@torch.no_grad()
def cls_attention(model: nn.Module, x: Tensor) -> Tensor:
    """The last block's [CLS] attention over the patches, (B, heads, h, w), for inputs x (B, 3, H, W)."""
    if not has_attention(model):
        raise ValueError(f"{type(model).__name__} has no timm attention blocks (blocks[-1].attn.qkv)")
    caught: list[Tensor] = []
    hook = model.blocks[-1].attn.register_forward_pre_hook(lambda _m, args: caught.append(args[0]))
    try:
        model.forward_features(x)
    finally:
        hook.remove()
    attn = attention_from_input(model.blocks[-1].attn, caught[0])
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    h, w = patch_grid(model, x)
    return attn[:, :, 0, prefix:].reshape(x.shape[0], -1, h, w)


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
    the patches holding `mass` of that map left bright. CNNs: the feature-norm map instead."""
    if has_attention(model):
        maps = cls_attention(model, x)
        maps = torch.cat([maps, maps.mean(dim=1, keepdim=True)], dim=1)
        titles = ("image", *(f"head {i + 1}" for i in range(maps.shape[1] - 1)), "mean of heads")
        what = (f"[CLS] self-attention of the last block over the {maps.shape[-2]}x{maps.shape[-1]} patches, per "
                f"head. Below each map: the patches holding {mass:.0%} of its attention (DINO's thresholded map).")
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
