"""The Q-score regulariser (Kalibhat et al., arXiv 2203.01881, SPEC.md §4): a loss term any recipe adds.

    L = L_SSL - lambda1 * sum_{i : Q_i < alpha} Q_i + lambda2 * sum_{k : ||H_{*,k}||_1 > beta} ||H_{*,k}||_1

H in R^{M x l} is the batch's feature matrix (M = 2N for two views stacked; a recipe passes all global views), Q_i the
per-sample Q-score of row i (`version` v1 or v2, formulas in sslpipe/eval/qscore.py), ||H_{*,k}||_1 = sum_i |H_ik|
the L1 norm of feature column k over the batch. The first term raises Q on the low-quality samples (Q_i below alpha);
the second penalises features that fire across the batch (v1 found that the first term alone makes one feature fire
for every sample). alpha / beta null = the batch means of Q_i / of the column norms (published v2 values, second-hand,
as are lambda1 = lambda2 = 1e-4). The selections {i : Q_i < alpha} and {k : ||H_{*,k}||_1 > beta} use detached values,
so the gradient reaches only the selected rows (through Q_i) and the selected columns (through their norms).

Written here because no library ships it. Choices of ours (the paper body could not be read, docs/qscore.md):
- sums, not means, as the formula is written: the term grows with the per-process batch; alpha, beta and the column
  norms are per process (each rank regularises its own batch; DDP then averages the gradients);
- the column term is the norm of each selected column (an indicator, as written), not a hinge (norm - beta);
- v2's activation rates A_j (hence the discriminative features D) are those of the batch H itself;
- computed in float32 whatever the autocast dtype (max, std and small lambdas are fragile in half precision).
Caveat (measured, docs/qscore.md): on Gaussian-like features (a ViT's CLS after LayerNorm) v2 with eps = 4 selects
no feature, so its sample term is 0 and only the column term acts; a large lambda1 with v1 collapses each sample
onto about one feature (Q up 23x, kNN down 12 points on the demo).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from sslpipe.eval.qscore import q_v1, q_v2


class QScoreRegularizer(nn.Module):
    """`QScoreRegularizer(cfg.qscore)(features (M, l)) -> (term, metrics)`; add `term` to the SSL loss.

    `cfg` is a `sslpipe.config.QScoreConfig` (or a mapping / keyword overrides of its fields). `enabled` is not
    looked at here: a recipe builds the regulariser only when `cfg.qscore.enabled` (see `build_qscore`).
    Metrics (0-d detached tensors): `qscore/term`, `qscore/q_mean`, `qscore/low_frac` (share of rows with
    Q_i < alpha), `qscore/col_high_frac` (share of columns over beta), `qscore/alpha`, `qscore/beta`.
    """

    def __init__(self, cfg: Any = None, **overrides: Any) -> None:
        super().__init__()
        from sslpipe.config import QScoreConfig

        if cfg is None:
            cfg = QScoreConfig()
        elif isinstance(cfg, Mapping):
            cfg = QScoreConfig(**cfg)
        self.cfg = QScoreConfig.model_validate({**cfg.model_dump(), **overrides}) if overrides else cfg

    def q_scores(self, h: Tensor) -> Tensor:
        """Per-row Q-score (M,) of the configured version, differentiable in h."""
        c = self.cfg
        if c.version == "v1":
            return q_v1(h, l2_normalize=c.l2_normalize)
        return q_v2(h, eps=c.eps, percentiles=tuple(c.percentiles))

    def forward(self, features: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if features.ndim != 2:
            raise ValueError(f"QScoreRegularizer expects batch features of shape (M, l), got {tuple(features.shape)}")
        c = self.cfg
        h = features.float()
        q = self.q_scores(h)
        alpha = q.detach().mean() if c.alpha is None else torch.as_tensor(c.alpha, device=h.device)
        low = q.detach() < alpha
        sample_term = -(q * low).sum()
        col = h.abs().sum(dim=0)
        beta = col.detach().mean() if c.beta is None else torch.as_tensor(c.beta, device=h.device)
        high = col.detach() > beta
        col_term = (col * high).sum()
        term = c.lambda1 * sample_term + c.lambda2 * col_term
        metrics = {
            "qscore/term": term.detach(), "qscore/q_mean": q.detach().mean(), "qscore/low_frac": low.float().mean(),
            "qscore/col_high_frac": high.float().mean(), "qscore/alpha": alpha.detach().float(),
            "qscore/beta": beta.detach().float(),
        }
        return term, metrics


def build_qscore(cfg: Any) -> QScoreRegularizer | None:
    """The regulariser of a recipe's `Config` (its `qscore` section), or None when `qscore.enabled` is false."""
    section = getattr(cfg, "qscore", cfg)
    return QScoreRegularizer(section) if section.enabled else None
