"""U2PL: semi-supervised semantic segmentation using unreliable pseudo-labels (Wang et al., CVPR 2022; official
Haochen-Wang409/U2PL @ab3d2be `train_semi.py` 234-548; docs/methods.md §3; docs/u2pl.md).

One step (epoch t of T, iteration it):
- t < sup_only_epoch: L = CE on the labelled images (the representation head enters with weight 0, as in the code,
  so DDP sees every parameter used).
- otherwise: the EMA teacher (eval mode) labels the clean unlabelled images: p = softmax(upsampled logits), pseudo-label
  = argmax p, confidence = max p (padding: no label). With probability cutmix_p the batch is CutMixed
  (sslpipe/data/cutmix.py: image, pseudo-label, confidence and the diagnostic ground truth move together). The student
  runs on [labelled; unlabelled]; the teacher (no grad, train mode as in the code) on the same batch gives
  probabilities, entropy and representations.
  L = L_s + unsup_weight * L_u + contrastive_weight * L_c (sslpipe/losses/u2pl_unsup.py, u2pl_contrastive.py).
- after each optimizer step (`update_teacher`, as train_semi.py): during epoch sup_only_epoch the teacher's parameters
  are the student's; from the next epoch on teacher <- EMA with decay min(1 - 1/(it - sup_only_iters + 1), ema_decay).
  Parameters only: the teacher's BatchNorm statistics come from its own train-mode passes, as in the code.

Diagnostics (metrics of the step, logged every train.log_every steps): loss/sup, loss/unsup, loss/contrastive (L_s,
L_u, L_c unweighted), pseudo/reliable_frac (share of the unlabelled pixels the entropy filter keeps), pseudo/confidence,
queue_fill/<class> (queue size / capacity), and, when the unlabelled shards carry seg.png (`truth_u` of the batch),
pseudo/acc, pseudo/acc_kept and pseudo/recall/<class> (`pseudo_label_metrics`). The ground truth only enters these
metrics, never a loss (tested: identical loss and gradients with the true, a shuffled or no ground truth).

State (`extra_state`, flat tensors): `teacher.*` (weights and buffers), `queue.<c>` (the per-class FIFO queues of
negative keys, gathered over processes so every rank holds the same) and `teacher_ready`.
Evaluation uses the student before sup_only_epoch and the teacher after (as the code).

Named deviations from the code (besides those of the losses' docstrings):
- at the first U2PL step the teacher also takes the student's BatchNorm statistics; the code's teacher keeps those
  it gathered in train mode with its own initial weights during the supervised-only epochs (replaced at momentum 0.1
  by its later train-mode passes), so its first eval-mode pseudo-labels come from mismatched statistics;
- pixels of an unlabelled crop that are padding get no pseudo-label (the code labels the padding);
- the teacher's dropout is off (`build_teacher`); the code runs its teacher in train mode with Dropout2d(0.1);
- λ_c = u2pl.contrastive_weight, default 0.1 (the paper's value per the maintainer, issue #57; the code uses 1, but
  it divides an all-reduced loss by the world size and the all-reduce carries no gradient, so on its published 4
  GPUs the term's gradient weight is 1/4; the logged value is unscaled). sslpipe's λ_c weights the gradient as set.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from sslpipe.config import RunConfig
from sslpipe.data.cutmix import apply_cutmix, cutmix_masks
from sslpipe.losses.u2pl_contrastive import U2PLContrastiveLoss, entropy_split, low_entropy_percent
from sslpipe.losses.u2pl_unsup import IGNORE_INDEX, drop_percent_at, entropy_map, unsupervised_loss
from sslpipe.models.ema import build_teacher, ema_update
from sslpipe.models.memory_queue import ClassQueues
from sslpipe.recipes.seg_supervised import SegConfig, SupervisedSegRecipe, upsample


def downsample_nearest(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, W) integer/bool map -> (B, h, w) by nearest (the code's `F.interpolate(mode="nearest")`)."""
    y = F.interpolate(x[:, None].float(), size=size, mode="nearest")[:, 0]
    return y.bool() if x.dtype == torch.bool else y.to(x.dtype)


