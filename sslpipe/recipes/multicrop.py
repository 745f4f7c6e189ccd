"""What DINO, iBOT and DINOv2 share: multi-crop data, an EMA teacher with its schedules (momentum, teacher
temperature, last-layer freeze), checkpointed extra state, the Q-score term and the kNN hook.

A subclass builds `self.student` (one module whose forward does the whole student pass, so that DDP sees a single
forward per step), `self.teacher` and `self.loss`, and defines `step`. Everything about data, the teacher's EMA update,
the state to checkpoint and periodic kNN evaluation lives here once. Its settings are a `TeacherStudentConfig`
(`sslpipe.recipes.sections`) under the method's key.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from sslpipe.config import CropsConfig, RunConfig
from sslpipe.config.core import check_crops_fit_patch
from sslpipe.curves import cosine_schedule, warmed_up
from sslpipe.data.collate import MultiCropSample, collate_multicrop, mask_batch_fields
from sslpipe.data.device_views import DeviceMultiCropTransform, device_crops
from sslpipe.data.fast_views import FastMultiCropTransform, normalize_crops
from sslpipe.data.masking import MaskGenerator
from sslpipe.data.stream import build_loader
from sslpipe.data.views import MultiCropTransform
from sslpipe.losses.qscore import QScoreRegularizer
from sslpipe.models.backbones import create_backbone, is_eva_arch, is_vit_arch, native_patch_size
from sslpipe.models.ema import ema_update
from sslpipe.models.heads import cancel_last_layer_gradients
from sslpipe.models.packed_crops import CropAttention
from sslpipe.recipes.base import Recipe, continued_normalisation_notes, shard_reading
from sslpipe.recipes.knn_eval import periodic_knn
from sslpipe.recipes.sections import QScoreConfig, TeacherLossConfig, TeacherStudentConfig
from sslpipe.weights.sharded_state import load_whole
from sslpipe.weights.state_dict import without_aliases

# keys of the dense evaluations, which a method probed by kNN does not read
DENSE_EVAL_KEYS = {"eval.mode": "its evaluation is a kNN probe, not a segmentation",
                   "eval.window": "its evaluation is a kNN probe, not a sliding-window segmentation",
                   "eval.stride_rate": "its evaluation is a kNN probe, not a sliding-window segmentation",
                   "eval.predict_images": "it draws no predictions"}


def build_qscore(section: QScoreConfig) -> QScoreRegularizer | None:
    """The Q-score regulariser of a method's `qscore` section, or None when it is not enabled."""
    return QScoreRegularizer(**section.regularizer_args()) if section.enabled else None


def check_native_patch(run: RunConfig) -> None:
    """A method section's `check_run`: with model.patch_size null a ViT keeps its architecture's patch size (14 for
    `vit_*_patch14_dinov2`), which the crops must fit too. Checked when the recipe is loaded, before a run directory
    is written (timm's assertion otherwise fails at the first step and names no key)."""
    m = run.model
    if m.patch_size is None and (patch := native_patch_size(m.arch)) is not None:
        check_crops_fit_patch(run, patch, f"the patch size of model.arch={m.arch} (model.patch_size=null: the "
                                          f"architecture's own)")


def multicrop_from_config(crops: CropsConfig) -> MultiCropTransform | FastMultiCropTransform:
    """The multi-crop transform of a recipe's `crops` section, by `crops.backend`: the uint8 fast path
    (`fast_views`, normalised later on the device), the device path (`device_views`: parameters only, crops made
    on the accelerator) or the torchvision reference (`views`). Lives here, above the three crop modules, so that
    none of them imports another upward."""
    global_sigma, local_sigma = crops.blur_sigmas()
    if crops.backend in ("fast", "device"):
        return (FastMultiCropTransform if crops.backend == "fast" else DeviceMultiCropTransform)(
            global_size=crops.global_size, local_size=crops.local_size, n_global=crops.n_global,
            n_local=crops.n_local, global_scale=tuple(crops.global_scale), local_scale=tuple(crops.local_scale),
            blur_sigma=global_sigma, local_blur_sigma=local_sigma,
        )
    return MultiCropTransform(
        global_size=crops.global_size, local_size=crops.local_size, n_global=crops.n_global, n_local=crops.n_local,
        global_scale=tuple(crops.global_scale), local_scale=tuple(crops.local_scale), mean=crops.mean, std=crops.std,
        blur_sigma=global_sigma, local_blur_sigma=local_sigma,
    )


