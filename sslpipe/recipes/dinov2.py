"""DINOv2 (Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024): DINO's CLS
distillation + iBOT's masked-patch distillation with separate heads, KoLeo on the student's CLS tokens and
Sinkhorn-Knopp centering of the teacher (`sslpipe.losses.dinov2`), as in facebookresearch/dinov2
(dinov2/train/ssl_meta_arch.py, train/train.py, data/collate.py, utils/param_groups.py).

Shared with iBOT/DINO: the multi-crop views, the masked timm ViT, the heads, the EMA teacher, the schedules (teacher
temperature warm-up, cosine momentum, cosine weight decay). DINOv2's own: masks drawn per batch (`DINOv2Masks`),
LayerScale (`model.kwargs.init_values`), a uniform drop-path rate, registers (`model.kwargs.reg_tokens`), the lr
rule `optim.lr_scaling: sqrt_wrt_1024`, layer-wise lr decay and the patch-embedding lr multiplier
(`dinov2_param_groups`).

Deviations from the official code:
- augmentation: the published multi-crop (global crop 1 blurred with p 1, crop 2 with p 0.1 + solarize 0.2, local
  crops p 0.5, PIL's blur kernel). The official `GaussianBlur` passes 1 - p to `RandomApply`,
  so its global crops are blurred with p 0 and 0.9 (dinov2 PR #411), with a 9-pixel torchvision kernel;
- gradient clipping (`optim.clip_mode: global`, 3.0): one norm over the whole student; the official code clips
  the backbone and each head by its own norm;
- the last layers are frozen the first epoch by dropping their gradients (the trainer's rule for every recipe);
  the official code sets their lr to 0, so AdamW's moments still see those gradients;
- stochastic depth is timm's `DropPath` in every block at the same rate; the official blocks drop the residual of
  a random subset of the batch when the rate exceeds 0.1 (the same expectation, cheaper);
- numerics: KoLeo in float32 with lightly's diagonal fill (`sslpipe.losses.koleo`); Sinkhorn-Knopp as scalings
  of exp((t - max) / tau), which cannot overflow (`sslpipe.losses.sinkhorn`); without local crops the CLS pairs are
  averaged (`sslpipe.losses.dinov2`); the mask ratios' bins are float64 (the official collate's float32 linspace).
"""
from __future__ import annotations

import math
import random
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from timm.layers import DropPath
from torch import nn

from sslpipe.config import RunConfig
from sslpipe.data.collate import collate_multicrop, mask_batch_fields
from sslpipe.data.masking import MaskGenerator
from sslpipe.losses.dinov2 import DINOv2Loss
from sslpipe.losses.health import dense_health, embedding_health, health_metrics
from sslpipe.models.backbones import MaskedViT
from sslpipe.models.ema import disable_dropout
from sslpipe.models.heads import DINOHead
from sslpipe.models.packed_crops import crop_tokens
from sslpipe.recipes.multicrop import MultiCropRecipe, check_native_patch
from sslpipe.recipes.sections import HeadConfig, TeacherLossConfig, TeacherStudentConfig


class DINOv2HeadConfig(HeadConfig):
    """The CLS head's sizes plus the patch head's prototypes."""

    patch_out_dim: int = Field(8192, gt=0)


class DINOv2LossConfig(TeacherLossConfig):
    """Plus the patch centre's momentum (softmax centering); the temperature warms up per iteration (the official
    `CosineScheduler` over warmup_teacher_temp_epochs x the epoch length)."""

    temp_per_epoch: ClassVar[bool] = False
    center_momentum2: float = Field(0.9, ge=0, le=1)


