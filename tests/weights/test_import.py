"""`sslpipe import`: official DINO / iBOT / DINOv2 / MAE checkpoints and timm state dicts -> export folders.

Each official layout is built here from the official module structure (same module tree, so `state_dict()` gives the
official key names; same forward, so the outputs are the official numbers), written from the official code:
facebookresearch/dino vision_transformer.py + utils.MultiCropWrapper + main_dino.py's save_dict, bytedance/ibot
models/vision_transformer.py + models/head.py + main_ibot.py, facebookresearch/dinov2 dinov2/models/
vision_transformer.py + dinov2/layers + train/train.py (FSDPCheckpointer's `model`, do_test's teacher_checkpoint.pth)
and facebookresearch/mae models_mae.py + util/misc.save_model. Every tensor is randomised, so each one counts.

Output equality: the imported export (loaded by `load_backbone`, i.e. timm) against the official module on the same
input, atol = rtol = 1e-5 (float32; timm's fused attention against the official explicit softmax differs by ~1e-6).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from helpers import REPO
from safetensors.torch import load_file, save_file
from torch import nn

from sslpipe.cli import main
from sslpipe.weights.export import export_backbone, load_backbone, read_export_config
from sslpipe.weights.importing import import_checkpoint
from sslpipe.weights.layouts import UnusableCheckpoint, to_timm_names

torch.set_num_threads(1)
TOL = {"atol": 1e-5, "rtol": 1e-5}
DIM, DEPTH, HEADS, PATCH, SIZE = 192, 2, 3, 8, 32  # ViT-Ti width (3 heads), 2 blocks, 8 px patches, a 4x4 grid
TIMM_ARGS = {"img_size": SIZE, "dynamic_img_size": True, "patch_size": PATCH, "embed_dim": DIM, "depth": DEPTH,
             "num_heads": HEADS}


pytestmark = pytest.mark.usefixtures("no_download")


# ---------------------------------------------------------------------------------- the official module structures
class Mlp(nn.Module):  # dino vision_transformer.Mlp, dinov2/layers/mlp.py, timm 0.3 Mlp (MAE)
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):  # dinov2/layers/swiglu_ffn.py (ViT-g): w12 -> x1, x2; w3(silu(x1) * x2)
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Attention(nn.Module):  # dino vision_transformer.Attention (explicit softmax)
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3, bias=True), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class LayerScale(nn.Module):  # dinov2/layers/layer_scale.py
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """DINO / MAE: norm1, attn, norm2, mlp; iBOT with init_values > 0: + `gamma_1`, `gamma_2` parameters; DINOv2:
    + `ls1`, `ls2` LayerScale modules and, for ViT-g, SwiGLU with DINOv2's hidden width rounding."""

    def __init__(self, dim: int, heads: int, layer_scale: str | None = None, swiglu: bool = False) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * 4.0)
        self.mlp = SwiGLUFFN(dim, (int(hidden * 2 / 3) + 7) // 8 * 8) if swiglu else Mlp(dim, hidden)
        self.layer_scale = layer_scale
        if layer_scale == "ibot":
            self.gamma_1, self.gamma_2 = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
        elif layer_scale == "dinov2":
            self.ls1, self.ls2 = LayerScale(dim), LayerScale(dim)

    def forward(self, x):
        if self.layer_scale == "ibot":
            x = x + self.gamma_1 * self.attn(self.norm1(x))
            return x + self.gamma_2 * self.mlp(self.norm2(x))
        if self.layer_scale == "dinov2":
            x = x + self.ls1(self.attn(self.norm1(x)))
            return x + self.ls2(self.mlp(self.norm2(x)))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def interpolate_pos_encoding(pos_embed, npatch: int, w: int, h: int, patch: int, offset: float = 0.1,
                             antialias: bool = False):
    """VisionTransformer.interpolate_pos_encoding of DINO / iBOT (offset 0.1) and DINOv2 (offset, antialias)."""
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    dim, M = pos_embed.shape[-1], int(math.sqrt(N))
    w0, h0 = w // patch, h // patch
    kwargs = {"scale_factor": ((w0 + offset) / M, (h0 + offset) / M)} if offset else {"size": (w0, h0)}
    grid = F.interpolate(pos_embed[:, 1:].reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
                         antialias=antialias, **kwargs)
    assert grid.shape[-2:] == (w0, h0)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


class DinoViT(nn.Module):
    """dino/vision_transformer.py VisionTransformer; `layer_scale="ibot"`, `masked_im_modeling`, `use_mean_pooling`:
    ibot/models/vision_transformer.py."""

    def __init__(self, img_size: int = SIZE, layer_scale: str | None = None, masked_im_modeling: bool = False,
                 use_mean_pooling: bool = False) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(PATCH, DIM)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // PATCH) ** 2 + 1, DIM))
        self.blocks = nn.ModuleList([Block(DIM, HEADS, layer_scale) for _ in range(DEPTH)])
        self.norm = nn.Identity() if use_mean_pooling else nn.LayerNorm(DIM, eps=1e-6)
        self.fc_norm = nn.LayerNorm(DIM, eps=1e-6) if use_mean_pooling else None
        self.head = nn.Identity()
        if masked_im_modeling:
            self.masked_embed = nn.Parameter(torch.zeros(1, DIM))

    def forward(self, x):
        B, _, w, h = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.patch_embed(x)], dim=1)
        x = x + interpolate_pos_encoding(self.pos_embed, x.shape[1] - 1, w, h, PATCH)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return self.fc_norm(x[:, 1:].mean(1)) if self.fc_norm is not None else x[:, 0]


