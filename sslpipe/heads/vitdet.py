"""ViTDet: a plain (exported) timm ViT as a multi-scale dense backbone (Li et al., ECCV 2022; docs/methods.md §5).

detectron2 `modeling/backbone/vit.py` (ViT, SimpleFeaturePyramid, get_vit_lr_decay_rate) is the reference:
- window attention (non-overlapping windows of `window_size`, padded to a multiple, no shift) in every block except
  `global_blocks` (ViT-B: 2, 5, 8, 11); the padding is zeros inserted after `norm1`, as in detectron2;
- the absolute position embedding learned at pre-training size, CLS entry dropped, resized bicubically
  (align_corners=False) to the input grid at every forward;
- optional decomposed relative position (MViTv2; zero-initialised `rel_pos_h/w`, timm's `get_decomposed_rel_pos_bias`);
- no final norm: detectron2's ViT feeds the last block's output to the pyramid (the export's `norm` is unused);
- the simple feature pyramid built from the LAST map only: deconvolutions up, identity, max-pool down, each level
  then 1x1 conv + LN, 3x3 conv + LN (256 channels), plus a stride-2 max-pool of the coarsest level (`LastLevelMaxPool`).

Written on top of timm rather than detectron2 (not installable here): every timm `Block` of the export is kept with
its weights; `WindowBlock` runs it on window partitions, recomputing only the attention core (timm's own attention
has no hook for the q-dependent relative-position bias). timm's `VisionTransformerSAM` has the same attention but
needs its own module layout; re-using the export's blocks keeps any timm ViT variant (qk-norm, layer scale, registers)
working unchanged.

RoPE trunks (timm's `Eva`: DINOv3's `vit_*_dinov3`, EVA-02; named extension, not in detectron2): the blocks keep timm's
own rotary attention; each token is rotated by the RoPE of its position in the whole image grid, inside windows too
(a window's tokens keep their global positions; padded tokens get the identity rotation). The prefix tokens ([CLS],
storage tokens) are dropped as for any ViT, so the attention modules rotate every token. Relative-position biases are
refused on RoPE trunks (RoPE is itself relative).

Generalisation (named deviation): detectron2 builds the pyramid for patch 16 (scale factors 4, 2, 1, 0.5). Here the
factors follow from the patch size so that the outputs are always at strides `strides` (default 4, 8, 16, 32 + 64):
patch 16 gives exactly the published layers; a 4-px-patch demo ViT gives identity, then max-pools of 2, 4, 8.

The pyramid interface that Mask R-CNN, Mask2Former and U2PL consume: `ViTDetPyramid(x) -> OrderedDict[name, map]`
(`p2`..`p6`), with `.out_channels` (int), `.strides` (dict name -> stride) and `.size_divisibility`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_sam import get_decomposed_rel_pos_bias, window_partition, window_unpartition
from torch import Tensor, nn

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.InstanceNorm2d)


def resize_pos_embed(pos_embed: Tensor, hw: tuple[int, int]) -> Tensor:
    """(1, Hp, Wp, C) -> (1, H, W, C), bicubic, align_corners=False (detectron2 `get_abs_pos`)."""
    if tuple(pos_embed.shape[1:3]) == tuple(hw):
        return pos_embed
    resized = F.interpolate(pos_embed.permute(0, 3, 1, 2).float(), size=hw, mode="bicubic", align_corners=False)
    return resized.to(pos_embed.dtype).permute(0, 2, 3, 1)


class WindowBlock(nn.Module):
    """A timm ViT `Block` on an (B, H, W, C) token grid, with window attention when `window_size` > 0.

    x = x + drop_path(ls1(attn(norm1(x)))) with attention inside each window (global when `window_size` = 0), then
    x = x + drop_path(ls2(mlp(norm2(x)))) per token. `rel_pos_size` (h, w) adds decomposed relative positions
    (tables of 2*h-1 and 2*w-1 rows, zero-initialised, resized linearly by timm when the grid differs).
    """

    def __init__(self, block: nn.Module, window_size: int = 0, rel_pos_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.rotary = isinstance(block, EvaBlock) and isinstance(block.attn, EvaAttention)
        scales = ("gamma_1", "gamma_2") if self.rotary else ("ls1", "ls2")
        for name in ("norm1", "attn", *scales, "drop_path1", "norm2", "mlp", "drop_path2"):
            if not hasattr(block, name):
                raise TypeError(f"WindowBlock needs a timm vision_transformer.Block or eva.EvaBlock (no `{name}` on "
                                f"{type(block).__name__}); use a standard timm ViT")
        attn = block.attn
        if not self.rotary:
            for name in ("qkv", "q_norm", "k_norm", "proj", "num_heads", "head_dim"):
                if not hasattr(attn, name):
                    raise TypeError(f"WindowBlock needs timm's fused-qkv Attention (no `{name}` on "
                                    f"{type(attn).__name__})")
        elif rel_pos_size is not None:
            raise ValueError("use_rel_pos on a RoPE ViT: its rotary embedding already encodes relative positions; "
                             "set use_rel_pos false")
        else:
            attn.num_prefix_tokens = 0  # ViTDet drops the prefix tokens: every token is a patch, every one rotated
        self.block = block
        self.window_size = int(window_size)
        self.rel_pos_h: nn.Parameter | None = None
        self.rel_pos_w: nn.Parameter | None = None
        if rel_pos_size is not None:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size[0] - 1, attn.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size[1] - 1, attn.head_dim))

    def attention(self, x: Tensor, rope: Tensor | None = None) -> Tensor:
        """timm `Attention.forward` on (B', h, w, C) windows, plus the relative-position bias (q before scaling);
        RoPE blocks: timm's `EvaAttention` itself, given the rotary embedding of the windows' positions."""
        a = self.block.attn
        b, h, w, c = x.shape
        n = h * w
        tokens = x.reshape(b, n, c)
        if self.rotary:
            return a(tokens, rope=rope).reshape(b, h, w, -1)
        gate = a.gate(tokens).sigmoid() if getattr(a, "gate", None) is not None else None
        q, k, v = a.qkv(tokens).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        bias = None
        if self.rel_pos_h is not None:
            bias = get_decomposed_rel_pos_bias(
                q.reshape(b * a.num_heads, n, a.head_dim), self.rel_pos_h, self.rel_pos_w, (h, w), (h, w)
            ).reshape(b, a.num_heads, n, n).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=a.attn_drop.p if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, n, -1)
        out = a.norm(out) if hasattr(a, "norm") else out
        if gate is not None:
            out = out * gate
        return a.proj_drop(a.proj(out)).reshape(b, h, w, -1)

    def forward(self, x: Tensor, rope: Tensor | None = None) -> Tensor:
        """x (B, H, W, C); `rope` (H * W, R) the rotary embedding of the grid's positions (RoPE trunks only)."""
        blk = self.block
        height, width = x.shape[1:3]
        y = blk.norm1(x)
        if self.window_size > 0:
            y, pad_hw = window_partition(y, self.window_size)
            if rope is not None:
                rope = window_rope(rope, (height, width), self.window_size, batch=x.shape[0])
            y = window_unpartition(self.attention(y, rope), self.window_size, (height, width), pad_hw)
        else:
            y = self.attention(y, rope)
        if self.rotary:
            y = y if blk.gamma_1 is None else blk.gamma_1 * y
            x = x + blk.drop_path1(y)
            y = blk.mlp(blk.norm2(x))
            return x + blk.drop_path2(y if blk.gamma_2 is None else blk.gamma_2 * y)
        x = x + blk.drop_path1(blk.ls1(y))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def window_rope(rope: Tensor, hw: tuple[int, int], window_size: int, batch: int) -> Tensor:
    """The rotary embedding (H * W, R) of a grid, cut into the windows `window_partition` makes of that grid, for a
    batch of `batch` images: (batch * windows, 1, window_size**2, R). Padded positions get the identity rotation
    (sin 0, cos 1; timm's concatenated layout is [sin, cos])."""
    height, width = hw
    grid = rope.reshape(1, height, width, -1)
    pad_h, pad_w = (-height) % window_size, (-width) % window_size
    if pad_h or pad_w:
        identity = torch.cat([torch.zeros_like(rope[:1]).chunk(2, -1)[0], torch.ones_like(rope[:1]).chunk(2, -1)[1]],
                             dim=-1)
        full = identity.reshape(1, 1, 1, -1).expand(1, height + pad_h, width + pad_w, -1).clone()
        full[:, :height, :width] = grid
        grid = full
    windows, _ = window_partition(grid, window_size)  # (windows, ws, ws, R)
    windows = windows.reshape(windows.shape[0], 1, window_size * window_size, -1)
    return windows.repeat(batch, 1, 1, 1)


class ViTDetBackbone(nn.Module):
    """The plain ViT trunk of ViTDet: patch embedding + resized absolute positions + (window) blocks -> (B, C, H, W).

    Built from a timm `VisionTransformer` or RoPE `Eva` (e.g. `sslpipe.weights.export.load_backbone(path)`): its
    patch embedding, position embedding (grid part) or rotary embedding, `norm_pre` and blocks are taken over with
    their weights; CLS/register/storage tokens, the final norm and the head are dropped. `window_size` = 0 makes
    every block global.
    """

    def __init__(self, vit: VisionTransformer | Eva, *, window_size: int = 14,
                 global_blocks: Iterable[int] = (2, 5, 8, 11), use_rel_pos: bool = False,
                 rel_pos_grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        if not isinstance(vit, (VisionTransformer, Eva)):
            raise TypeError(f"ViTDet needs a timm VisionTransformer or Eva (RoPE) ViT, got {type(vit).__name__}")
        if getattr(vit, "rope_mixed", False):
            raise ValueError("ViTDet takes RoPE ViTs with one rotary embedding for all blocks; this one learns a "
                             "RoPE per block (rope_mixed), which has no windowed form here")
        self.rope = getattr(vit, "rope", None)
        depth = len(vit.blocks)
        global_blocks = sorted({int(i) for i in global_blocks})
        bad = [i for i in global_blocks if not 0 <= i < depth]
        if bad:
            raise ValueError(f"global_blocks {bad} are outside the {depth} blocks of this ViT (0..{depth - 1})")
        self.patch_embed = vit.patch_embed
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.embed_dim = int(vit.embed_dim)
        self.num_layers = depth
        self.global_blocks = tuple(global_blocks)
        self.window_size = int(window_size)
        self.pos_embed: nn.Parameter | None = None
        if vit.pos_embed is not None:
            grid = tuple(int(g) for g in vit.patch_embed.grid_size)
            pos = vit.pos_embed.detach()
            if not getattr(vit, "no_embed_class", False):
                pos = pos[:, vit.num_prefix_tokens:]
            self.pos_embed = nn.Parameter(pos.reshape(1, grid[0], grid[1], -1).clone())
            rel_pos_grid = rel_pos_grid or grid
        self.norm_pre = vit.norm_pre
        blocks = []
        for i, block in enumerate(vit.blocks):
            windowed = self.window_size > 0 and i not in self.global_blocks
            size = (self.window_size, self.window_size) if windowed else rel_pos_grid
            if use_rel_pos and size is None:
                raise ValueError("use_rel_pos on a ViT without a position grid: give rel_pos_grid=(h, w)")
            blocks.append(WindowBlock(block, self.window_size if windowed else 0, size if use_rel_pos else None))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        pad_h, pad_w = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1)
        x = self.patch_embed.norm(x)
        if self.pos_embed is not None:
            x = x + resize_pos_embed(self.pos_embed, tuple(x.shape[1:3]))
        x = self.norm_pre(x)
        rope = self.rope.get_embed(shape=list(x.shape[1:3])) if self.rope is not None else None
        for block in self.blocks:
            x = block(x, rope)
        return x.permute(0, 3, 1, 2).contiguous()


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid from one map at `in_stride` to maps at `strides` (+ a max-pooled top level).

    Per level with factor f = in_stride / stride: f = 4: deconv 2x2/2 (C -> C/2), LN, GELU, deconv 2x2/2 (-> C/4);
    f = 2: deconv (-> C/2); f = 1: identity; f < 1: max-pool of 1/f; then conv 1x1 (-> out, no bias) + LN and conv
    3x3 (no bias) + LN. Outputs are named `p{log2(stride)}`; `top_block` adds `p{k+1}` = max_pool(k=1, s=2) of the last.
    """

    def __init__(self, in_channels: int, in_stride: int, out_channels: int = 256,
                 strides: Sequence[int] = (4, 8, 16, 32), top_block: bool = True) -> None:
        super().__init__()
        self.stages = nn.ModuleDict()
        self.out_channels = int(out_channels)
        self.strides: dict[str, int] = {}
        for stride in strides:
            if stride & (stride - 1) or in_stride & (in_stride - 1):
                raise ValueError(f"pyramid strides must be powers of two, got stride {stride} from {in_stride}")
            layers: list[nn.Module] = []
            dim = in_channels
            if stride <= in_stride:
                ups = int(math.log2(in_stride // stride))
                for j in range(ups):
                    if dim % 2:
                        raise ValueError(f"cannot halve {dim} channels {ups} times for stride {stride}")
                    layers.append(nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
                    dim //= 2
                    if j < ups - 1:
                        layers += [LayerNorm2d(dim), nn.GELU()]
            else:
                k = stride // in_stride
                layers.append(nn.MaxPool2d(kernel_size=k, stride=k))
            layers += [nn.Conv2d(dim, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)]
            name = f"p{int(math.log2(stride))}"
            self.stages[name] = nn.Sequential(*layers)
            self.strides[name] = int(stride)
        self.top_block = top_block
        if top_block:
            last = max(strides)
            self.strides[f"p{int(math.log2(last)) + 1}"] = 2 * last

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        out = OrderedDict((name, stage(x)) for name, stage in self.stages.items())
        if self.top_block:
            last = next(reversed(out.values()))
            out[list(self.strides)[-1]] = F.max_pool2d(last, kernel_size=1, stride=2)
        return out


class ViTDetPyramid(nn.Module):
    """`backbone` (ViTDetBackbone) + `fpn` (SimpleFeaturePyramid): images (B, 3, H, W) -> OrderedDict of maps.

    H and W should be multiples of `size_divisibility` (the coarsest stride) for exact strides; torchvision's
    detection transform pads batches to that. `.out_channels` lets torchvision's MaskRCNN take it as a backbone.
    """

    def __init__(self, backbone: ViTDetBackbone, out_channels: int = 256, strides: Sequence[int] = (4, 8, 16, 32),
                 top_block: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.fpn = SimpleFeaturePyramid(backbone.embed_dim, backbone.patch_size, out_channels, strides, top_block)
        self.out_channels = self.fpn.out_channels
        self.strides = dict(self.fpn.strides)
        self.size_divisibility = max(strides)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.fpn(self.backbone(x))


def build_vitdet_pyramid(vit: VisionTransformer | Eva, *, window_size: int = 14,
                         global_blocks: Iterable[int] = (2, 5, 8, 11), use_rel_pos: bool = False,
                         img_size: int | None = None, out_channels: int = 256,
                         strides: Sequence[int] = (4, 8, 16, 32), top_block: bool = True) -> ViTDetPyramid:
    """A timm ViT -> ViTDet pyramid. `img_size` (the fine-tuning input) sizes the global blocks' relative-position
    tables as detectron2 does (input_size = img_size / patch); None uses the pre-training grid."""
    patch = int(vit.patch_embed.patch_size[0])
    if patch & (patch - 1):
        raise ValueError(f"ViTDet's pyramid makes strides 4-32 from the patch grid by factors of 2, so it needs a "
                         f"power-of-two patch size; this ViT's patch is {patch} px (DINOv2's 14). Fine-tune an export "
                         "with 8 or 16 px patches, or probe this one with `sslpipe linear-seg`")
    grid = (img_size // patch, img_size // patch) if img_size else None
    backbone = ViTDetBackbone(vit, window_size=window_size, global_blocks=global_blocks, use_rel_pos=use_rel_pos,
                              rel_pos_grid=grid)
    return ViTDetPyramid(backbone, out_channels=out_channels, strides=strides, top_block=top_block)


# --------------------------------------------------------------------------------------------- optimiser groups
def vit_layer_id(name: str, num_layers: int) -> int:
    """detectron2 `get_vit_lr_decay_rate` layer id of a parameter name *inside* a ViTDetBackbone: patch/position
    embeddings (and a pre-norm) 0, `blocks.i.*` i + 1; anything else (pyramid, heads) num_layers + 1."""
    if name.startswith(("pos_embed", "patch_embed", "norm_pre")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def dense_param_groups(model: nn.Module, *, backbone_prefix: str, num_layers: int, layer_decay: float = 1.0,
                       backbone_lr_mult: float = 1.0, decayed_norms: tuple[type[nn.Module], ...] = (),
                       no_wd: Callable[[str, nn.Module, str], bool] | None = None) -> list[dict[str, Any]]:
    """Optimizer groups for a fine-tuned model: `lr_scale` and `apply_wd` per parameter, grouped.

    Parameters under `backbone_prefix` (the ViT trunk) get lr_scale = backbone_lr_mult * layer_decay ** (L + 1 -
    layer_id) (ViTDet: decay 0.7, multiplier 1; Mask2Former: decay 1, multiplier 0.1); all others 1. No weight decay
    on normalisation layers, nn.Embedding (Mask2Former's queries: WEIGHT_DECAY_EMBED 0) and position embeddings
    (ViTDet's `pos_embed` override); biases are decayed, as in detectron2 and Mask2Former. Norms of the
    `decayed_norms` types are decayed all the same: detectron2 exempts torch's norm types only, so ViTDet decays its
    pyramid's and heads' channels-first LayerNorms (its own `LN` module; timm's `LayerNorm2d` here). `no_wd(module_name,
    module, param_name)` adds exceptions.
    """
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    prefix = backbone_prefix.rstrip(".") + "."
    for module_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{pname}" if module_name else pname
            scale = 1.0
            if full.startswith(prefix):
                layer_id = vit_layer_id(full[len(prefix):], num_layers)
                scale = backbone_lr_mult * layer_decay ** (num_layers + 1 - layer_id)
            exempt_norm = isinstance(module, NORM_TYPES) and not isinstance(module, decayed_norms)
            decay = not (exempt_norm or isinstance(module, nn.Embedding) or "pos_embed" in pname
                         or (no_wd is not None and no_wd(module_name, module, pname)))
            groups.setdefault((round(scale, 12), decay), []).append(param)
    return [{"params": params, "apply_wd": decay, "lr_scale": scale}
            for (scale, decay), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))]
