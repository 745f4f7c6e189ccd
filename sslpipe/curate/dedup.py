"""Near-duplicate removal: two samples are duplicates when the cosine similarity of their features exceeds the
threshold (strictly: faiss's inner-product `range_search` returns similarities > radius); duplicates of duplicates
form one group (connected components, union-find), and each group keeps its first sample in pool order (the first
shard's, then the first in the shard: deterministic) and drops the rest.

The search is chunked so memory stays bounded: the pool is one faiss index, exact (IndexFlatIP) up to `EXACT_ROWS`
rows (at most 77 MB at 384-d), IVF-Flat above (`sslpipe.embed.index.ivf_index`: n x dim float32, 1.5 GB for 1M x
384), and the queries, every row of the pool, go block by block and `QUERY_ROWS` at a time, their pairs merged into
the union-find before the next (each pair is found from both ends; the one from the later row is kept; the groups
do not depend on the order the queries go in). Why 50k:
at 102k rows an exact range search took 2.0 s per 2,000 queries (100 s in all) against 0.5 s on the IVF (26 s, after
a build of about 30 s), and the IVF found every one of 2,000 planted duplicates (cosine 0.955 to 0.99) at nprobe 8,
16 and 32 (2 busy CPU cores; docs/curate.md). A call returns every pair above the threshold, so the number of
queries per call adapts to keep the pairs within a budget, taking a block's rows in a seeded random order so that
every call sees the block's mix of sparse and dense rows (`_search`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from sslpipe.embed.index import exact_index, ivf_index
from sslpipe.embed.vectors import StoredVectors

QUERY_ROWS = 1024
PROBE_ROWS = 16  # the first call of a block: it measures the pairs per query
PAIR_BUDGET = 4_000_000  # pairs one call may return: about 100 MB with faiss's arrays and the copies made of them
DENSE_MIN_ROWS, DENSE_SHARE = 10_000, 0.5  # a pool this large, half of it above the threshold per query: refused
EXACT_ROWS = 50_000


def find_roots(parent: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The root of each row (the smallest row of its group); the rows asked about are pointed at it directly."""
    roots = parent[rows]
    while True:
        up = parent[roots]
        if np.array_equal(up, roots):
            break
        roots = up
    parent[rows] = roots
    return roots


def union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the groups of every pair (a[i], b[i]); the smaller root becomes the root, so a group's root is its
    first row. Vectorised: repeated until no pair spans two groups (each round merges at least one)."""
    while len(a):
        ra, rb = find_roots(parent, a), find_roots(parent, b)
        differ = ra != rb
        lo, hi = np.minimum(ra, rb)[differ], np.maximum(ra, rb)[differ]
        np.minimum.at(parent, hi, lo)
        a, b = a[differ], b[differ]


@dataclass
class Duplicates:
    """`root[i]`: the row that represents row i (itself when it is kept); `threshold`: the cosine used."""

    root: np.ndarray
    threshold: float

    @property
    def kept(self) -> np.ndarray:
        return np.flatnonzero(self.root == np.arange(len(self.root)))

    def groups(self) -> list[np.ndarray]:
        """Rows of each group of two or more, the kept row first, groups in the order of their kept rows."""
        order = np.argsort(self.root, kind="stable")
        _, starts, counts = np.unique(self.root[order], return_index=True, return_counts=True)
        return [order[s:s + c] for s, c in zip(starts, counts) if c > 1]


def _search(index: Any, block: np.ndarray, first: int, threshold: float, parent: np.ndarray,
            rng: np.random.Generator) -> None:
    """Join every row of `block` (rows first, first + 1, ...) to the earlier rows above `threshold`. The queries
    go in a random order, so each call draws from the whole block: a first call of `PROBE_ROWS` queries measures how
    many pairs a query returns, and each later call takes as many queries as the pairs per query so far (the mean
    over the block's earlier calls) fit in `PAIR_BUDGET` (at most twice the last call's, and `QUERY_ROWS`). A
    stretch of dense rows (near-copies) then spreads over the block's calls instead of falling whole into the call
    that reaches it; a call exceeds the budget only by the chance of its draw. A large pool where a query finds
    more than `DENSE_SHARE` of it above the threshold is refused at once (a search of n^2 pairs, for features that
    barely differ)."""
    n, start, per_call, pairs = len(parent), 0, PROBE_ROWS, 0
    order = rng.permutation(len(block))
    while start < len(block):
        picked = order[start:start + per_call]
        lims, _, found = index.range_search(np.ascontiguousarray(block[picked]), threshold)
        per_query = len(found) / len(picked)
        if n >= DENSE_MIN_ROWS and per_query > DENSE_SHARE * n:
            raise ValueError(f"each sample has {per_query:.0f} of the pool's {n} samples above cosine {threshold} on "
                             f"average: the features barely differ (a backbone at random init?); embed with a trained "
                             f"backbone, or raise --dup-threshold")
        rows = first + np.repeat(picked, np.diff(lims).astype(np.int64))
        cols = found.astype(np.int64)
        earlier = cols < rows
        union(parent, rows[earlier], cols[earlier])
        start, pairs = start + len(picked), pairs + len(found)
        per_call = int(max(1, min(QUERY_ROWS, 2 * len(picked), PAIR_BUDGET // max(pairs / start, 1.0))))


def find_duplicates(vectors: StoredVectors, threshold: float, *, progress: bool = True,
                    seed: int = 0) -> Duplicates:
    """The near-duplicate groups of an embedding set at cosine > `threshold` (module docstring)."""
    n = len(vectors)
    parent = np.arange(n, dtype=np.int64)
    if n:
        index = ivf_index(vectors, seed) if n > EXACT_ROWS else exact_index(vectors)
        for first, block in tqdm(vectors.blocks(), total=len(vectors.block_parts()), desc="near-duplicates",
                                 unit="block", disable=not progress):
            _search(index, block, first, threshold, parent, np.random.default_rng([seed, first]))
    return Duplicates(find_roots(parent, np.arange(n)), threshold)
