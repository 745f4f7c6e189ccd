"""A hand count of a timm ViT's FLOPs, for the benchmark tests."""
from __future__ import annotations


def vit_flops(tokens: int, dim: int, depth: int, patch_in: int, backward: bool) -> int:
    """FLOPs (2 per multiply-add) of a timm ViT's blocks and patch embedding, by hand.

    Per block: qkv, proj and the 4x MLP are 12 * N * d^2 multiply-adds, QK^T and AV 2 * N^2 * d (over all heads); the
    patch embedding (N - 1) * d * patch_in. Backward: twice the forward for the linear layers, once for the patch
    embedding (its input needs no gradient), and torch's attention formula: 5 products of the forward's 2 (QK^T
    recomputed), i.e. 2.5 x the forward."""
    linear = 2 * depth * 12 * tokens * dim * dim
    attention = 2 * depth * 2 * tokens * tokens * dim
    patch = 2 * (tokens - 1) * dim * patch_in
    if not backward:
        return linear + attention + patch
    return 3 * linear + attention + 5 * attention // 2 + 2 * patch
