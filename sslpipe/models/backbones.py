"""Backbones: timm model creation, the iBOT/DINO ViT wrapper, and a uniform CLS/pooled feature accessor.

Every backbone is a plain timm model (``num_classes=0``, never pretrained: no downloads), so what export saves loads
back with ``timm.create_model``. ViTs are built with ``dynamic_img_size=True`` and, as in the official iBOT/DINO code,
their CLS token is initialised with trunc_normal(std 0.02) (timm: N(0, 1e-6)).

During pretraining the ViT runs inside :class:`MaskedViT`, which resizes the learned position embedding for crops of
another size (224 -> 96 px, 32 -> 16 px local crops) exactly as the official ``interpolate_pos_encoding`` does:
bicubic, ``scale_factor = (n + 0.1) / N`` on the grid, no antialias. timm's own resampling (bicubic to the target
size, antialias on) differs from it by ~80% relative at init on a 14x14 -> 6x6 grid. The interpolation is applied as
a fixed (n_new, n_old) matrix on the embedding: the same values (a bicubic resize is linear in its input), and
a matmul has a deterministic backward on CUDA where ``F.interpolate``'s bicubic backward has none. An exported model
used on its own in timm at a size other than ``img_size`` resamples with timm's method.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import timm
import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from sslpipe.weights.export import is_dinov3_vit

# timm modules whose models are ViTs that accept img_size / patch_size / dynamic_img_size: VisionTransformer (DINO,
# iBOT, DINOv2) and Eva (rotary position embeddings: DINOv3's `*_dinov3`). Other archs (resnet, mobilevitv2, ...) are
# used through their pooled features.
_VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit", "timm.models.eva")


def is_vit_arch(arch: str) -> bool:
    """True when ``arch`` is a timm VisionTransformer family model (takes img_size/patch_size)."""
    if not timm.is_model(arch):
        raise ValueError(
            f"unknown timm architecture {arch!r}: use a name from timm.list_models() (e.g. 'vit_small_patch16_224')"
        )
    return timm.models.model_entrypoint(arch).__module__ in _VIT_MODULES


def has_class_token(model: nn.Module) -> bool:
    """Whether the ViT's token 0 is a [CLS] token: `has_class_token` on timm's VisionTransformer, a `cls_token` on
    its Eva (DINOv3, EVA-02), which has no such flag; an sslpipe import of a checkpoint without one has neither."""
    return bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None))


def is_eva_arch(arch: str) -> bool:
    """True for timm's Eva ViTs (rotary position embeddings, DINOv3's `*_dinov3`)."""
    return is_vit_arch(arch) and timm.models.model_entrypoint(arch).__module__ == "timm.models.eva"


def backbone_args(arch: str, *, img_size: int, patch_size: int | None = None, **model_args: Any) -> dict[str, Any]:
    """The `timm.create_model(arch, ...)` arguments of `create_backbone` (without drop_path_rate): what an export
    records so that timm rebuilds the same network.

    ViTs get ``img_size`` (the global crop size: it sizes the learned position embedding), optional ``patch_size``
    and ``dynamic_img_size=True``; extra ``model_args`` (depth, embed_dim, num_heads, reg_tokens, ...) go to timm.
    CNN-like models accept any input size, so ``img_size`` is not passed to them; ``patch_size`` is an error there.
    DINOv3's rotary ViTs (`*_dinov3`, `*_dinov3_qkvb`) get ``global_pool="token"``: their feature is the [CLS] token,
    as upstream.
    """
    args: dict[str, Any] = dict(num_classes=0, **model_args)
    if is_dinov3_vit(arch) and "global_pool" not in args:
        args["global_pool"] = "token"  # timm pools DINOv3's patch tokens by default; the official feature is CLS
    if is_vit_arch(arch):
        args.update(img_size=img_size, dynamic_img_size=True)
        if patch_size is not None:
            args["patch_size"] = patch_size
    elif patch_size is not None:
        raise ValueError(f"model.patch_size={patch_size} given for {arch!r}, which is not a ViT: remove patch_size")
    return args


def create_backbone(
    arch: str,
    *,
    img_size: int,
    patch_size: int | None = None,
    drop_path_rate: float = 0.0,
    **model_args: Any,
) -> nn.Module:
    """Create a randomly initialised timm backbone without classifier, with `backbone_args`' arguments.

    ``drop_path_rate`` is always passed where the architecture takes it (0 included: some timm entrypoints default
    to stochastic depth, e.g. fasternet_m 0.2); an architecture without stochastic depth (VGG, DenseNet, DLA,
    GhostNet, HRNet, Inception-v3) is built without it at 0 and refused above 0."""
    args: dict[str, Any] = {"drop_path_rate": drop_path_rate,
                            **backbone_args(arch, img_size=img_size, patch_size=patch_size, **model_args)}
    try:
        model = _create(arch, args)
    except TypeError as e:
        if "drop_path_rate" not in str(e):
            raise _rejected(arch, args, e) from e
        if drop_path_rate > 0:
            raise ValueError(f"model.drop_path_rate={drop_path_rate}: {arch} has no stochastic depth; set it to 0"
                             ) from e
        del args["drop_path_rate"]
        try:
            model = _create(arch, args)
        except TypeError as e2:
            raise _rejected(arch, args, e2) from e2
    if getattr(model, "cls_token", None) is not None:
        nn.init.trunc_normal_(model.cls_token, std=0.02)  # official iBOT/DINO init (timm: normal std 1e-6)
    return model


def _create(arch: str, args: dict[str, Any]) -> nn.Module:
    return timm.create_model(arch, pretrained=False, **args)


def _rejected(arch: str, args: dict[str, Any], err: TypeError) -> ValueError:
    return ValueError(f"timm.create_model({arch!r}) rejected the model arguments {sorted(args)}: {err}")


@lru_cache(maxsize=64)
def native_patch_size(arch: str) -> int | None:
    """The patch size of ``arch`` as timm builds it by default (what ``model.patch_size: null`` trains), or None for
    a model that is not a ViT (any input size). Read from the network itself, built on the meta device (no memory,
    no initialisation: ~0.1-0.8 s for timm's ViTs), so that a recipe can check its crops when it is loaded."""
    if not is_vit_arch(arch):
        return None
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    return int(model.patch_embed.patch_size[0])


@lru_cache(maxsize=64)
def _interpolation_matrix_cpu(old: tuple[int, int], new: tuple[int, int]) -> Tensor:
    basis = torch.eye(old[0] * old[1], dtype=torch.float64).reshape(-1, 1, *old)
    scale = ((new[0] + 0.1) / old[0], (new[1] + 0.1) / old[1])
    out = torch.nn.functional.interpolate(basis, scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(out.shape[-2:]) != tuple(new):
        raise ValueError(f"position-embedding interpolation {old} -> {new} gave a {tuple(out.shape[-2:])} grid")
    return out.reshape(old[0] * old[1], new[0] * new[1]).T.contiguous()


@torch.compiler.assume_constant_result
def pos_interpolation_matrix(old: tuple[int, int], new: tuple[int, int], device: torch.device | str = "cpu",
                             dtype: torch.dtype = torch.float32) -> Tensor:
    """M (new_h*new_w, old_h*old_w) with ``M @ grid.flatten()`` == the official iBOT/DINO ``interpolate_pos_encoding``
    of a (old_h, old_w) grid: ``F.interpolate(scale_factor=((new_h + 0.1) / old_h, (new_w + 0.1) / old_w),
    mode="bicubic")`` (the 0.1 avoids a floor rounding to new - 1; dino#8). Built once per pair of grids; a compiled
    step holds it as a constant instead of building it (and copying it to the device) at every call. Dynamo names
    that constant after this function, so one compiled graph takes one interpolated grid (two fail to compile,
    loudly): a recipe interpolates for its local crops only, whose grid is one."""
    return _interpolation_matrix(tuple(old), tuple(new), torch.device(device), dtype)


@lru_cache(maxsize=64)
def _interpolation_matrix(old: tuple[int, int], new: tuple[int, int], device: torch.device,
                          dtype: torch.dtype) -> Tensor:
    """Cached per device too: a copy from host memory to a GPU at every step would wait for the device."""
    return _interpolation_matrix_cpu(old, new).to(device=device, dtype=dtype)


def vit_pos_embed(vit: VisionTransformer, tokens: Tensor) -> Tensor:
    """timm's ``VisionTransformer._pos_embed`` with the official position-embedding interpolation.

    ``tokens``: patch embeddings (B, H, W, D) (timm's dynamic-size layout) or (B, N, D) at the model's own grid.
    Prefix tokens (CLS, registers) are prepended and the position embedding added as timm does (including
    ``no_embed_class`` models), then ``pos_drop``.
    """
    if tokens.dim() == 3:
        return vit._pos_embed(tokens)
    B, H, W, D = tokens.shape
    prefix = [t.expand(B, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    x = tokens.reshape(B, H * W, D)
    if vit.pos_embed is None:
        return vit.pos_drop(torch.cat(prefix + [x], dim=1))
    n_prefix_pos = 0 if vit.no_embed_class else vit.num_prefix_tokens
    pos_prefix, pos = vit.pos_embed[:, :n_prefix_pos], vit.pos_embed[:, n_prefix_pos:]
    old = tuple(vit.patch_embed.grid_size)
    if (H, W) != old:
        if old[0] * old[1] != pos.shape[1]:
            side = math.isqrt(pos.shape[1])
            old = (side, side)
        matrix = pos_interpolation_matrix(old, (H, W), pos.device, torch.float32)
        # matmul is on autocast's half-precision list; the official resize (F.interpolate) stays in float32
        with torch.autocast(pos.device.type, enabled=False):
            pos = (matrix @ pos[0].float()).to(pos.dtype).unsqueeze(0)
    if vit.no_embed_class:
        x = torch.cat(prefix + [x + pos], dim=1)
    else:
        x = torch.cat(prefix + [x], dim=1) + torch.cat([pos_prefix, pos], dim=1)
    return vit.pos_drop(x)


class MaskedViT(nn.Module):
    """A timm ViT whose patch tokens can be replaced by a learnable mask token (iBOT student, docs/methods.md §1); with
    ``mask_token=False`` it is the iBOT teacher or a DINO ViT.

    The mask token (1, D), initialised to zeros, is written into the patch-embedding output at masked positions
    BEFORE the prefix tokens are prepended and position embeddings added; position embeddings are resized for other
    crop sizes by the official interpolation (:func:`vit_pos_embed`); the rest is timm's own forward (``patch_drop``,
    ``norm_pre``, ``blocks``, ``norm``), so timm ViT variants (registers, no_embed_class, non-square crops) work.

    A timm `Eva` (DINOv3's rotary-position ViTs, `vit_*_dinov3`) works the same way: its rotary embedding is computed
    for the crop's own grid at every call (no resampling, any crop size), its storage tokens are timm's registers;
    a `rope_mixed` Eva (`vit_*_rope_mixed_*`: learned frequencies per block) gives block i its own table, as timm's
    ``forward_features`` does.

    Written here rather than using lightly's MaskedVisionTransformerTIMM because that wrapper (a) re-initialises the
    timm ViT and replaces the learned position embedding by a fixed sin-cos one unless both init options are set to
    "skip", (b) infers the dynamic token grid as a square (non-square crops fail) and (c) takes a (B, P+N) mask
    including prefix tokens. With weight_initialization="skip", pos_embed_initialization="skip" and square crops it
    computes the same thing (tested in tests/test_models.py).

    Refused: a ViT without a [CLS] token (token 0 would be a patch or a register, trained as the [CLS]), one that pools
    its patches or puts an fc_norm after its pooling (its feature would not be the trained [CLS] after the final norm;
    with fc_norm, timm's final norm is an identity) and a distilled DeiT (a second prefix token, and a pooled feature
    that is not the trained [CLS]). With a mask token: patch dropout (``patch_drop_rate``), which keeps a random
    subset of the patch tokens, so that the masked positions no longer index the student's tokens.
    """

    def __init__(self, vit: VisionTransformer | Eva, mask_token: bool) -> None:
        super().__init__()
        if not isinstance(vit, (VisionTransformer, Eva)):
            raise TypeError(f"MaskedViT needs a timm VisionTransformer or Eva, got {type(vit).__name__}")
        arch = (getattr(vit, "pretrained_cfg", None) or {}).get("architecture") or type(vit).__name__
        if vit.cls_token is None:
            raise ValueError(f"model.arch={arch} is built without a [CLS] token (a `*_gap_*` arch or "
                             f"model.kwargs.class_token: false), but dino, ibot, dinov2 and dinov3 train token 0 as "
                             f"the [CLS]: choose a ViT with a class token or remove class_token from model.kwargs")
        if getattr(vit, "dist_token", None) is not None:
            raise ValueError(f"model.arch={arch} is a distilled DeiT: its extra distillation token is a second prefix "
                             f"token and timm's feature averages it with the [CLS], which dino, ibot, dinov2 and "
                             f"dinov3 do not train; choose the DeiT without `_distilled`")
        pool, fc_norm = getattr(vit, "global_pool", "token"), not isinstance(getattr(vit, "fc_norm", None), nn.Identity)
        if pool != "token" or fc_norm:
            raise ValueError(f"model.arch={arch} is built with global_pool={pool!r}"
                             f"{' and an fc_norm after the pooling' if fc_norm else ''}, so its feature (and its "
                             f"export's) is not the [CLS] token after the final norm that dino, ibot, dinov2 and "
                             f"dinov3 train; set model.kwargs.global_pool: token (a mean-pooled checkpoint with "
                             f"fc_norm weights cannot continue these methods: start from a [CLS] checkpoint)")
        patch_drop = getattr(getattr(vit, "patch_drop", None), "prob", 0.0)
        if mask_token and patch_drop > 0:
            raise ValueError(f"model.kwargs.patch_drop_rate={patch_drop}: patch dropout keeps a random subset of the "
                             f"student's patch tokens, so the masked-patch targets of ibot, dinov2 and dinov3 would be "
                             f"read at the wrong positions; remove patch_drop_rate from model.kwargs (dino, which "
                             f"trains the [CLS] only, may keep it)")
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
        if isinstance(v, Eva):
            tokens, rope = v._pos_embed(self.embed(x, mask))
            tokens = v.norm_pre(tokens)
            per_block = getattr(v, "rope_mixed", False) and rope is not None  # one table per block, as timm's forward
            for i, block in enumerate(v.blocks):
                tokens = block(tokens, rope=rope[i] if per_block else rope)
            return v.norm(tokens)
        tokens = vit_pos_embed(v, self.embed(x, mask))
        tokens = v.norm_pre(v.patch_drop(tokens))
        tokens = v.blocks(tokens)
        return v.norm(tokens)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def sync_batchnorm(model: nn.Module, *, enabled: bool, num_processes: int, device: torch.device) -> nn.Module:
    """DINO main_dino.py: a backbone with BatchNorm trained on several processes normalises with the statistics of
    the global batch (``nn.SyncBatchNorm``), in the student and in the teacher. Applied only on several CUDA
    processes: SyncBatchNorm has no CPU (gloo) kernel, so CPU runs keep per-process statistics (a notice says so)."""
    if not (enabled and num_processes > 1 and has_batchnorm(model)):
        return model
    if torch.device(device).type != "cuda":
        print(f"note: {num_processes} CPU processes: BatchNorm keeps per-process statistics "
              "(SyncBatchNorm needs CUDA)", flush=True)
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def backbone_embed_dim(model: nn.Module) -> int:
    """Width of the feature returned by :func:`pooled_features` (ViT embed dim or the CNN's pooled width)."""
    if isinstance(model, MaskedViT):
        return model.embed_dim
    dim = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if dim is None:
        raise ValueError(f"{type(model).__name__} exposes neither head_hidden_size nor num_features "
                         "(not a timm model?)")
    return int(dim)


def pooled_features(model: nn.Module, x: Tensor) -> Tensor:
    """(B, D) image feature, the one every method and probe uses: timm's pre-logits output
    ``forward_head(forward_features(x), pre_logits=True)``, i.e. the CLS token after the final norm for a ViT with
    ``global_pool="token"`` (DINO's kNN feature) and the globally pooled features for a CNN.

    A :class:`MaskedViT` gives its CLS token. A model without a classifier (``num_classes=0``, as
    :func:`create_backbone` builds them) returns exactly the pre-logits output from ``model(x)``, which is called
    instead so that a compiled module (``nn.Module.compile``) and hooks apply; a model with a head goes through
    ``pre_logits``, and one without timm's API is called as it is.
    """
    if isinstance(model, MaskedViT):
        return model(x)[:, 0]
    if getattr(model, "num_classes", 0) == 0 or not hasattr(model, "forward_head"):
        return model(x)
    return model.forward_head(model.forward_features(x), pre_logits=True)
