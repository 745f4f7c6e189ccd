"""The `sslpipe` command. Subcommands only parse arguments and call library functions (imported lazily, so that
`sslpipe --help` is instant and one stage's dependencies never slow another's start)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sslpipe.eval.spec import FeatureSpec, ProbeData


def _add_shards(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="write WebDataset tar shards + manifest.json from images or a bundled data set")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=["fashion-mnist", "digits", "scenes", "stardist"],
                     help="a bundled data set; `scenes`: generated segmentation scenes (Fashion-MNIST objects on "
                          "scikit-image photographs, seg.png + inst.png); `stardist`: 64-px tiles of the real "
                          "nuclei image in the stardist wheel (background/nucleus), written like --voc")
    src.add_argument("--folder", help="an image folder with one sub-folder per class (like ImageFolder)")
    src.add_argument("--list", dest="list_file", help="a list file: `path [label]` per line")
    src.add_argument("--seg-list", help="a list file: `image_path label_png_path` per line (segmentation)")
    src.add_argument("--voc", help="a PASCAL VOC style folder (JPEGImages/, SegmentationClass[Aug]/, split lists): "
                                   "writes OUT/labeled, OUT/unlabeled, OUT/val for U2PL (docs/u2pl.md)")
    src.add_argument("--cityscapes", help="a Cityscapes style folder (leftImg8bit/, gtFine/): like --voc")
    src.add_argument("--ade20k", help="an ADEChallengeData2016 folder (images/, annotations/; labels 1..150 -> 0..149, "
                                      "0 -> 255): like --voc")
    src.add_argument("--coco", help="COCO instances: a COCO folder (annotations/instances_*.json + image folders, "
                                    "splits kept) or one COCO-format json; writes seg.png + inst.png per image")
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
    p.add_argument("--classes", default=None,
                   help="--seg-list/--list: the class names in label order, a file (one per line) or a,b,c "
                        "(a seg-list names none otherwise; its label maps are checked against them)")
    p.add_argument("--coco-images", default=None, help="--coco with one json: its image folder (default: found "
                                                       "next to the json)")
    p.add_argument("--scene-size", type=int, default=64, help="scenes: image side in pixels")
    p.add_argument("--scene-train", type=int, default=2000, help="scenes: number of train images")
    p.add_argument("--scene-val", type=int, default=500, help="scenes: number of val images")
    p.add_argument("--scene-objects", default=None, metavar="MIN,MAX",
                   help="scenes: objects per image (default 1,4)")
    p.add_argument("--scene-scale", default=None, metavar="LO,HI",
                   help="scenes: object side as a fraction of the image side (default 0.35,0.7)")
    p.add_argument("--scene-classes", default=None, metavar="NAME,NAME,...",
                   help="scenes: paste only these Fashion-MNIST classes, labelled 1.. in this order "
                        "(e.g. Trouser,Sneaker,Bag; default all ten)")
    p.add_argument("--semi", action="store_true",
                   help="scenes: write labelled/unlabelled/val shard sets like --voc (with --labeled)")
    p.add_argument("--labeled", default=None,
                   help="--voc/--cityscapes/--ade20k/--semi: the labelled subset, a count (1464) or fraction "
                        "(1/16), chosen by a seeded list (--seed); the rest becomes unlabelled. Default: all labelled")
    p.add_argument("--labeled-list", default=None,
                   help="--voc/--cityscapes/--ade20k: a file of the labelled ids instead")
    p.add_argument("--voc-train", default="train",
                   help="--voc: train split (ImageSets/Segmentation/NAME.txt or a list file; U2PL: trainaug ids)")
    p.add_argument("--voc-val", default="val", help="--voc: val split (name or list file)")


def _pair(text: str, cast: type, flag: str) -> tuple:
    """`a,b` -> (cast(a), cast(b)), or a clear error naming the flag."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return cast(parts[0]), cast(parts[1])
    except ValueError:
        raise ValueError(f"{flag} takes two numbers as MIN,MAX (e.g. {flag} 1,2), got {text!r}") from None


