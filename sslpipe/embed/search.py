"""`sslpipe search`: the nearest images of each query in an embedding folder, by cosine similarity.

A query is an image file, embedded with the folder's backbone and feature spec (embed.json; the backbone must still
hold the tensors it was embedded with, however often it was exported since), or `key:SAMPLEKEY`, a sample of the set
(its own stored vector, so it comes back first with similarity 1). The index is `sslpipe.embed.index.build_index`'s:
exact up to EXACT_MAX rows, IVF-Flat above, kept in the folder as search-ivf.faiss and rebuilt when the set changes.
Results: per query the k neighbours as (key, source shard, score), and with --png a grid of query | neighbours, each
neighbour read from its shard.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sslpipe.embed.backbone import is_backbone, open_backbone, spec_from_record
from sslpipe.embed.index import build_index, require_faiss
from sslpipe.embed.inputs import read_files
from sslpipe.embed.samples import read_images
from sslpipe.embed.vectors import StoredVectors, unit_rows
from sslpipe.eval.features import default_device, on_device
from sslpipe.viz.figures import read_rgb, thumbnail
from sslpipe.viz.neighbours import draw_neighbours

KEY_PREFIX = "key:"
IVF_FILE, IVF_STAMP = "search-ivf.faiss", "search-ivf.json"


def _stamp(vectors: StoredVectors) -> dict[str, Any]:
    return {"count": len(vectors), "shards": vectors.index["shards"], "backbone_sha256":
            vectors.index["backbone_sha256"]}


def search_index(vectors: StoredVectors) -> tuple[Any, str]:
    """(index, kind) of the set: exact, or the folder's stored IVF index (built and stored on first use)."""
    fs = require_faiss()
    folder = vectors.folder
    stamp = folder / IVF_STAMP
    if (folder / IVF_FILE).is_file() and stamp.is_file() and json.loads(stamp.read_text()) == _stamp(vectors):
        return fs.read_index(str(folder / IVF_FILE)), "ivf"
    index, kind = build_index(vectors)
    if kind == "ivf":
        tmp = folder / f".{IVF_FILE}.tmp"
        fs.write_index(index, str(tmp))
        tmp.replace(folder / IVF_FILE)
        stamp.write_text(json.dumps(_stamp(vectors)) + "\n")
    return index, kind


def _open_image(query: str) -> Image.Image:
    path = Path(query)
    if not path.is_file():
        raise FileNotFoundError(f"query {query}: no such image file (a query is an image file or "
                                f"{KEY_PREFIX}SAMPLEKEY)")
    return read_rgb(path, "query image")


@torch.inference_mode()
def _embed_images(images: list[Image.Image], vectors: StoredVectors, device: str | None) -> np.ndarray:
    """The images' features under the folder's backbone and spec, as the set's are stored and read (`unit_rows`)."""
    index = vectors.index
    spec = spec_from_record(index["spec"], device=device)
    if not is_backbone(index["backbone"], index["backbone_sha256"]):
        raise ValueError(f"the backbone {index['backbone']} changed since {vectors.folder} was embedded (sha256 "
                         f"{index['backbone_sha256'][:12]}... then): embed the set again with `sslpipe embed`")
    model = open_backbone(index["backbone"], spec)
    transform = spec.transform()
    x = torch.stack([transform(image) for image in images])
    where = torch.device(device) if device else default_device(model)
    with on_device(model, where) as m:
        feats = spec.feature_fn()(m, x.to(where)).float().cpu()
    return unit_rows(F.normalize(feats, dim=1).numpy())


def search(folder: str | Path, queries: Sequence[str], k: int = 8, *, png: str | Path | None = None,
           json_out: str | Path | None = None, device: str | None = None) -> list[dict[str, Any]]:
    """The k nearest samples of each query: [{"query", "neighbours": [{"key", "source", "score"(, "file")}]}];
    written as JSON to `json_out` and drawn to `png` when given."""
    vectors = StoredVectors(folder)
    if not 1 <= k <= len(vectors):
        raise ValueError(f"-k {k}: {folder} holds {len(vectors)} samples; ask for 1 to {len(vectors)} neighbours")
    rows = vectors.row_of()
    keyed = {q: rows.get(q[len(KEY_PREFIX):]) for q in queries if q.startswith(KEY_PREFIX)}
    unknown = [q for q, row in keyed.items() if row is None]
    if unknown:
        raise ValueError(f"{unknown[0]}: no sample with that key in {folder} ({len(vectors)} samples, e.g. "
                         f"{KEY_PREFIX}{vectors.keys[0]})")
    images = {q: _open_image(q) for q in queries if q not in keyed}
    query_vectors = np.empty((len(queries), vectors.dim), np.float32)
    by_key = [i for i, q in enumerate(queries) if q in keyed]
    by_image = [i for i, q in enumerate(queries) if q in images]
    if by_key:
        query_vectors[by_key] = vectors.gather(np.array([keyed[queries[i]] for i in by_key]))
    if by_image:
        query_vectors[by_image] = _embed_images([images[queries[i]] for i in by_image], vectors, device)
    index, _ = search_index(vectors)
    scores, found = index.search(query_vectors, k)
    files = read_files(vectors.folder, vectors.index)
    results = [{"query": q, "neighbours": [
        {"key": vectors.keys[i], "source": vectors.sources[i], "score": float(s),
         **({"file": files[vectors.keys[i]]} if vectors.keys[i] in files else {})}
        for s, i in zip(row_scores, row_found) if i >= 0]}
        for q, row_scores, row_found in zip(queries, scores, found)]
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(results, indent=1) + "\n")
    if png is not None:
        draw_results(results, images, keyed, vectors, png)
    return results


def draw_results(results: list[dict[str, Any]], images: dict[str, Image.Image], keyed: dict[str, int],
                 vectors: StoredVectors, png: str | Path, side: int = 96) -> Path:
    """query | neighbours, one row per query, each neighbour read from its shard by key."""
    wanted = {(n["source"], n["key"]) for r in results for n in r["neighbours"]}
    wanted |= {(vectors.sources[row], vectors.keys[row]) for row in keyed.values()}
    shard_images = read_images(wanted)
    queries = [thumbnail(images[r["query"]] if r["query"] in images else
                         shard_images[(vectors.sources[keyed[r["query"]]], vectors.keys[keyed[r["query"]]])], side)
               for r in results]
    neighbours = [[thumbnail(shard_images[(n["source"], n["key"])], side) for n in r["neighbours"]] for r in results]
    shown = min(len(r["neighbours"]) for r in results)  # an IVF search may find fewer than k for a query
    neighbours = [row[:shown] for row in neighbours]
    names = [[n["key"] for n in r["neighbours"][:shown]] for r in results]
    sims = torch.tensor([[n["score"] for n in r["neighbours"][:shown]] for r in results])
    what = (f"Each query (left) and its {sims.shape[1]} nearest samples of {vectors.folder} by cosine similarity "
            f"of the features of {vectors.index['backbone']} (key and similarity under each).")
    return draw_neighbours(queries, [Path(r["query"]).name for r in results], neighbours, names, sims, png,
                           what=what)
