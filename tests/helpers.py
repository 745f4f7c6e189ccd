"""Test helpers shared by several test files (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def child_env(**extra: str) -> dict[str, str]:
    """The parent's environment for a child process (`accelerate launch`, `python -m sslpipe`), with the repository
    prepended to PYTHONPATH (never replacing it: a machine may need its own entries there) and `extra` set."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def one_teacher_student_step(recipe, momentum: float = 0.996) -> tuple[torch.Tensor, dict]:
    """Build a teacher-student recipe (DINO, iBOT, DINOv2), take one AdamW step and one EMA update by hand; check
    the loss is finite, the teacher gets no gradient and the EMA moves it. Returns the detached loss and metrics."""
    from accelerate import Accelerator

    recipe.build(Accelerator(cpu=True))
    opt = torch.optim.AdamW([p for g in recipe.param_groups() for p in g["params"]], lr=1e-3)
    batch = next(iter(recipe.train_loader(0, 0, 1)))
    sched = {"teacher_temp": 0.04, "teacher_patch_temp": 0.04, "momentum": momentum, "it": 0}
    before = {k: v.clone() for k, v in recipe.teacher.state_dict().items()}
    loss, metrics = recipe.step(batch, sched)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in recipe.teacher.parameters()), "the teacher must receive no gradient"
    opt.step()
    recipe.after_optimizer_step(sched)
    assert any(not torch.equal(v, before[k]) for k, v in recipe.teacher.state_dict().items()), "EMA moved nothing"
    return loss.detach(), metrics


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """All samples of a shard as {key: {extension: bytes}}, keys in tar order (WebDataset: key = name up to 1st dot)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def read_split(out: Path, split: str) -> dict[str, dict[str, bytes]]:
    """Every sample of a split of a shard set, checked against the manifest's counts."""
    from sslpipe.data.manifest import read_manifest

    manifest = read_manifest(out)
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["splits"][split]["shards"]:
        part = read_tar(out / shard["name"])
        assert len(part) == shard["samples"]
        samples.update(part)
    return samples
