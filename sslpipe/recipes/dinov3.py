"""DINOv3 (Siméoni et al., "DINOv3", arXiv 2508.10104; facebookresearch/dinov3 `train/ssl_meta_arch.py`,
`train/train.py`, `loss/gram_loss.py`, `configs/`): DINOv2's objective (`sslpipe.recipes.dinov2`) on a ViT with
rotary position embeddings and storage tokens (timm's `vit_*_dinov3`), plus Gram anchoring. docs/methods.md §11.

Gram anchoring (`sslpipe.losses.gram`): a frozen "Gram teacher", a snapshot of the EMA teacher's backbone, gives the
patch-to-patch similarity structure the student's patch features must keep. As in the official loop: the snapshot is
first taken from the EMA teacher at iteration `gram.load_at` (the official `it_load_ema_teacher`; the loss is off
before), then refreshed from it after every `gram.refresh_every` iterations from `gram.first_refresh` on (at most
`gram.max_refreshes` times); the student's features are the patch tokens of its (masked) global crops after the final
norm, the Gram teacher's those of the same crops, or of the crops at `gram.high_res` x the size with its features
resized (bicubic, no antialias) to the student's grid. Constant schedules after warm-up (DINOv3's long runs) are the
core keys: `optim.schedule: constant`, equal start and end weight decay and teacher momentum.

Deviations from the official code: the high-resolution Gram crops are the student's global crops resized on the
device, where the official loader crops the image again at the larger size (the same pixels when the source image is
not larger than the crop, as on the bundled data); the Gram teacher's snapshot is copied from the EMA teacher (the
official `update_gram(m=0)`), never loaded from a separate checkpoint (`model.init_from` starts the run instead).
"""
from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from sslpipe.config import Section
from sslpipe.losses.gram import GramLoss
from sslpipe.recipes.dinov2 import DINOv2Config, DINOv2Recipe
from sslpipe.weights.sharded_state import load_whole
from sslpipe.weights.state_dict import without_aliases


class GramConfig(Section):
    """Gram anchoring; defaults: the official ssl_default_config.yaml `gram:` block and the 7B Gram phase
    (configs/train/dinov3_vit7b16_gram_anchor.yaml); the paper's weight is 2."""

    weight: float = 0.0  # 0: off (ssl_default use_loss false); the paper and the 7B Gram phase reach 2
    load_at: int = Field(0, ge=0)  # the iteration at which the Gram teacher is first taken from the EMA teacher
    refresh_every: int = Field(10000, gt=0)  # 7B Gram phase update_frequency (ssl_default: 50000)
    first_refresh: int = Field(0, ge=0)  # no refresh before this iteration (it_first_update)
    max_refreshes: int | None = Field(None, ge=0)  # null: unlimited (7B Gram phase: 3)
    normalized: bool = True
    img_level: bool = True  # the Gram matrix per image (7B Gram phase; ssl_default: over the local batch)
    remove_neg: bool = False
    remove_only_teacher_neg: bool = False
    tokens: Literal["all", "masked", "unmasked"] = "all"  # masked / unmasked need img_level: false
    high_res: float | None = Field(None, gt=0)  # the Gram teacher sees crops this many times larger (7B: 512 / 256 = 2)


class DINOv3Config(DINOv2Config):
    """`dinov3:` in a recipe: DINOv2's section plus `gram`."""

    key: ClassVar[str] = "dinov3"

    gram: GramConfig = Field(default_factory=GramConfig)

    @model_validator(mode="after")
    def _gram_keys_need_gram(self) -> "DINOv3Config":
        """Without Gram anchoring (weight 0) no other `gram` key is read; the run without it, beside a recipe that
        sets them: `'dinov3.gram={weight: 0}'`."""
        if self.gram.weight == 0:
            self.gram.refuse_unread_values("dinov3.gram", dict.fromkeys(
                (k for k in GramConfig.model_fields if k != "weight"), "dinov3.gram.weight=0 (no Gram anchoring)"))
        return self

    @model_validator(mode="after")
    def _plain_last_layer(self) -> "DINOv3Config":
        if self.head.norm_last_layer:
            raise ValueError("dinov3.head.norm_last_layer: DINOv3's heads end in a plain Linear, with no weight-norm "
                             "magnitude to hold at 1 (the official head_norm_last_layer is only logged); set it false")
        return self


