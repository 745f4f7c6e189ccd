"""`sslpipe bench loaded-step`: is the loader the bottleneck? The trainer's step fed by the real loader from shards
against the same step on one synthetic batch already in host memory, one after the other in one process.

"Fed" is what a training run does per iteration: the recipe's loader (its `data.num_workers` workers decode, crop
and mask; `crops.backend` says where the crops are cut) hands a batch over, `prefetch_to_device` copies it, then
`train_step`. "Synthetic" is `sslpipe bench step`'s batch: the same crops and masks, made once, so the step never
waits for data. Each runs untimed warm-up steps, then `steps` timed ones, and the rate is images over the whole timed
stretch, so that a loader stall counts. The fed side's warm-up is at least 2 x workers + 2 steps: at start every
worker delivers its first batches at once (up to `prefetch_factor` = 2 each), a burst that would otherwise be timed
as free steps. ratio = fed rate / synthetic rate: 1.0 means the loader keeps up; the issue 36 goal is >= 0.9. Where
a CPU cannot keep up, `crops.backend=device` cuts the crops on the accelerator (its cropping is then part of the
fed step).
The loader draws its shards with replacement (`data.resampled`): a small photo set would otherwise end its pass over
the shards, and restart its workers, inside the timed stretch, which a long epoch of a real run does once.
"""
from __future__ import annotations

import itertools
import os
import time
from typing import Any, Sequence

import torch

from sslpipe.bench.step import prepared_step, synthetic_batch


def _rate(step: Any, batches: Any, warmup: int, steps: int, batch_size: int, device: torch.device
          ) -> tuple[float, int]:
    """(images per second, steps timed) over up to `steps` timed steps after `warmup` untimed ones, the device
    drained at both ends."""
    for batch in itertools.islice(batches, warmup):
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    done = 0
    for batch in itertools.islice(batches, steps):
        step(batch)
        done += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return done * batch_size / (time.perf_counter() - start), done


def _workers_started(loader: Any, asked: int) -> int:
    """The DataLoader worker processes a recipe's loader really starts (`build_loader` starts no more than the
    rank's shards); `asked` for a loader that is no `StreamLoader` and holds none."""
    from sslpipe.data.stream import StreamLoader

    parts = [loader] if isinstance(loader, StreamLoader) else [
        v for v in getattr(loader, "__dict__", {}).values() if isinstance(v, StreamLoader)]
    return sum(p.loader.num_workers for p in parts) if parts else asked


def run_loaded_step_bench(recipe_path: str, data: str | None, *, device: str | None = None,
                          batch_size: int | None = None, steps: int = 50, warmup: int = 5,
                          mixed_precision: str | None = None, overrides: Sequence[str] = (),
                          photos: int | None = None) -> dict[str, Any]:
    """Time the trainer's step fed from the shards in `data` and on a synthetic batch; see the module docstring.
    With `photos`, first write that many photographs as 32 shards (one at least for each loader worker) into `data`
    (default runs/bench_photos), once the recipe and overrides have loaded."""
    from sslpipe.engine.prefetch import prefetch_to_device
    from sslpipe.engine.trainer import train_step
    from sslpipe.recipes import load_config

    asked = load_config(recipe_path, list(overrides)).data.num_workers
    from sslpipe.bench.photos import bench_shards

    data = bench_shards(data, photos, samples_per_shard=max(1, (photos or 0) // 32))
    cfg, dev, accelerator, recipe, optimizer, sched = prepared_step(
        recipe_path, device=device, batch_size=batch_size, mixed_precision=mixed_precision,
        overrides=[*overrides, f"data.train={data}",  # re-read; enough batches for the longest warm-up
                   f"data.steps_per_epoch={max(warmup, 2 * asked + 2) + steps}",
                   "data.resampled=true"])  # no pass ends (and restarts its workers) inside the timed stretch
    B = cfg.data.batch_size
    # the epoch whose masks the synthetic batch has (iBOT's begin at masking.pred_start_epoch)
    epoch = max(recipe.section.masking.pred_start_epoch, 0) if recipe.uses_masks else 0

    def step(batch: Any) -> None:
        train_step(accelerator, recipe, optimizer, [batch], sched, cfg)

    fixed = synthetic_batch(cfg, recipe, B, seed=cfg.seed)
    if dev.type == "cuda":
        fixed = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in fixed.items()}
    synthetic, _ = _rate(step, itertools.repeat(fixed), warmup, steps, B, dev)
    loader = recipe.train_loader(epoch, 0, 1)
    workers = _workers_started(loader, asked)
    fed_warmup = max(warmup, 2 * workers + 2)
    loaded, loaded_steps = _rate(step, prefetch_to_device(iter(loader), dev), fed_warmup, steps, B, dev)
    result = {"recipe": recipe_path, "data": data, "device": str(dev), "batch_size": B, "steps": steps,
              "num_workers": workers, "num_workers_asked": asked, "fed_warmup": fed_warmup,
              "crops_backend": cfg.crops.backend,
              "cpu_count": os.cpu_count(),
              "crops": f"{cfg.crops.n_global}x{cfg.crops.global_size} + {cfg.crops.n_local}x{cfg.crops.local_size}",
              "mixed_precision": accelerator.mixed_precision, "synthetic_img_s": synthetic, "loaded_img_s": loaded,
              "loaded_steps": loaded_steps,
              "ratio_loaded_over_synthetic": loaded / synthetic}
    result["table"] = (f"fed from shards {loaded:.1f} img/s, synthetic batch {synthetic:.1f} img/s: "
                       f"{loaded / synthetic:.2f}x ({dev}, batch {B}, {result['crops']}, {workers} workers"
                       f"{f' (of {asked} asked: no more than the shards)' if workers != asked else ''}, "
                       f"crops.backend={cfg.crops.backend}, precision {result['mixed_precision']})")
    return result
