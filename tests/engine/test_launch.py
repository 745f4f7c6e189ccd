"""The SLURM template, run with stand-ins for srun/scontrol/accelerate: one valid `accelerate launch` per node, and a
time-limit warning (USR1) turns into a stop file and a requeue."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from accelerate.commands.launch import launch_command_parser

REPO = Path(__file__).resolve().parents[2]

SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-a01\\ngpu-a02\\n'; else echo "$@" >> "$SHIM_LOG/scontrol.log"; fi
"""
SRUN = """#!/bin/bash
echo "$@" >> "$SHIM_LOG/srun.log"
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do SLURM_NODEID=$node bash -c "${@: -1}" & done
wait
"""
ACCELERATE = """#!/bin/bash
printf '%s\\0' "$@" > "$SHIM_LOG/accelerate_node$SLURM_NODEID.args"
for ((i = 0; i < SHIM_WAIT * 10; i++)); do [ -e "$STOP_FILE" ] && exit 0; sleep 0.1; done
"""


def _shims(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN), ("accelerate", ACCELERATE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _run(tmp_path: Path, wait_s: int, send_usr1: bool, **slurm: str) -> tuple[int, Path]:
    log = tmp_path / "log"
    log.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k not in ("GPUS_PER_NODE", "SLURM_GPUS_ON_NODE")},
           "PATH": f"{_shims(tmp_path)}{os.pathsep}{os.environ['PATH']}", "SHIM_LOG": str(log),
           "SHIM_WAIT": str(wait_s), "SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_JOB_ID": "1234",
           "SLURM_JOB_NUM_NODES": "2", "STOP_FILE": str(tmp_path / "stop"), **slurm}
    proc = subprocess.Popen(["bash", str(REPO / "launch/slurm.sbatch"), "recipes/ibot_vit_small.yaml",
                             "run_name=in1k", "data.train=/data/in1k"], cwd=REPO, env=env)
    if send_usr1:
        deadline = time.time() + 30
        while len(list(log.glob("accelerate_node*.args"))) < 2 and time.time() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` does before the time limit
    return proc.wait(timeout=60), log


def test_sbatch_starts_one_valid_accelerate_launch_per_node(tmp_path: Path) -> None:
    status, log = _run(tmp_path, wait_s=0, send_usr1=False)
    assert status == 0
    for node in (0, 1):
        argv = (log / f"accelerate_node{node}.args").read_text().split("\0")[:-1]
        assert argv[0] == "launch"
        args = launch_command_parser().parse_args(argv[1:])
        assert (REPO / args.config_file).is_file()
        assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 16, node)
        assert args.main_process_ip == "gpu-a01" and args.main_process_port == 20000 + 1234
        assert args.module and args.training_script == "sslpipe"
        assert args.training_script_args[:4] == ["train", "recipes/ibot_vit_small.yaml", "--resume", "auto"]
        assert f"train.stop_file={tmp_path / 'stop'}" in args.training_script_args
        assert args.training_script_args[-2:] == ["run_name=in1k", "data.train=/data/in1k"]
    assert not (log / "scontrol.log").exists(), "no requeue without a time-limit warning"


def test_sbatch_starts_one_process_per_allocated_gpu(tmp_path: Path) -> None:
    """`sbatch --gpus-per-node=4`: 4 processes per node, not the template's 8 (8 on 4 GPUs trained on the CPU)."""
    status, log = _run(tmp_path, wait_s=0, send_usr1=False, SLURM_GPUS_ON_NODE="4")
    assert status == 0
    argv = (log / "accelerate_node0.args").read_text().split("\0")[:-1]
    assert launch_command_parser().parse_args(argv[1:]).num_processes == 8  # 2 nodes x 4


def test_time_limit_warning_checkpoints_and_requeues(tmp_path: Path) -> None:
    status, log = _run(tmp_path, wait_s=20, send_usr1=True)
    assert status == 0
    assert (log / "scontrol.log").read_text().split() == ["requeue", "1234"]
    assert not (tmp_path / "stop").exists(), "the stop file is removed for the requeued job"


@pytest.mark.parametrize("name", ["1gpu.yaml", "8gpu_ddp.yaml", "8gpu_fsdp.yaml", "cpu_2proc.yaml",
                                  "cpu_2proc_fsdp.yaml", "multi_node.yaml", "multi_node_c10d.yaml"])
def test_launch_files_are_accelerate_configs(name: str) -> None:
    import yaml

    cfg = yaml.safe_load((REPO / "launch" / name).read_text())
    assert cfg["distributed_type"] in {"NO", "MULTI_GPU", "FSDP"} and cfg["num_processes"] >= 1
    assert cfg.get("rdzv_backend", "static") in {"static", "c10d"}


@pytest.mark.parametrize("env, gpus, expected", [
    ({}, 0, False),                                              # plain `sslpipe train`: Accelerate decides
    ({"LOCAL_RANK": "0"}, 0, True),                              # torchrun (cpu_2proc.yaml) without a GPU: gloo
    ({"LOCAL_RANK": "0"}, 1, False),                             # torchrun on GPUs
    ({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, 2, False),    # one GPU per process
    ({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, 1, True),     # cpu_2proc.yaml on a 1-GPU host: NCCL would refuse
    ({"LOCAL_RANK": "0", "ACCELERATE_USE_CPU": "0"}, 0, False),  # an explicit setting wins
    ({"ACCELERATE_USE_CPU": "1"}, 1, True),
])
def test_a_torchrun_launch_with_fewer_gpus_than_processes_runs_on_the_cpu(monkeypatch: pytest.MonkeyPatch,
                                                                           env: dict[str, str], gpus: int,
                                                                           expected: bool) -> None:
    """accelerate passes a launch file's `use_cpu` only to its 1-process launcher; the trainer reads the launch
    from torchrun's LOCAL_RANK and LOCAL_WORLD_SIZE instead (launch/cpu_2proc.yaml, issue 21): fewer GPUs than
    local processes means the CPU."""
    from sslpipe.engine import processes

    for var in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(processes.torch.accelerator, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(processes.torch.accelerator, "device_count", lambda: gpus)
    assert processes.use_cpu() is expected
