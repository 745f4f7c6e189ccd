"""Distillation of a frozen teacher into the model you deploy (`method: distill`): any export (an sslpipe run, or an
official DINO / iBOT / DINOv2 / MAE / timm backbone brought in with `sslpipe import`) teaches a student of any timm
architecture (ViT, ResNet, ConvNeXt, ...) on unlabelled images. docs/methods.md §10.

One view per image (`sslpipe.data.distill_views`): teacher and student see the same crop, mixed up with another image
of the batch (Beyer et al. 2022: "consistent" and "function matching"); each network gets it at its own size and
normalisation (the teacher's from its export): the loader crops at the larger of the two sizes and the smaller
network's input is resized from it on the device, so a teacher larger than the student sees the crop's own detail,
not the student's pixels upsampled. Terms, each optional:
- global: the student's pooled feature, through a linear projector to the teacher's width, against the teacher's
  [CLS] / pooled feature: soft pseudo-labels over a queue of teacher features (`global_loss: queue`, LightlyTrain's
  distillationv1, `sslpipe.losses.queue_distill`) or plain cosine (`cosine`, `sslpipe.losses.cosine_distill`);
- dense: the student's feature map, projected (1x1) and resampled to the teacher's patch grid, against the teacher's
  normalised patch tokens (`dense_loss: mse | cosine`, `sslpipe.losses.dense_distill`), for students that go on to
  detection or segmentation.
The teacher runs in eval mode under `torch.inference_mode`, in the run's precision, and is never saved: a checkpoint
records the sha256 of its tensors, and resuming refuses a teacher export whose weights have changed (the same weights
exported again, e.g. with `--onnx`, resume). The student exports like any other run
(`sslpipe export RUN`: the student; its model card names the teacher and the teacher's sha256).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from sslpipe.config import RunConfig, Section
from sslpipe.config.core import patch_multiples
from sslpipe.data.distill_views import ConsistentView, collate_views
from sslpipe.data.stream import build_loader, count_samples
from sslpipe.files import write_text_atomic
from sslpipe.losses.cosine_distill import cosine_distill_loss
from sslpipe.losses.dense_distill import dense_distill_loss
from sslpipe.losses.health import embedding_health
from sslpipe.losses.queue_distill import QueueDistillLoss
from sslpipe.models.backbones import create_backbone, sync_batchnorm
from sslpipe.recipes.base import Recipe, shard_reading
from sslpipe.recipes.knn_eval import periodic_knn
from sslpipe.recipes.multicrop import DENSE_EVAL_KEYS, check_native_patch, split_decay_groups
from sslpipe.weights.hashing import sha256_file, tensor_digest


class DistillConfig(Section):
    """`distill:` in a recipe. Defaults: LightlyTrain's distillationv1 (queue, temperature 0.07, mixup)."""

    teacher: str | None = None  # export folder of the frozen teacher (required)
    global_loss: Literal["queue", "cosine", "none"] = "queue"
    dense_loss: Literal["mse", "cosine", "none"] = "none"
    global_weight: float = Field(1.0, ge=0)
    dense_weight: float = Field(1.0, ge=0)
    # null: a quarter of the training set, as a power of two in [16, 8192] (ours)
    queue_size: int | None = Field(None, gt=0)
    temperature: float = Field(0.07, gt=0)
    mixup: bool = True  # a convex combination with another image of the batch, lambda ~ U(0, 1)
    hflip: float = Field(0.5, ge=0, le=1)
    # dense targets: the last N blocks of a ViT teacher, concatenated (LightlyTrain v2: 2)
    teacher_blocks: int = Field(1, ge=1)
    teacher_size: int | None = Field(None, gt=0)  # the teacher's input size; null: its export's image size

    @model_validator(mode="after")
    def _refuse_unread(self) -> "DistillConfig":
        unread = {}
        if self.global_loss != "queue":
            unread |= dict.fromkeys(("queue_size", "temperature"), f"distill.global_loss={self.global_loss}")
        if self.global_loss == "none":
            unread["global_weight"] = "distill.global_loss=none"
        if self.dense_loss == "none":
            unread |= dict.fromkeys(("dense_weight", "teacher_blocks"), "distill.dense_loss=none")
        self.refuse_unread_values("distill", unread)
        return self

    def check_run(self, run: RunConfig) -> None:
        super().check_run(run)
        check_native_patch(run)  # model.patch_size null: the student's own patch must tile the crops


