"""Which shards a run trained on: `RUN/data_manifest.json` records data.train and the sha256 of its manifest.json
when training starts (and at each resume that gives other shards), so that an export's model card names the data
the weights were trained on, not what the folder holds at export time."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sslpipe.files import write_text_atomic
from sslpipe.weights.hashing import sha256_file

DATA_RECORD = "data_manifest.json"  # RUN/: the training shards' manifest sha256, recorded when training starts


def _manifest_of(spec: Any) -> Path | None:
    """The manifest.json of a data.train value (a shard folder, or the manifest itself); None for a pattern or URL."""
    path = Path(str(spec))
    return path / "manifest.json" if path.is_dir() else path if path.suffix == ".json" else None


def _identity(spec: Any) -> dict[str, Any]:
    manifest = _manifest_of(spec)
    found = manifest is not None and manifest.is_file()
    return {"data.train": str(spec), "manifest": str(manifest.resolve()) if found else None,
            "sha256": sha256_file(manifest) if found else None}


def record_training_data(run_dir: Path, spec: Any) -> None:
    """Main process, when a run starts or resumes: `RUN/data_manifest.json` lists the data.train value and its
    manifest's sha256, a new entry whenever they differ from the last (other shards given to a resume), so the model
    card names the data the weights were trained on, not what the folder holds at export time."""
    path = run_dir / DATA_RECORD
    entries = _recorded_data(run_dir) or []
    entry = _identity(spec)
    if entries and {k: entries[-1].get(k) for k in entry} == entry:
        return
    write_text_atomic(path, json.dumps({"train": [*entries, entry]}, indent=2) + "\n")


def _recorded_data(run_dir: Path) -> list[dict[str, Any]] | None:
    """The entries of `RUN/data_manifest.json`; None when the run has none (older sslpipe) or it is unreadable."""
    try:
        entries = json.loads((run_dir / DATA_RECORD).read_text())["train"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return entries if isinstance(entries, list) and all(isinstance(e, dict) for e in entries) else None


def _described(entry: dict[str, Any]) -> str:
    if not entry.get("sha256"):
        return f"`{entry['data.train']}` (no manifest.json there: the shards are not identified)"
    return f"`{entry['data.train']}`, manifest.json sha256 `{entry['sha256']}`"


def training_data_row(run: Path, spec: Any) -> str:
    """The card's training data: the manifest sha256 recorded when training started (and at each resume that gave
    other shards), saying when the file has changed since; hashed now, and said so, for a run that recorded none."""
    entries = _recorded_data(run)
    if not entries:
        now = _identity(spec)
        return _described(now) + (" (hashed at export: the run recorded none when training started)"
                                  if now["sha256"] else "")
    row = "; from a resume on, ".join(_described(e) for e in entries)
    last = entries[-1]
    if last.get("sha256"):
        manifest = Path(str(last.get("manifest")))
        now = sha256_file(manifest) if manifest.is_file() else None
        when = "when training started" if len(entries) == 1 else "when the run last resumed"
        if now != last["sha256"]:
            row += (f" {when}; the file has changed since (now sha256 `{now}`)" if now else
                    f" {when}; the file is no longer at {manifest}")
    return row
