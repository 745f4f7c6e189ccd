"""`sslpipe curate`: near-duplicate groups at the threshold, hierarchical k-means levels and resampling, balanced
sampling by hand, the curated shard set (members byte-identical, manifest round-trips), and one-line refusals."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import one_line_error, read_tar, tiny_export
from PIL import Image

from sslpipe.cli import main
from sslpipe.curate import dedup as dedup_module
from sslpipe.curate import kmeans as kmeans_module
from sslpipe.curate.curate import curate
from sslpipe.curate.dedup import find_duplicates
from sslpipe.curate.hierarchy import (
    Level,
    cluster_level,
    default_clusters,
    default_resampling,
    hierarchical_kmeans,
    point_clusters,
)
from sslpipe.curate.sampling import allocate, balanced_sample
from sslpipe.data.manifest import read_manifest, verify_shards
from sslpipe.data.stream import count_samples, resolve_shards
from sslpipe.embed import index as index_module
from sslpipe.embed.index import exact_index
from sslpipe.embed.store import write_index, write_part
from sslpipe.embed.vectors import StoredVectors
from sslpipe.ingest.options import ShardOptions
from sslpipe.ingest.shards import write_shards

torch.set_num_threads(1)


def write_store(folder: Path, features: np.ndarray, *, per_part: int = 4, data: str = "pool", keys=None,
                sources=None, complete: bool = True, shards: list[str] | None = None) -> Path:
    """An embedding folder of the given rows, `per_part` rows per part (of the shards `shards`, default made up)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(features)
    keys = keys or [f"s{i:04d}" for i in range(n)]
    sources = sources or [f"shard-{i // per_part}" for i in range(n)]
    starts = list(range(0, n, per_part)) or [0]
    for shard, start in enumerate(starts):
        rows = slice(start, start + per_part)
        write_part(folder, shard, torch.from_numpy(features[rows]), keys[rows], sources[rows])
    write_index(folder, {"backbone": "b", "backbone_sha256": "0" * 64, "data": data, "split": "train",
                         "dim": features.shape[1], "shards": shards or [str(s) for s in range(len(starts))],
                         "complete": complete, "count": n})
    return folder


def _planted(dim: int = 16) -> np.ndarray:
    """Rows 0-9 orthonormal; row 10 at cosine 0.96 to row 2 (a duplicate at 0.95), row 11 at 0.94 to row 5 (not),
    rows 12 and 13 a chain from row 7 at 14 degrees a step: 12-7 and 13-12 at 0.97, 13-7 at 0.88 (one group of
    three through 12)."""
    basis = np.linalg.qr(np.random.default_rng(0).standard_normal((dim, dim)))[0]
    x = [basis[i] for i in range(10)]
    x.append(0.96 * basis[2] + np.sqrt(1 - 0.96**2) * basis[10])
    x.append(0.94 * basis[5] + np.sqrt(1 - 0.94**2) * basis[11])
    step = np.arccos(0.97)
    x += [np.cos(a) * basis[7] + np.sin(a) * basis[12] for a in (step, 2 * step)]
    return np.stack(x).astype(np.float32)


@pytest.mark.parametrize("path", ["exact", "ivf"])
def test_planted_duplicates_group_at_the_threshold(path: str, tmp_path: Path, monkeypatch) -> None:
    if path == "ivf":
        monkeypatch.setattr(dedup_module, "EXACT_ROWS", 4)
    vectors = StoredVectors(write_store(tmp_path / "emb", _planted()))
    dups = find_duplicates(vectors, 0.95, progress=False)
    assert [g.tolist() for g in dups.groups()] == [[2, 10], [7, 12, 13]]
    assert dups.kept.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11]
    assert [g.tolist() for g in find_duplicates(vectors, 0.93, progress=False).groups()] == [[2, 10], [5, 11],
                                                                                               [7, 12, 13]]
    assert find_duplicates(vectors, 0.965, progress=False).groups()[0].tolist() == [7, 12, 13]


