"""The SimCLR recipe: views are paired right, the loss is the SimCLR NT-Xent (+ the Q-score term), a step trains,
`model.init_from` loads an export strictly, negatives are gathered across 2 gloo processes with gradients, and a
short run trains, checkpoints and exports end to end."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from sslpipe.recipes import get_recipe, load_config
from sslpipe.recipes.simclr import SimCLRRecipe, build_ntxent, collate_two_views

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(2)


def _cfg(digits_shards: Path, *extra: str):
    return load_config(RECIPES / "demo_simclr_qscore.yaml", [
        f"data.train={digits_shards}", f"data.val={digits_shards}", "data.batch_size=8", "data.num_workers=0",
        "data.shuffle_buffer=8", "model.init_from=null", *extra])


def hand_ntxent(z1: torch.Tensor, z2: torch.Tensor, T: float) -> torch.Tensor:
    """SimCLR eq. 1 averaged over all 2B anchors: -log exp(s(i, pos)/T) / sum_{k != i} exp(s(i, k)/T), s = cosine."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    sim = z @ z.T / T
    sim.fill_diagonal_(float("-inf"))
    pos = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, pos)


def test_recipe_is_registered_and_views_are_view_major() -> None:
    assert get_recipe("simclr") is SimCLRRecipe
    samples = [{"views": [torch.full((1, 2, 2), float(i)), torch.full((1, 2, 2), 10.0 + i)], "label": i}
               for i in range(3)]
    batch = collate_two_views(samples)
    assert batch["views"][:, 0, 0, 0].tolist() == [0, 1, 2, 10, 11, 12] and batch["labels"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("device", DEVICES)
def test_recipe_builds_and_takes_a_step(digits_shards: Path, device: str) -> None:
    cfg = _cfg(digits_shards)
    recipe = SimCLRRecipe(cfg)
    accelerator = Accelerator(cpu=device == "cpu")
    recipe.build(accelerator)
    recipe.student.to(accelerator.device)
    batch = next(iter(recipe.train_loader(0, 0, 1)))
    assert batch["views"].shape == (16, 3, 28, 28) and recipe.batch_size_of(batch) == 8  # the demo export's 28 px
    params = [p for g in recipe.param_groups() for p in g["params"]]
    assert len(params) == len([p for p in recipe.student.parameters() if p.requires_grad])
    before = {k: v.clone() for k, v in recipe.student.state_dict().items()}
    opt = torch.optim.AdamW(params, lr=1e-3)
    loss, metrics = recipe.step(batch, {"it": 0})
    assert torch.isfinite(loss)
    # the loss is NT-Xent + the Q-score term: recompute both from the same forward
    with torch.no_grad():  # train mode as in the step: the head's BatchNorm uses the batch statistics
        feats, proj = recipe.student(batch["views"].to(accelerator.device))
    z1, z2 = proj.chunk(2)
    assert metrics["ntxent"].item() == pytest.approx(hand_ntxent(z1, z2, cfg.simclr.temperature).item(), rel=1e-4)
    term, _ = recipe.qscore(feats)
    assert loss.item() == pytest.approx(metrics["ntxent"].item() + term.item(), rel=1e-4)
    assert {"qscore/term", "qscore/q_mean", "qscore/low_frac", "qscore/col_high_frac"} <= set(metrics)
    loss.backward()
    opt.step()
    moved = [k for k, v in recipe.student.state_dict().items() if not torch.equal(v, before[k].to(v.device))]
    assert any(k.startswith("backbone.") for k in moved) and any(k.startswith("head.") for k in moved)
    assert recipe.extra_state() == {} and recipe.backbone("teacher") is recipe.student.backbone


def test_without_qscore_the_loss_is_plain_ntxent(digits_shards: Path) -> None:
    recipe = SimCLRRecipe(_cfg(digits_shards, "simclr.qscore={enabled: false}"))
    recipe.build(Accelerator(cpu=True))
    assert recipe.qscore is None
    loss, metrics = recipe.step(next(iter(recipe.train_loader(0, 0, 1))), {"it": 0})
    assert loss.item() == metrics["ntxent"].item() and not any(k.startswith("qscore/") for k in metrics)


def test_init_from_export_loads_strictly_and_names_mismatches(digits_shards: Path, tmp_path: Path) -> None:
    from sslpipe.models.backbones import create_backbone
    from sslpipe.weights.export import export_backbone

    def export(name: str, embed_dim: int) -> Path:
        torch.manual_seed(123)
        kwargs = dict(embed_dim=embed_dim, depth=4, num_heads=4, init_values=0.1)  # the recipe's ViT, 28 px
        model = create_backbone("vit_tiny_patch16_224", img_size=28, patch_size=4, **kwargs)
        return export_backbone(model, tmp_path / name, arch="vit_tiny_patch16_224",
                               model_args=dict(kwargs, img_size=28, patch_size=4), img_size=28, mean=(0.5,) * 3,
                               std=(0.5,) * 3, source={"test": name})

    good = export("good", 128)
    recipe = SimCLRRecipe(_cfg(digits_shards, f"model.init_from={good}"))
    recipe.build(Accelerator(cpu=True))
    from safetensors.torch import load_file

    saved = load_file(str(good / "model.safetensors"))
    state = recipe.student.backbone.state_dict()
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in saved)

    bad = export("bad", 64)
    with pytest.raises(ValueError, match=r"export .*bad .*shape export vs backbone: "
                                         r"blocks.0.attn.proj.bias \(64,\) vs \(128,\)"):
        SimCLRRecipe(_cfg(digits_shards, f"model.init_from={bad}")).build(Accelerator(cpu=True))


