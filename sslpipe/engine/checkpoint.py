"""Atomic, verified, resumable checkpoints without pickles: `RUN/checkpoints/step_{N:08d}/`.

A checkpoint holds the student (`model.safetensors`), the optimizer (`optimizer.safetensors`: tensors + JSON
metadata), one `rng_state_{rank}.safetensors` per process, `scaler.json` under fp16, the recipe's extra state
(`extra_state.safetensors`: EMA teacher, centres, queues) and `trainer_state.json` (global step, epoch, position in
the epoch, world size, last metrics, best value, and `files`: the size and sha256 of every other file). Nothing is a
pickle, so resuming a checkpoint from elsewhere cannot run code (`sslpipe.engine.state_io`). FSDP runs are the
exception: their sharded optimizer is written by accelerate's `save_state` and read back with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.

Everything is first written to `checkpoints/.tmp-step_N`, synced to disk, hashed into `trainer_state.json` (written
last) and renamed when complete, so a crash mid-write never leaves a checkpoint that looks valid. A file damaged
later (a bad disk, a copy cut short) no longer matches its sha256: resuming a run skips such a checkpoint for the
newest good one with a warning, and naming it with `--resume` is an error (`sslpipe check RUN` lists them all).
Checkpoints of older versions (no `files`) still load, unverified. A failed write (disk full, I/O error, no
permission) stops every process with one `WriteFailed` naming the file, after the partial directory is removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, gather_object
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sslpipe.engine import state_io
from sslpipe.errors import WriteFailed, io_failure

STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.json"
EXTRA_STATE = "extra_state.safetensors"
BEST_FILE = "best.json"
FILES = "files"  # trainer_state.json: {relative path: {"bytes": n, "sha256": hex}} of every other file


class CheckpointInvalid(ValueError):
    """A checkpoint asked for by name is damaged or incomplete (the message says which file and how)."""


class DamagedCheckpointWarning(UserWarning):
    """Resuming skipped a damaged checkpoint, or loads one that has no checksums to verify."""


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (by step)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if STEP_DIR.match(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Every `step_N` folder of a run, complete or not, oldest first."""
    ckpt_root = Path(run_dir) / "checkpoints"
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()),
                  key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _sha256(path: Path, sync: bool = False) -> str:
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under `folder` but trainer_state.json, each synced to disk first."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != TRAINER_STATE)
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p, sync=True)}
            for p in files}


def file_problems(folder: Path, table: dict[str, dict[str, Any]]) -> list[str]:
    """Files of `table` ({name: {"bytes", "sha256"}}) that are missing, cut short or changed under `folder`."""
    problems = []
    for name, expected in table.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, {expected['bytes']} written (truncated or "
                            "overwritten)")
        elif _sha256(path) != expected["sha256"]:
            problems.append(f"{name} does not match its sha256 (bit rot or modified)")
    return problems


def structure_problems(folder: Path) -> list[str]:
    """For files without checksums (older versions): safetensors headers that do not cover their file (truncation)
    and JSON that does not parse. Cannot see a flipped bit inside tensor data."""
    problems = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for any bad header
            problems.append(f"{path.name}: {err}")
    for path in sorted(folder.glob("*.json")):
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as err:
            problems.append(f"{path.name}: {err}")
    return problems


def verify_checkpoint(ckpt: str | Path) -> tuple[str, str]:
    """("ok" | "unverified" | "bad", detail): every file against the sizes and sha256s in trainer_state.json;
    "unverified" for a checkpoint of an older version (no checksums) whose files are at least whole."""
    ckpt = Path(ckpt)
    state_file = ckpt / TRAINER_STATE
    if not state_file.is_file():
        return "bad", f"incomplete: no {TRAINER_STATE}"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as err:
        return "bad", f"{TRAINER_STATE} is unreadable: {err}"
    if FILES not in state:
        problems = structure_problems(ckpt)
        return ("bad", "; ".join(problems)) if problems else (
            "unverified", "written without checksums (older sslpipe): files whole, contents not verifiable")
    problems = file_problems(ckpt, state[FILES])
    return ("bad", "; ".join(problems)) if problems else ("ok", f"{len(state[FILES])} files match their sha256")


