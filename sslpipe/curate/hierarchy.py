"""Hierarchical k-means with resampling (Vo et al. 2024, arXiv 2405.15613; docs/curate.md).

Level 1 clusters the points, level l+1 the centroids of level l. k-means alone puts its centroids where the points
are dense (a concept seen a million times gets many clusters, a rare one shares one); after each level's k-means the
resampling steps re-fit the centroids on `m` points taken from every cluster (the m closest to its centroid, the
paper's default), so each cluster weighs the same whatever its size, then re-assign every point: repeated `r` times,
the centroids spread over the support of the data rather than follow its density.

Defaults, scaled from the paper's 4-level run on its web image pool (ssl-data-curation,
configs/4levels_web_based_images.yaml: 10M, 500k, 50k and 10k clusters; r = 10 resampling steps at levels 2-4, none
at level 1 "for efficiency"; m = 10, 5, 3, "roughly half the average cluster size"), for a pool of n points:
- level 1: n / 100 clusters (about 100 points per cluster, the paper's level-1 average for a pool of 10^9);
- level 2, 3, 4: 1 cluster per 20, 10 and 5 clusters of the level below (the paper's ratios 10M : 500k : 50k : 10k);
  a level is kept while it has at least 2 clusters, so 1M points give 10000, 500, 50, 10 and 20k points 200, 10;
- r = 10 at every level but the first, m = half the level's average cluster size, rounded up (10, 5, 3 as theirs).
Clusters left empty are dropped before the next level.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from sslpipe.curate.kmeans import assign, kmeans

POINTS_PER_CLUSTER = 100  # level 1
CHILDREN = (20, 10, 5)  # clusters per cluster at levels 2, 3 and 4
RESAMPLE_STEPS = 10
NITER = 20  # Lloyd iterations per k-means (faiss's default is 25, the paper's 50; few points move after 20)


@dataclass
class Level:
    """One level: `centroids` (k, d), and `labels`: the cluster of each point (level 1) or of each cluster of the
    level below."""

    centroids: np.ndarray
    labels: np.ndarray


def default_clusters(n: int) -> list[int]:
    """Clusters per level for a pool of n points (the module docstring's rule)."""
    counts = [max(1, round(n / POINTS_PER_CLUSTER))]
    for children in CHILDREN:
        k = round(counts[-1] / children)
        if k < 2:
            break
        counts.append(k)
    return counts


def default_resampling(n: int, clusters: Sequence[int]) -> tuple[list[int], list[int]]:
    """(steps r, points per cluster m) per level: r = 10 except at level 1, m = ceil(half the average size)."""
    units = [n, *clusters[:-1]]
    steps = [0] + [RESAMPLE_STEPS] * (len(clusters) - 1)
    sizes = [max(1, math.ceil(u / k / 2)) for u, k in zip(units, clusters)]
    return steps, sizes


def _closest(labels: np.ndarray, dists: np.ndarray, k: int, m: int) -> np.ndarray:
    """The m points of each cluster nearest its centroid (all of a smaller cluster)."""
    order = np.lexsort((dists, labels))
    grouped = labels[order]
    starts = np.searchsorted(grouped, np.arange(k))
    return order[np.arange(len(order)) - starts[grouped] < m]


def _drop_empty(centroids: np.ndarray, labels: np.ndarray) -> Level:
    used = np.unique(labels)
    renumber = np.full(len(centroids), -1, np.int64)
    renumber[used] = np.arange(len(used))
    return Level(centroids[used], renumber[labels])


def cluster_level(x: np.ndarray, k: int, *, steps: int, size: int, niter: int = NITER, seed: int = 0) -> Level:
    """k-means of `x` into k clusters, then `steps` resampling steps of `size` points per cluster."""
    centroids = kmeans(x, k, niter=niter, seed=seed)
    labels, dists = assign(x, centroids)
    for step in range(steps):
        sample = _closest(labels, dists, len(centroids), size)
        centroids = kmeans(x[sample], min(len(centroids), len(np.unique(labels))), niter=niter, seed=seed + step + 1)
        labels, dists = assign(x, centroids)
    return _drop_empty(centroids, labels)


def hierarchical_kmeans(x: np.ndarray, clusters: Sequence[int] | None = None, *, steps: Sequence[int] | None = None,
                        sizes: Sequence[int] | None = None, niter: int = NITER, seed: int = 0,
                        progress: bool = True) -> list[Level]:
    """The levels of `x` (n, d) float32, bottom first; None: the scaled defaults (module docstring). A level asked
    for more clusters than it has points gets one per point."""
    clusters = list(clusters) if clusters is not None else default_clusters(len(x))
    default_steps, default_sizes = default_resampling(len(x), clusters)
    steps = list(steps) if steps is not None else default_steps
    sizes = list(sizes) if sizes is not None else default_sizes
    if not len(clusters) == len(steps) == len(sizes):
        raise ValueError(f"{len(clusters)} levels of clusters ({clusters}) but {len(steps)} resampling step counts "
                         f"and {len(sizes)} sample sizes: give one per level")
    levels: list[Level] = []
    points = x
    for depth, (k, r, m) in enumerate(tqdm(list(zip(clusters, steps, sizes)), desc="hierarchical k-means",
                                           unit="level", disable=not progress)):
        level = cluster_level(points, min(k, len(points)), steps=r, size=m, niter=niter, seed=seed + 1000 * depth)
        levels.append(level)
        points = level.centroids
    return levels


def point_clusters(levels: Sequence[Level]) -> np.ndarray:
    """(n, levels) int64: the cluster of every point at each level."""
    columns = [levels[0].labels]
    for level in levels[1:]:
        columns.append(level.labels[columns[-1]])
    return np.stack(columns, axis=1)
