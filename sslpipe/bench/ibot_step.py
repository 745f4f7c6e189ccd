"""Benchmark: one iBOT training step of sslpipe's pieces vs the same step assembled from lightly 1.6 building blocks.

A step = teacher forward on the unmasked global crops (head on every token: sslpipe's patch centre is the mean over
all of them), student forward on the masked global crops (head on the CLS token and the masked tokens only, as
sslpipe's `mask_indices` and lightly's own iBOT example, `examples/pytorch/ibot.py`, do) and on the local crops (CLS
only), loss, backward, AdamW step, centre update, EMA update. Both sides use the same timm ViT weights, the same head
weights, batch, crops and masks, so their first-step losses agree (``loss_abs_diff``) when the local crops have the
global crops' size, and their FLOPs per step (``gflop_*``, one step of each counted after the timing) agree: the
comparison times equal work. With smaller local crops the two resize the position embedding differently (sslpipe:
the official iBOT interpolation; lightly: timm's), which moves the loss a little but not the amount of work. lightly
side: MaskedVisionTransformerTIMM (init "skip", so the timm weights are kept), one DINOProjectionHead shared by CLS
and patch tokens (lightly has no iBOT head), DINOLoss for the CLS term, IBOTPatchLoss for the patch term,
update_momentum for the EMA.
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

import torch
from lightly.loss import DINOLoss as LightlyDINOLoss
from lightly.loss import IBOTPatchLoss
from lightly.models.modules import DINOProjectionHead, MaskedVisionTransformerTIMM
from lightly.models.utils import update_momentum
from torch import nn

from sslpipe.bench.flops import count_flops
from sslpipe.bench.timing import time_interleaved
from sslpipe.data.collate import mask_batch_fields
from sslpipe.losses.ibot import IBOTLoss
from sslpipe.models.backbones import MaskedViT, create_backbone
from sslpipe.models.ema import build_teacher, ema_update
from sslpipe.models.heads import IBOTHead
from sslpipe.recipes.ibot import IBOTNet


def _lightly_head_from(ours: IBOTHead, in_dim: int, hidden: int, bottleneck: int, out_dim: int) -> nn.Module:
    head = DINOProjectionHead(in_dim, hidden, bottleneck, out_dim, norm_last_layer=True)
    ours_lin = [m for m in ours.mlp if isinstance(m, nn.Linear)]
    ref_lin = [m for m in head.layers if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for a, b in zip(ours_lin, ref_lin, strict=True):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
        head.last_layer.weight_v.copy_(ours.last_layer.parametrizations.weight.original1)
    return head


def run_ibot_step_bench(arch: str = "vit_tiny_patch16_224", *, img_size: int = 32, local_size: int = 16,
                        patch_size: int = 4, depth: int = 4, embed_dim: int = 128, num_heads: int = 4,
                        batch_size: int = 32, n_local: int = 4, out_dim: int = 1024, hidden_dim: int = 512,
                        bottleneck_dim: int = 128, warmup: int = 3, steps: int = 10, device: str | None = None,
                        seed: int = 0) -> dict[str, Any]:
    """Median step time (ms) of sslpipe's iBOT pieces and of the lightly-assembled step, and their ratio."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    vit = create_backbone(arch, img_size=img_size, patch_size=patch_size, depth=depth, embed_dim=embed_dim,
                          num_heads=num_heads)
    head = IBOTHead(embed_dim, out_dim, out_dim, shared_head=True, hidden_dim=hidden_dim,
                    bottleneck_dim=bottleneck_dim, norm_last_layer=True)
    grid = img_size // patch_size
    B, G = batch_size, 2
    g = torch.Generator().manual_seed(seed)
    globals_ = torch.randn(G * B, 3, img_size, img_size, generator=g).to(dev)
    locals_ = torch.randn(n_local * B, 3, local_size, local_size, generator=g).to(dev)
    masks = torch.rand(G * B, grid, grid, generator=g) < 0.3
    masks[torch.rand(G * B, generator=g) < 0.5] = False  # half the crops unmasked (pred_ratio [0, 0.3])
    fields = {k: v.to(dev) for k, v in mask_batch_fields(masks).items()}  # as the loader hands them over
    masks, indices, weights = fields["masks"], fields["mask_indices"], fields["masks_weight"]
    temps = dict(teacher_temp=0.04, teacher_patch_temp=0.04)

    # --- sslpipe: the recipe's own network (sslpipe.recipes.ibot.IBOTNet) ---
    student = IBOTNet(MaskedViT(copy.deepcopy(vit), mask_token=True), head).to(dev)
    teacher = build_teacher(student)
    loss_fn = IBOTLoss(out_dim, out_dim, n_global=G, n_local=n_local).to(dev)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def ours_step() -> float:
        with torch.no_grad():
            t_cls, t_patch = teacher(globals_)[:2]
        s_cls, s_patch, s_loc, _ = student(globals_, masks, locals_, mask_indices=indices)
        out = loss_fn(s_cls, s_patch, t_cls, t_patch, masks, student_local_cls=s_loc, mask_indices=indices,
                      masks_weight=weights, **temps)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        loss_fn.record_center(t_cls, t_patch)
        loss_fn.update_center()
        ema_update(teacher, student, 0.996)
        return out["loss"].item()

    # --- lightly ---
    l_backbone = MaskedVisionTransformerTIMM(vit=copy.deepcopy(vit), weight_initialization="skip",
                                             pos_embed_initialization="skip").to(dev)
    l_head = _lightly_head_from(head, embed_dim, hidden_dim, bottleneck_dim, out_dim).to(dev)
    l_t_backbone = copy.deepcopy(l_backbone).requires_grad_(False)
    l_t_head = DINOProjectionHead(embed_dim, hidden_dim, bottleneck_dim, out_dim).to(dev)  # weight_norm: no deepcopy
    l_t_head.load_state_dict(l_head.state_dict())
    l_t_head.requires_grad_(False)
    l_cls_loss = LightlyDINOLoss(out_dim).to(dev)
    l_patch_loss = IBOTPatchLoss(out_dim).to(dev)
    l_params = list(l_backbone.parameters()) + list(l_head.parameters())
    l_opt = torch.optim.AdamW(l_params, lr=1e-4)
    l_mask = torch.cat([torch.zeros(G * B, 1, dtype=torch.bool, device=dev), masks.flatten(1)], dim=1)
    flat = masks.flatten(1)

    def lightly_step() -> float:
        with torch.no_grad():
            t_tok = l_t_head(l_t_backbone.encode(globals_))
        feat = l_backbone.encode(globals_, mask=l_mask)
        s_cls, s_masked = l_head(feat[:, 0]), l_head(feat[:, 1:][flat])  # lightly's example: masked tokens only
        s_loc = l_head(l_backbone.encode(locals_)[:, 0])
        cls = l_cls_loss(list(t_tok[:, 0].chunk(G)), list(torch.cat([s_cls, s_loc]).chunk(G + n_local)),
                         teacher_temp=temps["teacher_temp"])
        patch = l_patch_loss(t_tok[:, 1:][flat], s_masked, masks, teacher_temp=temps["teacher_patch_temp"])
        loss = cls + patch
        l_opt.zero_grad(set_to_none=True)
        loss.backward()
        l_opt.step()
        update_momentum(l_backbone, l_t_backbone, 0.996)
        update_momentum(l_head, l_t_head, 0.996)
        return loss.item()

    ours_times, l_times, ours_first, l_first = time_interleaved(ours_step, lightly_step, warmup, steps, dev)
    ours_ms, l_ms = 1000 * statistics.median(ours_times), 1000 * statistics.median(l_times)
    ours_flops, l_flops = count_flops(ours_step), count_flops(lightly_step)
    return {
        "device": str(dev), "arch": arch, "img_size": img_size, "local_size": local_size, "patch_size": patch_size,
        "depth": depth, "embed_dim": embed_dim, "batch_size": batch_size, "n_local": n_local, "out_dim": out_dim,
        "steps": steps, "warmup": warmup,
        "sslpipe_ms": ours_ms, "lightly_ms": l_ms, "ratio_sslpipe_over_lightly": ours_ms / l_ms,
        "first_loss_sslpipe": ours_first, "first_loss_lightly": l_first,
        "loss_abs_diff": abs(ours_first - l_first),
        "gflop_sslpipe": ours_flops / 1e9, "gflop_lightly": l_flops / 1e9, "flop_ratio_lightly_over_sslpipe":
        l_flops / ours_flops,
    }
