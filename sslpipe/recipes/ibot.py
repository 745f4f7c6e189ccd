"""iBOT: image BERT pre-training with an online tokenizer (Zhou et al., ICLR 2022), docs/methods.md §1.

The student sees the global crops with block masks (masked patch embeddings replaced by a learned mask token) and
the local crops unmasked; the EMA teacher sees the unmasked global crops. The loss distils the teacher's CLS
distribution across views (DINO) and its patch distributions at the masked positions of the same view (MIM with the
teacher as online tokenizer). Requires a timm ViT backbone. Settings: the `ibot` section (`IBOTConfig`).

Deviation, off by default: `ibot.pack_crops` runs the student's global and local crops in one pass of the blocks
(DINOv2's crop packing, `sslpipe.models.packed_crops`); drop path then draws once per image, not per crop.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from sslpipe.config import RunConfig, Section
from sslpipe.data.masking import MaskGenerator
from sslpipe.losses.health import embedding_health, health_metrics
from sslpipe.losses.ibot import IBOTLoss
from sslpipe.models.backbones import MaskedViT
from sslpipe.models.ema import disable_dropout
from sslpipe.models.heads import IBOTHead
from sslpipe.models.packed_crops import crop_tokens
from sslpipe.recipes.multicrop import MultiCropRecipe, check_native_patch, temperature_warmup
from sslpipe.recipes.sections import HeadConfig, TeacherLossConfig, TeacherStudentConfig


class IBOTHeadConfig(HeadConfig):
    """DINO's head plus the patch prototypes; `shared_head`: the patch tokens go through the CLS head's MLP and last
    layer (student, teacher; published ViT-S/16: both true)."""

    patch_out_dim: int = Field(8192, gt=0)
    shared_head: bool = True
    shared_head_teacher: bool = True


class IBOTLossConfig(TeacherLossConfig):
    """The patch term's teacher temperature (warmed up from `pred_start_epoch`), its centre momentum, and the
    weights of the CLS (`lambda1`) and patch (`lambda2`) terms."""

    warmup_teacher_patch_temp: float = Field(0.04, gt=0)
    teacher_patch_temp: float = Field(0.07, gt=0)
    center_momentum2: float = Field(0.9, ge=0, le=1)
    lambda1: float = 1.0
    lambda2: float = 1.0


class MaskingConfig(Section):
    """Block masks of the global crops (loader.py of iBOT): ratio lists are drawn per crop, docs/methods.md §1."""

    pred_ratio: float | list[float] = [0.0, 0.3]
    pred_ratio_var: float | list[float] = [0.0, 0.2]
    pred_shape: Literal["block", "rand"] = "block"
    pred_start_epoch: int = 0
    min_num_patches: int | None = None  # None: the official (min(H, W) // 3) ** 2, i.e. 16 on a 14x14 grid
    min_aspect: float = 0.3

    @model_validator(mode="after")
    def _valid_masks(self) -> "MaskingConfig":
        """The generator's own checks at load time, not when the first epoch's loader is built; block-only keys
        refused with random masks."""
        try:
            MaskGenerator(1, self.pred_ratio, self.pred_ratio_var, self.pred_shape, self.min_num_patches,
                          self.min_aspect, self.pred_start_epoch)
        except ValueError as err:
            raise ValueError(f"ibot.masking: {str(err).removeprefix('MaskGenerator: ')}") from None
        if self.pred_shape == "rand":
            self.refuse_unread_values("ibot.masking", dict.fromkeys(("min_num_patches", "min_aspect"),
                                                                    "ibot.masking.pred_shape=rand"))
        return self


class IBOTConfig(TeacherStudentConfig):
    """`ibot:` in a recipe; defaults are the published ViT-S/16 values."""

    head: IBOTHeadConfig = Field(default_factory=IBOTHeadConfig)
    loss: IBOTLossConfig = Field(default_factory=IBOTLossConfig)
    masking: MaskingConfig = Field(default_factory=MaskingConfig)

    def check_run(self, run: RunConfig) -> None:
        super().check_run(run)
        check_native_patch(run)


class IBOTNet(nn.Module):
    """Masked ViT + iBOT head. Global crops give CLS and patch logits; local crops only CLS logits."""

    def __init__(self, backbone: MaskedViT, head: IBOTHead, n_global: int = 2, pack_crops: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.n_global, self.pack_crops = n_global, pack_crops

    def forward(
        self,
        global_crops: torch.Tensor,
        masks: torch.Tensor | None = None,
        local_crops: torch.Tensor | None = None,
        mask_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(CLS logits, patch logits, local CLS logits or None, backbone CLS features of the global crops). With
        `mask_indices` (the masked positions of `masks`, flattened) patch logits are computed there only. With
        `pack_crops` the global and local crops go through one pass of the blocks (`crop_tokens`)."""
        prefix = self.backbone.num_prefix_tokens
        tokens, local_tokens = crop_tokens(self.backbone, global_crops, masks, local_crops, self.n_global,
                                           self.pack_crops)
        cls, patch = self.head(tokens, num_prefix_tokens=prefix, mask_indices=mask_indices)
        # Local crops contribute CLS terms only: the head sees their CLS token, not their patches.
        local_cls = self.head.forward_cls(local_tokens[:, 0]) if local_tokens is not None else None
        return cls, patch, local_cls, tokens[:, 0]