def _scene_options(args: argparse.Namespace) -> dict:
    """The `scenes` options of `--dataset scenes` (SceneGenerator keywords besides the counts and the size)."""
    options = {"train": args.scene_train, "val": args.scene_val, "size": args.scene_size}
    if args.scene_objects:
        options["objects"] = _pair(args.scene_objects, int, "--scene-objects")
    if args.scene_scale:
        options["scale"] = _pair(args.scene_scale, float, "--scene-scale")
    if args.scene_classes:
        options["classes"] = [name.strip() for name in args.scene_classes.split(",")]
    return options


def _run_shards(args: argparse.Namespace) -> int:
    from sslpipe.ingest.options import ShardOptions
    from sslpipe.ingest.route import ShardSource, write_source
    from sslpipe.ingest.sources import parse_classes

    source = ShardSource(dataset=args.dataset, folder=args.folder, list_file=args.list_file, seg_list=args.seg_list,
                         coco=args.coco, voc=args.voc, cityscapes=args.cityscapes, ade20k=args.ade20k,
                         classes=parse_classes(args.classes) if args.classes else None, coco_images=args.coco_images,
                         scenes=_scene_options(args) if args.dataset == "scenes" else None,
                         voc_splits=(args.voc_train, args.voc_val))
    options = ShardOptions(samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_bytes,
                           val_fraction=args.val_fraction, seed=args.seed, reencode=args.reencode, quality=args.quality,
                           max_side=args.max_side, limit=args.limit)
    for line in write_source(args.out, source, options, semi=args.semi, labeled=args.labeled,
                             labeled_list=args.labeled_list, num_workers=args.workers, force=args.force,
                             created_by="sslpipe " + " ".join(sys.argv[1:])):
        print(line)
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain with a YAML recipe (works under `accelerate launch -m sslpipe train`)")
    p.add_argument("recipe", help="a YAML recipe, e.g. recipes/demo_ibot.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=1e-3 train.epochs=10")
    p.add_argument("--resume", default=None,
                   help="`auto` (newest run in output_dir with a checkpoint), a run directory or a checkpoint")


def _run_train(args: argparse.Namespace) -> int:
    from sslpipe.recipes import load_config
    from sslpipe.engine.trainer import train

    cfg = load_config(args.recipe, args.overrides)
    run_dir = train(cfg, resume=args.resume)
    print(f"run directory: {run_dir}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's backbone as model.safetensors + config.json (loads in timm)")
    p.add_argument("run", help="a run directory")
    p.add_argument("--which", choices=["teacher", "student"], default=None,
                   help="default: the teacher when the run has one (DINO, iBOT), else the student (SimCLR)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the newest)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/export/WHICH)")


def _run_export(args: argparse.Namespace) -> int:
    from sslpipe.export import export_run

    out = export_run(args.run, which=args.which, out=args.out, checkpoint=args.checkpoint)
    print(f"exported to {out}")
    return 0


def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="an official DINO / iBOT / DINOv2 / MAE checkpoint or a timm state dict as an "
                                      "export folder (model.safetensors + config.json), for every probe and recipe")
    p.add_argument("source", help="a .pth/.pt/.bin checkpoint (read with torch.load(weights_only=True)), a "
                                  ".safetensors file or an export folder")
    p.add_argument("out", help="output export folder")
    p.add_argument("--format", choices=["dino", "ibot", "dinov2", "mae", "timm", "safetensors"], default=None,
                   help="the checkpoint's layout (default: detected from the keys)")
    p.add_argument("--which", choices=["teacher", "student"], default=None,
                   help="training checkpoints with both networks (DINO, iBOT, DINOv2): default the teacher")
    p.add_argument("--arch", default=None,
                   help="timm architecture whose defaults describe the weights (default: read from the shapes)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input size of the export (default: the checkpoint's position grid x patch size); another "
                        "grid resizes the position embedding by the source's official rule")


def _run_import(args: argparse.Namespace) -> int:
    from sslpipe.import_checkpoint import import_checkpoint

    report = import_checkpoint(args.source, args.out, fmt=args.format, which=args.which, arch=args.arch,
                               img_size=args.img_size)
    print("\n".join(report.lines()))
    return 0


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="verify a run's checkpoints and exports against their sha256s (a table; exit "
                                     "status 1 when any is bad)")
    p.add_argument("run", help="a run directory")


