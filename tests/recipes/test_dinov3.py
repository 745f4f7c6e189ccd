"""DINOv3 (`method: dinov3`): the rotary ViT inside the masked wrapper, the Gram teacher's snapshot and refreshes at the
right iterations, Gram anchoring in the step, exact resume of the Gram teacher, and the export as timm's `*_dinov3`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from accelerate import Accelerator
from helpers import REPO
from safetensors.torch import load_file

from sslpipe.config import ConfigError
from sslpipe.engine.schedules import Schedules
from sslpipe.models.backbones import MaskedViT, create_backbone
from sslpipe.recipes import load_config
from sslpipe.recipes.dinov3 import DINOv3Recipe

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
RECIPE = REPO / "recipes/demo_dinov3.yaml"
TINY = ["model.kwargs={embed_dim: 32, depth: 2, num_heads: 2, init_values: 0.1}", "dinov3.head.out_dim=32",
        "dinov3.head.patch_out_dim=32", "dinov3.head.hidden_dim=32", "dinov3.head.bottleneck_dim=16",
        "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8"]


def test_masked_wrapper_runs_a_rotary_vit_at_any_size() -> None:
    torch.manual_seed(0)
    vit = create_backbone("vit_small_patch16_dinov3", img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    wrapped = MaskedViT(vit, mask_token=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), vit.forward_features(x))
        assert wrapped(torch.randn(2, 3, 16, 16)).shape == (2, 5 + 16, 32)  # CLS + 4 storage tokens + 4x4 patches
        mask = torch.zeros(2, 8, 8, dtype=torch.bool)
        mask[:, 0, 0] = True
        assert not torch.allclose(wrapped(x, mask), wrapped(x))
    assert vit.global_pool == "token"  # the [CLS] feature, as upstream (timm's default pools the patches)


def _recipe(shards: Path, *extra: str) -> DINOv3Recipe:
    recipe = DINOv3Recipe(load_config(RECIPE, [f"data.train={shards}", *TINY, *extra]))
    torch.manual_seed(0)
    recipe.build(Accelerator(cpu=True))
    return recipe


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_heads_cls_token_and_weight_decay_follow_dinov3_not_dinov2(digits_shards: Path) -> None:
    """dinov3 layers/dino_head.py: the heads end in a plain Linear, trunc-normal 0.02 (DINOv2's is weight-normalised,
    rows of norm 1); models/vision_transformer.py: the [CLS] starts at N(0, 0.02) (DINOv2: 1e-6); param_groups.py:
    no weight decay on names ending in "bias", so the `_qkvb` ViTs' q_bias / v_bias are spared."""
    recipe = _recipe(digits_shards, "model.arch=vit_small_patch16_dinov3_qkvb", "dinov3.head.out_dim=4096",
                     "dinov3.head.bottleneck_dim=256")
    for net in (recipe.student, recipe.teacher):
        for head in (net.dino_head, net.ibot_head):
            assert type(head.last_layer) is torch.nn.Linear and head.last_layer.bias is None
    weight = recipe.student.dino_head.last_layer.weight
    assert weight.std().item() == pytest.approx(0.02, rel=0.03) and weight.requires_grad  # cut at +-2: not at all
    assert recipe.student.backbone.vit.cls_token.std().item() == pytest.approx(0.02, rel=0.5)  # 32 values
    groups = {id(p): g["apply_wd"] for g in recipe.param_groups() for p in g["params"]}
    params = dict(recipe.student.named_parameters())
    assert not groups[id(params["backbone.vit.blocks.0.attn.q_bias"])]
    assert not groups[id(params["backbone.vit.blocks.1.attn.v_bias"])]
    assert groups[id(params["backbone.vit.blocks.0.attn.qkv.weight"])]
    with pytest.raises(ValueError, match=r"dinov3.head.norm_last_layer: DINOv3's heads end in a plain Linear"):
        _recipe(digits_shards, "dinov3.head.norm_last_layer=true")


def test_gram_teacher_is_taken_then_refreshed_at_the_right_iterations(digits_shards: Path) -> None:
    """load_at 2, refresh every 3 from iteration 6 on, at most 2 times: snapshots after the EMA update of the steps
    ending at iterations 6 and 9, none at 3 (before first_refresh) or 12 (the limit)."""
    recipe = _recipe(digits_shards, "dinov3.gram.load_at=2", "dinov3.gram.refresh_every=3",
                     "dinov3.gram.first_refresh=6", "dinov3.gram.max_refreshes=2")
    opt = torch.optim.SGD([p for g in recipe.param_groups() for p in g["params"]], lr=0.5)
    batches = iter(recipe.train_loader(0, 0, 1))
    taken = []
    for it in range(12):
        before = _state(recipe.gram_teacher)
        sched = {"teacher_temp": 0.04, "momentum": 0.5, "it": it}
        loss, metrics = recipe.step(next(batches), sched)
        assert ("loss_gram" in metrics) == (it >= 2)
        loss.backward()
        opt.step()
        opt.zero_grad()
        recipe.after_optimizer_step(sched)
        if any(not torch.equal(v, before[k]) for k, v in recipe.gram_teacher.state_dict().items()):
            taken.append(it)
        teacher = recipe.teacher.backbone.state_dict()
        same = all(torch.equal(v, teacher[k]) for k, v in recipe.gram_teacher.state_dict().items())
        assert same == (it in (5, 8)), it  # a refresh copies the teacher after its EMA update; the first snapshot
        # (iteration 2) is taken in the step, before that update
    assert taken == [2, 5, 8] and int(recipe.gram_refreshes) == 2
    teacher = recipe.teacher.backbone.state_dict()
    assert not all(torch.equal(v, teacher[k]) for k, v in recipe.gram_teacher.state_dict().items())


