"""The process group of a run, checked against what the launcher started.

`accelerate launch` with a multi-process launch file starts N processes through torchrun, which sets WORLD_SIZE and
LOCAL_RANK; but accelerate passes a launch file's `use_cpu: true` on to the processes only from its single-process
launcher (as ACCELERATE_USE_CPU). On a machine without a GPU each of the N processes then finds no GPU backend and
builds a 1-process state: N independent runs writing one run directory (issue 21); on a machine with fewer GPUs than
processes NCCL refuses two processes on one GPU. So a torchrun launch (LOCAL_RANK set) on a machine with fewer
accelerators than local processes runs its processes on the CPU over gloo, as `launch/cpu_2proc.yaml` means (with a
notice when GPUs are present), and a launcher's WORLD_SIZE that differs from the processes Accelerate sees stops the
run at once.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env


class LaunchMismatch(ValueError):
    """The launcher started a different number of processes than Accelerate sees: each would train alone."""


def accelerator_count() -> int:
    """Accelerators this process can see (0 without one)."""
    return torch.accelerator.device_count() if torch.accelerator.is_available() else 0


def too_few_accelerators() -> bool:
    """A torchrun launch with more processes on this machine (LOCAL_WORLD_SIZE) than accelerators: one per process
    is impossible (NCCL refuses two processes on one GPU), and none means each process would build a 1-process
    state."""
    if "LOCAL_RANK" not in os.environ:
        return False
    local = os.environ.get("LOCAL_WORLD_SIZE", "1").strip()
    return (int(local) if local.isdigit() else 1) > accelerator_count()


def use_cpu() -> bool:
    """ACCELERATE_USE_CPU when it is set; otherwise True for a torchrun launch with fewer accelerators than local
    processes (the only way such a launch becomes one job rather than N, or runs at all)."""
    return parse_flag_from_env("ACCELERATE_USE_CPU", too_few_accelerators())


def process_state(timeout: timedelta) -> tuple[PartialState, bool]:
    """The process group of this run (collectives wait up to `timeout`) and whether it runs on the CPU.

    Raises `LaunchMismatch` before anything is written when WORLD_SIZE (set by torchrun, SLURM wrappers, mpirun
    scripts) is not the number of processes Accelerate sees.
    """
    launched = os.environ.get("WORLD_SIZE")  # read first: a CPU process group rewrites it
    cpu = use_cpu()
    if cpu and "ACCELERATE_USE_CPU" not in os.environ and accelerator_count() and os.environ.get("LOCAL_RANK") == "0":
        print(f"sslpipe: {os.environ.get('LOCAL_WORLD_SIZE')} processes on this machine but {accelerator_count()} "
              "GPU(s): the run uses the CPU (gloo). To train on the GPUs launch at most one process per GPU "
              "(--num_processes, or a launch file such as launch/8gpu_ddp.yaml with num_processes set to the GPUs).",
              file=sys.stderr, flush=True)
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
