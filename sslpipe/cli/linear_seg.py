"""`sslpipe linear-seg`: DINOv2's linear segmentation probe on a frozen backbone."""
from __future__ import annotations

import argparse

from sslpipe.cli.outputs import check_out
from sslpipe.cli.probes import feature_spec, nonnegative_float, nonnegative_int, positive_float, positive_int


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("linear-seg", help="linear segmentation probe (DINOv2's dense protocol) on a frozen backbone")
    p.add_argument("backbone", help="an export folder (`sslpipe export`)")
    p.add_argument("--data", required=True, help="segmentation shards (seg.png): the train split trains the probe")
    p.add_argument("--val", default=None, help="shards to evaluate on (default: --data)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--size", type=positive_int, default=None,
                   help="training crop, evaluation window and the long side val images are resized to (default: the "
                        "export's image size)")
    p.add_argument("--layers", type=int, default=1, choices=[1, 4],
                   help="patch features of the last block, or of the last 4 concatenated (DINOv2 +ms)")
    p.add_argument("--steps", type=positive_int, default=1000, help="training batches (DINOv2: 40000 at batch 16)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--weight-decay", type=nonnegative_float, default=1e-4)
    p.add_argument("--num-classes", type=positive_int, default=None,
                   help="classes incl. background (default: manifest)")
    p.add_argument("--max-val", type=positive_int, default=None, help="evaluate on at most this many val images")
    p.add_argument("--workers", type=nonnegative_int, default=0, help="DataLoader workers of the training stream")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="result JSON (mIoU, per-class IoU, baseline, settings)")
    p.add_argument("--png", default=None, help="overlays of the first val images (image | truth | prediction)")


def run(args: argparse.Namespace) -> int:
    from sslpipe.eval.linear_seg import format_linear_seg, linear_seg_probe
    from sslpipe.eval.segmentation import format_iou_table
    from sslpipe.eval.spec import ProbeData

    check_out(args.out, "--out", example="linear_seg.json")
    check_out(args.png, "--png", example="linear_seg.png")
    data = ProbeData(args.data, args.val or args.data, args.train_split, args.val_split, max_val=args.max_val,
                     num_classes=args.num_classes)
    result = linear_seg_probe(
        args.backbone, feature_spec(args, pooling="patch", layers=args.layers), data, steps=args.steps,
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
