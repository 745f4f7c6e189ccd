"""Checks made before a run writes anything: what would otherwise stop it later, after its directory was claimed or
after a whole epoch of training (a missing validation set, shards without the labels the periodic kNN reads, or
fewer training samples than its k, are found at the first evaluation, once an evaluation period is spent). Each
failure is one ValueError naming the key and what to do."""
from __future__ import annotations

import os
import tarfile
from collections.abc import Sequence

from sslpipe.config import RunConfig
from sslpipe.data.manifest import read_manifest
from sslpipe.data.remote import HTTP_PREFIXES, Reading, fetch_manifest
from sslpipe.data.stream import count_samples, resolve_shards
from sslpipe.engine.tracking import check_trackers
from sslpipe.recipes.base import shard_reading

LABEL_KEY = "cls"  # the tar member of a sample's class index (sslpipe.data.stream.decode_sample reads it)


def preflight(cfg: RunConfig) -> None:
    """The trackers are installed, no stop file is waiting, the evaluation's data.val resolves, and the shards a
    periodic kNN reads carry labels and more training samples than its largest k."""
    check_trackers(cfg)
    stop_file = cfg.train.stop_file
    if stop_file is not None and os.path.exists(stop_file):
        raise ValueError(f"train.stop_file {stop_file} exists already: the run would stop at its first step; remove "
                         "it (it asks a run to checkpoint and stop), then start again")
    d = cfg.data
    if not (type(cfg).evaluates_val and cfg.eval.every_epochs > 0 and d.val):
        return
    try:
        resolve_shards(d.val, d.val_split, shard_reading(d))
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"data.val={d.val!r} (split {d.val_split!r}), read at every evaluation: {err}") from err
    if "eval.knn_k" not in type(cfg).unread:  # the method's evaluation is the kNN probe
        check_knn_data(cfg)


def check_knn_data(cfg: RunConfig) -> None:
    """The periodic kNN (`sslpipe.recipes.knn_eval`) fits its neighbours on data.train's train split and scores
    data.val's val split, by their labels: shards without them (`sslpipe shards --folder` of a folder without class
    sub-folders), or fewer training samples than its largest k, stop the run at its first evaluation. Refused here,
    from the manifest (`classes: []`: no labels; the split's sample count) or else the first sample of the first
    local shard; remote shards without a manifest are not opened."""
    d, ev = cfg.data, cfg.eval
    reading, train_samples = shard_reading(d), None
    for key, spec, split in (("data.val", d.val, d.val_split), ("data.train", d.train, d.train_split)):
        try:
            missing = unlabelled(spec, split, reading)
            if key == "data.train":
                train_samples = count_samples(spec, split, reading)  # None without a manifest
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"{key}={spec!r} (split {split!r}), read by the periodic kNN: {err}") from err
        if missing:
            raise ValueError(f"{key}={spec!r} (split {split!r}) has no labels ({missing}): the periodic kNN "
                             f"(eval.every_epochs={ev.every_epochs}) fits on data.train and scores data.val by their "
                             f"labels; set eval.every_epochs=0 (no evaluation), or a labelled {key}")
    known = [n for n in (train_samples, ev.max_train) if n is not None]
    if known and max(ev.knn_k) > min(known):
        raise ValueError(f"eval.knn_k={ev.knn_k} holds k={max(ev.knn_k)}, more than the {min(known)} training "
                         f"samples the periodic kNN reads (data.train split {d.train_split!r}, at most "
                         f"eval.max_train={ev.max_train}): set eval.knn_k to values <= {min(known)}, or "
                         "eval.every_epochs=0")


def unlabelled(spec: str | Sequence[str], split: str, reading: Reading = Reading()) -> str | None:
    """Why the samples of `split` carry no label (`cls`), or None when they do or it cannot be told cheaply."""
    for item in [spec] if isinstance(spec, (str, os.PathLike)) else spec:
        item = os.fspath(item)
        manifest = _manifest(item, reading)
        if manifest is not None and manifest.get("classes") == []:
            return "its manifest.json lists no classes"
        first = next((url for url in resolve_shards(item, split, reading) if os.path.isfile(url)), None)
        keys = _first_sample_keys(first) if first is not None else None
        if keys is not None and LABEL_KEY not in keys:
            return f"the first sample of {first} has no `{LABEL_KEY}`"
    return None


def _manifest(spec: str, reading: Reading) -> dict | None:
    """The manifest `spec` names (a shard directory, a local manifest file or the http(s) URL of one), else None."""
    if os.path.isdir(spec) or (spec.endswith(".json") and os.path.isfile(spec)):
        return read_manifest(spec)
    if spec.endswith(".json") and spec.startswith(HTTP_PREFIXES):
        return fetch_manifest(spec, reading)  # read once per process: resolving the shards reads the same one
    return None


def _first_sample_keys(url: str) -> set[str] | None:
    """The member extensions of the first sample of a local tar shard (webdataset's grouping: a sample's members
    are consecutive and share the name up to the first dot of the file name); None for an empty or unreadable tar,
    which the loader reports itself."""
    keys: set[str] = set()
    first = None
    try:
        with tarfile.open(url, "r|*") as tar:  # a stream: only the first sample's headers and bytes are read
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, name = member.name.rpartition("/")
                stem, dot, ext = name.partition(".")
                if not dot:
                    continue
                if first is None:
                    first = (folder, stem)
                elif (folder, stem) != first:
                    break
                keys.add(ext.lower())
    except (OSError, tarfile.TarError):
        return None
    return keys if first is not None else None
