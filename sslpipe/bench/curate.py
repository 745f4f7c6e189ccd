"""`sslpipe bench curate`: the pieces of `sslpipe curate` at scale, side by side on the same synthetic features.

1. k-means: faiss (`sslpipe.curate.kmeans`, what curate runs: `faiss.Kmeans` + assignment of every point) vs
   scikit-learn's MiniBatchKMeans (same k, batch 1024, `max_iter` = the same number of passes, its early stopping
   off: `max_no_improvement=None, tol=0`, which would otherwise end it after about 4 of 20), on N x 384 float32
   rows: wall time, peak memory (the RSS rise above the features themselves, `sslpipe.bench.memory`), the mean
   squared distance of the points to their centroid (lower is better) and the passes each made over the rows
   (faiss: `niter` over its training sample, all rows when k >= N / 256; MiniBatchKMeans: its steps x batch / N).
2. search: the exact IndexFlatIP vs the IVF-Flat index of `sslpipe search` above its crossover
   (`sslpipe.embed.index`), both built from an embedding folder written with the store: build time, time per query
   (a batch of held-out queries), and the IVF's recall@10 against exact search.

The features: 1000 concepts (fewer for a small N: N / 20, at least 10), centres in 384-d; each point its centre plus
a Gaussian in a 32-d subspace shared by all concepts plus small isotropic noise, L2-normalised. A point's nearest
neighbour has cosine ~0.75 and its 10th ~0.65, as for image embeddings of a self-supervised backbone, and the
concepts are well apart, which makes IVF's recall optimistic: docs/curate.md gives a harder set too.
"""
from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np
import torch

from sslpipe.bench.memory import peak_rss_increase
from sslpipe.curate.hierarchy import NITER, default_clusters
from sslpipe.curate.kmeans import assign, kmeans
from sslpipe.embed.index import exact_index, ivf_index, nlist_for, require_faiss
from sslpipe.embed.store import write_index, write_part
from sslpipe.embed.vectors import StoredVectors

PART_ROWS = 10_000
SUBSPACE = 32
SPREAD = 3.0  # the within-concept Gaussian's scale (the centres' coordinates are standard normal)


def synthetic_features(n: int, dim: int = 384, seed: int = 0, centres: int | None = None) -> np.ndarray:
    """n float32 unit rows around `centres` concepts (module docstring); the same concepts for any seed."""
    fixed = np.random.default_rng(12345)
    k = centres or min(1000, max(10, n // 20))
    centre = fixed.standard_normal((k, dim)).astype(np.float32)
    basis = np.linalg.qr(fixed.standard_normal((dim, SUBSPACE)))[0].astype(np.float32)
    rng = np.random.default_rng(seed)
    x = np.empty((n, dim), np.float32)
    for start in range(0, n, 65536):  # in chunks: no float64 temporaries of the whole set
        m = min(65536, n - start)
        z = rng.standard_normal((m, SUBSPACE), dtype=np.float32) * SPREAD
        noise = rng.standard_normal((m, dim), dtype=np.float32) * 0.1
        x[start:start + m] = centre[rng.integers(0, k, m)] + z @ basis.T + noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    return float(assign(x, centroids)[1].mean())


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


def kmeans_pair(x: np.ndarray, k: int, niter: int = NITER, seed: int = 0) -> dict[str, Any]:
    """faiss k-means + assignment (curate's level 1) vs MiniBatchKMeans.fit (which assigns too), on the same rows."""
    from sklearn.cluster import MiniBatchKMeans

    def faiss_fit() -> np.ndarray:
        centroids = kmeans(x, k, niter=niter, seed=seed)
        assign(x, centroids)
        return centroids

    centroids, t_faiss, mb_faiss = peak_rss_increase(faiss_fit)
    batch = 1024
    model = MiniBatchKMeans(n_clusters=k, max_iter=niter, batch_size=batch, n_init=1, random_state=seed,
                            max_no_improvement=None, tol=0.0)
    fitted, t_sk, mb_sk = peak_rss_increase(lambda: model.fit(x))
    trained_on = min(len(x), k * require_faiss().ClusteringParameters().max_points_per_centroid)
    return {"k": k, "niter": niter, "faiss_s": t_faiss, "faiss_peak_mb": mb_faiss, "sklearn_s": t_sk,
            "sklearn_peak_mb": mb_sk, "faiss_inertia": _inertia(x, centroids),
            "sklearn_inertia": _inertia(x, fitted.cluster_centers_.astype(np.float32)),
            "faiss_passes": niter * trained_on / len(x), "sklearn_passes": fitted.n_steps_ * batch / len(x)}


def search_pair(x: np.ndarray, queries: np.ndarray, k: int = 10, seed: int = 0) -> dict[str, Any]:
    """Exact vs IVF-Flat over `x` stored as an embedding folder: build and per-query times, IVF recall@k (`recall`)."""
    with tempfile.TemporaryDirectory(prefix="bench_curate_") as folder:
        for shard, start in enumerate(range(0, len(x), PART_ROWS)):
            rows = x[start:start + PART_ROWS]
            keys = [str(i) for i in range(start, start + len(rows))]
            write_part(folder, shard, torch.from_numpy(rows), keys, ["synthetic"] * len(rows))
        write_index(folder, {"dim": x.shape[1], "shards": [""] * -(-len(x) // PART_ROWS), "complete": True,
                             "count": len(x)})
        vectors = StoredVectors(folder)
        exact, t_exact_build = _timed(lambda: exact_index(vectors))
        (_, truth), t_exact = _timed(exact.search, queries, k)  # not a closure over `exact`, deleted below
        del exact
        ivf, t_ivf_build = _timed(lambda: ivf_index(vectors, seed))
        (_, found), t_ivf = _timed(lambda: ivf.search(queries, k))
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, found)]))
    return {"queries": len(queries), "k": k, "nlist": nlist_for(len(x)), "nprobe": int(ivf.nprobe),
            "exact_build_s": t_exact_build, "exact_ms_per_query": 1000 * t_exact / len(queries),
            "ivf_build_s": t_ivf_build, "ivf_ms_per_query": 1000 * t_ivf / len(queries), "recall": recall}


