"""Continued pretraining (`model.init_from` on DINO, iBOT, DINOv2, SimCLR): student, teacher and export equal tensor for
tensor, heads fresh or the export's own (`--with-heads`), the position grid resampled by the export's rule at another
size, and one-line refusals for another patch size, another architecture and heads that do not fit."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from accelerate import Accelerator
from helpers import REPO
from safetensors.torch import load_file

from sslpipe.recipes import get_recipe, load_config
from sslpipe.weights.checkpoint import find_checkpoint
from sslpipe.weights.export import export_backbone
from sslpipe.weights.positions import resize_pos_embed

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
RECIPES = REPO / "recipes"
KWARGS = {"embed_dim": 32, "depth": 2, "num_heads": 2}
TINY = {"dino": ["dino.head.out_dim=64", "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16"],
        "ibot": ["ibot.head.out_dim=64", "ibot.head.patch_out_dim=64", "ibot.head.hidden_dim=32",
                 "ibot.head.bottleneck_dim=16"],
        "dinov2": ["dinov2.head.out_dim=64", "dinov2.head.patch_out_dim=64", "dinov2.head.hidden_dim=32",
                   "dinov2.head.bottleneck_dim=16"],
        "simclr": ["simclr.proj_hidden_dim=32", "simclr.proj_output_dim=16"]}


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT export at 32 px with 4 px patches (an 8x8 grid)."""
    torch.manual_seed(7)
    args = {**KWARGS, "patch_size": 4, "img_size": 32, "dynamic_img_size": True}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args)
    return export_backbone(vit, tmp_path_factory.mktemp("export") / "vit", arch="vit_tiny_patch16_224",
                           model_args=args, img_size=32, mean=(0.3,) * 3, std=(0.3,) * 3, source={"which": "test"})


def _recipe(method: str, shards: Path, *extra: str, seed: int = 0):
    cfg = load_config(RECIPES / f"demo_{method}.yaml", [
        f"data.train={shards}", "data.batch_size=4", "data.num_workers=0", "crops.global_size=32",
        "model.arch=vit_tiny_patch16_224", "model.patch_size=4", f"model.kwargs={KWARGS}", *TINY[method],
        f"seed={seed}", *extra])
    torch.manual_seed(seed)
    recipe = get_recipe(cfg.method)(cfg)
    recipe.build(Accelerator(cpu=True))
    return recipe


def _vit(net: torch.nn.Module) -> torch.nn.Module:
    return getattr(net.backbone, "vit", net.backbone)


@pytest.mark.parametrize("method", ["dino", "ibot", "dinov2", "simclr"])
def test_student_teacher_and_export_are_equal_and_the_heads_fresh(digits_shards: Path, export: Path,
                                                                   method: str) -> None:
    adapted = _recipe(method, digits_shards, f"model.init_from={export}")
    fresh = _recipe(method, digits_shards)
    weights = load_file(str(export / "model.safetensors"))
    nets = [adapted.student] + ([adapted.teacher] if hasattr(adapted, "teacher") else [])
    for net in nets:
        state = _vit(net).state_dict()
        assert weights.keys() <= state.keys()
        for key, value in weights.items():
            assert torch.equal(state[key], value), (method, key)
    heads = {k: v for k, v in adapted.student.state_dict().items() if not k.startswith("backbone.")}
    fresh_heads = {k: v for k, v in fresh.student.state_dict().items() if not k.startswith("backbone.")}
    assert heads.keys() == fresh_heads.keys() and all(torch.equal(heads[k], fresh_heads[k]) for k in heads)


def test_another_image_size_resamples_the_grid_by_the_exports_rule(digits_shards: Path, export: Path) -> None:
    recipe = _recipe("dinov2", digits_shards, f"model.init_from={export}", "crops.global_size=48")
    weights = load_file(str(export / "model.safetensors"))
    want, note = resize_pos_embed(weights["pos_embed"], 1, 8, 12, "official")  # 8x8 -> 12x12, DINO's rule
    vit = _vit(recipe.student)
    assert "(n + 0.1) / N" in note and torch.equal(vit.pos_embed.data, want)
    assert torch.equal(vit.blocks[1].attn.qkv.weight.data, weights["blocks.1.attn.qkv.weight"])


