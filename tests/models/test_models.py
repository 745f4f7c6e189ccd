"""Backbones, masked ViT, heads and EMA teacher."""

import copy
import re
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from lightly.models.modules import DINOProjectionHead, MaskedVisionTransformerTIMM

from sslpipe.models import (
    DINOHead,
    IBOTHead,
    MaskedViT,
    backbone_embed_dim,
    build_teacher,
    create_backbone,
    ema_update,
    pooled_features,
    weight_norm_g,
)
from sslpipe.models.backbones import vit_pos_embed
from sslpipe.models.ema import disable_dropout
from sslpipe.recipes import get_recipe, load_config

REPO = Path(__file__).resolve().parents[2]


def tiny_vit(**kw):
    args = dict(img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2)
    args.update(kw)
    return create_backbone("vit_tiny_patch16_224", **args)


def test_masked_vit_output_shape_and_local_crops():
    torch.manual_seed(0)
    model = MaskedViT(tiny_vit(), mask_token=True)
    mask = torch.zeros(3, 8, 8, dtype=torch.bool)
    mask[:, 2:5, 1:4] = True
    assert model(torch.randn(3, 3, 32, 32), mask).shape == (3, 1 + 64, 32)
    assert model(torch.randn(3, 3, 16, 16)).shape == (3, 1 + 16, 32)  # pos-embed resampled 8x8 -> 4x4
    assert model(torch.randn(2, 3, 16, 24)).shape == (2, 1 + 24, 32)  # non-square crop
    assert model.embed_dim == 32 and model.num_prefix_tokens == 1
    assert pooled_features(model, torch.randn(2, 3, 32, 32)).shape == (2, 32)
    assert backbone_embed_dim(model) == 32


def test_mask_token_written_at_masked_positions_before_pos_embed():
    torch.manual_seed(0)
    model = MaskedViT(tiny_vit(), mask_token=True)
    with torch.no_grad():
        model.mask_token.copy_(torch.randn(1, 32))
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 8, 8) < 0.4
    seen = {}
    model.vit.norm_pre.register_forward_hook(lambda m, i, o: seen.setdefault("tokens", i[0].detach()))
    model(x, mask)
    tokens = seen["tokens"]  # (B, 1+N, D) after cls prepend and pos-embed
    pos = model.vit.pos_embed[0, 1:].detach()  # 8x8 grid: no resampling at 32 px
    patches = tokens[:, 1:] - pos
    flat = mask.flatten(1)
    assert torch.allclose(patches[flat], model.mask_token.detach().expand(int(flat.sum()), -1), atol=1e-6)
    plain = model.vit.patch_embed(x).flatten(1, 2)
    assert torch.allclose(patches[~flat], plain[~flat], atol=1e-6)
    assert not torch.allclose(plain[flat], model.mask_token.detach().expand(int(flat.sum()), -1))
    assert torch.allclose(tokens[:, 0], (model.vit.cls_token + model.vit.pos_embed[:, :1])[0].detach(), atol=1e-6)


def test_masked_vit_with_zero_mask_equals_timm_and_teacher_rejects_masks():
    torch.manual_seed(0)
    vit = tiny_vit()
    model = MaskedViT(vit, mask_token=True)
    x = torch.randn(2, 3, 32, 32)
    no_mask = torch.zeros(2, 64, dtype=torch.bool)
    assert torch.allclose(model(x, no_mask), vit.forward_features(x), atol=1e-6)
    assert torch.allclose(pooled_features(vit, x), vit.forward_features(x)[:, 0], atol=1e-6)
    with pytest.raises(ValueError, match="mask_token=False"):
        MaskedViT(vit, mask_token=False)(x, no_mask)
    with pytest.raises(ValueError, match="patch grid"):
        model(x, torch.zeros(2, 4, 4, dtype=torch.bool))


def test_masked_vit_equals_lightly_with_skip_init():
    torch.manual_seed(0)
    ours = MaskedViT(tiny_vit(), mask_token=True)
    with torch.no_grad():
        ours.mask_token.copy_(torch.randn(1, 32))
    ref = MaskedVisionTransformerTIMM(vit=ours.vit, mask_token=torch.nn.Parameter(ours.mask_token.view(1, 1, 32)),
                                      weight_initialization="skip", pos_embed_initialization="skip")
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 8, 8) < 0.5
    ref_mask = torch.cat([torch.zeros(2, 1, dtype=torch.bool), mask.flatten(1)], dim=1)  # lightly: (B, 1+N)
    assert torch.allclose(ours(x, mask), ref.encode(x, mask=ref_mask), atol=1e-5)


