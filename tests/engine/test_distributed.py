"""Two real processes over gloo: the DINO, iBOT and DINOv2 centres are updated with the all-reduced batch mean (DINOv2's
patch centre: the mean of the processes' means), so both ranks hold the same centre, equal to the official formula."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import child_env

from sslpipe.losses.dino import DINOLoss
from sslpipe.losses.dinov2 import DINOv2Loss
from sslpipe.losses.ibot import IBOTLoss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-specific teacher outputs (different per rank, reproducible from the rank)."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(6, 5, generator=g), torch.randn(4, 7, generator=g), torch.randn(4, 3, 7, generator=g)


def _masked(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8 masked patch rows of a rank with its padding weights: 3 counted on rank 0, 6 on rank 1."""
    g = torch.Generator().manual_seed(200 + rank)
    weight = torch.zeros(8)
    weight[: 3 + 3 * rank] = 1.0
    return torch.randn(8, 7, generator=g), weight


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    dino_teacher, ibot_cls, ibot_patch = _batches(rank)
    dino = DINOLoss(5, center_momentum=0.9)
    dino.record_center(dino_teacher)
    dino.update_center()
    ibot = IBOTLoss(7, 7, n_global=2, n_local=0, center_momentum=0.9, center_momentum2=0.9)
    ibot.record_center(ibot_cls, ibot_patch)
    ibot.update_center()
    # DINOv2's patch centre: the mean of each process's mean masked row (official ibot_patch_loss.py), the ranks
    # holding 3 and 6 masked rows (weights 0: padding), over two batches of a step
    v2 = DINOv2Loss(5, 7, n_global=2, n_local=0, centering="softmax")
    rows, weight = _masked(rank)
    v2.record_center(dino_teacher[:3], rows[:4], weight[:4])
    v2.record_center(dino_teacher[3:], rows[4:], weight[4:])
    v2.update_center()
    torch.save({"dino": dino.center, "cls": ibot.center, "patch": ibot.center2, "v2_cls": v2.center,
                "v2_patch": v2.center2}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_centres_are_all_reduced_means(tmp_path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    both = [_batches(r) for r in range(2)]
    dino_mean = torch.cat([b[0] for b in both]).mean(0, keepdim=True)
    cls_mean = torch.cat([b[1] for b in both]).mean(0, keepdim=True)
    patch_mean = torch.cat([b[2].mean(1) for b in both]).mean(0, keepdim=True).unsqueeze(1)
    for got in ranks:  # centre starts at 0: C = 0.9 * 0 + 0.1 * global mean
        torch.testing.assert_close(got["dino"], 0.1 * dino_mean)
        torch.testing.assert_close(got["cls"], 0.1 * cls_mean)
        torch.testing.assert_close(got["patch"], 0.1 * patch_mean)
    assert not torch.allclose(0.1 * both[0][0].mean(0, keepdim=True), ranks[0]["dino"]), "not the local mean"
    per_rank = [rows[weight > 0].mean(0) for rows, weight in map(_masked, range(2))]
    for got in ranks:
        torch.testing.assert_close(got["v2_cls"], 0.1 * dino_mean)
        torch.testing.assert_close(got["v2_patch"].view(-1), 0.1 * (per_rank[0] + per_rank[1]) / 2)


@pytest.mark.slow
def test_two_process_dino_run_under_accelerate_launch(digits_shards: Path, tmp_path: Path) -> None:
    """The command launch/cpu_2proc.yaml documents, verbatim and without ACCELERATE_USE_CPU (issue 21: it used to
    start two 1-process jobs), runs ONE 2-process job: the real DINO recipe over gloo, both ranks see different data
    yet end with identical student, teacher and centre (gradients and centres are all-reduced)."""
    repo = Path(__file__).resolve().parents[2]
    usage = next(line for line in (repo / "launch/cpu_2proc.yaml").read_text().splitlines() if "Usage:" in line)
    documented = "OMP_NUM_THREADS=1 accelerate launch --config_file launch/cpu_2proc.yaml -m sslpipe train RECIPE.yaml"
    assert usage.split("Usage: ", 1)[1] == documented
    env = child_env(OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/cpu_2proc.yaml", "-m",
           "sslpipe", "train", "recipes/demo_dino.yaml",
           "method=tests.workers.ddp_dino:CheckedDINO", f"data.train={digits_shards}", "data.batch_size=8",
           "data.num_workers=0", "data.steps_per_epoch=2", "train.epochs=1", "eval.every_epochs=1",
           f"output_dir={tmp_path}", "run_name=ddp"]
    proc = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scale = [line for line in proc.stdout.splitlines() if "process(es) x batch" in line]
    assert len(scale) == 1 and scale[0].startswith("2 process(es) x batch 8"), proc.stdout[-2000:]
    assert proc.stdout.count(f"run directory: {tmp_path / 'ddp'}") == 1, "once per job"
    run = tmp_path / "ddp"
    state = json.loads(next((run / "checkpoints").glob("step_*/trainer_state.json")).read_text())
    assert state["world_size"] == 2 and state["global_step"] == 2
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in lines if "loss" in r] == [2], "one job's metrics, not two interleaved"
    ranks = [(run / f"state_rank{r}.txt").read_text() for r in (0, 1)]
    assert ranks[0] == ranks[1] and float(ranks[0].split()[1]) > 0


def test_child_processes_keep_the_parent_pythonpath(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine that needs its own PYTHONPATH entries (e.g. a project on PYTHONPATH instead of installed) keeps them
    in `accelerate launch` children: the repository is prepended, nothing is replaced."""
    extra = tmp_path / "site"
    extra.mkdir()
    (extra / "marker_module.py").write_text("VALUE = 7\n")
    kept = os.environ.get("PYTHONPATH")  # a machine whose dependencies live on PYTHONPATH keeps them too
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(extra), *([kept] if kept else [])]))
    code = "import marker_module, sslpipe, tests.workers.toy_recipe; print(marker_module.VALUE)"
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "7", proc.stderr
