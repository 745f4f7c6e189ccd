"""Curation evidence (issue 33): the random subset of a skewed pool, and the class histograms and planted duplicates
found of a curated set, from the pool's truth.json (docs/evidence/skewed_pool.py).

    python docs/evidence/curation_stats.py random POOL_IMAGES OUT_FOLDER N SEED   # a random N of the pool (symlinks)
    python docs/evidence/curation_stats.py stats POOL_IMAGES CURATED [RANDOM_FOLDER]   # JSON to stdout
"""
from __future__ import annotations

import hashlib
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np


def _truth(pool_images: Path) -> list[dict]:
    return json.loads((pool_images / "truth.json").read_text())["files"]


def entropy_bits(classes: list[int]) -> float:
    counts = np.array(list(Counter(classes).values()), dtype=float)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def histogram(classes: list[int]) -> dict:
    n = len(classes)
    c = Counter(classes)
    return {"n": n, "entropy_bits": round(entropy_bits(classes), 4), "per_class": [c.get(k, 0) for k in range(11)],
            "junk_share": round(c.get(10, 0) / n, 4), "heavy_share": round((c.get(0, 0) + c.get(6, 0)) / n, 4)}


def random_subset(pool_images: Path, out: Path, n: int, seed: int) -> None:
    files = _truth(pool_images)
    rows = np.random.default_rng(seed).choice(len(files), n, replace=False)
    for r in sorted(rows):
        dst = out / files[r]["file"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to((pool_images / files[r]["file"]).resolve())


def _rows_of_keys(pool_images: Path, files: list[dict], shards: list[str]) -> dict[str, int]:
    """Each pool sample's key -> its row in truth.json, by the bytes of its image (`sslpipe shards --folder` keeps
    them; it does not keep the folder's order). Identical images (a zero shift) are matched in order."""
    rows_of_bytes: dict[str, list[int]] = {}
    for r, f in enumerate(files):
        rows_of_bytes.setdefault(hashlib.md5((pool_images / f["file"]).read_bytes()).hexdigest(), []).append(r)
    rows = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".png"):
                    digest = hashlib.md5(tar.extractfile(member).read()).hexdigest()
                    rows[member.name[:-4]] = rows_of_bytes[digest].pop(0)
    return rows


def stats(pool_images: Path, curated: Path, random_folder: Path | None) -> dict:
    files = _truth(pool_images)
    manifest = json.loads((curated / "manifest.json").read_text())
    rows = _rows_of_keys(pool_images, files, manifest["curation"]["source_shards"])
    row_of_key = rows.__getitem__
    picked = [row_of_key(k) for k in manifest["curation"]["samples"]["source_key"]]
    groups = json.loads((curated / "duplicates.json").read_text())["groups"]
    group_of = {}
    for g, group in enumerate(groups):
        for s in [group["kept"], *group["removed"]]:
            group_of[row_of_key(s["key"])] = g
    row_of_file = {f["file"]: r for r, f in enumerate(files)}
    planted = [(r, row_of_file[f["of"]]) for r, f in enumerate(files) if f["kind"] == "duplicate"]
    found = sum(1 for a, b in planted if a in group_of and group_of.get(a) == group_of.get(b))
    in_pair = {r for pair in planted for r in pair}
    removed = [row_of_key(s["key"]) for group in groups for s in group["removed"]]
    out = {"pool": histogram([f["class"] for f in files]),
           "curated": histogram([files[r]["class"] for r in picked]),
           "planted_duplicates": len(planted), "planted_found": found,
           "planted_found_share": round(found / len(planted), 4), "removed": len(removed),
           "removed_outside_planted_pairs": sum(1 for r in removed if r not in in_pair),
           "curated_kinds": dict(Counter(files[r]["kind"] for r in picked))}
    if random_folder is not None:
        chosen = [row_of_file[str(p.relative_to(random_folder))] for p in random_folder.glob("c*/*.png")]
        out["random"] = histogram([files[r]["class"] for r in chosen])
        out["random_kinds"] = dict(Counter(files[r]["kind"] for r in chosen))
    return out


if __name__ == "__main__":
    cmd, pool = sys.argv[1], Path(sys.argv[2])
    if cmd == "random":
        random_subset(pool, Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        print(json.dumps(stats(pool, Path(sys.argv[3]), Path(sys.argv[4]) if len(sys.argv) > 4 else None), indent=1))
