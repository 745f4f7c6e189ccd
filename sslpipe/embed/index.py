"""The faiss inner-product index of an embedding set (cosine similarity: the rows are L2-normalised): exact below
`EXACT_MAX` rows, approximate above.

Exact is `IndexFlatIP`. Approximate is IVF-Flat (`IndexIVFFlat`, inner product), not HNSW: it trains in seconds
where HNSW's graph takes minutes to build at a million rows, keeps the vectors as they are (no graph links on top of
the n x dim x 4 bytes), supports `range_search` (the near-duplicate search of `sslpipe curate` uses the same index)
and has one recall knob, `nprobe`. nlist = 4 sqrt(n) lists (faiss's guideline: 4 sqrt(n) to 16 sqrt(n)), trained on
at most 64 points per list; `NPROBE` lists are visited per query. `sslpipe bench curate` measures its recall@10
against the exact index (docs/curate.md, Evidence).

The crossover, measured with `sslpipe bench curate`'s features on 2 busy CPU cores (docs/curate.md): an exact query
took 0.24 ms at 10k rows, 1.3 ms at 50k, 2.4 ms at 100k and 4.6 ms at 200k, then 77 ms at 500k and 176 ms at 1M (the
float32 matrix outgrows the caches); the IVF answered in 0.1 to 0.6 ms, but its build took 1.2 s at 10k, 12 s at
100k and 20 s at 200k, repaid only after about 5,000 queries at every size, and its recall depends on the data. So
exact search up to EXACT_MAX = 200k rows (a few ms a query, no build, no recall loss), IVF above, where an exact
query costs a tenth of a second and more; `sslpipe search` stores the IVF index beside the parts
(search-ivf.faiss), so its build is paid once. The near-duplicate search makes a query of every row, so it switches
earlier (sslpipe/curate/dedup.py).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from sslpipe.embed.vectors import StoredVectors

try:
    import faiss
except ImportError:  # installed without the cpu/gpu extra
    faiss = None

EXACT_MAX = 200_000
NPROBE = 32
TRAIN_PER_LIST = 64


def require_faiss() -> Any:
    """The faiss module, or one line saying how to install it."""
    if faiss is None:
        raise ValueError("search, near-duplicate removal and curation's k-means use faiss, which is not installed: "
                         "pip install 'sslpipe[cpu]' (or 'sslpipe[gpu]' on CUDA machines)")
    return faiss


def nlist_for(n: int) -> int:
    """IVF lists for n rows: 4 sqrt(n), at least 1."""
    return max(1, int(4 * math.sqrt(n)))


def exact_index(vectors: StoredVectors) -> Any:
    """IndexFlatIP holding every row, filled block by block."""
    index = require_faiss().IndexFlatIP(vectors.dim)
    for _, block in vectors.blocks():
        index.add(block)
    return index


def ivf_index(vectors: StoredVectors, seed: int = 0, nprobe: int = NPROBE) -> Any:
    """IVF-Flat (inner product) over every row: trained on a seeded sample of at most `TRAIN_PER_LIST` rows per
    list, then filled block by block."""
    fs = require_faiss()
    n = len(vectors)
    nlist = nlist_for(n)
    index = fs.IndexIVFFlat(fs.IndexFlatIP(vectors.dim), vectors.dim, nlist, fs.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = 1  # a small set trains on what it has, without faiss's warning
    sample = np.random.default_rng(seed).choice(n, min(n, TRAIN_PER_LIST * nlist), replace=False)
    index.train(vectors.gather(np.sort(sample)))
    for _, block in vectors.blocks():
        index.add(block)
    index.nprobe = min(nprobe, nlist)
    return index


def build_index(vectors: StoredVectors, seed: int = 0) -> tuple[Any, str]:
    """(index, "exact" or "ivf") for the set: exact up to EXACT_MAX rows."""
    if len(vectors) <= EXACT_MAX:
        return exact_index(vectors), "exact"
    return ivf_index(vectors, seed), "ivf"
