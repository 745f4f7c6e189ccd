"""Writing and reading run checkpoints: atomic, verified, without pickles (`RUN/checkpoints/step_{N:08d}/`).

A checkpoint holds the student (`model.safetensors`), the optimizer (`optimizer.safetensors`: tensors + JSON
metadata), one `rng_state_{rank}.safetensors` per process, `scaler.json` under fp16, the recipe's extra state
(`extra_state.safetensors`: EMA teacher, centres, queues) and `trainer_state.json` (global step, epoch, position in
the epoch, world size, last metrics, best value, `files`: the size and sha256 of every other file, and
`state_sha256`: the digest of its own content). Files get the umask's mode (0644 under umask 022). Nothing is a
pickle, so resuming a checkpoint from elsewhere cannot run code (`sslpipe.weights.state_io`). A sharded (FSDP2)
run writes the same files, its whole tensors gathered first (`sslpipe.weights.sharded_state`), so any run resumes
sharded or not, on any number of processes.

Everything is first written to `checkpoints/.tmp-step_N`, synced to disk, hashed into `trainer_state.json` (written
last) and renamed when complete, so a crash mid-write never leaves a checkpoint that looks valid. A step saved again
(with its evaluation metric) moves the old folder aside before the rename and deletes it after, so a complete
checkpoint of that step exists at every moment. `checkpoints/best.json` (the best metric's checkpoint, which pruning
keeps) is replaced atomically; an unreadable one is ignored with a warning, and nothing is pruned until it is
rewritten. A file damaged later (a bad disk, a copy cut short) no longer matches its sha256: resuming a run skips
such a checkpoint for the newest good one with a warning, and naming it with `--resume` is an error (`sslpipe check
RUN` lists them all). Checkpoints of older versions (no `files`) still load, unverified. A failed write (disk full,
I/O error, no permission) stops every process with one `WriteFailed` naming the file, after the partial directory is
removed.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from sslpipe.errors import WriteFailed, io_failure
from sslpipe.files import set_default_mode, with_digest, write_text_atomic
from sslpipe.weights import sharded_state, state_io
from sslpipe.weights.checkpoint import (
    BEST_FILE,
    EXTRA_STATE,
    FILES,
    MODEL,
    OPTIMIZER,
    SCALER,
    STATE_DIGEST,
    TRAINER_STATE,
    CheckpointInvalid,
    interrupted_swaps,
    list_checkpoints,
    read_best,
    swapped_back,
)
from sslpipe.weights.hashing import sha256_file
from sslpipe.weights.verify import verify_checkpoint


def _file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under `folder` but trainer_state.json, each synced to disk first."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != TRAINER_STATE)
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p, sync=True)}
            for p in files}


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
        set_default_mode(path)  # safetensors' private temporary file is 0600: a shared run's others could not read it
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
    # Collectives first, on every process, before any write that could fail on one of them alone.
    extra_state = sharded_state.whole(extra_state, keep=main)
    if model is not None:
        state = sharded_state.gathered_model_state(accelerator.unwrap_model(model), keep=main)
        optim = sharded_state.gathered_optimizer_state(optimizer, keep=main) if optimizer is not None else None
    if model is not None and main:
        _write(tmp / MODEL, lambda p: state_io.save_model(state, p))
        if optim is not None:
            _write(tmp / OPTIMIZER, lambda p: state_io.save_optimizer_state(optim, p))
        if getattr(accelerator, "scaler", None) is not None:
            _write(tmp / SCALER, lambda p: state_io.save_scaler(accelerator.scaler, p))
    _write(tmp / _rng_file(accelerator.process_index), state_io.save_rng)
    if main:
        _write(tmp / EXTRA_STATE, lambda p: save_file({k: v.detach().contiguous().cpu() for k, v in
                                                       extra_state.items()}, str(p)))


def _complete(tmp: Path, final: Path, trainer_state: dict[str, Any], keep_last: int, metric: float | None) -> None:
    """Main process: sync and hash every file into trainer_state.json (last), rename, track the best, prune."""
    with _failed_write(f"could not sync {tmp}"):
        state = with_digest({**trainer_state, FILES: _file_table(tmp)}, STATE_DIGEST)
    _write(tmp / TRAINER_STATE, lambda p: p.write_text(json.dumps(state, indent=2)))
    aside = final.with_name(f".old-{final.name}")
    with _failed_write(f"could not complete {final}"):
        with open(tmp / TRAINER_STATE, "rb") as f:
            os.fsync(f.fileno())
        _swap_in(tmp, final, aside)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself reaches the disk
        finally:
            os.close(dir_fd)
    after_file_written(final)
    with _failed_write(f"{final} is complete, but removing the replaced {aside}, {final.parent / BEST_FILE} or "
                       "pruning older checkpoints failed"):
        if aside.exists():
            shutil.rmtree(aside)
        keep = _update_best(final.parent, final, metric)
        if keep is not None:
            _prune(final.parent, keep_last, keep=keep | {final})


def _swap_in(tmp: Path, final: Path, aside: Path) -> None:
    """Rename `tmp` to `final`. A `final` already there (the same step saved again, e.g. with its metric) is renamed
    to `aside` first and back when the swap is interrupted, so a complete checkpoint of that step exists at every
    moment; the caller deletes `aside` once `final` is in place."""
    if aside.exists():
        shutil.rmtree(aside)  # left by a crash after an earlier swap
    replacing = final.exists()
    try:
        if replacing:
            os.replace(final, aside)
        os.replace(tmp, final)
    except BaseException:
        if replacing and aside.exists() and not final.exists():
            os.replace(aside, final)
        raise


def restore_interrupted_swaps(run_dir: Path) -> list[str]:
    """Rename back each `interrupted_swaps` folder to its `step_N`. Returns a notice per restored step (main process,
    under the run's lock, before a resume picks its checkpoint)."""
    notices = []
    for aside in interrupted_swaps(run_dir):
        final = swapped_back(aside)
        os.replace(aside, final)
        notices.append(f"{final.name} was set aside by a save that a hard kill interrupted: restored from {aside.name}")
    return notices


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


def _update_best(root: Path, ckpt: Path, metric: float | None) -> set[Path] | None:
    """Record `ckpt` in best.json when `metric` beats it (atomic: a kill or a full disk leaves the old file whole).
    Returns the best checkpoint for pruning to keep (an empty set when none), or None when best.json is unreadable
    and no metric replaces it: the best is unknown, so nothing may be pruned."""
    path = root / BEST_FILE
    best = read_best(path)
    if best == {}:
        warnings.warn(f"{path} is unreadable: ignored; no checkpoint is pruned until the next evaluation writes it "
                      "again (delete it to prune now)", stacklevel=3)
    if metric is not None and (not best or metric > best["value"]):
        best = {"checkpoint": ckpt.name, "value": metric}
        write_text_atomic(path, json.dumps(best))
    if best == {}:
        return None
    return {root / best["checkpoint"]} if best else set()


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
    if model is not None:
        if not (ckpt_dir / OPTIMIZER).is_file() and (ckpt_dir / "optimizer.bin").is_file():
            raise ValueError(f"{ckpt_dir} was written by an older sslpipe (pickled optimizer.bin, "
                             "random_states_*.pkl), which this version does not unpickle; export its weights from a "
                             "trusted environment or restart the run")
        state_io.load_model(accelerator.unwrap_model(model), ckpt_dir / MODEL)  # sharded or not
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
