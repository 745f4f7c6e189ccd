"""The method-agnostic training loop on HuggingFace Accelerate (docs/internals.md §5).

It knows nothing about DINO or iBOT: a `Recipe` gives models, parameter groups, data and one `step`; this loop owns
devices, mixed precision, gradient accumulation, per-iteration schedules, DINO-style gradient clipping and
last-layer freezing, NaN detection, logging and exact, atomic checkpoints.

One iteration = one optimizer step = `train.grad_accum_steps` batches per process. Schedules span
`train.epochs * steps_per_epoch` iterations; `train.max_steps` only stops the run early (a final checkpoint is
written), so a run stopped by `max_steps` and resumed continues on the same schedule.

Faults (issue 21): the launcher's process count is checked (`engine/processes.py`); the main process holds the run
directory's lock for the whole run (`engine/run_lock.py`) and resumes only a checkpoint whose files match their
sha256; a failed write (disk full, I/O error, permission) ends the run with one `WriteFailed` naming the file, the
last good checkpoint and how to resume; the end of a run reports what the loader skipped.

Multi-process launches run the command: `accelerate launch -m sslpipe train RECIPE.yaml optim.lr=1e-3 [--resume
auto|RUN|CKPT]` (`run_recipe`).
"""
from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    set_seed,
)
from tqdm.auto import tqdm

from sslpipe.config import RunConfig
from sslpipe.data.stream import loader_stats, rank_shares, resolve_shards
from sslpipe.engine.determinism import deterministic_mode
from sslpipe.engine.metric_window import MetricWindow
from sslpipe.engine.optim import (
    apply_schedule,
    build_optimizer,
    clip_gradients_per_tensor,
)
from sslpipe.engine.preemption import StopRequest, exit_signal, sigterm_as_exit
from sslpipe.engine.prefetch import prefetch_to_device
from sslpipe.engine.preflight import preflight
from sslpipe.engine.processes import process_state
from sslpipe.engine.run_config import config_changes, record_resumed_config, unfit_checkpoint, write_config
from sslpipe.engine.run_lock import RunLock
from sslpipe.engine.schedules import Schedules
from sslpipe.engine.sharding import Sharding, shard, sharding_from_launcher, unsharded
from sslpipe.engine.tracking import JsonlWriter, flat_config, tracker_setup, wandb_mode_scope
from sslpipe.errors import RunStopped, WriteFailed, io_failure
from sslpipe.recipes import Recipe, get_recipe, load_config
from sslpipe.recipes.base import shard_reading
from sslpipe.recipes.init_record import INIT_RECORD
from sslpipe.weights.checkpoint import interrupted_swaps, list_checkpoints
from sslpipe.weights.checkpoint_io import load_checkpoint, restore_interrupted_swaps, save_checkpoint
from sslpipe.weights.resume import pick_checkpoint, resume_run_dir, set_aside_newer, timestamped

COLLECTIVE_TIMEOUT = timedelta(hours=2)
METRICS = "metrics.jsonl"


