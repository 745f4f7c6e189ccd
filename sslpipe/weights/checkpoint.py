"""What a run checkpoint is and which ones a run has: the one listing that resuming, `sslpipe check`, export,
`eval-seg` and `predict` share, so that they agree on which folder is a checkpoint.

A checkpoint is `RUN/checkpoints/step_{N:08d}/`; it is complete when it holds `trainer_state.json`, which is written
last (`sslpipe.weights.checkpoint_io`). A `step_N` folder without it (its file lost, or damaged) is never read as
weights: the newest complete checkpoint is taken instead, with a warning naming each newer folder skipped, as
resuming skips a damaged one; naming it is a one-line `CheckpointInvalid`.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.json"
MODEL, OPTIMIZER, SCALER = "model.safetensors", "optimizer.safetensors", "scaler.json"
EXTRA_STATE = "extra_state.safetensors"
BEST_FILE = "best.json"
FILES = "files"  # trainer_state.json: {relative path: {"bytes": n, "sha256": hex}} of every other file
STATE_DIGEST = "state_sha256"  # trainer_state.json: the sha256 of its own canonical JSON without this key


class CheckpointInvalid(ValueError):
    """A checkpoint asked for by name is damaged or incomplete (the message says which file and how)."""


class DamagedCheckpointWarning(UserWarning):
    """A damaged or incomplete checkpoint was skipped for an older one, or one without checksums is loaded."""


def step_of(ckpt: Path) -> int | None:
    """The global step in a checkpoint folder's name; None for a folder named otherwise (one passed by path)."""
    match = STEP_DIR.match(ckpt.name)
    return int(match.group(1)) if match else None


def read_best(path: Path) -> dict[str, Any] | None:
    """best.json ({"checkpoint": name, "value": metric}), None when there is none, {} when it cannot be read (cut
    short by a crash of an older version, edited by hand): the best is then unknown."""
    if not path.is_file():
        return None
    try:
        best = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(best, dict) and isinstance(best.get("checkpoint"), str) and isinstance(best.get("value"),
                                                                                            (int, float))
    return best if ok else {}


def list_checkpoints(run_dir: str | Path, complete_only: bool = True) -> list[Path]:
    """The run's checkpoints, oldest first (by step): complete ones, or with `complete_only=False` every `step_N`
    folder (what resuming and `sslpipe check` look through, judging each)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()
             and (not complete_only or (p / TRAINER_STATE).is_file())]
    return sorted(found, key=step_of)


def interrupted_swaps(run_dir: str | Path) -> list[Path]:
    """`checkpoints/.old-step_N` folders whose `step_N` is missing: what a hard kill between the two renames of a
    re-saved step leaves (`checkpoint_io._swap_in`), the only copy of that step; a resume renames them back."""
    found = [p for p in (Path(run_dir) / "checkpoints").glob(".old-step_*") if p.is_dir() and not
             swapped_back(p).exists()]
    return sorted(found, key=lambda p: step_of(swapped_back(p)))


def swapped_back(aside: Path) -> Path:
    """The `step_N` a `.old-step_N` folder was set aside from."""
    return aside.with_name(aside.name.removeprefix(".old-"))


def _complete(ckpt: Path) -> Path:
    """`ckpt`, named by the user: an incomplete one is an error, never skipped (they asked for those weights)."""
    if not (ckpt / TRAINER_STATE).is_file():
        raise CheckpointInvalid(f"{ckpt} is not a complete checkpoint (no {TRAINER_STATE}, which is written last): "
                                "name another checkpoint, or none for the newest complete one")
    return ckpt


def find_checkpoint(run_dir: str | Path, checkpoint: str | Path | int | None = None) -> Path:
    """The complete checkpoint a command reads weights from: `checkpoint` None -> the newest (module docstring), an
    int -> that step's, a path -> that folder (a bare name is looked up in `RUN/checkpoints`)."""
    run = Path(run_dir)
    if checkpoint is not None and not isinstance(checkpoint, int):
        ckpt = Path(checkpoint)
        ckpt = ckpt if ckpt.is_absolute() or ckpt.exists() else run / "checkpoints" / ckpt
        if not ckpt.is_dir():
            raise FileNotFoundError(f"checkpoint folder {ckpt} not found")
        return _complete(ckpt)
    folders = list_checkpoints(run, complete_only=False)
    if not folders:
        raise FileNotFoundError(f"no checkpoints/step_N folders in {run}: train first or pass checkpoint=")
    if checkpoint is not None:
        named = [p for p in folders if step_of(p) == checkpoint]
        if not named:
            raise FileNotFoundError(f"no checkpoint for step {checkpoint} in {run}; have {list(map(step_of, folders))}")
        return _complete(named[0])
    complete = [p for p in folders if (p / TRAINER_STATE).is_file()]
    if not complete:
        raise CheckpointInvalid(f"{run} has no complete checkpoint: {', '.join(p.name for p in folders)} hold no "
                                f"{TRAINER_STATE}; `sslpipe check {run}` lists them")
    for skipped in folders[folders.index(complete[-1]) + 1:]:
        warnings.warn(f"skipping the incomplete checkpoint {skipped} (no {TRAINER_STATE}): using the older "
                      f"{complete[-1]}", DamagedCheckpointWarning, stacklevel=2)
    return complete[-1]