def resume_run_dir(resume: str, output_dir: str | Path, run_name: str | None = None
                   ) -> tuple[Path | None, Path | None]:
    """(run directory, checkpoint named by `resume` or None) of `--resume`, without reading any checkpoint.

    `auto`: with a `run_name`, that run (another run in `output_dir` is never picked up); without one, the run under
    `output_dir` whose newest checkpoint folder is the most recent; (None, None) when there is none (a fresh run
    starts). Otherwise a run directory, or a checkpoint folder (`RUN/checkpoints/step_N`).
    """
    if resume == "auto" and run_name is not None:
        run = Path(output_dir) / run_name
        return (run, None) if checkpoint_dirs(run) else (None, None)
    if resume == "auto":
        root = Path(output_dir)
        newest = [c[-1] for c in (checkpoint_dirs(d) for d in root.iterdir() if d.is_dir()) if c] \
            if root.is_dir() else []
        return (max(newest, key=lambda c: c.stat().st_mtime).parent.parent, None) if newest else (None, None)
    path = Path(resume)
    if (path / TRAINER_STATE).is_file() or (STEP_DIR.match(path.name) and path.parent.name == "checkpoints"
                                           and path.is_dir()):
        return path.parent.parent, path
    if path.is_dir():
        if not checkpoint_dirs(path):
            raise FileNotFoundError(f"--resume {path}: no checkpoint in {path / 'checkpoints'} (nothing to resume)")
        return path, None
    raise FileNotFoundError(f"--resume {path}: no such run or checkpoint directory")


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
    for ckpt in reversed(checkpoint_dirs(run_dir)):
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


MODEL, OPTIMIZER, SCALER = "model.safetensors", "optimizer.safetensors", "scaler.json"


def _rng_file(rank: int) -> str:
    return f"rng_state_{rank}.safetensors"


def after_file_written(path: Path) -> None:
    """Called after each file of a checkpoint is written and after the final rename; does nothing. The seam of the
    fault-injection tests (tests/test_faults.py), which replace it to kill the process or fill the disk between two
    files."""


@contextmanager
def _failed_write(what: str) -> Iterator[None]:
    """A failed write (disk full, I/O error, no permission; safetensors' wrapped ones too) raised as `WriteFailed`
    that starts with `what`; anything else passes unchanged."""
    try:
        yield
    except Exception as err:
        if io_failure(err) is None:
            raise
        raise WriteFailed(f"{what}: {io_failure(err)}") from err


def _write(path: Path, write: Callable[[Path], None]) -> None:
    with _failed_write(f"could not write {path}"):
        write(path)
    after_file_written(path)


def _attempt(action: Callable[[], None]) -> str | None:
    try:
        action()
    except WriteFailed as err:
        return str(err)
    return None


def _agree(accelerator: Any, failure: str | None) -> str | None:
    """The first process's failure, the same on every process (one gather, in place of a barrier)."""
    if accelerator.num_processes == 1:
        return failure
    return next((f for f in gather_object([failure]) if f), None)


def _fresh_dir(tmp: Path) -> None:
    with _failed_write(f"could not create {tmp}"):
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash
        tmp.mkdir(parents=True)


def _write_process_files(accelerator: Any, tmp: Path, extra_state: dict[str, torch.Tensor],
                         model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None) -> None:
    """This process's files: the weights, optimizer, scaler and extra state (main process), its RNG state (all)."""
    main = accelerator.is_main_process
    if accelerator.distributed_type == DistributedType.FSDP:
        _write(tmp, lambda p: accelerator.save_state(str(p), safe_serialization=True))
    elif model is not None:
        state = accelerator.get_state_dict(model)  # a collective under sharding: every rank calls it
        if main:
            _write(tmp / MODEL, lambda p: save_file(state_io._cpu(state_io.without_aliases(state)), str(p),
                                                    metadata={"format": "pt"}))
            if optimizer is not None:
                _write(tmp / OPTIMIZER, lambda p: state_io.save_optimizer(optimizer, p))
            if getattr(accelerator, "scaler", None) is not None:
                _write(tmp / SCALER, lambda p: state_io.save_scaler(accelerator.scaler, p))
    _write(tmp / _rng_file(accelerator.process_index), state_io.save_rng)
    if main:
        _write(tmp / EXTRA_STATE, lambda p: save_file({k: v.detach().contiguous().cpu() for k, v in
                                                       extra_state.items()}, str(p)))


def _complete(tmp: Path, final: Path, trainer_state: dict[str, Any], keep_last: int, metric: float | None) -> None:
    """Main process: sync and hash every file into trainer_state.json (last), rename, track the best, prune."""
    with _failed_write(f"could not sync {tmp}"):
        state = {**trainer_state, FILES: _file_table(tmp)}
    _write(tmp / TRAINER_STATE, lambda p: p.write_text(json.dumps(state, indent=2)))
    with _failed_write(f"could not complete {final}"):
        with open(tmp / TRAINER_STATE, "rb") as f:
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself reaches the disk
        finally:
            os.close(dir_fd)
    after_file_written(final)
    with _failed_write(f"{final} is complete, but {final.parent / BEST_FILE} or pruning older checkpoints failed"):
        best = _update_best(final.parent, final, metric)
        _prune(final.parent, keep_last, keep={final, best} - {None})


