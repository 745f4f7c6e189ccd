"""`sslpipe demo`: the whole pipeline on the bundled Fashion-MNIST, in minutes on a laptop CPU.

Each stage calls the same library function as its own subcommand, and the demo prints that command, so a user can
replay any stage by hand: shards -> train -> export -> kNN (pretrained teacher vs the same network at random init,
with raw pixels for context) -> a table and a PNG plot in the run directory, and the run's report (RUN/report).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch

from sslpipe.data.manifest import read_manifest
from sslpipe.engine.trainer import train
from sslpipe.eval.knn import knn_classify, run_knn
from sslpipe.eval.spec import FeatureSpec, ProbeData
from sslpipe.files import write_text_atomic
from sslpipe.ingest.options import ShardOptions
from sslpipe.ingest.shards import write_shards
from sslpipe.metrics_log import current_trajectory, read_records
from sslpipe.models.backbones import backbone_args, create_backbone
from sslpipe.recipes import load_config
from sslpipe.viz.report import write_report
from sslpipe.weights.export import export_backbone
from sslpipe.weights.run_export import export_run

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo_dinov2.yaml"
KNN_K = [10, 20]


def _say(step: str, command: str) -> None:
    print(f"\n==> {step}\n    $ {command}", flush=True)


def _write_demo_shards(shards: Path) -> None:
    try:
        read_manifest(shards)
        print(f"    (reusing {shards})")
        return
    except (FileNotFoundError, ValueError):
        pass
    write_shards(shards, source="fashion-mnist", kind="dataset", options=ShardOptions(samples_per_shard=5000),
                 force=True, created_by=f"sslpipe shards --dataset fashion-mnist {shards} --samples-per-shard 5000")


def _random_init_export(cfg, out: Path) -> Path:
    """The recipe's backbone at initialisation (same seed), exported like a trained one: the kNN baseline."""
    torch.manual_seed(cfg.seed)
    m = cfg.model
    model = create_backbone(m.arch, img_size=cfg.crops.global_size, patch_size=m.patch_size, **m.kwargs)
    model_args = backbone_args(m.arch, img_size=cfg.crops.global_size, patch_size=m.patch_size, **m.kwargs)
    return export_backbone(model, out, arch=m.arch, model_args=model_args, img_size=cfg.crops.global_size,
                           mean=cfg.crops.mean, std=cfg.crops.std, source={"run": None, "which": "random-init"})


def _raw_pixel_knn(shards: Path, k_list: list[int], max_train: int | None, max_val: int | None) -> dict:
    """kNN on raw pixels, the floor a representation must clear on Fashion-MNIST (about 0.85 with k=20)."""
    import numpy as np

    from sslpipe.data.stream import build_loader

    def load(split: str, limit: int | None):
        feats, labels = [], []
        loader = build_loader(str(shards), split=split, sample_fn=lambda r: (
            torch.from_numpy(np.asarray(r["image"].convert("L"), dtype=np.float32).ravel() / 255.0), r["label"]),
            collate_fn=lambda b: (torch.stack([x for x, _ in b]), torch.tensor([y for _, y in b])),
            batch_size=1000, shuffle=False, drop_last=False)
        n = 0
        for x, y in loader:
            feats.append(x)
            labels.append(y)
            n += len(y)
            if limit and n >= limit:
                break
        x, y = torch.cat(feats), torch.cat(labels)
        return (x[:limit], y[:limit]) if limit else (x, y)

    xtr, ytr = load("train", max_train)
    xva, yva = load("val", max_val)
    return knn_classify(xtr, ytr, xva, yva, k_list, 0.07, 10)