def test_planted_duplicates_are_found_one_query_per_call(tmp_path: Path, monkeypatch) -> None:
    """The calls shrink to keep their pairs within the budget (here: one query each); the groups do not change."""
    monkeypatch.setattr(dedup_module, "PAIR_BUDGET", 1)
    monkeypatch.setattr(dedup_module, "PROBE_ROWS", 1)
    counting = []
    monkeypatch.setattr(dedup_module, "exact_index", lambda v: counting.append(
        _CountingIndex(exact_index(v))) or counting[-1])
    dups = find_duplicates(StoredVectors(write_store(tmp_path / "emb", _planted(), per_part=16)), 0.95,
                           progress=False)
    assert [g.tolist() for g in dups.groups()] == [[2, 10], [7, 12, 13]]
    assert [queries for queries, _ in counting[0].calls] == [1] * len(_planted())


class _CountingIndex:
    """An index that records the queries and pairs of each range search."""

    def __init__(self, index) -> None:
        self.index, self.calls = index, []

    def range_search(self, queries: np.ndarray, threshold: float):
        lims, scores, found = self.index.range_search(queries, threshold)
        self.calls.append((len(queries), len(found)))
        return lims, scores, found


def _dense(n: int) -> np.ndarray:
    """n unit vectors within cosine ~0.999 of one another: what a backbone at random init gives."""
    rng = np.random.default_rng(0)
    x = np.ones((n, 16), np.float32) + 0.01 * rng.standard_normal((n, 16)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_a_dense_pool_is_searched_within_the_pair_budget(tmp_path: Path, monkeypatch) -> None:
    """300 near-copies: every query returns 300 pairs, so after the first call each takes 1000 // 300 = 3 queries;
    no call returns more than the budget (the old fixed 1024 queries returned 90,000)."""
    monkeypatch.setattr(dedup_module, "PAIR_BUDGET", 1000)
    counting = []
    monkeypatch.setattr(dedup_module, "exact_index", lambda v: counting.append(
        _CountingIndex(exact_index(v))) or counting[-1])
    dups = find_duplicates(StoredVectors(write_store(tmp_path / "emb", _dense(300), per_part=300)), 0.95,
                           progress=False)
    calls = counting[0].calls
    assert len(dups.kept) == 1 and calls[0] == (16, 16 * 300)
    assert {q for q, _ in calls[1:-1]} == {3} and max(pairs for _, pairs in calls[1:]) <= 1000


def test_a_dense_stretch_after_a_sparse_one_stays_near_the_budget(tmp_path: Path, monkeypatch) -> None:
    """300 distinct rows, then 300 near-copies, in one block. In pool order the calls would grow on the sparse rows
    (1 pair per query) to 256 queries and the call reaching the copies would return 196 x 300 pairs; the random
    query order spreads the copies over every call (about 33 in each of ~66 queries), so none returns more than twice
    the budget."""
    monkeypatch.setattr(dedup_module, "PAIR_BUDGET", 10_000)
    counting = []
    monkeypatch.setattr(dedup_module, "exact_index", lambda v: counting.append(
        _CountingIndex(exact_index(v))) or counting[-1])
    rng = np.random.default_rng(1)
    sparse = rng.standard_normal((300, 16)).astype(np.float32)
    sparse /= np.linalg.norm(sparse, axis=1, keepdims=True)
    dups = find_duplicates(StoredVectors(write_store(tmp_path / "emb", np.concatenate([sparse, _dense(300)]),
                                                     per_part=600)), 0.95, progress=False)
    assert dups.kept.tolist() == list(range(301))  # the copies join the first of them, row 300
    calls = counting[0].calls
    assert sum(q for q, _ in calls) == 600 and max(pairs for _, pairs in calls) <= 20_000


def test_a_large_pool_of_near_copies_is_refused_after_one_call(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(dedup_module, "DENSE_MIN_ROWS", 100)
    counting = []
    monkeypatch.setattr(dedup_module, "exact_index", lambda v: counting.append(
        _CountingIndex(exact_index(v))) or counting[-1])
    with pytest.raises(ValueError, match=r"each sample has 200 of the pool's 200 samples above cosine 0.95 on "
                                         r"average: the features barely differ"):
        find_duplicates(StoredVectors(write_store(tmp_path / "emb", _dense(200), per_part=200)), 0.95,
                        progress=False)
    assert len(counting[0].calls) == 1
    for threshold in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=rf"--dup-threshold {threshold}: a cosine similarity in \(0, 1\]"):
            curate(tmp_path / "emb", tmp_path / f"out{threshold}", 1, embeddings=tmp_path / "emb",
                   dup_threshold=threshold, progress=False)


def test_default_levels_are_scaled_from_the_paper() -> None:
    assert default_clusters(1_000_000) == [10000, 500, 50, 10]
    assert default_clusters(20_000) == [200, 10]
    assert default_clusters(1438) == [14] and default_clusters(30) == [1]
    assert default_resampling(1_000_000, [10000, 500, 50, 10]) == ([0, 10, 10, 10], [50, 10, 5, 3])


def test_hierarchical_kmeans_levels_and_sizes() -> None:
    x = np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32)
    levels = hierarchical_kmeans(x, [30, 6, 2], steps=[0, 2, 2], sizes=[5, 3, 2], progress=False)
    assert [len(level.centroids) for level in levels] == [30, 6, 2]
    assert [len(level.labels) for level in levels] == [600, 30, 6]
    clusters = point_clusters(levels)
    assert clusters.shape == (600, 3)
    assert np.array_equal(clusters[:, 2], levels[2].labels[levels[1].labels[levels[0].labels]])
    # level 2 clusters the level-1 centroids: each level-1 centroid sits nearest its own level-2 centroid
    d = ((levels[0].centroids[:, None] - levels[1].centroids[None]) ** 2).sum(-1)
    assert np.array_equal(d.argmin(1), levels[1].labels)