def test_cnn_backbone_pooled_features():
    model = create_backbone("resnet18", img_size=32)
    assert backbone_embed_dim(model) == 512
    assert pooled_features(model, torch.randn(2, 3, 32, 32)).shape == (2, 512)
    with pytest.raises(ValueError, match="not a ViT"):
        create_backbone("resnet18", img_size=32, patch_size=4)
    with pytest.raises(ValueError, match="unknown timm architecture"):
        create_backbone("no_such_net", img_size=32)


def test_vit_small_out_dim_8192_at_224_and_96():
    torch.manual_seed(0)
    student = MaskedViT(create_backbone("vit_small_patch16_224", img_size=224, drop_path_rate=0.1), mask_token=True)
    head = IBOTHead(384, 8192, 8192, shared_head=True, norm_last_layer=False)
    with torch.no_grad():
        mask = torch.zeros(2, 14, 14, dtype=torch.bool)
        mask[0, :5, :5] = True
        cls, patch = head(student(torch.randn(2, 3, 224, 224), mask))
        assert cls.shape == (2, 8192) and patch.shape == (2, 196, 8192)
        local = student(torch.randn(2, 3, 96, 96))
        assert local.shape == (2, 37, 384)
        assert head.forward_cls(local[:, 0]).shape == (2, 8192)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_dino_head_equals_lightly_projection_head():
    torch.manual_seed(0)
    ours = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    ref = DINOProjectionHead(16, 24, 8, 32)
    lin = [m for m in ours.mlp if isinstance(m, torch.nn.Linear)]
    ref_lin = [m for m in ref.layers if isinstance(m, torch.nn.Linear)]
    assert len(lin) == len(ref_lin) == 3
    with torch.no_grad():
        for a, b in zip(lin, ref_lin):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
        ref.last_layer.weight_v.copy_(ours.last_layer.parametrizations.weight.original1)
    x = torch.randn(5, 16)
    assert torch.allclose(ours(x), ref(x), atol=1e-6)
    # init per docs/methods.md §1: zero biases, trunc-normal std 0.02 weights (bounds +-2 absolute, as timm/official)
    assert all(torch.all(m.bias == 0) for m in lin)
    assert all(0.015 < m.weight.std().item() < 0.025 for m in lin)


def test_norm_last_layer_freezes_g_at_one_and_names_contain_last_layer():
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8, norm_last_layer=True)
    g = weight_norm_g(head.last_layer)
    assert torch.all(g == 1) and not g.requires_grad
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(32), atol=1e-5)
    names = [n for n, p in head.named_parameters() if "last_layer" in n]
    assert len(names) == 2
    free = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8, norm_last_layer=False)
    assert weight_norm_g(free.last_layer).requires_grad and torch.all(weight_norm_g(free.last_layer) == 1)


def test_ibot_head_shared_and_separate():
    shared = IBOTHead(16, 32, 32, shared_head=True, hidden_dim=24, bottleneck_dim=8)
    assert shared.last_layer2 is shared.last_layer
    sep = IBOTHead(16, 32, 12, shared_head=False, hidden_dim=24, bottleneck_dim=8)
    assert sep.last_layer2 is not sep.last_layer
    assert any(n.startswith("last_layer2.") for n, _ in sep.named_parameters())
    tokens = torch.randn(3, 1 + 4 + 6, 16)  # CLS + 4 registers + 6 patches
    cls, patch = sep(tokens, num_prefix_tokens=5)
    assert cls.shape == (3, 32) and patch.shape == (3, 6, 12)
    assert torch.allclose(cls, sep.forward_cls(tokens[:, 0]), atol=1e-6)
    assert torch.allclose(patch[:, 2], sep.last_layer2(torch.nn.functional.normalize(sep.mlp(tokens[:, 7]), dim=-1)),
                          atol=1e-6)
    with pytest.raises(ValueError, match="out_dim == patch_out_dim"):
        IBOTHead(16, 32, 12, shared_head=True)


def _student():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"backbone": MaskedViT(tiny_vit(drop_path_rate=0.1), mask_token=True),
                                "head": IBOTHead(32, 16, 16, hidden_dim=24, bottleneck_dim=8)})