def _run_check(args: argparse.Namespace) -> int:
    from sslpipe.engine.check import check_run, format_check

    rows = check_run(args.run)
    print(format_check(rows))
    return 1 if any(r.status == "bad" for r in rows) else 0


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


# parsed flag -> FeatureSpec field, for the probe commands that have the flag
_SPEC_FLAGS = {"resize": "resize", "crop": "crop", "size": "crop", "workers": "num_workers", "device": "device"}


def _feature_spec(args: argparse.Namespace, **fields: Any) -> FeatureSpec:
    """The probe's FeatureSpec: the export's image size, mean and std, overridden by the flags given (--resize,
    --crop or --size, --workers, --device, where the command has them) and by the command's own `fields`."""
    from sslpipe.eval.spec import FeatureSpec

    flags = {field: getattr(args, flag) for flag, field in _SPEC_FLAGS.items() if hasattr(args, flag)}
    return FeatureSpec.from_export(args.backbone, **flags, **fields)


def _probe_data(args: argparse.Namespace) -> ProbeData:
    """The images of a `_add_probe_args` command: both splits of --data, capped by --max-train / --max-val."""
    from sslpipe.eval.spec import ProbeData

    return ProbeData(args.data, args.data, args.train_split, args.val_split, args.max_train, args.max_val)


def _add_knn(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("knn", help="weighted kNN probe (DINO protocol) of an exported backbone, with faiss")
    _add_probe_args(p)
    p.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200])
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--cache", default=None, help="folder to cache extracted features in")


def _run_knn(args: argparse.Namespace) -> int:
    from sslpipe.eval.knn import run_knn

    result = run_knn(args.backbone, _feature_spec(args, batch_size=args.batch_size), _probe_data(args),
                     k_list=args.k, T=args.temperature, out_json=args.out, cache_dir=args.cache)
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

    # --batch-size is the classifier's; features are extracted 256 at a time
    spec = _feature_spec(args, pooling="blocks", layers=args.n_last_blocks)
    result = linear_probe(args.backbone, spec, _probe_data(args), epochs=args.epochs, batch_size=args.batch_size,
                          lr=args.lr, out_json=args.out)
    print(f"linear probe top-1 {result['top1']:.4f}" + (f"  top-5 {result['top5']:.4f}" if "top5" in result else ""))
    return 0


