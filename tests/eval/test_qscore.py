"""Q-score (docs/methods.md §4): every metric against a hand computation, the regulariser's selections and gradients,
the report's AUROC/AUPRC against scikit-learn, and `sslpipe qscore` end to end on a tiny export."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from sslpipe.eval.qscore import batch_summary, qscore_metrics
from sslpipe.eval.qscore_report import (
    QScoreSettings,
    auroc_rows,
    average_precision_rows,
    bootstrap_interval,
    coverage,
    detection_scores,
    is_degenerate,
    qscore_from_features,
)
from sslpipe.losses.qscore import QScoreRegularizer
from sslpipe.losses.qscore_math import (
    activation_rates,
    discriminative_features,
    eps_for_coverage,
    highly_active,
    q_v1,
    q_v2,
    v2_selection,
)
from sslpipe.recipes import load_config
from sslpipe.recipes.multicrop import build_qscore
from sslpipe.recipes.sections import QScoreConfig

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# ----------------------------------------------------------------------------------------------- v1, by hand
ROW0 = [0.0, 0.0, 0.0, 3.0, 1.0]
ROW1 = [1.0, 1.0, 1.0, 1.0, 2.0]


def _hand_v1(row: list[float], eta: float) -> dict[str, float]:
    """Population statistics written out with the math module, no torch."""
    n = len(row)
    mu = sum(row) / n
    sigma = math.sqrt(sum((x - mu) ** 2 for x in row) / n)
    l1 = sum(abs(x) for x in row)
    z = (max(row) - mu) / sigma
    return {"mean": mu, "std": sigma, "sparsity": sum(x < eta for x in row) / n, "l1": l1, "z": z, "q_v1": z / l1}


@pytest.mark.parametrize("device", DEVICES)
def test_v1_metrics_equal_hand_computation_raw(device: str) -> None:
    h = torch.tensor([ROW0, ROW1], device=device)
    got = qscore_metrics(h, eta=0.5, l2_normalize=False)
    # row 0: mean 0.8, var (3 * 0.64 + 4.84 + 0.04) / 5 = 1.36, z = 2.2 / sqrt(1.36), L1 4, sparsity 3/5
    assert _hand_v1(ROW0, 0.5)["z"] == pytest.approx(2.2 / math.sqrt(1.36))
    for i, row in enumerate((ROW0, ROW1)):
        for name, value in _hand_v1(row, 0.5).items():
            assert got[name][i].item() == pytest.approx(value, rel=1e-6), (i, name)


@pytest.mark.parametrize("device", DEVICES)
def test_v1_metrics_after_l2_normalisation(device: str) -> None:
    h = torch.tensor([ROW0, ROW1], device=device)
    got = qscore_metrics(h, eta=0.5)  # default: l2_normalize=True
    for i, row in enumerate((ROW0, ROW1)):
        norm = math.sqrt(sum(x * x for x in row))
        for name, value in _hand_v1([x / norm for x in row], 0.5).items():
            assert got[name][i].item() == pytest.approx(value, rel=1e-6), (i, name)
    # row 0 normalised: [0, 0, 0, 3, 1] / sqrt(10) -> 0.316 < 0.5 counts too: sparsity 4/5; z is scale-free
    assert got["sparsity"][0].item() == pytest.approx(0.8)
    assert got["z"][0].item() == pytest.approx(2.2 / math.sqrt(1.36), rel=1e-6)
    assert got["q_v1"][0].item() == pytest.approx(2.2 / math.sqrt(1.36) / (4 / math.sqrt(10)), rel=1e-6)


def test_v1_equals_the_third_party_numpy_formula() -> None:
    """FraCorti/.../utils/pies.py: ((max - mean) / np.std) / ||x||_1 of x = h / ||h||_2."""
    h = torch.rand(7, 40, generator=torch.Generator().manual_seed(0)) ** 3
    ref = []
    for row in h.double().numpy():
        x = row / np.linalg.norm(row, ord=2)
        ref.append(((np.max(x) - np.mean(x)) / np.std(x)) / np.linalg.norm(x, ord=1))
    np.testing.assert_allclose(q_v1(h).numpy(), np.array(ref), rtol=1e-5)


def test_sparsity_abs_counts_small_negative_values_only() -> None:
    h = torch.tensor([[-0.2, -0.0005, 0.0004, 0.3]])
    assert qscore_metrics(h, eta=1e-3, l2_normalize=False)["sparsity"].item() == pytest.approx(3 / 4)
    assert qscore_metrics(h, eta=1e-3, l2_normalize=False, sparsity_abs=True)["sparsity"].item() == pytest.approx(2 / 4)


# ----------------------------------------------------------------------------------------------- v2, by hand
# eps = 1 (D = 6 is too narrow for eps = 4: no value can pass mean + 4 std when D <= 17).
V2_H = [
    [5.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # mean 1,     std sqrt(20/6)=1.826,  threshold 2.826 -> L = {0}
    [0.0, 5.0, 0.0, 0.0, 0.0, 1.0],  # mean 1,     std 1.826,             threshold 2.826 -> L = {1}
    [4.0, 0.0, 4.0, 0.0, 0.0, 0.0],  # mean 4/3,   std sqrt(32/9)=1.886,  threshold 3.219 -> L = {0, 2}
    [0.0, 0.0, 0.0, 0.0, 6.0, 0.0],  # mean 1,     std sqrt(5)=2.236,     threshold 3.236 -> L = {4}
]
# A = [2/4, 1/4, 1/4, 0, 1/4, 0]; non-zero A sorted [.25, .25, .25, .5]: 50th pct .25, 95th .25 + .85 * .25 = .4625
# D = {j : .25 <= A_j <= .4625} = {1, 2, 4} (feature 0 fires too often); Q = [0 (L ∩ D empty), 5 - 1, 4 - 4/3, 6 - 1]
V2_RATES = [0.5, 0.25, 0.25, 0.0, 0.25, 0.0]
V2_Q = [0.0, 4.0, 8 / 3, 5.0]


@pytest.mark.parametrize("device", DEVICES)
def test_v2_equals_hand_computation(device: str) -> None:
    h = torch.tensor(V2_H, device=device)
    high = highly_active(h, eps=1.0)
    assert high.cpu().tolist() == [[j in s for j in range(6)] for s in ({0}, {1}, {0, 2}, {4})]
    rates = activation_rates(h, eps=1.0)
    assert rates.cpu().tolist() == V2_RATES
    assert np.percentile([0.25, 0.25, 0.25, 0.5], 95) == pytest.approx(0.4625)  # the band's upper end
    assert discriminative_features(rates).cpu().tolist() == [False, True, True, False, True, False]
    got = q_v2(h, eps=1.0)
    assert got.cpu().tolist() == pytest.approx(V2_Q, rel=1e-6)
    m = qscore_metrics(h, eps=1.0)
    assert m["q_v2"].cpu().tolist() == pytest.approx(V2_Q, rel=1e-6)
    assert m["n_high"].cpu().tolist() == [1, 1, 2, 1] and m["n_high_disc"].cpu().tolist() == [0, 1, 1, 1]


def test_v2_with_reference_rates_and_band() -> None:
    h = torch.tensor(V2_H)
    # rates from another set: feature 0 now in the band, 1 out of it
    rates = torch.tensor([0.3, 0.9, 0.3, 0.0, 0.3, 0.0])
    # non-zero sorted [.3, .3, .3, .9]: 50th .3, 95th .3 + .85 * .6 = .81 -> D = {0, 2, 4}
    assert q_v2(h, eps=1.0, rates=rates).tolist() == pytest.approx([4.0, 0.0, ((4 - 4 / 3) * 2) / 2, 5.0])
    # band (0, 100) keeps every feature that ever fires
    assert q_v2(h, eps=1.0, percentiles=(0, 100)).tolist() == pytest.approx([4.0, 4.0, 8 / 3, 5.0])
    with pytest.raises(ValueError, match="percentiles"):
        q_v2(h, eps=1.0, percentiles=(95, 50))


def test_v2_fallback_and_standardize_by_hand() -> None:
    """Row 0 has L ∩ D empty: metric Q 0 and no gradient; with the fallback it is scored on its strongest feature of
    D = {1, 2, 4} (all 0, so h - mu = 0 - 1 = -1) and the gradient reaches it. `standardize` divides by sigma_i."""
    h = torch.tensor(V2_H, requires_grad=True)
    q = q_v2(h, eps=1.0)
    q.sum().backward()
    assert q.tolist() == pytest.approx(V2_Q) and h.grad[0].abs().sum().item() == 0.0
    h.grad = None
    fb = q_v2(h, eps=1.0, fallback=True)
    assert fb.tolist() == pytest.approx([-1.0, 4.0, 8 / 3, 5.0], rel=1e-6)
    fb.sum().backward()
    # d/dh_0j of (h_01 - mean_j h_0j) = [j == 1] - 1/6
    assert h.grad[0].tolist() == pytest.approx([-1 / 6, 5 / 6, -1 / 6, -1 / 6, -1 / 6, -1 / 6], rel=1e-6)
    sig = [math.sqrt(20 / 6), math.sqrt(20 / 6), math.sqrt(32 / 9), math.sqrt(5)]
    expected = [0.0] + [V2_Q[i] / sig[i] for i in (1, 2, 3)]
    assert q_v2(h.detach(), eps=1.0, standardize=True).tolist() == pytest.approx(expected, rel=1e-6)
    # no discriminative feature at all (eps = 4 on 6 features): the fallback is each row's largest feature
    assert q_v2(h.detach(), eps=4.0, fallback=True).tolist() == pytest.approx([4.0, 4.0, 8 / 3, 5.0], rel=1e-6)


def test_eps_for_coverage_by_hand() -> None:
    """V2_H row max z: 2.19, 2.19, 1.41, 2.24. From eps 4 down in steps of 0.25 nothing is selected until eps 2:
    L = {0}, {1}, {}, {4}, all rates 1/4, D = {0, 1, 4}: coverage 3/4. Lower, row 2 selects {0, 2} and feature 0
    (rate 1/2) leaves D, so row 0 drops out: 3/4 is the most any eps reaches, and a target of 1 ends at eps_min."""
    h = torch.tensor(V2_H)
    assert eps_for_coverage(h, 0.75) == 2.0 and eps_for_coverage(h, 0.5) == 2.0
    assert eps_for_coverage(h, 1.0) == 0.5 and eps_for_coverage(h, 0.8, eps_min=1.0) == 1.0
    assert eps_for_coverage(h, 0.1, eps_max=1.5) == 1.5  # the cap: eps never goes above eps_max
    # below the grid's floor (0.5) the ceiling is honoured, not raised to the floor (it returned 0.5)
    assert eps_for_coverage(h, 1.0, eps_max=0.25) == 0.25 and eps_for_coverage(h, 1.0, eps_max=0.5) == 0.5
    reg = QScoreRegularizer(eps=0.25)
    assert reg.v2_eps(h) == 0.25
    # 18 features with one spike per row: eps 4 already covers every row, so it is kept
    spikes = torch.zeros(18, 18) + torch.eye(18)
    assert eps_for_coverage(spikes, 1.0) == 4.0
    with pytest.raises(ValueError, match="coverage"):
        eps_for_coverage(h, 0.0)


@pytest.mark.parametrize("kind", ["gaussian", "relu"])
def test_eps_for_coverage_equals_the_grid_search_one_eps_at_a_time(kind: str) -> None:
    """The all-at-once search picks the eps a plain loop over the grid with `v2_selection` picks."""
    from sslpipe.losses.qscore_math import EPS_MIN, EPS_STEP

    def loop(h: torch.Tensor, coverage: float) -> float:
        eps = 4.0
        while eps > EPS_MIN:
            if v2_selection(h, eps=eps)[2].any(dim=1).float().mean().item() >= coverage:
                return eps
            eps = round(eps - EPS_STEP, 10)
        return EPS_MIN

    torch.manual_seed(0)
    for _ in range(5):
        h = torch.randn(64, 96)
        if kind == "relu":
            h = torch.relu(h) ** 3
        for target in (0.1, 0.5, 0.9, 1.0):
            assert eps_for_coverage(h, target) == loop(h, target), (kind, target)

def _eps_for_coverage_one_shot(h: torch.Tensor, coverage: float, eps_max: float = 4.0,
                               percentiles: tuple[float, float] = (50.0, 95.0)) -> float:
    """The previous implementation, verbatim in its math: the whole (G, N, D) grid of masks at once."""
    grid, eps = [], eps_max
    while eps > 0.5:
        grid.append(eps)
        eps = round(eps - 0.25, 10)
    mu, sigma = h.mean(dim=1), h.std(dim=1, unbiased=False)
    eps_t = torch.tensor(grid, dtype=h.dtype)
    high = h.unsqueeze(0) > (mu.unsqueeze(0) + eps_t.unsqueeze(1) * sigma.unsqueeze(0)).unsqueeze(2)
    rates = high.float().mean(dim=1).double()
    q = torch.tensor([percentiles[0] / 100.0, percentiles[1] / 100.0], dtype=torch.float64)
    bounds = torch.nanquantile(rates.masked_fill(rates <= 0, float("nan")), q, dim=1)
    disc = (rates > 0) & (rates >= bounds[0].unsqueeze(1)) & (rates <= bounds[1].unsqueeze(1))
    covered = (high & disc.unsqueeze(1)).any(dim=2).float().mean(dim=1)
    first = torch.nonzero(covered >= coverage).flatten()[:1].tolist()
    return grid[first[0]] if first else 0.5


def test_eps_for_coverage_in_blocks_equals_the_one_shot_search_with_bounded_masks(monkeypatch) -> None:
    """Rows in blocks (the report's whole reference set) give the eps the one-shot (G, N, D) search gave, for any
    block size down to one row; no mask is larger than the block bound (the one-shot search took ~67 bytes per
    feature value: 163 GiB for ImageNet-1k train x 2048)."""
    import sslpipe.losses.qscore_math as qm

    torch.manual_seed(0)
    cases = [torch.randn(97, 40), torch.relu(torch.randn(97, 40)) ** 3, torch.relu(torch.randn(50, 64)) ** 2]
    sizes: list[int] = []
    above = qm._above
    monkeypatch.setattr(qm, "_above", lambda *a: (lambda m: sizes.append(m.numel()) or m)(above(*a)))
    for h in cases:
        for target in (0.1, 0.5, 0.9, 1.0):
            for pct in ((50.0, 95.0), (0.0, 100.0)):
                expected = _eps_for_coverage_one_shot(h, target, percentiles=pct)
                for bound in (10**9, 14 * h.shape[1] * 7, 14 * h.shape[1], 1):  # one block, 7 rows, 1 row, 1 row
                    sizes.clear()
                    got = eps_for_coverage(h, target, percentiles=pct, max_mask_elements=bound)
                    assert got == expected, (target, pct, bound)
                    assert max(sizes) <= max(bound, 14 * h.shape[1]) and len(sizes) >= 2
    sizes.clear()
    eps_for_coverage(torch.relu(torch.randn(4000, 64)), 0.5, max_mask_elements=14 * 64 * 100)
    assert len(sizes) == 2 * 40 and max(sizes) == 14 * 64 * 100  # 40 blocks of 100 rows, two passes


def test_eps4_needs_at_least_18_features() -> None:
    """Samuelson: max z-score of D values (population std) is sqrt(D - 1); eps = 4 needs D >= 18."""
    spike = torch.zeros(2, 17)
    spike[:, 0] = 1.0
    assert not highly_active(spike, eps=4.0).any()
    spike18 = torch.zeros(2, 18)
    spike18[:, 0] = 1.0
    assert highly_active(spike18, eps=4.0)[:, 0].all()


def test_batch_summary_by_hand() -> None:
    h = torch.tensor([[1.0, 0.0, 2.0, 0.0], [3.0, 0.0, 0.0, 1.0], [2.0, 0.0, 1.0, 0.0]])
    s = batch_summary(h, eta=1e-3, eps=1.0, l2_normalize=False)
    assert s["always_active_frac"] == pytest.approx(1 / 4)  # only feature 0 is non-zero in every row
    assert s["mean_sparsity"] == pytest.approx((2 / 4 + 2 / 4 + 2 / 4) / 3)
    assert s["n_samples"] == 3 and s["n_features"] == 4


# ----------------------------------------------------------------------------------------------- regulariser
def _features(seed: int = 0, n: int = 12, d: int = 32) -> torch.Tensor:
    """Non-negative, sparse-ish features where several rows have a clear peak (so v2 finds L_i ∩ D)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(n, d, generator=g) * 0.2
    for i in range(n):
        h[i, (i % (d // 2)) + d // 4] += 3.0 + i * 0.3
        h[i, i % 3] += 2.5  # a few shared peaks
    return h


def _gaussian_features(seed: int = 0, n: int = 32, d: int = 64) -> torch.Tensor:
    """ViT-like rows (LayerNorm output): Gaussian, so no value passes mean + 4 std and v2 selects nothing."""
    h = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return (h - h.mean(1, keepdim=True)) / h.std(1, unbiased=False, keepdim=True)


def test_defaults_balanced_and_the_published_form_available() -> None:
    c = QScoreConfig()
    assert (c.version, c.reduction, c.lambda1, c.lambda2, c.alpha, c.beta, c.eps, tuple(c.percentiles)) == \
        ("v2", "balanced", 0.1, 0.1, None, None, 4.0, (50.0, 95.0))
    assert (c.v2_coverage, c.standardize) == (0.5, True)
    assert build_qscore(c) is None and isinstance(build_qscore(c.model_copy(update={"enabled": True})),
                                                   QScoreRegularizer)


def test_terms_by_hand_on_the_v2_example() -> None:
    """V2_H, eps 1, alpha fixed at 3. Q with the fallback = [-1, 4, 8/3, 5]; low rows {0, 2}. Column L1 norms
    [9, 5, 4, 0, 6, 2], beta = mean = 13/3, high columns {0, 1, 4}.
    balanced: S = mean(3 - (-1), 3 - 8/3) / mean|Q| = (13/6) / (19/6) = 13/19;
              C = mean(9, 5, 6 - 13/3 each) / (13/3) = (7/3) / (13/3) = 7/13.
    sum:      S = -(-1 + 8/3) = -5/3; C = 9 + 5 + 6 = 20."""
    h = torch.tensor(V2_H)
    reg = dict(version="v2", eps=1.0, alpha=3.0, v2_coverage=None, standardize=False)
    term, m = QScoreRegularizer(**reg, lambda1=2.0, lambda2=0.5)(h)
    assert m["qscore/sample_term"].item() == pytest.approx(2.0 * 13 / 19, rel=1e-6)
    assert m["qscore/col_term"].item() == pytest.approx(0.5 * 7 / 13, rel=1e-6)
    assert term.item() == pytest.approx(2.0 * 13 / 19 + 0.5 * 7 / 13, rel=1e-6)
    assert m["qscore/beta"].item() == pytest.approx(13 / 3) and m["qscore/low_frac"].item() == 0.5
    term, m = QScoreRegularizer(**reg, lambda1=2.0, lambda2=0.5, reduction="sum")(h)
    assert term.item() == pytest.approx(2.0 * (-5 / 3) + 0.5 * 20, rel=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "balanced"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_term_equals_the_formula(version: str, reduction: str) -> None:
    h = _features()
    reg = QScoreRegularizer(version=version, lambda1=0.3, lambda2=0.02, reduction=reduction)
    term, metrics = reg(h)
    q = q_v1(h) if version == "v1" else q_v2(h, standardize=True, fallback=True)  # eps 4 covers these rows
    col = (torch.nn.functional.normalize(h, dim=1) if version == "v1" else h).abs().sum(0)  # the matrix Q sees
    low, high = q < q.mean(), col > col.mean()
    if reduction == "sum":
        expected = -0.3 * q[low].sum() + 0.02 * col[high].sum()
    else:
        expected = (0.3 * (q.mean() - q[low]).mean() / q.abs().mean()
                    + 0.02 * (col[high] - col.mean()).mean() / col.mean())
    assert term.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["qscore/low_frac"].item() == pytest.approx(low.float().mean().item())
    assert metrics["qscore/alpha"].item() == pytest.approx(q.mean().item())


@pytest.mark.parametrize("reduction", ["sum", "balanced"])
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("device", DEVICES)
def test_sample_term_touches_only_low_q_rows_and_raises_their_q(version: str, device: str, reduction: str) -> None:
    h = _features().to(device).requires_grad_(True)
    reg = QScoreRegularizer(version=version, lambda1=1.0, lambda2=0.0, reduction=reduction)
    q_before = reg.q_scores(h).detach()
    selected = q_before < q_before.mean()
    assert 0 < int(selected.sum()) < len(h)
    if version == "v2":
        sel = v2_selection(h.detach())[2]
        assert sel.any(dim=1).all(), "every row needs L_i ∩ D non-empty for this test"
    term, _ = reg(h)
    term.backward()
    touched = h.grad.abs().sum(dim=1) > 0
    assert torch.equal(touched, selected), "the gradient must reach exactly the rows with Q_i < alpha"
    with torch.no_grad():
        stepped = h - 1e-2 * h.grad
        q_after = reg.q_scores(stepped)
        if version == "v2":
            assert torch.equal(v2_selection(stepped)[2], sel), "the step must not change the sets"
    assert (q_after[selected] > q_before[selected]).all()
    assert torch.equal(q_after[~selected], q_before[~selected])


def test_v2_term_reaches_samples_with_no_selected_feature() -> None:
    """On Gaussian (ViT-like) rows v2 with eps 4 selects nothing: the published term was identically 0 with no
    gradient; with the fallback every low-Q row gets a gradient."""
    assert not v2_selection(_gaussian_features())[2].any()
    for target in (None, 0.5):  # eps 4 kept (the fallback alone) or lowered per batch (the default)
        h = _gaussian_features().requires_grad_(True)
        reg = QScoreRegularizer(version="v2", lambda1=1.0, lambda2=0.0, v2_coverage=target)
        if target is not None:
            assert reg.v2_eps(h) == eps_for_coverage(h.detach(), 0.5) < 4.0
        q = reg.q_scores(h).detach()
        term, _ = reg(h)
        term.backward()
        low = q < q.mean()
        assert term.item() > 0 and torch.equal(h.grad.abs().sum(1) > 0, low)


@pytest.mark.parametrize(("version", "batch"), [("v1", "relu"), ("v2", "relu"), ("v1", "gaussian"), ("v2", "gaussian")])
def test_a_few_steps_of_the_term_raise_bottom_q_and_lower_high_columns(version: str, batch: str) -> None:
    """The regulariser alone (both terms, lambda 1, balanced), 5 SGD steps on a fixed batch H: the rows that start
    below alpha end with a higher mean Q, the columns that start above beta with lower L1 norms, and at the start
    neither term is under a tenth of the other."""
    h0 = _features(n=24) if batch == "relu" else _gaussian_features()
    reg = QScoreRegularizer(version=version, lambda1=1.0, lambda2=1.0)
    h = torch.nn.Parameter(h0.clone())
    q0 = reg.q_scores(h0)
    col0 = reg.q_input(h0).abs().sum(0)
    low, high = q0 < q0.mean(), col0 > col0.mean()
    _, m = reg(h0)
    ratio = m["qscore/sample_term"].item() / m["qscore/col_term"].item()
    assert 0.1 < ratio < 10, f"unbalanced terms: sample / column = {ratio:.3g}"
    opt = torch.optim.SGD([h], lr=0.5 if version == "v2" else 0.05)
    for _ in range(5):
        opt.zero_grad()
        reg(h)[0].backward()
        opt.step()
    with torch.no_grad():
        q1 = reg.q_scores(h)
        col1 = reg.q_input(h).abs().sum(0)
    assert q1[low].mean() > q0[low].mean()
    assert (col1[high] < col0[high]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_column_term_touches_only_columns_above_beta(device: str) -> None:
    h = _features().to(device)
    h[0, 5] = -4.0  # a negative entry: |h| counts, its gradient sign is negative
    h.requires_grad_(True)
    term, metrics = QScoreRegularizer(lambda1=0.0, lambda2=0.5, reduction="sum")(h)
    term.backward()
    col = h.detach().abs().sum(0)
    high = col > col.mean()
    assert torch.equal(h.grad.abs().sum(0) > 0, high)
    torch.testing.assert_close(h.grad[:, high], 0.5 * torch.sign(h.detach()[:, high]))
    assert metrics["qscore/col_high_frac"].item() == pytest.approx(high.float().mean().item())
    h.grad = None
    QScoreRegularizer(lambda1=0.0, lambda2=0.5)(h)[0].backward()  # balanced: 0.5 / (#high * mean column norm)
    torch.testing.assert_close(h.grad[:, high], 0.5 * torch.sign(h.detach()[:, high]) / (high.sum() * col.mean()))


def test_column_term_penalises_a_feature_active_everywhere_more_than_a_rare_one() -> None:
    n, d = 16, 32
    h = torch.full((n, d), 0.0)
    h[:, 2:] = 0.3  # 30 moderately active columns: norm 4.8 each
    h[:, 0] = 1.0  # fires in every sample: norm 16
    h[:2, 1] = 1.0  # fires in 2 samples: norm 2
    h.requires_grad_(True)
    reg = QScoreRegularizer(lambda1=0.0, lambda2=1.0, reduction="sum")
    term, metrics = reg(h)
    beta = metrics["qscore/beta"].item()
    assert beta == pytest.approx((16 + 2 + 30 * 4.8) / 32)
    term.backward()
    penalty = (h.detach().abs().sum(0) * (h.detach().abs().sum(0) > beta))
    assert penalty[0].item() == pytest.approx(16.0) and penalty[1].item() == 0.0
    with torch.no_grad():
        stepped = h - 0.05 * h.grad
    drop = h.detach().abs().sum(0) - stepped.abs().sum(0)
    assert drop[0].item() == pytest.approx(16 * 0.05, rel=1e-5) and drop[1].item() == 0.0


def test_fixed_alpha_beta_and_shape_errors() -> None:
    h = _features()
    term, m = QScoreRegularizer(version="v1", lambda1=1.0, lambda2=1.0, alpha=1e9, beta=1e9, reduction="sum")(h)
    assert term.item() == pytest.approx(-q_v1(h).sum().item(), rel=1e-6)  # every row selected, no column
    assert m["qscore/low_frac"].item() == 1.0 and m["qscore/col_high_frac"].item() == 0.0
    with pytest.raises(ValueError, match=r"\(M, l\)"):
        QScoreRegularizer()(torch.zeros(2, 3, 4))
    with pytest.raises(Exception, match="version"):
        QScoreRegularizer(version="v3")


@pytest.mark.parametrize("kw", [{"version": "v1"}, {"version": "v1", "l2_normalize": False},
                                {"version": "v2", "v2_coverage": None, "eps": 1.5},
                                {"version": "v1", "reduction": "sum"}])
def test_a_dead_row_is_left_out_with_no_gradient(kw: dict) -> None:
    """A dead row (all zero: a ReLU + pool vector that never fires) has no Q to raise. The term, its metrics and the
    other rows' gradients equal those of the batch without it (its column norms are 0), and it gets a zero
    gradient, not the ~1e34 that the TINY floors gave (enough to overflow the step in half precision). A constant
    row is left out of the sample term too."""
    kw = {"lambda1": 1.0, "lambda2": 1.0, **kw}
    h = _features(n=10)
    reference = h.clone().requires_grad_(True)
    with_dead = torch.cat([h[:4], torch.zeros(1, h.shape[1]), h[4:]]).requires_grad_(True)
    t_ref, m_ref = QScoreRegularizer(**kw)(reference)
    t_dead, m_dead = QScoreRegularizer(**kw)(with_dead)
    t_ref.backward()
    t_dead.backward()
    assert t_dead.item() == pytest.approx(t_ref.item(), rel=1e-5)
    assert m_dead["qscore/degenerate_frac"].item() == pytest.approx(1 / 11) and m_ref["qscore/degenerate_frac"] == 0
    for key in ("qscore/alpha", "qscore/q_mean", "qscore/sample_term", "qscore/col_term"):
        assert m_dead[key].item() == pytest.approx(m_ref[key].item(), rel=1e-5), key
    assert torch.equal(with_dead.grad[4], torch.zeros(h.shape[1]))
    torch.testing.assert_close(torch.cat([with_dead.grad[:4], with_dead.grad[5:]]), reference.grad)

    constant = torch.cat([h, torch.full((1, h.shape[1]), 0.7)]).requires_grad_(True)
    term, m_const = QScoreRegularizer(**{**kw, "alpha": 1e9})(constant)  # every live row is below alpha
    term.backward()
    assert m_const["qscore/low_frac"].item() == pytest.approx(10 / 11)
    assert torch.equal(constant.grad[10], torch.zeros(h.shape[1])) and constant.grad[:10].abs().sum() > 0

    # every row degenerate (a dead ReLU + pool batch, a collapsed representation): no Q to raise, so the sample term
    # is 0 and the term is the column term alone, finite (it was NaN: alpha = the mean of no row)
    for batch in (torch.zeros(8, h.shape[1]), torch.full((8, h.shape[1]), 0.7)):
        batch = batch.requires_grad_(True)
        term, m = QScoreRegularizer(**kw)(batch)
        term.backward()
        assert torch.isfinite(term) and m["qscore/sample_term"].item() == 0.0
        assert term.item() == pytest.approx(m["qscore/col_term"].item(), abs=1e-12)
        assert m["qscore/alpha"].item() == 0.0 and m["qscore/q_mean"].item() == 0.0
        assert m["qscore/degenerate_frac"].item() == 1.0 and torch.isfinite(batch.grad).all()
    assert QScoreRegularizer(**kw)(torch.zeros(8, h.shape[1]))[0].item() == 0.0  # no column above beta either


# ----------------------------------------------------------------------------------------------- report
def test_detection_scores_by_hand_and_against_sklearn() -> None:
    v = np.array([0.1, 0.4, 0.35, 0.8, 0.2])
    wrong = np.array([True, False, False, True, False])
    s = detection_scores(v, wrong, "low", n_boot=0)
    # scores -v; wrong ones at -0.1 (above all 3 correct) and -0.8 (below all): AUROC 3/6; AP (1/1 + 2/5) / 2
    assert s["auroc"] == pytest.approx(0.5) and s["auprc"] == pytest.approx(0.7)
    assert s["auroc"] == pytest.approx(roc_auc_score(wrong, -v)) and s["chance_auprc"] == pytest.approx(0.4)
    assert s["auroc_ci"] is None and s["above_chance"] is None and not s["degenerate"]
    high = detection_scores(v, wrong, "high", n_boot=0)
    assert high["auroc"] == pytest.approx(roc_auc_score(wrong, v))
    assert high["auprc"] == pytest.approx(average_precision_score(wrong, v))
    assert detection_scores(v, np.zeros(5, bool), "low")["auroc"] is None


def test_flipped_direction_is_reported_apart_as_post_hoc() -> None:
    # "low" flags errors, but here the wrong samples have the highest values: AUROC 0 pre-registered, 1 flipped
    v = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    wrong = np.array([False, False, False, True, True])
    s = detection_scores(v, wrong, "low", n_boot=50)
    assert s["auroc"] == 0.0 and s["above_chance"] is False
    assert set(s["post_hoc"]) == {"auroc_flipped", "note"} and s["post_hoc"]["auroc_flipped"] == 1.0
    assert "auroc_best" not in s


def test_degenerate_scores_get_no_auroc() -> None:
    wrong = np.arange(1000) % 4 == 0
    constant = np.zeros(1000)
    s = detection_scores(constant, wrong, "low")
    assert s["degenerate"] and s["auroc"] is None and s["post_hoc"] is None and "degenerate" in s["note"]
    nearly = constant.copy()
    nearly[:9] = 1.0  # 0.9% of the samples differ from the modal value: below the 1% floor
    assert is_degenerate(nearly) and detection_scores(nearly, wrong, "low")["auroc"] is None
    nearly[:10] = 1.0  # 1.0%: ranked
    assert not is_degenerate(nearly)
    assert is_degenerate(np.full(10, 0.03125) + np.arange(10) * 1e-13)  # a range within float rounding
    assert not is_degenerate(np.array([0.0, 0.0, 1.0]))


@pytest.mark.parametrize("ties", [False, True])
def test_row_statistics_equal_sklearn(ties: bool) -> None:
    """The vectorised AUROC / AP of the bootstrap against scikit-learn row by row, with and without tied scores."""
    rng = np.random.default_rng(3)
    y = rng.random((12, 40)) < 0.35
    y[:, 0], y[:, 1] = True, False
    score = rng.random((12, 40)) + 0.3 * y
    if ties:
        score = np.round(score * 3) / 3
    np.testing.assert_allclose(auroc_rows(y, score), [roc_auc_score(a, b) for a, b in zip(y, score)], atol=1e-12)
    np.testing.assert_allclose(average_precision_rows(y, score),
                               [average_precision_score(a, b) for a, b in zip(y, score)], atol=1e-12)
    # by hand: scores [3, 2, 2, 1], labels [1, 0, 1, 0]: AUROC (1 + 1 + 0.5 + 1) / 4; AP 1/2 * 1 + 1/2 * 2/3
    y1, s1 = np.array([[True, False, True, False]]), np.array([[3.0, 2.0, 2.0, 1.0]])
    assert auroc_rows(y1, s1)[0] == pytest.approx(3.5 / 4)
    assert average_precision_rows(y1, s1)[0] == pytest.approx(0.5 + 1 / 3)


def test_bootstrap_interval_equals_a_reference_loop_and_perfect_separation() -> None:
    rng = np.random.default_rng(1)
    y = rng.random(60) < 0.3
    score = y + rng.normal(0, 1.0, 60)
    idx = np.random.default_rng(7).integers(0, 60, size=(200, 60))
    for statistic, reference in (("auroc", roc_auc_score), ("auprc", average_precision_score)):
        got = bootstrap_interval(y, score, statistic, n_boot=200, ci=0.9, seed=7, chunk=64)
        ref = [reference(y[i], score[i]) for i in idx if 0 < y[i].sum() < 60]
        assert got == pytest.approx(list(np.percentile(ref, [5.0, 95.0]))), statistic
        assert got[0] < reference(y, score) < got[1]
    # a score that separates perfectly has AUROC 1 on every resample: the interval is [1, 1]
    perfect = detection_scores(np.arange(20.0), np.arange(20) < 5, "low", n_boot=100)
    assert perfect["auroc"] == 1.0 and perfect["auroc_ci"] == pytest.approx([1.0, 1.0]) and perfect["above_chance"]
    assert perfect["auprc_ci"] == pytest.approx([1.0, 1.0])


def test_coverage_by_hand() -> None:
    """V2_H with eps 1: L ∩ D non-empty for rows 1-3 (3/4), L non-empty for all; v1 needs a non-zero std (a
    constant fifth row has none)."""
    m = qscore_metrics(torch.tensor(V2_H), eps=1.0)
    assert coverage(m) == {"q_v1": 1.0, "q_v2": 0.75, "v2_highly_active": 1.0}
    m = qscore_metrics(torch.tensor(V2_H + [[1.0] * 6]), eps=1.0)
    assert coverage(m)["q_v1"] == pytest.approx(4 / 5)


def _clustered(seed: int, n: int, d: int = 24, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centres = torch.rand(classes, d, generator=torch.Generator().manual_seed(99)) * 2
    return (centres[y] + torch.randn(n, d, generator=g) * 0.9).relu(), y


@pytest.mark.parametrize("rates_from", ["val", "train"])
def test_report_equals_sklearn_on_the_same_inputs(rates_from: str) -> None:
    from sslpipe.eval.knn import knn_classify

    train_x, train_y = _clustered(0, 200)
    val_x, val_y = _clustered(1, 120)
    settings = QScoreSettings(k=10, backend="torch", rates_from=rates_from, n_boot=20)
    result, metrics, wrong = qscore_from_features(train_x, train_y, val_x, val_y, settings)
    preds = knn_classify(train_x, train_y, val_x, val_y, [10], 0.07, backend="torch",
                         return_predictions=True)["predictions"][10]
    expected_wrong = (preds != val_y).numpy()
    assert np.array_equal(wrong.numpy(), expected_wrong) and 0 < expected_wrong.sum() < len(val_y)
    eps = result["settings"]["eps"]  # v2's eps lowered to cover half the reference samples
    assert eps == eps_for_coverage(train_x if rates_from == "train" else val_x, 0.5)
    rates = activation_rates(train_x, eps) if rates_from == "train" else None
    ref = qscore_metrics(val_x, eps=eps, rates=rates, standardize=True)
    assert result["coverage"] == coverage(ref)
    for name, s in result["scores"].items():
        if s["degenerate"]:
            assert s["auroc"] is None
            continue
        oriented = -ref[name].numpy() if s["direction"] == "low" else ref[name].numpy()
        assert s["auroc"] == pytest.approx(roc_auc_score(expected_wrong, oriented)), name
        assert s["auprc"] == pytest.approx(average_precision_score(expected_wrong, oriented)), name
        assert s["auprc_correct"] == pytest.approx(average_precision_score(~expected_wrong, -oriented)), name
    assert result["n_wrong"] == int(expected_wrong.sum())


def test_report_uses_the_eps_it_is_given_below_the_grid_floor() -> None:
    """`sslpipe qscore --eps 0.25` wrote settings.eps = 0.5: the grid's floor replaced the ceiling."""
    train_x, train_y = _clustered(0, 80)
    val_x, val_y = _clustered(1, 40)
    for v2_coverage in (0.5, None):
        settings = QScoreSettings(k=5, backend="torch", eps=0.25, v2_coverage=v2_coverage, n_boot=0)
        result, _, _ = qscore_from_features(train_x, train_y, val_x, val_y, settings)
        assert result["settings"]["eps"] == 0.25 and result["settings"]["eps_max"] == 0.25


def test_cli_qscore_writes_json_png_and_logs(digits_shards: Path, tmp_path: Path) -> None:
    from sslpipe.cli import main
    from sslpipe.eval.qscore_report import qscore_report
    from sslpipe.eval.spec import FeatureSpec, ProbeData
    from sslpipe.models.backbones import create_backbone
    from sslpipe.weights.export import export_backbone

    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    model = create_backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    export = export_backbone(model, tmp_path / "export", arch="vit_tiny_patch16_224", model_args=args, img_size=16,
                             mean=(0.5,) * 3, std=(0.5,) * 3, source={"test": True})
    out = tmp_path / "report" / "qscore.json"
    assert main(["qscore", str(export), "--data", str(digits_shards), "--k", "10", "--max-train", "600",
                 "--max-val", "200", "--bootstrap", "200", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    assert result["n_val"] == 200 and result["n_train"] == 600 and set(result["scores"]) >= {"q_v1", "q_v2", "l1"}
    assert result["error_rate"] == pytest.approx(1 - result["knn"]["top1"])
    assert set(result["coverage"]) == {"q_v1", "q_v2", "v2_highly_active"}
    assert result["settings"]["n_boot"] == 200 and result["settings"]["eps"] <= 4.0
    for s in result["scores"].values():
        assert s["degenerate"] or (s["auroc_ci"][0] <= s["auroc"] <= s["auroc_ci"][1]
                                   and s["post_hoc"]["auroc_flipped"] == pytest.approx(1 - s["auroc"]))

    class Tracker:
        logged: dict = {}

        def log(self, values, step=None):
            self.logged.update(values)

    tracker = Tracker()
    data = ProbeData(str(digits_shards), str(digits_shards), max_train=600, max_val=200)
    again = qscore_report(export, FeatureSpec.from_export(export), data, QScoreSettings(k=10, n_boot=200),
                          tracker=tracker, progress=False)
    assert tracker.logged["qscore/q_v1/auroc"] == pytest.approx(result["scores"]["q_v1"]["auroc"])
    assert tracker.logged["qscore/coverage/q_v2"] == pytest.approx(result["coverage"]["q_v2"])
    assert again["scores"]["l1"]["auprc"] == pytest.approx(result["scores"]["l1"]["auprc"])


def test_config_section_and_overrides(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: simclr\ndata: {train: x}\nsimclr:\n  qscore: {enabled: true, version: v2}\n")
    cfg = load_config(recipe, ["simclr.qscore.lambda1=0.5", "simclr.qscore.alpha=0.1",
                               "simclr.qscore.percentiles=[40,90]"])
    q = cfg.simclr.qscore
    assert (q.enabled, q.version, q.lambda1, q.alpha) == (True, "v2", 0.5, 0.1)
    assert tuple(q.percentiles) == (40.0, 90.0) and q.beta is None
    with pytest.raises(ValueError, match="simclr.qscore.lamda1"):
        load_config(recipe, ["simclr.qscore.lamda1=1"])


@pytest.mark.parametrize("overrides, key, why", [
    (["simclr.qscore.lambda1=0.5"], "lambda1", "enabled=false"),  # the section is off: nothing in it is read
    (["simclr.qscore.enabled=false", "simclr.qscore.features=projection"], "features", "enabled=false"),
    (["simclr.qscore.enabled=true", "simclr.qscore.version=v1", "simclr.qscore.eps=2.0"], "eps", "version=v1"),
    (["simclr.qscore.enabled=true", "simclr.qscore.version=v1", "simclr.qscore.percentiles=[40,90]"], "percentiles",
     "version=v1"),
    (["simclr.qscore.enabled=true", "simclr.qscore.version=v1", "simclr.qscore.v2_coverage=0.9"], "v2_coverage",
     "version=v1"),
    (["simclr.qscore.enabled=true", "simclr.qscore.version=v1", "simclr.qscore.standardize=false"], "standardize",
     "version=v1"),
    (["simclr.qscore.enabled=true", "simclr.qscore.version=v2", "simclr.qscore.l2_normalize=false"], "l2_normalize",
     "version=v2"),
])
def test_unread_qscore_keys_are_refused_at_load_naming_the_key(tmp_path: Path, overrides: list[str], key: str,
                                                               why: str) -> None:
    """A key the chosen settings never read is refused with the method's full key and the setting that leaves it
    unread (it used to be accepted and ignored); the same keys at their defaults pass (saved configs hold them)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: simclr\ndata: {train: x}\n")
    with pytest.raises(ValueError, match=rf"override 'simclr\.qscore\.{key}=.*': key 'simclr\.qscore\.{key}' = .* "
                                         rf"not read with qscore\.{why}"):
        load_config(recipe, overrides)
    on = [o for o in overrides if o.split("=")[0].rsplit(".", 1)[1] in ("enabled", "version")]
    load_config(recipe, on)  # without the unread key the section loads
    for section in ({"enabled": True, "version": "v1", "eps": 4.0, "percentiles": [50, 95], "v2_coverage": 0.5},
                    {"enabled": False, "version": "v2", "lambda1": 0.1, "features": "backbone"}):
        assert QScoreConfig(**section).version == section["version"]


@pytest.mark.parametrize("override, message", [
    ("v2_coverage=0", "greater than 0"), ("v2_coverage=1.5", "less than or equal to 1"),
    ("percentiles=[95,50]", "0 <= low <= high <= 100"), ("percentiles=[50,150]", "0 <= low <= high <= 100"),
    ("eps=0", "greater than 0"), ("eps=-1", "greater than 0"),
])
def test_out_of_range_qscore_values_are_refused_at_load(tmp_path: Path, override: str, message: str) -> None:
    """Values the v2 selection cannot use fail at load naming the key, not at the first training step."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: simclr\ndata: {train: x}\n")
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"key 'simclr\.qscore\.{key}' = .*{message}"):
        load_config(recipe, ["simclr.qscore.enabled=true", f"simclr.qscore.{override}"])


def test_the_regulariser_and_the_report_refuse_bad_v2_settings_before_any_work() -> None:
    for bad in ({"v2_coverage": 0.0}, {"v2_coverage": 1.5}, {"percentiles": (95.0, 50.0)}, {"eps": 0.0}):
        with pytest.raises(ValueError, match="coverage|percentiles|eps"):
            QScoreRegularizer(**bad)
        with pytest.raises(ValueError, match="coverage|percentiles|eps"):
            QScoreSettings(**bad)
    for bad in ({"ci": 95.0}, {"k": 0}, {"n_boot": -1}, {"T": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            QScoreSettings(**bad)
