"""`sslpipe knn`: the weighted kNN probe (DINO protocol) of an exported backbone, with faiss."""
from __future__ import annotations

import argparse

from sslpipe.cli.outputs import check_out
from sslpipe.cli.probes import add_probe_args, feature_spec, positive_float, positive_int, probe_data


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("knn", help="weighted kNN probe (DINO protocol) of an exported backbone, with faiss")
    add_probe_args(p)
    p.add_argument("--k", type=positive_int, nargs="+", default=[10, 20, 100, 200])
    p.add_argument("--temperature", type=positive_float, default=0.07)
    p.add_argument("--cache", default=None, help="folder to cache extracted features in")


def run(args: argparse.Namespace) -> int:
    from sslpipe.eval.knn import run_knn

    check_out(args.out, "--out", example="knn.json")
    result = run_knn(args.backbone, feature_spec(args, batch_size=args.batch_size), probe_data(args),
                     k_list=args.k, T=args.temperature, out_json=args.out, cache_dir=args.cache)
    for k, v in result["k"].items():
        top5 = f"  top-5 {v['top5']:.4f}" if "top5" in v else ""
        print(f"k={k:<4d} top-1 {v['top1']:.4f}{top5}")
    return 0
