"""launch/slurm.sbatch hands the recipe and the overrides to `sslpipe train` as given: the task's shell reads the
command line a second time, and must neither split a value with spaces nor expand a brace pattern of shards (one
`data.train=` per shard, of which the last would win: a job training on one shard). Run as tests/engine/test_launch.py
runs it, with stand-ins for srun, scontrol and accelerate."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from accelerate.commands.launch import launch_command_parser

REPO = Path(__file__).resolve().parents[2]

SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-a01\\ngpu-a02\\n'; else echo "$@" >> "$SHIM_LOG/scontrol.log"; fi
"""
# srun runs its command (what follows its own --options) once per node, as srun does
SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do SLURM_NODEID=$node "$@" & done
wait
"""
ACCELERATE = """#!/bin/bash
printf '%s\\0' "$@" > "$SHIM_LOG/accelerate_node$SLURM_NODEID.args"
"""


def _launch(tmp_path: Path, recipe: str, overrides: list[str]) -> list[list[str]]:
    """Run the sbatch script; the argument vector `sslpipe train` gets on each of the 2 nodes."""
    log, bin_dir = tmp_path / "log", tmp_path / "bin"
    log.mkdir()
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN), ("accelerate", ACCELERATE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if k not in ("GPUS_PER_NODE", "SLURM_GPUS_ON_NODE")},
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SHIM_LOG": str(log),
           "SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_JOB_ID": "1234", "SLURM_JOB_NUM_NODES": "2",
           "STOP_FILE": str(tmp_path / "stop $HOME"), "HOME": str(tmp_path / "home")}
    done = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), recipe, *overrides], cwd=tmp_path, env=env,
                          timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    argvs = []
    for node in (0, 1):
        argv = (log / f"accelerate_node{node}.args").read_text().split("\0")[:-1]
        args = launch_command_parser().parse_args(argv[1:])
        assert argv[0] == "launch" and args.module and args.training_script == "sslpipe"
        assert args.machine_rank == node
        argvs.append(args.training_script_args)
    return argvs


def test_overrides_reach_sslpipe_intact(tmp_path: Path) -> None:
    overrides = ["data.train=/data/in1k/train-{000000..000002}.tar",  # README's brace form: one pattern
                 "model.kwargs={reg_tokens: 4}",  # a space: one argument
                 "run_name=a;b $(touch pwned) *",  # shell syntax: text
                 "data.val=pipe:aws s3 cp s3://b/val-{0..3}.tar -"]
    recipe = "my recipes/ibot vit.yaml"
    for argv in _launch(tmp_path, recipe, overrides):
        assert argv == ["train", recipe, "--resume", "auto", f"train.stop_file={tmp_path / 'stop $HOME'}",
                        *overrides]
    assert not (tmp_path / "pwned").exists()
