"""`sslpipe qscore`: how well each label-free Q-score metric flags the samples a kNN probe gets wrong.

Features of the train and val splits are extracted once (`sslpipe.eval.features`, the backbone output before any
projection head), the weighted kNN probe (DINO protocol, `knn_classify(..., return_predictions=True)`) classifies
every val sample, and each per-sample metric of `sslpipe.eval.qscore` is scored as a detector of misclassification
with scikit-learn: AUROC (`roc_auc_score`) and AUPRC (`average_precision_score`), positive class = misclassified.

Each metric is scored in the one direction fixed before looking at labels (`DIRECTIONS`): a low Q (v1, v2), a low
z, a low sparsity and a high L1 norm (the paper: correct samples have higher z and lower L1, sparser features); a
high mean and a low std (ours: for an L2-normalised row, std^2 = 1/D - mean^2, so both go with density). `auroc` is
that pre-registered AUROC, with a percentile-bootstrap interval (`auroc_ci`, resampling the scored samples);
`above_chance` is true only when the whole interval is above 0.5. The opposite direction is chosen after seeing the
labels, so it is kept apart under `post_hoc` and must not be read as a result. A score that is constant or nearly so
(fewer than `min_varying` of the samples differ from its most common value, or its whole range is within rounding)
is `degenerate`: it ranks nothing, so no AUROC is given for it (an AUROC of 0.5 would read as a measurement).
`coverage` is the share of samples whose score is defined by the metric's own selection: rows with a non-zero std
for v1 (z needs one), rows with L_i ∩ D non-empty for v2 (the others get Q = 0 and tie). `auprc_correct` is the AUPRC
with the positive class = correctly classified (the paper's convention for its AUPRC could not be checked);
`chance_auprc` is the AUPRC of a random score (the share of positives).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import Tensor

from sslpipe.eval.qscore import DEFAULT_ETA, batch_summary, qscore_metrics
from sslpipe.losses.qscore_math import (
    DEFAULT_EPS,
    DEFAULT_PERCENTILES,
    activation_rates,
    check_v2_settings,
    eps_for_coverage,
)

if TYPE_CHECKING:
    from sslpipe.eval.spec import FeatureSpec, ProbeData

DIRECTIONS: dict[str, str] = {
    "q_v1": "low", "q_v2": "low", "z": "low", "sparsity": "low", "l1": "high", "mean": "high", "std": "low",
}
DEFAULT_BOOTSTRAP = 1000  # resamples for the intervals
DEFAULT_CI = 0.95
DEFAULT_V2_COVERAGE = 0.5  # v2's eps lowered from eps (4) until half the samples have L_i ∩ D non-empty
DEFAULT_MIN_VARYING = 0.01  # a score is degenerate when fewer than 1% of the samples differ from its modal value


@dataclass(frozen=True)
class QScoreSettings:
    """How the report scores the metrics, one value per `sslpipe qscore` flag: the kNN whose mistakes are to be
    flagged (`k`, temperature `T`, `backend`), the metric options (`sslpipe.eval.qscore`: `eta`, `eps` (v2's eps, or
    its ceiling when `v2_coverage` lowers it), `percentiles`, `l2_normalize`, `sparsity_abs`, `v2_standardize`:
    q_v2 in units of each row's std), `rates_from` ("val": the scored samples, or "train": the reference set of the
    v2 activation rates) and the bootstrap / degeneracy rules (`n_boot`, `ci`, `seed`, `min_varying`)."""

    k: int = 20
    T: float = 0.07
    backend: str = "faiss"
    eta: float = DEFAULT_ETA
    eps: float = DEFAULT_EPS
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    l2_normalize: bool = True
    sparsity_abs: bool = False
    rates_from: str = "val"
    v2_coverage: float | None = DEFAULT_V2_COVERAGE
    v2_standardize: bool = True
    n_boot: int = DEFAULT_BOOTSTRAP
    ci: float = DEFAULT_CI
    seed: int = 0
    min_varying: float = DEFAULT_MIN_VARYING

    def __post_init__(self) -> None:
        object.__setattr__(self, "percentiles", tuple(self.percentiles))
        if self.rates_from not in ("val", "train"):
            raise ValueError(f"rates_from must be 'val' or 'train', got {self.rates_from!r}")
        # checked here, before any feature is extracted, not after both splits are
        check_v2_settings(self.eps, self.percentiles, self.v2_coverage)
        if self.k < 1 or not self.T > 0 or self.n_boot < 0:
            raise ValueError(f"the kNN needs k >= 1 and T > 0 and the bootstrap n_boot >= 0, got k={self.k}, "
                             f"T={self.T}, n_boot={self.n_boot}")
        if not 0 < self.ci < 1 or not 0 <= self.min_varying < 1:
            raise ValueError(f"ci must be in (0, 1) (0.95 for 95%) and min_varying in [0, 1), got ci={self.ci}, "
                             f"min_varying={self.min_varying}")


def is_degenerate(values: np.ndarray, min_varying: float = DEFAULT_MIN_VARYING) -> bool:
    """True when `values` rank (almost) nothing: the range is within float rounding of the values, or fewer than
    `min_varying` of them differ from the most common value (ties then decide any AUROC)."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    if hi - lo <= 1e-9 * max(1.0, abs(lo), abs(hi)):
        return True
    _, counts = np.unique(v, return_counts=True)
    return 1.0 - counts.max() / v.size < min_varying


