"""The classes of a segmentation task, read from its shard manifests before anything is built or trained.

One rule for every segmentation recipe (fine-tuning, U2PL, supervised-only, the linear segmentation probe):
- the manifest names the classes (`classes`; an empty list means the source named none, e.g. a `--seg-list` written
  without `--classes`), and the recipe's class count, when set, must agree with it;
- without names, the recipe's class count is used, or else it is inferred from the label values the label maps hold
  (`seg_values`, written by `sslpipe shards`: largest value + 1), with a notice;
- a label value the classifier could not predict (>= the class count, other than the ignore label) is an error
  that names the shard set and the key to change, instead of an index error deep inside a loss;
- shards without label maps (classification shards) are refused at once.
Shard specs without a manifest (brace patterns, URLs) cannot be checked: the class count must then be given.
"""
from __future__ import annotations

from sslpipe.data.manifest import read_manifest


def _manifest(spec: str | None) -> dict | None:
    if not spec:
        return None
    try:
        return read_manifest(spec)
    except (FileNotFoundError, ValueError):
        return None


def segmentation_classes(train: str, num_classes: int | None, key: str, *, val: str | None = None,
                         ignore_index: int = 255, verbose: bool = True) -> list[str]:
    """Class names for a segmentation run on `train` (and `val`) shards; `key` is the recipe key that holds
    `num_classes` (named in every message)."""
    manifests = {spec: m for spec in dict.fromkeys([train, val]) if (m := _manifest(spec)) is not None}
    for spec, manifest in manifests.items():
        if not manifest.get("has_seg", False):
            raise ValueError(f"{spec} holds no label maps (a {manifest.get('source_kind', 'classification')} shard "
                             "set without seg.png): segmentation needs shards written by `sslpipe shards "
                             "--seg-list`, `--coco`, `--voc`, `--ade20k` or `--dataset scenes`")
    names = list(manifests[train]["classes"]) if train in manifests else []
    values = sorted({int(v) for m in manifests.values() for v in m.get("seg_values", []) if int(v) != ignore_index})
    needed = values[-1] + 1 if values else None
    if names:
        if num_classes is not None and len(names) != num_classes:
            raise ValueError(f"{key}={num_classes} but the manifest of {train} lists {len(names)} classes {names}")
    elif num_classes is not None:
        names = [str(i) for i in range(num_classes)]
    elif needed is not None:
        names = [str(i) for i in range(needed)]
        if verbose:
            print(f"classes: {train} names none; {needed} classes from its label values 0..{needed - 1} (name them "
                  f"with `sslpipe shards --classes`, or set {key})", flush=True)
    else:
        where = "names no classes" if train in manifests else "has no manifest.json to read the classes from"
        raise ValueError(f"data.train={train!r} {where}: set {key}, or write the shards with `sslpipe shards "
                         "--classes`")
    if needed is not None and needed > len(names):
        sets = " and ".join(manifests)
        raise ValueError(f"the label maps of {sets} hold class value {needed - 1}, but there are only {len(names)} "
                         f"classes (0..{len(names) - 1}, {ignore_index} = ignore): set {key}={needed} or more, or "
                         "name the classes with `sslpipe shards --classes`")
    return names