class TrainingDiverged(RunStopped):
    """The loss became NaN/inf at global step `step`; raised on every process, with nothing written after that step."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


# --------------------------------------------------------------------------------------------------- helpers
def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_batches(recipe: Recipe, epoch: int, rank: int, world_size: int, skip: int) -> tuple[Any, Iterator[Any]]:
    """The loader of `epoch` (for its skip counters) and its batches with the first `skip` dropped (exact resume).

    Creating the iterator (DataLoader draws a base seed) and the skipped batches must not move the global RNGs:
    they are restored afterwards, so an epoch started fresh or resumed mid-way consumes the same random numbers.
    """
    saved = _rng_state()
    loader = recipe.train_loader(epoch, rank, world_size)
    it = iter(loader)
    for i in range(skip):
        if next(it, None) is None:
            raise RuntimeError(f"resume: the loader of epoch {epoch} ended after {i} batches, before {skip}")
    _set_rng_state(saved)
    return loader, it


def train_step(accelerator: Accelerator, recipe: Recipe, optimizer: torch.optim.Optimizer, batches: list[Any],
               sched: dict[str, float], cfg: RunConfig) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """One optimizer step over `batches` (the gradient-accumulation window), then the recipe's EMA update: the
    schedule, the forward passes under autocast, backward, clipping, the recipe's hook (DINO's last-layer freeze),
    the optimizer.
    Returns the per-batch losses (on the device, unsynchronised) and the last batch's metrics. `sslpipe bench step`
    times exactly this function."""
    apply_schedule(optimizer, sched)
    accelerator.step = 0  # the accumulation window is exactly these batches
    losses, metrics = [], {}
    for batch in batches:
        with accelerator.accumulate(recipe.student):
            with accelerator.autocast():
                loss, metrics = recipe.step(batch, sched)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if cfg.optim.clip_mode == "per_tensor" and cfg.optim.clip_grad > 0:
                    accelerator.unscale_gradients(optimizer)
                    clip_gradients_per_tensor(recipe.student, cfg.optim.clip_grad)
                elif cfg.optim.clip_mode == "global" and cfg.optim.clip_grad > 0:
                    accelerator.clip_grad_norm_(recipe.student.parameters(), cfg.optim.clip_grad)
                recipe.before_optimizer_step(sched)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
    recipe.after_optimizer_step(sched)
    return losses, metrics


def describe_scale(cfg: RunConfig, sched: Schedules, world: int) -> str:
    """The numbers that change with the process count, printed at start so a run never changes them silently."""
    o = cfg.optim
    rule = {"linear": f"= optim.lr {o.lr:g} x {sched.global_batch} / 256",
            "sqrt_wrt_1024": f"= optim.lr {o.lr:g} x sqrt({sched.global_batch} / 1024)"}.get(
        o.lr_scaling, "(optim.lr_scaling none: as given)")
    return (f"{world} process(es) x batch {cfg.data.batch_size} x {cfg.train.grad_accum_steps} accumulation = "
            f"global batch {sched.global_batch}; peak lr {sched.base_lr:.4g} {rule}; {sched.steps_per_epoch} steps "
            f"per epoch, {sched.total} steps in {cfg.train.epochs} epochs")


def uneven_shares(cfg: RunConfig, batches: int, world: int) -> str | None:
    """A notice when a process's shard share of the first epoch is smaller than the `batches` x batch it reads: the
    samples read twice and left unread (launch/README.md); None when none is short (what is left unread then is
    less than a global batch, as with one process) or the shares cannot be counted."""
    d = cfg.data
    if world == 1 or d.resampled or d.steps_per_epoch is not None:
        return None
    try:  # a recipe of one's own may read data.train as something other than shards
        shares = rank_shares(d.train, d.train_split, world, cfg.seed, 0, shard_reading(d))
    except (FileNotFoundError, ValueError):
        return None
    need = batches * d.batch_size
    if shares is None or min(shares) >= need:
        return None
    twice, unread = sum(max(0, need - s) for s in shares), sum(max(0, s - need) for s in shares)
    return (f"data: the first epoch's shard split gives the {world} processes {min(shares)} to {max(shares)} samples "
            f"for {need} each, so about {twice} samples are read twice and {unread} not at all in an epoch (a new "
            f"split each epoch); shards of equal size, a multiple of {world} of them, keep every epoch whole "
            "(`sslpipe shards ... --samples-per-shard N`)")


def workers_change_order(cfg: RunConfig, before: int, after: int, world: int) -> bool:
    """Whether data.num_workers `before` -> `after` changes the order a process reads its shards in: the workers
    that split them (`build_loader`: at least 1, at most the process's shards) differ."""
    d = cfg.data
    try:
        shards = -(-len(resolve_shards(d.train, d.train_split, shard_reading(d))) // world)
    except (FileNotFoundError, ValueError):  # not shards: as asked
        return before != after
    used = (before, after) if d.resampled else tuple(max(1, min(n, shards)) for n in (before, after))
    return used[0] != used[1]


def rescaled_step(step: int, saved_steps_per_epoch: int, steps_per_epoch: int) -> int:
    """The step at the same point of the same epoch when the steps per epoch changed (another process count)."""
    if saved_steps_per_epoch == steps_per_epoch:
        return step
    epoch, in_epoch = divmod(step, saved_steps_per_epoch)
    return epoch * steps_per_epoch + round(in_epoch * steps_per_epoch / saved_steps_per_epoch)


def _claim_run(cfg: RunConfig, resume: str | None, overrides_text: str | None) -> tuple[Path, Path | None, RunLock]:
    """Main process: the run directory (`output_dir/run_name`, a timestamped name, or the resumed run's), its lock,
    the verified checkpoint to resume, and config.yaml. The lock comes before anything is read or written, so a
    second job on the directory is refused at once. A named older checkpoint sets the newer ones aside
    (`set_aside_newer`); a fresh start in a directory without checkpoints (a start that failed early) sets the old
    metrics.jsonl aside, so the two starts' lines never mix."""
    run_dir, named = resume_run_dir(resume, cfg.output_dir, cfg.run_name) if resume else (None, None)
    fresh = run_dir is None
    if fresh:
        run_dir = Path(cfg.output_dir) / (cfg.run_name or
                                          f"{cfg.method.rsplit(':', 1)[-1].lower()}-{datetime.now():%Y%m%d-%H%M%S}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir).acquire()
    except OSError as err:
        if io_failure(err) is None:
            raise
        raise WriteFailed(f"cannot write the run directory {run_dir}: {io_failure(err)}; choose an output_dir that "
                          "is writable and has free space") from err
    if lock.notice:
        print(lock.notice, file=sys.stderr)
    try:
        if fresh and (list_checkpoints(run_dir, complete_only=False) or interrupted_swaps(run_dir)):
            raise FileExistsError(
                f"run directory {run_dir} already has checkpoints: continue it with --resume {run_dir} "
                "(or --resume auto), or choose another run_name")
        for notice in [] if fresh else restore_interrupted_swaps(run_dir):
            print(notice, file=sys.stderr)
        ckpt = None if fresh else pick_checkpoint(run_dir, named)
        if named is not None:
            _announce_set_aside(run_dir, ckpt, set_aside_newer(run_dir, ckpt))
        if fresh:
            (run_dir / INIT_RECORD).unlink(missing_ok=True)  # a failed start's record: this start writes its own
        if fresh and (run_dir / METRICS).is_file():
            old = timestamped(run_dir, "metrics", ".jsonl")
            os.replace(run_dir / METRICS, old)
            print(f"{run_dir} has no checkpoint from an earlier start: its {METRICS} is kept as {old.name}, this "
                  f"run writes a new one", file=sys.stderr)
        if ckpt is None:
            write_config(cfg, run_dir, overrides_text)
        else:  # config.yaml is rewritten once the checkpoint has loaded (`record_resumed_config`)
            cfg = cfg.model_copy(update={"run_name": run_dir.name, "output_dir": str(run_dir.parent)})
    except BaseException:
        lock.release()
        raise
    return run_dir, ckpt, lock


def _where_to_continue(last_ckpt: Path | None, run_dir: Path) -> str:
    """How to go on after a run ended early: from its last checkpoint, or from the start."""
    if last_ckpt is None:
        return "no checkpoint was written yet: start the run again"
    return f"the last good checkpoint is {last_ckpt}: continue with --resume {run_dir} (or --resume auto)"


def _evaluation_failed(err: Exception, what: str, how: str) -> Exception:
    """`err` told with `what` happened and `how` to go on. A ValueError / FileNotFoundError (bad input, which the CLI
    prints as one line) comes back as a new one of its class; any other error is `err` itself, with a note (its
    type and traceback kept)."""
    for kind in (FileNotFoundError, ValueError):
        if isinstance(err, kind):
            return kind(f"{what}: {err}; {how}")
    err.add_note(f"sslpipe: {what}; {how}")
    return err


def _announce_set_aside(run_dir: Path, ckpt: Path, aside: Path | None) -> None:
    """Say which checkpoints a roll-back moved and where, so the user can take them back."""
    if aside is not None:
        moved = ", ".join(sorted(p.name for p in aside.iterdir()))
        print(f"resuming the older checkpoint {ckpt.name}: the newer {moved} of the abandoned trajectory moved to "
              f"{aside} (kept, never resumed or pruned; move them back into {run_dir / 'checkpoints'} and resume "
              "the run to return to it)", file=sys.stderr)


def _open_run(cfg: RunConfig, resume: str | None, overrides_text: str | None
              ) -> tuple[Path, Path | None, RunLock | None]:
    """`preflight` and `_claim_run` on the main process; every process gets its run directory and checkpoint, or its
    error, from one broadcast (the lock stays with the main process; a check that failed on one process alone would
    leave the others waiting at the broadcast)."""
    lock, answer = None, None
    if PartialState().is_main_process:
        try:
            preflight(cfg)
            run_dir, ckpt, lock = _claim_run(cfg, resume, overrides_text)
            answer = (run_dir, ckpt)
        except Exception as err:
            broadcast_object_list([err])
            raise
    answer = broadcast_object_list([answer])[0]
    if isinstance(answer, Exception):
        raise answer
    return answer[0], answer[1], lock


def _divergence(accelerator: Accelerator, losses: list[torch.Tensor], steps: list[int], run_dir: Path,
                last_ckpt: Path | None) -> TrainingDiverged | None:
    """The error for the first step, on any rank, whose loss was not finite, or None.

    Losses stay on the device during the step (a per-step check would sync the GPU every step); the trainer calls
    this before anything is written (log line, checkpoint, evaluation) and at the end, so nothing computed after a
    non-finite loss is ever saved. One gather of one number per process.
    """
    if not losses:
        return None
    values = torch.stack(losses)
    bad = ~torch.isfinite(values)
    index = torch.where(bad.any(), bad.float().argmax(), torch.tensor(-1, device=values.device))
    first = torch.where(index >= 0, torch.tensor(steps, device=values.device)[index.clamp(min=0)], -1)
    per_rank = accelerator.gather(first.reshape(1)).tolist()
    failed = [s for s in per_rank if s >= 0]
    if not failed:
        return None
    step = min(failed)
    local = values[[i for i, s in enumerate(steps) if s == step]].tolist()
    where = f"{last_ckpt} (resume with --resume {run_dir})" if last_ckpt else "none (no checkpoint was written yet)"
    return TrainingDiverged(
        f"training diverged at global step {step}: loss {local} on process {accelerator.process_index} "
        f"(first non-finite step per process: {per_rank}). No checkpoint was written after this step; the last good "
        f"checkpoint is {where}. Try a lower optim.lr or longer optim.warmup_epochs, train.mixed_precision=no "
        "(fp32), or a smaller optim.clip_grad.", step
    )


# ------------------------------------------------------------------------------------------------------ train
def train(cfg: RunConfig, *, resume: str | None = None, overrides_text: str | None = None) -> Path:
    """Train `cfg.method` and return the run directory.

    `resume`: None (fresh run), "auto" (newest run in `cfg.output_dir` with a checkpoint, else fresh), a run
    directory (its newest good checkpoint) or a checkpoint directory; an older one (a roll-back) first moves the
    run's newer checkpoints to `checkpoints/abandoned-<time>/`. A resumed run writes a `resumed` event line to
    metrics.jsonl; SIGTERM / Ctrl-C write a `terminated` one and say how to continue. `overrides_text` (the
    command-line overrides) is recorded in config.yaml. With `train.deterministic` the run uses deterministic
    kernels (bit-exact resume on a GPU too; see `sslpipe.engine.determinism`).
    """
    if resume is not None and not str(resume).strip():
        raise ValueError("resume is empty (an unset variable?): give a run directory, a checkpoint or 'auto'; None "
                         "starts a fresh run")
    sharding = sharding_from_launcher()  # before Accelerate reads the environment
    if sharding is not None and get_recipe(cfg.method).sharded_modules is Recipe.sharded_modules:
        raise ValueError(f"method {cfg.method} does not run sharded (FSDP2 launch file): launch it with DDP, e.g. "
                         "launch/8gpu_ddp.yaml; dino, ibot, dinov2 and dinov3 run sharded")
    precision = cfg.train.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if sharding is not None and precision == "fp16":
        raise ValueError("fp16 under an FSDP2 launch file: the loss scaler would skip steps on some processes and "
                         "not others (it sees only its slice of the gradients); use bf16 (train.mixed_precision=bf16 "
                         "or the launch file's mixed_precision)")
    with deterministic_mode(cfg.train.deterministic), sigterm_as_exit():
        # The process group comes first (all ranks must agree on the run directory). Ranks wait at a collective
        # while the main process runs a periodic kNN probe: allow hours, not NCCL's 10 min.
        _, cpu = process_state(COLLECTIVE_TIMEOUT)
        run_dir, ckpt, lock = _open_run(cfg, resume, overrides_text)
        if ckpt is not None:
            cfg = cfg.model_copy(update={"run_name": run_dir.name, "output_dir": str(run_dir.parent)})
        try:
            trackers = tracker_setup(cfg, run_dir, resumed=ckpt is not None, main=PartialState().is_main_process)
            with wandb_mode_scope(trackers[1]):
                return _train(cfg, cpu=cpu, run_dir=run_dir, ckpt=ckpt, sharding=sharding, trackers=trackers,
                              overrides_text=overrides_text)
        finally:
            if lock is not None:
                lock.release()


def _train(cfg: RunConfig, *, cpu: bool, run_dir: Path, ckpt: Path | None, sharding: Sharding | None,
           trackers: tuple[list[str], dict[str, dict[str, Any]]], overrides_text: str | None = None) -> Path:
    state = PartialState()
    log_with, init_kwargs = trackers
    recipe_cls = get_recipe(cfg.method)
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=recipe_cls.ddp_find_unused_parameters)],
    )
    rank, world = state.process_index, state.num_processes

    # Same seed on every rank while models are built (teacher = copy of an identical student); per-rank afterwards.
    set_seed(cfg.seed)
    recipe = recipe_cls(cfg)
    recipe.build(accelerator)
    # Before the optimizer: fused AdamW wants its parameters on the GPU, a sharded run its slices (DTensors).
    sharded = recipe.sharded_modules() if sharding is not None and world > 1 else []
    if sharding is not None and world == 1:
        accelerator.print("an FSDP launch file with one process: nothing to shard, the run is not sharded")
    if sharded:
        shard(sharded, accelerator.device, sharding)
    else:
        recipe.student.to(accelerator.device)
    optimizer = build_optimizer(cfg, recipe.param_groups())
    if sharded:  # the student stays as sharded, never DDP-wrapped
        optimizer = accelerator.prepare(optimizer)
    else:
        recipe.student, optimizer = accelerator.prepare(recipe.student, optimizer)
    set_seed(cfg.seed, device_specific=True)

    accum = cfg.train.grad_accum_steps
    spe = recipe.steps_per_epoch(world) // accum
    if spe <= 0:
        raise ValueError(f"{recipe.steps_per_epoch(world)} batches per epoch < train.grad_accum_steps={accum}")
    sched = Schedules(cfg, spe, world, recipe=recipe.schedule)
    stop_at = sched.total if cfg.train.max_steps is None else min(sched.total, cfg.train.max_steps)
    accelerator.print(describe_scale(cfg, sched, world))
    # a recipe that counts its epoch its own way (U2PL: over the unlabelled set) is not checked against data.train
    if accelerator.is_main_process and type(recipe).steps_per_epoch is Recipe.steps_per_epoch:
        uneven = uneven_shares(cfg, recipe.steps_per_epoch(world), world)
        if uneven:
            accelerator.print(uneven)

    global_step, best, last_metrics = 0, None, {}
    eval_pending = False  # the evaluation of the epoch that ends at global_step has not run (it failed)
    if ckpt is not None:
        changes = config_changes(cfg, run_dir)
        try:
            trainer_state, extra = load_checkpoint(accelerator, ckpt, model=recipe.student, optimizer=optimizer,
                                                   verify=False)  # verified by the main process when it was picked
            recipe.load_extra_state(extra)
        except (RuntimeError, ValueError) as err:
            if not changes:
                raise
            raise unfit_checkpoint(ckpt, run_dir, changes, err) from err
        if accelerator.is_main_process:
            record_resumed_config(cfg, run_dir, changes, overrides_text)
        best, last_metrics = trainer_state.get("best"), trainer_state.get("metrics", {})
        eval_pending = bool(trainer_state.get("eval_pending"))
        saved_step = int(trainer_state["global_step"])
        saved_spe, saved_world = trainer_state.get("steps_per_epoch", spe), trainer_state.get("world_size", world)
        global_step = rescaled_step(saved_step, saved_spe, spe)
        if (saved_world, saved_spe) != (world, spe):
            saved_batch = trainer_state.get("global_batch", cfg.data.batch_size * saved_world * accum)
            accelerator.print(
                f"elastic resume: the run was saved on {saved_world} processes (global batch {saved_batch}, "
                f"{saved_spe} steps per epoch) and continues on {world} (global batch {sched.global_batch}, {spe} "
                f"steps per epoch). Step {saved_step} (epoch {saved_step / saved_spe:.3f}) continues as step "
                f"{global_step} at the same point of the epoch and of the schedules; the learning rate follows "
                f"the new global batch, and the data order differs from an uninterrupted run.")
        before, after = changes.get("data.num_workers", (None, None))
        if global_step % spe and before is not None and workers_change_order(cfg, before, after, world):
            accelerator.print(f"data.num_workers {before} -> {after} in the middle of an epoch: each worker reads its "
                              "own shards, so the rest of this epoch is read in another order and some of its samples "
                              "are read twice, others not; the next epochs are whole")
        accelerator.print(f"resumed from {ckpt} at global step {global_step}")

    accelerator.init_trackers(cfg.tracking.wandb_project, config=flat_config(cfg), init_kwargs=init_kwargs)
    writer = JsonlWriter(run_dir / METRICS) if accelerator.is_main_process else None
    last_ckpt, last_saved = ckpt, global_step if ckpt is not None else -1

    def checkpoint(metric: float | None = None) -> None:
        nonlocal last_ckpt, last_saved
        if last_saved == global_step and metric is None:
            return
        check_finite()
        epoch, in_epoch = divmod(global_step, spe)
        trainer_state = {"global_step": global_step, "epoch": epoch, "step_in_epoch": in_epoch, "world_size": world,
                         "steps_per_epoch": spe, "global_batch": sched.global_batch, "metrics": last_metrics,
                         "best": best, **({"eval_pending": True} if eval_pending else {})}
        last_ckpt = save_checkpoint(accelerator, run_dir, trainer_state, recipe.extra_state(),
                                    keep_last=cfg.train.keep_last, metric=metric, model=recipe.student,
                                    optimizer=optimizer)
        last_saved = global_step

    def evaluates(epoch: int) -> bool:
        """Whether the end of `epoch` (0-based) runs the evaluation."""
        return cfg.eval.every_epochs > 0 and (epoch + 1) % cfg.eval.every_epochs == 0

    def log(record: dict[str, Any]) -> None:
        if writer is not None:
            writer.write(record)
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=global_step)

    def check_finite() -> None:
        error = _divergence(accelerator, window_loss, window_steps, run_dir, last_ckpt)
        if error is not None:
            log({"step": error.step, "event": "diverged"})
            raise error

    skipped: dict[str, int] = {}  # the loader's skip counters of the epochs already done, this process
    loader = None

    def count_skipped() -> None:
        for key, value in (loader_stats(loader) or {}).items():
            skipped[key] = skipped.get(key, 0) + value

    def report_skipped() -> None:
        """Print and log what the loader skipped over this start (all processes), so that a data set silently
        shrinking by corrupt samples or unreadable shards shows up. Loaders without counters (toys) report nothing."""
        count_skipped()
        if not skipped:
            return
        keys = sorted(skipped)
        totals = accelerator.reduce(torch.tensor([float(skipped[k]) for k in keys], device=accelerator.device), "sum")
        counts = {k: int(v) for k, v in zip(keys, totals.tolist())}
        log({"step": global_step, "event": "loader skipped", **counts})
        hint = ("; the warnings above name each one: check or rewrite the shards" if any(counts.values()) else "")
        accelerator.print(f"loader skipped {counts.get('corrupt_samples', 0)} corrupt sample(s) and "
                          f"{counts.get('shard_errors', 0)} unreadable shard(s) since this start, over {world} "
                          f"process(es){hint}")

    bar = tqdm(total=stop_at, initial=global_step, disable=not accelerator.is_main_process, dynamic_ncols=True)
    window_images, window_start, window_loss, window_metrics = 0, time.perf_counter(), [], MetricWindow()
    window_steps: list[int] = []
    stop_request = StopRequest(cfg.train.stop_file).install()
    stopping = False  # a stop request was agreed: finish this epoch's end if it is one, checkpoint, return

    def report_termination(err: BaseException) -> None:
        """Main process, SIGTERM / Ctrl-C: one event line and one message naming the step, the last checkpoint and
        how to continue. No checkpoint is written: a scheduler's grace period (SLURM's KillWait) is too short."""
        how = exit_signal(err)
        with contextlib.suppress(OSError, WriteFailed):  # a full disk must not hide the signal
            writer.write({"step": global_step, "event": "terminated", "signal": how})
        tqdm.write(f"terminated by {how} at step {global_step}; {_where_to_continue(last_ckpt, run_dir)}",
                   file=sys.stderr)

    def evaluate(done_epoch: int) -> dict[str, float]:
        """The recipe's evaluation of `done_epoch`. When it raises (data without labels, a crop the patches do not
        tile, out of memory), the epoch's training is checkpointed first, marked `eval_pending`: nothing is lost, and
        the resumed run evaluates that epoch before it trains on, so its evaluations, metrics and best checkpoint are
        those of a run without the failure. One process only: with several, a process whose evaluation failed alone
        cannot tell whether the others reach the save, and a collective they never join would hang the run."""
        nonlocal eval_pending
        eval_pending, rng = True, _rng_state()
        try:
            with unsharded(sharded, sharding):
                results = recipe.evaluate(done_epoch)
        except Exception as err:
            if world == 1:
                _set_rng_state(rng)  # the checkpoint holds the RNG the evaluation started from: the resume redraws it
                checkpoint()
                how = (f"the epoch's training is kept in checkpoint {last_ckpt}: fix the cause (or set "
                       f"eval.every_epochs=0) and continue with --resume {run_dir}, which evaluates epoch "
                       f"{done_epoch + 1} first")
            else:
                how = (f"the epoch is not checkpointed (with {world} processes a failed evaluation is not saved); "
                       f"{_where_to_continue(last_ckpt, run_dir)}")
            failed = _evaluation_failed(err, f"the evaluation after epoch {done_epoch + 1} failed", how)
            if failed is err:
                raise
            raise failed from err
        eval_pending = False
        return results

    def end_of_epoch(step_due: bool) -> None:
        """The evaluation of the epoch that ends at global_step (when due) and the epoch's checkpoint."""
        nonlocal best
        done_epoch, metric = global_step // spe - 1, None
        if evaluates(done_epoch):
            check_finite()
            results = evaluate(done_epoch)
            if results:
                log({"step": global_step, "epoch": done_epoch + 1, **results})
                if cfg.train.best_metric in results:
                    metric = float(results[cfg.train.best_metric])
                    best = metric if best is None else max(best, metric)
                elif cfg.train.best_metric is not None:  # a misspelt metric would keep no best at all
                    checkpoint()
                    raise ValueError(
                        f"train.best_metric={cfg.train.best_metric} is not a metric the evaluation returns "
                        f"({', '.join(sorted(results))}): choose one of them and continue with --resume "
                        f"{run_dir} (checkpoint {last_ckpt})")
        every = cfg.train.checkpoint_every_epochs
        if (every and (done_epoch + 1) % every == 0) or metric is not None or step_due:
            checkpoint(metric)

    try:
        if ckpt is not None:  # lines after this step in metrics.jsonl belong to the trajectory it replaces
            # `from_step`: the checkpoint's step in the units the earlier lines were logged in (an elastic resume
            # rescales global_step to this run's batch): what `metrics_log.current_trajectory` compares them with
            log({"step": global_step, "event": "resumed", "checkpoint": str(ckpt), "from_step": saved_step})
            if eval_pending and global_step % spe == 0 and evaluates(global_step // spe - 1):
                end_of_epoch(step_due=True)  # its evaluation failed: run it before training on, then re-save
            eval_pending = False  # evaluated now, or no longer due (eval.every_epochs changed)
        while global_step < stop_at and not stopping:
            epoch, start = divmod(global_step, spe)
            count_skipped()
            loader, batch_iter = epoch_batches(recipe, epoch, rank, world, skip=start * accum)
            batches = prefetch_to_device(batch_iter, accelerator.device)
            step_due = False
            for _ in range(start, spe):
                step_due = False  # this step's checkpoint_every_steps checkpoint, when it waits for the epoch's end
                s = sched(global_step)
                batch_list = []
                for _micro in range(accum):
                    batch = next(batches, None)
                    if batch is None:
                        raise RuntimeError(f"the loader of epoch {epoch} (rank {rank}) yielded fewer than "
                                           f"steps_per_epoch={spe * accum} batches: check data.steps_per_epoch")
                    batch_list.append(batch)
                losses, metrics = train_step(accelerator, recipe, optimizer, batch_list, s, cfg)
                window_images += sum(recipe.batch_size_of(b) for b in batch_list)
                window_loss += losses
                window_steps += [global_step] * len(losses)
                window_metrics.add(metrics)  # averaged at the log step, over the window and the processes
                global_step += 1
                bar.update(1)

                if global_step % cfg.train.log_every == 0 or global_step == stop_at:
                    check_finite()
                    mean_loss = accelerator.reduce(torch.stack(window_loss).mean(), "mean").item()
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    scheduled = {k: v for k, v in s.items() if k not in ("epoch", "it")}
                    last_metrics = {
                        "step": global_step, "epoch": global_step / spe, "loss": mean_loss, **scheduled,
                        "images_per_s": window_images * world / elapsed, "world_size": world,
                        **window_metrics.means(accelerator),
                    }
                    log(last_metrics)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{s['lr']:.2e}",
                                    img_s=f"{last_metrics['images_per_s']:.1f}")
                    window_images, window_start, window_loss = 0, time.perf_counter(), []
                    window_steps = []
                    stopping = stop_request.agreed(accelerator)
                    if stopping:
                        break
                every = cfg.train.checkpoint_every_steps
                step_due = bool(every) and global_step % every == 0 and global_step < stop_at
                if step_due and not (global_step % spe == 0 and evaluates(global_step // spe - 1)):
                    checkpoint()  # at an epoch end with an evaluation it waits for it: a kill there would lose it
                if global_step >= stop_at:
                    break

            if global_step % spe == 0:  # the epoch is complete (a stop request waits for its evaluation)
                end_of_epoch(step_due)
        checkpoint()
        report_skipped()
        if stopping:
            log({"step": global_step, "event": "stopped on request"})
            accelerator.print(f"stopped on request at step {global_step}: checkpoint {last_ckpt}; "
                              f"continue with --resume {run_dir} (or --resume auto)")
    except WriteFailed as err:
        raise WriteFailed(f"{err}. Nothing written before was lost; {_where_to_continue(last_ckpt, run_dir)} once "
                          "the disk has space again (or is repaired / writable)") from err
    except (SystemExit, KeyboardInterrupt) as err:
        if writer is not None:
            report_termination(err)
        raise
    finally:
        stop_request.restore()
        bar.close()
        if writer is not None:
            writer.close()
        accelerator.end_training()
    return run_dir


def run_recipe(recipe: str | Path, overrides: Sequence[str] = (), *, resume: str | None = None,
               methods: Sequence[str] | None = None, command: str = "train") -> Path:
    """The one entry point of `sslpipe train` and `sslpipe finetune` (also under `accelerate launch -m sslpipe`):
    load the recipe with its overrides, refuse a method outside `methods` (naming the command that takes it), train,
    and record the overrides in the run's config.yaml."""
    cfg = load_config(recipe, overrides)
    if methods is not None and cfg.method not in methods:
        raise ValueError(f"{recipe}: method {cfg.method!r} is not one `sslpipe {command}` trains "
                         f"({', '.join(methods)}); use `sslpipe train` for it")
    return train(cfg, resume=resume, overrides_text=" ".join(overrides) or None)
