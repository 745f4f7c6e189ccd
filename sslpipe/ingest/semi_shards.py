"""The shard sets of semi-supervised segmentation (U2PL data), from a layout's (train, val) pairs.

`write_semi_shards` turns (train, val) lists into three shard sets: `OUT/labeled` (image + seg.png, the seeded
labelled subset: `label_split`, or a given id list), `OUT/unlabeled` (the rest, image + seg.png: the labels travel
for U2PL's pseudo-label diagnostics only, no loss reads them) and `OUT/val` (image + seg.png), each with split
`train` (val: `val`), plus `OUT/split.json` (the ids of each subset). The shards are written by
`write_shards(kind="seg-list")`; the class names of the layout are then put into each manifest (the seg-list source
has no way to know them).

Label splits (`label_split`): the labelled subset of a list of ids is a seeded choice (numpy `default_rng(seed)`
permutation of the ids in their given order, the first n kept), n given as a count (`92`, `1464`) or a fraction
(`1/16` ... `1/2`, rounded); the unlabelled subset is the rest.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from sslpipe.data.manifest import read_manifest
from sslpipe.ingest.layouts import Pair
from sslpipe.ingest.options import ShardOptions
from sslpipe.ingest.shards import write_shards
from sslpipe.ingest.tar_writer import remove_shard_set, rewrite_manifest

MIN_SHARDS = 4  # per set, when it has that many samples
SETS = ("labeled", "unlabeled", "val")
OUTPUTS = (*SETS, "lists", "split.json")  # what a layout writes into OUT, besides its `source` cache


def check_semi_out(out: str | Path, force: bool) -> None:
    """Refuse to write a layout over an earlier one unless `force`: called before anything is written into `out`
    (converted labels, generated images, lists), so a refused run changes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"layout output {out} exists and is not a directory; choose another output directory")
    found = [name for name in OUTPUTS
             if (out / name).is_file() or ((out / name).is_dir() and any((out / name).iterdir()))]
    if found and not force:
        raise FileExistsError(f"layout output directory {out} already holds {', '.join(found)}; pass --force "
                              "(force=True) to rewrite them")


def parse_labeled(spec: str | int | float, total: int) -> int:
    """Number of labelled items: an int count, a fraction string `1/16`, or a float in (0, 1)."""
    if isinstance(spec, str) and "/" in spec:
        frac = float(Fraction(spec))
    elif isinstance(spec, str):
        frac = float(spec)
    else:
        frac = float(spec)
    n = int(round(frac * total)) if 0 < frac < 1 else int(frac)
    if not 1 <= n <= total:
        raise ValueError(f"labelled subset {spec!r} gives {n} of {total} items: give a count in 1..{total} or a "
                         "fraction such as 1/16")
    return n


