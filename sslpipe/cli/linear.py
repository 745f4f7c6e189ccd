"""`sslpipe linear`: a linear probe on frozen features of an exported backbone."""
from __future__ import annotations

import argparse

from sslpipe.cli.outputs import check_out
from sslpipe.cli.probes import add_probe_args, feature_spec, positive_float, positive_int, probe_data


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("linear", help="linear probe on frozen features of an exported backbone")
    add_probe_args(p)
    p.add_argument("--epochs", type=positive_int, default=100)
    p.add_argument("--n-last-blocks", type=positive_int, default=None,
                   help="ViTs: the last N blocks' CLS tokens, concatenated (default 4, DINO); refused for a CNN, "
                        "which is probed on its pooled features")
    p.add_argument("--lr", type=positive_float, default=None, help="default: 0.001 x batch / 256 (DINO protocol)")


def run(args: argparse.Namespace) -> int:
    from sslpipe.eval.linear import linear_probe

    check_out(args.out, "--out", example="linear.json")
    # --batch-size is the classifier's; features are extracted 256 at a time
    result = linear_probe(args.backbone, feature_spec(args), probe_data(args), n_last_blocks=args.n_last_blocks,
                          epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, out_json=args.out)
    print(f"linear probe top-1 {result['top1']:.4f}" + (f"  top-5 {result['top5']:.4f}" if "top5" in result else ""))
    return 0
