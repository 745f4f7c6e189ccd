"""`sslpipe eval-seg`: mIoU of a U2PL / supervised_seg run."""
from __future__ import annotations

import argparse

from sslpipe.cli.outputs import check_out
from sslpipe.cli.probes import positive_int


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-seg", help="mIoU and per-class IoU of a U2PL / supervised_seg run (whole or sliding)")
    p.add_argument("run", help="a run directory of method u2pl or supervised_seg")
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder or step (default: the newest)")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher",
                   help="U2PL's EMA teacher (default, as the official evaluation) or the student")
    p.add_argument("--data", default=None, help="segmentation shards (default: the run's data.val)")
    p.add_argument("--split", default=None, help="split of --data (default: the run's data.val_split)")
    p.add_argument("--mode", choices=["whole", "slide"], default=None, help="default: the run's eval.mode (whole)")
    p.add_argument("--crop", type=positive_int, default=None,
                   help="slide: window size (default: the run's eval.window, else its crop size)")
    p.add_argument("--max-images", type=positive_int, default=None)
    p.add_argument("--out", default=None, help="result JSON (default: RUN/eval/eval_seg.json)")


def run(args: argparse.Namespace) -> int:
    from sslpipe.eval.segmentation import format_iou_table
    from sslpipe.eval_seg import eval_seg_run

    check_out(args.out, "--out", example="eval_seg.json")
    result = eval_seg_run(args.run, checkpoint=args.checkpoint, which=args.which, data=args.data, split=args.split,
                          mode=args.mode, crop=args.crop, max_images=args.max_images, out=args.out)
    print(f"{result['checkpoint']} ({result['model']}, {result['mode']}):")
    print(format_iou_table(result))
    print(f"wrote {result['json']}")
    return 0
