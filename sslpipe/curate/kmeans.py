"""k-means and nearest-centroid assignment for the curation hierarchy: squared L2 (the paper's distance;
Vo et al. 2024), with faiss (`faiss.Kmeans`, on the GPU when faiss sees one). Curation needs faiss anyway (its
near-duplicate removal runs first), so there is no other backend.

faiss trains on at most 256 points per centroid (its `max_points_per_centroid`, a seeded subsample) and then every
point is assigned; `min_points_per_centroid=1` lets the upper levels, which cluster a few centroids per cluster,
train without faiss's warning.

The paper's code starts from k-means++ (`src/kmeans_gpu.py`); here faiss starts from k random points, because
k-means++ takes one pass over the pool per centroid, several times the whole k-means on a CPU (docs/curate.md).
"""
from __future__ import annotations

import numpy as np

from sslpipe.embed.index import require_faiss

ASSIGN_ROWS = 1 << 16  # points assigned per call: bounds faiss's result arrays


def kmeans(x: np.ndarray, k: int, *, niter: int = 20, seed: int = 0) -> np.ndarray:
    """(k, d) float32 centroids of `x` (n, d) float32 after `niter` Lloyd iterations, seeded."""
    if not 1 <= k <= len(x):
        raise ValueError(f"k-means of {len(x)} points into {k} clusters: k must be 1 to {len(x)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    faiss = require_faiss()
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, min_points_per_centroid=1,
                      gpu=faiss.get_num_gpus() > 0)
    km.train(x)
    return np.asarray(km.centroids, dtype=np.float32)


def assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nearest centroid int64 (n,), its squared distance float32 (n,)) of every point, in chunks."""
    labels = np.empty(len(x), np.int64)
    dists = np.empty(len(x), np.float32)
    index = require_faiss().IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    for start in range(0, len(x), ASSIGN_ROWS):
        chunk = np.ascontiguousarray(x[start:start + ASSIGN_ROWS], dtype=np.float32)
        d, i = index.search(chunk, 1)
        labels[start:start + len(chunk)], dists[start:start + len(chunk)] = i[:, 0], d[:, 0]
    return labels, dists
