"""EMA teacher (DINO/iBOT): theta_t <- m * theta_t + (1 - m) * theta_s over parameters present in both, by name.

Like the official DINO/iBOT code, only parameters are averaged; buffers (e.g. BatchNorm running statistics of a CNN
teacher) are not copied: the official teacher runs in train mode and normalises with its own batch statistics.
lightly's ``update_momentum`` zips ``parameters()`` by position, which silently mispairs when the student has extra
parameters (the iBOT mask token); hence matching by name here.
"""

from __future__ import annotations

import copy

import torch
from timm.layers import PatchDropout, PatchDropoutWithIndices
from torch import nn

from sslpipe.weights.state_dict import local_slice

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers


def _clean(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def disable_dropout(model: nn.Module) -> nn.Module:
    """``model`` with every random draw of its forward switched off, in place, so that a teacher's targets are
    deterministic even in train mode (kept for BatchNorm batch statistics, as the official code does): drop-path,
    dropout modules (attention, projection, position, MLP), patch dropout, the float ``drop_rate`` that timm CNNs
    apply with ``F.dropout`` before their pooled feature (ResNet, EfficientNet, MobileNetV3, DenseNet, ...) and
    the RoPE coordinate augmentation of timm's rotary embeddings (``rope_shift/jitter/rescale_coords``), which the
    official DINOv3 teacher, in eval mode, never applies. Zeroing the rates rather than calling ``eval()`` leaves the
    mode to the caller."""
    for m in model.modules():
        if hasattr(m, "drop_prob"):  # timm DropPath
            m.drop_prob = 0.0
        if isinstance(m, nn.modules.dropout._DropoutNd):  # timm's fused attention reads attn_drop.p too
            m.p = 0.0
        if isinstance(m, (PatchDropout, PatchDropoutWithIndices)):  # the latter: timm's Eva
            m.prob = 0.0
        if isinstance(getattr(m, "drop_rate", None), (int, float)):  # functional dropout of timm's CNN heads
            m.drop_rate = 0.0
        if hasattr(m, "aug_active"):  # timm's rotary embeddings augment coordinates while training
            m.aug_active = False
    return model


def build_teacher(student: nn.Module) -> nn.Module:
    """Deep copy of ``student`` with no gradients and no dropout (`disable_dropout`; docs/methods.md §1: teacher
    drop_path 0), so the teacher may run in train mode (BatchNorm batch statistics, as the official code does) or
    eval mode; the caller decides."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return disable_dropout(teacher)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: every teacher parameter whose name (wrapper prefixes stripped) exists in the student moves to
    m * teacher + (1 - m) * student. Raises if they share no name or a shared name differs in shape."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    s_params = {_clean(n): p for n, p in student.named_parameters()}
    pairs = [(p_t, s_params[_clean(n)]) for n, p_t in teacher.named_parameters() if _clean(n) in s_params]
    if not pairs:
        raise ValueError("ema_update: teacher and student share no parameter names (was the teacher built from a "
                         "different model?)")
    bad = [n for n, p_t in teacher.named_parameters()
           if _clean(n) in s_params and p_t.shape != s_params[_clean(n)].shape]
    if bad:
        raise ValueError(f"ema_update: teacher and student parameters differ in shape: {bad[:5]}")
    # FSDP2 (both nets sharded alike): each process averages its own slice, no communication.
    t_list = [local_slice(t) for t, _ in pairs]
    s_list = [local_slice(s.detach()).to(t.dtype) for t, s in pairs]
    torch._foreach_mul_(t_list, momentum)
    torch._foreach_add_(t_list, s_list, alpha=1.0 - momentum)
