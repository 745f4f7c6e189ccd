"""`sslpipe search`: the nearest images of image files or `key:` samples in an embedding folder."""
from __future__ import annotations

import argparse

from sslpipe.cli.outputs import check_out
from sslpipe.cli.probes import positive_int


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="nearest images of each query in an embedding folder (sslpipe embed)")
    p.add_argument("folder", metavar="DIR", help="an embedding folder written by `sslpipe embed`")
    p.add_argument("queries", metavar="QUERY", nargs="+", help="an image file, or key:SAMPLEKEY (a sample of the set)")
    p.add_argument("-k", type=positive_int, default=8, help="neighbours per query")
    p.add_argument("--png", default=None, help="write a grid of query | neighbours here")
    p.add_argument("--json", default=None, help="write (key, source shard, score) per neighbour here")
    p.add_argument("--device", default=None, help="where image queries are embedded (default: a GPU when present)")


def run(args: argparse.Namespace) -> int:
    from sslpipe.embed.search import search

    check_out(args.png, "--png", example="search.png")  # before the search, and no temporary file left there
    check_out(args.json, "--json", example="search.json")
    results = search(args.folder, args.queries, args.k, png=args.png, json_out=args.json, device=args.device)
    for result in results:
        print(result["query"])
        for rank, n in enumerate(result["neighbours"], 1):
            print(f"  {rank:3d}  {n['score']:.4f}  {n['key']}  {n.get('file', n['source'])}")
    for path in (args.png, args.json):
        if path:
            print(f"wrote {path}")
    return 0
