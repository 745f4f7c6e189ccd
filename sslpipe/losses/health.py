"""Collapse / health metrics of teacher-student self-distillation (DINO, iBOT), logged every few steps.

The two collapse modes of DINO (Caron et al. 2021, §5.3) are read off the teacher distribution: uniform collapse
(teacher entropy -> log K, sharpening too weak) and one-prototype collapse (batch-mean teacher entropy -> 0, one
prototype used, centring too weak). All entropies are in nats (maximum log K); KL(teacher || student) -> 0 means the
student no longer learns anything. Cheap: one softmax per input, no gradients.

Label-free checks of the embeddings themselves (`embedding_health`, on the backbone's CLS features, teacher and
student): RankMe (Garrido et al., ICML 2023), the effective rank exp(H(p)) of the singular values, p_k = s_k / sum s
+ eps, which tracks downstream accuracy without labels; and SimSiam's collapse check (Chen & He, CVPR 2021, §4.1), the
per-dimension std of the L2-normalised embeddings, about 1/sqrt(d) when they spread over the sphere and 0 when they
collapse to one point. Both are computed on one process's batch, so RankMe is bounded by min(batch rows, d): compare
values at the same batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

RANKME_EPS = 1e-7  # Garrido et al.'s epsilon (their code and paper)
# The keys these functions log (what `sslpipe report` draws as health): `health_metrics`' names, and the prefixes of
# `embedding_health`'s (`rankme/teacher`, `embed_std/student`, ...).
HEALTH_KEYS = ("teacher_entropy", "student_entropy", "kl_teacher_student", "batch_entropy", "prototype_usage",
               "teacher_patch_entropy", "student_patch_entropy", "mask_ratio")
EMBEDDING_PREFIXES = ("rankme/", "embed_std/", "dense/")


def _entropy(logp: Tensor) -> Tensor:
    """Per-row entropy -sum p log p from log-probabilities (0 log 0 = 0)."""
    p = logp.exp()
    return -torch.where(p > 0, p * logp, 0.0).sum(dim=-1)


@torch.no_grad()
def health_metrics(teacher_cls: Tensor, student_cls: Tensor, *, teacher_temp: float, student_temp: float,
                   center: Tensor | None = None, teacher_patch: Tensor | None = None,
                   student_patch: Tensor | None = None, teacher_patch_temp: float | None = None,
                   center2: Tensor | None = None, masks: Tensor | None = None) -> dict[str, float]:
    """Metrics from logits of the same crops: teacher_cls / student_cls (B, K), optional patch logits (B, N, Kp)
    and masks (B, ...) bool. ``center`` / ``center2`` are the loss centres subtracted from teacher logits.

    Keys: teacher_entropy, student_entropy (mean per-sample entropy), kl_teacher_student, batch_entropy (entropy
    of the batch-mean teacher distribution), prototype_usage (fraction of the K prototypes that are the teacher argmax
    for at least one sample); with patches: teacher_patch_entropy, student_patch_entropy; with masks: mask_ratio.
    """
    t_logp = F.log_softmax((teacher_cls.float() - (0 if center is None else center)) / teacher_temp, dim=-1)
    s_logp = F.log_softmax(student_cls.float() / student_temp, dim=-1)
    K = t_logp.shape[-1]
    mean_p = t_logp.exp().mean(dim=0)
    out = {
        "teacher_entropy": _entropy(t_logp).mean().item(),
        "student_entropy": _entropy(s_logp).mean().item(),
        "kl_teacher_student": torch.where(t_logp.exp() > 0, t_logp.exp() * (t_logp - s_logp), 0.0)
        .sum(dim=-1).mean().item(),
        "batch_entropy": -torch.special.xlogy(mean_p, mean_p).sum().item(),
        "prototype_usage": t_logp.argmax(dim=-1).unique().numel() / K,
    }
    if teacher_patch is not None:
        tp_temp = teacher_temp if teacher_patch_temp is None else teacher_patch_temp
        tp = teacher_patch.float() - (0 if center2 is None else center2)
        out["teacher_patch_entropy"] = _entropy(F.log_softmax(tp / tp_temp, dim=-1)).mean().item()
    if student_patch is not None:
        s_patch_logp = F.log_softmax(student_patch.float() / student_temp, dim=-1)
        out["student_patch_entropy"] = _entropy(s_patch_logp).mean().item()
    if masks is not None:
        out["mask_ratio"] = masks.float().mean().item()
    return out


@torch.no_grad()
def rankme(z: Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe of embeddings z (N, d): exp(-sum_k p_k log p_k) with p_k = s_k / ||s||_1 + eps over the singular values
    s of z (not centred, as in the paper). About 1 for rank-1 features, min(N, d) for equal singular values."""
    s = torch.linalg.svdvals(z.float())
    p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny) + eps
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def embed_std(z: Tensor) -> float:
    """Mean over dimensions of the (unbiased) std over the batch of z / ||z||_2: about 1/sqrt(d) for embeddings
    spread over the sphere, 0 when every sample maps to the same direction (SimSiam's collapse check)."""
    return float(F.normalize(z.float(), dim=-1).std(dim=0).mean())


def embedding_health(**features: Tensor) -> dict[str, float]:
    """`embedding_health(teacher=(N, d), student=(N, d))` -> {"rankme/teacher", "embed_std/teacher", ...}."""
    out: dict[str, float] = {}
    for name, z in features.items():
        out[f"{EMBEDDING_PREFIXES[0]}{name}"] = rankme(z)
        out[f"{EMBEDDING_PREFIXES[1]}{name}"] = embed_std(z)
    return out


def dense_health(cls_tokens: Tensor, patch_tokens: Tensor) -> dict[str, float]:
    """The patch-feature health DINOv3 tracks (Siméoni et al. 2025, §4.1: dense features degrade as the patch tokens
    align with the [CLS] token in long runs): `dense/patch_cls_cos`, the mean cosine of each patch token to its
    image's [CLS] token, and `dense/patch_patch_cos`, the mean cosine between two patch tokens of one image (1 when
    the dense features are all alike). cls_tokens (B, D), patch_tokens (B, N, D)."""
    cls = F.normalize(cls_tokens.detach().float(), dim=-1)
    patches = F.normalize(patch_tokens.detach().float(), dim=-1)
    n = patches.shape[1]
    pair = (patches @ patches.transpose(1, 2)).sum((1, 2)) - n  # off-diagonal sum per image
    return {f"{EMBEDDING_PREFIXES[2]}patch_cls_cos": float((patches @ cls.unsqueeze(-1)).mean()),
            f"{EMBEDDING_PREFIXES[2]}patch_patch_cos": float((pair / max(n * (n - 1), 1)).mean())}