def ema_decay_at(it: int, sup_only_iters: int, ema_decay: float = 0.99) -> float:
    """The official EMA decay min(1 - 1/(it - sup_only_iters + 1), ema_decay) (0, 1/2, 2/3, ... from the first U2PL
    iteration; `update_teacher` uses it from the epoch after sup_only_epoch on)."""
    return max(0.0, min(1.0 - 1.0 / (it - sup_only_iters + 1), ema_decay))


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, epoch: int, it: int, sup_only_epoch: int,
                   sup_only_iters: int, ema_decay: float) -> None:
    """The teacher after the optimizer step of iteration `it` (train_semi.py, `train`):
    - epoch < sup_only_epoch: unchanged;
    - epoch == sup_only_epoch: the student's parameters. The code sets `t_params.data = s_params.data` before every
      forward of that epoch, so the teacher shares the student's storage, the optimizer step moves both, and the
      EMA after it (decay 0, 1/2, 2/3, ...) averages the student with itself: the teacher *is* the student;
    - later: decay * teacher + (1 - decay) * student, decay = `ema_decay_at(it, sup_only_iters, ema_decay)`.
    Parameters only, as the code (BatchNorm statistics are the teacher's own)."""
    if epoch < sup_only_epoch:
        return
    decay = 0.0 if epoch == sup_only_epoch else ema_decay_at(it, sup_only_iters, ema_decay)
    ema_update(teacher, student, decay)


def pseudo_label_metrics(pseudo: Tensor, kept: Tensor, truth: Tensor, class_names: list[str]) -> dict[str, Tensor]:
    """Pseudo-labels (B, H, W; 255 = none) against the ground truth of the unlabelled images (255 = unknown): pixel
    accuracy over the pixels having both (`pseudo/acc`), over those the entropy filter keeps (`pseudo/acc_kept`), and
    per class present in the truth, the share of its pixels labelled with it (`pseudo/recall/<class>`). Empty when
    no pixel has both. A diagnostic: its inputs carry no gradient and its outputs enter no loss."""
    known = (truth != IGNORE_INDEX) & (pseudo != IGNORE_INDEX)
    n_known = int(known.sum())
    if n_known == 0:
        return {}
    hit = known & (pseudo == truth)
    metrics = {"pseudo/acc": hit.sum() / n_known}
    if bool((known & kept).any()):
        metrics["pseudo/acc_kept"] = (hit & kept).sum() / (known & kept).sum()
    n = len(class_names)
    total = torch.bincount(truth[known], minlength=n)[:n]
    correct = torch.bincount(truth[hit], minlength=n)[:n]
    for c in torch.nonzero(total).flatten().tolist():
        metrics[f"pseudo/recall/{class_names[c]}"] = correct[c] / total[c]
    return metrics


class U2PLConfig(SegConfig):
    """`u2pl:` in a recipe: the supervised settings plus the unlabelled data, the EMA teacher and the two
    unsupervised terms. data.train = labelled shards (seg.png), `unlabeled` = unlabelled shards, data.val = val.
    Defaults: the published VOC values, except contrastive_weight (the paper's 0.1); docs/methods.md §3."""

    key: ClassVar[str] = "u2pl"

    unlabeled: str | None = None  # unlabelled shards (image only); required
    unlabeled_split: str = "train"
    unlabeled_ratio: float = Field(1.0, gt=0)  # unlabelled images per labelled image in a batch (official 4 + 4)
    rep_dim: int = Field(256, gt=0)  # the representation head's width
    # teacher and schedule
    sup_only_epoch: int = Field(1, ge=0)
    ema_decay: float = Field(0.99, ge=0, le=1)  # decay = min(1 - 1/(it - sup_only_iters + 1), ema_decay)
    # unsupervised loss on reliable pseudo-labels
    unsup_weight: float = Field(1.0, ge=0)
    drop_percent: float = Field(80.0, ge=0, le=100)
    cutmix: bool = True
    cutmix_p: float = Field(0.5, ge=0, le=1)
    # contrastive loss on unreliable pixels
    contrastive: bool = True
    contrastive_weight: float = Field(0.1, ge=0)  # paper (maintainer, issue #57); official code 1.0
    current_class_threshold: float = Field(0.3, ge=0, le=1)
    low_entropy_threshold: float = Field(20.0, ge=0, le=100)
    low_rank: int = Field(3, ge=0)
    high_rank: int = Field(20, gt=0)
    num_queries: int = Field(256, gt=0)
    num_negatives: int = Field(50, gt=0)
    temperature: float = Field(0.5, gt=0)
    queue_size: int = Field(30000, gt=0)
    background_queue_size: int = Field(50000, gt=0)  # class 0

    @model_validator(mode="after")
    def _ranks(self) -> "U2PLConfig":
        if self.low_rank >= self.high_rank:
            raise ValueError(f"u2pl.low_rank ({self.low_rank}) must be below u2pl.high_rank ({self.high_rank})")
        return self

    def check_run(self, run: RunConfig) -> None:
        """CutMix's probability is read only with cutmix on, the contrastive term's keys only with it on."""
        super().check_run(run)
        if not self.cutmix:
            self.refuse_unread_values("u2pl", {"cutmix_p": "u2pl.cutmix=false"})
        if not self.contrastive:
            self.refuse_unread_values("u2pl", dict.fromkeys(CONTRASTIVE_KEYS, "u2pl.contrastive=false"))


