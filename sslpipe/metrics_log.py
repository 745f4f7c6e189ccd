"""A run's `metrics.jsonl`: its records, and which of them belong to the run's current trajectory.

The trainer appends one JSON object per line: the log lines, the periodic evaluations and the events, each with the
global `step`. A resume appends a `{"event": "resumed", "step": S, "from_step": F, ...}` record, F being the
checkpoint's step (S the same step in the resumed run's units: they differ after an elastic resume to another batch).
The records written before it with a step after F belong to the trajectory the resume replaced: the steps a killed run
logged after its last checkpoint (logged again by the resumed run), or a whole abandoned trajectory after a roll-back
to an older checkpoint (`--resume RUN/checkpoints/step_N`; the new one may stop earlier or log at other steps). Those
records describe weights that no longer exist, so a reader of the run (the report, the model card) keeps only the
current trajectory: `current_trajectory(read_records(path))`.

Top-level and free of the other stages, so every reader of a run directory can use it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

Record = dict[str, Any]
RESUMED = "resumed"  # the `event` of the record a resume writes at the checkpoint's step


def _record(line: str) -> Record | None:
    """One line as a record; None for a blank line or one that holds no whole JSON object."""
    try:
        record = json.loads(line)
    except ValueError:
        # a line cut by a crash; the next start appends its first record to it (the cut line has no newline)
        for start in (i for i, c in enumerate(line) if c == "{" and i > 0):
            try:
                record = json.loads(line[start:])
            except ValueError:
                continue
            return record if isinstance(record, dict) else None
        return None
    return record if isinstance(record, dict) else None


def read_records(path: str | Path) -> list[Record]:
    """Every record of a `metrics.jsonl`, in file order.

    A line cut by a crash is skipped (the writer appends whole lines, so only a kill or a power cut tears one); when
    a later start appended its first record to that cut line, the appended record is kept: it may be the `resumed`
    record that `current_trajectory` needs. Raises FileNotFoundError when `path` is not a file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a run directory holds the trainer's metrics.jsonl")
    text = path.read_text(encoding="utf-8", errors="replace")  # a torn multi-byte character only spoils its line
    return [record for record in map(_record, text.splitlines()) if record is not None]


def step_of(record: Record) -> int | None:
    """A record's global step; None when it has none (the trainer writes one in every record)."""
    step = record.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def current_trajectory(records: Iterable[Record]) -> list[Record]:
    """The records of the run's current trajectory, in file order.

    At each `resumed` record from step F (`from_step`, else its step), the records before it with a step > F are
    dropped (those at F and before are the checkpoint's history and stay; so does the `resumed` record, which says
    a resume happened). Successive resumes apply in turn. Records without a step are kept.
    """
    kept: list[Record] = []
    for record in records:
        resumed_at = _resumed_from(record) if record.get("event") == RESUMED else None
        if resumed_at is not None:
            kept = [r for r in kept if _not_after(r, resumed_at)]
        kept.append(record)
    return kept


def _resumed_from(record: Record) -> int | None:
    """The checkpoint step a `resumed` record continues from, in the units of the lines before it: `from_step` (an
    elastic resume logs its own rescaled step as `step`), else `step` (records of older versions)."""
    start = record.get("from_step")
    return start if isinstance(start, int) and not isinstance(start, bool) else step_of(record)


def _not_after(record: Record, step: int) -> bool:
    own = step_of(record)
    return own is None or own <= step
