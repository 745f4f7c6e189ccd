"""What the dense fine-tuning recipes share: the backbone (export -> ViTDet pyramid), dense data, optimiser groups,
evaluation every `eval.every_epochs` epochs, and prediction PNGs (docs/finetune.md).

A subclass (`finetune_m2f.Mask2FormerRecipe`, `finetune_vitdet.ViTDetRecipe`) builds the head on the pyramid, computes
the loss of one batch and turns network outputs into metric updates and overlays. Nothing is kept besides the student
(no EMA, no queues), so `extra_state` is empty and checkpoints are the engine's own.

Data: segmentation shards (`seg.png`, 255 = ignore; `inst.png` instance ids for instance tasks), e.g. `sslpipe shards
--dataset scenes`, through `sslpipe.data.dense` (the training view and its named deviation are described there).
`<method>.freeze_backbone` trains the pyramid and the head on a frozen trunk. The settings both heads read are a
`FinetuneConfig`; each method's section extends it with its head's.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field
from torch import Tensor, nn

from sslpipe.config import RunConfig, Section
from sslpipe.data.dense import DenseTransform, collate_dense
from sslpipe.data.seg_classes import segmentation_classes
from sslpipe.data.stream import build_loader
from sslpipe.heads.vitdet import (
    ViTDetBackbone,
    ViTDetPyramid,
    build_vitdet_pyramid,
    dense_param_groups,
)
from sslpipe.recipes.base import Recipe, note_export_replaces, shard_reading
from sslpipe.recipes.init_record import init_export_config, keep_init_record


def _jitter_range(value: tuple[float, float]) -> tuple[float, float]:
    """Scale jitter of the crop (LSJ goes above 1); a reversed range only fails inside the loader."""
    if not 0 < value[0] <= value[1]:
        raise ValueError(f"must be (low, high) with 0 < low <= high, got {list(value)}")
    return value


class FinetuneConfig(Section):
    """Dense fine-tuning (`method: finetune_mask2former` / `finetune_vitdet`; docs/finetune.md, docs/methods.md
    §5-6): the ViTDet trunk and pyramid and the training view. The backbone is `model.init_from` (an export: its
    architecture and weights; `backbone_init: random` keeps the architecture and drops the weights, the
    same-network baseline) or, when null, `model.arch` at random init. Defaults are the published values."""

    backbone_init: Literal["export", "random"] = "export"
    # null: the shards' manifest classes (instance: minus class 0 = background)
    num_classes: int | None = Field(None, gt=0)
    ignore_index: int = Field(255, ge=0)
    # training crop (square); also sizes the global blocks' relative-position tables
    img_size: int = Field(1024, gt=0)
    # scale jitter of the crop size (ViTDet LSJ 0.1-2.0)
    scale_range: Annotated[tuple[float, float], AfterValidator(_jitter_range)] = (0.1, 2.0)
    hflip: float = Field(0.5, ge=0, le=1)
    freeze_backbone: bool = False  # train the pyramid and head on a frozen ViT trunk (kept in eval mode)
    # ViTDet backbone (docs/methods.md §5)
    window_size: int = Field(14, ge=0)  # 0: every block global
    global_blocks: list[int] = [2, 5, 8, 11]
    use_rel_pos: bool = True
    pyramid_channels: int = Field(256, gt=0)
    layer_decay: float = Field(0.7, gt=0, le=1)  # lr x decay^(L + 1 - layer_id) inside the ViT
    backbone_lr_mult: float = Field(1.0, gt=0)  # extra lr factor of the ViT (Mask2Former: 0.1)


# a dense method reads only the normalisation of crops (at random init), and none of the kNN keys
DENSE_UNREAD = {
    **{f"crops.{key}": "dense fine-tuning crops <method>.img_size with its own scale jitter"
       for key in ("global_size", "local_size", "n_global", "n_local", "global_scale", "local_scale", "blur_sigma",
                   "blur_scale_with_size", "backend")},
    **{f"eval.{key}": "the evaluation is mIoU / AP, not a kNN probe"
       for key in ("knn_k", "knn_temperature", "max_train", "crop")},
    "model.sync_batchnorm": "the ViT has no BatchNorm",
    "train.compile": "train.compile is built for the teacher-student recipes",
    "train.compile_backend": "train.compile is built for the teacher-student recipes",
    "train.compile_scope": "train.compile is built for the teacher-student recipes",
    "train.health_every": "the health metrics are those of self-supervised embeddings",
}


# ------------------------------------------------------------------------------------------------------ backbone
def load_vit(cfg: RunConfig, img_size: int, *, init_weights: bool, run_dir: Path | None = None
             ) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    """The timm ViT to fine-tune and its normalisation: `model.init_from` (an export: its architecture and, when
    `init_weights`, its weights; mean/std from the export, as `run_dir` recorded it: `sslpipe.recipes.init_record`)
    or `model.arch` at random init (crops.mean/std). `model.drop_path_rate` is applied in both cases (ViTDet ViT-B:
    0.1)."""
    import timm
    from safetensors.torch import load_file

    from sslpipe.models.backbones import create_backbone

    m = cfg.model
    if m.init_from is None:
        vit = create_backbone(m.arch, img_size=img_size, patch_size=m.patch_size, drop_path_rate=m.drop_path_rate,
                              **m.kwargs)
        return vit, tuple(cfg.crops.mean), tuple(cfg.crops.std)
    export = init_export_config(cfg, run_dir)
    note_export_replaces(cfg, export)
    args = {**export["model_args"], "drop_path_rate": m.drop_path_rate}
    vit = timm.create_model(export["architecture"], pretrained=False, **args)
    if init_weights:
        path = Path(m.init_from)
        weights = path / "model.safetensors" if path.is_dir() else path
        try:
            vit.load_state_dict(load_file(str(weights)), strict=True)
        except RuntimeError as err:
            raise ValueError(f"model.init_from={m.init_from}: the weights do not fit {export['architecture']} "
                             f"with the export's model_args ({err}); re-export the run with `sslpipe export`") from err
    return vit, tuple(export["mean"]), tuple(export["std"])


# -------------------------------------------------------------------------------------------------------- recipe
class DenseFinetuneRecipe(Recipe):
    """Base of the fine-tuning recipes; subclasses set `normalize_images`, `needs_instances`, `backbone_prefix` and
    implement `build_head`, `step`, `eval_metric`, `eval_batch` and `overlays`."""

    normalize_images = True  # False: images stay in [0, 1] (the head normalises)
    backbone_prefix = ""  # dotted path of the ViTDetBackbone inside the student
    top_block = True  # the pyramid's stride-64 max-pooled level (Mask R-CNN's p6)
    decayed_norms: tuple[type[nn.Module], ...] = ()  # norm types that get weight decay (dense_param_groups)
    default_eval_batch = 8

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.accelerator = None
        self.run_dir: Path | None = None
        self.student: nn.Module
        self.device = torch.device("cpu")

    # ----------------------------------------------------------------- model
    @property
    def needs_instances(self) -> bool:
        return self.section.task == "instance"

    def classes(self) -> list[str]:
        """Class names from the manifests, checked against finetune.num_classes and the label values
        (`sslpipe.data.seg_classes`)."""
        f = self.section
        return segmentation_classes(self.cfg.data.train, f.num_classes, f"{self.config_key}.num_classes",
                                    val=self.cfg.data.val,
                                    ignore_index=f.ignore_index)

    def build_pyramid(self, from_checkpoint: bool = False) -> ViTDetPyramid:
        f = self.section
        vit, self.mean, self.std = load_vit(self.cfg, f.img_size, run_dir=self.run_dir,
                                            init_weights=not from_checkpoint and f.backbone_init == "export")
        try:
            return build_vitdet_pyramid(vit, window_size=f.window_size, global_blocks=f.global_blocks,
                                        use_rel_pos=f.use_rel_pos, img_size=f.img_size,
                                        out_channels=f.pyramid_channels, top_block=self.top_block)
        except ValueError as err:  # the keys it names live in this method's section
            raise ValueError(f"{self.config_key}: {err}") from None

    def build_head(self, pyramid: ViTDetPyramid) -> nn.Module:
        raise NotImplementedError

    def build_model(self, from_checkpoint: bool = False) -> nn.Module:
        """The whole network (no accelerator needed). `from_checkpoint` (`sslpipe predict`): the weights come from a
        checkpoint, the network and normalisation from the run's record of its export. With
        `<method>.freeze_backbone` the ViT trunk gets no gradient and always runs in eval mode (no drop path)."""
        self.class_names = self.classes()
        self.student = self.build_head(self.build_pyramid(from_checkpoint))
        if self.section.freeze_backbone:
            trunk = self.vit_trunk()
            trunk.requires_grad_(False)
            trunk.register_forward_pre_hook(_keep_in_eval_mode)
        return self.student

    def build(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.device = accelerator.device
        self.run_dir = Path(accelerator.project_dir) if accelerator.project_dir else None
        if accelerator.is_main_process:
            keep_init_record(self.cfg, self.run_dir)
        accelerator.wait_for_everyone()
        self.build_model()

    def model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.student) if self.accelerator is not None else self.student

    def vit_trunk(self) -> ViTDetBackbone:
        module = self.model()
        for part in self.backbone_prefix.split("."):
            module = getattr(module, part)
        return module

    def param_groups(self) -> list[dict[str, Any]]:
        f = self.section
        return dense_param_groups(self.student, backbone_prefix=self.backbone_prefix,
                                  num_layers=self.vit_trunk().num_layers, layer_decay=f.layer_decay,
                                  backbone_lr_mult=f.backbone_lr_mult, decayed_norms=self.decayed_norms)

    # ------------------------------------------------------------------ data
    def transform(self, train: bool) -> DenseTransform:
        f = self.section
        return DenseTransform(f.img_size, f.scale_range, f.hflip, self.mean, self.std, f.ignore_index, train=train,
                              eval_size=self.cfg.eval.resize, normalize=self.normalize_images,
                              need_inst=self.needs_instances)

    def train_loader(self, epoch: int, rank: int, world_size: int):
        d = self.cfg.data
        return build_loader(
            d.train, split=d.train_split, sample_fn=self.transform(train=True), collate_fn=collate_dense,
            batch_size=d.batch_size, num_workers=d.num_workers, epoch=epoch, seed=self.cfg.seed, rank=rank,
            world_size=world_size, shuffle=True, shuffle_buffer=d.shuffle_buffer, resampled=d.resampled,
            num_batches=self.steps_per_epoch(world_size), reading=shard_reading(d),
        )

    def eval_batches(self, spec: str | None = None, split: str | None = None,
                     max_images: int | None = None) -> Iterator[dict[str, Any]]:
        """Validation batches in shard order (one pass, no shuffling), at most `max_images` images."""
        d = self.cfg.data
        spec = spec or d.val
        if not spec:
            raise ValueError("evaluation needs data.val (segmentation shards with a val split)")
        loader = build_loader(spec, split=split or d.val_split, sample_fn=self.transform(train=False),
                              collate_fn=collate_dense, batch_size=self.cfg.eval.batch_size or self.default_eval_batch,
                              num_workers=0, shuffle=False,
                              drop_last=False, reading=shard_reading(d))
        seen = 0
        for batch in loader:
            if max_images is not None and seen + len(batch["keys"]) > max_images:
                keep = max_images - seen
                if keep <= 0:
                    return
                batch = {k: (v[:keep] if v is not None else None) for k, v in batch.items()}
            seen += len(batch["keys"])
            yield batch
            if max_images is not None and seen >= max_images:
                return

    def batch_size_of(self, batch: dict[str, Any]) -> int:
        return int(batch["images"].shape[0])

    # ---------------------------------------------------------------- engine
    def after_optimizer_step(self, sched: dict[str, float]) -> None:
        """Nothing: fine-tuning has no EMA or other per-step state."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise KeyError(f"a fine-tuning checkpoint has no extra state, got keys {sorted(state)[:5]}")

    def backbone(self, which: str = "teacher") -> nn.Module:
        """The fine-tuned ViT trunk (a ViTDetBackbone: windowed blocks, resized positions; not a plain timm model)."""
        return self.vit_trunk()

    # ------------------------------------------------------------ evaluation
    def eval_metric(self) -> Any:
        raise NotImplementedError

    def eval_batch(self, model: nn.Module, batch: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        """(predictions, targets) of one batch, in the metric's format, on the CPU."""
        raise NotImplementedError

    def overlays(self, batch: dict[str, Any], preds: list[Any], targets: list[Any]) -> list[list[Tensor]]:
        """Rows of uint8 (3, H, W) panels (image, ground truth, prediction) for the predictions PNG."""
        raise NotImplementedError

    def display_image(self, image: Tensor, size: tuple[int, int]) -> Tensor:
        """A batch image back to uint8 RGB at its valid size."""
        img = image[:, : size[0], : size[1]].detach().float().cpu()
        if self.normalize_images:
            img = img * torch.tensor(self.std).view(3, 1, 1) + torch.tensor(self.mean).view(3, 1, 1)
        return (img.clamp(0, 1) * 255).round().to(torch.uint8)

    @torch.no_grad()
    def run_evaluation(self, max_images: int | None = None, png: Path | None = None, n_png: int = 0,
                       spec: str | None = None, split: str | None = None, progress: bool = False) -> dict[str, Any]:
        """Metrics over the val split (and a predictions PNG of the first `n_png` images when `png` is given)."""
        from tqdm.auto import tqdm

        from sslpipe.viz.overlays import class_legend, save_rows

        model = self.model()
        was_training = model.training
        model.eval()
        metric, rows = self.eval_metric(), []
        try:
            for batch in tqdm(self.eval_batches(spec, split, max_images), desc="eval", disable=not progress,
                              unit="batch"):
                preds, targets = self.eval_batch(model, batch)
                metric.update(preds, targets)
                if png is not None and len(rows) < n_png:
                    rows += self.overlays(batch, preds, targets)[: n_png - len(rows)]
        finally:
            model.train(was_training)
        result = metric.compute()
        if png is not None and rows:
            save_rows(rows, png, legend=class_legend(self.class_names))
        return result

    def evaluate(self, epoch: int) -> dict[str, float]:
        """mIoU or AP on the val split by the main process (broadcast to all ranks); writes
        `RUN/eval/epoch_NNN.json` and the predictions PNG `RUN/predictions/epoch_NNN.png`."""
        from accelerate.utils import broadcast_object_list

        if not self.cfg.data.val:
            return {}
        metrics: list[Any] = [None]
        if self.accelerator is None or self.accelerator.is_main_process:
            e = self.cfg.eval
            png = self.run_dir / "predictions" / f"epoch_{epoch + 1:03d}.png" if self.run_dir else None
            result = self.run_evaluation(e.max_val, png, e.predict_images, progress=True)
            if self.run_dir is not None:
                out = self.run_dir / "eval" / f"epoch_{epoch + 1:03d}.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=1) + "\n")
            metrics = [self.flat_metrics(result)]
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            metrics = broadcast_object_list(metrics)
        return metrics[0]

    def flat_metrics(self, result: dict[str, Any]) -> dict[str, float]:
        """The loggable numbers of `run_evaluation`'s result."""
        return {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}


def _keep_in_eval_mode(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a frozen trunk: eval mode whatever the model's mode (no drop path, dropout or BN
    updates)."""
    module.eval()


def stack_or_none(items: list[Tensor] | None) -> Tensor | None:
    return torch.stack(items) if items is not None else None


def crop_resize_logits(logits: Tensor, valid: tuple[int, int], padded: tuple[int, int],
                       out: tuple[int, int]) -> Tensor:
    """Official post-processing of (Q, h, w) mask logits predicted on a padded input: upsample to the padded input
    size, keep the valid (unpadded) region, resize to the label's native size."""
    x = F.interpolate(logits[None], size=padded, mode="bilinear", align_corners=False)[..., : valid[0], : valid[1]]
    if tuple(x.shape[-2:]) != tuple(out):
        x = F.interpolate(x, size=out, mode="bilinear", align_corners=False)
    return x[0]
