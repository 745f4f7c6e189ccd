"""The Q-score regulariser (Kalibhat et al., arXiv 2203.01881, docs/methods.md §4): a loss term any recipe adds.

The published form (second-hand, `reduction: sum`):

    L = L_SSL - lambda1 * sum_{i : Q_i < alpha} Q_i + lambda2 * sum_{k : ||H_{*,k}||_1 > beta} ||H_{*,k}||_1

H in R^{M x l} is the batch's feature matrix (M = 2N for two views stacked; a recipe passes all global views), Q_i the
per-sample Q-score of row i (`version` v1 or v2, formulas in sslpipe/losses/qscore_math.py),
||H_{*,k}||_1 = sum_i |H_ik| the L1 norm of feature column k over the batch. The first term raises Q on the low-quality
samples (Q_i below alpha); the second penalises features that fire across the batch (v1 found that the first term alone
makes one feature fire for every sample). alpha / beta null = the batch means of Q_i / of the column norms. The
selections use detached values, so the gradient reaches only the selected rows (through Q_i) and the selected columns
(through their norms).

Why the default differs (issue 19, measured in docs/qscore.md): with sums and lambda1 = lambda2 = 1e-4 the sample
term was about 1e-3 against a column term of 0.3-0.8 (the regulariser was an L1 penalty on columns), and on a ViT
v2 selected no feature, so every Q_i was 0 with no gradient. The default `reduction: balanced` makes both terms
dimensionless means of the same size, so one lambda means the same on any batch size, width or feature scale:

    S = mean_{i : Q_i < alpha} (alpha - Q_i) / mean_i |Q_i|       relative shortfall of the low-Q rows
    C = mean_{k : c_k > beta} (c_k - beta) / mean_k c_k           relative excess of the columns, c_k = ||H_{*,k}||_1
    L = L_SSL + lambda1 * S + lambda2 * C                         (the denominators are detached)

The gradients point the same way as the published terms' (a hinge and -Q_i differ by a constant on the selected
rows). In both forms:
- v2 is defined on any backbone: eps is lowered per batch until `v2_coverage` of the rows have L_i ∩ D non-empty
  (`eps_for_coverage`; a ViT's LayerNorm CLS never reaches mean + 4 std), Q_i is in units of sigma_i
  (`standardize`, so it cannot be raised by scaling the features), and a row with L_i ∩ D still empty is scored on
  its strongest discriminative feature (`q_v2(fallback=True)`), so the term reaches the samples it exists for
  instead of giving them Q = 0 and no gradient;
- the column norms are taken on the matrix Q is computed on (v1: the L2-normalised rows when `l2_normalize`);
- sums, alpha, beta and the column norms are per process (each rank regularises its own batch; DDP averages);
- computed in float32 whatever the autocast dtype (max, std and small lambdas are fragile in half precision);
- a degenerate row (all zero, or constant: sigma_i = 0, e.g. a dead ReLU + pool feature vector) has no Q-score; its
  Q would be 0 through the TINY floors, below alpha, and its gradient through those floors ~1e34, enough to
  overflow the step: such rows are left out of the sample term, alpha and the scale, with no gradient
  (`qscore/degenerate_frac` counts them); a batch of such rows only has a sample term of 0 (alpha and q_mean
  reported as 0), so the loss stays finite.
Written here because no library ships it; the choices above are ours (the paper's body could not be read).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from sslpipe.losses.qscore_math import (
    TINY,
    check_v2_settings,
    degenerate_rows,
    eps_for_coverage,
    q_v1,
    q_v2,
    v1_input,
)


class QScoreRegularizer(nn.Module):
    """`QScoreRegularizer(...)(features (M, l)) -> (term, metrics)`; add `term` to the SSL loss.

    Arguments (the recipe's `qscore` section; defaults ours, see the module docstring): `version` v1 or v2,
    `reduction` balanced or sum, `lambda1` / `lambda2` the weights of the sample and column terms, `alpha` / `beta`
    the thresholds (None: batch means), v2's `eps`, `percentiles`, `v2_coverage` and `standardize`, v1's
    `l2_normalize`. Metrics (0-d detached tensors): `qscore/term` = `qscore/sample_term` + `qscore/col_term` (each
    with its lambda, so their balance shows in the logs), `qscore/q_mean`, `qscore/low_frac` (share of rows with
    Q_i < alpha), `qscore/col_high_frac` (share of columns over beta), `qscore/alpha`, `qscore/beta`,
    `qscore/degenerate_frac` (share of constant or all-zero rows, left out of the sample term).
    """

    def __init__(self, *, version: Literal["v1", "v2"] = "v2", reduction: Literal["balanced", "sum"] = "balanced",
                 lambda1: float = 0.1, lambda2: float = 0.1, alpha: float | None = None, beta: float | None = None,
                 eps: float = 4.0, percentiles: tuple[float, float] = (50.0, 95.0), v2_coverage: float | None = 0.5,
                 standardize: bool = True, l2_normalize: bool = True) -> None:
        super().__init__()
        if version not in ("v1", "v2") or reduction not in ("balanced", "sum"):
            raise ValueError(f"QScoreRegularizer: version must be v1 or v2 and reduction balanced or sum, got "
                             f"{version!r} and {reduction!r}")
        self.version, self.reduction = version, reduction
        self.lambda1, self.lambda2, self.alpha, self.beta = lambda1, lambda2, alpha, beta
        self.eps, self.percentiles, self.v2_coverage = eps, tuple(percentiles), v2_coverage
        self.standardize, self.l2_normalize = standardize, l2_normalize
        check_v2_settings(eps, percentiles, v2_coverage)

    def q_input(self, h: Tensor) -> Tensor:
        """The matrix Q is computed on, and the column norms too: v1's h' (L2-normalised rows when
        `l2_normalize`), v2's raw h."""
        return v1_input(h, self.l2_normalize) if self.version == "v1" else h

    def q_scores(self, h: Tensor) -> Tensor:
        """Per-row Q-score (M,) the term acts on, differentiable in h (v2 with the fallback for empty selections)."""
        if self.version == "v1":
            return q_v1(h, l2_normalize=self.l2_normalize)
        return q_v2(h, eps=self.v2_eps(h), percentiles=self.percentiles, standardize=self.standardize, fallback=True)

    def v2_eps(self, h: Tensor) -> float:
        """v2's eps on this batch: `eps`, lowered by `eps_for_coverage` when `v2_coverage` is set."""
        if self.v2_coverage is None:
            return self.eps
        return eps_for_coverage(h, self.v2_coverage, eps_max=self.eps, percentiles=self.percentiles)

    def forward(self, features: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if features.ndim != 2:
            raise ValueError(f"QScoreRegularizer expects batch features of shape (M, l), got {tuple(features.shape)}")
        h = features.float()
        live = degenerate_rows(h).logical_not()
        h = torch.where(live.unsqueeze(1), h, h.detach())  # no gradient path through a degenerate row's floors
        q = self.q_scores(h)
        # Means over the live rows only; a batch with none (every row dead or constant, e.g. a collapsed
        # representation on one process) has no Q to raise: its q_mean and alpha are 0 and its sample term 0
        # (no row is selected), not the NaN of an empty mean, which would stop the run blaming the loss.
        n_live = live.sum().clamp_min(1)
        q_live = torch.where(live, q.detach(), 0.0)
        q_mean = q_live.sum() / n_live
        alpha = q_mean if self.alpha is None else torch.as_tensor(self.alpha, device=h.device)
        low = (q.detach() < alpha) & live
        col = self.q_input(h).abs().sum(dim=0)
        beta = col.detach().mean() if self.beta is None else torch.as_tensor(self.beta, device=h.device)
        high = col.detach() > beta
        if self.reduction == "sum":
            sample_term = -torch.where(low, q, 0.0).sum()
            col_term = (col * high).sum()
        else:
            q_scale = (q_live.abs().sum() / n_live).clamp_min(TINY)
            col_scale = col.detach().mean().clamp_min(TINY)
            sample_term = torch.where(low, alpha - q, 0.0).sum() / low.sum().clamp_min(1) / q_scale
            col_term = ((col - beta) * high).sum() / high.sum().clamp_min(1) / col_scale
        term = self.lambda1 * sample_term + self.lambda2 * col_term
        metrics = {
            "qscore/term": term.detach(), "qscore/sample_term": (self.lambda1 * sample_term).detach(),
            "qscore/col_term": (self.lambda2 * col_term).detach(), "qscore/q_mean": q_mean,
            "qscore/degenerate_frac": (~live).float().mean(),
            "qscore/low_frac": low.float().mean(), "qscore/col_high_frac": high.float().mean(),
            "qscore/alpha": alpha.detach().float(), "qscore/beta": beta.detach().float(),
        }
        return term, metrics
