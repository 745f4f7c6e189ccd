"""`sslpipe bench curate`: faiss k-means vs MiniBatchKMeans and IVF vs exact search, at a small N."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sslpipe.bench.curate import kmeans_pair, synthetic_features
from sslpipe.cli import main


def test_curate_bench_compares_both_sides(tmp_path: Path, capsys) -> None:
    torch.set_num_threads(1)
    assert main(["bench", "curate", "--n", "2000", "--queries", "100", "--out", str(tmp_path / "b.json")]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    km, search = result["kmeans"], result["search"]
    assert km["k"] == 20 and km["faiss_s"] > 0 and km["sklearn_s"] > 0
    assert km["faiss_peak_mb"] >= 0 and km["sklearn_peak_mb"] >= 0 and km["faiss_inertia"] > 0
    # the same passes each: faiss trains on all 2000 rows (20 clusters x 256 > 2000) for 20 iterations;
    # MiniBatchKMeans takes 20 * 2000 // 1024 = 39 batches of 1024
    assert km["faiss_passes"] == 20 and km["sklearn_passes"] == 39 * 1024 / 2000
    assert search["queries"] == 100 and 0.9 <= search["recall"] <= 1 and search["ivf_ms_per_query"] > 0
    table = capsys.readouterr().out
    assert "sklearn MiniBatch" in table and "recall@10 vs exact" in table and "passes made" in table


def test_kmeans_pair_makes_the_same_passes_each() -> None:
    """10,000 rows, k = 50: MiniBatchKMeans with its default early stopping ended after 48 batches (4.9 passes) where
    faiss made 20; now 20 * 10000 // 1024 = 195 batches, 19.97 passes. With k = 20 faiss trains on a sample of
    20 x 256 = 5120 rows, 10.24 passes over the rows, and says so."""
    torch.set_num_threads(1)
    x = synthetic_features(10_000, dim=64)
    km = kmeans_pair(x, 50, niter=20)
    assert km["faiss_passes"] == 20 and km["sklearn_passes"] == 195 * 1024 / 10_000
    assert kmeans_pair(x, 20, niter=20)["faiss_passes"] == 20 * 5120 / 10_000


def test_synthetic_features_are_unit_rows_with_close_neighbours() -> None:
    x = synthetic_features(500)
    assert x.shape == (500, 384) and x.dtype.name == "float32"
    assert abs(float((x * x).sum(1).max()) - 1) < 1e-5
    sims = x @ x.T - 2 * torch.eye(500).numpy()
    assert sims.max(1).mean() > 0.6 and abs(float(torch.from_numpy(sims).median())) < 0.05  # concepts, not noise
