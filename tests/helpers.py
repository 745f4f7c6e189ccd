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


TINY_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 4, "img_size": 16, "dynamic_img_size": True}


def tiny_export(out: Path, seed: int = 0, in_chans: int = 3) -> Path:
    """A one-block ViT on 16-px crops, exported (seeded: two seeds are two backbones). `in_chans` other than 3 is
    written by hand: `export_backbone` checks its export on RGB input, which such a model cannot take."""
    import json

    import timm
    from safetensors.torch import save_file

    from sslpipe.weights.export import export_backbone
    from sslpipe.weights.hashing import sha256_file

    torch.manual_seed(seed)
    args = {**TINY_VIT, **({"in_chans": in_chans} if in_chans != 3 else {})}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args)
    common = {"img_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3}
    if in_chans == 3:
        return export_backbone(model, out, arch="vit_tiny_patch16_224", model_args=args, source={"which": "test"},
                               **common)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    config = {"format": "sslpipe-backbone/1", "architecture": "vit_tiny_patch16_224",
              "model_args": {**args, "num_classes": 0}, **common, "source": {"which": "test"},
              "sha256": {"model.safetensors": sha256_file(out / "model.safetensors")}}
    (out / "config.json").write_text(json.dumps(config))
    return out


def one_line_error(argv: list[str], capsys) -> str:
    """Run `sslpipe ARGV`: exit status 2 and one error line on stderr (progress bars before it aside); returns it."""
    from sslpipe.cli import main

    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]
