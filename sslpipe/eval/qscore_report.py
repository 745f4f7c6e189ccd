"""`sslpipe qscore`: how well each label-free Q-score metric flags the samples a kNN probe gets wrong.

Features of the train and val splits are extracted once (`sslpipe.eval.features`, the backbone output before any
projection head), the weighted kNN probe (DINO protocol, `knn_classify(..., return_predictions=True)`) classifies
every val sample, and each per-sample metric of `sslpipe.eval.qscore` is scored as a detector of misclassification
with scikit-learn: AUROC (`roc_auc_score`) and AUPRC (`average_precision_score`), positive class = misclassified.

Each metric is oriented by the direction that should flag an error (`DIRECTIONS`): a low Q (v1, v2), a low z, a low
sparsity and a high L1 norm (the paper: correct samples have higher z and lower L1, sparser features); a high mean
and a low std (ours: for an L2-normalised row, std^2 = 1/D - mean^2, so both go with density). The score fed to
scikit-learn is `-value` for "low" and `value` for "high", so AUROC > 0.5 means the metric works in the expected
direction; `auroc_best` = max(AUROC, 1 - AUROC) says how informative it is either way. `auprc_correct` is the AUPRC
with the positive class = correctly classified (the paper's convention for its AUPRC could not be checked).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from sslpipe.eval.qscore import (DEFAULT_EPS, DEFAULT_ETA, DEFAULT_PERCENTILES, activation_rates, batch_summary,
                                 qscore_metrics)

DIRECTIONS: dict[str, str] = {
    "q_v1": "low", "q_v2": "low", "z": "low", "sparsity": "low", "l1": "high", "mean": "high", "std": "low",
}


def detection_scores(values: Tensor | np.ndarray, wrong: Tensor | np.ndarray, direction: str) -> dict[str, Any]:
    """AUROC / AUPRC of `values` as a detector of `wrong` (bool per sample) with scikit-learn, oriented by
    `direction` ("low": a low value flags an error). None when every sample is right or every one wrong."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    if direction not in ("low", "high"):
        raise ValueError(f"direction must be 'low' or 'high', got {direction!r}")
    v = np.asarray(values, dtype=np.float64)
    y = np.asarray(wrong, dtype=bool)
    if v.shape != y.shape:
        raise ValueError(f"{v.shape[0]} metric values but {y.shape[0]} correctness flags")
    score = -v if direction == "low" else v
    out: dict[str, Any] = {
        "direction": direction, "mean_correct": float(v[~y].mean()) if (~y).any() else None,
        "mean_wrong": float(v[y].mean()) if y.any() else None,
    }
    if y.all() or not y.any():
        return {**out, "auroc": None, "auroc_best": None, "auprc": None, "auprc_correct": None,
                "above_chance": None, "note": "all samples in one class: AUROC/AUPRC undefined"}
    auroc = float(roc_auc_score(y, score))
    return {**out, "auroc": auroc, "auroc_best": max(auroc, 1.0 - auroc),
            "auprc": float(average_precision_score(y, score)),
            "auprc_correct": float(average_precision_score(~y, -score)), "above_chance": auroc > 0.5}