def test_resampling_moves_centroids_out_of_the_dense_region() -> None:
    """9000 points in a small blob, 1000 spread over the square around it: k-means spends about half its 20
    centroids on the blob; after resampling (25 points per cluster, 10 steps) few stay there."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        x = np.concatenate([rng.normal(0, 0.05, (9000, 2)), rng.uniform(-1, 1, (1000, 2))]).astype(np.float32)

        def in_blob(level: Level) -> float:
            return float((np.linalg.norm(level.centroids, axis=1) < 0.15).mean())

        before = in_blob(cluster_level(x, 20, steps=0, size=25, seed=seed))
        after = in_blob(cluster_level(x, 20, steps=10, size=25, seed=seed))
        assert before >= 0.4 and after <= before / 2, (seed, before, after)


def test_kmeans_without_faiss_is_one_line(monkeypatch) -> None:
    monkeypatch.setattr(index_module, "faiss", None)
    with pytest.raises(ValueError, match=r"curation's k-means use faiss, which is not installed: pip install"):
        kmeans_module.kmeans(np.zeros((4, 2), np.float32), 2)


def test_allocate_by_hand() -> None:
    rng = np.random.default_rng(0)
    assert allocate([10, 2, 50], 12, rng).tolist() == [5, 2, 5]  # shares of 4; the 2 unused split 1 + 1
    counts = allocate([10, 2, 50], 13, rng).tolist()
    assert counts in ([6, 2, 5], [5, 2, 6])  # the 13th to one of the two larger clusters
    assert allocate([10, 2, 50], 100, rng).tolist() == [10, 2, 50] and allocate([3, 4], 0, rng).tolist() == [0, 0]
    assert allocate([1, 1, 1, 30], 9, rng).tolist() == [1, 1, 1, 6]


def test_balanced_sample_counts_by_hand() -> None:
    """Level-1 clusters A (10 points), B (2), C (50), D (4); top clusters {A, B} (12 points) and {C, D} (54).
    N = 12: 6 per top cluster; {A, B}: min(size, 4) = 4 + 2; {C, D}: min(size, 3) = 3 + 3."""
    sizes = [10, 2, 50, 4]
    labels1 = np.repeat(np.arange(4), sizes)
    levels = [Level(np.zeros((4, 2), np.float32), labels1), Level(np.zeros((2, 2), np.float32), np.array([0, 0, 1, 1]))]
    chosen = balanced_sample(levels, 12, seed=3)
    assert np.bincount(labels1[chosen], minlength=4).tolist() == [4, 2, 3, 3]
    assert np.array_equal(chosen, balanced_sample(levels, 12, seed=3))  # seeded
    assert len(balanced_sample(levels, 66)) == 66


@pytest.fixture(scope="module")
def pixel_embeddings(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedding folder of the digits train split whose features are the centred pixels (64-d), written with the
    store as `sslpipe embed` would: one part per shard, keys and source shards of the real samples."""
    folder = tmp_path_factory.mktemp("pixels")
    urls = resolve_shards(str(digits_shards), "train")
    pixels = {url: read_tar(Path(url)) for url in urls}
    arrays = {url: np.stack([np.asarray(Image.open(io.BytesIO(s["png"])), np.float32).ravel()
                             for s in samples.values()]) for url, samples in pixels.items()}
    mean = np.concatenate(list(arrays.values())).mean(0)
    for i, url in enumerate(urls):
        x = arrays[url] - mean
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        write_part(folder, i, torch.from_numpy(x), list(pixels[url]), [url] * len(x))
    write_index(folder, {"backbone": "pixels", "backbone_sha256": "0" * 64, "data": str(digits_shards.resolve()),
                         "split": "train", "dim": 64, "shards": urls, "complete": True, "count": 1438})
    return folder


