"""`sslpipe curate`: a raw shard pool -> a smaller, balanced shard set (Vo et al. 2024; docs/curate.md).

Embeddings (`sslpipe embed`, or an --embeddings folder of it) -> near-duplicates removed (`dedup`) -> hierarchical
k-means with resampling on what is left (`hierarchy`) -> balanced hierarchical sampling down to N (`sampling`) -> the
chosen samples copied byte for byte into a new shard set (`output`), whose manifest records the curation and, per
sample, its source shard and key, its cluster at each level and its duplicate group; beside it duplicates.json (the
groups) and clusters.png.

Memory, for a pool of 1M x 384 features (float16 on disk: 768 MB, never all in memory as float16): the
near-duplicate search holds the IVF index of the pool (1M x 384 x 4 B = 1.5 GB; an exact index of at most 77 MB
below 50k rows) and one block of queries (65,536 rows, 100 MB); k-means then holds the kept rows in float32 (1.5 GB;
faiss trains on at most 256 rows per centroid, 2.56 M for 10k clusters, so on all of them) plus faiss's buffers
(assignments, 10k centroids of 15 MB); the upper levels and their resampling work on the 10k level-1 centroids (MB);
keys and sources take about 100 MB. Peak: about 1.7 GB. `sslpipe bench curate` measures k-means' share.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sslpipe.curate.dedup import Duplicates, find_duplicates
from sslpipe.curate.figure import draw_clusters
from sslpipe.curate.hierarchy import NITER, Level, hierarchical_kmeans, point_clusters
from sslpipe.curate.output import copy_samples, refuse_existing, staged
from sslpipe.curate.sampling import balanced_sample
from sslpipe.data.manifest import FORMAT, read_manifest
from sslpipe.embed.embed import embed_shards, shard_mismatch
from sslpipe.embed.inputs import data_name, resolve_input
from sslpipe.embed.store import read_index
from sslpipe.embed.vectors import StoredVectors
from sslpipe.eval.spec import FeatureSpec
from sslpipe.ingest.tar_writer import ShardSetWriter

DUP_THRESHOLD = 0.95
SAMPLES_PER_SHARD = 10000


def pool_embeddings(shards: str | Path, out: Path, *, backbone: str | Path | None, embeddings: str | Path | None,
                    split: str, spec: FeatureSpec | None, progress: bool, force: bool = False) -> Path:
    """The embedding folder of the pool: `embeddings` checked against `shards`, or written next to `out` as
    OUT.embeddings with `backbone` (a rerun resumes it, and --embeddings can reuse it). `force` (curate's: replace)
    replaces an OUT.embeddings that `embed` refuses to add to (another backbone, pool or spec, a changed folder);
    one it can add to is reused, not embedded again."""
    if (backbone is None) == (embeddings is None):
        raise ValueError("sslpipe curate needs exactly one of --backbone EXPORT (embed the pool) and --embeddings DIR "
                         "(from `sslpipe embed`)")
    if backbone is not None:
        into = out.with_name(out.name + ".embeddings")
        try:
            return embed_shards(backbone, shards, into, split=split, spec=spec, progress=progress)
        except FileExistsError:
            if not force:
                raise
        return embed_shards(backbone, shards, into, split=split, spec=spec, progress=progress, force=True)
    index = read_index(embeddings)
    if not index.get("complete"):
        raise ValueError(f"--embeddings {embeddings} is incomplete (a run stopped before every shard was embedded): "
                         "run `sslpipe embed` again with the same --out to finish it")
    if (index["data"], index["split"]) != (data_name(shards), split):
        raise ValueError(f"--embeddings {embeddings} holds split {index['split']!r} of {index['data']}, not split "
                         f"{split!r} of {data_name(shards)}: embed these shards, or pass their embedding folder")
    why = shard_mismatch(index, resolve_input(shards, split, Path(embeddings)))
    if why:
        raise ValueError(f"--embeddings {embeddings} no longer matches {shards} ({why}): embed the pool again "
                         f"(`sslpipe embed ... --out {embeddings} --force`, or curate with --backbone)")
    return Path(embeddings)


def _check_sizes(n: int, dups: Duplicates, size: int, where: Path) -> None:
    kept = len(dups.kept)
    if n == 0:
        raise ValueError(f"the pool is empty: {where} holds no embedded sample (no readable image in the shards)")
    if n > 1 and kept == 1:
        raise ValueError(f"all {n} samples of the pool are near-duplicates of one another (cosine > "
                         f"{dups.threshold}): nothing to curate; raise --dup-threshold if they are not copies")
    if not 1 <= size <= kept:
        raise ValueError(f"--size {size}, but {kept} samples are left after removing {n - kept} near-duplicates "
                         f"(cosine > {dups.threshold}) from {n}: ask for 1 to {kept}"
                         + (", or raise --dup-threshold" if kept < n else ""))


def _source_fields(data: str) -> dict[str, Any]:
    """classes / has_seg / seg_values of the pool's manifest (a shard directory), carried over to the curated set."""
    try:
        manifest = read_manifest(data)
    except (FileNotFoundError, ValueError):
        return {"classes": [], "has_seg": False}
    return {k: manifest[k] for k in ("classes", "has_seg", "seg_values") if k in manifest}


def _curation(vectors: StoredVectors, written: list[int], clusters: np.ndarray, kept: np.ndarray,
              dups: Duplicates, levels: Sequence[Level], settings: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `curation`: settings, counts, and per written sample (columns, in shard order) its source
    shard (an index into `source_shards`) and key, its cluster at each level and its duplicate group (-1: none)."""
    group_of = {int(g[0]): i for i, g in enumerate(dups.groups())}
    column = {int(r): i for i, r in enumerate(kept)}
    shards = vectors.index["shards"]
    shard_of = {url: i for i, url in enumerate(shards)}
    return {**settings, "pool": {k: vectors.index[k] for k in ("backbone", "backbone_sha256", "data", "split")},
            "embeddings": str(vectors.folder), "pool_samples": len(vectors),
            "duplicates_removed": len(vectors) - len(kept), "duplicate_groups": len(group_of),
            "clusters_per_level": [len(level.centroids) for level in levels], "source_shards": shards,
            "samples": {"source_shard": [shard_of[vectors.sources[r]] for r in written],
                        "source_key": [vectors.keys[r] for r in written],
                        "clusters": [clusters[column[r]].tolist() for r in written],
                        "duplicate_group": [group_of.get(r, -1) for r in written]}}


def _groups_json(vectors: StoredVectors, dups: Duplicates) -> dict[str, Any]:
    def sample(r: int) -> dict[str, str]:
        return {"key": vectors.keys[r], "source": vectors.sources[r]}

    return {"threshold": dups.threshold, "rule": "cosine > threshold; connected groups; the first in pool order kept",
            "groups": [{"kept": sample(g[0]), "removed": [sample(r) for r in g[1:]]} for g in dups.groups()]}


def curate(shards: str | Path, out: str | Path, size: int, *, backbone: str | Path | None = None,
           embeddings: str | Path | None = None, split: str = "train", spec: FeatureSpec | None = None,
           dup_threshold: float = DUP_THRESHOLD, clusters: Sequence[int] | None = None,
           resample_steps: Sequence[int] | None = None, resample_sizes: Sequence[int] | None = None,
           niter: int = NITER, seed: int = 0, samples_per_shard: int = SAMPLES_PER_SHARD, force: bool = False,
           progress: bool = True, command: str = "") -> dict[str, Any]:
    """Write the curated shard set of `size` samples into `out`; return its manifest (module docstring). None for
    `clusters`, `resample_steps` or `resample_sizes`: the defaults scaled to the pool (sslpipe/curate/hierarchy.py)."""
    out = Path(out)
    if not 0.0 < dup_threshold <= 1.0:
        raise ValueError(f"--dup-threshold {dup_threshold}: a cosine similarity in (0, 1] (default {DUP_THRESHOLD}); "
                         "1 removes exact copies only")
    refuse_existing(out, force)
    folder = pool_embeddings(shards, out, backbone=backbone, embeddings=embeddings, split=split, spec=spec,
                             progress=progress, force=force)
    vectors = StoredVectors(folder)
    dups = find_duplicates(vectors, dup_threshold, progress=progress, seed=seed)
    _check_sizes(len(vectors), dups, size, folder)
    kept = dups.kept
    levels = hierarchical_kmeans(vectors.gather(kept), clusters, steps=resample_steps, sizes=resample_sizes,
                                 niter=niter, seed=seed, progress=progress)
    picked = balanced_sample(levels, size, seed)
    per_level = point_clusters(levels)
    settings = {"command": command, "size": size, "dup_threshold": dup_threshold, "seed": seed, "niter": niter,
                "clusters_requested": list(clusters) if clusters is not None else None,
                "resample_steps": resample_steps, "resample_sizes": resample_sizes}
    with staged(out, force) as stage:
        writer = ShardSetWriter(stage, samples_per_shard, None)
        info, written = copy_samples(writer, vectors, kept[picked], progress)
        manifest = {"format": FORMAT, "created_by": command,
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "source": vectors.index["data"], "source_kind": "curated",
                    **_source_fields(vectors.index["data"]), "image_key": ";".join(sorted(writer.keys_seen)),
                    "splits": {"train": info}, "skipped": [], "options": {"samples_per_shard": samples_per_shard},
                    "curation": _curation(vectors, written, per_level, kept, dups, levels, settings)}
        writer.publish(manifest)
        (stage / "duplicates.json").write_text(json.dumps(_groups_json(vectors, dups), indent=1) + "\n")
        draw_clusters(vectors, kept[picked], per_level[picked, -1], per_level[:, -1], stage / "clusters.png", seed)
    return manifest
