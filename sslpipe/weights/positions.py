"""Position grids of exports at another image size: each source resizes its position embedding by its own rule, and
an export used at another size must be resized by the rule its network was trained with, so that it computes there
what the original computes.

Rules: `official`, DINO / iBOT / DINOv2 without registers (interpolate_pos_encoding: bicubic with scale factor
(n + 0.1) / N, dino#8), which sslpipe's own training also uses for local crops (`models.backbones.vit_pos_embed`);
`mae`, bicubic to the new size without antialias (MAE's interpolate_pos_embed); `antialias`, bicubic with antialias
(DINOv2's register models, timm's `resample_abs_pos_embed`); `rope`, DINOv3: rotary position embeddings, computed
for every grid from the coordinates (timm's vit_*_dinov3 as the official RopePositionEmbedding), so there is no
position grid to resize and `fit_position_grid` does nothing.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

Rule = Literal["official", "mae", "antialias", "rope"]
_HOW = {"official": "bicubic, scale factor (n + 0.1) / N, as the official interpolate_pos_encoding of DINO / iBOT / "
                    "DINOv2",
        "mae": "bicubic to the new size, no antialias, as MAE's interpolate_pos_embed",
        "antialias": "bicubic to the new size with antialias (DINOv2's register models, timm's resample_abs_pos_embed)"}


def position_rule(fmt: str | None, registers: bool) -> Rule:
    """The rule of a checkpoint format (`sslpipe import --format`); sslpipe's own runs (None) train with `official`."""
    if fmt in (None, "dino", "ibot") or (fmt == "dinov2" and not registers):
        return "official"
    if fmt == "dinov3":
        return "rope"
    return "mae" if fmt == "mae" else "antialias"


def export_position_rule(config: Mapping[str, Any], registers: bool) -> Rule:
    """The rule of an export folder's network, from its config.json: an import records its format, a run does not."""
    return position_rule((config.get("source") or {}).get("format"), registers)


def resize_pos_embed(pos: Tensor, prefix: int, old: int, new: int, rule: Rule) -> tuple[Tensor, str]:
    """(pos with its old x old grid part resized to new x new (the first `prefix` tokens kept), a note saying how)."""
    head, grid = pos[:, :prefix], pos[:, prefix:]
    if rule == "official":
        square = grid[0].double().T.reshape(1, -1, old, old)  # (1, D, old, old), as the official code resizes it
        grid = F.interpolate(square, scale_factor=((new + 0.1) / old,) * 2, mode="bicubic", align_corners=False)
        grid = grid.reshape(-1, new * new).T[None]
    else:
        grid = resample_abs_pos_embed(grid.float(), new_size=[new, new], old_size=[old, old], num_prefix_tokens=0,
                                      antialias=rule != "mae")
    return torch.cat([head, grid.to(pos.dtype)], dim=1), f"position embedding {old}x{old} -> {new}x{new}: {_HOW[rule]}"


def fit_position_grid(state: dict[str, Tensor], module: nn.Module, rule: Rule) -> list[str]:
    """Resize `state["pos_embed"]` in place to `module`'s square grid by `rule` when only the grid differs; the
    notes say what was done (none when nothing was). `rope` (DINOv3) resizes nothing: its positions are computed."""
    if rule == "rope":
        return []
    pos, target = state.get("pos_embed"), getattr(module, "pos_embed", None)
    if pos is None or not isinstance(target, Tensor) or pos.shape == target.shape or pos.shape[2] != target.shape[2]:
        return []
    prefix = 0 if getattr(module, "no_embed_class", False) else module.num_prefix_tokens
    old, new = math.isqrt(pos.shape[1] - prefix), tuple(module.patch_embed.grid_size)
    if old * old != pos.shape[1] - prefix or new[0] != new[1] or target.shape[1] != prefix + new[0] * new[1]:
        return []
    state["pos_embed"], note = resize_pos_embed(pos, prefix, old, new[0], rule)
    return [note]
