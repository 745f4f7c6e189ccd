"""Q-score math: the per-sample scores v1 and v2 and the feature selections they rest on (docs/methods.md §4).

Below both users: the regulariser (`sslpipe.losses.qscore`) differentiates them, the report's metrics
(`sslpipe.eval.qscore`) measure them.

Kalibhat, Narang, Firooz, Sanjabi, Feizi, arXiv 2203.01881. The paper changed its definition between versions and
ships no code; both are implemented, as `v1` ("Understanding Failure Modes of Self-Supervised Learning", 2022) and
`v2` (v2 and later, AAAI 2024 "Measuring Self-Supervised Representation Quality for Downstream Classification using
Discriminative Features"). The v2 definition is second-hand (a summary of the paper and an independent
implementation; see docs/qscore.md).

Input: a feature matrix h of shape (N, D), one row per sample: by default the backbone output before any projection
head (ResNet: pooled, non-negative after ReLU; ViT: the CLS token after the final norm, which has negative values).
All statistics are per row (per sample) over its D features; std is the population std (divide by D, as np.std in
the third-party v1 implementation, FraCorti/.../utils/pies.py).

v1, computed on h' = h_i / ||h_i||_2 when `l2_normalize` (the default: the only known implementation does it, and
it makes Q invariant to the scale of h; with `l2_normalize=False`, h' = h):
    mu_i      = (1/D) sum_j h'_ij
    sigma_i   = sqrt((1/D) sum_j (h'_ij - mu_i)^2)
    l1_i      = sum_j |h'_ij|
    z_i       = (max_j h'_ij - mu_i) / max(sigma_i, tiny)
    q_v1_i    = z_i / max(l1_i, tiny)
v2, on the raw h (no normalisation), with mu_i, sigma_i the mean and population std of h_i:
    L_i  = {j : h_ij > mu_i + eps * sigma_i}               (highly activating features of sample i, eps = 4)
    A_j  = (1/N) #{i : j in L_i}                            (activation rate of feature j over the reference set)
    D    = {j : A_j > 0 and P_lo <= A_j <= P_hi}, P_lo/P_hi = the `percentiles` (default 50th/95th) of the non-zero
           A_j (torch.quantile, linear interpolation as numpy's default)     (discriminative features)
    q_v2_i = (1/|L_i ∩ D|) sum_{j in L_i ∩ D} (h_ij - mu_i) / s_i, and 0 when L_i ∩ D is empty;
             s_i = sigma_i with `standardize` (ours: scale-free, like v1's z), else 1 (the published form).
The reference set of A_j is `rates` when given (e.g. rates of the training split), else the rows of h themselves.
Note (Samuelson's inequality): with the population std no value can exceed mu + eps*sigma when D <= eps^2 + 1, so
eps = 4 needs D >= 18 features for L_i to be non-empty at all; and on Gaussian-like rows (a ViT's CLS after
LayerNorm) no value reaches 4 std in practice. `eps_for_coverage` lowers eps until a given share of rows has
L_i ∩ D non-empty (issue 19: how v2 is defined on a ViT; measured in docs/qscore.md).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_EPS = 4.0  # v2 "highly activating" threshold in per-sample stds (second-hand, docs/methods.md §4)
DEFAULT_PERCENTILES: tuple[float, float] = (50.0, 95.0)  # v2 band of non-zero activation rates (second-hand)
EPS_STEP = 0.25  # grid of `eps_for_coverage`
EPS_MIN = 0.5  # lowest eps `eps_for_coverage` goes to
# elements of the (grid x rows x features) masks of `eps_for_coverage` per block of rows: 16 Mi, ~100 MiB at peak
# (a bool mask plus the count's wider copy), whatever the number of rows
MAX_MASK_ELEMENTS = 2**24
TINY = 1e-12  # floor of sigma and of the L1 norm: a constant or all-zero row gets z = 0, q = 0 instead of NaN


def feature_matrix(h: Tensor) -> Tensor:
    """`h` checked to be (N, D), as floats: every score is per row of such a matrix."""
    if h.ndim != 2:
        raise ValueError(f"Q-score features must be a (N, D) matrix, got shape {tuple(h.shape)}")
    return h if h.is_floating_point() else h.float()


def row_mean_std(h: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row mean and population std (unbiased=False), each (N,)."""
    return h.mean(dim=1), h.std(dim=1, unbiased=False)


