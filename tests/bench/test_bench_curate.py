"""`sslpipe bench curate`: faiss k-means vs MiniBatchKMeans and IVF vs exact search, at a small N."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sslpipe.bench.curate import synthetic_features
from sslpipe.cli import main


def test_curate_bench_compares_both_sides(tmp_path: Path, capsys) -> None:
    torch.set_num_threads(1)
    assert main(["bench", "curate", "--n", "2000", "--queries", "100", "--out", str(tmp_path / "b.json")]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    km, search = result["kmeans"], result["search"]
    assert km["k"] == 20 and km["faiss_s"] > 0 and km["sklearn_s"] > 0
    assert km["faiss_peak_mb"] >= 0 and km["sklearn_peak_mb"] >= 0 and km["faiss_inertia"] > 0
    assert search["queries"] == 100 and 0.9 <= search["recall"] <= 1 and search["ivf_ms_per_query"] > 0
    table = capsys.readouterr().out
    assert "sklearn MiniBatch" in table and "recall@10 vs exact" in table


def test_synthetic_features_are_unit_rows_with_close_neighbours() -> None:
    x = synthetic_features(500)
    assert x.shape == (500, 384) and x.dtype.name == "float32"
    assert abs(float((x * x).sum(1).max()) - 1) < 1e-5
    sims = x @ x.T - 2 * torch.eye(500).numpy()
    assert sims.max(1).mean() > 0.6 and abs(float(torch.from_numpy(sims).median())) < 0.05  # concepts, not noise
