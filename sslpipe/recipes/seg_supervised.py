"""Supervised-only semantic segmentation on the labelled subset (`method: supervised_seg`): U2PL's baseline
(official `train_sup.py`, experiments/pascal/1464/suponly/config.yaml) and the base class of the U2PL recipe.

Same network as U2PL (sslpipe/models/segmentation.py, without the representation head, as the code's
`rep_head: False`), same labelled shards and augmentation (sslpipe/data/u2pl_views.py, the official one), loss =
CE(upsampled logits, label, ignore 255). Parameter groups: encoder lr x1, decoder lr x `head_lr_mult` (10 on
VOC); weight decay on every parameter (the code's SGD).
Evaluation every `eval.every_epochs` epochs on data.val: mIoU (metrics `mIoU`, `pixel_acc`, `iou/<class>`) by
the main process, broadcast to all, also written to RUN/eval/epoch_NNN.json; `eval.mode` whole (default) or slide
(windows of `eval.window`, null: crop_size, at a stride of `eval.stride_rate`).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import timm
import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field
from torch import Tensor, nn

from sslpipe.config import RunConfig, Section
from sslpipe.data.seg_classes import segmentation_classes
from sslpipe.data.semi import semi_loader
from sslpipe.data.stream import batches_per_epoch, build_loader, resolve_shards
from sslpipe.data.u2pl_views import U2PLSegTransform, check_scale_range
from sslpipe.models.backbones import is_vit_arch
from sslpipe.recipes.base import Recipe, note_export_replaces, shard_reading
from sslpipe.recipes.init_record import init_export_config, keep_init_record


class SegConfig(Section):
    """`supervised_seg:` in a recipe (and the base of `u2pl:`): the labelled data's classes, U2PL's training view
    and its DeepLabv3+ network. The network is model.arch (timm CNN or ViT) or the export model.init_from. Defaults:
    the published VOC values (experiments/pascal/1464/ours/config.yaml); docs/u2pl.md, docs/methods.md §3."""

    key: ClassVar[str] = "supervised_seg"

    num_classes: int | None = Field(None, gt=0)  # null: the classes of data.train's manifest
    ignore_index: int = Field(255, ge=0, le=255)
    crop_size: int = Field(513, gt=0)
    # official RandResize: the scale is uniform in [lo, 1] or in [1, hi], each with probability 1/2 (lo <= 1 <= hi)
    scale_range: Annotated[tuple[float, float], AfterValidator(check_scale_range)] = (0.5, 2.0)
    hflip: float = Field(0.5, ge=0, le=1)
    label_pad: int = Field(0, ge=0, le=255)  # label of the crop's padding: official Crop pads with 0; 255 = ignore
    # network: DeepLabv3+ (official dec_deeplabv3_plus)
    output_stride: Literal[8, 16, 32] = 8  # CNN encoders (dilated ResNet-101)
    decoder_channels: int = Field(256, gt=0)
    aspp_channels: int = Field(256, gt=0)
    aspp_dilations: list[Annotated[int, Field(gt=0)]] = [12, 24, 36]
    low_level_index: int = Field(1, ge=0)  # timm feature index of the stride-4 skip
    vit_high_stride: int = Field(16, gt=0)  # ViT encoders: the pyramid level fed to ASPP
    vit_window_size: int = Field(0, ge=0)
    vit_global_blocks: list[Annotated[int, Field(ge=0)]] = []
    head_lr_mult: float = Field(10.0, gt=0)  # decoder lr x10 (VOC; Cityscapes 1)

    def check_run(self, run: RunConfig) -> None:
        """The sliding-window keys are read only by `eval.mode=slide`; the encoder keys of the other kind of network
        are refused here when model.arch names it (for an export, when it is read: `refuse_encoder_keys`)."""
        if run.eval.mode != "slide":
            run.eval.refuse_unread_values("eval", dict.fromkeys(("window", "stride_rate"), "eval.mode=whole"))
        if not run.model.init_from and timm.is_model(run.model.arch):  # an unknown name fails in the build
            self.refuse_encoder_keys(run.model.arch, "model.arch")

    def refuse_encoder_keys(self, arch: str, source: str) -> None:
        """A ViT encoder reads the vit_* keys, a CNN output_stride and low_level_index; the others are refused."""
        vit = is_vit_arch(arch)
        keys = ("output_stride", "low_level_index") if vit else ("vit_high_stride", "vit_window_size",
                                                                 "vit_global_blocks")
        self.refuse_unread_values(self.key, dict.fromkeys(keys, f"{source}={arch} (a {'ViT' if vit else 'CNN'})"))


# a segmentation method reads only the normalisation of crops (at random init), and none of the kNN keys
SEG_UNREAD = {
    **{f"crops.{key}": "segmentation crops <method>.crop_size with U2PL's own augmentation"
       for key in ("global_size", "local_size", "n_global", "n_local", "global_scale", "local_scale", "blur_sigma",
                   "blur_scale_with_size", "backend")},
    **{f"eval.{key}": "the evaluation is mIoU at native size, not a kNN probe"
       for key in ("knn_k", "knn_temperature", "max_train", "crop", "resize", "predict_images")},
    "train.compile": "train.compile is built for the teacher-student recipes",
    "train.compile_backend": "train.compile is built for the teacher-student recipes",
    "train.compile_scope": "train.compile is built for the teacher-student recipes",
    "train.health_every": "the health metrics are those of self-supervised embeddings",
}


def upsample(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, align_corners=True (the official code's choice everywhere)."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


class SupervisedSegRecipe(Recipe):
    """`method: supervised_seg`."""

    config_key = "supervised_seg"
    config_section = SegConfig
    unread = SEG_UNREAD
    uses_unlabeled = False
    rep_head = False
    default_eval_batch = 8

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.accelerator = None
        self.device = torch.device("cpu")
        self.run_dir: Path | None = None
        self.class_names: list[str] = []
        self.num_classes = 0

    # ------------------------------------------------------------------ model
    def classes(self) -> list[str]:
        """Class names from the manifests, checked against <method>.num_classes and the label values
        (`sslpipe.data.seg_classes`)."""
        u = self.section
        return segmentation_classes(self.cfg.data.train, u.num_classes, f"{self.config_key}.num_classes",
                                    val=self.cfg.data.val, ignore_index=u.ignore_index)

    def build_model(self, from_checkpoint: bool = False) -> nn.Module:
        """The student network (no accelerator needed). Built from `model.init_from` as the run recorded it
        (`sslpipe.recipes.init_record`), with the export's normalisation; `from_checkpoint` (`sslpipe eval-seg`):
        without the export's weights, which come from a checkpoint."""
        from sslpipe.models.segmentation import build_segmentation_net

        m, u = self.cfg.model, self.section
        self.class_names = self.classes()
        self.num_classes = len(self.class_names)
        export = init_export_config(self.cfg, self.run_dir) if m.init_from else None
        if export is not None:
            note_export_replaces(self.cfg, export)
            u.refuse_encoder_keys(export["architecture"], "model.init_from")
        self.mean, self.std = (tuple(export["mean"]), tuple(export["std"])) if export is not None else (
            tuple(self.cfg.crops.mean), tuple(self.cfg.crops.std))
        kwargs = dict(m.kwargs)
        if m.drop_path_rate:
            kwargs["drop_path_rate"] = m.drop_path_rate
        self.student = build_segmentation_net(
            m.arch, self.num_classes, init_from=m.init_from, export_config=export, load_weights=not from_checkpoint,
            output_stride=u.output_stride, img_size=u.crop_size, patch_size=m.patch_size, model_kwargs=kwargs,
            channels=u.decoder_channels, aspp_channels=u.aspp_channels, dilations=u.aspp_dilations,
            rep_dim=u.rep_dim if self.rep_head else None, low_index=u.low_level_index,
            vit_high_stride=u.vit_high_stride, vit_window_size=u.vit_window_size,
            vit_global_blocks=u.vit_global_blocks)
        return self.student

    def build(self, accelerator: Any) -> None:
        from sslpipe.models.backbones import sync_batchnorm

        self.accelerator, self.device = accelerator, accelerator.device
        self.run_dir = Path(accelerator.project_dir) if accelerator.project_dir else None
        if accelerator.is_main_process:
            keep_init_record(self.cfg, self.run_dir)
        accelerator.wait_for_everyone()
        self.build_model()
        self.student = sync_batchnorm(self.student, enabled=self.cfg.model.sync_batchnorm,
                                      num_processes=accelerator.num_processes, device=accelerator.device)

    def model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.student) if self.accelerator is not None else self.student

    def param_groups(self) -> list[dict[str, Any]]:
        net = self.model()
        return [{"params": list(net.encoder.parameters()), "apply_wd": True, "lr_scale": 1.0},
                {"params": list(net.decoder.parameters()), "apply_wd": True,
                 "lr_scale": self.section.head_lr_mult}]

    # ------------------------------------------------------------------- data
    def transform(self, train: bool) -> U2PLSegTransform:
        u = self.section
        return U2PLSegTransform(u.crop_size, u.scale_range, u.label_pad, self.mean, self.std, hflip=u.hflip,
                                train=train)

    def unlabeled_batch_size(self) -> int:
        """Unlabelled images per batch (U2PL); the baseline reads none."""
        return 0

    def steps_per_epoch(self, world_size: int) -> int:
        """data.steps_per_epoch, else the unlabelled set (U2PL) or labelled set (baseline) over the global batch."""
        if not self.uses_unlabeled:
            return super().steps_per_epoch(world_size)
        d, u = self.cfg.data, self.section
        if not u.unlabeled:
            raise ValueError("method u2pl needs u2pl.unlabeled (unlabelled shards, e.g. OUT/unlabeled written by "
                             "`sslpipe shards --voc ... --labeled 1464`)")
        resolve_shards(d.train, d.train_split, shard_reading(d))  # the labelled shards must exist too
        return batches_per_epoch(u.unlabeled, u.unlabeled_split, self.unlabeled_batch_size(), world_size,
                                 d.steps_per_epoch, shard_reading(d))

    def train_loader(self, epoch: int, rank: int, world_size: int):
        d, u = self.cfg.data, self.section
        return semi_loader(labeled=d.train, labeled_split=d.train_split,
                           unlabeled=u.unlabeled if self.uses_unlabeled else None,
                           unlabeled_split=u.unlabeled_split if self.uses_unlabeled else "",
                           transform=self.transform(train=True),
                           batch_size=d.batch_size, unlabeled_batch_size=self.unlabeled_batch_size(),
                           num_batches=self.steps_per_epoch(world_size), epoch=epoch, seed=self.cfg.seed, rank=rank,
                           world_size=world_size, num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer,
                           resampled=d.resampled, reading=shard_reading(d))

    def batch_size_of(self, batch: dict[str, Any]) -> int:
        return int(batch["image_l"].shape[0]) + (int(batch["image_u"].shape[0]) if "image_u" in batch else 0)

    def eval_batches(self, spec: str | None = None, split: str | None = None) -> Iterator[tuple[list, list]]:
        """(images, labels) lists of the val split at native size, in shard order."""
        d = self.cfg.data
        spec = spec or d.val
        if not spec:
            raise ValueError("evaluation needs data.val (segmentation shards with a val split)")
        transform = self.transform(train=False)

        def sample(raw: dict[str, Any]) -> tuple[Tensor, Tensor]:
            if "seg" not in raw:
                raise ValueError(f"sample {raw['key']} of {raw['url']} has no seg.png: evaluation data must be "
                                 "segmentation shards (e.g. OUT/val of `sslpipe shards --voc/--semi`)")
            return transform(raw["image"], raw["seg"])

        loader = build_loader(spec, split=split or d.val_split, sample_fn=sample,
                              collate_fn=lambda s: ([x[0] for x in s], [x[1] for x in s]),
                              batch_size=self.cfg.eval.batch_size or self.default_eval_batch, num_workers=0,
                              shuffle=False,
                              drop_last=False, reading=shard_reading(d))
        yield from loader

    # ------------------------------------------------------------------- step
    def supervised_loss(self, pred: Tensor, label: Tensor) -> Tensor:
        return F.cross_entropy(upsample(pred.float(), label.shape[-2:]), label,
                               ignore_index=self.section.ignore_index)

    def step(self, batch: dict[str, Any], sched: dict[str, float]) -> tuple[Tensor, dict[str, float]]:
        out = self.student(batch["image_l"])
        loss = self.supervised_loss(out["pred"], batch["label_l"])
        return loss, {"loss/sup": loss.detach()}

    def after_optimizer_step(self, sched: dict[str, float]) -> None:
        """Nothing: no teacher."""

    def extra_state(self) -> dict[str, Tensor]:
        return {}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        if state:
            raise KeyError(f"a supervised_seg checkpoint has no extra state, got {sorted(state)[:5]}")

    def backbone(self, which: str = "teacher") -> nn.Module:
        enc = self.model().encoder
        return enc.model if hasattr(enc, "model") else enc.pyramid.backbone

    # ------------------------------------------------------------- evaluation
    def eval_model(self) -> nn.Module:
        return self.model()

    def evaluate(self, epoch: int) -> dict[str, float]:
        from accelerate.utils import broadcast_object_list

        from sslpipe.eval.seg_eval import evaluate_segmentation

        if not self.cfg.data.val:
            return {}
        metrics: list[Any] = [None]
        if self.accelerator is None or self.accelerator.is_main_process:
            e = self.cfg.eval
            result = evaluate_segmentation(
                self.eval_model(), self.eval_batches(), self.num_classes, class_names=self.class_names,
                ignore_index=self.section.ignore_index, mode=e.mode or "whole",
                crop=e.window or self.section.crop_size, stride_rate=e.stride_rate, device=self.device,
                max_images=e.max_val)
            if self.run_dir is not None:
                out = self.run_dir / "eval" / f"epoch_{epoch + 1:03d}.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=1) + "\n")
            metrics = [{"mIoU": result["mIoU"], "pixel_acc": result["pixel_acc"],
                        **{f"iou/{k}": v for k, v in result["per_class"].items()}}]
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            metrics = broadcast_object_list(metrics)
        return metrics[0]