def label_split(ids: Sequence[str], labeled: str | int | float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(labelled, unlabelled) ids: a seeded choice of `labeled` items (count or fraction), each list in the given
    order of `ids`."""
    n = parse_labeled(labeled, len(ids))
    chosen = set(np.random.default_rng(seed).permutation(len(ids))[:n].tolist())
    return ([i for k, i in enumerate(ids) if k in chosen], [i for k, i in enumerate(ids) if k not in chosen])


def _write_list(lines: list[str], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _set_classes(shard_dir: Path, classes: list[str]) -> None:
    """Put the layout's class names into a manifest written by write_shards."""
    manifest = read_manifest(shard_dir)
    manifest["classes"] = list(classes)
    rewrite_manifest(shard_dir, manifest)


def write_semi_shards(out: str | Path, train: list[Pair], val: list[Pair] | None, *, classes: list[str],
                      labeled: str | int | float | None = None, labeled_ids: Sequence[str] | None = None,
                      seed: int = 0, samples_per_shard: int = 1000, force: bool = False, num_workers: int = 0,
                      progress: bool = True, created_by: str | None = None) -> dict:
    """Write OUT/labeled, OUT/unlabeled (when any train item is unlabelled), OUT/val and OUT/split.json (module
    docstring). The labelled subset is `labeled_ids` when given, else the seeded `label_split(ids, labeled, seed)`.
    Each set gets at least `MIN_SHARDS` shards when it has that many samples (so that 2-4 processes can share it).
    With `force`, a set of an earlier run that this run does not write (e.g. OUT/unlabeled, when all are now
    labelled) is removed with its list once the new sets are written: left behind, it would overlap them."""
    out = Path(out)
    check_semi_out(out, force)
    train = [(i, str(Path(a).resolve()), str(Path(b).resolve())) for i, a, b in train]
    val = [(i, str(Path(a).resolve()), str(Path(b).resolve())) for i, a, b in val or []]
    ids = [p[0] for p in train]
    if labeled_ids is not None:
        wanted = set(labeled_ids)
        unknown = wanted - set(ids)
        if unknown:
            raise ValueError(f"{len(unknown)} labelled ids are not in the train list, e.g. {sorted(unknown)[:3]}")
        lab_ids = [i for i in ids if i in wanted]
        unl_ids = [i for i in ids if i not in wanted]
    elif labeled is not None:
        lab_ids, unl_ids = label_split(ids, labeled, seed)
    else:
        lab_ids, unl_ids = ids, []
    by_id = {p[0]: p for p in train}
    lists = out / "lists"
    sets = {"labeled": (_write_list([f"{by_id[i][1]}\t{by_id[i][2]}" for i in lab_ids], lists / "labeled.txt"),
                        "seg-list", len(lab_ids))}
    if unl_ids:  # with their labels: U2PL reads them for its pseudo-label diagnostics only (docs/u2pl.md)
        sets["unlabeled"] = (_write_list([f"{by_id[i][1]}\t{by_id[i][2]}" for i in unl_ids], lists / "unlabeled.txt"),
                             "seg-list", len(unl_ids))
    if val:
        sets["val"] = (_write_list([f"{p[1]}\t{p[2]}" for p in val], lists / "val.txt"), "seg-list", len(val))
    summary: dict = {"labeled": len(lab_ids), "unlabeled": len(unl_ids), "val": len(val or []), "seed": seed,
                     "labeled_spec": labeled if labeled_ids is None else "list", "sets": {}}
    for name, (list_file, kind, n) in sets.items():
        per_shard = max(1, min(samples_per_shard, math.ceil(n / MIN_SHARDS)))
        manifest = write_shards(out / name, source=str(list_file), kind=kind,
                                options=ShardOptions(samples_per_shard=per_shard, seed=seed), force=force,
                                num_workers=num_workers, progress=progress, created_by=created_by)
        if name == "val":  # write_shards names a list source's only split `train`; val shards carry split `val`
            _rename_split(out / name, "train", "val")
        _set_classes(out / name, classes)
        if manifest.get("skipped"):
            raise ValueError(f"{out / name}: {len(manifest['skipped'])} of {n} images could not be read, e.g. "
                             f"{manifest['skipped'][0]}")
        summary["sets"][name] = {"samples": n, "shards": sum(len(s["shards"]) for s in manifest["splits"].values())}
    for name in SETS:
        if name not in sets:
            remove_shard_set(out / name)
            (lists / f"{name}.txt").unlink(missing_ok=True)
    _write_list([json.dumps({"labeled": lab_ids, "unlabeled": unl_ids, "seed": seed,
                             "labeled_spec": summary["labeled_spec"]})], out / "split.json")
    return summary


def _rename_split(shard_dir: Path, old: str, new: str) -> None:
    """Rename the shards and manifest entry of split `old` to `new` (tar contents unchanged, so sha256 holds)."""
    manifest = read_manifest(shard_dir)
    info = manifest["splits"].pop(old)
    for shard in info["shards"]:
        name = new + shard["name"][len(old):]
        os.replace(shard_dir / shard["name"], shard_dir / name)
        shard["name"] = name
    manifest["splits"][new] = info
    rewrite_manifest(shard_dir, manifest)
