"""The official DINOv3 networks, rebuilt from facebookresearch/dinov3 as read (DINOv3 License: read for the facts,
written here anew) for tests/weights/test_import_dinov3.py: models/vision_transformer.py, layers/
rope_position_encoding.py, attention.py, block.py, layer_scale.py, ffn_layers.py, patch_embed.py, dino_head.py,
models/convnext.py, loss/*_loss.py (the centres) and train/ssl_meta_arch.py. The same module trees, so `state_dict()`
gives the official keys; the same forward in eval mode (`x_norm_clstoken`), so the outputs are the official numbers.
Tiny widths; every tensor random (`randomise`) except the buffers init_weights fills (`init_buffers`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from test_import import randomise
from torch import Tensor, nn

DIM, DEPTH, HEADS, PATCH, OUT = 64, 2, 2, 8, 48  # head width 32: 8 RoPE periods; OUT: the heads' prototypes


class RopePositionEmbedding(nn.Module):
    """layers/rope_position_encoding.py, `separate` coordinates (every release) and no training-time augmentation.
    (The official attention also rotates q and k in the periods' dtype: bfloat16 periods are compared in float32.)"""

    def __init__(self, dim: int, heads: int, base: float | None = 100.0, min_period: float | None = None,
                 max_period: float | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.d_head, self.dtype = dim // heads, dtype
        self.base, self.min_period, self.max_period = base, min_period, max_period
        self.register_buffer("periods", torch.empty(self.d_head // 4, dtype=dtype))
        self.init_weights()

    def init_weights(self) -> None:  # _init_weights
        n = self.d_head // 4
        if self.base is not None:
            periods = self.base ** (2 * torch.arange(n, dtype=self.dtype) / (self.d_head // 2))
        else:
            ratio = self.max_period / self.min_period
            periods = ratio ** torch.linspace(0, 1, n, dtype=self.dtype) / ratio * self.max_period
        self.periods.data = periods

    def forward(self, H: int, W: int) -> tuple[Tensor, Tensor]:
        coords_h = torch.arange(0.5, H, dtype=self.dtype) / H
        coords_w = torch.arange(0.5, W, dtype=self.dtype) / W
        coords = 2.0 * torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1) - 1.0
        angles = (2 * math.pi * coords[:, :, None] / self.periods[None, None, :]).flatten(1, 2).tile(2)
        return torch.sin(angles), torch.cos(angles)


def rope_apply(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:  # layers/attention.py, with rope_rotate_half
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class LinearKMaskedBias(nn.Linear):  # layers/attention.py (mask_k_bias)
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.bias is not None:
            self.register_buffer("bias_mask", torch.full_like(self.bias, math.nan))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask if self.bias is not None else None)


class SelfAttention(nn.Module):
    """layers/attention.py: RoPE on the patch tokens only (the last H*W), the prefix tokens untouched."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool, mask_k_bias: bool) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = (LinearKMaskedBias if mask_k_bias else nn.Linear)(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        B, N, C = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).reshape(B, N, 3, self.num_heads, -1).unbind(2))
        sin, cos = rope
        prefix = N - sin.shape[-2]
        q = torch.cat([q[:, :, :prefix], rope_apply(q[:, :, prefix:], sin, cos)], dim=2)
        k = torch.cat([k[:, :, :prefix], rope_apply(k[:, :, prefix:], sin, cos)], dim=2)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):  # layers/ffn_layers.py
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):  # layers/ffn_layers.py: w3(silu(w1 x) * w2 x), 2/3 of the width rounded up to align_to
    def __init__(self, dim: int, hidden: int, align_to: int) -> None:
        super().__init__()
        d = int(hidden * 2 / 3)
        width = d + (-d % align_to)
        self.w1, self.w2, self.w3 = nn.Linear(dim, width), nn.Linear(dim, width), nn.Linear(width, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LayerScale(nn.Module):  # layers/layer_scale.py
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class SelfAttentionBlock(nn.Module):  # layers/block.py (eval: no drop path)
    def __init__(self, dim: int, heads: int, ffn: str, ffn_ratio: float, qkv_bias: bool, mask_k_bias: bool,
                 layer_scale: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, heads, qkv_bias, mask_k_bias)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * ffn_ratio)
        self.mlp = Mlp(dim, hidden) if ffn == "mlp" else SwiGLUFFN(dim, hidden, {"swiglu": 8, "swiglu64": 64}[ffn])
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):  # layers/patch_embed.py, flatten_embedding=False: (B, H, W, C)
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class DinoVisionTransformer(nn.Module):
    """models/vision_transformer.py; the defaults are hub/backbones.py's dinov3_vits16 (layernormbf16: eps 1e-5,
    4 storage tokens, layer scale, qkv bias with mask_k_bias) at a test's width."""

    def __init__(self, dim: int = DIM, depth: int = DEPTH, heads: int = HEADS, patch: int = PATCH, ffn: str = "mlp",
                 ffn_ratio: float = 4.0, qkv_bias: bool = True, mask_k_bias: bool = True, n_storage_tokens: int = 4,
                 layer_scale: bool = True, eps: float = 1e-5, untie_cls_and_patch_norms: bool = False,
                 untie_global_and_local_cls_norm: bool = False, **rope) -> None:
        super().__init__()
        self.n_storage_tokens = n_storage_tokens
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if n_storage_tokens:
            self.storage_tokens = nn.Parameter(torch.zeros(1, n_storage_tokens, dim))
        self.rope_embed = RopePositionEmbedding(dim, heads, **rope)
        self.blocks = nn.ModuleList([SelfAttentionBlock(dim, heads, ffn, ffn_ratio, qkv_bias, mask_k_bias,
                                                        layer_scale, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.cls_norm = nn.LayerNorm(dim, eps=eps) if untie_cls_and_patch_norms else None
        self.local_cls_norm = nn.LayerNorm(dim, eps=eps) if untie_global_and_local_cls_norm else None
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, dim))

    def init_buffers(self) -> "DinoVisionTransformer":
        """What init_weights writes into the buffers: the periods, and bias_mask 1 for q and v, 0 for k."""
        self.rope_embed.init_weights()
        for block in self.blocks:
            qkv = block.attn.qkv
            if hasattr(qkv, "bias_mask"):
                qkv.bias_mask.fill_(1)[qkv.out_features // 3: 2 * qkv.out_features // 3] = 0
        return self

    def forward(self, x: Tensor) -> Tensor:  # forward(x) = head(forward_features(x)["x_norm_clstoken"])
        x = self.patch_embed(x)
        B, H, W, _ = x.shape
        prefix = [self.cls_token + 0 * self.mask_token] + ([self.storage_tokens] if self.n_storage_tokens else [])
        x = torch.cat([t.expand(B, -1, -1) for t in prefix] + [x.flatten(1, 2)], dim=1)
        for block in self.blocks:
            x = block(x, self.rope_embed(H=H, W=W))
        norm = self.norm if self.cls_norm is None else self.cls_norm  # untie_cls_and_patch_norms: CLS by its own
        return self.head(norm(x)[:, 0])


def official_vit(seed: int, **kwargs) -> DinoVisionTransformer:
    return randomise(DinoVisionTransformer(**kwargs), seed).init_buffers()


class LayerNorm(nn.Module):  # models/convnext.py: channels_last (F.layer_norm) or channels_first (by hand)
    def __init__(self, dim: int, channels_first: bool = False) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        self.channels_first = channels_first

    def forward(self, x: Tensor) -> Tensor:
        if not self.channels_first:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-6)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + 1e-6)) + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):  # models/convnext.py Block
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm(dim)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x).permute(0, 2, 3, 1)))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """models/convnext.py ConvNeXt: `norms` lists the final norm again; the feature is norm(mean of the last map)."""

    def __init__(self, depths: tuple[int, ...] = (1, 1, 2, 1), dims: tuple[int, ...] = (8, 16, 24, 32)) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList([nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4),
                                                              LayerNorm(dims[0], channels_first=True))])
        self.downsample_layers.extend(nn.Sequential(LayerNorm(dims[i], channels_first=True),
                                                    nn.Conv2d(dims[i], dims[i + 1], 2, stride=2)) for i in range(3))
        self.stages = nn.ModuleList([nn.Sequential(*[ConvNeXtBlock(d) for _ in range(n)])
                                     for n, d in zip(depths, dims)])
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Identity()
        self.norms = nn.ModuleList([nn.Identity() for _ in range(3)] + [self.norm])

    def forward(self, x: Tensor) -> Tensor:  # forward_features_list: x_norm_clstoken
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        tokens = torch.cat([x.mean([-2, -1]).unsqueeze(1), x.flatten(2).transpose(1, 2)], dim=1)
        return self.head(self.norm(tokens)[:, 0])


class DINOHead(nn.Module):  # layers/dino_head.py: MLP, L2 normalisation, a plain Linear last layer
    def __init__(self, in_dim: int = DIM, out_dim: int = OUT) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 16))
        self.last_layer = nn.Linear(16, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-12))


class Centre(nn.Module):  # loss/dino_clstoken_loss.py, loss/ibot_patch_loss.py: the `center` buffer
    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.register_buffer("center", torch.randn(shape))


class SSLMetaArch(nn.Module):
    """train/ssl_meta_arch.py: student, teacher, `model_ema` (the teacher registered again), the Gram teacher, the
    losses' centres."""

    def __init__(self) -> None:
        super().__init__()
        self.dino_loss, self.ibot_patch_loss = Centre(1, OUT), Centre(1, 1, OUT)
        for i, name in enumerate(("student", "teacher")):
            heads = {"dino_head": randomise(DINOHead(), 20 + i), "ibot_head": randomise(DINOHead(), 30 + i)}
            setattr(self, name, nn.ModuleDict({"backbone": official_vit(10 + i), **heads}))
        self.model_ema = self.teacher
        self.gram_teacher = nn.ModuleDict({"backbone": official_vit(40)})