def run_curate_bench(n: int = 1_000_000, dim: int = 384, k: int | None = None, niter: int = NITER,
                     queries: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Both comparisons on N x dim synthetic rows; k defaults to curate's level-1 cluster count for N (N / 100)."""
    require_faiss()
    x = synthetic_features(n, dim, seed)
    result: dict[str, Any] = {"n": n, "dim": dim, "threads": torch.get_num_threads(),
                              "features_mb": x.nbytes / 2**20}
    result["kmeans"] = kmeans_pair(x, k or default_clusters(n)[0], niter, seed)
    result["search"] = search_pair(x, synthetic_features(min(queries, n), dim, seed + 1), seed=seed)
    result["table"] = format_table(result)
    return result


def format_table(r: dict[str, Any]) -> str:
    km, se = r["kmeans"], r["search"]
    rows = [(f"k-means, {r['n']} x {r['dim']}, k={km['k']}, {km['niter']} passes", "faiss", "sklearn MiniBatch"),
            ("passes made over the rows", f"{km['faiss_passes']:.1f}", f"{km['sklearn_passes']:.1f}"),
            ("wall time (s)", f"{km['faiss_s']:.2f}", f"{km['sklearn_s']:.2f}"),
            ("peak RSS rise (MB)", f"{km['faiss_peak_mb']:.0f}", f"{km['sklearn_peak_mb']:.0f}"),
            ("mean squared distance", f"{km['faiss_inertia']:.4f}", f"{km['sklearn_inertia']:.4f}"),
            (f"search, {se['queries']} queries, k={se['k']}", "exact (FlatIP)",
             f"IVF-Flat {se['nlist']} lists, nprobe {se['nprobe']}"),
            ("build (s)", f"{se['exact_build_s']:.2f}", f"{se['ivf_build_s']:.2f}"),
            ("ms / query", f"{se['exact_ms_per_query']:.3f}", f"{se['ivf_ms_per_query']:.3f}"),
            (f"recall@{se['k']} vs exact", "1", f"{se['recall']:.4f}")]
    width = max(len(a) for a, _, _ in rows)
    lines = [f"{a:<{width}}  {b:>16}  {c:>30}" for a, b, c in rows]
    lines.append(f"(features {r['features_mb']:.0f} MB float32, not counted in the peaks; {r['threads']} threads)")
    return "\n".join(lines)
