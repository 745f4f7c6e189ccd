"""`sslpipe predict`: overlays of a fine-tuning run's predictions."""
from __future__ import annotations

import argparse

from sslpipe.cli.outputs import check_out
from sslpipe.cli.probes import positive_int


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="coloured mask overlays (PNG) of a fine-tuning run's predictions")
    p.add_argument("run", help="a fine-tuning run directory (or one of its checkpoint folders)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: the newest)")
    p.add_argument("--data", default=None, help="shard directory (default: the run's data.val)")
    p.add_argument("--split", default=None, help="split of --data (default: the run's data.val_split)")
    p.add_argument("-n", "--num-images", type=positive_int, default=8, help="images to draw")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/predictions/predict.png)")


def run(args: argparse.Namespace) -> int:
    from sslpipe.predict import predict_run

    check_out(args.out, "--out", example="predict.png")
    result = predict_run(args.run, checkpoint=args.checkpoint, data=args.data, split=args.split,
                         n=args.num_images, out=args.out)
    shown = {k: round(v, 4) for k, v in result["metrics"].items() if isinstance(v, float)}
    print(f"{result['checkpoint']}: metrics on the first {args.num_images} images (all, when fewer) {shown}")
    print(f"wrote {result['png']}")
    return 0
