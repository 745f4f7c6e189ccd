"""What a run built from `model.init_from`, kept in the run: `RUN/init_from.json` holds the export's config.json
(architecture, model arguments, mean and std) as training read it.

Dense fine-tuning and the segmentation recipes build their network and normalisation from the export, not from the
recipe's keys. Without a record, `sslpipe predict` and `sslpipe eval-seg` would read the export again as it is at
that time: one re-made with other statistics would be used without a word, and one moved away would stop them,
although the checkpoint holds every weight. Training writes the record at every build (a fresh start or a resume
reads the export as it is now); the tools that only evaluate a run build from it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

INIT_RECORD = "init_from.json"
_COMPARED = ("architecture", "model_args", "mean", "std")


def init_export_config(cfg: Any, run_dir: Path | None, *, training: bool) -> dict[str, Any]:
    """The config.json of `cfg.model.init_from`. `training`: read from the export and kept as `run_dir`'s record;
    otherwise the run's record when it has one for this export (a notice names what changed in the export since),
    else the export's."""
    from sslpipe.weights.export import read_export_config

    source = str(cfg.model.init_from)
    record = Path(run_dir) / INIT_RECORD if run_dir is not None else None
    kept = json.loads(record.read_text()) if record is not None and record.is_file() else None
    if kept is not None and kept.get("init_from") != source:
        kept = None  # another export (the run's config changed): not this one's record
    if kept is not None and not training:
        _note_changes(source, kept["config"])
        return kept["config"]
    export = read_export_config(source)
    if training and record is not None and record.parent.is_dir():
        tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")  # every process writes the same: no clash
        tmp.write_text(json.dumps({"init_from": source, "config": export}, indent=2) + "\n")
        tmp.replace(record)
    return export


def _note_changes(source: str, kept: dict[str, Any]) -> None:
    """Say which of the export's network and normalisation keys differ from what the run trained with."""
    from sslpipe.weights.export import read_export_config

    try:
        now = read_export_config(source)
    except (OSError, ValueError):
        return  # moved or unreadable: the record is all that is needed
    changed = [key for key in _COMPARED if now.get(key) != kept.get(key)]
    if changed:
        print(f"model.init_from={source} has changed since the run trained ({', '.join(changed)}): the run's "
              f"{INIT_RECORD} is used", file=sys.stderr)
