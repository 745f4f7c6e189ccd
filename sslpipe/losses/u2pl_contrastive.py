"""U2PL's contrastive loss on unreliable pixels (Wang et al., CVPR 2022, Sec. 3.3, eqs. 4, 9-12; official
Haochen-Wang409/U2PL @ab3d2be `u2pl/utils/loss_helper.py: compute_contra_memobank_loss`, masks in `train_semi.py`).

Pixels are at the resolution of the representation map (labels and masks are resized there with nearest). With the
teacher's probabilities p (rank O_ij(c) = position of class c in p_ij sorted descending, 0 = most probable) and the
unlabelled entropy map H:

    alpha_t = low_entropy_threshold * (1 - t / T)                         (percent; 20 at epoch 0)
    low_u   = valid and H <= percentile(H_valid, alpha_t)                 (reliable unlabelled pixels)
    high_u  = valid and H >= percentile(H_valid, 100 - alpha_t)           (unreliable unlabelled pixels)
    labelled pixels: every valid pixel is both "low" and "high".
    anchors A_c    = {student r_ij : low_ij, y_ij = c, p_ij(c) > delta_p}  (y = label, or pseudo-label on unlabelled)
    positive r_c^+ = mean of the teacher's r_ij over A_c                   (the class prototype)
    negatives of c = teacher's r_ij of  labelled:   valid, y_ij != c, 0 <= O_ij(c) < r_l
                                        unlabelled: high_u,          r_l <= O_ij(c) < r_h
                     pushed into class c's FIFO queue (gathered over processes), then N drawn per anchor from it
    L_c = mean over classes with anchors and a non-empty queue of
          mean over M sampled anchors of CE([cos(a, r_c^+), cos(a, n_1), ..., cos(a, n_N)] / tau, target 0)

Defaults (experiments/pascal/1464/ours/config.yaml): delta_p = current_class_threshold 0.3, r_l = low_rank 3,
r_h = high_rank 20, low_entropy_threshold 20, M = num_queries 256, N = num_negatives 50, tau = temperature 0.5.

Paper vs code (named deviations; the paper is followed, docs/methods.md §3):
- negatives: the code multiplies the high-entropy mask by the one-hot (pseudo-)label of c before applying the rank
  rule (issue #171), which contradicts it (a pixel labelled c has rank 0, not >= r_l; a labelled pixel must have
  y != c): only pixels where the eval-mode pseudo-label and the train-mode teacher disagree survive. Here the
  paper's rule above is used as written.
- anchors: the code takes the anchors of the i-th *present* class from the list indexed by class (issue #111);
  here anchors, prototype and queue always belong to the same class c.
- prototype: the paper averages over the anchor set A_c (with p(c) > delta_p); the code over all low-entropy pixels
  of class c (no delta_p). The paper's A_c is used, with the teacher's representations as in the code.
- normalisation: the code divides the summed per-class terms by the number of classes present in the batch
  (counting classes that were skipped for lack of anchors or keys, and returning 0 when fewer than 2 classes are
  present); here the mean is over the classes that contribute a term (the paper's 1/(C x M) sum with C those classes).
- the code's `current_class_negative_threshold` (1: p(c) < 1, always true) is dropped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslpipe.losses.u2pl_unsup import IGNORE_INDEX, percentile
from sslpipe.models.memory_queue import ClassQueues


def low_entropy_percent(epoch: int, epochs: int, low_entropy_threshold: float = 20.0) -> float:
    """alpha_t in percent: low_entropy_threshold * (1 - epoch / epochs) (train_semi.py)."""
    return low_entropy_threshold * (1.0 - epoch / epochs)


def entropy_split(entropy: Tensor, valid: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """(low, high): valid pixels with H <= the alpha-percentile / H >= the (100 - alpha)-percentile of the valid
    pixels' entropies (both all False when nothing is valid)."""
    if not bool(valid.any()):
        return torch.zeros_like(valid), torch.zeros_like(valid)
    h = entropy[valid]
    low = valid & (entropy <= percentile(h, alpha))
    high = valid & (entropy >= percentile(h, 100.0 - alpha))
    return low, high


def class_ranks(prob: Tensor) -> Tensor:
    """O(c) per pixel: (B, C, h, w) probabilities -> (B, C, h, w) long ranks, 0 = the most probable class (ties in
    the order of `torch.sort`, as the code's `torch.sort(prob, 1, True)`)."""
    order = torch.sort(prob, dim=1, descending=True).indices
    ranks = torch.empty_like(order)
    ar = torch.arange(prob.shape[1], device=prob.device).view(1, -1, 1, 1).expand_as(order)
    ranks.scatter_(1, order, ar)
    return ranks


