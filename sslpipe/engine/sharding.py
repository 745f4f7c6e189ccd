"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the teacher-student recipes: the switch in the launch file, the
sharding itself, and the whole modules an evaluation needs.

A launch file with `distributed_type: FSDP` and `fsdp_version: 2` (launch/8gpu_fsdp.yaml, launch/cpu_2proc_fsdp.yaml)
makes `accelerate launch` export ACCELERATE_USE_FSDP=true and FSDP_VERSION=2 to its processes. sslpipe takes that as
its switch and shards the run itself, before Accelerate reads it, for two reasons:
- accelerate's FSDP plugin shards only the model it prepares, the student. The official DINOv2 code shards the EMA
  teacher alike (its `SSLMetaArch` under FSDP), so that every process averages its own slice with no communication;
  that needs the teacher's parameters sharded exactly as the student's (`Recipe.sharded_modules`);
- accelerate runs FSDP on GPUs only, so a 2-process CPU test (gloo) could not run the code the GPUs run.
Accelerate then drives the processes as in a DDP run (autocast, the optimizer wrapper) but never wraps the student.

Each transformer block (any module in a `blocks` list) is one unit, and the whole network the outer unit (its
patch embedding, tokens and heads), DINOv2's wrapping. Parameters stay fp32 and `train.mixed_precision` autocasts,
as in a DDP run, so a sharded run computes what a DDP run computes, up to the order of float sums. Checkpoints hold
whole tensors in the usual files (`sslpipe.weights.sharded_state`).

Read from the launch file: `fsdp_reshard_after_forward` (true, the default: parameters gathered again for the
backward, least memory, ZeRO-3; false: kept from forward to backward, ZeRO-2). Refused: `fsdp_version: 1`,
`fsdp_offload_params` or `fsdp_activation_checkpointing` set to true, and fp16 (its loss scaler would see only each
process's slice of the gradients, so processes could disagree on skipping a step: use bf16). The other `fsdp_*` keys
(wrap policy, state-dict type, prefetch, RAM-efficient loading) are accelerate's own and not read.

Not sharded: activations, and under bf16 autocast the bf16 copies of the weights it keeps for the backward (about
half the fp32 network per process; FSDP2's `MixedPrecisionPolicy` would shard them too, at the price of computing
otherwise than a DDP run). Every process builds the whole networks before sharding them and reads whole checkpoint
files: host memory of a few copies of the model per machine.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

_LAUNCH_KEYS = ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_RESHARD_AFTER_FORWARD", "FSDP_OFFLOAD_PARAMS",
                "FSDP_ACTIVATION_CHECKPOINTING")
_NOT_RUN = {"FSDP_OFFLOAD_PARAMS": "fsdp_offload_params",
            "FSDP_ACTIVATION_CHECKPOINTING": "fsdp_activation_checkpointing"}


@dataclass(frozen=True)
class Sharding:
    """FSDP2 as the launch file asked for it."""

    reshard_after_forward: bool = True


def sharding_from_launcher() -> Sharding | None:
    """The launch file's FSDP request (None for DDP or one process), taken out of the environment so that
    Accelerate does not wrap the student itself. Raises ValueError for what sslpipe does not run."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    env = {k: os.environ.pop(k, None) for k in _LAUNCH_KEYS}
    if (env["FSDP_VERSION"] or "1") != "2":
        raise ValueError(f"the launch file asks for FSDP version {env['FSDP_VERSION'] or 1}: sslpipe shards with "
                         "FSDP2 only (fully_shard; the EMA teacher sharded like the student). Set `fsdp_version: 2` "
                         "in its fsdp_config (see launch/8gpu_fsdp.yaml)")
    for variable, key in _NOT_RUN.items():
        if (env[variable] or "false").lower() == "true":
            raise ValueError(f"the launch file sets {key}: true, which sslpipe does not run sharded: set it to false "
                             "(see launch/8gpu_fsdp.yaml)")
    return Sharding(reshard_after_forward=(env["FSDP_RESHARD_AFTER_FORWARD"] or "true").lower() == "true")


def shard(modules: list[nn.Module], device: torch.device, sharding: Sharding) -> None:
    """Move each module to `device` and shard it in place over all processes: every block of a `blocks` list one
    unit, then the module. The modules are sharded alike, so equal names hold equal slices on each process. Only the
    first (the student) follows `reshard_after_forward`: the others run forward only (no backward would reshard
    them), so they are resharded after every forward, and the EMA update finds them in slices."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module, reshard in zip(modules, _reshard_after_forward(len(modules), sharding)):
        module.to(device)
        for name, child in list(module.named_modules()):
            if name.rsplit(".", 1)[-1] == "blocks" and isinstance(child, (nn.ModuleList, nn.Sequential)):
                for block in child:
                    fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard)


def _reshard_after_forward(count: int, sharding: Sharding) -> list[bool]:
    return [sharding.reshard_after_forward] + [True] * (count - 1)


@contextmanager
def unsharded(modules: list[nn.Module], sharding: Sharding | None) -> Iterator[None]:
    """Every unit of the sharded `modules` gathered once and kept whole until the block ends, so that any part of
    them runs with no collective, e.g. the periodic kNN, where processes read different numbers of batches (a
    collective per forward would leave one waiting for another). A no-op without sharding or modules."""
    if sharding is None or not modules:
        yield
        return
    units = [unit for module in modules for unit in module.modules() if isinstance(unit, FSDPModule)]
    for unit in units:
        unit.unshard()
    for module in modules:
        module.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for module, reshard in zip(modules, _reshard_after_forward(len(modules), sharding)):
            module.set_reshard_after_forward(reshard)
        for unit in units:
            unit.reshard()
