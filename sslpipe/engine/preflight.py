"""Checks made before a run writes anything: what would otherwise stop it later, after its directory was claimed or
after a whole epoch of training (a missing validation set is found at the first evaluation, once an epoch is spent).
Each failure is one ValueError naming the key and what to do."""
from __future__ import annotations

import os

from sslpipe.config import RunConfig
from sslpipe.data.stream import resolve_shards
from sslpipe.engine.tracking import check_trackers
from sslpipe.recipes.base import shard_reading


def preflight(cfg: RunConfig) -> None:
    """The trackers are installed, no stop file is waiting, and the evaluation's data.val resolves."""
    check_trackers(cfg)
    stop_file = cfg.train.stop_file
    if stop_file is not None and os.path.exists(stop_file):
        raise ValueError(f"train.stop_file {stop_file} exists already: the run would stop at its first step; remove "
                         "it (it asks a run to checkpoint and stop), then start again")
    d = cfg.data
    if type(cfg).evaluates_val and cfg.eval.every_epochs > 0 and d.val:
        try:
            resolve_shards(d.val, d.val_split, shard_reading(d))
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"data.val={d.val!r} (split {d.val_split!r}), read at every evaluation: {err}") from err