def degenerate_rows(h: Tensor) -> Tensor:
    """Bool (N,): rows with no spread to score, all zero or constant (sigma_i <= 1e-6 max_j |h_ij|, allowing for
    rounding). Their z and Q rest on the TINY floors alone."""
    h = feature_matrix(h).detach()
    return h.std(dim=1, unbiased=False) <= 1e-6 * h.abs().amax(dim=1)


def v1_input(h: Tensor, l2_normalize: bool = True) -> Tensor:
    """h' of the v1 metrics: h / ||h||_2 row-wise (F.normalize, eps 1e-12) or h itself."""
    h = feature_matrix(h)
    return F.normalize(h, dim=1, eps=TINY) if l2_normalize else h


def z_score_of_max(h: Tensor) -> Tensor:
    """z_i = (max_j h_ij - mu_i) / max(sigma_i, TINY), on the rows as given (differentiable)."""
    mu, sigma = row_mean_std(h)
    return (h.max(dim=1).values - mu) / sigma.clamp_min(TINY)


def q_v1(h: Tensor, *, l2_normalize: bool = True) -> Tensor:
    """Q-score v1 per sample: z_i / max(||h'_i||_1, TINY), with h' = `v1_input(h, l2_normalize)` (differentiable)."""
    hp = v1_input(h, l2_normalize)
    return z_score_of_max(hp) / hp.abs().sum(dim=1).clamp_min(TINY)


