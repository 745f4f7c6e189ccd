"""Nearest neighbours of a query among the train split: what the kNN probe votes with, as pictures.

The features are the kNN probe's (`sslpipe.models.backbones.pooled_features` through the probe's `EvalTransform`) and
the similarity is its cosine (L2-normalised inner product). The neighbours are those `sslpipe knn` would count when
searched among the same train images: `sslpipe show` searches only the first `--max-train` of them (a cap can change
them) and says so in the caption (`pool`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sslpipe.viz.overlays import save_rows


@torch.no_grad()
def nearest(train_feats: Tensor, query_feats: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(cosine similarities (Q, k), train indices (Q, k)) of each query's k most similar train features, best first."""
    if k > len(train_feats):
        raise ValueError(f"k={k} exceeds the {len(train_feats)} train features: pass a smaller k")
    sims = F.normalize(query_feats.float(), dim=1) @ F.normalize(train_feats.float(), dim=1).T
    top = sims.topk(k, dim=1)
    return top.values, top.indices


def draw_neighbours(queries: Sequence[Tensor], query_names: Sequence[str], neighbours: Sequence[Sequence[Tensor]],
                    neighbour_names: Sequence[Sequence[str]], sims: Tensor, path: str | Path,
                    what: str | None = None, pool: str = "train images") -> Path:
    """One row per query: the query, then its neighbours best first, each labelled with its name (class or key)
    and cosine; `what` is the caption (default: the kNN probe's neighbours among `pool`, the images searched)."""
    k = sims.shape[1]
    rows = [[q, *n] for q, n in zip(queries, neighbours)]
    labels = [[qn, *(f"{name} {s:.4f}" for name, s in zip(names, row_sims.tolist()))]
              for qn, names, row_sims in zip(query_names, neighbour_names, sims)]
    what = what or (f"Each query (left) and its {k} nearest {pool} by cosine similarity of the kNN probe's "
                    "features (label and similarity under each).")
    return save_rows(rows, path, titles=("query", *(f"neighbour {i + 1}" for i in range(k))), caption=what,
                     labels=labels)
