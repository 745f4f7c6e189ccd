"""The contract between a training method (a recipe) and the method-agnostic trainer (docs/internals.md §5).

The trainer owns devices, mixed precision, the optimizer, schedules, gradient clipping, checkpoints and logging; a
recipe owns models, losses, data and what one step computes. A recipe never calls `backward` or `optimizer.step`.

A recipe declares its settings beside itself: `config_section` (a `sslpipe.config.Section`), read under the key
`config_key` (the method's name), and `unread`, the core keys it does not read (refused in a recipe, with why). A
run's schema is the core plus that one section (`sslpipe.recipes.registry`).

Order of calls made by `sslpipe.engine.trainer.train`:
1. `Recipe(cfg)`; 2. `build(accelerator)`; 3. `param_groups()` -> optimizer;
4. the trainer prepares `student` with Accelerate and assigns the prepared (possibly DDP-wrapped) module back to
   `recipe.student`: use `accelerator.unwrap_model(self.student)` when you need parameter names (EMA, export). Under
   an FSDP2 launch file it shards `sharded_modules()` in place instead (`sslpipe.engine.sharding`);
5. on resume: `load_extra_state(...)`; 6. per epoch `train_loader(epoch, rank, world_size)`; per iteration
   `schedule(...)` joins the trainer's lr and weight decay in `sched`; per batch `step(batch, sched)` under
   `accelerator.autocast()`; after clipping `before_optimizer_step(sched)`; after every optimizer step
   `after_optimizer_step(sched)`;
7. every `eval.every_epochs` epochs `evaluate(epoch)`; at each checkpoint `extra_state()`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from sslpipe.config import DataConfig, Section
from sslpipe.data.remote import Reading
from sslpipe.data.stream import batches_per_epoch


def shard_reading(data: DataConfig) -> Reading:
    """How the recipe's loaders read shards: `data.on_error` and the remote-read keys."""
    return Reading(on_error=data.on_error, retries=data.retries, retry_backoff=data.retry_backoff,
                   read_timeout=data.read_timeout, max_skipped_shards=data.max_skipped_shards,
                   verify_sha256=data.verify_sha256)


def note_export_replaces(cfg: Any, export: dict[str, Any]) -> None:
    """Dense fine-tuning from `model.init_from` builds the export's network with its normalisation; the recipe's
    model.arch / patch_size / kwargs and crops.mean / std apply only at random init. Say which of them the export
    overrides, so that a value the user set is not dropped without a word."""
    m, args = cfg.model, export.get("model_args", {})
    differ = [f"model.arch={m.arch} (the export: {export['architecture']})"] if m.arch != export["architecture"] else []
    if m.patch_size is not None and args.get("patch_size", m.patch_size) != m.patch_size:
        differ.append(f"model.patch_size={m.patch_size} (the export: {args['patch_size']})")
    differ += [f"model.kwargs.{k}={v} (the export: {args.get(k)})" for k, v in m.kwargs.items() if args.get(k) != v]
    differ += [f"crops.{key}={ours} (the export: {theirs})" for key, ours, theirs in _other_normalisation(cfg, export)]
    if differ:
        print(f"model.init_from={m.init_from}: the export's network and normalisation are used; not used: "
              + "; ".join(differ))


def _other_normalisation(cfg: Any, export: dict[str, Any]) -> list[tuple[str, list[float], list[float]]]:
    """(key, the recipe's, the export's) for crops.mean / crops.std where they differ from the export's."""
    pairs = [(key, list(getattr(cfg.crops, key)), list(export[key])) for key in ("mean", "std")]
    return [(key, ours, theirs) for key, ours, theirs in pairs
            if len(ours) != len(theirs) or any(abs(a - b) > 1e-6 for a, b in zip(ours, theirs))]


def continued_normalisation_notes(cfg: Any) -> list[str]:
    """Continued pretraining from `model.init_from` trains under the recipe's crops.mean / std: name where the export
    was trained under others, since its network then sees shifted inputs (set them to the export's to avoid it)."""
    from sslpipe.weights.export import read_export_config

    return [f"crops.{key}={ours} is used, the export was trained with {theirs}"
            for key, ours, theirs in _other_normalisation(cfg, read_export_config(cfg.model.init_from))]


