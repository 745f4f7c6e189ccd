"""`sslpipe demo`: shards -> DINOv2 pretraining -> export -> kNN vs random init, on the bundled Fashion-MNIST."""
from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="shards -> DINOv2 pretraining -> export -> kNN vs random init, on Fashion-MNIST")
    p.add_argument("--out", default="runs/demo", help="demo directory")
    p.add_argument("--recipe", default=None,
                   help="recipe to pretrain (default: recipes/demo_dinov2.yaml; iBOT's: recipes/demo_ibot.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides for the recipe")
    p.add_argument("--force", action="store_true",
                   help="start over: remove what an earlier demo wrote into --out (shards/, pretrain/, random-init/, "
                        "its json results); nothing else there")


def run(args: argparse.Namespace) -> int:
    from sslpipe.demo import run_demo

    run_demo(args.out, recipe=args.recipe, overrides=args.overrides, force=args.force)
    return 0