def test_gram_anchoring_pulls_the_student_towards_the_gram_teachers_structure(digits_shards: Path) -> None:
    recipe = _recipe(digits_shards, "dinov3.gram.load_at=0", "dinov3.gram.high_res=2.0")
    loss, metrics = recipe.step(next(iter(recipe.train_loader(0, 0, 1))), {"teacher_temp": 0.04, "it": 0})
    assert torch.isfinite(loss) and metrics["loss_gram"] >= 0
    with pytest.raises(ConfigError, match=r"'dinov3.gram.load_at' = 200 is not read with dinov3.gram.weight=0"):
        _recipe(digits_shards, "dinov3.gram.weight=0")  # the demo sets the other gram keys: unread without it
    off = _recipe(digits_shards, "dinov3.gram={weight: 0}")
    _, metrics = off.step(next(iter(off.train_loader(0, 0, 1))), {"teacher_temp": 0.04, "it": 0})
    assert "loss_gram" not in metrics
    with pytest.raises(ValueError, match="set dinov3.gram.img_level=false"):
        _recipe(digits_shards, "dinov3.gram.tokens=masked")


def test_resume_restores_the_gram_teacher_exactly(digits_shards: Path, tmp_path: Path, monkeypatch) -> None:
    from sslpipe.engine.trainer import train
    from sslpipe.weights.checkpoint import find_checkpoint

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    common = [f"data.train={digits_shards}", *TINY, "data.steps_per_epoch=4", "train.epochs=2",
              "dinov3.gram.load_at=1", "dinov3.gram.refresh_every=3", f"output_dir={tmp_path}", "train.log_every=1"]
    straight = train(load_config(RECIPE, [*common, "run_name=straight"]))
    train(load_config(RECIPE, [*common, "run_name=cut", "train.max_steps=5"]))
    resumed = train(load_config(RECIPE, [*common, "run_name=cut"]), resume=str(tmp_path / "cut"))
    a, b = (load_file(str(find_checkpoint(run) / "extra_state.safetensors")) for run in (straight, resumed))
    gram = [k for k in a if k.startswith("gram_teacher.")]
    assert gram and a.keys() == b.keys() and int(a["gram_refreshes"]) == 2
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_export_loads_in_timm_as_the_dinov3_architecture(digits_shards: Path, tmp_path: Path, monkeypatch) -> None:
    from sslpipe.engine.trainer import train
    from sslpipe.weights.export import load_backbone
    from sslpipe.weights.run_export import export_run

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    run = train(load_config(RECIPE, [f"data.train={digits_shards}", *TINY, "train.max_steps=1",
                                     f"output_dir={tmp_path}", "run_name=d3"]))
    out = export_run(run, which="teacher")
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch16_dinov3" and config["model_args"]["global_pool"] == "token"
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), load_backbone(out)(x))
        torch.testing.assert_close(model(x), model.forward_features(x)[:, 0])  # the [CLS] token