def test_the_curated_set_copies_members_byte_for_byte(digits_shards: Path, pixel_embeddings: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "curated"
    manifest = curate(digits_shards, out, 120, embeddings=pixel_embeddings, dup_threshold=0.9,
                      samples_per_shard=50, progress=False, command="sslpipe curate (test)")
    assert read_manifest(out) == json.loads((out / "manifest.json").read_text()) == manifest
    assert verify_shards(out) == [] and count_samples(str(out)) == 120 and len(resolve_shards(str(out))) == 3
    assert manifest["classes"] == read_manifest(digits_shards)["classes"] and manifest["image_key"] == "png"
    c = manifest["curation"]
    samples = c["samples"]
    curated = {k: v for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar")
               for k, v in read_tar(out / name).items()}
    sources = {}
    for i, key in enumerate(curated):
        url = c["source_shards"][samples["source_shard"][i]]
        sources.setdefault(url, read_tar(Path(url)))
        assert curated[key] == sources[url][samples["source_key"][i]]  # every member, byte for byte
    assert len(set(zip(samples["source_shard"], samples["source_key"]))) == 120
    assert all(len(levels) == len(c["clusters_per_level"]) for levels in samples["clusters"])
    groups = json.loads((out / "duplicates.json").read_text())["groups"]
    assert len(groups) == c["duplicate_groups"] and c["duplicates_removed"] == sum(len(g["removed"]) for g in groups)
    removed = {(r["source"], r["key"]) for g in groups for r in g["removed"]}
    assert not removed & {(c["source_shards"][s], k) for s, k in zip(samples["source_shard"], samples["source_key"])}
    assert (out / "clusters.png").read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob(".*partial"))


def test_curate_with_a_backbone_embeds_the_pool_first(digits_shards: Path, tmp_path: Path) -> None:
    export = tiny_export(tmp_path / "vit")
    assert main(["curate", str(digits_shards), "--backbone", str(export), "--out", str(tmp_path / "cur"), "--size",
                 "30", "--dup-threshold", "0.99999", "--clusters", "6,2", "--resample-steps", "2,2"]) == 0
    assert count_samples(str(tmp_path / "cur")) == 30 and (tmp_path / "cur.embeddings" / "embed.json").is_file()
    assert read_manifest(tmp_path / "cur")["curation"]["clusters_per_level"] == [6, 2]


