"""Which checkpoint `--resume` continues from: the run it names (cheap, nothing read) and then its newest good
checkpoint, verified against its sha256s; a damaged newer one is skipped with a warning, a damaged one named
outright is an error, so a run never continues from weights a bad disk or a cut copy has changed.

Resuming a named older checkpoint (a roll-back) moves the run's newer checkpoints into
`checkpoints/abandoned-<time>/` first (`set_aside_newer`): kept, but never pruned in place of the resumed trajectory's
own checkpoints nor picked by a later `--resume auto`."""
from __future__ import annotations

import os
import warnings
from datetime import datetime
from pathlib import Path

from sslpipe.weights.checkpoint import (
    BEST_FILE,
    STEP_DIR,
    TRAINER_STATE,
    CheckpointInvalid,
    DamagedCheckpointWarning,
    interrupted_swaps,
    list_checkpoints,
    read_best,
    step_of,
    swapped_back,
)
from sslpipe.weights.verify import verify_checkpoint


def resume_run_dir(resume: str, output_dir: str | Path, run_name: str | None = None
                   ) -> tuple[Path | None, Path | None]:
    """(run directory, checkpoint named by `resume` or None) of `--resume`, without reading any checkpoint.

    `auto`: with a `run_name`, that run (another run in `output_dir` is never picked up); without one, the run under
    `output_dir` whose newest checkpoint folder is the most recent; (None, None) when there is none (a fresh run
    starts). Otherwise a run directory, or a checkpoint folder (`RUN/checkpoints/step_N`).
    """
    if resume == "auto" and run_name is not None:
        run = Path(output_dir) / run_name
        return (run, None) if _resumable(run) else (None, None)
    if resume == "auto":
        root = Path(output_dir)
        newest = [c[-1] for c in (_resumable(d) for d in root.iterdir() if d.is_dir()) if c] if root.is_dir() else []
        return (max(newest, key=lambda c: c.stat().st_mtime).parent.parent, None) if newest else (None, None)
    path = Path(resume)
    if (path / TRAINER_STATE).is_file() or (STEP_DIR.match(path.name) and path.parent.name == "checkpoints"
                                           and path.is_dir()):
        return path.parent.parent, path
    if path.is_dir():
        if not _resumable(path):
            raise FileNotFoundError(f"--resume {path}: no checkpoint in {path / 'checkpoints'} (nothing to resume)")
        return path, None
    raise FileNotFoundError(f"--resume {path}: no such run or checkpoint directory")


def _resumable(run: Path) -> list[Path]:
    """The run's checkpoint folders, complete or not, and the steps a hard kill left set aside (restored on resume)."""
    found = list_checkpoints(run, complete_only=False) + interrupted_swaps(run)
    return sorted(found, key=lambda p: step_of(swapped_back(p)))


def pick_checkpoint(run_dir: Path, named: Path | None = None) -> Path:
    """The checkpoint to resume, verified: `named` itself (damaged: `CheckpointInvalid`), else the run's newest
    good checkpoint, with a warning naming each newer damaged one it skips."""
    if named is not None:
        status, detail = verify_checkpoint(named)
        if status == "bad":
            raise CheckpointInvalid(
                f"--resume {named}: this checkpoint is damaged ({detail}). Resume the run instead (--resume "
                f"{run_dir} or --resume auto): it continues from the newest good checkpoint; `sslpipe check "
                f"{run_dir}` lists them")
        if status == "unverified":
            warnings.warn(f"{named}: {detail}", DamagedCheckpointWarning, stacklevel=2)
        return named
    skipped = []
    for ckpt in reversed(list_checkpoints(run_dir, complete_only=False)):
        status, detail = verify_checkpoint(ckpt)
        if status == "bad":
            skipped.append(f"{ckpt.name} ({detail})")
            continue
        for bad in skipped:
            warnings.warn(f"skipping the damaged checkpoint {run_dir / 'checkpoints'}/{bad}: resuming from the "
                          f"older {ckpt}", DamagedCheckpointWarning, stacklevel=2)
        if status == "unverified":
            warnings.warn(f"{ckpt}: {detail}", DamagedCheckpointWarning, stacklevel=2)
        return ckpt
    raise CheckpointInvalid(f"{run_dir} has no checkpoint that can be resumed: {'; '.join(skipped)}. Start a new "
                            "run (another run_name) or restore the files from a copy")


def resolve_resume(resume: str, output_dir: str | Path, run_name: str | None = None) -> Path | None:
    """The verified checkpoint `--resume` continues from (`resume_run_dir`, then `pick_checkpoint`), or None."""
    run_dir, named = resume_run_dir(resume, output_dir, run_name)
    return None if run_dir is None else pick_checkpoint(run_dir, named)


def timestamped(folder: Path, stem: str, suffix: str = "") -> Path:
    """`folder/stem-<YYYYmmdd-HHMMSS>suffix`, with a counter added when that name is taken: never overwrites."""
    base = f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"
    path, n = folder / f"{base}{suffix}", 1
    while path.exists():
        path, n = folder / f"{base}-{n}{suffix}", n + 1
    return path


def set_aside_newer(run_dir: Path, ckpt: Path) -> Path | None:
    """Move the run's checkpoints with a higher step than `ckpt` (and best.json when it names one of them) into
    `checkpoints/abandoned-<time>/`; that folder, or None when there are none. Main process, under the run lock.

    Resuming an older checkpoint starts a new trajectory: left in place, the abandoned newer steps would outlive the
    new run's checkpoints under pruning (which keeps the highest steps) and be resumed by `--resume auto`."""
    step = step_of(ckpt)
    newer = [c for c in list_checkpoints(run_dir, complete_only=False) if step is not None and step_of(c) > step]
    if not newer:
        return None
    root = run_dir / "checkpoints"
    aside = timestamped(root, "abandoned")
    aside.mkdir()
    if (read_best(root / BEST_FILE) or {}).get("checkpoint") in {c.name for c in newer}:
        os.replace(root / BEST_FILE, aside / BEST_FILE)
    for c in newer:
        os.replace(c, aside / c.name)
    return aside