def auroc_rows(y: np.ndarray, score: np.ndarray) -> np.ndarray:
    """AUROC of each row of `score` (B, N) against the labels `y` (B, N), as the Mann-Whitney statistic with average
    ranks for ties: equal to sklearn's `roc_auc_score` row by row, vectorised for the bootstrap (NaN for a row with
    one class only)."""
    from scipy.stats import rankdata

    ranks = rankdata(score, axis=1, method="average")
    pos = y.sum(axis=1).astype(np.float64)
    neg = y.shape[1] - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * y).sum(axis=1) - pos * (pos + 1) / 2) / (pos * neg)


def average_precision_rows(y: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Average precision of each row, sum over the distinct thresholds of (recall step) x precision, tied scores
    forming one threshold: equal to sklearn's `average_precision_score` row by row, vectorised for the bootstrap
    (NaN for a row without positives)."""
    order = np.argsort(-score, axis=1, kind="stable")
    s = np.take_along_axis(score, order, axis=1)
    tp = np.cumsum(np.take_along_axis(y, order, axis=1), axis=1, dtype=np.float64)
    seen = np.arange(1, y.shape[1] + 1, dtype=np.float64)
    end = np.ones_like(s, dtype=bool)
    end[:, :-1] = s[:, 1:] != s[:, :-1]  # last sample of each run of tied scores: one threshold
    tp_end = np.where(end, tp, 0.0)
    prev = np.zeros_like(tp_end)
    prev[:, 1:] = np.maximum.accumulate(tp_end, axis=1)[:, :-1]  # tp at the previous threshold (tp never falls)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(end, (tp - prev) * tp / seen, 0.0)).sum(axis=1) / tp[:, -1]


ROW_STATISTICS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "auroc": auroc_rows, "auprc": average_precision_rows,
}


def bootstrap_interval(y: np.ndarray, score: np.ndarray, statistic: str = "auroc", *,
                       n_boot: int = DEFAULT_BOOTSTRAP, ci: float = DEFAULT_CI, seed: int = 0,
                       chunk: int = 100) -> list[float] | None:
    """Percentile-bootstrap interval of `statistic` ("auroc" or "auprc", `ROW_STATISTICS`): `n_boot` resamples of
    the samples with replacement (`np.random.default_rng(seed).integers(0, n, (n_boot, n))`), a resample with one
    class only skipped; the (1 - ci) / 2 and (1 + ci) / 2 quantiles (numpy's linear interpolation). None when
    `n_boot` is 0 or no resample has both classes. Resamples are scored `chunk` at a time (memory)."""
    if n_boot <= 0:
        return None
    y = np.asarray(y, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y)))
    stats = []
    for start in range(0, n_boot, chunk):
        i = idx[start:start + chunk]
        yb = y[i]
        both = (yb.any(axis=1)) & (~yb.all(axis=1))
        stats.append(ROW_STATISTICS[statistic](yb[both], score[i[both]]))
    values = np.concatenate(stats)
    if values.size == 0:
        return None
    tail = (1.0 - ci) / 2.0 * 100.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def detection_scores(values: Tensor | np.ndarray, wrong: Tensor | np.ndarray, direction: str, *,
                     n_boot: int = DEFAULT_BOOTSTRAP, ci: float = DEFAULT_CI, seed: int = 0,
                     min_varying: float = DEFAULT_MIN_VARYING) -> dict[str, Any]:
    """AUROC / AUPRC of `values` as a detector of `wrong` (bool per sample) with scikit-learn, in the pre-registered
    `direction` ("low": a low value flags an error), with bootstrap intervals. No AUROC/AUPRC (None, and a `note`)
    when every sample is right or every one wrong, or when the score is degenerate (`is_degenerate`)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    if direction not in ("low", "high"):
        raise ValueError(f"direction must be 'low' or 'high', got {direction!r}")
    v = np.asarray(values, dtype=np.float64)
    y = np.asarray(wrong, dtype=bool)
    if v.shape != y.shape:
        raise ValueError(f"{v.shape[0]} metric values but {y.shape[0]} correctness flags")
    score = -v if direction == "low" else v
    out: dict[str, Any] = {
        "direction": direction, "n": int(v.size), "degenerate": False,
        "mean_correct": float(v[~y].mean()) if (~y).any() else None,
        "mean_wrong": float(v[y].mean()) if y.any() else None,
    }
    empty = {"auroc": None, "auroc_ci": None, "auprc": None, "auprc_ci": None, "auprc_correct": None,
             "chance_auprc": float(y.mean()) if v.size else None, "above_chance": None, "post_hoc": None}
    if y.all() or not y.any():
        return {**out, **empty, "note": "all samples in one class: AUROC/AUPRC undefined"}
    if is_degenerate(v, min_varying):
        return {**out, **empty, "degenerate": True,
                "note": f"degenerate: the score is constant on at least {1 - min_varying:.0%} of the samples, so it "
                        "ranks nothing (no AUROC; 0.5 would read as a measurement)"}
    auroc = float(roc_auc_score(y, score))
    auroc_ci = bootstrap_interval(y, score, "auroc", n_boot=n_boot, ci=ci, seed=seed)
    return {
        **out, "auroc": auroc, "auroc_ci": auroc_ci, "auprc": float(average_precision_score(y, score)),
        "auprc_ci": bootstrap_interval(y, score, "auprc", n_boot=n_boot, ci=ci, seed=seed),
        "auprc_correct": float(average_precision_score(~y, -score)), "chance_auprc": float(y.mean()),
        "above_chance": None if auroc_ci is None else auroc_ci[0] > 0.5,
        "post_hoc": {"auroc_flipped": 1.0 - auroc,
                     "note": "the opposite direction, chosen after seeing the labels: not a pre-registered result"},
    }


def coverage(metrics: dict[str, Tensor]) -> dict[str, float]:
    """Share of samples whose Q is defined by its own selection: v1 rows with a non-zero std, v2 rows with
    L_i ∩ D non-empty; and, for v2, rows with any highly activating feature (L_i non-empty)."""
    return {"q_v1": float((metrics["std"] > 0).float().mean()),
            "q_v2": float((metrics["n_high_disc"] > 0).float().mean()),
            "v2_highly_active": float((metrics["n_high"] > 0).float().mean())}


def plot_distributions(metrics: dict[str, Tensor], wrong: Tensor, scores: dict[str, dict[str, Any]],
                       out_png: str | Path, title: str = "") -> Path:
    """One histogram panel per metric: correctly vs wrongly classified samples (densities), the pre-registered AUROC
    (or "degenerate") in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(scores)
    cols = 4
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    y = np.asarray(wrong, dtype=bool)
    for ax, name in zip(axes.flat, names):
        v = metrics[name].double().cpu().numpy()
        lo, hi = float(v.min()), float(v.max())
        # a metric that is (nearly) constant, e.g. the std of L2-normalised rows whose mean is ~0: one wide bin
        tight = hi - lo <= 1e-9 * max(1.0, abs(lo), abs(hi))
        bins = np.array([lo - 0.5, hi + 0.5]) if tight else np.linspace(lo, hi, 41)
        ax.hist(v[~y], bins=bins, density=True, alpha=0.55, label=f"correct ({int((~y).sum())})", color="tab:green")
        ax.hist(v[y], bins=bins, density=True, alpha=0.55, label=f"wrong ({int(y.sum())})", color="tab:red")
        s = scores[name]
        label = "degenerate" if s["degenerate"] else "" if s["auroc"] is None else f"AUROC {s['auroc']:.3f}"
        ax.set_title(f"{name}  {label}", fontsize=10)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def qscore_from_features(
    train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, settings: QScoreSettings = QScoreSettings(), *,
    num_classes: int | None = None, device: str | torch.device | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor], Tensor]:
    """The report on given features: (result dict, per-sample val metrics, bool `wrong` per val sample).

    v2's eps is `eps_for_coverage(reference set, settings.v2_coverage, eps_max=settings.eps)` (`v2_coverage` None:
    `eps` as given); the eps used is the result's `settings.eps`. The kNN search runs on `device`."""
    from sslpipe.eval.knn import knn_classify

    s = settings
    knn = knn_classify(train_x, train_y, val_x, val_y, [s.k], s.T, num_classes, backend=s.backend, device=device,
                       return_predictions=True)
    wrong = knn["predictions"][s.k].cpu() != val_y.long().cpu()
    reference = train_x if s.rates_from == "train" else val_x
    eps_used = s.eps if s.v2_coverage is None else eps_for_coverage(reference.float(), s.v2_coverage, eps_max=s.eps,
                                                                    percentiles=s.percentiles)
    rates = activation_rates(train_x.float(), eps_used) if s.rates_from == "train" else None
    metric_args = dict(eta=s.eta, eps=eps_used, percentiles=s.percentiles, l2_normalize=s.l2_normalize,
                       sparsity_abs=s.sparsity_abs, rates=rates, standardize=s.v2_standardize)
    metrics = {name: v.cpu() for name, v in qscore_metrics(val_x.float(), **metric_args).items()}
    cover = coverage(metrics)
    boot = dict(n_boot=s.n_boot, ci=s.ci, seed=s.seed, min_varying=s.min_varying)
    scores = {name: detection_scores(metrics[name], wrong, direction, **boot) for name, direction in DIRECTIONS.items()}
    for name in ("q_v1", "q_v2"):
        scores[name]["coverage"] = cover[name]
    covered = (metrics["n_high_disc"] > 0).numpy()
    if 0 < covered.sum() < len(covered):  # v2 among the samples it selects for: how it ranks beyond "any selection"
        scores["q_v2"]["on_covered"] = detection_scores(metrics["q_v2"][covered], wrong[covered], DIRECTIONS["q_v2"],
                                                        **boot)
    result = {
        "knn": {"k": s.k, "T": s.T, "top1": knn["k"][s.k]["top1"], "backend": knn["backend"]},
        "n_train": int(len(train_x)), "n_val": int(len(val_x)), "n_wrong": int(wrong.sum()),
        "error_rate": float(wrong.float().mean()), "feature_dim": int(val_x.shape[1]),
        "settings": {**{k_: v for k_, v in metric_args.items() if k_ != "rates"}, "percentiles": list(s.percentiles),
                     "rates_from": s.rates_from, "eps_max": s.eps, "v2_coverage": s.v2_coverage, "n_boot": s.n_boot,
                     "ci": s.ci, "seed": s.seed, "min_varying": s.min_varying},
        "coverage": cover, "scores": scores, "summary": batch_summary(val_x.float(), **metric_args),
    }
    return result, metrics, wrong


def qscore_report(
    backbone: str | Path | torch.nn.Module,
    spec: FeatureSpec,
    data: ProbeData,
    settings: QScoreSettings = QScoreSettings(),
    *,
    cache_dir: str | Path | None = None,
    out_json: str | Path | None = None,
    out_png: str | Path | None = None,
    tracker: Any = None,
    step: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Extract features of a backbone (an export folder or a module) as `spec` says, run the kNN probe and score
    every Q-score metric as a misclassification detector (pre-registered direction, bootstrap intervals, coverage;
    degenerate scores get no AUROC). Writes `out_json` and the histogram PNG `out_png` (default: next to the JSON,
    same name .png) and logs `qscore/<metric>/auroc|auprc`, `qscore/coverage/<version>` and `qscore/knn_top1`
    through `tracker.log(values, step=step)` (e.g. an accelerate Accelerator)."""
    from sslpipe.eval.features import extract_train_val, prepare_backbone, report

    model, source = prepare_backbone(backbone, spec)
    train_x, train_y, val_x, val_y = extract_train_val(model, spec, data, cache_dir=cache_dir, progress=progress)
    result, metrics, wrong = qscore_from_features(train_x, train_y, val_x, val_y, settings,
                                                  num_classes=data.num_classes, device=spec.device)
    result["backbone"] = source
    if out_png is None and out_json is not None:
        out_png = Path(out_json).with_suffix(".png")
    if out_png is not None:
        title = f"{source or type(model).__name__}: kNN k={settings.k} top-1 {result['knn']['top1']:.4f}"
        result["plot"] = str(plot_distributions(metrics, wrong, result["scores"], out_png, title=title))
    values = {"qscore/knn_top1": result["knn"]["top1"],
              **{f"qscore/coverage/{name}": v for name, v in result["coverage"].items()}}
    for name, s in result["scores"].items():
        if s["auroc"] is not None:
            values.update({f"qscore/{name}/auroc": s["auroc"], f"qscore/{name}/auprc": s["auprc"]})
    report(result, values, out_json, tracker, step)
    return result


def format_qscore_report(result: dict[str, Any], ci: float) -> str:
    """The report as `sslpipe qscore` prints it: kNN, coverage, then one line per metric with its AUROC interval."""
    cover = result["coverage"]
    lines = [f"kNN k={result['knn']['k']} top-1 {result['knn']['top1']:.4f}: {result['n_wrong']} of "
             f"{result['n_val']} val samples wrong",
             f"coverage (share of samples with a non-empty selection): q_v1 {cover['q_v1']:.4f}, q_v2 "
             f"{cover['q_v2']:.4f} (v2 eps {result['settings']['eps']:g})",
             f"{'metric':<10}{'flags':>6}{'AUROC':>8}  {f'{ci:.0%} CI':<17}{'AUPRC':>8}  above 0.5 (whole CI)"]
    for name, s in result["scores"].items():
        if s["auroc"] is None:
            lines.append(f"{name:<10}{s['direction']:>6}  {'degenerate' if s['degenerate'] else 'n/a'}")
            continue
        lo, hi = s["auroc_ci"] or (float("nan"), float("nan"))
        lines.append(f"{name:<10}{s['direction']:>6}{s['auroc']:8.4f}  [{lo:.4f}, {hi:.4f}] {s['auprc']:8.4f}  "
                     f"{'yes' if s['above_chance'] else 'no'}")
    lines.append("(pre-registered directions; the flipped AUROCs in the JSON's `post_hoc` were chosen after seeing "
                 "labels)")
    if result.get("plot"):
        lines.append(f"plot: {result['plot']}")
    return "\n".join(lines)