def test_teacher_deepcopies_gets_no_grad_and_state_dict_roundtrips():
    student = _student()
    teacher = build_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(getattr(m, "drop_prob", 0.0) == 0.0 for m in teacher.modules())
    assert any(getattr(m, "drop_prob", 0.0) > 0.0 for m in student.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t_cls, _ = teacher["head"](teacher["backbone"](x))
    s_cls, _ = student["head"](student["backbone"](x, torch.rand(2, 8, 8) < 0.3))
    (s_cls * t_cls).sum().backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student["head"].mlp[0].weight.grad is not None
    other = copy.deepcopy(student)
    other.load_state_dict(teacher.state_dict())
    assert torch.equal(other["head"].last_layer.weight, teacher["head"].last_layer.weight)


def test_ema_update_formula_by_name_and_student_untouched():
    student = _student()
    teacher = build_teacher(student)
    teacher["backbone"].mask_token = None  # the iBOT teacher has no mask token: names must still pair up
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
    before_t = {n: p.clone() for n, p in teacher.named_parameters()}
    before_s = {n: p.clone() for n, p in student.named_parameters()}
    ema_update(teacher, student, 0.9)
    s = dict(student.named_parameters())
    for n, p in teacher.named_parameters():
        assert torch.allclose(p, 0.9 * before_t[n] + 0.1 * s[n], atol=1e-6), n
    for n, p in student.named_parameters():
        assert torch.equal(p, before_s[n]), n
    with pytest.raises(ValueError, match="share no parameter"):
        a, b = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2)}), torch.nn.ModuleDict({"b": torch.nn.Linear(2, 2)})
        ema_update(a, b, 0.9)
    with pytest.raises(ValueError, match="differ in shape"):
        ema_update(torch.nn.Linear(2, 2), torch.nn.Conv1d(2, 2, 1), 0.9)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lightly_head_cannot_be_deepcopied_ours_can():
    ref = DINOProjectionHead(8, 16, 4, 32)
    ref(torch.randn(2, 8))
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(ref)
    ours = DINOHead(8, 32, hidden_dim=16, bottleneck_dim=4)
    ours(torch.randn(2, 8))
    twin = copy.deepcopy(ours)
    x = torch.randn(3, 8)
    assert torch.equal(twin(x), ours(x))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_ibot_step_bench_same_loss_as_lightly_step():
    from sslpipe.bench.ibot_step import run_ibot_step_bench

    # local crops at the global size: no position-embedding resize, whose method differs (official vs timm)
    r = run_ibot_step_bench(batch_size=2, n_local=2, local_size=32, depth=1, embed_dim=32, num_heads=2, out_dim=64,
                            hidden_dim=32, bottleneck_dim=16, warmup=1, steps=1, device="cpu")
    assert r["loss_abs_diff"] < 1e-4 and r["first_loss_sslpipe"] > 0
    assert r["sslpipe_ms"] > 0 and r["lightly_ms"] > 0