def save_checkpoint(accelerator: Any, run_dir: Path, trainer_state: dict[str, Any],
                    extra_state: dict[str, torch.Tensor], keep_last: int = 2, metric: float | None = None, *,
                    model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write a checkpoint atomically (all processes must call this), prune old ones and track the best one.

    `model` / `optimizer` are the prepared student and optimizer. `metric` (higher is better, e.g. kNN top-1) marks
    the best checkpoint, which pruning keeps. A failed write on any process raises `WriteFailed` on every process,
    after the partial `.tmp-step_N` folder is removed; checkpoints written before are untouched.
    """
    step = int(trainer_state["global_step"])
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    main = accelerator.is_main_process
    try:
        failure = _agree(accelerator, _attempt(lambda: _fresh_dir(tmp)) if main else None)
        if failure is None:
            failure = _agree(accelerator, _attempt(
                lambda: _write_process_files(accelerator, tmp, extra_state, model, optimizer)))
        if failure is None:
            failure = _agree(accelerator, _attempt(
                lambda: _complete(tmp, final, trainer_state, keep_last, metric)) if main else None)
    except BaseException:  # interrupted (SIGTERM, Ctrl-C) or a bug: no partial folder stays behind
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if failure is not None:
        removed = ""
        if main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            removed = f"; could not remove the partial {tmp}: delete it" if tmp.exists() else \
                f"; removed the partial checkpoint {tmp}"
        raise WriteFailed(failure + removed)
    return final


def _update_best(root: Path, ckpt: Path, metric: float | None) -> Path | None:
    path = root / BEST_FILE
    best = json.loads(path.read_text()) if path.is_file() else None
    if metric is not None and (best is None or metric > best["value"]):
        best = {"checkpoint": ckpt.name, "value": metric}
        path.write_text(json.dumps(best))
    return root / best["checkpoint"] if best else None


def _prune(root: Path, keep_last: int, keep: set[Path]) -> None:
    ckpts = list_checkpoints(root.parent)
    for old in ckpts[: max(len(ckpts) - keep_last, 0)]:
        if old not in keep:
            shutil.rmtree(old)


def load_checkpoint(accelerator: Any, ckpt_dir: str | Path, *, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, verify: bool = True
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore the student, optimizer, grad scaler and this process's RNG states; return (trainer_state,
    extra_state on CPU). A process without an RNG file of its own (resuming on more processes than were saved)
    keeps its fresh per-rank seed, with a warning. `verify`: check the files against their sha256 first
    (`CheckpointInvalid` when damaged); the trainer verifies once, on the main process, when it picks the checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    state_file = ckpt_dir / TRAINER_STATE
    if not state_file.is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a complete checkpoint (no {TRAINER_STATE})")
    if verify:
        status, detail = verify_checkpoint(ckpt_dir)
        if status == "bad":
            raise CheckpointInvalid(f"{ckpt_dir} is damaged: {detail}")
    if accelerator.distributed_type == DistributedType.FSDP:
        accelerator.load_state(str(ckpt_dir), load_kwargs={"weights_only": True})
    elif model is not None:
        if not (ckpt_dir / OPTIMIZER).is_file() and (ckpt_dir / "optimizer.bin").is_file():
            raise ValueError(f"{ckpt_dir} was written by an older sslpipe (pickled optimizer.bin, "
                             "random_states_*.pkl), which this version does not unpickle; export its weights from a "
                             "trusted environment or restart the run")
        state_io.load_model(accelerator.unwrap_model(model), ckpt_dir / MODEL)
        if optimizer is not None:
            state_io.load_optimizer(optimizer, ckpt_dir / OPTIMIZER)
        if getattr(accelerator, "scaler", None) is not None and (ckpt_dir / SCALER).is_file():
            state_io.load_scaler(accelerator.scaler, ckpt_dir / SCALER)
    rng = ckpt_dir / _rng_file(accelerator.process_index)
    if rng.is_file():
        state_io.load_rng(rng)
    else:
        warnings.warn(f"{ckpt_dir} has no RNG state for process {accelerator.process_index} (saved with fewer "
                      "processes): this process keeps its fresh per-rank seed", stacklevel=2)
    extra_file = ckpt_dir / EXTRA_STATE
    extra = load_file(str(extra_file)) if extra_file.is_file() else {}
    return json.loads(state_file.read_text()), extra