class DINOv2Config(TeacherStudentConfig):
    """DINOv2 (`method: dinov2`, sslpipe/recipes/dinov2.py): what DINOv2 adds to DINO + iBOT. Defaults are
    facebookresearch/dinov2 dinov2/configs/ssl_default_config.yaml with the method switches of its train configs
    (train/vitl14.yaml, vitg14.yaml: separate heads, Sinkhorn-Knopp centering).

    The CLS head is `dinov2.head` (out_dim = `dino.head_n_prototypes`); the patch head has `head.patch_out_dim`
    prototypes and, where the `ibot_*` sizes are null, the CLS head's sizes. Temperatures and centre momenta:
    `dinov2.loss` (one teacher temperature for CLS and patches, as in the official code). LayerScale and registers
    are timm arguments (`model.kwargs: {init_values: 1.0e-5, reg_tokens: 4}`)."""

    key: ClassVar[str] = "dinov2"

    head: DINOv2HeadConfig = Field(default_factory=DINOv2HeadConfig)
    loss: DINOv2LossConfig = Field(default_factory=DINOv2LossConfig)

    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1  # on the student's backbone CLS tokens of each global crop, summed over crops
    separate_head: bool = True  # train/vitl14.yaml; ssl_default_config.yaml: false (the CLS head also maps patches)
    ibot_hidden_dim: int | None = Field(None, gt=0)  # null: head.hidden_dim
    ibot_bottleneck_dim: int | None = Field(None, gt=0)  # null: head.bottleneck_dim
    ibot_nlayers: int | None = Field(None, ge=1)  # null: head.nlayers
    centering: Literal["sinkhorn_knopp", "softmax"] = "sinkhorn_knopp"  # softmax: DINO/iBOT's centre + softmax
    sinkhorn_iterations: int = 3
    # collate_data_and_cast: int(mask_sample_probability * global crops in the batch) crops are masked, with ratios
    # drawn from linearly spaced bins over mask_ratio_min_max, block masks of at least mask_min_num_patches patches
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    mask_sample_probability: float = 0.5
    mask_min_num_patches: int = 4  # dinov2/data/masking.py MaskingGenerator default
    mask_min_aspect: float = 0.3
    # pad every batch's masked-patch indices to the sampler's bound (zero weight; the official collate's
    # `upperbound`, there for the heads only): the step's shapes then stay the same from batch to batch, which
    # whole-step compile and CUDA graphs need; the losses are unchanged (tested), the heads map the padding too
    pad_masked_patches: bool = False
    drop_path_uniform: bool = True  # the same drop-path rate in every block (timm: linear from 0)
    layerwise_decay: float = 0.9  # lr x decay^(L + 1 - layer_id) in the backbone (dinov2/utils/param_groups.py)
    patch_embed_lr_mult: float = 0.2

    @model_validator(mode="after")
    def _ranges(self) -> "DINOv2Config":
        lo, hi = self.mask_ratio_min_max
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"dinov2.mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {[lo, hi]}")
        if not 0.0 < self.mask_sample_probability <= 1.0:
            raise ValueError(f"dinov2.mask_sample_probability must be in (0, 1], got {self.mask_sample_probability}")
        if self.sinkhorn_iterations < 1:
            raise ValueError(f"dinov2.sinkhorn_iterations must be >= 1, got {self.sinkhorn_iterations}")
        return self

    @model_validator(mode="after")
    def _refuse_unread(self) -> "DINOv2Config":
        """The centre momenta are read by softmax centering only, the Sinkhorn iterations by Sinkhorn-Knopp only,
        the `ibot_*` head sizes with a separate patch head only."""
        key = self.key
        if self.centering == "sinkhorn_knopp":
            self.loss.refuse_unread_values(f"{key}.loss", dict.fromkeys(
                ("center_momentum", "center_momentum2"), f"{key}.centering=sinkhorn_knopp (no centre)"))
        else:
            self.refuse_unread_values(key, {"sinkhorn_iterations": f"{key}.centering=softmax"})
        if not self.separate_head:
            self.refuse_unread_values(key, dict.fromkeys(("ibot_hidden_dim", "ibot_bottleneck_dim", "ibot_nlayers"),
                                                         f"{key}.separate_head=false (the CLS head maps the patches)"))
        return self

    def check_run(self, run: RunConfig) -> None:
        super().check_run(run)
        check_native_patch(run)


