"""What a run built from `model.init_from`, kept in the run: `RUN/init_from.json` holds the export's config.json
(architecture, model arguments, mean and std) as the run first read it.

Dense fine-tuning and the segmentation recipes build their network and normalisation from the export, not from the
recipe's keys. Without a record, a resume, `sslpipe predict` and `sslpipe eval-seg` would read the export again as
it is at that time: one re-made with other statistics would be used without a word (a resumed run would switch its
normalisation mid-run), and one moved away would stop the tools that take every weight from a checkpoint. The main
process writes the record when a run starts (a fresh start removes a failed start's, `sslpipe.engine.trainer`); from
then on the run is built from it, and a notice names what changed in the export since.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

INIT_RECORD = "init_from.json"
_COMPARED = ("architecture", "model_args", "mean", "std")


def _recorded(cfg: Any, run_dir: Path | None) -> dict[str, Any] | None:
    """The run's record of `cfg.model.init_from` (None: no record, or one of another export)."""
    record = Path(run_dir) / INIT_RECORD if run_dir is not None else None
    if record is None or not record.is_file():
        return None
    kept = json.loads(record.read_text())
    return kept["config"] if kept.get("init_from") == str(cfg.model.init_from) else None


def init_export_config(cfg: Any, run_dir: Path | None) -> dict[str, Any]:
    """The config.json of `cfg.model.init_from` the run is built from: its record when it has one (a notice names
    what changed in the export since), else the export's own."""
    from sslpipe.weights.export import read_export_config

    kept = _recorded(cfg, run_dir)
    if kept is None:
        return read_export_config(cfg.model.init_from)
    _note_changes(str(cfg.model.init_from), kept)
    return kept


def keep_init_record(cfg: Any, run_dir: Path | None) -> None:
    """Main process, when a run is built: write the record of `model.init_from` unless the run has one of it."""
    from sslpipe.weights.export import read_export_config

    if run_dir is None or not cfg.model.init_from or _recorded(cfg, run_dir) is not None:
        return
    record = Path(run_dir) / INIT_RECORD
    tmp = record.with_name(f".{record.name}.tmp")
    source = str(cfg.model.init_from)
    tmp.write_text(json.dumps({"init_from": source, "config": read_export_config(source)}, indent=2) + "\n")
    tmp.replace(record)


def _note_changes(source: str, kept: dict[str, Any]) -> None:
    """Say which of the export's network and normalisation keys differ from what the run was built with."""
    from sslpipe.weights.export import read_export_config

    try:
        now = read_export_config(source)
    except (OSError, ValueError):
        return  # moved or unreadable: the record is all that is needed
    changed = [key for key in _COMPARED if now.get(key) != kept.get(key)]
    if changed:
        print(f"model.init_from={source} has changed since the run started ({', '.join(changed)}): the run's "
              f"{INIT_RECORD} is used", file=sys.stderr)
