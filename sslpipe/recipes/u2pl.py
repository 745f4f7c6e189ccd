"""U2PL: semi-supervised semantic segmentation using unreliable pseudo-labels (Wang et al., CVPR 2022; official
Haochen-Wang409/U2PL @ab3d2be `train_semi.py` 234-548; SPEC.md §3; docs/u2pl.md).

One step (epoch t of T, iteration it):
- t < sup_only_epoch: L = CE on the labelled images (the representation head enters with weight 0, as in the code,
  so DDP sees every parameter used).
- otherwise: the EMA teacher (eval mode) labels the clean unlabelled images: p = softmax(upsampled logits), pseudo-label
  = argmax p, confidence = max p (padding: no label). With probability cutmix_p the batch is CutMixed
  (sslpipe/data/cutmix.py: image, pseudo-label and confidence move together). The student runs on [labelled;
  unlabelled]; the teacher (no grad, train mode as in the code) on the same batch gives probabilities, entropy and
  representations.
  L = L_s + unsup_weight * L_u + contrastive_weight * L_c (sslpipe/losses/u2pl_unsup.py, u2pl_contrastive.py).
- after each optimizer step from sup_only_epoch on: teacher <- EMA with decay min(1 - 1/(it - sup_only_iters + 1),
  ema_decay) over parameters (the teacher's BatchNorm statistics come from its own train-mode passes, as the code).

State (`extra_state`, flat tensors): `teacher.*` (weights and buffers), `queue.<c>` (the per-class FIFO queues of
negative keys, gathered over processes so every rank holds the same) and `teacher_ready`.
Evaluation uses the student before sup_only_epoch and the teacher after (as the code).

Named deviations from the code (besides those of the losses' docstrings):
- at the first U2PL step the teacher is set to the student once, weights *and* BatchNorm statistics; the code copies
  parameters at every step of epoch sup_only_epoch (keeping the teacher's stale BN statistics) and the EMA formula
  starts with decay 0 anyway;
- pixels of an unlabelled crop that are padding get no pseudo-label (the code labels the padding);
- the teacher's dropout is off (`build_teacher`); the code runs its teacher in train mode with Dropout2d(0.1);
- λ_c = u2pl.contrastive_weight, default 0.1 (the paper's value per the maintainer, issue #57; the code uses 1).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslpipe.data.cutmix import apply_cutmix, cutmix_masks
from sslpipe.losses.u2pl_contrastive import U2PLContrastiveLoss, entropy_split, low_entropy_percent
from sslpipe.losses.u2pl_unsup import IGNORE_INDEX, drop_percent_at, entropy_map, unsupervised_loss
from sslpipe.models.ema import build_teacher, ema_update
from sslpipe.models.memory_queue import ClassQueues
from sslpipe.recipes.seg_supervised import SupervisedSegRecipe, upsample


def downsample_nearest(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, W) integer/bool map -> (B, h, w) by nearest (the code's `F.interpolate(mode="nearest")`)."""
    y = F.interpolate(x[:, None].float(), size=size, mode="nearest")[:, 0]
    return y.bool() if x.dtype == torch.bool else y.to(x.dtype)


def ema_decay_at(it: int, sup_only_iters: int, ema_decay: float = 0.99) -> float:
    """The official EMA decay min(1 - 1/(it - sup_only_iters + 1), ema_decay): 0 at the first U2PL iteration (the
    teacher becomes the student), then 1/2, 2/3, ... up to ema_decay."""
    return max(0.0, min(1.0 - 1.0 / (it - sup_only_iters + 1), ema_decay))


class U2PLRecipe(SupervisedSegRecipe):
    uses_unlabeled = True
    rep_head = True

    def build(self, accelerator: Any) -> None:
        super().build(accelerator)
        u = self.cfg.u2pl
        self.teacher = build_teacher(self.student).to(self.device)
        caps = [u.queue_size] * self.num_classes
        caps[0] = u.background_queue_size
        self.queues = ClassQueues(self.num_classes, u.rep_dim, caps, device=self.device)
        self.contrastive = U2PLContrastiveLoss(
            self.num_classes, u.current_class_threshold, u.low_rank, u.high_rank, u.num_queries, u.num_negatives,
            u.temperature)
        self.teacher_ready = False
        self._spe: int | None = None

    def sup_only_iters(self) -> int:
        if self._spe is None:
            world = self.accelerator.num_processes if self.accelerator is not None else 1
            self._spe = self.steps_per_epoch(world) // self.cfg.train.grad_accum_steps
        return self.cfg.u2pl.sup_only_epoch * self._spe

    # ------------------------------------------------------------------- step
    def step(self, batch: dict[str, Any], sched: dict[str, float]) -> tuple[Tensor, dict[str, float]]:
        u, epochs = self.cfg.u2pl, self.cfg.train.epochs
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

        image_u, valid_u = batch["image_u"], batch["valid_u"]
        with torch.no_grad():
            self.teacher.eval()
            prob = torch.softmax(upsample(self.teacher(image_u)["pred"].float(), size), dim=1)
            conf, pseudo = prob.max(dim=1)
            pseudo = torch.where(valid_u, pseudo, torch.full_like(pseudo, IGNORE_INDEX))
            mixed = 0.0
            if u.cutmix and float(torch.rand(())) < u.cutmix_p:
                keep = cutmix_masks(image_u.shape[0], *image_u.shape[-2:], device=image_u.device)
                image_u, pseudo, conf = apply_cutmix(keep, image_u, pseudo, conf)
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
        metrics: dict[str, Any] = {"loss/sup": sup.detach(), "loss/unsup": unsup.detach(), "cutmix": mixed,
                                   "pseudo/reliable_frac": reliable.float().sum() / valid_u.sum().clamp(min=1),
                                   "pseudo/confidence": conf[pseudo != IGNORE_INDEX].mean()}
        loss = sup + u.unsup_weight * unsup
        if u.contrastive:
            contra, cm = self.contrastive_loss(rep_all, out_t["rep"], prob_t, label_l, pseudo, entropy_u, epoch)
            loss = loss + u.contrastive_weight * contra
            metrics.update(cm, **{"loss/contrastive": contra.detach()})
        else:
            loss = loss + 0.0 * rep_all.sum()
        return loss, metrics

    def contrastive_loss(self, rep: Tensor, rep_t: Tensor, prob_t: Tensor, label_l: Tensor, pseudo: Tensor,
                         entropy_u: Tensor, epoch: int) -> tuple[Tensor, dict[str, float]]:
        """L_c at the representation's resolution: entropy masks at label size, then nearest-resized."""
        u = self.cfg.u2pl
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
        if int(sched["epoch"]) < self.cfg.u2pl.sup_only_epoch or not self.teacher_ready:
            return
        ema_update(self.teacher, self.model(), ema_decay_at(int(sched["it"]), self.sup_only_iters(),
                                                            self.cfg.u2pl.ema_decay))

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