class DINOv3Recipe(DINOv2Recipe):
    """The DINOv3 recipe: `method: dinov3` in a YAML recipe."""

    config_key = "dinov3"
    config_section = DINOv3Config
    cls_token_std = 0.02  # dinov3 models/vision_transformer.py init_weights
    plain_last_layer = True  # dinov3 layers/dino_head.py: nn.Linear, trunc-normal 0.02

    def build(self, accelerator: Any) -> None:
        super().build(accelerator)
        g = self.section.gram
        if g.tokens != "all" and g.img_level:
            raise ValueError(f"dinov3.gram.tokens={g.tokens} selects patches across images: set "
                             "dinov3.gram.img_level=false (the official assertion)")
        self.gram_loss = GramLoss(g.normalized, g.img_level, g.remove_neg, g.remove_only_teacher_neg)
        self.gram_teacher = copy.deepcopy(self.teacher.backbone).requires_grad_(False).eval()
        self.gram_ready = torch.zeros((), dtype=torch.long)  # 1 once the first snapshot is taken
        self.gram_refreshes = torch.zeros((), dtype=torch.long)

    # --------------------------------------------------------------- Gram teacher
    def snapshot(self) -> None:
        """The Gram teacher := the EMA teacher's backbone (the official update_gram with m = 0)."""
        self.gram_teacher.load_state_dict(self.teacher.backbone.state_dict())

    def extra_loss(self, global_crops: torch.Tensor, masks: torch.Tensor, student_patches: torch.Tensor,
                   sched: dict[str, float]) -> tuple[torch.Tensor | float, dict[str, Any]]:
        g = self.section.gram
        if g.weight <= 0:
            return 0.0, {}
        if int(sched["it"]) >= g.load_at and not self.gram_ready:
            self.snapshot()
            self.gram_ready.fill_(1)
        if not self.gram_ready:
            return 0.0, {}
        crops = global_crops
        if g.high_res:
            size = [round(s * g.high_res) for s in global_crops.shape[-2:]]
            crops = F.interpolate(global_crops, size=size, mode="bicubic", align_corners=False)
        with torch.no_grad():
            prefix = self.gram_teacher.num_prefix_tokens
            tokens = self.gram_teacher(crops)[:, prefix:]
            grid = self.gram_teacher.patch_grid(crops)
            if tokens.shape[1] != student_patches.shape[1]:
                student_grid = self.gram_teacher.patch_grid(global_crops)
                fmap = tokens.transpose(1, 2).unflatten(-1, grid)
                tokens = F.interpolate(fmap.float(), size=student_grid, mode="bicubic",
                                       align_corners=False).flatten(-2).transpose(1, 2)
        student, teacher = student_patches, tokens
        if g.tokens != "all":
            keep = masks if g.tokens == "masked" else ~masks
            student, teacher = student[keep][None], teacher[keep][None]
        term = self.gram_loss(student, teacher)
        return g.weight * term, {"loss_gram": term.detach()}

    def after_optimizer_step(self, sched: dict[str, float]) -> None:
        """The EMA update, then the Gram teacher's refresh when one is due (the official loop's order)."""
        super().after_optimizer_step(sched)
        g, it = self.section.gram, int(sched["it"]) + 1
        due = (g.weight > 0 and bool(self.gram_ready) and it >= g.first_refresh and it % g.refresh_every == 0
               and (g.max_refreshes is None or int(self.gram_refreshes) < g.max_refreshes))
        if due:
            self.snapshot()
            self.gram_refreshes += 1

    # ------------------------------------------------------------------ state
    def sharded_modules(self) -> list[nn.Module]:
        return [*super().sharded_modules(), self.gram_teacher]  # sharded like the teacher: snapshots copy slices

    def extra_state(self) -> dict[str, torch.Tensor]:
        state = super().extra_state()
        state.update({f"gram_teacher.{k}": v for k, v in without_aliases(self.gram_teacher.state_dict()).items()})
        state.update(gram_ready=self.gram_ready, gram_refreshes=self.gram_refreshes)
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        gram = {k[len("gram_teacher."):]: v for k, v in state.items() if k.startswith("gram_teacher.")}
        super().load_extra_state(state)
        load_whole(self.gram_teacher, gram)
        self.gram_ready.copy_(state["gram_ready"])
        self.gram_refreshes.copy_(state["gram_refreshes"])
