"""The Gram anchoring evidence (docs/evidence/gram.sh): tables per seed and the dense health over training.

    python docs/evidence/gram_report.py EVIDENCE_DIR/gram docs/img/gram_dense_health.png

Tables: kNN top-1 (k = 20) at step 1000, linear-seg mIoU on the scenes at steps 500, 700 and 1000, and the teacher's
dense health (mean cosine patch-[CLS] and patch-patch) averaged over each run's steps 800-1000 (5 points); mean ± sample std
over seeds 0, 1, 2 beside the random-init network and the constant prediction. The figure draws the dense health
every 50 steps (mean over seeds, band = min..max) and the linear-seg mIoU at each probed step.
"""
from __future__ import annotations

import functools
import json
import statistics
import sys
from pathlib import Path

ARMS = {"gram": "Gram anchoring (w 2)", "nogram": "without"}
HEALTH = ("dense/patch_cls_cos", "dense/patch_patch_cos")
SEEDS = (0, 1, 2)
PROBED = (500, 700, 1000)  # the steps whose checkpoint the linear-seg probe read


def read(path: Path, key: str) -> float | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data["k"]["20"]["top1"] if key == "knn" else data[key]


@functools.lru_cache(maxsize=None)  # the tables and the figure read each run's metrics once
def health(run: Path) -> dict[str, list[tuple[int, float]]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {key: [(r["step"], r[key]) for r in rows if key in r] for key in HEALTH}


def summary(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    cells = " / ".join("-" if v is None else f"{v:.4f}" for v in values)
    if len(got) >= 2:
        return f"{statistics.mean(got):.4f} ± {statistics.stdev(got):.4f} | {cells}"
    return f"{got[0]:.4f} (one seed) | {cells}" if got else "not run | -"


def tables(g: Path) -> str:
    out = ["| measure | arm | mean ± std | seeds 0 / 1 / 2 |", "|---|---|---|---|"]
    out.append(f"| kNN FM (step 1000) | random init | {summary([read(g / f'knn_random_s{s}.json', 'knn') for s in SEEDS])} |")
    for arm, name in ARMS.items():
        out.append(f"| kNN FM (step 1000) | {name} | {summary([read(g / f'knn_{arm}_s{s}.json', 'knn') for s in SEEDS])} |")
    base = read(g / "curve" / "seg_random_s0.json", "baseline")
    if base is not None:
        out.append(f"| linear-seg mIoU | background everywhere | {base['mIoU']:.4f} | |")
    out.append(f"| linear-seg mIoU | random init | {summary([read(g / 'curve' / 'seg_random_s0.json', 'mIoU')])} |")
    for step in PROBED:
        for arm, name in ARMS.items():
            vals = [read(g / "curve" / f"seg_{arm}_s{s}_{step}.json", "mIoU") for s in SEEDS]
            out.append(f"| linear-seg mIoU (step {step}) | {name} | {summary(vals)} |")
    for key in HEALTH:
        for arm, name in ARMS.items():
            vals = []
            for s in SEEDS:
                run = g / "runs" / f"{arm}_s{s}"
                late = [v for step, v in health(run).get(key, []) if step > 750] if run.is_dir() else []
                vals.append(statistics.mean(late) if late else None)
            out.append(f"| {key} (steps 800-1000) | {name} | {summary(vals)} |")
    return "\n".join(out)


def plot(g: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for arm, name in ARMS.items():
        runs = [health(g / "runs" / f"{arm}_s{s}") for s in SEEDS if (g / "runs" / f"{arm}_s{s}").is_dir()]
        for ax, key in zip(axes[:2], HEALTH):
            steps = sorted({step for run in runs for step, _ in run[key]})
            per_step = [[v for run in runs for st, v in run[key] if st == step] for step in steps]
            ax.plot(steps, [statistics.mean(v) for v in per_step], label=name)
            ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.25)
            ax.set_title(f"teacher {key}\n(mean, band min..max of the seeds)", fontsize=10)
        probed = [(step, [read(g / "curve" / f"seg_{arm}_s{s}_{step}.json", "mIoU") for s in SEEDS])
                  for step in PROBED]
        xs = [step for step, v in probed if None not in v]
        axes[2].errorbar(xs, [statistics.mean(v) for _, v in probed if None not in v],
                         yerr=[statistics.stdev(v) for _, v in probed if None not in v], marker="o", capsize=4,
                         label=name)
    base = read(g / "curve" / "seg_random_s0.json", "baseline")
    if base is not None:
        axes[2].axhline(base["mIoU"], color="grey", ls=":", label="background everywhere")
    rnd = read(g / "curve" / "seg_random_s0.json", "mIoU")
    if rnd is not None:
        axes[2].axhline(rnd, color="black", ls="--", label="random init")
    axes[2].set_title("linear-seg mIoU on the scenes\n(mean ± std of the seeds)", fontsize=10)
    for ax in axes:
        ax.axvline(200, color="grey", lw=0.8)  # the Gram teacher is first copied at step 200
        ax.set_xlabel("step")
        ax.set_xlim(0, 1050)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)


def main() -> None:
    g, png = Path(sys.argv[1]), Path(sys.argv[2])
    print(tables(g))
    plot(g, png)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