def test_force_with_another_backbone_replaces_the_pool_embeddings(digits_shards: Path, tmp_path: Path) -> None:
    """Curated with backbone A, then --force with backbone B: CURATED.embeddings is replaced by B's (curate's --force
    means replace); --force again with B reuses them (no part written again)."""
    a, b = tiny_export(tmp_path / "a", seed=0), tiny_export(tmp_path / "b", seed=1)
    out, emb = tmp_path / "cur", tmp_path / "cur.embeddings"
    argv = ["curate", str(digits_shards), "--out", str(out), "--size", "30", "--dup-threshold", "0.99999",
            "--clusters", "6,2", "--resample-steps", "2,2"]
    assert main([*argv, "--backbone", str(a)]) == 0
    assert main([*argv, "--backbone", str(b), "--force"]) == 0
    index = json.loads((emb / "embed.json").read_text())
    assert index["backbone"] == str(b.resolve()) and index["complete"]
    assert read_manifest(out)["curation"]["pool"]["backbone"] == str(b.resolve())
    written = {p.name: p.stat().st_mtime_ns for p in emb.glob("part-*.safetensors")}
    assert main([*argv, "--backbone", str(b), "--force"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in emb.glob("part-*.safetensors")} == written


def test_refusals_are_one_line(digits_shards: Path, pixel_embeddings: Path, tmp_path: Path, capsys,
                               monkeypatch) -> None:
    data = str(digits_shards.resolve())

    def run(embeddings: Path, size: int = 10, out: Path = tmp_path / "out") -> str:
        return one_line_error(["curate", data, "--embeddings", str(embeddings), "--out", str(out), "--size", str(size)],
                         capsys)

    gray = tiny_export(tmp_path / "gray", in_chans=1)
    err = one_line_error(["curate", data, "--backbone", str(gray), "--out", str(tmp_path / "o"), "--size", "5"], capsys)
    assert "1-channel" in err
    one = tmp_path / "one"  # a pool of one shard, which the stores below claim to have embedded
    (tmp_path / "four").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / "four" / f"{i}.png")
    write_shards(one, source=str(tmp_path / "four"), options=ShardOptions(samples_per_shard=8), progress=False)
    pool = dict(data=str(one.resolve()), shards=resolve_shards(str(one), "train"), per_part=8)

    def run_on_one(embeddings: Path) -> str:
        return one_line_error(["curate", str(one), "--embeddings", str(embeddings), "--out", str(tmp_path / "out"),
                               "--size", "10"], capsys)

    assert "the pool is empty" in run_on_one(write_store(tmp_path / "empty", np.zeros((0, 8), np.float32), **pool))
    same = np.tile(np.eye(8, dtype=np.float32)[:1], (6, 1))
    assert "all 6 samples of the pool are near-duplicates" in run_on_one(write_store(tmp_path / "same", same, **pool))
    err = run_on_one(write_store(tmp_path / "grown", np.eye(8, dtype=np.float32), data=pool["data"]))
    assert "no longer matches" in err and "2 shards were embedded and the data lists 1 (another shard list)" in err
    err = run(pixel_embeddings, size=5000)
    assert "--size 5000, but" in err and "samples are left after removing" in err
    incomplete = write_store(tmp_path / "part", np.eye(8, dtype=np.float32), data=data, complete=False)
    assert "is incomplete" in run(incomplete)
    other = write_store(tmp_path / "other", np.eye(8, dtype=np.float32), data="elsewhere")
    assert "not split 'train' of" in run(other)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert "--force" in run(pixel_embeddings, out=tmp_path / "full")

    def fail(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr("sslpipe.curate.output.members_of", fail)
    with pytest.raises(OSError, match="disk on fire"):
        curate(digits_shards, tmp_path / "half", 10, embeddings=pixel_embeddings, progress=False)
    assert not (tmp_path / "half").exists() and not list(tmp_path.glob(".*partial"))