def split_decay_groups(module: nn.Module) -> list[dict[str, Any]]:
    """DINO/iBOT's rule (utils.get_params_groups): no weight decay on biases and 1-D parameters (norm weights);
    everything else, the (1, D) mask token and the CLS/position embeddings included, is decayed.

    Frozen parameters (e.g. a fixed weight-norm gain) are left out of the optimizer altogether.
    """
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim <= 1:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False}]


def temperature_warmup(loss: TeacherLossConfig, it: int, steps_per_epoch: int, start: float, end: float,
                       delay_epochs: int = 0) -> float:
    """A teacher temperature warmed up from `start` to `end` over `loss.warmup_teacher_temp_epochs` after
    `delay_epochs`: DINO's and iBOT's official `np.linspace(start, end, warmup_epochs)[epoch]` (once per epoch,
    `loss.temp_per_epoch`), DINOv2's linspace over the warm-up's iterations otherwise."""
    if loss.temp_per_epoch:
        return warmed_up(it // steps_per_epoch, start, end, int(loss.warmup_teacher_temp_epochs), delay=delay_epochs)
    return warmed_up(it, start, end, int(round(loss.warmup_teacher_temp_epochs * steps_per_epoch)),
                     delay=delay_epochs * steps_per_epoch)


def teacher_schedule(section: TeacherStudentConfig, it: int, steps_per_epoch: int, total: int) -> dict[str, float]:
    """The EMA momentum (cosine from `momentum_teacher` to `momentum_teacher_end`), the teacher temperature
    (`temperature_warmup`) and whether the last layer is still frozen (`last_layer_frozen`)."""
    lo = section.loss
    return {"momentum": cosine_schedule(it, section.momentum_teacher, section.momentum_teacher_end, total),
            "teacher_temp": temperature_warmup(lo, it, steps_per_epoch, lo.warmup_teacher_temp, lo.teacher_temp),
            "last_layer_frozen": float(it < int(round(section.freeze_last_layer_epochs * steps_per_epoch)))}


class MultiCropRecipe(Recipe):
    """Base of the teacher-student recipes; subclasses set `uses_masks` and build the networks."""

    uses_masks: bool = False
    unread = DENSE_EVAL_KEYS

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.accelerator = None
        self.student: nn.Module
        self.teacher: nn.Module
        self.loss: nn.Module
        # built here, not at the first step: an attribute that appears mid-run would recompile a compiled step
        self.qscore = build_qscore(self.section.qscore)

    # ----------------------------------------------------------------- data
    def patch_grid(self) -> tuple[int, int]:
        side = self.cfg.crops.global_size // self.patch_size()
        return side, side

    def patch_size(self) -> int:
        """The built student's patch size (model.patch_size may be null: the architecture's own)."""
        backbone = self._unwrapped_student().backbone
        return int(getattr(backbone, "vit", backbone).patch_embed.patch_size[0])

    def make_sample_fn(self, epoch: int) -> MultiCropSample:
        crops = multicrop_from_config(self.cfg.crops)
        masks = None
        if self.uses_masks:
            m = self.section.masking
            masks = MaskGenerator(
                grid=self.patch_grid(), pred_ratio=m.pred_ratio, pred_ratio_var=m.pred_ratio_var,
                pred_shape=m.pred_shape, min_num_patches=m.min_num_patches, min_aspect=m.min_aspect,
                pred_start_epoch=m.pred_start_epoch,
            )
            masks.set_epoch(epoch)
        return MultiCropSample(crops, masks)

    def make_collate_fn(self, epoch: int) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """The loader's batch collate (runs in the workers); DINOv2 draws its batch-level masks there."""
        return collate_multicrop

    def mask_fields(self, n_crops: int, epoch: int = 0) -> dict[str, torch.Tensor | None]:
        """The mask keys of a batch of `n_crops` global crops as the loader gives them (`masks` bool
        (n_crops, Hp, Wp), `mask_indices`, `masks_weight`), `masks` None for a recipe without masks (iBOT draws each
        crop's on its own, DINOv2 the batch's). What `sslpipe bench step` puts in its synthetic batch."""
        generator = self.make_sample_fn(epoch).mask_generator
        if generator is None:
            return {"masks": None}
        return mask_batch_fields(torch.from_numpy(np.stack([generator() for _ in range(n_crops)])))

    def train_loader(self, epoch: int, rank: int, world_size: int):
        d = self.cfg.data
        return build_loader(
            d.train, split=d.train_split, sample_fn=self.make_sample_fn(epoch), collate_fn=self.make_collate_fn(epoch),
            batch_size=d.batch_size, num_workers=d.num_workers, epoch=epoch, seed=self.cfg.seed, rank=rank,
            world_size=world_size, shuffle=True, shuffle_buffer=d.shuffle_buffer, resampled=d.resampled,
            num_batches=self.steps_per_epoch(world_size), reading=shard_reading(d),
            pin_memory=self.accelerator is not None and self.accelerator.device.type == "cuda",
        )

    def crops_on_device(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(global crops, local crops or None) on the accelerator's device, normalised there when they arrive as
        uint8 (the fast crop path: a quarter of the bytes through worker queues and host-to-device copies)."""
        c, device = self.cfg.crops, self.accelerator.device
        if batch.get("crop_params") is not None:  # crops.backend device: crop the decoded images here
            images = [image.to(device, non_blocking=True) for image in batch["images"]]
            sizes = [c.global_size] * c.n_global + [c.local_size] * c.n_local
            return device_crops(images, batch["crop_params"], sizes, c.n_global, c.mean, c.std)
        crops = [batch["global_crops"], batch["local_crops"]]
        return tuple(None if x is None else normalize_crops(x.to(device, non_blocking=True), c.mean, c.std)
                     for x in crops)

    def batch_size_of(self, batch: dict[str, Any]) -> int:
        return int(batch["labels"].shape[0])

    def add_qscore(self, loss: torch.Tensor, backbone_feats: torch.Tensor,
                   projections: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The SSL loss plus the Q-score regulariser when `qscore.enabled` (docs/methods.md §4,
        `sslpipe.losses.qscore`), on the student's global crops: their backbone CLS features (`qscore.features:
        backbone`, the paper's choice) or their head outputs (`projection`: the prototype logits). Returns (loss, the
        regulariser's metrics)."""
        if self.qscore is None:
            return loss, {}
        feats = backbone_feats if self.section.qscore.features == "backbone" else projections
        term, metrics = self.qscore(feats)
        return loss + term, metrics

    def start_from_export(self, net: nn.Module) -> None:
        """`model.init_from`: continued pretraining. The student's backbone starts from the export, tensor for tensor
        (its position grid resampled to crops.global_size by the export's rule; another patch size or architecture
        is refused), and its heads and mask token from the export's when it carries this method's and `init_heads`
        (else fresh); a note names crops.mean / std where they differ from the export's.
        Call before the teacher copies the student, so both start there."""
        from sslpipe.weights.export import load_export_into
        from sslpipe.weights.heads import fresh_note, load_heads

        path = self.cfg.model.init_from
        if not path:
            return
        notes = load_export_into(getattr(net.backbone, "vit", net.backbone), path)
        notes += (load_heads(net, path, self.config_key) if self.section.init_heads
                  else [f"{self.config_key}.init_heads=false: {fresh_note(net)}"])
        notes += continued_normalisation_notes(self.cfg)
        print(f"model.init_from={path}: backbone" + "".join(f"; {n}" for n in notes))

    def build_backbone(self, drop_path_rate: float) -> nn.Module:
        """The method's timm backbone at the global crop size. With `<method>.pack_crops` it is a ViT whose attention
        is `CropAttention`, so that the student's crops of both sizes can run through one pass of its blocks
        (`sslpipe.models.packed_crops`); refused where there is nothing to pack or the network cannot take it."""
        m, key = self.cfg.model, self.config_key
        packing = {}
        if self.section.pack_crops:
            if not is_vit_arch(m.arch):
                raise ValueError(f"{key}.pack_crops: {m.arch} is not a ViT, and only a ViT's blocks can run crops of "
                                 f"two sizes in one pass; set {key}.pack_crops=false")
            if self.cfg.crops.n_local == 0:
                raise ValueError(f"{key}.pack_crops: crops.n_local is 0, so there is nothing to pack with the global "
                                 f"crops; set {key}.pack_crops=false or add local crops")
            if is_eva_arch(m.arch):
                raise ValueError(f"{key}.pack_crops: {m.arch} is a timm Eva ViT (DINOv3's rotary position "
                                 f"embeddings), which runs its crops one size at a time; set {key}.pack_crops=false "
                                 f"or choose a ViT with learned positions")
            if "attn_layer" in m.kwargs:
                raise ValueError(f"model.kwargs.attn_layer and {key}.pack_crops both choose the ViT's attention: "
                                 f"remove attn_layer from model.kwargs, or set {key}.pack_crops=false")
            packing = {"attn_layer": CropAttention}
        backbone = create_backbone(m.arch, img_size=self.cfg.crops.global_size, patch_size=m.patch_size,
                                   drop_path_rate=drop_path_rate, **packing, **m.kwargs)
        if packing and not all(isinstance(getattr(b, "attn", None), CropAttention) for b in backbone.blocks):
            raise ValueError(f"{key}.pack_crops: the blocks of {m.arch} do not take timm's attn_layer (only "
                             f"`Block` does), so they cannot keep attention inside each crop; set "
                             f"{key}.pack_crops=false")
        return backbone

    def compile_backbones(self, *nets: nn.Module) -> None:
        """`train.compile` (`compile_scope: blocks`): compile each ViT block (or a CNN backbone whole) in place; names
        and state dicts are unchanged, so EMA, checkpoints and export see the same keys."""
        if not self.cfg.train.compile:
            return
        if self.cfg.train.compile_scope == "step":
            raise ValueError(f"train.compile_scope=step compiles the whole forward and loss of dinov2 and dinov3; "
                             f"{self.config_key} compiles its blocks: set train.compile_scope=blocks")
        for net in nets:
            backbone = getattr(net.backbone, "vit", net.backbone)
            for module in getattr(backbone, "blocks", [backbone]):
                module.compile(backend=self.cfg.train.compile_backend)

    # -------------------------------------------------------------- teacher
    def schedule(self, it: int, steps_per_epoch: int, total: int) -> dict[str, float]:
        return teacher_schedule(self.section, it, steps_per_epoch, total)

    def before_optimizer_step(self, sched: dict[str, float]) -> None:
        if sched["last_layer_frozen"]:
            cancel_last_layer_gradients(self.student)

    def _unwrapped_student(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.student) if self.accelerator is not None else self.student

    def after_optimizer_step(self, sched: dict[str, float]) -> None:
        """The teacher centre moves once per optimizer step, over all its batches (`sslpipe.losses.center`); the
        EMA teacher follows the student."""
        self.loss.update_center()
        ema_update(self.teacher, self._unwrapped_student(), sched["momentum"])

    def param_groups(self) -> list[dict[str, Any]]:
        return split_decay_groups(self.student)

    def sharded_modules(self) -> list[nn.Module]:
        return [self.student, self.teacher]

    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {f"teacher.{k}": v for k, v in without_aliases(self.teacher.state_dict()).items()}
        state.update({f"loss.{k}": v for k, v in self.loss.state_dict().items()})
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        teacher = {k[8:]: v for k, v in state.items() if k.startswith("teacher.")}
        missing, unexpected = load_whole(self.teacher, teacher, strict=False)
        aliases = set(self.teacher.state_dict()) - set(without_aliases(self.teacher.state_dict()))
        if unexpected or set(missing) - aliases:
            raise KeyError(f"checkpoint teacher state does not fit the recipe's teacher: missing "
                           f"{sorted(set(missing) - aliases)}, unexpected {sorted(unexpected)}")
        self.loss.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("loss.")})

    # ------------------------------------------------------------ evaluation
    def backbone(self, which: str = "teacher") -> nn.Module:
        """The plain timm model of the teacher or the student (what export saves and kNN probes)."""
        net = self.teacher if which == "teacher" else self._unwrapped_student()
        backbone = net.backbone
        return getattr(backbone, "vit", backbone)

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Weighted kNN of the teacher on the validation split (every `eval.every_epochs` epochs).

        Every process extracts its share of the train and val shards; the features are gathered and each process
        runs the same search, so all log and checkpoint the same value and the probe takes ~1/P of the time.
        """
        return periodic_knn(self.cfg, self.backbone("teacher"), self.accelerator)
