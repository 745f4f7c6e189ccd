"""The process group of a run, checked against what the launcher started.

`accelerate launch` with a multi-process launch file starts N processes through torchrun, which sets WORLD_SIZE and
LOCAL_RANK; but accelerate passes a launch file's `use_cpu: true` on to the processes only from its single-process
launcher (as ACCELERATE_USE_CPU). On a machine without a GPU each of the N processes then finds no GPU backend and
builds a 1-process state: N independent runs writing one run directory (issue 21). So a torchrun launch (LOCAL_RANK
set) on a machine without an accelerator runs its processes on the CPU over gloo, as `launch/cpu_2proc.yaml` means,
and a launcher's WORLD_SIZE that differs from the processes Accelerate sees stops the run at once.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env


class LaunchMismatch(ValueError):
    """The launcher started a different number of processes than Accelerate sees: each would train alone."""


def use_cpu() -> bool:
    """ACCELERATE_USE_CPU when it is set; otherwise True for a torchrun launch on a machine without an accelerator
    (the only way such a launch becomes one job rather than N)."""
    launched_by_torchrun = "LOCAL_RANK" in os.environ
    return parse_flag_from_env("ACCELERATE_USE_CPU", launched_by_torchrun and not torch.accelerator.is_available())


def process_state(timeout: timedelta) -> tuple[PartialState, bool]:
    """The process group of this run (collectives wait up to `timeout`) and whether it runs on the CPU.

    Raises `LaunchMismatch` before anything is written when WORLD_SIZE (set by torchrun, SLURM wrappers, mpirun
    scripts) is not the number of processes Accelerate sees.
    """
    launched = os.environ.get("WORLD_SIZE")  # read first: a CPU process group rewrites it
    cpu = use_cpu()
    state = PartialState(cpu=cpu, timeout=timeout)
    if launched is not None and launched.strip().isdigit() and int(launched) != state.num_processes:
        raise LaunchMismatch(
            f"the launcher started WORLD_SIZE={launched} processes but Accelerate sees {state.num_processes} "
            f"(distributed type {state.distributed_type.value}, device {state.device}, ACCELERATE_USE_CPU="
            f"{os.environ.get('ACCELERATE_USE_CPU', 'unset')}): each process would train alone on the same run "
            "directory, so none is started. On CPUs launch with `accelerate launch --config_file "
            "launch/cpu_2proc.yaml ...` and leave ACCELERATE_USE_CPU unset (or set it to 1); on GPUs check that every "
            "process sees a GPU (CUDA_VISIBLE_DEVICES, torch.cuda.is_available()); outside a launcher unset "
            "WORLD_SIZE"
        )
    return state, cpu