class DINOv2Masks:
    """Patch masks of one batch of global crops as DINOv2's collate draws them (data/collate.py
    `collate_data_and_cast` with data/masking.py `MaskingGenerator`).

    Of n crops, int(n * probability) are masked; their ratios are drawn one per bin of `linspace(min, max, k + 1)`
    (so the batch covers the range evenly), each gives int(N * ratio) patches to a BEiT block mask with blocks of at
    least `min_num_patches` (4) patches; the other crops are unmasked; the list is shuffled. The block algorithm is
    `sslpipe.data.masking.MaskGenerator.block_mask` (iBOT's), which draws exactly as the official generator (tested
    mask for mask); the official per-block cap of (H // 2) * W patches never binds below a ratio of 1/2 on a grid of
    even height and binds lower on an odd one (7x7: 21 of 49 patches, 0.428); larger ratios are refused with the one
    that fits. Randomness: `rng` or python's `random`, which the stream seeds per worker and epoch.
    """

    def __init__(self, grid: tuple[int, int], ratio_min_max: tuple[float, float] = (0.1, 0.5),
                 probability: float = 0.5, min_num_patches: int = 4, min_aspect: float = 0.3,
                 rng: random.Random | None = None) -> None:
        self.grid = (int(grid[0]), int(grid[1]))
        self.n_tokens = self.grid[0] * self.grid[1]
        self.ratio_min_max = (float(ratio_min_max[0]), float(ratio_min_max[1]))
        self.probability = float(probability)
        cap = (self.grid[0] // 2) * self.grid[1]
        if int(self.n_tokens * self.ratio_min_max[1]) > cap:
            most = math.floor(1000 * cap / self.n_tokens) / 1000  # 0.5 on an even grid height, less on an odd one
            raise ValueError(f"DINOv2Masks: a mask ratio of {self.ratio_min_max[1]} on a {self.grid} patch grid asks "
                             f"for more than the official cap of {cap} patches per block: use "
                             f"dinov2.mask_ratio_min_max with a maximum of at most {most} on this grid")
        self._rng = rng if rng is not None else random
        self.generator = MaskGenerator(grid=self.grid, pred_ratio=0.0, pred_ratio_var=0.0, pred_shape="block",
                                       min_num_patches=min_num_patches, min_aspect=min_aspect, rng=self._rng)

    def ratio_bins(self, n_crops: int) -> list[tuple[float, float]]:
        """One (low, high) ratio bin per masked crop: int(n_crops * probability) bins spanning the ratio range."""
        edges = np.linspace(*self.ratio_min_max, int(n_crops * self.probability) + 1)
        return list(zip(edges[:-1], edges[1:]))

    def upper_bound(self, n_crops: int) -> int:
        """The most patches a batch of n_crops crops can have masked: int(N * the top of its bin) per masked crop
        (the official collate's ``upperbound``; the block masks never exceed the count they are asked for)."""
        return sum(int(self.n_tokens * high) for _, high in self.ratio_bins(n_crops))

    def fields(self, n_crops: int, pad: bool = False) -> dict[str, torch.Tensor]:
        """The batch keys of n_crops fresh masks (`mask_batch_fields`), padded to `upper_bound` when ``pad``."""
        return mask_batch_fields(self(n_crops), pad_to=self.upper_bound(n_crops) if pad else None)

    def __call__(self, n_crops: int) -> torch.Tensor:
        """bool (n_crops, H, W), True = masked."""
        masks = [self.generator.block_mask(int(self.n_tokens * self._rng.uniform(low, high)))
                 for low, high in self.ratio_bins(n_crops)]
        masks += [np.zeros(self.grid, dtype=bool) for _ in range(n_crops - len(masks))]
        self._rng.shuffle(masks)
        return torch.from_numpy(np.stack(masks))


class DINOv2Collate:
    """`collate_multicrop` plus the batch's masks (`DINOv2Masks` over its n_global * B global crops), their indices
    padded to the sampler's bound when ``pad``."""

    def __init__(self, masks: DINOv2Masks, pad: bool = False) -> None:
        self.masks, self.pad = masks, pad

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_multicrop(samples)
        batch.update(self.masks.fields(int(samples[0]["n_global"]) * len(samples), pad=self.pad))
        return batch


def uniform_drop_path(vit: nn.Module, rate: float) -> None:
    """DINOv2's `drop_path_uniform`: every block drops its two residual branches with the same probability (timm
    rises linearly from 0 in the first block to `rate` in the last)."""
    for block in vit.blocks:
        block.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()


def _layer_id(name: str, num_layers: int) -> int:
    """dinov2 `get_vit_lr_decay_rate`: embeddings and tokens 0, block i -> i + 1, anything after the blocks L + 1."""
    if any(key in name for key in ("pos_embed", "patch_embed", "mask_token", "cls_token", "reg_token")):
        return 0
    if ".blocks." in name:
        return int(name.split(".blocks.")[1].split(".")[0]) + 1
    return num_layers + 1


def dinov2_param_groups(net: nn.Module, layerwise_decay: float, patch_embed_lr_mult: float) -> list[dict[str, Any]]:
    """dinov2/utils/param_groups.py `get_params_groups_with_decay` for a `DINOv2Net`: in the backbone,
    lr_scale = layerwise_decay ** (L + 1 - layer_id), times `patch_embed_lr_mult` for the patch embedding; the
    heads 1. No weight decay on names ending in bias (the official rule, so Eva's q_bias / v_bias too) and on *norm*
    or *gamma* (LayerScale); the tokens and position embedding are decayed. Frozen parameters are left out."""
    num_layers = len(net.backbone.vit.blocks)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in net.named_parameters():
        if not param.requires_grad:
            continue
        scale = 1.0
        if name.startswith("backbone."):
            scale = layerwise_decay ** (num_layers + 1 - _layer_id(name, num_layers))
            if "patch_embed" in name:
                scale *= patch_embed_lr_mult
        decay = not (name.endswith("bias") or "norm" in name or "gamma" in name)
        groups.setdefault((scale, decay), []).append(param)
    return [{"params": params, "apply_wd": decay, "lr_scale": scale} for (scale, decay), params in groups.items()]


class DINOv2Net(nn.Module):
    """Masked ViT + CLS head (`dino_head`) + patch head (`ibot_head`, None when the CLS head maps patches too)."""

    def __init__(self, backbone: MaskedViT, dino_head: DINOHead, ibot_head: DINOHead | None, n_global: int = 2,
                 pack_crops: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head
        self.n_global, self.pack_crops = n_global, pack_crops

    def forward(self, global_crops: torch.Tensor, masks: torch.Tensor, mask_indices: torch.Tensor,
                local_crops: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(global CLS logits (GB, K), patch logits at the masked positions (M, Kp), local CLS logits or None,
        backbone CLS tokens of the global crops (GB, D), their patch tokens (GB, N, D): DINOv3's Gram anchoring).

        ``masks`` (GB, N) bool; ``mask_indices`` (M,) the masked positions in the flattened (GB * N) patch tokens
        (`mask_batch_fields`). The student (built with a mask token) sees the masked crops; the teacher (without
        one) sees them whole; both map the tokens at the masked positions. With `pack_crops` the global and local
        crops go through one pass of the blocks (`crop_tokens`)."""
        backbone = self.backbone
        mask = masks if backbone.mask_token is not None else None
        tokens, local_tokens = crop_tokens(backbone, global_crops, mask, local_crops, self.n_global, self.pack_crops)
        cls_tokens = tokens[:, 0]
        patches = tokens[:, backbone.num_prefix_tokens:].flatten(0, 1).index_select(0, mask_indices)
        cls_in = cls_tokens if local_tokens is None else torch.cat([cls_tokens, local_tokens[:, 0]])
        GB, n_cls = cls_tokens.shape[0], cls_in.shape[0]
        if self.ibot_head is None:  # one pass of the shared head over CLS and patch tokens
            out = self.dino_head(torch.cat([cls_in, patches]))
            cls_logits, patch_logits = out[:n_cls], out[n_cls:]
        else:
            cls_logits, patch_logits = self.dino_head(cls_in), self.ibot_head(patches)
        local_logits = cls_logits[GB:] if local_crops is not None else None
        return cls_logits[:GB], patch_logits, local_logits, cls_tokens, tokens[:, backbone.num_prefix_tokens:]


class DINOv2Recipe(MultiCropRecipe):
    """The DINOv2 recipe: `method: dinov2` in a YAML recipe."""

    config_key = "dinov2"
    config_section = DINOv2Config
    unread = {**MultiCropRecipe.unread, "model.sync_batchnorm": "its ViT has no BatchNorm"}
    cls_token_std = 1e-6  # dinov2 models/vision_transformer.py init_weights
    plain_last_layer = False  # the heads' last layer is weight-normalised (dinov2 layers/dino_head.py)

    def build_net(self, drop_path_rate: float, mask_token: bool) -> DINOv2Net:
        d = self.section
        h = d.head
        vit = self.build_backbone(drop_path_rate)
        if d.drop_path_uniform:
            uniform_drop_path(vit, drop_path_rate)
        if getattr(vit, "cls_token", None) is not None:
            nn.init.normal_(vit.cls_token, std=self.cls_token_std)  # create_backbone gives DINO's init
        backbone = MaskedViT(vit, mask_token=mask_token)
        last = dict(norm_last_layer=h.norm_last_layer, plain_last_layer=self.plain_last_layer)
        dino_head = DINOHead(backbone.embed_dim, h.out_dim, hidden_dim=h.hidden_dim, bottleneck_dim=h.bottleneck_dim,
                             nlayers=h.nlayers, **last)
        ibot_head = None
        if d.separate_head:
            ibot_head = DINOHead(backbone.embed_dim, h.patch_out_dim, hidden_dim=d.ibot_hidden_dim or h.hidden_dim,
                                 bottleneck_dim=d.ibot_bottleneck_dim or h.bottleneck_dim,
                                 nlayers=d.ibot_nlayers or h.nlayers, **last)
        elif h.patch_out_dim != h.out_dim:
            raise ValueError(f"dinov2.separate_head=false maps the patches with the CLS head: set "
                             f"dinov2.head.patch_out_dim to dinov2.head.out_dim ({h.out_dim}), got {h.patch_out_dim}")
        return DINOv2Net(backbone, dino_head, ibot_head, n_global=self.cfg.crops.n_global, pack_crops=d.pack_crops)

    def build(self, accelerator) -> None:
        self.accelerator = accelerator
        self.student = self.build_net(self.cfg.model.drop_path_rate, mask_token=True)
        self.start_from_export(self.student)
        # Teacher: no mask token, no drop path or dropout, initialised from the student (parameters present in both).
        self.teacher = disable_dropout(self.build_net(0.0, mask_token=False))
        student_state = self.student.state_dict()
        self.teacher.load_state_dict({k: student_state.get(k, v) for k, v in self.teacher.state_dict().items()})
        self.teacher.requires_grad_(False)
        self.teacher.to(accelerator.device)
        c, d = self.cfg.crops, self.section
        lc = d.loss
        self.loss = DINOv2Loss(
            d.head.out_dim, d.head.patch_out_dim, n_global=c.n_global, n_local=c.n_local,
            centering=d.centering, sinkhorn_iterations=d.sinkhorn_iterations, student_temp=lc.student_temp,
            center_momentum=lc.center_momentum, center_momentum2=lc.center_momentum2, dino_weight=d.dino_loss_weight,
            ibot_weight=d.ibot_loss_weight, koleo_weight=d.koleo_loss_weight, padded_rows=d.pad_masked_patches,
        ).to(accelerator.device)
        self.compile_forward_and_loss()

    def compile_forward_and_loss(self) -> None:
        """`train.compile_scope: step`: `forward_and_loss` compiled as one graph, once (shapes are static with
        `pad_masked_patches`, and the teacher temperature enters as a 0-d tensor); else the regional compile."""
        t = self.cfg.train
        self.forward_and_loss_fn = self.forward_and_loss
        self.teacher_temp: torch.Tensor | None = None
        if not (t.compile and t.compile_scope == "step"):
            self.compile_backbones(self.student, self.teacher)
            return
        if not self.section.pad_masked_patches:
            raise ValueError(f"train.compile_scope=step needs the same shapes in every batch: set "
                             f"{self.config_key}.pad_masked_patches=true (or train.compile_scope=blocks)")
        self.teacher_temp = torch.zeros((), device=self.accelerator.device)
        self.forward_and_loss_fn = torch.compile(self.forward_and_loss, backend=t.compile_backend, dynamic=False)

    def param_groups(self) -> list[dict[str, Any]]:
        d = self.section
        return dinov2_param_groups(self._unwrapped_student(), d.layerwise_decay, d.patch_embed_lr_mult)

    # ----------------------------------------------------------------- data
    def mask_sampler(self) -> DINOv2Masks:
        d = self.section
        return DINOv2Masks(self.patch_grid(), tuple(d.mask_ratio_min_max), d.mask_sample_probability,
                           min_num_patches=d.mask_min_num_patches, min_aspect=d.mask_min_aspect)

    def make_collate_fn(self, epoch: int) -> DINOv2Collate:
        return DINOv2Collate(self.mask_sampler(), pad=self.section.pad_masked_patches)

    def mask_fields(self, n_crops: int, epoch: int = 0) -> dict[str, torch.Tensor]:
        return self.mask_sampler().fields(n_crops, pad=self.section.pad_masked_patches)

    # ----------------------------------------------------------------- step
    def forward_and_loss(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None, masks: torch.Tensor,
                         indices: torch.Tensor, weights: torch.Tensor, temp: float | torch.Tensor
                         ) -> dict[str, torch.Tensor]:
        """The teacher's and the student's forwards and the DINOv2 loss (`DINOv2Loss` terms plus the outputs the
        rest of the step reads): what `train.compile_scope: step` compiles as one graph."""
        with torch.no_grad():
            teacher_cls, teacher_patch, _, teacher_feats, teacher_patches = self.teacher(global_crops, masks, indices)
        student_cls, student_patch, student_local_cls, student_feats, student_patches = self.student(
            global_crops, masks, indices, local_crops)
        out = self.loss(student_cls, teacher_cls, student_patch, teacher_patch, masks, student_feats, temp,
                        student_local_cls=student_local_cls, masks_weight=weights)
        return {**out, "teacher_cls": teacher_cls, "teacher_patch": teacher_patch, "teacher_feats": teacher_feats,
                "teacher_patches": teacher_patches, "student_cls": student_cls, "student_patch": student_patch,
                "student_feats": student_feats, "student_patches": student_patches}

    def step(self, batch: dict[str, Any], sched: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        global_crops, local_crops = self.crops_on_device(batch)
        device = self.accelerator.device
        masks, indices, weights = (batch[k].to(device, non_blocking=True)
                                   for k in ("masks", "mask_indices", "masks_weight"))
        masks = masks.flatten(1)
        temp = sched["teacher_temp"]  # one teacher temperature for CLS and patches, as in the official code
        # compiled: the temperature as a tensor filled in place (no copy from the host, no recompile as it warms up)
        temp_in = temp if self.teacher_temp is None else self.teacher_temp.fill_(temp)
        out = self.forward_and_loss_fn(global_crops, local_crops, masks, indices, weights, temp_in)
        student_cls, student_feats = out["student_cls"], out["student_feats"]
        loss, metrics = self.add_qscore(out["loss"], student_feats, student_cls)
        extra, extra_metrics = self.extra_loss(global_crops, masks, out["student_patches"], sched)
        loss = loss + extra
        # 0-d tensors: the trainer reads them only when it logs, so no device sync per step
        metrics |= {"loss_dino": out["dino"].detach(), "loss_ibot": out["ibot"].detach(),
                    "loss_koleo": out["koleo"].detach(), **extra_metrics}
        teacher_cls, teacher_patch, teacher_feats = out["teacher_cls"], out["teacher_patch"], out["teacher_feats"]
        if self.cfg.train.health_every and (int(sched["it"]) + 1) % self.cfg.train.health_every == 0:
            # entropies of softmax((t - C) / tau); with Sinkhorn-Knopp centering, of the sharpened logits before SK
            softmax = self.section.centering == "softmax"
            counted = weights > 0  # without the padding (a synchronisation, on the health steps only)
            metrics.update(health_metrics(
                teacher_cls=teacher_cls.float(), student_cls=student_cls.detach().float(),
                center=self.loss.center if softmax else None, teacher_temp=temp,
                student_temp=self.section.loss.student_temp, teacher_patch=teacher_patch[counted].float(),
                student_patch=out["student_patch"][counted].detach().float(),
                center2=self.loss.center2 if softmax else None, teacher_patch_temp=temp, masks=masks,
            ))
            metrics.update(embedding_health(teacher=teacher_feats, student=student_feats.detach()))
            metrics.update(dense_health(teacher_feats, out["teacher_patches"]))
        self.loss.record_center(teacher_cls, teacher_patch, weights)
        return loss, metrics

    def extra_loss(self, global_crops: torch.Tensor, masks: torch.Tensor, student_patches: torch.Tensor,
                   sched: dict[str, float]) -> tuple[torch.Tensor | float, dict[str, Any]]:
        """A term a method adds to DINOv2's on the student's patch tokens of the global crops (DINOv3's Gram
        anchoring); none here."""
        return 0.0, {}
