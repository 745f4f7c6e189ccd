"""DINO: self-distillation with no labels (Caron et al., ICCV 2021), docs/methods.md §2.

Student = backbone + DINO head on every crop; teacher = EMA of the student on the global crops only, with centring
and sharpening of its outputs (see `sslpipe.losses.dino`). timm ViTs (`vision_transformer`, `deit`, `eva`: built for
crops.global_size, any crop size) give their CLS token after the final norm, CNNs their pooled features; an
architecture without stochastic depth (VGG, DenseNet, ...) needs model.drop_path_rate=0, and one that timm builds
for a single input size (Swin, BEiT, LeViT, CoAtNet) fails on crops of any other size. Settings: the `dino`
section, a `TeacherStudentConfig` (`sslpipe.recipes.sections`; DINO's published values in recipes/dino_vit_small.yaml).

Deviation, off by default: `dino.pack_crops` runs a ViT student's global and local crops in one pass of the blocks
(DINOv2's crop packing, `sslpipe.models.packed_crops`); drop path then draws once per image, not per crop.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sslpipe.config import RunConfig
from sslpipe.losses.dino import DINOLoss
from sslpipe.losses.health import embedding_health, health_metrics
from sslpipe.models.backbones import MaskedViT, backbone_embed_dim, is_vit_arch, pooled_features, sync_batchnorm
from sslpipe.models.ema import disable_dropout
from sslpipe.models.heads import DINOHead
from sslpipe.models.packed_crops import crop_tokens
from sslpipe.recipes.multicrop import MultiCropRecipe, check_native_patch
from sslpipe.recipes.sections import TeacherStudentConfig


class DINOConfig(TeacherStudentConfig):
    """`dino:` in a recipe: head, teacher sharpening and centring, EMA momentum, last-layer freeze, Q-score."""

    def check_run(self, run: RunConfig) -> None:
        super().check_run(run)
        check_native_patch(run)


class DINONet(nn.Module):
    """Backbone + head over all crops; crops of one resolution go through the backbone in one batch."""

    def __init__(self, backbone: nn.Module, head: nn.Module, n_global: int = 2, pack_crops: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.n_global, self.pack_crops = n_global, pack_crops

    def forward(self, global_crops: torch.Tensor,
                local_crops: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(head logits of all crops, globals first; backbone features of the global crops): a ViT's CLS tokens (with
        `pack_crops` the global and local crops go through one pass of its blocks, `crop_tokens`), a CNN's pooled
        features."""
        if isinstance(self.backbone, MaskedViT):
            tokens = crop_tokens(self.backbone, global_crops, None, local_crops, self.n_global, self.pack_crops)
            feats = [t[:, 0] for t in tokens if t is not None]
        else:
            feats = [pooled_features(self.backbone, c) for c in (global_crops, local_crops) if c is not None]
        return self.head(torch.cat(feats)), feats[0]


class DINORecipe(MultiCropRecipe):
    """The DINO recipe: `method: dino` in a YAML recipe."""

    uses_masks = False
    config_key = "dino"
    config_section = DINOConfig

    def build_net(self, drop_path_rate: float) -> DINONet:
        m, h = self.cfg.model, self.section.head
        backbone = self.build_backbone(drop_path_rate)
        if is_vit_arch(m.arch):  # the official position-embedding interpolation for local crops
            backbone = MaskedViT(backbone, mask_token=False)
        head = DINOHead(
            backbone_embed_dim(backbone), h.out_dim, hidden_dim=h.hidden_dim, bottleneck_dim=h.bottleneck_dim,
            nlayers=h.nlayers, norm_last_layer=h.norm_last_layer,
        )
        return DINONet(backbone, head, n_global=self.cfg.crops.n_global, pack_crops=self.section.pack_crops)

    def build(self, accelerator) -> None:
        self.accelerator = accelerator
        self.student = self.build_net(self.cfg.model.drop_path_rate)
        self.start_from_export(self.student)
        # The official teacher is a second network without drop path or dropout, initialised from the student.
        self.teacher = disable_dropout(self.build_net(0.0))
        self.teacher.load_state_dict(self.student.state_dict())
        sync = dict(enabled=self.cfg.model.sync_batchnorm, num_processes=accelerator.num_processes,
                    device=accelerator.device)
        self.student = sync_batchnorm(self.student, **sync)
        self.teacher = sync_batchnorm(self.teacher, **sync)
        self.teacher.requires_grad_(False)
        self.teacher.to(accelerator.device)
        h, lo = self.section.head, self.section.loss
        self.loss = DINOLoss(h.out_dim, student_temp=lo.student_temp,
                             center_momentum=lo.center_momentum).to(accelerator.device)
        self.compile_backbones(self.student, self.teacher)

    def step(self, batch: dict[str, Any], sched: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cfg.crops
        global_crops, local_crops = self.crops_on_device(batch)
        with torch.no_grad():
            teacher_out, teacher_feats = self.teacher(global_crops)
        student_out, student_feats = self.student(global_crops, local_crops)
        loss = self.loss(student_out, teacher_out, teacher_temp=sched["teacher_temp"],
                         n_crops=c.n_global + c.n_local, n_global=c.n_global)
        loss, metrics = self.add_qscore(loss, student_feats, student_out[: global_crops.shape[0]])
        if self.cfg.train.health_every and (int(sched["it"]) + 1) % self.cfg.train.health_every == 0:
            metrics |= health_metrics(
                teacher_cls=teacher_out.float(), student_cls=student_out[: global_crops.shape[0]].detach().float(),
                center=self.loss.center, teacher_temp=sched["teacher_temp"],
                student_temp=self.section.loss.student_temp,
            )
            metrics |= embedding_health(teacher=teacher_feats, student=student_feats.detach())
        self.loss.record_center(teacher_out)
        return loss, metrics
