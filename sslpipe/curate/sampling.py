"""Balanced hierarchical sampling (Vo et al. 2024, arXiv 2405.15613): N points drawn from a hierarchy of clusters so
that every cluster of a level gets an equal share, whatever its size.

The rule at every node, from the top level down to the points (`allocate`): each child gets an equal share of the
node's quota; a child smaller than its share gives all it has, and what it leaves is shared out equally among the
others, again and again (water-filling: every child gets min(size, t) for the largest t that fits the quota). The
quota's remainder after the equal split, fewer points than there are children still larger than t, goes one point
each to children drawn at random (seeded; the paper's rule). Clusters of 10, 2 and 50 points and N = 12: equal
shares of 4, the 2-point cluster gives 2, its 2 unused are split between the others: 5 + 2 + 5. With N = 13 one of
the two big clusters gets a 6th. At the bottom a level-1 cluster's quota is a random subset of its points.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sslpipe.curate.hierarchy import Level


def allocate(sizes: Sequence[int] | np.ndarray, quota: int, rng: np.random.Generator) -> np.ndarray:
    """How many of `quota` points each cluster of `sizes` gives (module docstring): all when they hold no more."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if quota >= sizes.sum():
        return sizes.copy()
    lo, hi = 0, int(sizes.max())  # sum(min(sizes, lo)) <= quota < sum(min(sizes, hi))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if np.minimum(sizes, mid).sum() <= quota:
            lo = mid
        else:
            hi = mid
    counts = np.minimum(sizes, lo)
    extra = rng.choice(np.flatnonzero(sizes > lo), quota - int(counts.sum()), replace=False)
    counts[extra] += 1
    return counts


def balanced_sample(levels: Sequence[Level], target: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of the `target` points chosen from the hierarchy `levels` (bottom first)."""
    n = len(levels[0].labels)
    if not 0 <= target <= n:
        raise ValueError(f"cannot sample {target} of {n} points")
    rng = np.random.default_rng(seed)
    sizes = [np.ones(n, np.int64)]  # points under each unit: a point, then each cluster of levels 1, 2, ...
    for level in levels:
        sizes.append(np.bincount(level.labels, weights=sizes[-1], minlength=len(level.centroids)).astype(np.int64))
    quota = allocate(sizes[-1], target, rng)
    for depth in range(len(levels) - 1, -1, -1):
        parents = levels[depth].labels
        order = np.argsort(parents, kind="stable")
        bounds = np.searchsorted(parents[order], np.arange(len(quota) + 1))
        unit_quota = np.zeros(len(parents), np.int64)
        for cluster in np.flatnonzero(quota):
            members = order[bounds[cluster]:bounds[cluster + 1]]
            unit_quota[members] = allocate(sizes[depth][members], int(quota[cluster]), rng)
        quota = unit_quota
    return np.flatnonzero(quota)
