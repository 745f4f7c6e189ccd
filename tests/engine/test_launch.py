"""The SLURM template, run with stand-ins for srun/scontrol/accelerate: one valid `accelerate launch` per node, and a
time-limit warning (USR1) turns into a stop file and a requeue."""
from __future__ import annotations

import os
import re
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


class _Started(Exception):
    """Raised where `train` goes on past its start-up checks: the launch file was accepted."""


# The documented launches: (processes in all, machines, processes per machine, mixed precision the comment states).
LAUNCHES = {"1gpu.yaml": (1, 1, None, "fp16"), "8gpu_ddp.yaml": (8, 1, 8, "fp16"), "8gpu_fsdp.yaml": (8, 1, 8, "bf16"),
            "cpu_2proc.yaml": (2, 1, 2, "no"), "cpu_2proc_fsdp.yaml": (2, 1, 2, "no"),
            "multi_node.yaml": (16, 2, 8, "fp16"), "multi_node_c10d.yaml": (16, 2, 8, "fp16")}


@pytest.mark.parametrize("name", sorted(LAUNCHES))
def test_launch_files_are_accelerate_configs_that_sslpipe_starts_with(name: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Each launch file through accelerate's own parser, into the environment `accelerate launch` gives each process
    (its launcher's own functions), then through `sslpipe train`'s start-up checks (FSDP settings, method, fp16)
    with the recipe of the file's Usage line (recipes/demo_dinov2.yaml where it names none), as it is and with
    `train.mixed_precision=null` (the file's precision decides): accepted, with the documented process counts,
    precision and FSDP2 request."""
    from accelerate.commands.launch import _validate_launch_command
    from accelerate.utils.launch import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    from sslpipe.engine import trainer
    from sslpipe.recipes import load_config

    text = (REPO / "launch" / name).read_text()
    usage = re.search(r"Usage.*?-m sslpipe train (\S+)", text)
    recipe = usage.group(1) if usage and usage.group(1) != "RECIPE.yaml" else "recipes/demo_dinov2.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(REPO / "launch" / name), "-m", "sslpipe",
                                               "train", recipe])
    args, _, _ = _validate_launch_command(args)
    if args.use_fsdp or args.multi_gpu:  # accelerate's own dispatch (launch_command) for these files
        env = prepare_multi_gpu_env(args)
    else:
        env = prepare_simple_launcher_cmd_env(args)[1]
    processes, machines, per_machine, precision = LAUNCHES[name]
    assert (args.num_processes, args.num_machines) == (processes, machines)
    assert getattr(args, "nproc_per_node", None) == (per_machine and str(per_machine))
    assert env["ACCELERATE_MIXED_PRECISION"] == precision and args.rdzv_backend in {"static", "c10d"}
    env = {k: v for k, v in env.items() if os.environ.get(k) != v}

    seen, check = [], trainer.sharding_from_launcher

    def kept_check() -> trainer.Sharding | None:  # sslpipe's own check; its answer kept
        seen.append(check())
        return seen[-1]

    def started(*_) -> None:  # the first thing `train` does after its checks
        raise _Started

    monkeypatch.setattr(trainer, "sharding_from_launcher", kept_check)
    monkeypatch.setattr(trainer, "deterministic_mode", started)
    for overrides in ([], ["train.mixed_precision=null"]):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        cfg = load_config(REPO / recipe, [f"data.train={tmp_path}", f"output_dir={tmp_path}", *overrides])
        with pytest.raises(_Started):
            trainer.train(cfg)
    expected = trainer.Sharding(reshard_after_forward=True) if args.use_fsdp else None
    assert seen == [expected, expected] and not list(tmp_path.iterdir())


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