class IBOTRecipe(MultiCropRecipe):
    """The iBOT recipe: `method: ibot` in a YAML recipe."""

    uses_masks = True
    config_key = "ibot"
    config_section = IBOTConfig
    unread = {**MultiCropRecipe.unread, "model.sync_batchnorm": "its ViT has no BatchNorm"}

    def build_net(self, drop_path_rate: float, mask_token: bool, shared_head: bool) -> IBOTNet:
        h = self.section.head
        backbone = MaskedViT(self.build_backbone(drop_path_rate), mask_token=mask_token)
        head = IBOTHead(
            backbone.embed_dim, h.out_dim, h.patch_out_dim, shared_head=shared_head, hidden_dim=h.hidden_dim,
            bottleneck_dim=h.bottleneck_dim, nlayers=h.nlayers, norm_last_layer=h.norm_last_layer,
        )
        return IBOTNet(backbone, head, n_global=self.cfg.crops.n_global, pack_crops=self.section.pack_crops)

    def build(self, accelerator) -> None:
        self.accelerator = accelerator
        h = self.section.head
        self.student = self.build_net(self.cfg.model.drop_path_rate, mask_token=True, shared_head=h.shared_head)
        self.start_from_export(self.student)
        # Teacher: no mask token, no drop path or dropout, initialised from the student (parameters present in both).
        self.teacher = disable_dropout(self.build_net(0.0, mask_token=False, shared_head=h.shared_head_teacher))
        student_state = self.student.state_dict()
        teacher_state = self.teacher.state_dict()
        self.teacher.load_state_dict({k: student_state.get(k, v) for k, v in teacher_state.items()})
        self.teacher.requires_grad_(False)
        self.teacher.to(accelerator.device)
        lc = self.section.loss
        self.loss = IBOTLoss(
            h.out_dim, h.patch_out_dim, n_global=self.cfg.crops.n_global, n_local=self.cfg.crops.n_local,
            student_temp=lc.student_temp, center_momentum=lc.center_momentum, center_momentum2=lc.center_momentum2,
            lambda1=lc.lambda1, lambda2=lc.lambda2,
        ).to(accelerator.device)
        self.compile_backbones(self.student, self.teacher)

    def schedule(self, it: int, steps_per_epoch: int, total: int) -> dict[str, float]:
        """Plus the patch temperature, held at its warm-up value for `masking.pred_start_epoch` epochs and only then
        warmed up (iBOTLoss's `teacher_temp2_schedule`, per epoch; the CLS temperature starts at once)."""
        lo = self.section.loss
        return super().schedule(it, steps_per_epoch, total) | {"teacher_patch_temp": temperature_warmup(
            lo, it, steps_per_epoch, lo.warmup_teacher_patch_temp, lo.teacher_patch_temp,
            delay_epochs=self.section.masking.pred_start_epoch)}

    def step(self, batch: dict[str, Any], sched: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        global_crops, local_crops = self.crops_on_device(batch)
        masks, indices, weights = (batch[k].to(self.accelerator.device, non_blocking=True)
                                   for k in ("masks", "mask_indices", "masks_weight"))
        with torch.no_grad():
            teacher_cls, teacher_patch, _, teacher_feats = self.teacher(global_crops)
        student_cls, student_patch, student_local_cls, student_feats = self.student(
            global_crops, masks, local_crops, mask_indices=indices)
        flat_masks = masks.flatten(1)
        out = self.loss(
            student_cls, student_patch, teacher_cls, teacher_patch, flat_masks,
            teacher_temp=sched["teacher_temp"], teacher_patch_temp=sched["teacher_patch_temp"],
            student_local_cls=student_local_cls, mask_indices=indices, masks_weight=weights,
        )
        loss, metrics = self.add_qscore(out["loss"], student_feats, student_cls)
        # 0-d tensors: the trainer reads them only when it logs, so no device sync per step
        metrics |= {"loss_cls": out["cls"].detach(), "loss_patch": out["patch"].detach()}
        if self.cfg.train.health_every and (int(sched["it"]) + 1) % self.cfg.train.health_every == 0:
            metrics.update(health_metrics(
                teacher_cls=teacher_cls.float(), student_cls=student_cls.detach().float(),
                center=self.loss.center, teacher_temp=sched["teacher_temp"],
                student_temp=self.section.loss.student_temp,
                teacher_patch=teacher_patch.float(),
                student_patch=student_patch.detach().float(),  # the masked rows (IBOTHead with mask_indices)
                center2=self.loss.center2, teacher_patch_temp=sched["teacher_patch_temp"], masks=flat_masks,
            ))
            metrics.update(embedding_health(teacher=teacher_feats, student=student_feats.detach()))
        self.loss.record_center(teacher_cls, teacher_patch)
        return loss, metrics
