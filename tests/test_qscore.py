"""Q-score (SPEC.md §4): every metric against a hand computation, the regulariser's selections and gradients, the
report's AUROC/AUPRC against scikit-learn, and `sslpipe qscore` end to end on a tiny export."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from sslpipe.config import QScoreConfig, load_config
from sslpipe.eval.qscore import (activation_rates, batch_summary, discriminative_features, highly_active, q_v1, q_v2,
                                 qscore_metrics)
from sslpipe.eval.qscore_report import detection_scores, qscore_from_features
from sslpipe.losses.qscore import QScoreRegularizer, build_qscore

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


def test_defaults_are_the_published_v2_values() -> None:
    c = QScoreConfig()
    assert (c.version, c.lambda1, c.lambda2, c.alpha, c.beta, c.eps, tuple(c.percentiles)) == \
        ("v2", 1e-4, 1e-4, None, None, 4.0, (50.0, 95.0))
    assert build_qscore(c) is None and isinstance(build_qscore(c.model_copy(update={"enabled": True})),
                                                   QScoreRegularizer)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_term_equals_the_formula(version: str) -> None:
    h = _features()
    reg = QScoreRegularizer(version=version, lambda1=0.3, lambda2=0.02)
    term, metrics = reg(h)
    q = q_v1(h) if version == "v1" else q_v2(h)
    col = h.abs().sum(0)
    expected = -0.3 * q[q < q.mean()].sum() + 0.02 * col[col > col.mean()].sum()
    assert term.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["qscore/low_frac"].item() == pytest.approx((q < q.mean()).float().mean().item())
    assert metrics["qscore/alpha"].item() == pytest.approx(q.mean().item())


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("device", DEVICES)
def test_sample_term_touches_only_low_q_rows_and_raises_their_q(version: str, device: str) -> None:
    h = _features().to(device).requires_grad_(True)
    reg = QScoreRegularizer(version=version, lambda1=1.0, lambda2=0.0)
    q_before = reg.q_scores(h).detach()
    selected = q_before < q_before.mean()
    assert 0 < int(selected.sum()) < len(h)
    if version == "v2":
        from sslpipe.eval.qscore import v2_selection

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


@pytest.mark.parametrize("device", DEVICES)
def test_column_term_touches_only_columns_above_beta(device: str) -> None:
    h = _features().to(device)
    h[0, 5] = -4.0  # a negative entry: |h| counts, its gradient sign is negative
    h.requires_grad_(True)
    term, metrics = QScoreRegularizer(lambda1=0.0, lambda2=0.5)(h)
    term.backward()
    col = h.detach().abs().sum(0)
    high = col > col.mean()
    assert torch.equal(h.grad.abs().sum(0) > 0, high)
    torch.testing.assert_close(h.grad[:, high], 0.5 * torch.sign(h.detach()[:, high]))
    assert metrics["qscore/col_high_frac"].item() == pytest.approx(high.float().mean().item())


def test_column_term_penalises_a_feature_active_everywhere_more_than_a_rare_one() -> None:
    n, d = 16, 32
    h = torch.full((n, d), 0.0)
    h[:, 2:] = 0.3  # 30 moderately active columns: norm 4.8 each
    h[:, 0] = 1.0  # fires in every sample: norm 16
    h[:2, 1] = 1.0  # fires in 2 samples: norm 2
    h.requires_grad_(True)
    reg = QScoreRegularizer(lambda1=0.0, lambda2=1.0)
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
    term, m = QScoreRegularizer(version="v1", lambda1=1.0, lambda2=1.0, alpha=1e9, beta=1e9)(h)
    assert term.item() == pytest.approx(-q_v1(h).sum().item(), rel=1e-6)  # every row selected, no column
    assert m["qscore/low_frac"].item() == 1.0 and m["qscore/col_high_frac"].item() == 0.0
    with pytest.raises(ValueError, match=r"\(M, l\)"):
        QScoreRegularizer()(torch.zeros(2, 3, 4))
    with pytest.raises(Exception, match="version"):
        QScoreRegularizer(version="v3")


# ----------------------------------------------------------------------------------------------- report
def test_detection_scores_by_hand_and_against_sklearn() -> None:
    v = np.array([0.1, 0.4, 0.35, 0.8, 0.2])
    wrong = np.array([True, False, False, True, False])
    s = detection_scores(v, wrong, "low")
    # scores -v; wrong ones at -0.1 (above all 3 correct) and -0.8 (below all): AUROC 3/6; AP (1/1 + 2/5) / 2
    assert s["auroc"] == pytest.approx(0.5) and s["auprc"] == pytest.approx(0.7)
    assert s["auroc"] == pytest.approx(roc_auc_score(wrong, -v))
    high = detection_scores(v, wrong, "high")
    assert high["auroc"] == pytest.approx(roc_auc_score(wrong, v))
    assert high["auprc"] == pytest.approx(average_precision_score(wrong, v))
    assert detection_scores(v, np.zeros(5, bool), "low")["auroc"] is None


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
    result, metrics, wrong = qscore_from_features(train_x, train_y, val_x, val_y, k=10, backend="torch",
                                                  rates_from=rates_from)
    preds = knn_classify(train_x, train_y, val_x, val_y, [10], 0.07, backend="torch",
                         return_predictions=True)["predictions"][10]
    expected_wrong = (preds != val_y).numpy()
    assert np.array_equal(wrong.numpy(), expected_wrong) and 0 < expected_wrong.sum() < len(val_y)
    rates = activation_rates(train_x, 4.0) if rates_from == "train" else None
    ref = qscore_metrics(val_x, rates=rates)
    for name, s in result["scores"].items():
        oriented = -ref[name].numpy() if s["direction"] == "low" else ref[name].numpy()
        assert s["auroc"] == pytest.approx(roc_auc_score(expected_wrong, oriented)), name
        assert s["auprc"] == pytest.approx(average_precision_score(expected_wrong, oriented)), name
        assert s["auprc_correct"] == pytest.approx(average_precision_score(~expected_wrong, -oriented)), name
    assert result["n_wrong"] == int(expected_wrong.sum())


def test_cli_qscore_writes_json_png_and_logs(digits_shards: Path, tmp_path: Path) -> None:
    from sslpipe.cli import main
    from sslpipe.eval.qscore_report import qscore_report
    from sslpipe.export import export_backbone
    from sslpipe.models.backbones import create_backbone

    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    model = create_backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    export = export_backbone(model, tmp_path / "export", arch="vit_tiny_patch16_224", model_args=args, img_size=16,
                             mean=(0.5,) * 3, std=(0.5,) * 3, source={"test": True})
    out = tmp_path / "report" / "qscore.json"
    assert main(["qscore", str(export), "--data", str(digits_shards), "--k", "10", "--max-train", "600",
                 "--max-val", "200", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    assert result["n_val"] == 200 and result["n_train"] == 600 and set(result["scores"]) >= {"q_v1", "q_v2", "l1"}
    assert result["error_rate"] == pytest.approx(1 - result["knn"]["top1"])

    class Tracker:
        logged: dict = {}

        def log(self, values, step=None):
            self.logged.update(values)

    tracker = Tracker()
    again = qscore_report(export, str(digits_shards), str(digits_shards), k=10, max_train=600, max_test=200,
                          tracker=tracker, progress=False)
    assert tracker.logged["qscore/q_v1/auroc"] == pytest.approx(result["scores"]["q_v1"]["auroc"])
    assert again["scores"]["l1"]["auprc"] == pytest.approx(result["scores"]["l1"]["auprc"])


def test_config_section_and_overrides(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: simclr\ndata: {train: x}\nqscore: {enabled: true, version: v1}\n")
    cfg = load_config(recipe, ["qscore.lambda1=0.5", "qscore.alpha=0.1", "qscore.percentiles=[40,90]"])
    assert (cfg.qscore.enabled, cfg.qscore.version, cfg.qscore.lambda1, cfg.qscore.alpha) == (True, "v1", 0.5, 0.1)
    assert tuple(cfg.qscore.percentiles) == (40.0, 90.0) and cfg.qscore.beta is None
    with pytest.raises(ValueError, match="qscore.lamda1"):
        load_config(recipe, ["qscore.lamda1=1"])