def negative_masks(ranks: Tensor, labels: Tensor, labelled: Tensor, high: Tensor, low_rank: int = 3,
                   high_rank: int = 20) -> Tensor:
    """(B, C, h, w) bool: pixel ij is a negative candidate of class c (the paper's n_ij(c), module docstring).

    ranks: class_ranks of the teacher; labels (B, h, w): ground truth on labelled images (255 = ignore); labelled
    (B,) bool: which images are labelled; high (B, h, w): the unreliable unlabelled pixels (ignored on labelled
    images).
    """
    C = ranks.shape[1]
    classes = torch.arange(C, device=ranks.device).view(1, C, 1, 1)
    valid_l = (labels != IGNORE_INDEX) & labelled.view(-1, 1, 1)
    neg_l = valid_l[:, None] & (labels[:, None] != classes) & (ranks < low_rank)
    unl = high & ~labelled.view(-1, 1, 1)
    neg_u = unl[:, None] & (ranks >= low_rank) & (ranks < high_rank)
    return neg_l | neg_u


def info_nce(anchors: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """mean_i CE([cos(a_i, pos), cos(a_i, neg_i1..N)] / tau, 0): anchors (M, D), positive (D,), negatives (M, N, D)."""
    keys = torch.cat([positive.view(1, 1, -1).expand(anchors.shape[0], 1, -1), negatives], dim=1)
    logits = F.cosine_similarity(anchors.unsqueeze(1), keys, dim=2) / temperature
    return F.cross_entropy(logits, torch.zeros(anchors.shape[0], dtype=torch.long, device=anchors.device))


class U2PLContrastiveLoss:
    """The loss of the module docstring; owns nothing but its settings (the queues are passed in, so that the recipe
    checkpoints them)."""

    def __init__(self, num_classes: int, current_class_threshold: float = 0.3, low_rank: int = 3,
                 high_rank: int = 20, num_queries: int = 256, num_negatives: int = 50, temperature: float = 0.5):
        if not 0 <= low_rank < high_rank:
            raise ValueError(f"need 0 <= low_rank < high_rank, got {low_rank}, {high_rank}")
        self.num_classes, self.delta_p = num_classes, current_class_threshold
        self.low_rank, self.high_rank = low_rank, high_rank
        self.num_queries, self.num_negatives, self.temperature = num_queries, num_negatives, temperature

    def __call__(self, rep: Tensor, rep_teacher: Tensor, prob_teacher: Tensor, labels: Tensor, labelled: Tensor,
                 low: Tensor, high: Tensor, queues: ClassQueues) -> tuple[Tensor, dict[str, float]]:
        """rep (B, D, h, w) student representations (with grad); rep_teacher (B, D, h, w); prob_teacher (B, C, h, w);
        labels (B, h, w) ground truth / pseudo-labels (255 = none); labelled (B,) bool; low/high (B, h, w) entropy
        masks of the unlabelled images (labelled images: every valid pixel counts as low). Pushes this batch's
        negatives into `queues`, then samples from them. Returns (loss, metrics)."""
        rep_t = rep_teacher.detach().float()
        prob = prob_teacher.detach().float()
        valid = labels != IGNORE_INDEX
        low = torch.where(labelled.view(-1, 1, 1), valid, low & valid)
        ranks = class_ranks(prob)
        negatives = negative_masks(ranks, labels, labelled, high, self.low_rank, self.high_rank)
        rep_t_pix = rep_t.permute(0, 2, 3, 1)  # (B, h, w, D)
        queues.push([rep_t_pix[negatives[:, c]] for c in range(self.num_classes)])

        rep_pix = rep.permute(0, 2, 3, 1)
        terms, n_anchor_classes = [], 0
        for c in range(self.num_classes):
            anchor_mask = low & (labels == c) & (prob[:, c] > self.delta_p)
            n = int(anchor_mask.sum())
            if n == 0:
                continue
            n_anchor_classes += 1
            if queues.sizes()[c] == 0:
                continue
            candidates = rep_pix[anchor_mask]
            anchors = candidates[torch.randint(n, (self.num_queries,), device=candidates.device)]
            positive = rep_t_pix[anchor_mask].mean(0)
            negs = queues.sample(c, self.num_queries * self.num_negatives).view(
                self.num_queries, self.num_negatives, -1)
            terms.append(info_nce(anchors.float(), positive, negs, self.temperature))
        metrics = {"contrastive/classes": float(len(terms)), "contrastive/anchor_classes": float(n_anchor_classes),
                   "contrastive/negatives": float(negatives.sum())}
        if not terms:
            return rep.sum() * 0.0, metrics
        return torch.stack(terms).mean(), metrics
