"""Atomic, resumable checkpoints without pickles: `RUN/checkpoints/step_{N:08d}/`.

A checkpoint holds the student (`model.safetensors`), the optimizer (`optimizer.safetensors`: tensors + JSON
metadata), one `rng_state_{rank}.safetensors` per process, `scaler.json` under fp16, the recipe's extra state
(`extra_state.safetensors`: EMA teacher, centres, queues) and `trainer_state.json` (global step, epoch, position in
the epoch, world size, last metrics, best value). Nothing is a pickle, so resuming a checkpoint from elsewhere cannot
run code (`sslpipe.engine.state_io`). FSDP runs are the exception: their sharded optimizer is written by
accelerate's `save_state` and read back with `torch.load(weights_only=True)`, which refuses anything but tensors and
plain containers.

Everything is first written to `checkpoints/.tmp-step_N` and renamed when complete, so a crash mid-write never leaves
a checkpoint that looks valid.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from sslpipe.engine import state_io

STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.json"
EXTRA_STATE = "extra_state.safetensors"
BEST_FILE = "best.json"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (by step)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if STEP_DIR.match(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume: str, output_dir: str | Path, run_name: str | None = None) -> Path | None:
    """The checkpoint directory to resume from.

    `auto`: with a `run_name`, that run's latest checkpoint (another run in `output_dir` is never picked up);
    without one, the newest run directory under `output_dir` (by its latest checkpoint's mtime) that has a
    checkpoint; None when there is none (a fresh run starts). Otherwise a run directory (its latest checkpoint) or
    a checkpoint directory.
    """
    if resume == "auto" and run_name is not None:
        return find_latest_checkpoint(Path(output_dir) / run_name)
    if resume == "auto":
        root = Path(output_dir)
        latest = [c for c in (find_latest_checkpoint(d) for d in root.iterdir() if d.is_dir()) if c] if root.is_dir() else []
        return max(latest, key=lambda c: c.stat().st_mtime) if latest else None
    path = Path(resume)
    if (path / TRAINER_STATE).is_file():
        return path
    if path.is_dir():
        ckpt = find_latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"--resume {path}: no checkpoint in {path / 'checkpoints'} (nothing to resume)")
        return ckpt
    raise FileNotFoundError(f"--resume {path}: no such run or checkpoint directory")


MODEL, OPTIMIZER, SCALER = "model.safetensors", "optimizer.safetensors", "scaler.json"


def _rng_file(rank: int) -> str:
    return f"rng_state_{rank}.safetensors"


def save_checkpoint(accelerator: Any, run_dir: Path, trainer_state: dict[str, Any],
                    extra_state: dict[str, torch.Tensor], keep_last: int = 2, metric: float | None = None, *,
                    model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write a checkpoint atomically (all processes must call this), prune old ones and track the best one.

    `model` / `optimizer` are the prepared student and optimizer. `metric` (higher is better, e.g. kNN top-1) marks
    the best checkpoint, which pruning keeps.
    """
    step = int(trainer_state["global_step"])
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.distributed_type == DistributedType.FSDP:
        accelerator.save_state(str(tmp), safe_serialization=True)
    elif model is not None:
        state = accelerator.get_state_dict(model)  # a collective under sharding: every rank calls it
        if accelerator.is_main_process:
            save_file(state_io._cpu(state_io.without_aliases(state)), str(tmp / MODEL), metadata={"format": "pt"})
            if optimizer is not None:
                state_io.save_optimizer(optimizer, tmp / OPTIMIZER)
            if getattr(accelerator, "scaler", None) is not None:
                state_io.save_scaler(accelerator.scaler, tmp / SCALER)
    state_io.save_rng(tmp / _rng_file(accelerator.process_index))
    if accelerator.is_main_process:
        save_file({k: v.detach().contiguous().cpu() for k, v in extra_state.items()}, str(tmp / EXTRA_STATE))
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        best = _update_best(root, final, metric)
        _prune(root, keep_last, keep={final, best} - {None})
    accelerator.wait_for_everyone()
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
                    optimizer: torch.optim.Optimizer | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore the student, optimizer, grad scaler and this process's RNG states; return (trainer_state,
    extra_state on CPU). A process without an RNG file of its own (resuming on more processes than were saved)
    keeps its fresh per-rank seed, with a warning."""
    ckpt_dir = Path(ckpt_dir)
    state_file = ckpt_dir / TRAINER_STATE
    if not state_file.is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a complete checkpoint (no {TRAINER_STATE})")
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