# ------------------------------------------------------------------------------------- 2 processes (gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)


def _projector() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(6, 4)


def _worker(rank: int, port: int, out: str, cfg_path: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = load_config(cfg_path, ["data.train=unused"])
    proj = _projector()
    x1, x2 = _inputs(rank)
    loss = build_ntxent(cfg.simclr.temperature)(proj(x1), proj(x2))
    loss.backward()
    for p in proj.parameters():  # what DDP does: average the gradients over processes
        dist.all_reduce(p.grad)
        p.grad /= 2
    torch.save({"loss": loss.detach(), "grad": proj.weight.grad.clone()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_negatives_are_gathered_across_two_processes(tmp_path: Path) -> None:
    """Each rank's loss uses the other rank's views as negatives, with gradients: the mean of the two losses and the
    averaged gradients equal NT-Xent on the concatenated batch in one process, and differ from local-only negatives."""
    cfg_path = RECIPES / "demo_simclr_qscore.yaml"
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), str(cfg_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    T = load_config(cfg_path, ["data.train=unused"]).simclr.temperature
    proj = _projector()
    (a1, a2), (b1, b2) = _inputs(0), _inputs(1)
    full = hand_ntxent(proj(torch.cat([a1, b1])), proj(torch.cat([a2, b2])), T)
    full.backward()
    mean_loss = (ranks[0]["loss"] + ranks[1]["loss"]) / 2
    torch.testing.assert_close(mean_loss, full.detach())
    for r in ranks:
        torch.testing.assert_close(r["grad"], proj.weight.grad)
    local = hand_ntxent(proj(a1), proj(a2), T).detach()
    assert not torch.allclose(local, ranks[0]["loss"]), "rank 0 must see rank 1's views as negatives"


# ------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_short_run_trains_checkpoints_and_exports(digits_shards: Path, tmp_path: Path) -> None:
    from sslpipe.engine.trainer import train
    from sslpipe.weights.export import load_backbone
    from sslpipe.weights.run_export import export_run

    cfg = _cfg(digits_shards, "data.steps_per_epoch=3", "train.log_every=1", f"output_dir={tmp_path}",
               "run_name=simclr", "eval.every_epochs=1", "eval.max_train=200", "eval.max_val=50")
    run = train(cfg)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all("qscore/term" in r and "ntxent" in r for r in steps)
    assert any("knn/top1_k10" in r for r in records)
    out = export_run(run, which="student")
    model = load_backbone(out)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 128)


def test_export_of_a_run_without_teacher_defaults_to_the_student(tmp_path):
    """`sslpipe export RUN` picks the student of a SimCLR run and names the fix when the teacher is asked for."""
    from safetensors.torch import save_file

    from sslpipe.weights.run_export import export_run

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"global_step": 1}')  # a complete checkpoint
    (run / "config.yaml").write_text("method: simclr\nmodel: {arch: resnet18, patch_size: null}\n"
                                     "crops: {global_size: 32}\n")
    import timm

    net = timm.create_model("resnet18", num_classes=0)
    save_file({f"backbone.{k}": v.contiguous() for k, v in net.state_dict().items()}, str(ckpt / "model.safetensors"))
    save_file({"loss.dummy": torch.zeros(1)}, str(ckpt / "extra_state.safetensors"))
    out = export_run(run, which=None)
    assert out.name == "student"
    with pytest.raises(ValueError, match="--which student"):
        export_run(run, which="teacher")