def test_every_consumer_takes_the_rope_export(digits_shards: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """kNN, linear, linear-seg, show (the rotated attention) and both dense fine-tunings take a DINOv3 export through
    the CLI; ViTDet's relative-position tables on a RoPE trunk are refused in one line that names the section."""
    from sslpipe.cli import main
    from sslpipe.engine.trainer import train
    from sslpipe.weights.run_export import export_run

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    torch.set_num_threads(1)
    run = train(load_config(RECIPE, [f"data.train={digits_shards}", *TINY, "train.max_steps=1",
                                     f"output_dir={tmp_path}", "run_name=d3"]))
    export = str(export_run(run, which="teacher"))
    scenes = str(tmp_path / "scenes")
    assert main(["shards", "--dataset", "scenes", scenes, "--scene-size", "64", "--scene-train", "8",
                 "--scene-val", "2"]) == 0
    out = tmp_path / "out"
    assert main(["knn", export, "--data", str(digits_shards), "--k", "5", "--out", str(out / "knn.json")]) == 0
    assert main(["linear", export, "--data", str(digits_shards), "--epochs", "1", "--n-last-blocks", "2",
                 "--out", str(out / "lin.json")]) == 0
    assert json.loads((out / "lin.json").read_text())["n_last_blocks"] == 2
    assert main(["linear-seg", export, "--data", scenes, "--steps", "2", "--batch-size", "4",
                 "--out", str(out / "seg.json")]) == 0
    assert {"knn.json", "lin.json", "seg.json"} <= {p.name for p in out.iterdir()}
    assert main(["show", export, "--data", str(digits_shards), "--num-images", "2", "--max-train", "50",
                 "--max-val", "20", "--out", str(out / "show")]) == 0
    assert (out / "show" / "attention.png").stat().st_size > 0
    for recipe, section in (("demo_finetune_m2f", "finetune_mask2former"), ("demo_finetune_vitdet", "finetune_vitdet")):
        args = [str(REPO / f"recipes/{recipe}.yaml"), f"model.init_from={export}", f"data.train={scenes}",
                f"data.val={scenes}", "data.num_workers=0", "train.max_steps=1", "eval.every_epochs=0",
                f"output_dir={tmp_path / 'ft'}", f"run_name={recipe}", f"{section}.global_blocks=[1]"]
        capsys.readouterr()
        assert main(["finetune", *args]) != 0
        assert f"{section}: use_rel_pos on a RoPE ViT" in capsys.readouterr().err
        assert main(["finetune", *args, f"{section}.use_rel_pos=false"]) == 0
        assert (tmp_path / "ft" / recipe / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------- the published recipes
SMALL_CROPS = ["data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=2", "crops.global_size=32",
               "crops.local_size=16", "crops.n_local=2", "train.mixed_precision=no"]


@pytest.mark.slow
def test_published_dinov3_vit_large_in1k_builds_and_steps(digits_shards: Path) -> None:
    """recipes/dinov3_vit_large_in1k.yaml: the ViT-L/16 (RoPE, qkv bias, LayerScale 1e-5) and its 65536-prototype
    heads as published, stepped once on 32 px crops (the network is the recipe's; only the crop sizes shrink)."""
    from helpers import one_teacher_student_step

    cfg = load_config(REPO / "recipes/dinov3_vit_large_in1k.yaml", [f"data.train={digits_shards}", *SMALL_CROPS])
    d = cfg.dinov3
    assert (d.centering, d.koleo_loss_weight, tuple(d.mask_ratio_min_max), d.gram.weight) == \
        ("sinkhorn_knopp", 0.1, (0.1, 0.5), 0.0)
    assert (d.momentum_teacher, d.loss.teacher_temp) == (0.992, 0.07)
    # the official peak lr at 32 processes x 64: optim.lr 1e-3 x 4 sqrt(2048 / 1024) (dinov3's sqrt_wrt_1024)
    published = load_config(REPO / "recipes/dinov3_vit_large_in1k.yaml")
    assert Schedules(published, 1250, world_size=32).base_lr == pytest.approx(1e-3 * 4 * math.sqrt(2))
    recipe = DINOv3Recipe(cfg)
    torch.manual_seed(0)
    _, metrics = one_teacher_student_step(recipe, momentum=0.992)
    vit = recipe.student.backbone.vit
    assert (vit.embed_dim, len(vit.blocks), vit.patch_embed.patch_size) == (1024, 24, (16, 16))
    assert cfg.model.kwargs["init_values"] == 1e-5 and vit.blocks[0].gamma_1.shape == (1024,)  # LayerScale
    assert recipe.student.dino_head.last_layer.out_features == 65536
    assert {"loss_dino", "loss_ibot", "loss_koleo"} <= set(metrics) and "loss_gram" not in metrics


@pytest.mark.slow
def test_published_dinov3_high_res_adaptation_builds_and_steps_with_gram(digits_shards: Path) -> None:
    """recipes/dinov3_vit_large_high_res.yaml: Gram anchoring from iteration 0 with the Gram teacher on crops 1.5x
    the globals. Its init_from (an export of the in1k run) is replaced by a fresh network here; the continuation
    itself is tested in tests/recipes/test_adapt.py."""
    from helpers import one_teacher_student_step

    cfg = load_config(REPO / "recipes/dinov3_vit_large_high_res.yaml", [
        f"data.train={digits_shards}", *SMALL_CROPS, "model.init_from=null", "dinov3.init_heads=false"])
    g = cfg.dinov3.gram
    assert (g.weight, g.load_at, g.max_refreshes, g.img_level, g.normalized, g.high_res) == (1.5, 0, 0, True, True, 1.5)
    # [H]'s final lr at its 8 per process, for any process count: schedules.lr.end 1.25e-5 x 4 sqrt(B / 1024)
    published = load_config(REPO / "recipes/dinov3_vit_large_high_res.yaml")
    for world in (16, 256):
        assert Schedules(published, 1000, world).base_lr == pytest.approx(1.25e-5 * 4 * math.sqrt(8 * world / 1024))
    recipe = DINOv3Recipe(cfg)
    torch.manual_seed(0)
    _, metrics = one_teacher_student_step(recipe, momentum=0.999)
    assert metrics["loss_gram"] >= 0.0 and len(recipe.student.backbone.vit.blocks) == 24