def highly_active(h: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Bool (N, D): j in L_i, i.e. h_ij > mu_i + eps * sigma_i (population std)."""
    h = feature_matrix(h)
    mu, sigma = row_mean_std(h.detach())
    return h.detach() > (mu + eps * sigma).unsqueeze(1)


def activation_rates(h: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """A_j = share of rows in which feature j is highly activating, (D,) float."""
    return highly_active(h, eps).float().mean(dim=0)


def discriminative_features(rates: Tensor, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> Tensor:
    """Bool (D,): A_j > 0 and P_lo <= A_j <= P_hi, the percentiles taken over the non-zero A_j only."""
    lo, hi = (float(p) for p in percentiles)
    if not 0.0 <= lo <= hi <= 100.0:
        raise ValueError(f"Q-score percentiles must satisfy 0 <= low <= high <= 100, got {tuple(percentiles)}")
    nonzero = rates[rates > 0]
    if nonzero.numel() == 0:
        return torch.zeros_like(rates, dtype=torch.bool)
    q = torch.tensor([lo / 100.0, hi / 100.0], dtype=torch.float64, device=rates.device)
    bounds = torch.quantile(nonzero.double(), q)
    r = rates.double()
    return (r > 0) & (r >= bounds[0]) & (r <= bounds[1])


def v2_selection(h: Tensor, *, eps: float = DEFAULT_EPS, percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                 rates: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(L, D, L ∩ D): bool (N, D) highly-active mask, bool (D,) discriminative features, their intersection (N, D).

    Selections are made on detached values: they are sets, not functions to differentiate."""
    high = highly_active(h, eps)
    if rates is None:
        rates = high.float().mean(dim=0)
    elif rates.shape != (h.shape[1],):
        raise ValueError(f"activation rates of shape {tuple(rates.shape)} do not fit features of width {h.shape[1]}")
    disc = discriminative_features(rates.to(h.device), percentiles)
    return high, disc, high & disc.unsqueeze(0)


def check_v2_settings(eps: float, percentiles: Sequence[float], coverage: float | None) -> None:
    """Refuse v2 settings no selection can use (eps <= 0, a percentile band outside 0 <= low <= high <= 100, a
    coverage target outside (0, 1]), naming the setting: at construction, not at the first batch."""
    lo, hi = (float(p) for p in percentiles)
    if not eps > 0:
        raise ValueError(f"Q-score v2 eps must be > 0 (h_ij > mu_i + eps * sigma_i), got {eps}")
    if not 0.0 <= lo <= hi <= 100.0:
        raise ValueError(f"Q-score percentiles must satisfy 0 <= low <= high <= 100, got {tuple(percentiles)}")
    if coverage is not None and not 0.0 < coverage <= 1.0:
        raise ValueError(f"v2 coverage target must be in (0, 1], got {coverage}")


def _above(h: Tensor, mu: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
    """Bool (G, n, D): h_ij > mu_i + eps_g * sigma_i for every eps_g of the grid, on a block of rows."""
    return h.unsqueeze(0) > (mu.unsqueeze(0) + eps.unsqueeze(1) * sigma.unsqueeze(0)).unsqueeze(2)


def eps_for_coverage(h: Tensor, coverage: float, *, eps_max: float = DEFAULT_EPS, step: float = EPS_STEP,
                     eps_min: float = EPS_MIN, percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                     max_mask_elements: int = MAX_MASK_ELEMENTS) -> float:
    """The largest eps on the grid eps_max, eps_max - step, ..., eps_min at which at least `coverage` of the rows of
    h have L_i ∩ D non-empty (D from h's own rates at that eps); eps_min when none does. eps never goes above
    `eps_max`: an `eps_max` at or below `eps_min` is returned as it is (honoured, not raised to the floor).

    Why: v2's eps = 4 assumes sparse, heavy-tailed rows (ReLU ResNet features). A ViT's CLS after LayerNorm is
    Gaussian-like (the demo ViT: median max z 2.6 over 128 features), so eps = 4 selects nothing and every q_v2 is
    0. Lowering eps only as far as the selection needs keeps eps = 4 wherever it already works (docs/qscore.md).

    Every eps of the grid is tested at once on a block of rows (G x n x D masks, at most `max_mask_elements`
    elements): a training batch is one block (one host sync per step); the report's whole reference set (e.g. a
    train split) goes in blocks, two passes (the rates A_j are row means, then the coverage a row count), with the
    same result as one block and memory bounded by the block (it was ~67 bytes per feature value: 163 GiB for
    ImageNet-1k train x 2048)."""
    check_v2_settings(eps_max, percentiles, coverage)
    if eps_max <= eps_min:
        return float(eps_max)
    grid, eps = [], float(eps_max)
    while eps > eps_min:
        grid.append(eps)
        eps = round(eps - step, 10)
    h = feature_matrix(h).detach()
    n, d = h.shape
    if n == 0:
        return float(eps_min)
    mu, sigma = row_mean_std(h)
    eps_t = torch.tensor(grid, dtype=h.dtype, device=h.device)
    rows = max(1, max_mask_elements // max(1, len(grid) * d))
    blocks = [slice(start, start + rows) for start in range(0, n, rows)]
    counts = sum(_above(h[b], mu[b], sigma[b], eps_t).sum(dim=1) for b in blocks)  # (G, D) int64, exact
    # / n in float32 as `.float().mean(dim=1)` (what `v2_selection` computes) gives it, bit for bit
    rates = (counts.float() / n).double()
    lo, hi = (float(p) / 100.0 for p in percentiles)
    q = torch.tensor([lo, hi], dtype=torch.float64, device=h.device)
    bounds = torch.nanquantile(rates.masked_fill(rates <= 0, float("nan")), q, dim=1)  # (2, G), over non-zero A_j
    disc = (rates > 0) & (rates >= bounds[0].unsqueeze(1)) & (rates <= bounds[1].unsqueeze(1))
    covered = sum((_above(h[b], mu[b], sigma[b], eps_t) & disc.unsqueeze(1)).any(dim=2).sum(dim=1) for b in blocks)
    first = torch.nonzero(covered.float() / n >= coverage).flatten()[:1].tolist()
    return grid[first[0]] if first else float(eps_min)


def q_v2(h: Tensor, *, eps: float = DEFAULT_EPS, percentiles: Sequence[float] = DEFAULT_PERCENTILES,
         rates: Tensor | None = None, standardize: bool = False, fallback: bool = False) -> Tensor:
    """Q-score v2 per sample: mean over j in L_i ∩ D of (h_ij - mu_i), divided by sigma_i when `standardize`
    (differentiable in h through h_ij, mu_i and sigma_i; the sets are fixed by the current values).

    A sample with L_i ∩ D empty gets 0 and no gradient; with `fallback` (what the regulariser uses, so that its
    gradient reaches exactly those samples) it is scored on its strongest discriminative feature instead,
    argmax_{j in D} h_ij (argmax over all features when D is empty)."""
    h = feature_matrix(h)
    _, disc, sel = v2_selection(h, eps=eps, percentiles=percentiles, rates=rates)
    if fallback:
        pool = disc if disc.any() else torch.ones_like(disc)
        best = h.detach().masked_fill(~pool.unsqueeze(0), float("-inf")).argmax(dim=1)
        empty = ~sel.any(dim=1)
        sel = sel | (F.one_hot(best, h.shape[1]).bool() & empty.unsqueeze(1))
    sel = sel.to(h.dtype)
    mu, sigma = row_mean_std(h)
    excess = h - mu.unsqueeze(1)
    if standardize:
        excess = excess / sigma.clamp_min(TINY).unsqueeze(1)
    return (excess * sel).sum(dim=1) / sel.sum(dim=1).clamp_min(1.0)