def _add_linear_seg(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("linear-seg", help="linear segmentation probe (DINOv2's dense protocol) on a frozen backbone")
    p.add_argument("backbone", help="an export folder (`sslpipe export`)")
    p.add_argument("--data", required=True, help="segmentation shards (seg.png): the train split trains the probe")
    p.add_argument("--val", default=None, help="shards to evaluate on (default: --data)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--size", type=int, default=None, help="training crop and evaluation window (default: the "
                                                          "export's image size)")
    p.add_argument("--layers", type=int, default=1, choices=[1, 4],
                   help="patch features of the last block, or of the last 4 concatenated (DINOv2 +ms)")
    p.add_argument("--steps", type=int, default=1000, help="training batches (DINOv2: 40000 at batch 16)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--num-classes", type=int, default=None, help="classes incl. background (default: manifest)")
    p.add_argument("--max-val", type=int, default=None, help="evaluate on at most this many val images")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the training stream")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="result JSON (mIoU, per-class IoU, baseline, settings)")
    p.add_argument("--png", default=None, help="overlays of the first val images (image | truth | prediction)")


def _run_linear_seg(args: argparse.Namespace) -> int:
    from sslpipe.eval.linear_seg import format_linear_seg, linear_seg_probe
    from sslpipe.eval.segmentation import format_iou_table
    from sslpipe.eval.spec import ProbeData

    data = ProbeData(args.data, args.val or args.data, args.train_split, args.val_split, max_val=args.max_val,
                     num_classes=args.num_classes)
    result = linear_seg_probe(
        args.backbone, _feature_spec(args, pooling="patch", layers=args.layers), data, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed, out_json=args.out,
        keep_samples=6 if args.png else 0)
    if args.png:
        from sslpipe.viz.overlays import save_semantic_samples

        save_semantic_samples(result.pop("samples"), args.png, list(result["per_class"]))
        print(f"wrote {args.png}")
    print(format_iou_table(result))
    print(format_linear_seg(result))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _add_qscore(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("qscore", help="Q-score report: which label-free metrics flag the samples kNN gets wrong")
    _add_probe_args(p)
    p.add_argument("--k", type=int, default=20, help="kNN neighbours whose predictions define right/wrong")
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--eta", type=float, default=1e-3, help="soft-sparsity threshold")
    p.add_argument("--eps", type=float, default=4.0, help="v2: highly activating = h > mean + eps * std")
    p.add_argument("--percentiles", type=float, nargs=2, default=[50.0, 95.0], metavar=("LOW", "HIGH"),
                   help="v2: band of the non-zero activation rates that counts as discriminative")
    p.add_argument("--no-l2-normalize", action="store_true", help="v1 metrics on raw features (default: h/||h||_2)")
    p.add_argument("--sparsity-abs", action="store_true", help="sparsity counts |h| < eta instead of h < eta")
    p.add_argument("--rates-from", choices=["val", "train"], default="val",
                   help="v2: split whose activation rates select the discriminative features")
    p.add_argument("--v2-coverage", default="0.5",
                   help="v2: lower eps (from --eps, in steps of 0.25) until this share of samples has a selected "
                        "feature; 'none' keeps --eps as given")
    p.add_argument("--v2-raw", action="store_true",
                   help="v2: Q as the raw excess h - mean (the published form) instead of in units of the sample's std")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUROC/AUPRC intervals")
    p.add_argument("--ci", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--png", default=None, help="histogram PNG (default: next to --out, same name .png)")
    p.add_argument("--cache", default=None, help="folder to cache extracted features in")
    p.add_argument("--log-with", choices=["wandb", "tensorboard"], default=None,
                   help="also log the AUROC/AUPRC values to this tracker")


def _run_qscore(args: argparse.Namespace) -> int:
    from sslpipe.eval.qscore_report import QScoreSettings, qscore_report

    settings = QScoreSettings(
        k=args.k, T=args.temperature, eta=args.eta, eps=args.eps, percentiles=args.percentiles,
        l2_normalize=not args.no_l2_normalize, sparsity_abs=args.sparsity_abs, rates_from=args.rates_from,
        v2_coverage=None if args.v2_coverage.lower() == "none" else float(args.v2_coverage),
        v2_standardize=not args.v2_raw, n_boot=args.bootstrap, ci=args.ci, seed=args.seed)
    tracker = None
    if args.log_with:
        from accelerate import Accelerator

        from sslpipe.engine.tracking import resolve_wandb_mode

        log_dir = Path(args.out).parent if args.out else Path("runs/qscore")
        init = {"wandb": {"mode": resolve_wandb_mode(None), "dir": str(log_dir)}} if args.log_with == "wandb" else {}
        tracker = Accelerator(cpu=True, log_with=args.log_with, project_dir=str(log_dir))
        tracker.init_trackers("sslpipe-qscore", config={k: str(v) for k, v in vars(args).items()}, init_kwargs=init)
    try:
        result = qscore_report(args.backbone, _feature_spec(args, batch_size=args.batch_size), _probe_data(args),
                               settings, cache_dir=args.cache, out_json=args.out, out_png=args.png, tracker=tracker)
    finally:
        if tracker is not None:
            tracker.end_training()
    print(f"kNN k={args.k} top-1 {result['knn']['top1']:.4f}: {result['n_wrong']} of {result['n_val']} val samples "
          "wrong")
    cover = result["coverage"]
    print(f"coverage (share of samples with a non-empty selection): q_v1 {cover['q_v1']:.4f}, q_v2 {cover['q_v2']:.4f}"
          f" (v2 eps {result['settings']['eps']:g})")
    ci = f"{args.ci:.0%} CI"
    print(f"{'metric':<10}{'flags':>6}{'AUROC':>8}  {ci:<17}{'AUPRC':>8}  above 0.5 (whole CI)")
    for name, s in result["scores"].items():
        if s["auroc"] is None:
            print(f"{name:<10}{s['direction']:>6}  {'degenerate' if s['degenerate'] else 'n/a'}")
            continue
        lo, hi = s["auroc_ci"] or (float("nan"), float("nan"))
        print(f"{name:<10}{s['direction']:>6}{s['auroc']:8.4f}  [{lo:.4f}, {hi:.4f}] {s['auprc']:8.4f}  "
              f"{'yes' if s['above_chance'] else 'no'}")
    print("(pre-registered directions; the flipped AUROCs in the JSON's `post_hoc` were chosen after seeing labels)")
    if result.get("plot"):
        print(f"plot: {result['plot']}")
    return 0


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune an exported backbone with a dense head (Mask2Former, ViTDet "
                                        "Mask R-CNN) from a YAML recipe; evaluates mIoU or mask/box AP")
    p.add_argument("recipe", help="a fine-tuning recipe, e.g. recipes/demo_finetune_m2f.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. finetune.backbone=runs/x/export/teacher")
    p.add_argument("--resume", default=None,
                   help="`auto` (newest run in output_dir with a checkpoint), a run directory or a checkpoint")


def _run_finetune(args: argparse.Namespace) -> int:
    from sslpipe.recipes import load_config
    from sslpipe.engine.trainer import train

    cfg = load_config(args.recipe, args.overrides)
    if not cfg.method.startswith("finetune_"):
        raise ValueError(f"{args.recipe}: method {cfg.method!r} is not a fine-tuning method "
                         "(finetune_mask2former, finetune_vitdet); use `sslpipe train` for pretraining recipes")
    run_dir = train(cfg, resume=args.resume, overrides_text=" ".join(args.overrides) or None)
    print(f"run directory: {run_dir}")
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="coloured mask overlays (PNG) of a fine-tuning run's predictions")
    p.add_argument("run", help="a fine-tuning run directory (or one of its checkpoint folders)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: the newest)")
    p.add_argument("--data", default=None, help="shard directory (default: the run's data.val)")
    p.add_argument("--split", default=None, help="split of --data (default: the run's data.val_split)")
    p.add_argument("-n", "--num-images", type=int, default=8, help="images to draw")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/predictions/predict.png)")


def _run_predict(args: argparse.Namespace) -> int:
    from sslpipe.predict import predict_run

    result = predict_run(args.run, checkpoint=args.checkpoint, data=args.data, split=args.split,
                         n=args.num_images, out=args.out)
    shown = {k: round(v, 4) for k, v in result["metrics"].items() if isinstance(v, float)}
    print(f"{result['checkpoint']}: metrics on these {args.num_images} images {shown}")
    print(f"wrote {result['png']}")
    return 0


def _add_eval_seg(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-seg", help="mIoU and per-class IoU of a U2PL / supervised_seg run (whole or sliding)")
    p.add_argument("run", help="a run directory of method u2pl or supervised_seg")
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder or step (default: the newest)")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher",
                   help="U2PL's EMA teacher (default, as the official evaluation) or the student")
    p.add_argument("--data", default=None, help="segmentation shards (default: the run's data.val)")
    p.add_argument("--split", default=None, help="split of --data (default: the run's data.val_split)")
    p.add_argument("--mode", choices=["whole", "slide"], default=None, help="default: the run's u2pl.eval_mode")
    p.add_argument("--crop", type=int, default=None, help="slide: window size (default: u2pl.eval_crop/crop_size)")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--out", default=None, help="result JSON (default: RUN/eval/eval_seg.json)")


def _run_eval_seg(args: argparse.Namespace) -> int:
    from sslpipe.eval.segmentation import format_iou_table
    from sslpipe.eval_seg import eval_seg_run

    result = eval_seg_run(args.run, checkpoint=args.checkpoint, which=args.which, data=args.data, split=args.split,
                          mode=args.mode, crop=args.crop, max_images=args.max_images, out=args.out)
    print(f"{result['checkpoint']} ({result['model']}, {result['mode']}):")
    print(format_iou_table(result))
    print(f"wrote {result['json']}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="shards -> DINOv2 pretraining -> export -> kNN vs random init, on Fashion-MNIST")
    p.add_argument("--out", default="runs/demo", help="demo directory")
    p.add_argument("--recipe", default=None,
                   help="recipe to pretrain (default: recipes/demo_dinov2.yaml; iBOT's: recipes/demo_ibot.yaml)")
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


def _add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="what a backbone sees: attention maps, patch PCA, nearest neighbours and an "
                                    "embedding map of a few images, one PNG each")
    p.add_argument("backbone", help="an export folder (`sslpipe export`)")
    p.add_argument("--data", default=None, help="shards: the first -n val images are shown, neighbours come from "
                                                "the train split, the embedding map from the val split")
    p.add_argument("--images", nargs="+", default=[], help="image files to show instead of the first val images")
    p.add_argument("--out", required=True, help="folder for attention.png, pca.png, neighbours.png, embedding.png")
    p.add_argument("-n", "--num-images", type=int, default=4, help="val images to show (with --data)")
    p.add_argument("--k", type=int, default=5, help="neighbours per image")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--max-train", type=int, default=10000, help="search the neighbours among the first N train "
                                                                "images (0: all)")
    p.add_argument("--max-val", type=int, default=2000, help="map the first N val images (0: all)")
    p.add_argument("--resize", type=int, default=None, help="eval resize (default: the export's image size x 256/224)")
    p.add_argument("--crop", type=int, default=None, help="eval centre crop (default: the export's image size)")
    p.add_argument("--embedding", choices=["tsne", "umap"], default="tsne",
                   help="t-SNE (scikit-learn) or UMAP (needs umap-learn)")
    p.add_argument("--log-with", choices=["wandb"], default=None, help="also log the PNGs to this tracker")