class Recipe(ABC):
    """One training method. Subclasses get the validated `Config` and must be deterministic given `cfg.seed`."""

    student: nn.Module
    config_key: ClassVar[str | None] = None  # the method's section in a recipe, e.g. `dino`
    config_section: ClassVar[type[Section] | None] = None
    unread: ClassVar[dict[str, str]] = {}  # dotted core keys this method does not read -> why (or what instead)
    # DDP: True when some parameters may get no gradient in a step (Mask R-CNN's mask head in a step without a
    # positive proposal); costs an extra graph traversal per step, so only such recipes set it.
    ddp_find_unused_parameters: bool = False

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @abstractmethod
    def build(self, accelerator: Any) -> None:
        """Create `self.student` (trainable, left on the CPU: the trainer prepares it) and any non-trained state
        (EMA teacher, centres, queues) moved to `accelerator.device` by the recipe itself. Keep the accelerator if
        `step` needs the device. Global RNGs are seeded identically on all ranks at this point."""

    @abstractmethod
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups over the student's parameters: each dict has `params` and `apply_wd: bool`; groups with
        `apply_wd=False` always get weight decay 0, the others the scheduled weight decay."""

    @abstractmethod
    def train_loader(self, epoch: int, rank: int, world_size: int) -> Iterable[Any]:
        """Batches of one epoch for this rank, deterministic in (cfg.seed, epoch, rank): exact resume rebuilds the
        loader of the interrupted epoch and drops the batches already consumed. It must yield at least
        `steps_per_epoch(world_size)` batches, the same number on every rank."""

    @property
    def section(self) -> Any:
        """This method's own section of the config (`cfg.<config_key>`)."""
        return getattr(self.cfg, self.config_key)

    def steps_per_epoch(self, world_size: int) -> int:
        """Batches per epoch per rank (optimizer steps = this // train.grad_accum_steps); by default
        data.steps_per_epoch, else data.train's manifest count over the global batch."""
        d = self.cfg.data
        return batches_per_epoch(d.train, d.train_split, d.batch_size, world_size, d.steps_per_epoch,
                                 reading=shard_reading(d))

    @abstractmethod
    def step(self, batch: Any, sched: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward pass of one batch: returns the scalar loss to back-propagate and metrics to log (floats or 0-d
        tensors). `sched` holds lr, weight_decay, epoch, it and this recipe's `schedule` values. Update
        non-gradient state that depends on this batch (e.g. centres) here."""

    def schedule(self, it: int, steps_per_epoch: int, total: int) -> dict[str, float]:
        """This method's per-iteration values at iteration `it` of `total` (EMA momentum, teacher temperatures),
        merged into the `sched` that `step` receives and logged; none by default."""
        return {}

    def before_optimizer_step(self, sched: dict[str, float]) -> None:
        """Called after the gradients are clipped, before the optimizer steps (DINO's last-layer freeze)."""

    @abstractmethod
    def after_optimizer_step(self, sched: dict[str, float]) -> None:
        """Called once after each optimizer step, e.g. the EMA teacher update with `sched['momentum']`."""

    @abstractmethod
    def extra_state(self) -> dict[str, torch.Tensor]:
        """Everything besides the student and optimizer needed to resume exactly (teacher weights, centres, queues),
        as a flat dict of tensors: it is written with safetensors (no pickles), so no other types."""

    @abstractmethod
    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `extra_state()`; tensors arrive on the CPU, copy them into your own (device) tensors."""

    @abstractmethod
    def backbone(self, which: str = "teacher") -> nn.Module:
        """The plain backbone (a timm model) of the teacher or the student, for export and kNN probes."""

    def sharded_modules(self) -> list[nn.Module] | None:
        """The modules a sharded (FSDP2) run shards alike, the student first, or None when the method does not run
        sharded. Everything that reads one of them across processes (an EMA update, a snapshot) must then work on
        each process's slice."""
        return None

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Optional periodic evaluation (called on every process after epoch `epoch` when eval.every_epochs > 0);
        returns metrics to log, e.g. {'knn/top1_k20': 71.3}."""
        return {}

    def batch_size_of(self, batch: Any) -> int:
        """Images in `batch` on this process (for images/s); override when the batch is not a tensor or a dict with
        a `labels` tensor."""
        if isinstance(batch, torch.Tensor):
            return int(batch.shape[0])
        if isinstance(batch, dict) and isinstance(batch.get("labels"), torch.Tensor):
            return int(batch["labels"].shape[0])
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
            return int(batch[0].shape[0])
        raise TypeError(f"{type(self).__name__}.batch_size_of cannot size a {type(batch).__name__}: override it")
