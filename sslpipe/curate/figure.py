"""clusters.png of a curated set: a few curated samples of each top-level cluster, one row per cluster, so a glance
tells whether the top level separates concepts and the balanced sampling kept every one."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sslpipe.embed.samples import read_images
from sslpipe.embed.vectors import StoredVectors
from sslpipe.viz.figures import thumbnail
from sslpipe.viz.overlays import save_rows

ROWS, PER_ROW, SIDE = 12, 8, 64


def draw_clusters(vectors: StoredVectors, chosen: np.ndarray, top: np.ndarray, pool_top: np.ndarray, path: Path,
                  seed: int = 0) -> Path:
    """Up to PER_ROW curated samples (`chosen` pool rows, `top` their top-level clusters) of up to ROWS clusters
    (the largest in the pool first); `pool_top` is the top-level cluster of every kept pool row."""
    rng = np.random.default_rng(seed)
    pool_sizes = np.bincount(pool_top)
    clusters = [c for c in np.argsort(-pool_sizes, kind="stable") if (top == c).any()][:ROWS]
    picks = [rng.permutation(chosen[top == c])[:PER_ROW] for c in clusters]
    images = read_images((vectors.sources[r], vectors.keys[r]) for row in picks for r in row)
    rows = [[thumbnail(images[(vectors.sources[r], vectors.keys[r])], SIDE) for r in row] for row in picks]
    labels = [[f"cluster {c}" if i == 0 else "" for i in range(len(row))] for c, row in zip(clusters, picks)]
    caption = (f"Curated samples of the {len(clusters)} largest top-level clusters (of {len(pool_sizes)}), one row "
               "each, the cluster under its first. Cluster: pool samples -> curated: "
               + ", ".join(f"{c}: {pool_sizes[c]} -> {(top == c).sum()}" for c in clusters[:6])
               + (" ..." if len(clusters) > 6 else ""))
    return save_rows(rows, path, titles=None, caption=caption, labels=labels)
