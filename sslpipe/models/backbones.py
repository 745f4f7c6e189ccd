"""Backbones: timm model creation, the iBOT masked ViT, and a uniform CLS/pooled feature accessor.

Every backbone is a plain timm model (``num_classes=0``, never pretrained: no downloads), so what export saves loads
back with ``timm.create_model``. ViTs are built with ``dynamic_img_size=True``: the learned position embedding (sized
for ``img_size``) is resampled bicubically by timm for any other crop size (224 -> 96 px, 32 -> 16 px local crops).
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

# timm modules whose models are (subclasses of) VisionTransformer and accept img_size / patch_size /
# dynamic_img_size. Other archs (resnet, mobilevitv2, ...) are used through their pooled features.
_VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")


def is_vit_arch(arch: str) -> bool:
    """True when ``arch`` is a timm VisionTransformer family model (takes img_size/patch_size)."""
    if not timm.is_model(arch):
        raise ValueError(
            f"unknown timm architecture {arch!r}: use a name from timm.list_models() (e.g. 'vit_small_patch16_224')"
        )
    return timm.models.model_entrypoint(arch).__module__ in _VIT_MODULES


def create_backbone(
    arch: str,
    *,
    img_size: int,
    patch_size: int | None = None,
    drop_path_rate: float = 0.0,
    **model_args: Any,
) -> nn.Module:
    """Create a randomly initialised timm backbone without classifier.

    ViTs get ``img_size`` (the global crop size: it sizes the learned position embedding), optional ``patch_size``
    and ``dynamic_img_size=True``; extra ``model_args`` (depth, embed_dim, num_heads, reg_tokens, ...) go to timm.
    CNN-like models accept any input size, so ``img_size`` is not passed to them; ``patch_size`` is an error there.
    """
    kwargs: dict[str, Any] = dict(pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **model_args)
    if is_vit_arch(arch):
        kwargs.update(img_size=img_size, dynamic_img_size=True)
        if patch_size is not None:
            kwargs["patch_size"] = patch_size
    elif patch_size is not None:
        raise ValueError(f"model.patch_size={patch_size} given for {arch!r}, which is not a ViT: remove patch_size")
    try:
        return timm.create_model(arch, **kwargs)
    except TypeError as e:
        raise ValueError(f"timm.create_model({arch!r}) rejected the model arguments {sorted(kwargs)}: {e}") from e


class MaskedViT(nn.Module):
    """A timm ViT whose patch tokens can be replaced by a learnable mask token (iBOT student, SPEC §1).

    The mask token (1, D), initialised to zeros, is written into the patch-embedding output at masked positions
    BEFORE the prefix tokens are prepended and position embeddings added; the rest is timm's own forward
    (``_pos_embed`` with dynamic-size resampling, ``patch_drop``, ``norm_pre``, ``blocks``, ``norm``), so any
    timm ViT variant (registers, no_embed_class, non-square crops) behaves as in timm.

    Written here rather than using lightly's MaskedVisionTransformerTIMM because that wrapper (a) re-initialises the
    timm ViT and replaces the learned position embedding by a fixed sin-cos one unless both init options are set to
    "skip", (b) infers the dynamic token grid as a square (non-square crops fail) and (c) takes a (B, P+N) mask
    including prefix tokens. With weight_initialization="skip", pos_embed_initialization="skip" and square crops it
    computes the same thing (tested in tests/test_models.py).
    """

    def __init__(self, vit: VisionTransformer, mask_token: bool) -> None:
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"MaskedViT needs a timm VisionTransformer, got {type(vit).__name__}")
        self.vit = vit
        self.embed_dim: int = vit.embed_dim
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        self.mask_token = nn.Parameter(torch.zeros(1, vit.embed_dim)) if mask_token else None

    def patch_grid(self, x: Tensor) -> tuple[int, int]:
        """Patch grid (H, W) that an input image batch produces."""
        ph, pw = self.vit.patch_embed.patch_size
        return x.shape[-2] // ph, x.shape[-1] // pw

    def embed(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Patch embedding with masked positions replaced by the mask token: (B, H, W, D) or (B, N, D)."""
        tokens = self.vit.patch_embed(x)
        if mask is None:
            return tokens
        if self.mask_token is None:
            raise ValueError("a mask was given to a MaskedViT built with mask_token=False (the teacher takes no mask)")
        grid = tokens.shape[1:-1]  # (H, W) for the NHWC dynamic layout, (N,) for NLC
        B = tokens.shape[0]
        if mask.shape[0] != B or mask[0].numel() != grid.numel():
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the patch grid {tuple(grid)} "
                             f"of a batch of {B} images")
        mask = mask.reshape(B, *grid, 1).to(torch.bool)
        return torch.where(mask, self.mask_token.to(tokens.dtype), tokens)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """All tokens after the final norm, (B, P+N, D); ``mask`` is bool (B, H, W) or (B, N), True = masked."""
        v = self.vit
        tokens = v._pos_embed(self.embed(x, mask))
        tokens = v.norm_pre(v.patch_drop(tokens))
        tokens = v.blocks(tokens)
        return v.norm(tokens)


def backbone_embed_dim(model: nn.Module) -> int:
    """Width of the feature returned by :func:`forward_cls` (ViT embed dim or the CNN's pooled width)."""
    if isinstance(model, MaskedViT):
        return model.embed_dim
    dim = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if dim is None:
        raise ValueError(f"{type(model).__name__} exposes neither head_hidden_size nor num_features "
                         "(not a timm model?)")
    return int(dim)


def forward_cls(model: nn.Module, x: Tensor) -> Tensor:
    """(B, D) image feature: CLS token after the final norm for ViTs, the pooled feature for CNNs.

    A timm model created with ``num_classes=0`` returns exactly this from ``model(x)`` (global_pool="token" ViTs
    return ``norm(x)[:, 0]``), so only the MaskedViT wrapper needs special handling.
    """
    if isinstance(model, MaskedViT):
        return model(x)[:, 0]
    if getattr(model, "num_classes", 0) != 0:
        raise ValueError(f"{type(model).__name__} has a classifier (num_classes={model.num_classes}): "
                         "build it with create_backbone (num_classes=0)")
    return model(x)
