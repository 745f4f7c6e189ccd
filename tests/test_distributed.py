"""Two real processes over gloo: the DINO and iBOT centres are updated with the all-reduced batch mean, so both ranks
hold the same centre, equal to the formula on the concatenated global batch."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sslpipe.losses.dino import DINOLoss
from sslpipe.losses.ibot import IBOTLoss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-specific teacher outputs (different per rank, reproducible from the rank)."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(6, 5, generator=g), torch.randn(4, 7, generator=g), torch.randn(4, 3, 7, generator=g)


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    dino_teacher, ibot_cls, ibot_patch = _batches(rank)
    dino = DINOLoss(5, center_momentum=0.9)
    dino.update_center(dino_teacher)
    ibot = IBOTLoss(7, 7, n_global=2, n_local=0, center_momentum=0.9, center_momentum2=0.9)
    ibot.update_center(ibot_cls, ibot_patch)
    torch.save({"dino": dino.center, "cls": ibot.center, "patch": ibot.center2}, f"{out}/rank{rank}.pt")
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
