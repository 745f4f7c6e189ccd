"""The shard sets of semi-supervised segmentation (U2PL data), from a layout's (train, val) pairs.

`write_semi_shards` turns (train, val) lists into three shard sets: `OUT/labeled` (image + seg.png, the seeded
labelled subset: `label_split`, or a given id list), `OUT/unlabeled` (the rest, image + seg.png: the labels travel
for U2PL's pseudo-label diagnostics only, no loss reads them) and `OUT/val` (image + seg.png), each with split
`train` (val: `val`), plus `OUT/split.json` (the ids of each subset) and `OUT/lists/NAME.txt` (each set's
`image<TAB>label` lines). Each set is written as a seg-list source with the layout's classes
(`sslpipe.ingest.shards.write_unpublished`), so its label values are checked against them, and the sets are published
together once all are whole.

Label splits (`label_split`): the labelled subset of a list of ids is a seeded choice (numpy `default_rng(seed)`
permutation of the ids in their given order, the first n kept), n given as a count (`92`, `1464`) or a fraction
(`1/16` ... `1/2`, rounded); the unlabelled subset is the rest.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from sslpipe.ingest.layouts import Pair
from sslpipe.ingest.options import ShardOptions
from sslpipe.ingest.shards import write_unpublished
from sslpipe.ingest.tar_writer import ShardSetWriter, remove_shard_set

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


def check_semi_options(options: ShardOptions) -> None:
    """Refuse the options a layout does not read (called before anything is written, like `check_semi_out`)."""
    unread = [flag for flag, given in (("val_fraction (--val-fraction)", options.val_fraction),
                                       ("limit (--limit)", options.limit is not None)) if given]
    if unread:
        raise ValueError(f"{' and '.join(unread)} not read by a layout, which has its own val split and writes every "
                         "image it lists: leave it out")


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
    """`lines` into `path`, whole or not at all (a temp file in the same folder, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def _refuse_repeated_ids(pairs: list[Pair], which: str) -> None:
    """An id listed twice would be written twice (and, drawn into both subsets, be labelled and unlabelled at once)."""
    seen: set[str] = set()
    for pair in pairs:
        if pair[0] in seen:
            raise ValueError(f"the {which} list names id {pair[0]!r} twice: list each image once")
        seen.add(pair[0])


def _publish(out: Path, written: list[tuple[str, ShardSetWriter, dict]], pending: dict[str, Path]) -> None:
    """Publish the whole sets one after the other, split.json removed first (`write_semi_shards` writes it last). A
    failure in between (a full disk) would leave new sets beside an earlier run's: those, and this run's unpublished
    files, are removed, so that no mix of two subsets (an image labelled in one, unlabelled in the other) reads as
    complete."""
    (out / "split.json").unlink(missing_ok=True)
    published: set[str] = set()
    try:
        for name, writer, manifest in written:
            writer.publish(manifest)
            published.add(name)
            os.replace(pending[name], out / "lists" / f"{name}.txt")
    except BaseException:
        for name, writer, _ in written:
            if name not in published:
                writer.discard()
                remove_shard_set(out / name)
                pending[name].unlink(missing_ok=True)
                (out / "lists" / f"{name}.txt").unlink(missing_ok=True)
        raise


def write_semi_shards(out: str | Path, train: list[Pair], val: list[Pair] | None, *, classes: list[str],
                      labeled: str | int | float | None = None, labeled_ids: Sequence[str] | None = None,
                      options: ShardOptions = ShardOptions(), force: bool = False, num_workers: int = 0,
                      progress: bool = True, created_by: str | None = None) -> dict:
    """Write OUT/labeled, OUT/unlabeled (when any train item is unlabelled), OUT/val and OUT/split.json (module
    docstring). The labelled subset is `labeled_ids` when given, else the seeded `label_split(ids, labeled, seed)`.
    `options`: the seed, sharding and encoding of every set (`ShardOptions`; `val_fraction` and `limit` are refused:
    a layout has its own val split and writes each listed image). Each set gets at least `MIN_SHARDS` shards when it
    has that many samples (so that 2-4 processes can share it). Label values are checked against `classes` (an error
    names the label map). The sets are published only once all of them are whole: an unreadable image, a bad label
    map or a write failure leaves no set of this run behind (the sets of an earlier run stay as they were). With
    `force`, a set of an earlier run that this run does not write (e.g. OUT/unlabeled, when all are now labelled) is
    removed with its list once the new sets are published: left behind, it would overlap them."""
    out = Path(out)
    check_semi_options(options)
    check_semi_out(out, force)
    train = [(i, str(Path(a).resolve()), str(Path(b).resolve())) for i, a, b in train]
    val = [(i, str(Path(a).resolve()), str(Path(b).resolve())) for i, a, b in val or []]
    _refuse_repeated_ids(train, "train")
    _refuse_repeated_ids(val, "val")
    ids = [p[0] for p in train]
    if labeled_ids is not None:
        wanted = set(labeled_ids)
        unknown = wanted - set(ids)
        if unknown:
            raise ValueError(f"{len(unknown)} labelled ids are not in the train list, e.g. {sorted(unknown)[:3]}")
        lab_ids = [i for i in ids if i in wanted]
        unl_ids = [i for i in ids if i not in wanted]
    elif labeled is not None:
        lab_ids, unl_ids = label_split(ids, labeled, options.seed)
    else:
        lab_ids, unl_ids = ids, []
    by_id = {p[0]: p for p in train}
    lists = out / "lists"
    # with their labels: U2PL reads the unlabelled ones for its pseudo-label diagnostics only (docs/u2pl.md)
    sets = {"labeled": [by_id[i] for i in lab_ids], "unlabeled": [by_id[i] for i in unl_ids], "val": val}
    sets = {name: pairs for name, pairs in sets.items() if pairs or name == "labeled"}
    summary: dict = {"labeled": len(lab_ids), "unlabeled": len(unl_ids), "val": len(val), "seed": options.seed,
                     "labeled_spec": labeled if labeled_ids is None else "list", "sets": {}}
    written: list[tuple[str, ShardSetWriter, dict]] = []
    pending = {name: lists / f".{name}.txt.pending" for name in sets}  # each becomes lists/NAME.txt when published
    try:
        for name, pairs in sets.items():
            _write_list([f"{p[1]}\t{p[2]}" for p in pairs], pending[name])
            per_shard = max(1, min(options.samples_per_shard, math.ceil(len(pairs) / MIN_SHARDS)))
            writer, manifest = write_unpublished(
                out / name, source=str(pending[name]), kind="seg-list", classes=classes,
                options=dataclasses.replace(options, samples_per_shard=per_shard), force=force,
                num_workers=num_workers, progress=progress, created_by=created_by,
                split_names={"train": "val"} if name == "val" else None)  # val shards carry split `val`
            written.append((name, writer, manifest))
            if manifest["skipped"]:
                raise ValueError(f"{out / name}: {len(manifest['skipped'])} of {len(pairs)} images could not be read, "
                                 f"e.g. {manifest['skipped'][0]}; no shard set of this run was written (those already "
                                 "in the output stay as they were): fix or remove the image and run again")
            manifest["source"] = str((lists / f"{name}.txt").resolve())
    except BaseException:
        for name, writer, _ in written:
            writer.discard()
        for name, path in pending.items():
            path.unlink(missing_ok=True)
            for folder in (out / name, lists):  # left empty by this run
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        raise
    _publish(out, written, pending)
    for name, _, manifest in written:
        summary["sets"][name] = {"samples": len(sets[name]),
                                 "shards": sum(len(s["shards"]) for s in manifest["splits"].values())}
    for name in SETS:
        if name not in sets:
            remove_shard_set(out / name)
            (lists / f"{name}.txt").unlink(missing_ok=True)
    _write_list([json.dumps({"labeled": lab_ids, "unlabeled": unl_ids, "seed": options.seed,
                             "labeled_spec": summary["labeled_spec"]})], out / "split.json")
    return summary
