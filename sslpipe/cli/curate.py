"""`sslpipe curate`: a balanced, deduplicated subset of a shard pool (hierarchical k-means with resampling, Vo et al.
2024), written as a new shard set of the source's tar members."""
from __future__ import annotations

import argparse
import sys

from sslpipe.cli.outputs import check_out
from sslpipe.cli.probes import add_spec_args, feature_spec, positive_int

# the flags that say how the pool is embedded: read with --backbone only
_EMBED_FLAGS = ("resize", "crop", "batch_size", "workers", "device")


def _ints(text: str, least: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas (e.g. 1000,50,5), got {text!r}")
    if min(values) < least:
        raise argparse.ArgumentTypeError(f"each value must be an integer >= {least}, got {text!r}")
    return values


def _positive_ints(text: str) -> list[int]:
    return _ints(text, 1)


def _nonnegative_ints(text: str) -> list[int]:
    return _ints(text, 0)


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curate", help="deduplicate, cluster and sample a shard pool into a balanced shard set")
    p.add_argument("shards", metavar="SHARDS", help="the pool: a shard directory with manifest.json (or a pattern)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--backbone", metavar="EXPORT", help="embed the pool with this export (into OUT.embeddings)")
    src.add_argument("--embeddings", metavar="DIR", help="the pool's embedding folder from `sslpipe embed`")
    p.add_argument("--out", required=True, help="the curated shard set (refused when not empty, unless --force)")
    p.add_argument("--size", dest="curated_size", type=positive_int, required=True,  # `size` is the probes' crop flag
                   help="samples in the curated set")
    p.add_argument("--split", default="train", help="the split of SHARDS that is the pool")
    p.add_argument("--dup-threshold", type=float, default=0.95,
                   help="near-duplicates: cosine similarity above this (default 0.95: copies, crops, re-encodings)")
    p.add_argument("--clusters", type=_positive_ints, default=None, metavar="K1,K2,...",
                   help="clusters per level, bottom first (default: scaled to the pool, docs/curate.md)")
    p.add_argument("--resample-steps", type=_nonnegative_ints, default=None, metavar="R1,R2,...",
                   help="resampling steps per level (default: 0 at level 1, then 10)")
    p.add_argument("--resample-sizes", type=_positive_ints, default=None, metavar="M1,M2,...",
                   help="points per cluster in a resampling step (default: half the level's average cluster size)")
    p.add_argument("--iters", type=positive_int, default=20, help="k-means iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=positive_int, default=10000)
    add_spec_args(p)
    p.add_argument("--device", default=None, help="--backbone: where the pool is embedded")
    p.set_defaults(curate_embed_defaults={dest: p.get_default(dest) for dest in _EMBED_FLAGS})
    p.add_argument("--force", action="store_true", help="replace a non-empty --out (and an OUT.embeddings of "
                                                         "another backbone, pool or spec)")


def _refuse_embed_flags(args: argparse.Namespace) -> None:
    """With --embeddings nothing is embedded: a feature flag given there would be dropped, so it is refused."""
    given = ["--" + dest.replace("_", "-") for dest in _EMBED_FLAGS
             if getattr(args, dest) != args.curate_embed_defaults[dest]]
    if args.embeddings and given:
        raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} read only with --backbone: the "
                         f"embeddings in {args.embeddings} were made with their own settings (its embed.json); "
                         f"leave {'it' if len(given) == 1 else 'them'} out")


def run(args: argparse.Namespace) -> int:
    from sslpipe.curate.curate import curate

    _refuse_embed_flags(args)
    check_out(args.out, "--out", folder=True)
    spec = feature_spec(args, batch_size=args.batch_size) if args.backbone else None
    manifest = curate(args.shards, args.out, args.curated_size, backbone=args.backbone, embeddings=args.embeddings,
                      split=args.split, spec=spec, dup_threshold=args.dup_threshold, clusters=args.clusters,
                      resample_steps=args.resample_steps, resample_sizes=args.resample_sizes, niter=args.iters,
                      seed=args.seed, samples_per_shard=args.samples_per_shard, force=args.force,
                      command=" ".join(["sslpipe", *sys.argv[1:]]))
    c = manifest["curation"]
    print(f"{c['pool_samples']} pool samples, {c['duplicates_removed']} near-duplicates removed "
          f"({c['duplicate_groups']} groups), clusters per level {c['clusters_per_level']}: wrote "
          f"{manifest['splits']['train']['samples']} samples to {args.out} (manifest.json, duplicates.json, "
          "clusters.png)")
    return 0