class BlockChunk(nn.ModuleList):  # dinov2 vision_transformer.BlockChunk
    def forward(self, x):
        for b in self:
            x = b(x)
        return x


class DinoV2ViT(nn.Module):
    """dinov2/models/vision_transformer.py DinoVisionTransformer (the hub's: block_chunks=0; training: any)."""

    def __init__(self, img_size: int = SIZE, block_chunks: int = 0, num_register_tokens: int = 0, swiglu: bool = False,
                 interpolate_antialias: bool = False, interpolate_offset: float = 0.1) -> None:
        super().__init__()
        self.offset, self.antialias = interpolate_offset, interpolate_antialias
        self.patch_embed = PatchEmbed(PATCH, DIM)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // PATCH) ** 2 + 1, DIM))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, DIM)) if num_register_tokens else None
        blocks = [Block(DIM, HEADS, "dinov2", swiglu) for _ in range(DEPTH)]
        if block_chunks > 0:
            size = DEPTH // block_chunks
            self.blocks = nn.ModuleList([BlockChunk([nn.Identity()] * i + blocks[i:i + size])
                                         for i in range(0, DEPTH, size)])
        else:
            self.blocks = nn.ModuleList(blocks)
        self.norm, self.head = nn.LayerNorm(DIM, eps=1e-6), nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, DIM))

    def forward(self, x):  # forward_features(x)["x_norm_clstoken"]
        B, _, w, h = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.patch_embed(x)], dim=1)
        x = x + interpolate_pos_encoding(self.pos_embed, x.shape[1] - 1, w, h, PATCH, self.offset, self.antialias)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


