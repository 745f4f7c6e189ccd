"""The `sslpipe` command. Subcommands only parse arguments and call library functions (imported lazily, so that
`sslpipe --help` is instant and one stage's dependencies never slow another's start)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_shards(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="write WebDataset tar shards + manifest.json from images or a bundled data set")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=["fashion-mnist", "digits"], help="a bundled data set")
    src.add_argument("--folder", help="an image folder with one sub-folder per class (like ImageFolder)")
    src.add_argument("--list", dest="list_file", help="a list file: `path [label]` per line")
    src.add_argument("--seg-list", help="a list file: `image_path label_png_path` per line (segmentation)")
    p.add_argument("out", help="output directory (refused if it is not empty, unless --force)")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--max-shard-bytes", type=int, default=None, help="also start a new shard past this size")
    p.add_argument("--val-fraction", type=float, default=0.0, help="held-out fraction for sources with no split")
    p.add_argument("--reencode", choices=["jpg", "png"], default=None, help="re-encode images (default: keep bytes)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    p.add_argument("--max-side", type=int, default=None, help="downscale so the longer side is at most this")
    p.add_argument("--limit", type=int, default=None, help="bundled data sets: only the first N samples per split")
    p.add_argument("--workers", type=int, default=1, help="processes that read and encode images")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")


def _run_shards(args: argparse.Namespace) -> int:
    from sslpipe.data.shards import write_shards

    source, kind = (
        (args.dataset, "dataset") if args.dataset else
        (args.folder, "folder") if args.folder else
        (args.list_file, "list") if args.list_file else
        (args.seg_list, "seg-list")
    )
    manifest = write_shards(
        args.out, source=source, kind=kind, samples_per_shard=args.samples_per_shard,
        max_shard_bytes=args.max_shard_bytes, val_fraction=args.val_fraction, reencode=args.reencode,
        quality=args.quality, max_side=args.max_side, limit=args.limit, num_workers=args.workers,
        seed=args.seed, force=args.force, created_by="sslpipe " + " ".join(sys.argv[1:]),
    )
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shards")
    if manifest.get("skipped"):
        print(f"skipped {len(manifest['skipped'])} unreadable images (listed in {args.out}/manifest.json)")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain with a YAML recipe (works under `accelerate launch -m sslpipe train`)")
    p.add_argument("recipe", help="a YAML recipe, e.g. recipes/demo_ibot.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=1e-3 train.epochs=10")
    p.add_argument("--resume", default=None,
                   help="`auto` (newest run in output_dir with a checkpoint), a run directory or a checkpoint")


def _run_train(args: argparse.Namespace) -> int:
    from sslpipe.config import load_config
    from sslpipe.engine.trainer import train

    cfg = load_config(args.recipe, args.overrides)
    run_dir = train(cfg, resume=args.resume)
    print(f"run directory: {run_dir}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's backbone as model.safetensors + config.json (loads in timm)")
    p.add_argument("run", help="a run directory")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher")
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the newest)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/export/WHICH)")


def _run_export(args: argparse.Namespace) -> int:
    from sslpipe.export import export_run

    out = export_run(args.run, which=args.which, out=args.out, checkpoint=args.checkpoint)
    print(f"exported {args.which} backbone to {out}")
    return 0


def _add_probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("backbone", help="an export folder (or its model.safetensors)")
    p.add_argument("--data", required=True, help="shard directory with manifest.json (or a shard pattern)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--resize", type=int, default=None, help="eval resize (default: the export's image size x 256/224)")
    p.add_argument("--crop", type=int, default=None, help="eval centre crop (default: the export's image size)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--max-train", type=int, default=None, help="use only the first N train samples")
    p.add_argument("--max-val", type=int, default=None, help="use only the first N val samples")
    p.add_argument("--out", default=None, help="write the result JSON here")


def _add_knn(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("knn", help="weighted kNN probe (DINO protocol) of an exported backbone, with faiss")
    _add_probe_args(p)
    p.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200])
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--cache", default=None, help="folder to cache extracted features in")


def _run_knn(args: argparse.Namespace) -> int:
    from sslpipe.eval.knn import run_knn

    result = run_knn(
        args.backbone, args.data, args.data, train_split=args.train_split, val_split=args.val_split,
        k_list=args.k, T=args.temperature, resize=args.resize, crop=args.crop, batch_size=args.batch_size,
        num_workers=args.workers, max_train=args.max_train, max_test=args.max_val, out_json=args.out,
        cache_dir=args.cache,
    )
    for k, v in result["k"].items():
        top5 = f"  top-5 {v['top5']:.4f}" if "top5" in v else ""
        print(f"k={k:<4d} top-1 {v['top1']:.4f}{top5}")
    return 0


def _add_linear(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("linear", help="linear probe on frozen features of an exported backbone")
    _add_probe_args(p)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--n-last-blocks", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="default: 0.001 x batch / 256 (DINO protocol)")


def _run_linear(args: argparse.Namespace) -> int:
    from sslpipe.eval.linear import linear_probe

    result = linear_probe(
        args.backbone, args.data, args.data, train_split=args.train_split, val_split=args.val_split,
        epochs=args.epochs, n_last_blocks=args.n_last_blocks, lr=args.lr, resize=args.resize, crop=args.crop,
        batch_size=args.batch_size, num_workers=args.workers, max_train=args.max_train, max_test=args.max_val,
        out_json=args.out,
    )
    print(f"linear probe top-1 {result['top1']:.4f}" + (f"  top-5 {result['top5']:.4f}" if "top5" in result else ""))
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="shards -> iBOT pretraining -> export -> kNN vs random init, on Fashion-MNIST")
    p.add_argument("--out", default="runs/demo", help="demo directory")
    p.add_argument("--recipe", default=None, help="recipe to pretrain (default: recipes/demo_ibot.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides for the recipe")
    p.add_argument("--force", action="store_true", help="start over in an existing demo directory")


def _run_demo(args: argparse.Namespace) -> int:
    from sslpipe.demo import run_demo

    run_demo(args.out, recipe=args.recipe, overrides=args.overrides, force=args.force)
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks, each against a reference run side by side")
    which = p.add_subparsers(dest="bench", required=True)
    loader = which.add_parser("loader", help="shard stream (fast / torchvision crops) vs ImageFolder vs ceiling")
    loader.add_argument("shards", nargs="?", default=None,
                        help="shard directory with manifest.json (default with --photos: runs/bench_photos)")
    loader.add_argument("--photos", type=int, default=None, metavar="N",
                        help="first write N 500x375 JPEG photographs (from scikit-image's bundled images) as shards")
    loader.add_argument("--recipe", default="recipes/demo_ibot.yaml", help="takes the multi-crop settings from it")
    loader.add_argument("--backend", choices=["fast", "torchvision", "device", "both", "all"], default="both",
                        help="crop backends to time (crops.backend); both = fast + torchvision, all = + device")
    loader.add_argument("--device", default=None, help="where the device backend crops (default: cuda if present)")
    loader.add_argument("--batch-size", type=int, default=64)
    loader.add_argument("--workers", type=int, default=2)
    loader.add_argument("--max-images", type=int, default=4096)
    loader.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each path counts")
    loader.add_argument("--max-seconds", type=float, default=30.0, help="time bound of the single-core ceiling")
    knn = which.add_parser("knn", help="faiss vs torch matmul+topk vs scikit-learn kNN on the same features")
    knn.add_argument("--n-train", type=int, default=50000)
    knn.add_argument("--n-test", type=int, default=10000)
    knn.add_argument("--dim", type=int, default=384)
    knn.add_argument("--k", type=int, default=20)
    ibot = which.add_parser("ibot-step", help="our iBOT training step vs one built from lightly's blocks")
    ibot.add_argument("--batch-size", type=int, default=64)
    ibot.add_argument("--steps", type=int, default=10)
    step = which.add_parser("step", help="the trainer's step of a recipe vs the bare network: time, FLOPs, MFU")
    step.add_argument("--recipe", default="recipes/demo_ibot.yaml")
    step.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    step.add_argument("--batch-size", type=int, default=None, help="default: the recipe's data.batch_size")
    step.add_argument("--steps", type=int, default=10)
    step.add_argument("--warmup", type=int, default=3)
    step.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None)
    step.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    step.add_argument("overrides", nargs="*", help="key.sub=value overrides for the recipe")
    for q in (loader, knn, ibot, step):
        q.add_argument("--out", default=None, help="also write the result as JSON here")


def _run_bench(args: argparse.Namespace) -> int:
    if args.bench == "loader":
        from sslpipe.bench.loader import run_loader_bench_from_recipe

        shards = args.shards
        if args.photos:
            from sslpipe.bench.photos import make_photo_shards

            shards = str(make_photo_shards(shards or "runs/bench_photos", args.photos))
        if shards is None:
            raise ValueError("give a shard directory, or --photos N to make one of photographs")
        backends = {"both": ("fast", "torchvision"), "all": ("fast", "torchvision", "device")}.get(
            args.backend, (args.backend,))
        result = run_loader_bench_from_recipe(shards, args.recipe, backends=backends, batch_size=args.batch_size,
                                              num_workers=args.workers, max_images=args.max_images,
                                              rounds=args.rounds, max_seconds=args.max_seconds, device=args.device)
    elif args.bench == "knn":
        from sslpipe.bench.knn import run_knn_bench

        result = run_knn_bench(n_train=args.n_train, n_test=args.n_test, dim=args.dim, k=args.k)
        print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2))
    elif args.bench == "step":
        from sslpipe.bench.step import main_print, run_step_bench

        result = run_step_bench(args.recipe, device=args.device, batch_size=args.batch_size, steps=args.steps,
                                warmup=args.warmup, mixed_precision=args.mixed_precision, overrides=args.overrides,
                                peak=args.peak_tflops)
        main_print(result)
    else:
        from sslpipe.bench.ibot_step import run_ibot_step_bench

        result = run_ibot_step_bench(batch_size=args.batch_size, steps=args.steps)
        print(json.dumps(result, indent=2))
        print(f"sslpipe iBOT step {result['sslpipe_ms']:.1f} ms, lightly-assembled {result['lightly_ms']:.1f} ms: "
              f"ratio {result['ratio_sslpipe_over_lightly']:.2f} (lower is faster)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


COMMANDS = {
    "shards": (_add_shards, _run_shards),
    "train": (_add_train, _run_train),
    "export": (_add_export, _run_export),
    "knn": (_add_knn, _run_knn),
    "linear": (_add_linear, _run_linear),
    "demo": (_add_demo, _run_demo),
    "bench": (_add_bench, _run_bench),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sslpipe",
        description="Self-supervised pretraining for vision: shards -> train (iBOT, DINO) -> export -> kNN / linear.",
        epilog="Start with `sslpipe demo`; each stage's --help lists its options.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `key=value` overrides may come before or after options (`train R.yaml --resume auto a.b=1`); argparse
    # stops filling a `*` positional at the first option, so stragglers are collected here.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return COMMANDS[args.command][1](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        # Errors we raise on bad input carry the file/key and the fix; a traceback would only hide them.
        print(f"sslpipe {args.command}: error: {err}", file=sys.stderr)
        return 2