def pooled_and_map(model: nn.Module, x: Tensor, blocks: int = 1) -> tuple[Tensor, Tensor]:
    """(pooled feature (B, D): a ViT's [CLS] after the final norm, a CNN's pooled map; feature map (B, C, h, w): the
    last `blocks` ViT blocks' patch tokens after the final norm, concatenated, or a CNN's last map) in one pass."""
    if hasattr(model, "forward_intermediates") and hasattr(model, "patch_embed"):
        tokens, maps = model.forward_intermediates(x, indices=blocks, norm=True, output_fmt="NCHW")
        return model.forward_head(tokens, pre_logits=True), torch.cat(maps, dim=1)
    if blocks != 1:
        raise ValueError(f"distill.teacher_blocks={blocks} needs a ViT teacher; a CNN gives its last map only")
    fmap = model.forward_features(x)
    if fmap.ndim != 4:
        raise ValueError(f"{type(model).__name__} gives no feature map ({tuple(fmap.shape)}): dense distillation "
                         "needs a ViT or a CNN")
    return model.forward_head(fmap, pre_logits=True), fmap


def normalize_pixels(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Images in [0, 1] (B, 3, H, W) -> normalised with a network's own statistics."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def _at_size(x01: Tensor, size: int) -> Tensor:
    """Square images in [0, 1] resized to `size` (bilinear, antialiased when shrinking), or as they are."""
    if x01.shape[-1] == size:
        return x01
    return F.interpolate(x01, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def auto_queue_size(n_images: int | None) -> int:
    """A quarter of the training set, rounded down to a power of two, in [16, 8192] and below the set's size (a set
    of 16 or fewer images: half of it, at least 1); 8192 when the size is unknown. Ours: LightlyTrain also scales its
    queue with the data set, by buckets that give 25-50 % of it (4096 for 10,000 images where this gives 2048)."""
    if not n_images:
        return 8192
    size = int(min(8192, max(16, 2 ** math.floor(math.log2(max(n_images // 4, 1))))))
    return size if size < n_images else max(1, n_images // 2)


class DistillStudent(nn.Module):
    """The trainable part: the timm backbone and its projectors to the teacher's widths (global, dense)."""

    def __init__(self, backbone: nn.Module, dim: int, global_dim: int | None, dense_dim: int | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.global_proj = nn.Linear(dim, global_dim) if global_dim else None
        self.dense_proj = nn.Conv2d(dim, dense_dim, 1) if dense_dim else None
        for proj in (self.global_proj, self.dense_proj):
            if proj is not None:
                nn.init.trunc_normal_(proj.weight, std=0.02)
                nn.init.zeros_(proj.bias)

    def forward(self, x: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """(projected pooled feature or None, projected map or None, the backbone's pooled feature)."""
        pooled, fmap = pooled_and_map(self.backbone, x)
        return (self.global_proj(pooled) if self.global_proj is not None else None,
                self.dense_proj(fmap) if self.dense_proj is not None else None, pooled)


class DistillRecipe(Recipe):
    """`method: distill`."""

    config_key = "distill"
    config_section = DistillConfig
    unread = {**DENSE_EVAL_KEYS,
              **{f"crops.{key}": "distillation shows one crop of crops.global_size (scale crops.global_scale)"
                 for key in ("local_size", "n_global", "n_local", "local_scale", "blur_sigma",
                             "blur_scale_with_size", "backend")},
              "model.init_from": "the student starts from random init; the teacher is distill.teacher",
              "train.compile": "train.compile is built for the teacher-student recipes",
              "train.compile_backend": "train.compile is built for the teacher-student recipes",
              "train.compile_scope": "train.compile is built for the teacher-student recipes"}

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        d = self.section
        if not d.teacher:
            raise ValueError("method distill needs distill.teacher: the export folder of the teacher (`sslpipe "
                             "export RUN` or `sslpipe import CHECKPOINT OUT`)")
        if d.global_loss == "none" and d.dense_loss == "none":
            raise ValueError("distill.global_loss and distill.dense_loss are both none: nothing to learn")
        self.accelerator = None
        self.student: nn.Module

    # ------------------------------------------------------------------ build
    def build(self, accelerator: Any) -> None:
        from sslpipe.weights.export import export_paths, load_backbone, read_export_config

        d, m, crops = self.section, self.cfg.model, self.cfg.crops
        self.accelerator = accelerator
        export = read_export_config(d.teacher)
        self.teacher = load_backbone(d.teacher).eval().requires_grad_(False).to(accelerator.device)
        weights = export_paths(d.teacher)[0]
        self.teacher_sha256, self.teacher_digest = sha256_file(weights), tensor_digest(weights)
        recorded = (export.get("sha256") or {}).get("model.safetensors")
        if recorded and recorded != self.teacher_sha256:
            raise ValueError(f"distill.teacher={d.teacher}: model.safetensors does not match the sha256 its "
                             "config.json records (damaged or replaced): export or import the teacher again")
        self.teacher_norm = (tuple(export["mean"]), tuple(export["std"]))
        self.teacher_size = d.teacher_size or int(export["img_size"])
        fixed = hasattr(self.teacher, "patch_embed") and not getattr(self.teacher, "dynamic_img_size", True)
        if fixed and self.teacher_size != int(export["img_size"]):
            raise ValueError(f"distill.teacher_size={self.teacher_size}: the teacher {d.teacher} is a ViT of fixed "
                             f"input size {export['img_size']} (no dynamic_img_size): remove distill.teacher_size")
        self._refuse_what_the_teacher_cannot_take(int(export["img_size"]))
        backbone = create_backbone(m.arch, img_size=crops.global_size, patch_size=m.patch_size,
                                   drop_path_rate=m.drop_path_rate, **m.kwargs)
        t_pooled, t_map = self._teacher_features(torch.zeros(1, 3, crops.global_size, crops.global_size,
                                                             device=accelerator.device))
        with torch.no_grad():  # the widths, from one blank image in eval mode (BatchNorm needs 2 in training)
            s_pooled, _ = pooled_and_map(backbone.eval(), torch.zeros(1, 3, crops.global_size, crops.global_size))
        backbone.train()
        student = DistillStudent(backbone, s_pooled.shape[-1],
                                 t_pooled.shape[-1] if d.global_loss != "none" else None,
                                 t_map.shape[1] if d.dense_loss != "none" else None)
        self.student = sync_batchnorm(student, enabled=m.sync_batchnorm, num_processes=accelerator.num_processes,
                                      device=accelerator.device)
        self.queue_loss = None
        if d.global_loss == "queue":
            data = self.cfg.data
            n_images = count_samples(data.train, data.train_split, shard_reading(data))
            if d.queue_size and n_images and d.queue_size >= n_images:
                raise ValueError(f"distill.queue_size={d.queue_size} is not smaller than the {n_images} training "
                                 "images: the queue would hold the same images again; lower it, or remove it for a "
                                 "quarter of the set")
            size = d.queue_size or auto_queue_size(n_images)
            self.queue_loss = QueueDistillLoss(t_pooled.shape[-1], size, d.temperature).to(accelerator.device)
        if accelerator.is_main_process and accelerator.project_dir:
            record = {"teacher": str(Path(d.teacher).resolve()), "architecture": export.get("architecture"),
                      "sha256": self.teacher_sha256, "tensor_digest": self.teacher_digest}
            write_text_atomic(Path(accelerator.project_dir) / "distill_teacher.json",
                              json.dumps(record, indent=1) + "\n")  # rewritten at every build: never left cut

    def _refuse_what_the_teacher_cannot_take(self, export_size: int) -> None:
        """distill.teacher_size that the ViT teacher's patches do not tile, and distill.teacher_blocks beyond its
        depth, in one line naming the key (timm would stop in `build` with a bare assertion)."""
        d = self.section
        embed = getattr(self.teacher, "patch_embed", None)
        patch = getattr(embed, "patch_size", None)
        if patch is not None and not getattr(embed, "dynamic_img_pad", False):
            step = int(patch[0]) if isinstance(patch, (tuple, list)) else int(patch)
            if self.teacher_size % step:
                raise ValueError(f"distill.teacher_size={self.teacher_size} is not a multiple of the {step} px patches "
                                 f"of the teacher {d.teacher}: set it to {patch_multiples(self.teacher_size, step)}, "
                                 f"or remove it for the export's "
                                 f"{export_size}")
        blocks = getattr(self.teacher, "blocks", None)
        if d.dense_loss != "none" and isinstance(blocks, nn.Sequential | nn.ModuleList) and \
                d.teacher_blocks > len(blocks):
            raise ValueError(f"distill.teacher_blocks={d.teacher_blocks}: the teacher {d.teacher} has {len(blocks)} "
                             f"block(s): set 1 to {len(blocks)}")

    def _teacher_features(self, x01: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's pooled feature and map of images in [0, 1], at its size and normalisation."""
        x01 = _at_size(x01, self.teacher_size)
        with torch.inference_mode():
            pooled, fmap = pooled_and_map(self.teacher, normalize_pixels(x01, *self.teacher_norm),
                                          self.section.teacher_blocks)
        return pooled.clone(), fmap.clone()  # plain tensors again: the loss may save them for backward

    def param_groups(self) -> list[dict[str, Any]]:
        return split_decay_groups(self.student)

    # ------------------------------------------------------------------- data
    def train_loader(self, epoch: int, rank: int, world_size: int):
        d, c = self.cfg.data, self.cfg.crops
        view = ConsistentView(max(c.global_size, self.teacher_size), c.global_scale, self.section.hflip)
        return build_loader(
            d.train, split=d.train_split, sample_fn=view,
            collate_fn=collate_views, batch_size=d.batch_size, num_workers=d.num_workers, epoch=epoch,
            seed=self.cfg.seed, rank=rank, world_size=world_size, shuffle=True, shuffle_buffer=d.shuffle_buffer,
            resampled=d.resampled, num_batches=self.steps_per_epoch(world_size), reading=shard_reading(d),
            pin_memory=self.accelerator is not None and self.accelerator.device.type == "cuda")

    def batch_size_of(self, batch: dict[str, Any]) -> int:
        return int(batch["labels"].shape[0])

    # ------------------------------------------------------------------- step
    def mixed(self, views: Tensor) -> Tensor:
        """uint8 views -> [0, 1] floats, mixed up with a permutation of the batch when `distill.mixup`."""
        x = views.float() / 255.0
        if not self.section.mixup:
            return x
        lam = float(torch.rand(1))
        return lam * x + (1.0 - lam) * x[torch.randperm(x.shape[0]).to(x.device)]

    def step(self, batch: dict[str, Tensor], sched: dict[str, float]) -> tuple[Tensor, dict[str, Any]]:
        d, crops = self.section, self.cfg.crops
        x = self.mixed(batch["views"].to(self.accelerator.device, non_blocking=True))
        t_pooled, t_map = self._teacher_features(x)
        s_global, s_dense, s_pooled = self.student(normalize_pixels(_at_size(x, crops.global_size), crops.mean,
                                                                    crops.std))
        loss, metrics = x.new_zeros(()), {}
        if s_global is not None:
            if self.queue_loss is not None:
                self.queue_loss.enqueue(self.accelerator.gather(t_pooled))
                term = self.queue_loss(s_global, t_pooled)
            else:
                term = cosine_distill_loss(s_global, t_pooled)
            loss = loss + d.global_weight * term
            metrics["distill/global"] = term.detach()
            metrics["distill/cosine"] = F.cosine_similarity(s_global.detach().float(), t_pooled.float()).mean()
        if s_dense is not None:
            term = dense_distill_loss(s_dense, t_map, d.dense_loss)
            loss = loss + d.dense_weight * term
            metrics["distill/dense"] = term.detach()
        if self.cfg.train.health_every and (int(sched["it"]) + 1) % self.cfg.train.health_every == 0:
            metrics |= embedding_health(teacher=t_pooled.float(), student=s_pooled.detach())
        return loss, metrics

    def after_optimizer_step(self, sched: dict[str, float]) -> None:
        """Nothing: the teacher is frozen."""

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Tensor]:
        state = {"teacher_digest": torch.tensor(list(bytes.fromhex(self.teacher_digest)), dtype=torch.uint8)}
        if self.queue_loss is not None:
            state["queue"] = self.queue_loss.queue
        return state

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        """Refuse a teacher whose weights differ from the run's: their tensor digest, or (a checkpoint of an older
        sslpipe, `teacher_sha256`) the sha256 of the model.safetensors file."""
        key, ours = (("teacher_digest", self.teacher_digest) if "teacher_digest" in state else
                     ("teacher_sha256", self.teacher_sha256))
        saved = bytes(state[key].tolist()).hex() if key in state else None
        if saved != ours:
            what = "tensors" if key == "teacher_digest" else "model.safetensors"
            raise ValueError(f"distill.teacher={self.section.teacher} is not the teacher this run started from (sha256 "
                             f"of its {what}: {ours[:12]}..., then {(saved or '?')[:12]}...); resume with the original "
                             "teacher export")
        if self.queue_loss is not None:
            self.queue_loss.queue.copy_(state["queue"])

    def backbone(self, which: str = "teacher") -> nn.Module:
        """The student's timm backbone whatever `which` says: the teacher is not this run's to export."""
        student = self.accelerator.unwrap_model(self.student) if self.accelerator is not None else self.student
        return student.backbone

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Weighted kNN of the student on the validation split, shared out over the processes."""
        return periodic_knn(self.cfg, self.backbone(), self.accelerator)
