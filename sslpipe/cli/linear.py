"""`sslpipe linear`: a linear probe on frozen features of an exported backbone."""
from __future__ import annotations

import argparse

from sslpipe.cli.probes import add_probe_args, feature_spec, probe_data


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("linear", help="linear probe on frozen features of an exported backbone")
    add_probe_args(p)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--n-last-blocks", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="default: 0.001 x batch / 256 (DINO protocol)")


def run(args: argparse.Namespace) -> int:
    from sslpipe.eval.linear import linear_probe

    # --batch-size is the classifier's; features are extracted 256 at a time
    spec = feature_spec(args, pooling="blocks", layers=args.n_last_blocks)
    result = linear_probe(args.backbone, spec, probe_data(args), epochs=args.epochs, batch_size=args.batch_size,
                          lr=args.lr, out_json=args.out)
    print(f"linear probe top-1 {result['top1']:.4f}" + (f"  top-5 {result['top5']:.4f}" if "top5" in result else ""))
    return 0
