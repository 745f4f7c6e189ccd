"""`sslpipe embed`: the feature of every image of a split (or a folder of images), float16 and L2-normalised, one
part per shard; resumable, and shared out over processes under `accelerate launch -m sslpipe embed ...`."""
from __future__ import annotations

import argparse

from sslpipe.cli.outputs import check_out
from sslpipe.cli.probes import add_spec_args, feature_spec


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="features of every image of a shard split or folder, for search and curate")
    p.add_argument("backbone", metavar="EXPORT", help="an export folder (or its model.safetensors)")
    p.add_argument("--data", required=True, help="shard directory with manifest.json, a shard pattern, or a folder "
                                                 "of images (written as shards into OUT/shards first)")
    p.add_argument("--out", required=True, help="the embedding folder (a stopped run resumes there)")
    p.add_argument("--split", default="train", help="the split of a shard set to embed")
    add_spec_args(p)
    p.add_argument("--device", default=None, help="default: this process's GPU when there is one, else the CPU")
    p.add_argument("--force", action="store_true", help="start over in an --out that holds other embeddings, or "
                                                         "those of a FOLDER that changed since (removes only what "
                                                         "embed wrote there)")


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from sslpipe.embed.embed import embed_shards
    from sslpipe.embed.store import read_index

    check_out(args.out, "--out", folder=True)
    state = PartialState()
    out = embed_shards(args.backbone, args.data, args.out, split=args.split,
                       spec=feature_spec(args, batch_size=args.batch_size), accelerator=state, force=args.force)
    if state.is_main_process:
        index = read_index(out)
        print(f"embedded {index['count']} images of {index['data']} ({index['split']}) in {len(index['shards'])} "
              f"part(s), {index['dim']}-d float16: {out}")
    return 0