def _run_show(args: argparse.Namespace) -> int:
    from sslpipe.eval.spec import ProbeData
    from sslpipe.viz.show import show

    tracker = None
    if args.log_with:
        from accelerate import Accelerator

        from sslpipe.engine.tracking import resolve_wandb_mode

        accelerator = Accelerator(cpu=True, log_with=args.log_with, project_dir=args.out)
        accelerator.init_trackers("sslpipe-show", config={k: str(v) for k, v in vars(args).items()},
                                  init_kwargs={"wandb": {"mode": resolve_wandb_mode(None), "dir": args.out}})
        tracker = accelerator.get_tracker(args.log_with)
    data = None
    if args.data:
        data = ProbeData(args.data, args.data, args.train_split, args.val_split, args.max_train or None,
                         args.max_val or None)
    try:
        show(args.backbone, args.out, _feature_spec(args), data=data, images=args.images, n=args.num_images,
             k=args.k, embedding=args.embedding, tracker=tracker)
    finally:
        if tracker is not None:
            accelerator.end_training()
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="a run's curves, health, evaluations, pictures and config as a static HTML "
                                      "page (no server, no network); several runs on the same axes")
    p.add_argument("runs", nargs="+", help="run directories (metrics.jsonl + config.yaml)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/report, or RUN_A/report-compare)")


def _run_report(args: argparse.Namespace) -> int:
    from sslpipe.viz.report import write_report

    print(f"wrote {write_report(args.runs, args.out)}")
    return 0


COMMANDS = {
    "shards": (_add_shards, _run_shards),
    "train": (_add_train, _run_train),
    "export": (_add_export, _run_export),
    "import": (_add_import, _run_import),
    "check": (_add_check, _run_check),
    "knn": (_add_knn, _run_knn),
    "linear": (_add_linear, _run_linear),
    "linear-seg": (_add_linear_seg, _run_linear_seg),
    "qscore": (_add_qscore, _run_qscore),
    "finetune": (_add_finetune, _run_finetune),
    "predict": (_add_predict, _run_predict),
    "eval-seg": (_add_eval_seg, _run_eval_seg),
    "demo": (_add_demo, _run_demo),
    "show": (_add_show, _run_show),
    "report": (_add_report, _run_report),
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
    except OSError as err:
        from sslpipe.errors import WriteFailed

        if not isinstance(err, WriteFailed):
            raise
        # A full or failing disk: the message names the file, what was removed and how to continue.
        print(f"sslpipe {args.command}: error: {err}", file=sys.stderr)
        return 1
