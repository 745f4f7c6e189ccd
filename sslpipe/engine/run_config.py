"""A run's config.yaml across resumes: what a resumed run changes is said, never lost, and never breaks the run.

A fresh run writes the resolved config to RUN/config.yaml. A resumed run is built from the recipe and overrides given
again, which may differ from the run's own (an lr lowered after a loss spike, a data path given on the first command
line only). Its changes are printed key by key once the checkpoint has loaded, the previous config.yaml is kept as
`config-<time>.yaml` and the new one written. A change that builds another network (`model.*`, a head or crop size)
fails at the load: the error names the changed keys, and config.yaml is left as it was, so the run directory always
describes the network its checkpoints hold.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml

from sslpipe.config import RunConfig, config_to_dict, save_config
from sslpipe.config.loading import dump_yaml, load_yaml
from sslpipe.errors import WriteFailed, io_failure
from sslpipe.weights.resume import timestamped

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
        os.replace(run_dir / CONFIG, kept)  # a rename: no space needed, nothing lost
        print(f"resuming {run_dir} with {len(changes)} key(s) changed from its {CONFIG} (kept as {kept.name}): "
              f"{_listed(changes)}", file=sys.stderr)
    write_config(cfg, run_dir, overrides_text)


def write_config(cfg: RunConfig, run_dir: Path, overrides_text: str | None) -> None:
    """RUN/config.yaml, the command-line overrides as its header; a failed write is one `WriteFailed` line."""
    path = run_dir / CONFIG
    try:
        save_config(cfg, path, header=f"overrides: {overrides_text}" if overrides_text else None)
    except OSError as err:
        if io_failure(err) is None:
            raise
        raise WriteFailed(f"could not write {path}: {io_failure(err)}; free space (or fix the disk / permissions) "
                          "and start again") from err
