"""A run's config.yaml across resumes: what a resumed run changes is said, never lost, and never breaks the run.

A fresh run writes the resolved config to RUN/config.yaml. A resumed run is built from the recipe and overrides given
again, which may differ from the run's own (an lr lowered after a loss spike, a data path given on the first command
line only). Its changes are printed key by key once the checkpoint has loaded, the previous config.yaml is kept as
`config-<time>.yaml` and the new one written. A change that builds another network (`model.*`, a head or crop size)
fails at the load: the error names the changed keys, and config.yaml is left as it was, so the run directory always
describes the network its checkpoints hold. Each start and resume also records the sha256 of data.train's
manifest.json (`RUN/data_manifest.json`), so an export's card names the data trained on, not the folder's later
content. config.yaml is written atomically: a full disk part-way leaves the previous file whole.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from sslpipe.config import RunConfig, config_to_dict, save_config
from sslpipe.config.loading import dump_yaml, load_yaml
from sslpipe.errors import WriteFailed, io_failure
from sslpipe.weights.resume import timestamped
from sslpipe.weights.training_data import DATA_RECORD, record_training_data

CONFIG = "config.yaml"
_PLACE = ("run_name", "output_dir")  # where the run lives: a resume takes them from the run directory


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def config_changes(cfg: RunConfig, run_dir: Path) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (the run's value, this command's)} for every key that differs from RUN/config.yaml (none when
    there is no such file, or it cannot be read)."""
    try:
        saved = load_yaml((run_dir / CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(saved, dict):
        return {}
    old = _flat(saved)
    new = _flat(load_yaml(dump_yaml(config_to_dict(cfg))))  # the types the file holds
    keys = [k for k in dict.fromkeys([*old, *new]) if k not in _PLACE]
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def _listed(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())


def unfit_checkpoint(ckpt: Path, run_dir: Path, changes: dict[str, tuple[Any, Any]], err: Exception) -> ValueError:
    """The error for a checkpoint that does not load into what this command built, when the command changed keys
    of the run's config (another network, head or crop size): it names them and the way back."""
    return ValueError(f"{ckpt} does not fit what this command builds ({str(err).splitlines()[0]}); it changes the "
                      f"run's config.yaml: {_listed(changes)}. Resume with the run's own recipe (sslpipe train "
                      f"{run_dir / CONFIG} --resume {run_dir}) or start a new run")


def record_resumed_config(cfg: RunConfig, run_dir: Path, changes: dict[str, tuple[Any, Any]],
                          overrides_text: str | None) -> None:
    """Main process, after the checkpoint loaded: say what this resume changes, keep the previous config.yaml as
    config-<time>.yaml, and write this one."""
    if changes and (run_dir / CONFIG).is_file():
        kept = timestamped(run_dir, "config", ".yaml")
        _keep(run_dir / CONFIG, kept)
        print(f"resuming {run_dir} with {len(changes)} key(s) changed from its {CONFIG} (kept as {kept.name}): "
              f"{_listed(changes)}", file=sys.stderr)
    write_config(cfg, run_dir, overrides_text)


def _keep(path: Path, kept: Path) -> None:
    """A second name for the previous config.yaml (a hard link: no space needed), so config.yaml itself stays until
    the new one replaces it whole; a copy where the file system has no hard links."""
    try:
        os.link(path, kept)
        return
    except OSError:
        pass
    try:
        shutil.copyfile(path, kept)
    except OSError as err:
        if io_failure(err) is None:
            raise
        raise WriteFailed(f"could not keep {path} as {kept.name}: {io_failure(err)}; free space (or fix the disk / "
                          "permissions) and start again") from err


def write_config(cfg: RunConfig, run_dir: Path, overrides_text: str | None) -> None:
    """RUN/config.yaml, the command-line overrides as its header, and the training data's manifest sha256
    (`record_training_data`, which the model card names); both atomic, a failed write is one `WriteFailed` line."""
    path = run_dir / CONFIG
    try:
        save_config(cfg, path, header=f"overrides: {overrides_text}" if overrides_text else None)
        path = run_dir / DATA_RECORD
        record_training_data(run_dir, cfg.data.train)
    except OSError as err:
        if io_failure(err) is None:
            raise
        raise WriteFailed(f"could not write {path}: {io_failure(err)}; free space (or fix the disk / permissions) "
                          "and start again") from err
