"""Q-score metrics: every label-free, per-sample quality metric of a representation, and set-level summaries
(docs/methods.md §4).

The scores and the selections they rest on (q_v1, q_v2, L_i, D, with their formulas) are
`sslpipe.losses.qscore_math`, which the regulariser shares. The report scores them beside descriptive statistics of
the v1 input h': mu_i, sigma_i, l1_i and z_i as defined there, and the soft sparsity
    sparsity_i = (1/D) #{j : h'_ij < eta}                 (`sparsity_abs`: |h'_ij| < eta)

Correctly classified samples are expected to have a higher z and q and a lower l1 (paper, v1).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from sslpipe.losses.qscore_math import (
    DEFAULT_EPS,
    DEFAULT_PERCENTILES,
    TINY,
    feature_matrix,
    q_v2,
    row_mean_std,
    v1_input,
    v2_selection,
)

DEFAULT_ETA = 1e-3  # soft-sparsity threshold: the paper's value was not found (docs/methods.md §4); ours


@torch.no_grad()
def qscore_metrics(
    h: Tensor,
    *,
    eta: float = DEFAULT_ETA,
    eps: float = DEFAULT_EPS,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    l2_normalize: bool = True,
    sparsity_abs: bool = False,
    rates: Tensor | None = None,
    standardize: bool = False,
) -> dict[str, Tensor]:
    """Every per-sample metric, each (N,) float on h's device: mean, std, sparsity, l1, z, q_v1 (all on h', the v1
    input), q_v2, n_high (|L_i|) and n_high_disc (|L_i ∩ D|) (on the raw h). Formulas: the module docstring."""
    h = feature_matrix(h).float()
    hp = v1_input(h, l2_normalize)
    mu, sigma = row_mean_std(hp)
    below = (hp.abs() if sparsity_abs else hp) < eta
    l1 = hp.abs().sum(dim=1)
    z = (hp.max(dim=1).values - mu) / sigma.clamp_min(TINY)
    high, _, sel = v2_selection(h, eps=eps, percentiles=percentiles, rates=rates)
    return {
        "mean": mu, "std": sigma, "sparsity": below.float().mean(dim=1), "l1": l1, "z": z,
        "q_v1": z / l1.clamp_min(TINY), "q_v2": q_v2(h, eps=eps, percentiles=percentiles, rates=rates,
                                                        standardize=standardize),
        "n_high": high.sum(dim=1).float(), "n_high_disc": sel.sum(dim=1).float(),
    }


@torch.no_grad()
def batch_summary(
    h: Tensor,
    *,
    eta: float = DEFAULT_ETA,
    eps: float = DEFAULT_EPS,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    l2_normalize: bool = True,
    sparsity_abs: bool = False,
    rates: Tensor | None = None,
    standardize: bool = False,
) -> dict[str, float]:
    """Set-level summaries: mean of every per-sample metric (`mean_<name>`), `always_active_frac` (share of features
    with h'_ij >= eta in every sample, i.e. never soft-sparse: the degenerate "fires for every sample" feature the
    v1 column term fights), `discriminative_frac` (|D| / D), `never_high_frac` (share of features with A_j = 0)."""
    h = feature_matrix(h).float()
    m = qscore_metrics(h, eta=eta, eps=eps, percentiles=percentiles, l2_normalize=l2_normalize,
                       sparsity_abs=sparsity_abs, rates=rates, standardize=standardize)
    hp = v1_input(h, l2_normalize)
    active = ~((hp.abs() if sparsity_abs else hp) < eta)
    high, disc, _ = v2_selection(h, eps=eps, percentiles=percentiles, rates=rates)
    used_rates = rates.to(h.device) if rates is not None else high.float().mean(dim=0)
    out = {f"mean_{k}": float(v.mean()) for k, v in m.items()}
    out.update(
        always_active_frac=float(active.all(dim=0).float().mean()),
        discriminative_frac=float(disc.float().mean()),
        never_high_frac=float((used_rates == 0).float().mean()),
        n_samples=int(h.shape[0]), n_features=int(h.shape[1]),
    )
    return out