# read only by the contrastive term (the representation head is built either way: rep_dim stays read)
CONTRASTIVE_KEYS = ("contrastive_weight", "current_class_threshold", "low_entropy_threshold", "low_rank", "high_rank",
                    "num_queries", "num_negatives", "temperature", "queue_size", "background_queue_size")


class U2PLRecipe(SupervisedSegRecipe):
    """`method: u2pl`."""

    config_key = "u2pl"
    config_section = U2PLConfig
    uses_unlabeled = True
    rep_head = True

    def build(self, accelerator: Any) -> None:
        super().build(accelerator)
        u = self.section
        self.teacher = build_teacher(self.student).to(self.device)
        caps = [u.queue_size] * self.num_classes
        caps[0] = u.background_queue_size
        self.queues = ClassQueues(self.num_classes, u.rep_dim, caps, device=self.device)
        self.contrastive = U2PLContrastiveLoss(
            self.num_classes, u.current_class_threshold, u.low_rank, u.high_rank, u.num_queries, u.num_negatives,
            u.temperature)
        self.teacher_ready = False
        self._spe: int | None = None

    def unlabeled_batch_size(self) -> int:
        return max(1, round(self.cfg.data.batch_size * self.section.unlabeled_ratio))

    def sup_only_iters(self) -> int:
        if self._spe is None:
            world = self.accelerator.num_processes if self.accelerator is not None else 1
            self._spe = self.steps_per_epoch(world) // self.cfg.train.grad_accum_steps
        return self.section.sup_only_epoch * self._spe

    # ------------------------------------------------------------------- step
    def step(self, batch: dict[str, Any], sched: dict[str, float]) -> tuple[Tensor, dict[str, float]]:
        u, epochs = self.section, self.cfg.train.epochs
        epoch = int(sched["epoch"])
        image_l, label_l = batch["image_l"], batch["label_l"]
        size = tuple(label_l.shape[-2:])
        if epoch < u.sup_only_epoch:
            out = self.student(image_l)
            sup = self.supervised_loss(out["pred"], label_l)
            return sup + 0.0 * out["rep"].sum(), {"loss/sup": sup.detach()}
        if not self.teacher_ready:
            self.teacher.load_state_dict(self.model().state_dict())
            self.teacher_ready = True

        image_u, valid_u, truth = batch["image_u"], batch["valid_u"], batch.get("truth_u")
        truth = self.marked_ignore(truth) if truth is not None else None
        with torch.no_grad():
            self.teacher.eval()
            prob = torch.softmax(upsample(self.teacher(image_u)["pred"].float(), size), dim=1)
            conf, pseudo = prob.max(dim=1)
            pseudo = torch.where(valid_u, pseudo, torch.full_like(pseudo, IGNORE_INDEX))
            mixed = 0.0
            if u.cutmix and float(torch.rand(())) < u.cutmix_p:
                keep = cutmix_masks(image_u.shape[0], *image_u.shape[-2:], device=image_u.device)
                image_u, pseudo, conf = apply_cutmix(keep, image_u, pseudo, conf)
                truth = apply_cutmix(keep, truth)[0] if truth is not None else None
                mixed = 1.0

        n_l = image_l.shape[0]
        images = torch.cat([image_l, image_u])
        out = self.student(images)
        pred_all, rep_all = out["pred"], out["rep"]
        sup = self.supervised_loss(pred_all[:n_l], label_l)

        with torch.no_grad():
            self.teacher.train()
            out_t = self.teacher(images)
            logits_t = out_t["pred"].float()
            prob_t = torch.softmax(logits_t, dim=1)
            entropy_u = entropy_map(torch.softmax(upsample(logits_t[n_l:], size), dim=1))

        pred_u = upsample(pred_all[n_l:].float(), size)
        unsup, reliable = unsupervised_loss(pred_u, pseudo, entropy_u, drop_percent_at(epoch, epochs, u.drop_percent))
        labelled_u = pseudo != IGNORE_INDEX
        metrics: dict[str, Any] = {"loss/sup": sup.detach(), "loss/unsup": unsup.detach(), "cutmix": mixed,
                                   "pseudo/reliable_frac": reliable.sum() / labelled_u.sum().clamp(min=1),
                                   "pseudo/confidence": conf[labelled_u].mean()}
        if truth is not None:
            metrics.update(pseudo_label_metrics(pseudo, reliable, truth, self.class_names))
        loss = sup + u.unsup_weight * unsup
        if u.contrastive:
            contra, cm = self.contrastive_loss(rep_all, out_t["rep"], prob_t, self.marked_ignore(label_l), pseudo,
                                               entropy_u, epoch)
            loss = loss + u.contrastive_weight * contra
            metrics.update(cm, **{"loss/contrastive": contra.detach()})
            metrics.update({f"queue_fill/{name}": n / cap for name, n, cap in
                            zip(self.class_names, self.queues.sizes(), self.queues.capacities)})
        else:
            loss = loss + 0.0 * rep_all.sum()
        return loss, metrics

    def marked_ignore(self, labels: Tensor) -> Tensor:
        """Labels with the ignored pixels marked 255, the value the unlabelled path and L_c take for "no label" (as
        the code); L_s reads u2pl.ignore_index itself."""
        ignore = self.section.ignore_index
        return labels if ignore == IGNORE_INDEX else labels.masked_fill(labels == ignore, IGNORE_INDEX)

    def contrastive_loss(self, rep: Tensor, rep_t: Tensor, prob_t: Tensor, label_l: Tensor, pseudo: Tensor,
                         entropy_u: Tensor, epoch: int) -> tuple[Tensor, dict[str, float]]:
        """L_c at the representation's resolution: entropy masks at label size, then nearest-resized."""
        u = self.section
        alpha = low_entropy_percent(epoch, self.cfg.train.epochs, u.low_entropy_threshold)
        low_u, high_u = entropy_split(entropy_u, pseudo != IGNORE_INDEX, alpha)
        small = tuple(rep.shape[-2:])
        n_l = label_l.shape[0]
        labels = downsample_nearest(torch.cat([label_l, pseudo]), small)
        pad = torch.zeros_like(label_l, dtype=torch.bool)
        low = downsample_nearest(torch.cat([pad, low_u]), small)
        high = downsample_nearest(torch.cat([pad, high_u]), small)
        labelled = torch.arange(labels.shape[0], device=labels.device) < n_l
        return self.contrastive(rep, rep_t, prob_t, labels, labelled, low, high, self.queues)

    def after_optimizer_step(self, sched: dict[str, float]) -> None:
        if not self.teacher_ready:
            return
        u = self.section
        update_teacher(self.teacher, self.model(), int(sched["epoch"]), int(sched["it"]), u.sup_only_epoch,
                       self.sup_only_iters(), u.ema_decay)

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Tensor]:
        state = {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
        state.update(self.queues.state("queue."))
        state["teacher_ready"] = torch.tensor(int(self.teacher_ready))
        return state

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        teacher = {k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")}
        if not teacher or "teacher_ready" not in state:
            raise KeyError(f"a u2pl checkpoint needs teacher.* and teacher_ready in its extra state, got "
                           f"{sorted(state)[:5]}")
        self.teacher.load_state_dict(teacher, strict=True)
        self.queues.load_state(state, "queue.")
        self.teacher_ready = bool(int(state["teacher_ready"]))

    def eval_model(self) -> nn.Module:
        return self.teacher if self.teacher_ready else self.model()