def official_interpolate_pos_encoding(pos_embed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """bytedance/ibot models/vision_transformer.py interpolate_pos_encoding, written out for a (h, w) patch grid."""
    n = pos_embed.shape[1] - 1
    side = int(n ** 0.5)
    patch = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch = torch.nn.functional.interpolate(patch, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic")
    return torch.cat([pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)


def test_local_crop_position_embedding_follows_the_official_interpolation():
    """14x14 grid (56 px, 4-px patches) -> 6x6 local grid (24 px), as 224 -> 96 px at patch 16."""
    torch.manual_seed(0)
    model = MaskedViT(tiny_vit(img_size=56), mask_token=False)
    x = torch.randn(2, 3, 24, 24)
    seen = {}
    model.vit.norm_pre.register_forward_hook(lambda m, i, o: seen.setdefault("tokens", i[0].detach()))
    model(x)
    pos = seen["tokens"] - torch.cat([model.vit.cls_token.expand(2, -1, -1),
                                      model.vit.patch_embed(x).flatten(1, 2)], dim=1).detach()
    official = official_interpolate_pos_encoding(model.vit.pos_embed.detach(), 6, 6)
    torch.testing.assert_close(pos, official.expand(2, -1, -1), atol=1e-5, rtol=1e-5)
    from timm.layers import resample_abs_pos_embed
    timm_pos = resample_abs_pos_embed(model.vit.pos_embed.detach(), (6, 6), num_prefix_tokens=1)
    rel = (timm_pos[0, 1:] - official[0, 1:]).norm() / official[0, 1:].norm()
    assert rel > 0.1, "timm's antialiased resize is a different interpolation (the reason for ours)"
    # the matrix form equals F.interpolate on a non-square grid too, and the global size is left untouched
    from sslpipe.models.backbones import pos_interpolation_matrix
    grid = torch.randn(1, 5, 7, 3, dtype=torch.float64)
    ref = torch.nn.functional.interpolate(grid.permute(0, 3, 1, 2), scale_factor=(3.1 / 5, 4.1 / 7), mode="bicubic")
    got = pos_interpolation_matrix((5, 7), (3, 4), dtype=torch.float64) @ grid.reshape(35, 3)
    torch.testing.assert_close(got, ref.permute(0, 2, 3, 1).reshape(12, 3))
    full = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(model(full), model.vit.forward_features(full))


def test_cls_token_init_is_trunc_normal_002():
    torch.manual_seed(0)
    vit = create_backbone("vit_small_patch16_224", img_size=224)
    std = float(vit.cls_token.detach().std())
    assert 0.015 < std < 0.025, std  # 384 draws of N(0, 0.02) (truncated at +-2, as the official init); timm: 1e-6


def test_sync_batchnorm_only_on_several_cuda_processes(capsys):
    from sslpipe.models.backbones import sync_batchnorm

    cnn = create_backbone("resnet18", img_size=32)
    one = sync_batchnorm(cnn, enabled=True, num_processes=1, device=torch.device("cuda"))
    assert one is cnn
    cpu = sync_batchnorm(cnn, enabled=True, num_processes=2, device=torch.device("cpu"))
    assert cpu is cnn and "SyncBatchNorm needs CUDA" in capsys.readouterr().out
    off = sync_batchnorm(cnn, enabled=False, num_processes=2, device=torch.device("cuda"))
    assert off is cnn
    synced = sync_batchnorm(cnn, enabled=True, num_processes=2, device=torch.device("cuda"))
    kinds = {type(m).__name__ for m in synced.modules()}
    assert "SyncBatchNorm" in kinds and "BatchNorm2d" not in kinds
    vit = tiny_vit()
    assert sync_batchnorm(vit, enabled=True, num_processes=2, device=torch.device("cuda")) is vit  # no BatchNorm


NO_CLS = {"class_token": False, "global_pool": "avg"}  # timm's token pooling needs the class token


@pytest.mark.parametrize("arch, kwargs", [("vit_medium_patch16_gap_240", {}), ("vit_tiny_patch16_224", NO_CLS),
                                          ("vit_tiny_patch16_224", {**NO_CLS, "reg_tokens": 2})])
def test_masked_vit_refuses_a_vit_without_class_token(arch, kwargs):
    """The methods train token 0 as the [CLS]; without one it is a patch or a register. Other users of such a model
    (fine-tuning, distillation students, probes) build it with create_backbone, which still accepts it."""
    vit = create_backbone(arch, img_size=32, patch_size=4, depth=1, embed_dim=32, num_heads=2, **kwargs)
    with pytest.raises(ValueError, match=rf"model.arch={arch} is built without a \[CLS\] token .*class_token"):
        MaskedViT(vit, mask_token=True)
    assert pooled_features(vit.eval(), torch.randn(2, 3, 32, 32)).shape == (2, 32)


@pytest.mark.parametrize("arch, kwargs, said", [
    ("vit_tiny_patch16_224", {"global_pool": "avg"}, "global_pool='avg' and an fc_norm after the pooling"),
    ("vit_tiny_patch16_224", {"global_pool": "avg", "fc_norm": False}, "global_pool='avg', so"),
    ("eva02_tiny_patch14_224", {}, "global_pool='avg' and an fc_norm"),  # timm's Eva pools by default
])
def test_masked_vit_refuses_a_vit_whose_feature_is_not_the_normed_cls(arch, kwargs, said):
    """The methods train the [CLS] after the final norm; a ViT that pools its patches (or, with fc_norm, has no final
    norm on its tokens) would train one feature and export another."""
    vit = create_backbone(arch, img_size=32, patch_size=4, depth=1, embed_dim=32, num_heads=2, **kwargs)
    with pytest.raises(ValueError, match=rf"model.arch={arch} is built with {re.escape(said)}.*global_pool: token"):
        MaskedViT(vit, mask_token=False)
    token = create_backbone(arch, img_size=32, patch_size=4, depth=1, embed_dim=32, num_heads=2,
                            **{**kwargs, "global_pool": "token", "fc_norm": None})
    MaskedViT(token, mask_token=False)  # the [CLS] pooling of the same arch is accepted


def test_masked_vit_refuses_a_distilled_deit():
    """A distilled DeiT's dist_token is a second prefix token that the position-embedding code and the methods do not
    know; refused with a message instead of a shape error in the forward."""
    vit = create_backbone("deit_tiny_distilled_patch16_224", img_size=32, patch_size=4, depth=1, embed_dim=32,
                          num_heads=2)
    with pytest.raises(ValueError, match=r"model.arch=deit_tiny_distilled_patch16_224 is a distilled DeiT"):
        MaskedViT(vit, mask_token=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_local_crop_position_embedding_is_float32_under_autocast(dtype):
    """Under mixed precision the resize of the position embedding for local crops stays in float32 (the official
    F.interpolate is not an autocast op), so it equals the float32 one exactly."""
    torch.manual_seed(0)
    vit = tiny_vit(img_size=56)
    local = torch.zeros(1, 6, 6, 32)  # 14x14 -> 6x6 grid: zero patch tokens leave the position embedding
    with torch.no_grad():
        ref = vit_pos_embed(vit, local)
        with torch.autocast("cpu", dtype=dtype):
            mixed = vit_pos_embed(vit, local)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, ref)


def test_disable_dropout_makes_a_train_mode_vit_deterministic():
    """The EMA teachers keep train mode; disable_dropout zeroes every dropout (attention, projection, position, MLP,
    patch dropout, drop path) so that their targets do not depend on a random draw."""
    torch.manual_seed(0)
    vit = tiny_vit(proj_drop_rate=0.3, attn_drop_rate=0.3, pos_drop_rate=0.3, patch_drop_rate=0.3, drop_path_rate=0.3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(vit(x), vit(x))
        assert disable_dropout(vit) is vit and vit.training
        assert torch.equal(vit(x), vit(x))


def _draws_differ(net: torch.nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return not torch.equal(net(x), net(x))


@pytest.mark.parametrize("rope_kwargs", [{"rope_rescale_coords": 2}, {"rope_shift_coords": 0.5},
                                         {"rope_jitter_coords": 1.5}, {"patch_drop_rate": 0.3}])
def test_disable_dropout_fixes_a_train_mode_eva_teacher(rope_kwargs):
    """DINOv3's Eva in train mode redraws its RoPE coordinates at every call when a coordinate augmentation is set
    (the official 7B configs: rescale 2), and its patch dropout is timm's PatchDropoutWithIndices; the official
    teacher (eval mode) has neither, so disable_dropout switches both off and the targets repeat exactly."""
    torch.manual_seed(0)
    vit = create_backbone("vit_small_patch16_dinov3", img_size=32, patch_size=4, depth=1, embed_dim=32, num_heads=2,
                          **rope_kwargs)
    x = torch.randn(2, 3, 32, 32)
    assert vit.training and _draws_differ(vit, x)  # the student: augmented
    assert disable_dropout(vit) is vit and vit.training and not _draws_differ(vit, x)
    assert not vit.rope.aug_active


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv3_small_050", "densenet121"])
def test_disable_dropout_zeroes_the_functional_drop_rate_of_a_cnn(arch):
    """timm CNNs apply `drop_rate` with F.dropout to their pooled feature (forward_head, before pre_logits): a DINO
    teacher in train mode (BatchNorm batch statistics) would drop 30 % of its features at random."""
    torch.manual_seed(0)
    cnn = create_backbone(arch, img_size=32, drop_rate=0.3)
    x = torch.randn(4, 3, 32, 32)
    assert _draws_differ(cnn, x)
    disable_dropout(cnn)
    rates = [m.drop_rate for m in cnn.modules() if hasattr(m, "drop_rate")]  # DenseNet: in every dense layer
    assert cnn.training and rates and not any(rates) and not _draws_differ(cnn, x)


def test_a_dino_cnn_teacher_with_drop_rate_gives_the_same_features_twice():
    cfg = load_config(REPO / "recipes/demo_dino.yaml", ["data.train=x", "model.arch=resnet18", "model.patch_size=null",
                                                        "model.drop_path_rate=0", "model.kwargs={drop_rate: 0.3}"])
    recipe = get_recipe("dino")(cfg)
    recipe.build(Accelerator(cpu=True))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert recipe.teacher.training and torch.equal(recipe.teacher(x)[1], recipe.teacher(x)[1])
        assert not torch.equal(recipe.student(x)[1], recipe.student(x)[1])  # the student keeps its dropout


@pytest.mark.parametrize("recipe", ["demo_ibot.yaml", "demo_dinov2.yaml", "demo_dinov3.yaml"])
def test_patch_dropout_is_refused_with_masked_patch_targets(recipe):
    """The student's patch dropout keeps a random subset of its patch tokens, so the masked positions would index
    other tokens (or none: IndexError); refused at build, naming the key. DINO (CLS only) keeps it."""
    kwargs = "model.kwargs={embed_dim: 32, depth: 1, num_heads: 2, patch_drop_rate: 0.1}"
    cfg = load_config(REPO / "recipes" / recipe, ["data.train=x", kwargs])
    with pytest.raises(ValueError, match=r"^model.kwargs.patch_drop_rate=0.1: .*remove patch_drop_rate from "
                                         r"model.kwargs") as refused:
        get_recipe(cfg.method)(cfg).build(Accelerator(cpu=True))
    assert "\n" not in str(refused.value)
    dino = load_config(REPO / "recipes/demo_dino.yaml", ["data.train=x", kwargs])
    built = get_recipe("dino")(dino)
    built.build(Accelerator(cpu=True))
    assert built.student.backbone.vit.patch_drop.prob == 0.1 and built.teacher.backbone.vit.patch_drop.prob == 0.0


@pytest.mark.parametrize("arch", ["dla46_c", "ghostnet_050"])
def test_a_cnn_without_stochastic_depth_builds_at_rate_0_and_is_refused_above(arch):
    """Their constructors take no drop_path_rate: passed at 0 as well, it made every method fail on them with a
    message that blamed num_classes."""
    model = create_backbone(arch, img_size=32)
    assert pooled_features(model.eval(), torch.randn(2, 3, 32, 32)).shape == (2, backbone_embed_dim(model))
    with pytest.raises(ValueError, match=rf"^model.drop_path_rate=0.1: {arch} has no stochastic depth; set it to 0$"):
        create_backbone(arch, img_size=32, drop_path_rate=0.1)
    with pytest.raises(ValueError, match=rf"timm.create_model\('{arch}'\) rejected the model arguments "
                                         r"\['dpeth', 'num_classes'\]: .*'dpeth'"):
        create_backbone(arch, img_size=32, dpeth=2)


def test_rate_0_is_still_passed_where_timm_defaults_to_stochastic_depth():
    """fasternet_s's entrypoint defaults to drop_path_rate 0.1: model.drop_path_rate=0 must give none, so the rate
    is passed whenever the architecture takes it; the rejected arguments' list names drop_path_rate then."""
    def rates(model):
        return [m.drop_prob for m in model.modules() if isinstance(getattr(m, "drop_prob", None), float)]
    assert max(rates(create_backbone("fasternet_s", img_size=32, drop_path_rate=0.2))) == pytest.approx(0.2)
    assert not any(rates(create_backbone("fasternet_s", img_size=32, drop_path_rate=0.0)))
    with pytest.raises(ValueError, match=r"rejected the model arguments \['dpeth', 'drop_path_rate', 'num_classes'\]"):
        create_backbone("resnet18", img_size=32, dpeth=2)


@pytest.mark.parametrize("batch", [3, 4])
def test_masked_vit_gives_each_block_its_own_table_of_a_rope_mixed_eva(batch):
    """timm's rope_mixed Eva (vit_*_rope_mixed_*) learns one RoPE table per block, (depth, heads, N, dim), and its
    forward hands block i table i; the whole table broadcast against a batch of `depth` images (batch 3) or failed
    (batch 4). Frequencies made different per block, so a block given another block's table shows."""
    torch.manual_seed(0)
    vit = create_backbone("vit_small_patch16_rope_mixed_224", img_size=32, patch_size=8, depth=3, embed_dim=32,
                          num_heads=2, global_pool="token").eval()
    assert vit.rope_mixed
    with torch.no_grad():
        vit.rope.freqs.add_(2.0 * torch.randn_like(vit.rope.freqs))
        for block in vit.blocks:
            block.attn.qkv.weight.mul_(8)
        x = torch.randn(batch, 3, 32, 32)
        ref = vit.forward_features(x)
        torch.testing.assert_close(MaskedViT(vit, mask_token=True).eval()(x), ref, rtol=0, atol=1e-5)