def test_heads_continue_from_an_export_with_heads(digits_shards: Path, tmp_path: Path, monkeypatch) -> None:
    """A short DINOv2 run, exported with its heads, continues with the teacher's backbone and heads in both
    networks; with init_heads=false the heads start fresh."""
    from sslpipe.engine.trainer import train
    from sslpipe.weights.run_export import export_run

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    cfg = load_config(RECIPES / "demo_dinov2.yaml", [
        f"data.train={digits_shards}", "data.batch_size=4", "data.num_workers=0", "crops.global_size=32",
        "model.arch=vit_tiny_patch16_224", "model.patch_size=4", f"model.kwargs={KWARGS}", *TINY["dinov2"],
        "train.max_steps=2", f"output_dir={tmp_path}", "run_name=first"])
    run = train(cfg)
    out = export_run(run, which="teacher", with_heads=True)
    heads = load_file(str(out / "heads.safetensors"))
    assert any(k.startswith("dino_head.") for k in heads) and any(k.startswith("ibot_head.") for k in heads)
    # the trained mask token goes with the heads (the teacher has none: the student's), as the export leaves it out
    trained = load_file(str(find_checkpoint(run) / "model.safetensors"))["backbone.mask_token"]
    assert trained.abs().sum() > 0 and torch.equal(heads.pop("backbone.mask_token"), trained)
    recipe = _recipe("dinov2", digits_shards, f"model.init_from={out}")
    for net in (recipe.student, recipe.teacher):
        state = net.state_dict()
        for key, value in heads.items():
            assert torch.equal(state[key], value), key
    assert torch.equal(recipe.student.backbone.mask_token.data, trained)
    fresh = _recipe("dinov2", digits_shards, f"model.init_from={out}", "dinov2.init_heads=false")
    key = "dino_head.mlp.0.weight"
    assert not torch.equal(fresh.student.state_dict()[key], heads[key])
    assert not fresh.student.backbone.mask_token.any()
    with pytest.raises(ValueError, match=r"dinov2 heads do not fit the heads of this recipe.*set dinov2.head"):
        _recipe("dinov2", digits_shards, f"model.init_from={out}", "dinov2.head.out_dim=32")


@pytest.mark.parametrize("method", ["dinov2", "simclr"])
def test_a_normalisation_other_than_the_exports_is_named(digits_shards: Path, export: Path, method: str,
                                                         capsys: pytest.CaptureFixture) -> None:
    """Continued pretraining trains under crops.mean / std; the export was trained under 0.3 / 0.3: said, not
    silent, and nothing is said when they agree."""
    _recipe(method, digits_shards, f"model.init_from={export}", "crops.mean=[0.5,0.5,0.5]")
    said = capsys.readouterr().out
    assert "crops.mean=[0.5, 0.5, 0.5] is used, the export was trained with [0.3, 0.3, 0.3]" in said
    assert "crops.std=" in said  # the demo recipes' Fashion-MNIST std is not 0.3 either
    _recipe(method, digits_shards, f"model.init_from={export}", "crops.mean=[0.3,0.3,0.3]", "crops.std=[0.3,0.3,0.3]")
    assert "the export was trained with" not in capsys.readouterr().out


def test_refusals_are_one_line(digits_shards: Path, export: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"its patches are 4 px, the network built here has 8 px patches; a patch "
                                         r"size cannot be resampled: set model.patch_size=4"):
        _recipe("ibot", digits_shards, f"model.init_from={export}", "model.patch_size=8")
    with pytest.raises(ValueError, match=r"does not fit the VisionTransformer backbone to initialise: shape export "
                                         r"vs backbone"):
        _recipe("dino", digits_shards, f"model.init_from={export}", "model.kwargs={embed_dim: 64, depth: 2, "
                                                                     "num_heads: 2}")
    cnn = export_backbone(timm.create_model("resnet10t", pretrained=False, num_classes=0), tmp_path / "cnn",
                          arch="resnet10t", model_args={}, img_size=32, mean=(0.3,) * 3, std=(0.3,) * 3,
                          source={"which": "test"})
    with pytest.raises(ValueError, match=r"export .*cnn \(resnet10t with model_args .*\) does not fit the "
                                         r"VisionTransformer backbone"):
        _recipe("ibot", digits_shards, f"model.init_from={cnn}")
    with pytest.raises(FileNotFoundError, match="not found: pass an export folder"):
        _recipe("dinov2", digits_shards, f"model.init_from={tmp_path / 'nowhere'}")


@pytest.mark.slow
def test_published_adapt_recipe_builds_from_a_518px_release_and_steps(digits_shards: Path, tmp_path: Path) -> None:
    """recipes/adapt_dinov2_vit_small.yaml from a (random) ViT-S/14 in the released layout at 518 px: the 37x37 grid
    is resampled to the 16x16 of 224 px crops, and one step of the published continued-pretraining values runs."""
    from helpers import one_teacher_student_step

    torch.manual_seed(0)
    args = {"img_size": 518, "patch_size": 14, "init_values": 1e-5}
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **args)
    release = export_backbone(vit, tmp_path / "dinov2_vits14", arch="vit_small_patch14_dinov2", model_args=args,
                              img_size=518, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                              source={"format": "dinov2"})
    cfg = load_config(RECIPES / "adapt_dinov2_vit_small.yaml", [
        f"data.train={digits_shards}", "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=4",
        "crops.n_local=2", f"model.init_from={release}"])
    assert (cfg.dinov2.momentum_teacher, cfg.dinov2.momentum_teacher_end, cfg.optim.lr) == (0.999, 0.999, 1e-3)
    recipe = get_recipe(cfg.method)(cfg)
    loss, _ = one_teacher_student_step(recipe, momentum=0.999)
    assert torch.isfinite(loss) and recipe.patch_grid() == (16, 16)
    assert tuple(_vit(recipe.teacher).pos_embed.shape) == (1, 1 + 16 * 16, 384)
