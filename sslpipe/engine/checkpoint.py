"""Atomic, resumable checkpoints: `RUN/checkpoints/step_{N:08d}/`.

Each checkpoint holds Accelerate's own state (`accelerator.save_state`: student as safetensors, optimizer, grad
scaler, per-process RNG states), the recipe's extra state (`extra_state.safetensors`: EMA teacher, centres; tensors
only, no pickles) and `trainer_state.json` (global step, epoch, position in the epoch, last metrics, best value).
Everything is first written to `checkpoints/.tmp-step_N` and renamed when complete, so a crash mid-write never leaves
a checkpoint that looks valid.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

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


def save_checkpoint(accelerator: Any, run_dir: Path, trainer_state: dict[str, Any], extra_state: dict[str, torch.Tensor],
                    keep_last: int = 2, metric: float | None = None) -> Path:
    """Write a checkpoint atomically (all processes must call this), prune old ones and track the best one.

    `metric` (higher is better, e.g. kNN top-1) marks the best checkpoint, which pruning keeps.
    """
    step = int(trainer_state["global_step"])
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
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


def load_checkpoint(accelerator: Any, ckpt_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore Accelerate's state (models, optimizer, scaler, RNG) and return (trainer_state, extra_state on CPU)."""
    ckpt_dir = Path(ckpt_dir)
    state_file = ckpt_dir / TRAINER_STATE
    if not state_file.is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a complete checkpoint (no {TRAINER_STATE})")
    accelerator.load_state(str(ckpt_dir))
    extra_file = ckpt_dir / EXTRA_STATE
    extra = load_file(str(extra_file)) if extra_file.is_file() else {}
    return json.loads(state_file.read_text()), extra