class MaskedAutoencoderViT(nn.Module):
    """mae/models_mae.py: encoder (timm names) + decoder; `encoder` is forward_encoder with its random masking."""

    def __init__(self, img_size: int = SIZE, dec_dim: int = 32) -> None:
        super().__init__()
        n = (img_size // PATCH) ** 2
        self.patch_embed = PatchEmbed(PATCH, DIM)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, DIM), requires_grad=False)
        self.blocks = nn.ModuleList([Block(DIM, HEADS) for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(DIM, eps=1e-6)
        self.decoder_embed = nn.Linear(DIM, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, dec_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(dec_dim, 2)])
        self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dec_dim, PATCH ** 2 * 3)

    def encoder(self, x, mask_ratio: float = 0.0, pos_embed=None):
        """forward_encoder; `pos_embed`: the one main_finetune's interpolate_pos_embed gives at another size."""
        pos_embed = self.pos_embed if pos_embed is None else pos_embed
        x = self.patch_embed(x) + pos_embed[:, 1:]
        N, L, D = x.shape
        keep = torch.argsort(torch.rand(N, L), dim=1)[:, :int(L * (1 - mask_ratio))]  # random_masking
        x = torch.gather(x, 1, keep.unsqueeze(-1).repeat(1, 1, D))
        x = torch.cat([(self.cls_token + pos_embed[:, :1]).expand(N, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def mae_interpolate_pos_embed(pos_embed, new: int):
    """mae/util/pos_embed.py interpolate_pos_embed: bicubic to the new size, align_corners=False."""
    old, dim = int((pos_embed.shape[1] - 1) ** 0.5), pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(-1, old, old, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


class DINOHead(nn.Module):
    """dino vision_transformer.DINOHead (3 layers, weight-normed last layer); `patch_out`: iBOTHead's last_layer2."""

    def __init__(self, in_dim: int, out_dim: int = 64, patch_out: int | None = None) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 16))
        with warnings.catch_warnings():  # the official code uses the (deprecated) nn.utils.weight_norm names
            warnings.simplefilter("ignore", FutureWarning)
            self.last_layer = nn.utils.weight_norm(nn.Linear(16, out_dim, bias=False))
            if patch_out:
                self.last_layer2 = nn.utils.weight_norm(nn.Linear(16, patch_out, bias=False))


class MultiCropWrapper(nn.Module):  # dino utils.MultiCropWrapper
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head


class DDP(nn.Module):
    """What DistributedDataParallel adds to the keys: `module.`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def randomise(model: nn.Module, seed: int, keep_convs: bool = False) -> nn.Module:
    """Every float tensor random, norm scales and layer-scale gammas around 1, so that each one counts.
    `keep_convs`: ResNet convolutions keep their He init (deep random convolutions would blow up)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if not t.dtype.is_floating_point or (keep_convs and t.dim() == 4):
                    continue
                noise = torch.randn(t.shape, generator=g)
                if name == "running_var":
                    t.copy_(1 + 0.2 * noise.abs())
                elif name.startswith("gamma") or (name == "weight" and isinstance(module, (nn.LayerNorm,
                                                                                           nn.BatchNorm2d))):
                    t.copy_(1 + 0.1 * noise)
                else:
                    t.copy_(0.05 * noise)
    return model.eval()


def _optimizer_state(model: nn.Module) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sum(p.sum() for p in model.parameters() if p.requires_grad).backward()
    opt.step()
    return opt.state_dict()


def _args(**kw) -> argparse.Namespace:
    """main_dino / main_ibot / main_pretrain's `args`: an argparse.Namespace of plain values."""
    return argparse.Namespace(arch="vit_tiny", patch_size=PATCH, lr=0.0005, global_crops_scale=(0.4, 1.0),
                              output_dir="/out", use_fp16=True, **kw)


def _x(size: int = SIZE, seed: int = 1):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _same_outputs(out, reference, size: int = SIZE) -> None:
    """The export, loaded by timm, against the official forward on the same input."""
    x = _x(size)
    with torch.no_grad():
        got, want = load_backbone(out)(x), reference(x)
    torch.testing.assert_close(got, want, **TOL)


def _save(tmp_path, obj, name: str = "checkpoint.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


# ---------------------------------------------------------------------------------------------------------- DINO
def _dino_checkpoint(tmp_path, backbone_fn=DinoViT, teacher_in_ddp: bool = False):
    """main_dino.py's checkpoint.pth: the student in DDP, the teacher in DDP only when it has BatchNorm."""
    width, convs = (DIM, False) if backbone_fn is DinoViT else (2048, True)
    student = MultiCropWrapper(randomise(backbone_fn(), 1, convs), randomise(DINOHead(width), 2))
    teacher = MultiCropWrapper(randomise(backbone_fn(), 3, convs), randomise(DINOHead(width), 4))
    ckpt = {"student": DDP(student).state_dict(), "teacher": (DDP(teacher) if teacher_in_ddp else teacher).state_dict(),
            "optimizer": _optimizer_state(student), "epoch": 100, "args": _args(out_dim=64),
            "dino_loss": {"center": torch.randn(1, 64)}}
    return _save(tmp_path, ckpt), student, teacher


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_dino_training_checkpoint(tmp_path, which):
    path, student, teacher = _dino_checkpoint(tmp_path)
    report = import_checkpoint(path, tmp_path / "out", which=None if which == "teacher" else which)
    net = teacher if which == "teacher" else student
    _same_outputs(report.out, net.backbone)
    assert (report.fmt, report.detected, report.which, report.arch) == ("dino", True, which, "vit_tiny_patch16_224")
    assert report.model_args == {**TIMM_ARGS, "init_values": None, "reg_tokens": 0, "no_embed_class": False,
                                 "num_classes": 0}
    other = "student" if which == "teacher" else "teacher"
    dropped = {d.entry: (d.tensors, d.why) for d in report.dropped}
    head = len(net.head.state_dict())
    assert dropped == {other: (len(net.state_dict()), f"the {other} (--which {other} imports it)"),
                       "optimizer": (dropped["optimizer"][0], "optimizer state"), "epoch": (0, "training progress"),
                       "args": (0, "training arguments"), "dino_loss": (1, "DINO loss centre"),
                       "head.*": (head, "DINO projection head")}
    # every tensor of the chosen network is either exported or listed
    assert report.kept + head == len(net.state_dict()) == len(load_file(str(report.out / "model.safetensors"))) + head
    cfg = read_export_config(report.out)
    assert cfg["source"]["dropped"] == [d.as_dict() for d in report.dropped] and cfg["source"]["which"] == which
    assert cfg["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert cfg["mean"] == list(timm.data.IMAGENET_DEFAULT_MEAN) and cfg["img_size"] == SIZE


def test_dino_backbone_release_interpolated_by_the_official_rule(tmp_path):
    """dino_deitsmall16_pretrain.pth is a bare backbone (timm names): only --format dino tells the rule apart."""
    official = randomise(DinoViT(), 5)
    path = _save(tmp_path, official.state_dict(), "dino_pretrain.pth")
    report = import_checkpoint(path, tmp_path / "dino", fmt="dino", img_size=48)
    assert any("4x4 -> 6x6" in n and "(n + 0.1) / N" in n for n in report.notes)
    _same_outputs(report.out, official, 48)  # the official model at 48 px interpolates on the fly, the same way
    detected = import_checkpoint(path, tmp_path / "timm", img_size=48)
    assert detected.fmt == "timm" and any("resample_abs_pos_embed" in n for n in detected.notes)
    with torch.no_grad():
        diff = (load_backbone(detected.out)(_x(48)) - official(_x(48))).abs().max()
    assert diff > 1e-3, "timm's resize rule differs from DINO's: --format dino matters for another grid"
    _same_outputs(import_checkpoint(path, tmp_path / "native").out, official)  # the native grid needs no rule


def test_dino_resnet50_checkpoint(tmp_path):
    """DINO's ResNet-50 is torchvision's; a BatchNorm teacher is in DDP too (module.backbone.)."""
    import torchvision

    def resnet50():
        model = torchvision.models.resnet50(weights=None)
        model.fc = nn.Identity()  # MultiCropWrapper drops the ImageNet classifier
        return model

    path, _, teacher = _dino_checkpoint(tmp_path, resnet50, teacher_in_ddp=True)
    report = import_checkpoint(path, tmp_path / "out", img_size=64)
    assert (report.fmt, report.arch, report.model_args) == ("dino", "resnet50", {"num_classes": 0})
    _same_outputs(report.out, teacher.backbone, 64)


# ---------------------------------------------------------------------------------------------------------- iBOT
def test_ibot_training_checkpoint(tmp_path):
    """main_ibot.py: both networks in DDP, layer scale `gamma_1/2`, the student's MIM token, iBOT heads."""
    def net(seed, mim):
        backbone = randomise(DinoViT(layer_scale="ibot", masked_im_modeling=mim), seed)
        return MultiCropWrapper(backbone, randomise(DINOHead(DIM, patch_out=64), seed + 1))

    student, teacher = net(1, True), net(3, False)
    ckpt = {"student": DDP(student).state_dict(), "teacher": DDP(teacher).state_dict(),
            "optimizer": _optimizer_state(student), "epoch": 800, "args": _args(pred_ratio=[0.0, 0.3]),
            "ibot_loss": {"center": torch.randn(1, 64), "center2": torch.randn(1, 1, 64)}}
    path = _save(tmp_path, ckpt)
    for which, network in (("teacher", teacher), ("student", student)):
        report = import_checkpoint(path, tmp_path / which, which=which, with_heads=True)
        assert report.fmt == "ibot" and report.model_args["init_values"] == 1e-5
        _same_outputs(report.out, network.backbone)
    kept = load_file(str(report.out / "heads.safetensors"))  # the student's trained MIM token goes with its heads
    assert student.backbone.masked_embed.abs().sum() > 0
    assert torch.equal(kept["backbone.mask_token"], student.backbone.masked_embed.detach())
    entries = {d.entry: d.why for d in report.dropped}
    assert entries["masked_embed"].startswith("mask token") and entries["head.*"] == "iBOT projection head"
    assert entries["ibot_loss"] == "iBOT loss centres"
    exported = load_file(str(report.out / "model.safetensors"))
    assert "blocks.1.ls2.gamma" in exported and not any("gamma_" in k or "masked" in k for k in exported)


def test_ibot_released_backbone_with_mean_pooling(tmp_path):
    """extract_backbone_weights.py writes {'state_dict': backbone}; use_mean_pooling gives fc_norm and no norm."""
    official = randomise(DinoViT(layer_scale="ibot", use_mean_pooling=True), 7)
    report = import_checkpoint(_save(tmp_path, {"state_dict": official.state_dict()}), tmp_path / "out", fmt="ibot")
    assert report.model_args["global_pool"] == "avg"
    _same_outputs(report.out, official)


# -------------------------------------------------------------------------------------------------------- DINOv2
def _dinov2_train(tmp_path, block_chunks: int):
    """train.py: FSDPCheckpointer's {'model': SSLMetaArch.state_dict(), 'optimizer', 'iteration'}."""
    meta = nn.Module()
    for i, name in enumerate(("student", "teacher")):
        setattr(meta, name, nn.ModuleDict({
            "backbone": randomise(DinoV2ViT(block_chunks=block_chunks, num_register_tokens=4), 10 + i),
            "dino_head": DINOHead(DIM), "ibot_head": DINOHead(DIM)}))
    path = _save(tmp_path, {"model": meta.state_dict(), "optimizer": _optimizer_state(meta.student),
                            "iteration": 12500})
    return path, meta


def test_dinov2_training_checkpoint_with_block_chunks(tmp_path):
    path, meta = _dinov2_train(tmp_path, block_chunks=2)
    assert "teacher.backbone.blocks.1.1.ls1.gamma" in torch.load(path, weights_only=True)["model"]
    for which in ("teacher", "student"):
        report = import_checkpoint(path, tmp_path / which, which=which if which == "student" else None)
        assert (report.fmt, report.which, report.arch) == ("dinov2", which, "vit_tiny_patch16_224")
        assert report.model_args["reg_tokens"] == 4 and report.model_args["no_embed_class"] is True
        _same_outputs(report.out, getattr(meta, which).backbone)
    entries = {d.entry: d.tensors for d in report.dropped}
    assert set(entries) == {"model.teacher.*", "optimizer", "iteration", "dino_head.*", "ibot_head.*", "mask_token"}
    assert entries["model.teacher.*"] == len(meta.teacher.state_dict())


def test_dinov2_teacher_checkpoint_vit_g_swiglu(tmp_path):
    """do_test's eval/N/teacher_checkpoint.pth ({'teacher': ...}) of a ViT-g style SwiGLU network."""
    backbone = randomise(DinoV2ViT(swiglu=True), 12)
    teacher = nn.ModuleDict({"backbone": backbone, "dino_head": DINOHead(DIM), "ibot_head": DINOHead(DIM)})
    report = import_checkpoint(_save(tmp_path, {"teacher": teacher.state_dict()}), tmp_path / "out")
    assert report.arch == "vit_giant_patch14_dinov2" and report.model_args["embed_dim"] == DIM
    _same_outputs(report.out, backbone)
    with pytest.raises(UnusableCheckpoint, match="holds only the teacher"):
        import_checkpoint(tmp_path / "checkpoint.pth", tmp_path / "s", which="student")


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_hub_backbone_at_another_size(tmp_path, registers):
    """A hub backbone (bare state dict, mask_token kept) trained at 64 px, imported for 32 px: the grid shrinks
    8x8 -> 4x4 by the hub model's own rule (offset 0.1; the register models: size + antialias)."""
    official = randomise(DinoV2ViT(img_size=64, num_register_tokens=registers, interpolate_antialias=bool(registers),
                                   interpolate_offset=0.0 if registers else 0.1), 13)
    path = _save(tmp_path, official.state_dict(), "dinov2_pretrain.pth")
    report = import_checkpoint(path, tmp_path / "out", img_size=SIZE)
    assert report.fmt == "dinov2" and any("8x8 -> 4x4" in n for n in report.notes)
    _same_outputs(report.out, official, SIZE)
    _same_outputs(import_checkpoint(path, tmp_path / "native").out, official, 64)


def test_renames_agree_with_timm_checkpoint_filter_fn():
    """The renames timm knows (DINOv2 registers, iBOT/DeiT-3 gamma_) give the same tensors as timm's filter."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    dinov2 = randomise(DinoV2ViT(num_register_tokens=4), 14).state_dict()
    model = timm.create_model("vit_tiny_patch16_224", **TIMM_ARGS, init_values=1e-5, reg_tokens=4,
                              no_embed_class=True, num_classes=0)
    ibot = randomise(DinoViT(layer_scale="ibot"), 15).state_dict()
    ls_model = timm.create_model("vit_tiny_patch16_224", **TIMM_ARGS, init_values=1e-5, num_classes=0)
    for state, target, drop in ((dinov2, model, {"mask_token"}), (ibot, ls_model, set())):
        ours = to_timm_names({k: v for k, v in state.items() if k not in drop})
        theirs = checkpoint_filter_fn(dict(state), target, adapt_layer_scale=True)
        theirs = {k: v for k, v in theirs.items() if k != "head.weight" and k != "head.bias"}
        assert ours.keys() == theirs.keys() == target.state_dict().keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


# ----------------------------------------------------------------------------------------------------------- MAE
def test_mae_pretraining_checkpoint(tmp_path):
    """main_pretrain.py's misc.save_model: {'model', 'optimizer', 'epoch', 'scaler', 'args'}; decoder dropped. The
    official feature: forward_encoder's CLS after the norm (mask_ratio 0 keeps every token, shuffled)."""
    mae = randomise(MaskedAutoencoderViT(), 16)
    path = _save(tmp_path, {"model": mae.state_dict(), "optimizer": _optimizer_state(mae), "epoch": 1599,
                            "scaler": {"scale": 65536.0, "growth_tracker": 0}, "args": _args(mask_ratio=0.75)})
    report = import_checkpoint(path, tmp_path / "out")
    assert report.fmt == "mae"
    decoder = sum(k.startswith("decoder_") for k in mae.state_dict())
    dropped = {d.entry: d.tensors for d in report.dropped}
    assert dropped["decoder_*"] == decoder and dropped["mask_token"] == 1 and {"scaler", "args"} <= set(dropped)
    assert report.kept == len(mae.state_dict()) - decoder - 1
    _same_outputs(report.out, lambda x: mae.encoder(x)[:, 0])
    resized = import_checkpoint(path, tmp_path / "48", img_size=48)
    assert any("MAE's interpolate_pos_embed" in n for n in resized.notes)
    _same_outputs(resized.out, lambda x: mae.encoder(x, pos_embed=mae_interpolate_pos_embed(mae.pos_embed, 6))[:, 0],
                  48)


# ---------------------------------------------------------------------------------- timm and sslpipe round trips
def test_timm_state_dict_gives_a_working_export(tmp_path):
    """timm.create_model(...).state_dict() saved with torch.save and as safetensors: the classifier is dropped."""
    torch.manual_seed(0)
    model = randomise(timm.create_model("vit_tiny_patch16_224", num_classes=10, **TIMM_ARGS, reg_tokens=2,
                                        no_embed_class=True, init_values=0.1), 30)
    save_file(model.state_dict(), str(tmp_path / "timm.safetensors"))
    for path, fmt in ((_save(tmp_path, model.state_dict(), "timm.pth"), "timm"), (tmp_path / "timm.safetensors",
                                                                                  "safetensors")):
        report = import_checkpoint(path, tmp_path / fmt)
        assert report.fmt == fmt and report.model_args["reg_tokens"] == 2 and report.model_args["no_embed_class"]
        assert [(d.entry, d.tensors) for d in report.dropped] == [("head.*", 2)]
        _same_outputs(report.out, lambda x: model.forward_head(model.forward_features(x), pre_logits=True))


def test_timm_hugging_face_folder(tmp_path):
    """A timm model folder from the Hugging Face hub: config.json (architecture, model_args, pretrained_cfg) beside
    model.safetensors gives the architecture, input size and normalisation."""
    args = {"img_size": SIZE, "patch_size": PATCH, "depth": DEPTH}
    model = randomise(timm.create_model("vit_tiny_patch16_224", num_classes=10, **args), 31)
    folder = tmp_path / "hub"
    folder.mkdir()
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224", "num_classes": 10, "num_features": DIM, "model_args": args,
        "pretrained_cfg": {"input_size": [3, SIZE, SIZE], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    report = import_checkpoint(folder, tmp_path / "out")
    cfg = read_export_config(report.out)
    assert (report.arch_from, cfg["model_args"]) == ("config.json beside the weights", {
        "img_size": SIZE, "dynamic_img_size": True, "patch_size": PATCH, "depth": DEPTH, "num_classes": 0})
    assert cfg["mean"] == [0.5] * 3 and cfg["std"] == [0.25] * 3
    _same_outputs(report.out, lambda x: model.forward_head(model.forward_features(x), pre_logits=True))


@pytest.mark.parametrize("arch,args,size", [("vit_tiny_patch16_224", TIMM_ARGS, SIZE), ("resnet18", {}, 64)])
def test_export_imported_again_gives_the_same_tensors(tmp_path, arch, args, size):
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=0, **args).eval()
    export = export_backbone(model, tmp_path / "export", arch=arch, model_args=args, img_size=size,
                             mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), source={"which": "teacher"})
    bare = tmp_path / "bare" / "weights.safetensors"  # the weights alone: the architecture is read from the shapes
    bare.parent.mkdir()
    bare.write_bytes((export / "model.safetensors").read_bytes())
    for source, name in ((export, "again"), (bare, "bare")):
        report = import_checkpoint(source, tmp_path / name, img_size=size)
        original = load_file(str(export / "model.safetensors"))
        imported = load_file(str(report.out / "model.safetensors"))
        assert original.keys() == imported.keys() and all(torch.equal(original[k], imported[k]) for k in original)
        assert report.arch == arch
        _same_outputs(report.out, model, size)
    again = read_export_config(tmp_path / "again")
    assert (again["architecture"], again["model_args"], again["mean"]) == (arch, {**read_export_config(export)[
        "model_args"]}, [0.5, 0.4, 0.3])


# ------------------------------------------------------------ timm layouts that share names with official ones
D3_ARGS = {"img_size": SIZE, "patch_size": PATCH, "embed_dim": 64, "depth": DEPTH, "num_heads": 2,
           "dynamic_img_size": True, "global_pool": "token"}  # the [CLS] feature, as sslpipe builds DINOv3


def _same_state(out, model) -> None:
    imported = load_file(str(out / "model.safetensors"))
    state = model.state_dict()
    assert imported.keys() == state.keys() and all(torch.equal(imported[k], state[k]) for k in state)


def test_dinov3_export_and_timm_folder_are_imported_as_they_are(tmp_path):
    """timm's DINOv3 (Eva: `gamma_1`, `reg_token`, no `pos_embed`) is no iBOT checkpoint: its export imported again
    and a timm Hugging Face folder of it (detected, and with --format timm) keep every key and tensor."""
    torch.manual_seed(40)
    model = timm.create_model("vit_small_patch16_dinov3", num_classes=0, **D3_ARGS).eval()
    with torch.no_grad():  # parameters only: `randomise` would change the RoPE buffers, which are not saved
        for t in model.parameters():
            t.add_(0.05 * torch.randn_like(t))
    assert "blocks.0.gamma_1" in model.state_dict()
    export = export_backbone(model, tmp_path / "export", arch="vit_small_patch16_dinov3", model_args=D3_ARGS,
                             img_size=SIZE, mean=(0.5,) * 3, std=(0.5,) * 3, source={"which": "teacher"})
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(model.state_dict(), str(hub / "model.safetensors"))
    (hub / "config.json").write_text(json.dumps({
        "architecture": "vit_small_patch16_dinov3", "num_classes": 0,
        "model_args": {k: v for k, v in D3_ARGS.items() if k != "dynamic_img_size"},
        "pretrained_cfg": {"input_size": [3, SIZE, SIZE], "mean": [0.5] * 3, "std": [0.5] * 3}}))
    for source, options, fmt in ((export, {}, "safetensors"), (hub, {}, "safetensors"),
                                 (hub, {"fmt": "timm"}, "timm")):
        report = import_checkpoint(source, tmp_path / f"out_{len(list(tmp_path.iterdir()))}", **options)
        assert (report.fmt, report.arch, report.arch_from) == (fmt, "vit_small_patch16_dinov3",
                                                               "config.json beside the weights")
        _same_state(report.out, model)
        _same_outputs(report.out, model)


def test_mobilenet_state_dict_and_export_are_imported_as_they_are(tmp_path):
    """timm's MobileNet-V3 stages are `blocks.S.I.` (as DINOv2's block chunks): a state dict with --arch, with and
    without --format timm, and its export imported again keep every key and tensor."""
    arch = "mobilenetv3_small_050"
    model = randomise(timm.create_model(arch, num_classes=0), 41, keep_convs=True).eval()
    path = _save(tmp_path, model.state_dict(), "mobilenet.pth")
    export = export_backbone(model, tmp_path / "export", arch=arch, model_args={}, img_size=64, mean=(0.5,) * 3,
                             std=(0.5,) * 3, source={"which": "teacher"})
    for source, options, fmt in ((path, {"arch": arch}, "timm"), (path, {"arch": arch, "fmt": "timm"}, "timm"),
                                 (export, {}, "safetensors")):
        report = import_checkpoint(source, tmp_path / f"out_{len(list(tmp_path.iterdir()))}", img_size=64, **options)
        assert (report.fmt, report.arch) == (fmt, arch)
        _same_state(report.out, model)
        _same_outputs(report.out, model, 64)


@pytest.mark.parametrize("arch", ["beit_base_patch16_224", "vit_small_patch16_dinov3_qkvb", "efficientnet_b0",
                                  "cait_xxs24_224"])
def test_timm_keys_like_official_ones_are_detected_as_timm(arch):
    """BEiT, DINOv3's Eva and CaiT have `gamma_1` (iBOT's layer scale), EfficientNet `blocks.N.M` (DINOv2's chunks)."""
    from sslpipe.weights.layouts import detect_format

    args = {} if arch.startswith(("efficientnet", "cait")) else {k: v for k, v in D3_ARGS.items()
                                                                  if k != "dynamic_img_size"}
    state = timm.create_model(arch, num_classes=0, **args).state_dict()
    assert detect_format(state, state, ".pth") == "timm"


# --------------------------------------------------------------------------------------------- downstream stages
def test_import_runs_through_sslpipe_knn(tmp_path, digits_shards, capsys):
    path, _, teacher = _dino_checkpoint(tmp_path)
    assert main(["import", str(path), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "dino layout (detected from the keys), the teacher" in printed and "DINO projection head" in printed
    result = tmp_path / "knn.json"
    assert main(["knn", str(tmp_path / "out"), "--data", str(digits_shards), "--resize", "32", "--crop", "32",
                 "--k", "10", "20", "--out", str(result)]) == 0
    knn = json.loads(result.read_text())
    assert knn["n_train"] == 1438 and knn["n_test"] == 359 and knn["k"]["20"]["top1"] > 0.3  # chance: 0.1


def test_imported_dinov2_fine_tunes_one_vitdet_step(tmp_path):
    """The DINOv2 import (registers, layer scale) becomes the ViTDet trunk tensor by tensor and trains."""
    from sslpipe.ingest.options import ShardOptions
    from sslpipe.ingest.shards import write_shards
    from sslpipe.recipes import get_recipe, load_config

    path, meta = _dinov2_train(tmp_path, block_chunks=0)
    export = import_checkpoint(path, tmp_path / "export").out
    write_shards(tmp_path / "scenes", source="scenes", scenes={"train": 8, "val": 4, "size": 64},
                 options=ShardOptions(samples_per_shard=8), progress=False)
    cfg = load_config(REPO / "recipes/demo_finetune_vitdet.yaml", [
        f"data.train={tmp_path / 'scenes'}", f"data.val={tmp_path / 'scenes'}", f"model.init_from={export}",
        "finetune_vitdet.img_size=64", "finetune_vitdet.window_size=4", "finetune_vitdet.global_blocks=[1]",
        "finetune_vitdet.pyramid_channels=32", "finetune_vitdet.head_dim=16", "finetune_vitdet.fc_dim=32",
        "finetune_vitdet.box_head_convs=1", "finetune_vitdet.mask_head_convs=1",
        "finetune_vitdet.box_batch_size_per_image=16", "data.batch_size=2", "data.num_workers=0",
        "data.steps_per_epoch=1"])
    recipe = get_recipe(cfg.method)(cfg)
    recipe.build_model()
    trunk = recipe.vit_trunk()
    exported = load_file(str(export / "model.safetensors"))
    assert torch.equal(trunk.blocks[0].block.ls1.gamma, exported["blocks.0.ls1.gamma"])
    assert torch.equal(trunk.blocks[1].block.attn.qkv.weight, exported["blocks.1.attn.qkv.weight"])
    recipe.model().train()
    loss, _ = recipe.step(next(iter(recipe.train_loader(0, 0, 1))), {})
    loss.backward()
    assert torch.isfinite(loss) and trunk.blocks[0].block.ls1.gamma.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------- bad input
class NotAWeight:
    """A pickled object of a class a safe load does not know."""


def _vit_state():
    return randomise(DinoViT(), 20).state_dict()


@pytest.mark.parametrize("case,expected", [
    ("object", r"pickled Python object \(test_import\.NotAWeight\).*weights_only=False.*isinstance"),
    ("object_in_args", r"pickled Python object \(test_import\.NotAWeight\)"),
    ("truncated_pth", r"could not be read as a torch checkpoint \(.+\): truncated or damaged\? Download it again"),
    ("truncated_safetensors", r"could not be read as a safetensors file \(.+\): truncated or damaged\?"),
    ("empty", r"holds no tensors \(entries: none, an empty dict\)"),
    ("other_arch", r"does not fit vit_small_patch16_224 .*in the model, not in the checkpoint: blocks\.10\.attn.*"
                   r"shape checkpoint vs model: blocks\.0\.attn\.proj\.bias \(192,\) vs \(384,\).*"
                   r"These weights are no vit_small_patch16_224: leave --arch out"),
    ("missing_key", r"in the model, not in the checkpoint: blocks\.1\.norm1\.weight"),
    ("extra_key", r"in the checkpoint, not in the model: blocks\.0\.attn\.q_norm\.weight"),
    ("single_network_which", r"holds a single network \(no teacher/student\): leave --which out"),
    ("fsdp_shard", r"FSDP shard of flattened parameters"),
    ("format_mismatch", r"--format mae, but .* has the keys of a dino checkpoint"),
    ("whole_module", r"pickled Python object \(test_import\.DinoViT\)"),
])
def test_bad_inputs_give_one_clear_message(tmp_path, case, expected):
    state, options, name = _vit_state(), {}, "bad.pth"
    if case == "object":
        obj = {"model": state, "config": NotAWeight()}
    elif case == "object_in_args":
        obj = {"model": state, "args": argparse.Namespace(lr=0.1, sampler=NotAWeight())}
    elif case in ("truncated_pth", "truncated_safetensors"):
        name = "bad.pth" if case == "truncated_pth" else "bad.safetensors"
        full = tmp_path / ("full" + name[3:])
        torch.save(state, full) if case == "truncated_pth" else save_file(state, str(full))
        (tmp_path / name).write_bytes(full.read_bytes()[: full.stat().st_size // 2])
        obj = None
    elif case == "empty":
        obj = {}
    elif case == "other_arch":
        obj, options = state, {"arch": "vit_small_patch16_224"}
    elif case == "missing_key":
        obj = {k: v for k, v in state.items() if k != "blocks.1.norm1.weight"}
    elif case == "extra_key":
        obj = {**state, "blocks.0.attn.q_norm.weight": torch.ones(64)}
    elif case == "single_network_which":
        obj, options = {"model": state}, {"which": "student"}
    elif case == "fsdp_shard":
        obj = {"model": {"teacher.backbone._fsdp_wrapped_module.flat_param": torch.zeros(10)}}
    elif case == "format_mismatch":
        obj, options, name = None, {"fmt": "mae"}, _dino_checkpoint(tmp_path)[0].name
    else:
        obj = randomise(DinoViT(), 21)
    if obj is not None:
        torch.save(obj, tmp_path / name)
    with pytest.raises(UnusableCheckpoint, match=re.compile(expected, re.S)):
        import_checkpoint(tmp_path / name, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists(), "nothing is written for a refused checkpoint"


def test_cli_refuses_a_pickle_with_one_message(tmp_path, capsys):
    torch.save({"model": _vit_state(), "cfg": NotAWeight()}, tmp_path / "bad.pth")
    assert main(["import", str(tmp_path / "bad.pth"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sslpipe import: error:") and "NotAWeight" in err and "weights_only=False" in err
    assert main(["import", str(tmp_path / "nowhere.pth"), str(tmp_path / "out")]) == 2
    assert "nowhere.pth not found" in capsys.readouterr().err


def test_import_writes_a_model_card(tmp_path):
    path = _save(tmp_path, _vit_state(), "vit.pth")
    out = import_checkpoint(path, tmp_path / "out", fmt="dino").out
    text = (out / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["library_name"] == "timm" and {"timm", "sslpipe", "dino"} <= set(header["tags"])
    assert hashlib.sha256(path.read_bytes()).hexdigest() in text
    assert read_export_config(out)["sha256"]["model.safetensors"] in text


def test_dino_training_checkpoint_with_heads_continues_in_a_dino_recipe(tmp_path, digits_shards, monkeypatch):
    """`--with-heads`: the official teacher's head (weight_g / weight_v -> our weight-norm parametrisation) lands in
    heads.safetensors, and `model.init_from` starts a DINO recipe's student and teacher backbone and head from it, so
    both compute what the official teacher computes."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from sslpipe.models.backbones import pooled_features
    from sslpipe.recipes import load_config
    from sslpipe.recipes.dino import DINORecipe

    path, _, teacher = _dino_checkpoint(tmp_path)
    out = import_checkpoint(path, tmp_path / "out", with_heads=True).out
    assert read_export_config(out)["heads"] == {"method": "dino", "file": "heads.safetensors", "tensors": 8}
    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = load_config(REPO / "recipes/demo_dino.yaml", [
        f"data.train={digits_shards}", "crops.global_size=32", "model.arch=vit_tiny_patch16_224",
        f"model.patch_size={PATCH}", f"model.kwargs={{embed_dim: {DIM}, depth: {DEPTH}, num_heads: {HEADS}}}",
        "dino.head.out_dim=64", "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16", f"model.init_from={out}"])
    recipe = DINORecipe(cfg)
    recipe.build(Accelerator(cpu=True))
    x = _x()
    with torch.no_grad():  # the official DINOHead.forward: last_layer(normalize(mlp(x)))
        want = teacher.head.last_layer(F.normalize(teacher.head.mlp(teacher.backbone(x)), dim=-1))
        for net in (recipe.student.eval(), recipe.teacher):
            torch.testing.assert_close(net.head(pooled_features(net.backbone, x)), want, **TOL)
