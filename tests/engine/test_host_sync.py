"""No host synchronisation inside a training step (issue 36): `train_step` of each teacher-student recipe, as the
trainer runs it between two log lines, never makes the host wait for the device.

On the CPU the test spies on the operations whose output shape depends on the data (boolean indexing, `nonzero`,
`masked_select`, `unique`, `repeat_interleave` without `output_size`): on a GPU each one waits for the device to count
its result. On CUDA the steps also run under `torch.cuda.set_sync_debug_mode("error")`, which catches every other
synchronisation too (`.item()`, a device-to-host copy, a blocking host-to-device copy). The spy does not see
everything (calls nested inside an op it already saw, backward ops, `bincount`): the CUDA run is the full check.
SimCLR is not here: lightly's NTXentLoss, which it uses, selects the negatives with a boolean mask.
"""
from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers import REPO
from torch.overrides import TorchFunctionMode

from sslpipe.engine.optim import build_optimizer
from sslpipe.engine.prefetch import prefetch_to_device
from sslpipe.engine.schedules import Schedules
from sslpipe.engine.trainer import train_step
from sslpipe.recipes import get_recipe, load_config

DATA_DEPENDENT = {torch.nonzero, torch.Tensor.nonzero, torch.masked_select, torch.Tensor.masked_select, torch.unique,
                  torch.Tensor.unique, torch.argwhere}


def _boolean_index(args: tuple) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class DataDependentShapes(TorchFunctionMode):
    """Records every call whose output shape depends on tensor values, with the sslpipe line that made it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        hit = (func in DATA_DEPENDENT
               or (func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _boolean_index(args))
               or (func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) and "output_size" not in kwargs
                   and len(args) > 1 and isinstance(args[1], torch.Tensor))
               or (func is torch.where and len(args) + len(kwargs) == 1))
        if hit:
            ours = [f for f in traceback.extract_stack()[:-1] if "/sslpipe/" in f.filename]
            where = f"{ours[-1].filename.split('/sslpipe/')[-1]}:{ours[-1].lineno}" if ours else "outside sslpipe"
            self.calls.append(f"{getattr(func, '__name__', func)} at {where}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("recipe, extra", [
    ("demo_dino.yaml", []),
    ("demo_ibot.yaml", []),
    ("demo_dinov2.yaml", []),
    ("demo_dinov2.yaml", ["dinov2.pad_masked_patches=true"]),  # static shapes, for a compiled step
    ("demo_dinov2.yaml", ["dinov2.pack_crops=true", "crops.global_size=32", "crops.local_size=16", "crops.n_local=4",
                          "dinov2.mask_ratio_min_max=[0.1,0.5]"]),  # the demo's multi-crop recipe, packed
    ("demo_dinov3.yaml", ["dinov3.gram.load_at=0"]),
    ("demo_ibot.yaml", ["crops.backend=device"]),  # the crops cut and coloured on the device, in the step
    ("demo_ibot.yaml", ["ibot.pack_crops=true"]),
])
def test_a_training_step_never_waits_for_the_device(recipe: str, extra: list[str], digits_shards: Path,
                                                   trainer_device: str, fresh_accelerate_state: None) -> None:
    cfg = load_config(REPO / "recipes" / recipe, [f"data.train={digits_shards}", "data.batch_size=8",
                                                  "data.num_workers=0", "train.health_every=0", *extra])
    accelerator = Accelerator(cpu=trainer_device == "cpu")
    built = get_recipe(cfg.method)(cfg)
    built.build(accelerator)
    built.student.to(accelerator.device)
    optimizer = build_optimizer(cfg, built.param_groups())
    built.student, optimizer = accelerator.prepare(built.student, optimizer)
    sched = Schedules(cfg, 10, 1, recipe=built.schedule)
    batches = prefetch_to_device(iter(built.train_loader(0, 0, 1)), accelerator.device)
    train_step(accelerator, built, optimizer, [next(batches)], sched(0), cfg)  # first step: lazy state, Gram snapshot
    steps = [next(batches) for _ in range(2)]
    if trainer_device == "cuda":
        torch.cuda.synchronize()
    spy = DataDependentShapes()
    with spy:
        if trainer_device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            for it, batch in enumerate(steps, start=1):
                losses, _ = train_step(accelerator, built, optimizer, [batch], sched(it), cfg)
        finally:
            if trainer_device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    assert spy.calls == [], f"data-dependent shapes in the step (each a device sync on a GPU): {spy.calls}"
    assert torch.isfinite(torch.stack(losses)).all()


def test_the_spy_sees_what_waits_for_a_gpu() -> None:
    x, mask = torch.randn(4, 3), torch.tensor([True, False, True, False])
    spy = DataDependentShapes()
    with spy:
        x[mask], x.nonzero(), torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2]))
        x.index_select(0, torch.tensor([0, 2])), torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2]),
                                                                        output_size=3)
    assert [c.split(" at ")[0] for c in spy.calls] == ["__getitem__", "nonzero", "repeat_interleave"]