def _plot(run_dir: Path, table: dict[str, float], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [], []
    for rec in current_trajectory(read_records(run_dir / "metrics.jsonl")):  # a re-run demo resumes its run
        if "loss" in rec and "step" in rec:
            steps.append(rec["step"])
            losses.append(rec["loss"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(steps, losses)
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    a.set_title("pretraining loss")
    names = list(table)
    bars = b.bar(names, [table[n] for n in names], color=["tab:green", "tab:gray", "tab:blue"][: len(names)])
    b.bar_label(bars, fmt="%.3f")
    b.set_ylim(0, 1)
    b.set_ylabel("kNN top-1 (k=20)")
    b.set_title("Fashion-MNIST val")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


DEMO_FILES = ("knn_pretrained.json", "knn_random_init.json", "demo_result.json")


def _remove_demo_outputs(out: Path, run_name: str) -> None:
    """What `--force` starts over from: only the folders and files the demo writes, since `--out` may be a folder
    that holds other work too (`--out runs`)."""
    for name in ("shards", run_name, "random-init"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in DEMO_FILES:
        (out / name).unlink(missing_ok=True)


def run_demo(out: str | Path = "runs/demo", *, recipe: str | Path | None = None, overrides: Sequence[str] = (),
             force: bool = False, max_train: int | None = 10000, max_val: int | None = 2000) -> dict:
    """Run every stage and return the kNN table; see the module docstring.

    The kNN probes use the first `max_train` train and `max_val` val images (10k / 2k by default, the subset the
    reference numbers in the README were measured on); None probes the full 60k / 10k.
    """
    out = Path(out)
    recipe = Path(recipe or DEFAULT_RECIPE)
    shards, run_name = out / "shards", "pretrain"
    if force:
        _remove_demo_outputs(out, run_name)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    _say("1/4 shards of the bundled Fashion-MNIST", f"sslpipe shards --dataset fashion-mnist {shards}")
    _write_demo_shards(shards)

    extra = [f"data.train={shards}", f"data.val={shards}", f"output_dir={out}", f"run_name={run_name}", *overrides]
    _say("2/4 pretraining", f"sslpipe train {recipe} {' '.join(extra)}")
    cfg = load_config(recipe, extra)
    run_dir = train(cfg, resume="auto" if (out / run_name / "checkpoints").exists() else None,
                    overrides_text=" ".join(extra))  # recorded in config.yaml: the report shows the command

    _say("3/4 export", f"sslpipe export {run_dir}")
    exported = export_run(run_dir, which="teacher")
    random_dir = _random_init_export(cfg, out / "random-init")

    size = cfg.crops.global_size
    data = ProbeData(shards, shards, max_train=max_train, max_val=max_val)
    limits = f" --max-train {max_train}" * bool(max_train) + f" --max-val {max_val}" * bool(max_val)
    _say("4/4 kNN probe", f"sslpipe knn {exported} --data {shards} --resize {size} --crop {size} --k 10 20{limits}")
    pretrained = run_knn(exported, FeatureSpec.from_export(exported, resize=size, crop=size, num_workers=1), data,
                         k_list=KNN_K, out_json=out / "knn_pretrained.json")
    print(f"    $ sslpipe knn {random_dir} --data {shards} --resize {size} --crop {size} --k 10 20{limits}")
    random_init = run_knn(random_dir, FeatureSpec.from_export(random_dir, resize=size, crop=size, num_workers=1), data,
                          k_list=KNN_K, out_json=out / "knn_random_init.json")
    raw = _raw_pixel_knn(shards, KNN_K, max_train, max_val)

    table = {"pretrained": pretrained["k"][20]["top1"], "random init": random_init["k"][20]["top1"],
             "raw pixels": raw["k"][20]["top1"]}
    png = run_dir / "demo.png"
    _plot(run_dir, table, png)
    write_text_atomic(out / "demo_result.json", json.dumps({"knn_top1_k20": table, "run": str(run_dir)}, indent=2))

    print(f"\nkNN top-1 on the Fashion-MNIST val split (k=20, T=0.07), {time.time() - start:.0f} s in all")
    print(f"  {'backbone':<14} top-1")
    for name, value in table.items():
        print(f"  {name:<14} {value:.4f}")
    print(f"plot: {png}")
    print(f"report (open in a browser, no server needed): {write_report([run_dir])}")
    return table
