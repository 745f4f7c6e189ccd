"""Crop packing (DINOv2's `forward_features_list`): every crop of a step through one pass of a ViT's blocks, with
attention kept inside each crop.

The official code lays all crops of a step side by side in one sequence and runs xformers' memory-efficient attention
with a `BlockDiagonalMask`. Here each image's crops are laid side by side in one sequence (B sequences), and the work
is split by kind:
- the linear layers (qkv, projection, MLP), norms and layer scales run once over the packed tokens: one large matrix
  product per layer instead of one per crop size, which is what packing buys where kernel launches and small
  matrices bound the step (a GPU at small crops);
- attention runs per crop: the packed queries, keys and values are cut into their crops (one copy per crop size),
  and one `scaled_dot_product_attention` per crop size runs over all B x n_i crops of T_i tokens, with no mask.
  That is block-diagonal attention exactly, without the cross-crop scores a dense block-diagonal bias computes and
  masks (82 % of them for DINOv2's 2 x 224 + 8 x 98 crops at patch 14), and eligible for the flash kernel on a GPU,
  which takes no mask.

A ViT packs when it is built with `attn_layer=CropAttention` (timm >= 1.0.24): the parameters and their names are
timm's own, so checkpoints, EMA and export are unchanged, and the block's own forward (compiled or not) passes the
`CropLayout` to the attention where an attention mask would go.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import Tensor

from sslpipe.models.backbones import MaskedViT, vit_pos_embed


@dataclass(frozen=True)
class CropLayout:
    """How a packed sequence is made: in order, `groups` of (n crops, tokens per crop); the crops of one group are
    side by side, each crop's tokens contiguous."""

    groups: tuple[tuple[int, int], ...]

    @property
    def length(self) -> int:
        return sum(n * tokens for n, tokens in self.groups)


class CropAttention(Attention):
    """timm's `Attention` that also takes a `CropLayout` where the attention mask goes: then each crop attends only to
    itself (see the module docstring). With a tensor mask or none it is timm's attention, unchanged. The per-crop path
    follows timm 1.0's `Attention.forward` (qkv, q/k norms, SDPA, output norm, optional gate, projection); the
    equality with timm's attention per crop and with the per-size forwards is tested
    (`tests/models/test_packed_crops.py`)."""

    def forward(self, x: Tensor, attn_mask: Any = None, **kwargs: Any) -> Tensor:
        if not isinstance(attn_mask, CropLayout):
            return super().forward(x, attn_mask=attn_mask, **kwargs)
        B, N, _ = x.shape
        if N != attn_mask.length:
            raise ValueError(f"packed crops: a sequence of {N} tokens does not match its crop layout {attn_mask}")
        gate = getattr(self, "gate", None)
        gate = gate(x).sigmoid() if gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        dropout = self.attn_drop.p if self.training else 0.0
        parts, start = [], 0
        for n, tokens in attn_mask.groups:
            crops = qkv[:, start:start + n * tokens].reshape(B * n, tokens, 3, self.num_heads, self.head_dim)
            q, k, v = crops.permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, dropout_p=dropout)
            parts.append(out.transpose(1, 2).reshape(B, n * tokens, self.num_heads * self.head_dim))
            start += n * tokens
        x = self.norm(torch.cat(parts, dim=1))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def packed_forward(backbone: MaskedViT, groups: list[tuple[Tensor, Tensor | None]], images: int) -> list[Tensor]:
    """All crops of a step through one pass of the blocks: each group (crops (n_i * B, C, H_i, W_i) crop-major, as the
    collate stacks them, B = `images`; mask or None) is embedded on its own, the n_i crops of each image are laid side
    by side in one sequence, the blocks run once with attention inside each crop (`CropAttention`), and the tokens are
    split back: one (n_i * B, T_i, D) tensor per group, equal to `backbone(crops, mask)` per group up to float
    rounding.

    Deviation: drop path draws one decision per sequence, i.e. per image for all its crops (per crop unpacked).
    Needs timm `Block`s built with `CropAttention`; a timm Eva ViT (DINOv3's rotary positions, which assume one crop
    per sequence) has other blocks and is refused."""
    v = backbone.vit
    if not all(isinstance(getattr(block, "attn", None), CropAttention) for block in v.blocks):
        raise ValueError("packed crops: the ViT's blocks must be timm Blocks built with attn_layer=CropAttention "
                         "(sslpipe.models.packed_crops)")
    sequences, shapes = [], []
    for crops, mask in groups:
        tokens = v.norm_pre(v.patch_drop(vit_pos_embed(v, backbone.embed(crops, mask))))
        n_total, length, dim = tokens.shape
        if n_total % images:
            raise ValueError(f"packed crops: a group of {n_total} crops is not a whole number of crops for each of "
                             f"{images} images")
        n = n_total // images
        sequences.append(tokens.reshape(n, images, length, dim).transpose(0, 1).reshape(images, n * length, dim))
        shapes.append((n, length))
    packed, layout = torch.cat(sequences, dim=1), CropLayout(tuple(shapes))
    for block in v.blocks:
        packed = block(packed, attn_mask=layout)
    packed = v.norm(packed)
    out, start = [], 0
    for n, length in shapes:
        part = packed[:, start:start + n * length].reshape(images, n, length, -1).transpose(0, 1)
        out.append(part.reshape(n * images, length, -1))
        start += n * length
    return out


def crop_tokens(backbone: MaskedViT, global_crops: Tensor, mask: Tensor | None, local_crops: Tensor | None,
                n_global: int, packed: bool) -> tuple[Tensor, Tensor | None]:
    """The tokens of the global crops (the student's with `mask`) and of the local crops (None without them): one
    forward per crop size, or with `packed` one pass of the blocks for both (`packed_forward`)."""
    if packed and local_crops is not None:
        tokens, local_tokens = packed_forward(backbone, [(global_crops, mask), (local_crops, None)],
                                              images=len(global_crops) // n_global)
        return tokens, local_tokens
    return backbone(global_crops, mask=mask), backbone(local_crops) if local_crops is not None else None