def plot_distributions(metrics: dict[str, Tensor], wrong: Tensor, scores: dict[str, dict[str, Any]],
                       out_png: str | Path, title: str = "") -> Path:
    """One histogram panel per metric: correctly vs wrongly classified samples (densities), AUROC in the title."""
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
        auroc = scores[name]["auroc"]
        ax.set_title(f"{name}  AUROC {auroc:.3f}" if auroc is not None else name, fontsize=10)
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
    train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, *, k: int = 20, T: float = 0.07,
    eta: float = DEFAULT_ETA, eps: float = DEFAULT_EPS, percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    l2_normalize: bool = True, sparsity_abs: bool = False, rates_from: str = "val", num_classes: int | None = None,
    backend: str = "faiss", device: str | torch.device | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor], Tensor]:
    """The report on given features: (result dict, per-sample val metrics, bool `wrong` per val sample).

    `rates_from`: the reference set of the v2 activation rates A_j, "val" (the scored samples) or "train"."""
    from sslpipe.eval.knn import knn_classify

    if rates_from not in ("val", "train"):
        raise ValueError(f"rates_from must be 'val' or 'train', got {rates_from!r}")
    knn = knn_classify(train_x, train_y, val_x, val_y, [k], T, num_classes, backend=backend, device=device,
                       return_predictions=True)
    wrong = knn["predictions"][k].cpu() != val_y.long().cpu()
    rates = activation_rates(train_x.float(), eps) if rates_from == "train" else None
    settings = dict(eta=eta, eps=eps, percentiles=tuple(percentiles), l2_normalize=l2_normalize,
                    sparsity_abs=sparsity_abs, rates=rates)
    metrics = {name: v.cpu() for name, v in qscore_metrics(val_x.float(), **settings).items()}
    scores = {name: detection_scores(metrics[name], wrong, direction) for name, direction in DIRECTIONS.items()}
    result = {
        "knn": {"k": k, "T": T, "top1": knn["k"][k]["top1"], "backend": knn["backend"]},
        "n_train": int(len(train_x)), "n_val": int(len(val_x)), "n_wrong": int(wrong.sum()),
        "error_rate": float(wrong.float().mean()), "feature_dim": int(val_x.shape[1]),
        "settings": {**{k_: v for k_, v in settings.items() if k_ != "rates"}, "percentiles": list(percentiles),
                     "rates_from": rates_from},
        "scores": scores, "summary": batch_summary(val_x.float(), **settings),
    }
    return result, metrics, wrong


def qscore_report(
    backbone: str | Path | torch.nn.Module,
    train_spec: str | list[str],
    val_spec: str | list[str],
    *,
    train_split: str = "train",
    val_split: str = "val",
    k: int = 20,
    T: float = 0.07,
    eta: float = DEFAULT_ETA,
    eps: float = DEFAULT_EPS,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    l2_normalize: bool = True,
    sparsity_abs: bool = False,
    rates_from: str = "val",
    img_size: int | None = None,
    resize: int | None = None,
    crop: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    backend: str = "faiss",
    cache_dir: str | Path | None = None,
    out_json: str | Path | None = None,
    out_png: str | Path | None = None,
    tracker: Any = None,
    step: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Extract features of a backbone (an export folder or a module), run the kNN probe and score every Q-score
    metric as a misclassification detector. Writes `out_json` and the histogram PNG `out_png` (default: next to
    the JSON, same name .png) and logs `qscore/<metric>/auroc|auprc` and `qscore/knn_top1` through
    `tracker.log(values, step=step)` (e.g. an accelerate Accelerator)."""
    from sslpipe.eval.features import extract_train_val, prepare_backbone, report

    model, transform, source = prepare_backbone(backbone, img_size=img_size, resize=resize, crop=crop, mean=mean,
                                                std=std)
    train_x, train_y, val_x, val_y = extract_train_val(
        model, train_spec, val_spec, train_split=train_split, val_split=val_split, max_train=max_train,
        max_test=max_test, cache_dir=cache_dir, transform=transform, batch_size=batch_size, num_workers=num_workers,
        device=device, progress=progress,
    )
    result, metrics, wrong = qscore_from_features(
        train_x, train_y, val_x, val_y, k=k, T=T, eta=eta, eps=eps, percentiles=percentiles,
        l2_normalize=l2_normalize, sparsity_abs=sparsity_abs, rates_from=rates_from, backend=backend, device=device,
    )
    result["backbone"] = source
    if out_png is None and out_json is not None:
        out_png = Path(out_json).with_suffix(".png")
    if out_png is not None:
        title = f"{source or type(model).__name__}: kNN k={k} top-1 {result['knn']['top1']:.4f}"
        result["plot"] = str(plot_distributions(metrics, wrong, result["scores"], out_png, title=title))
    values = {"qscore/knn_top1": result["knn"]["top1"]}
    for name, s in result["scores"].items():
        if s["auroc"] is not None:
            values.update({f"qscore/{name}/auroc": s["auroc"], f"qscore/{name}/auprc": s["auprc"]})
    report(result, values, out_json, tracker, step)
    return result
