"""`sslpipe import` of official DINOv3 checkpoints: rotary ViTs onto timm's `vit_*_dinov3`, ConvNeXts onto timm's
`convnext_*`. The official networks (tests/weights/dinov3_official.py) are saved in the layouts of hub/backbones.py
(the bare state dict), train/train.py (SSLMetaArch's, made one file by dcp_to_torch; do_test's teacher checkpoint),
imported, and every key is checked used or dropped with its reason.

Output equality: the export loaded by timm against the official module, atol = rtol = 1e-5 (float32), at the export's
size and at others, square and not: rotary positions are computed for every grid on both sides, nothing is resized.
"""
from __future__ import annotations

import re

import pytest
import timm
import torch
import yaml
from dinov3_official import (
    DEPTH,
    DIM,
    HEADS,
    OUT,
    PATCH,
    ConvNeXt,
    DinoVisionTransformer,
    RopePositionEmbedding,
    SSLMetaArch,
    official_vit,
)
from helpers import REPO
from safetensors.torch import load_file
from test_import import DinoV2ViT, _optimizer_state, randomise
from torch import Tensor, nn

from sslpipe.cli import main
from sslpipe.weights.export import load_backbone, read_export_config
from sslpipe.weights.importing import import_checkpoint
from sslpipe.weights.layouts import UnusableCheckpoint
from sslpipe.weights.layouts_dinov3 import dinov3_to_timm, infer_dinov3
from sslpipe.weights.positions import export_position_rule, fit_position_grid

torch.set_num_threads(1)
TOL = {"atol": 1e-5, "rtol": 1e-5}
SIZE = 32  # 4x4 patches
SIZES = [(SIZE, SIZE), (48, 48), (32, 48)]  # the export's size, another, and not square

pytestmark = pytest.mark.usefixtures("no_download")


# ------------------------------------------------------------------------------------------------------- helpers
def _x(hw: tuple[int, int], seed: int = 1) -> Tensor:
    return torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(seed))


def _max_diff(out, official: nn.Module, sizes=SIZES) -> float:
    """The export loaded by timm against the official forward, at each size (asserted within TOL)."""
    model, worst = load_backbone(out), 0.0
    for hw in sizes:
        with torch.no_grad():
            got, want = model(_x(hw)), official(_x(hw))
        torch.testing.assert_close(got, want, **TOL)
        worst = max(worst, (got - want).abs().max().item())
    return worst


def _dropped(report) -> dict[str, int]:
    return {d.entry: d.tensors for d in report.dropped}


# ----------------------------------------------------------------------------------------------- hub backbones
HUB = {  # hub/backbones.py at a test's width: (official arguments, timm name, q/v biases set to zero)
    "vits16": ({}, "vit_base_patch16_dinov3_qkvb", False),
    "vitb16_zero_biases": ({}, "vit_base_patch16_dinov3", True),  # the distilled releases' all-zero biases
    "vith16plus": ({"ffn": "swiglu", "ffn_ratio": 6.0}, "vit_base_patch16_dinov3_qkvb", False),
    "vit7b16": ({"ffn": "swiglu64", "ffn_ratio": 3.0, "qkv_bias": False, "untie_global_and_local_cls_norm": True},
                "vit_base_patch16_dinov3", False),
}


@pytest.mark.parametrize("name", HUB)
def test_hub_backbone(tmp_path, name):
    """A hub backbone is the bare DinoVisionTransformer state dict: detected from its keys, read from its shapes
    (heads from the RoPE periods), every key used or dropped with its reason, the same outputs at every size."""
    args, arch, zero = HUB[name]
    official = official_vit(1, **args)
    if zero:
        for block in official.blocks:
            block.attn.qkv.bias.data.zero_()
    path = tmp_path / "dinov3_pretrain.pth"
    torch.save(official.state_dict(), path)
    report = import_checkpoint(path, tmp_path / "out")
    assert (report.fmt, report.detected, report.which, report.arch) == ("dinov3", True, None, arch)
    swiglu, qkv_bias = args.get("ffn", "mlp") != "mlp", args.get("qkv_bias", True) and not zero
    hidden = official.blocks[0].mlp.w1.out_features if swiglu else 4 * DIM
    assert report.model_args == {
        "img_size": 224, "dynamic_img_size": True, "patch_size": PATCH, "global_pool": "token", "embed_dim": DIM,
        "depth": DEPTH, "num_heads": HEADS, "qkv_bias": qkv_bias, "mlp_ratio": hidden / DIM, "swiglu_mlp": swiglu,
        "num_reg_tokens": 4, "init_values": 1e-5, **({"swiglu_align_to": 1} if swiglu else {}),
        "rope_temperature": 100.0, "num_classes": 0}
    assert "num_heads=2: from the RoPE periods (8 per head: head width 32)" in report.notes
    dropped = _dropped(report)
    want = {"mask_token": 1, "rope_embed.periods": 1}
    if args.get("qkv_bias", True):
        want["blocks.*.attn.qkv.bias_mask"] = DEPTH
    if zero:
        want["blocks.*.attn.qkv.bias"] = DEPTH
    if "untie_global_and_local_cls_norm" in args:
        want["local_cls_norm.*"] = 2
    assert dropped == want
    split = DEPTH if qkv_bias else 0  # a kept qkv bias is two tensors in timm: q_bias and v_bias
    assert report.kept + sum(dropped.values()) == len(official.state_dict()) + split
    config = read_export_config(report.out)
    assert config["source"]["format"] == "dinov3" and export_position_rule(config, True) == "rope"
    print(f"{name}: max abs diff {_max_diff(report.out, official):.2e}")


def test_architectures_of_the_releases_from_their_shapes():
    """Each release's shapes (hub/backbones.py, on the meta device) give timm's model of that name, whose own
    defaults are the network (the arguments written out change nothing), and map onto it key for key."""
    releases = {  # official arguments, timm name (None: timm has none, the arguments describe it)
        "dinov3_vits16": ({"dim": 384, "depth": 12, "heads": 6}, "vit_small_patch16_dinov3"),
        "dinov3_vits16plus": ({"dim": 384, "depth": 12, "heads": 6, "ffn": "swiglu", "ffn_ratio": 6.0},
                              "vit_small_plus_patch16_dinov3"),
        "dinov3_vitb16": ({"dim": 768, "depth": 12, "heads": 12}, "vit_base_patch16_dinov3"),
        "dinov3_vitl16": ({"dim": 1024, "depth": 24, "heads": 16}, "vit_large_patch16_dinov3"),
        "dinov3_vitl16plus": ({"dim": 1024, "depth": 24, "heads": 16, "ffn": "swiglu", "ffn_ratio": 6.0}, None),
        "dinov3_vith16plus": ({"dim": 1280, "depth": 32, "heads": 20, "ffn": "swiglu", "ffn_ratio": 6.0},
                              "vit_huge_plus_patch16_dinov3"),
        "dinov3_vit7b16": ({"dim": 4096, "depth": 40, "heads": 32, "ffn": "swiglu64", "ffn_ratio": 3.0,
                            "qkv_bias": False, "untie_global_and_local_cls_norm": True}, "vit_7b_patch16_dinov3"),
    }
    for release, (args, name) in releases.items():
        for nonzero in (False, True) if args.get("qkv_bias", True) else (False,):
            with torch.device("meta"):
                official = DinoVisionTransformer(patch=16, **args)
            state = official.state_dict()
            state["rope_embed.periods"] = RopePositionEmbedding(args["dim"], args["heads"]).periods
            for i in range(args["depth"]):
                if f"blocks.{i}.attn.qkv.bias" in state:
                    state[f"blocks.{i}.attn.qkv.bias"] = torch.full((3 * args["dim"],), float(nonzero))
                    state[f"blocks.{i}.attn.qkv.bias_mask"] = torch.ones(3 * args["dim"])
                    state[f"blocks.{i}.attn.qkv.bias_mask"][args["dim"]: 2 * args["dim"]] = 0
            del state["mask_token"]
            arch, kwargs, patch, _ = infer_dinov3(state, release)
            suffix = "_qkvb" if nonzero else ""
            assert arch == (f"{name}{suffix}" if name else f"vit_large_patch16_dinov3{suffix}"), release
            assert kwargs["num_heads"] == args["heads"] and kwargs["rope_temperature"] == 100.0, release
            with torch.device("meta"):
                module = timm.create_model(arch, patch_size=patch, num_classes=0, **kwargs)
                named = timm.create_model(arch, num_classes=0) if name else None
            module.rope.register_buffer("periods", module.rope._compute_periods(), persistent=False)  # timm's, real
            timm_state, _, _ = dinov3_to_timm(state, module, arch, release)
            shapes = {k: v.shape for k, v in module.state_dict().items()}
            assert {k: v.shape for k, v in timm_state.items()} == shapes, release
            if named is not None:
                assert {k: v.shape for k, v in named.state_dict().items()} == shapes, release
    sizes = {"convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),  # models/convnext.py convnext_sizes
             "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
             "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
             "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536))}
    for name, (depths, dims) in sizes.items():  # the key mapping: test_convnext_release_through_the_cli
        with torch.device("meta"):
            arch, kwargs, _, _ = infer_dinov3(ConvNeXt(depths, dims).state_dict(), name)
            module, named = timm.create_model(arch, num_classes=0, **kwargs), timm.create_model(arch, num_classes=0)
        assert arch == name
        assert {k: v.shape for k, v in module.state_dict().items()} == {k: v.shape for k, v in
                                                                        named.state_dict().items()}


# ---------------------------------------------------------------------------------------- training checkpoints
def test_training_checkpoint_teacher_student_and_heads(tmp_path):
    """train.py's checkpoint, made one file by dcp_to_torch: {'iteration', 'model': SSLMetaArch, 'optimizer'}; and
    do_test's eval/N/teacher_checkpoint.pth, {'teacher': model_ema}. `--with-heads` keeps the DINO and iBOT heads
    (7 tensors a head, their last layers plain Linear as in DINOv3; computed exactly: the recipe test below) and the
    mask token."""
    meta = SSLMetaArch()
    path = tmp_path / "checkpoint.pth"
    torch.save({"iteration": 12499, "model": meta.state_dict(), "optimizer": _optimizer_state(meta.student)}, path)
    torch.save({"teacher": meta.model_ema.state_dict()}, tmp_path / "teacher_checkpoint.pth")
    backbone = {"mask_token": 1, "rope_embed.periods": 1, "blocks.*.attn.qkv.bias_mask": DEPTH}
    heads = {"dino_head.*": 7, "ibot_head.*": 7}
    for which in ("teacher", "student"):
        report = import_checkpoint(path, tmp_path / which, which=None if which == "teacher" else "student",
                                   with_heads=True)
        net = getattr(meta, which)
        other = "student" if which == "teacher" else "teacher"
        assert (report.fmt, report.which) == ("dinov3", which)
        dropped = _dropped(report)
        gram = len(meta.gram_teacher.state_dict())
        assert dropped.pop("optimizer") > 0 and dropped == {
            f"model.{other}.*": len(net.state_dict()), "model.dino_loss.*": 1, "model.ibot_patch_loss.*": 1,
            "model.model_ema.*": len(meta.teacher.state_dict()), "model.gram_teacher.*": gram, "iteration": 0,
            **heads, **backbone}
        reasons = {d.entry: d.why for d in report.dropped}
        assert reasons["model.model_ema.*"].startswith("the teacher again")
        assert reasons["model.gram_teacher.*"].startswith("the Gram teacher")
        assert read_export_config(report.out)["heads"] == {"method": "dinov3", "file": "heads.safetensors",
                                                          "tensors": 15, "mask_token": True}
        print(f"{which}: max abs diff {_max_diff(report.out, net.backbone):.2e}")
    teacher = import_checkpoint(tmp_path / "teacher_checkpoint.pth", tmp_path / "eval")
    assert (teacher.fmt, teacher.which) == ("dinov3", "teacher") and _dropped(teacher) == {**heads, **backbone}
    assert load_file(str(teacher.out / "model.safetensors")).keys() == \
        load_file(str(tmp_path / "teacher" / "model.safetensors")).keys()
    _max_diff(teacher.out, meta.teacher.backbone)


def test_imported_training_checkpoint_continues_in_the_dinov3_recipe(tmp_path, digits_shards,
                                                                    fresh_accelerate_state):
    """`model.init_from` an import with its heads: the DINOv3 recipe's student and teacher start as the official
    teacher, backbone and heads, so both compute what it computes."""
    from accelerate import Accelerator

    from sslpipe.models.backbones import pooled_features
    from sslpipe.recipes import load_config
    from sslpipe.recipes.dinov3 import DINOv3Recipe

    meta = SSLMetaArch()
    torch.save({"iteration": 99, "model": meta.state_dict()}, tmp_path / "checkpoint.pth")
    report = import_checkpoint(tmp_path / "checkpoint.pth", tmp_path / "out", with_heads=True, img_size=SIZE)
    kwargs = {k: v for k, v in report.model_args.items() if k not in ("img_size", "patch_size", "dynamic_img_size",
                                                                       "global_pool", "num_classes")}
    kwargs_yaml = yaml.safe_dump(kwargs, default_flow_style=True).strip()  # 1.0e-05: YAML reads 1e-05 as text
    cfg = load_config(REPO / "recipes/demo_dinov3.yaml", [
        f"data.train={digits_shards}", f"crops.global_size={SIZE}", f"model.arch={report.arch}",
        f"model.patch_size={PATCH}", f"model.kwargs={kwargs_yaml}", f"dinov3.head.out_dim={OUT}",
        f"dinov3.head.patch_out_dim={OUT}", "dinov3.head.hidden_dim=32", "dinov3.head.bottleneck_dim=16",
        f"model.init_from={report.out}", "data.batch_size=4", "data.num_workers=0"])
    recipe = DINOv3Recipe(cfg)
    recipe.build(Accelerator(cpu=True))
    teacher, x = meta.teacher, _x((SIZE, 48))
    with torch.no_grad():
        want = teacher.backbone(x)
        for net in (recipe.student.eval(), recipe.teacher):
            got = pooled_features(net.backbone, x)
            torch.testing.assert_close(got, want, **TOL)
            for head in ("dino_head", "ibot_head"):
                torch.testing.assert_close(getattr(net, head)(got), teacher[head](want), **TOL)


def test_bfloat16_rope_periods_and_no_storage_tokens(tmp_path):
    """Training with pos_embed_rope_dtype bf16 stores bfloat16 periods: the base is still read (100), and the export
    computes what the official network computes in float32. Without storage tokens (ssl_default_config) timm's
    filter is given an empty token list, and the CLS stays the only prefix token."""
    official = official_vit(2, dtype=torch.bfloat16, n_storage_tokens=0)
    torch.save(official.state_dict(), tmp_path / "bf16.pth")
    report = import_checkpoint(tmp_path / "bf16.pth", tmp_path / "out", img_size=SIZE)
    assert report.model_args["rope_temperature"] == 100.0 and report.model_args["num_reg_tokens"] == 0
    assert any("torch.bfloat16" in n and "timm in float32" in n for n in report.notes)
    official.rope_embed.dtype = torch.float32
    official.rope_embed.init_weights()
    _max_diff(report.out, official)


# -------------------------------------------------------------------------------------------------- ConvNeXt
def test_convnext_release_through_the_cli(tmp_path, capsys):
    """A distilled ConvNeXt (hub/backbones.py dinov3_convnext_*): timm's convnext with the shapes' depths and widths;
    `norms.3` is the final norm listed again."""
    official = randomise(ConvNeXt(), 3)
    state = official.state_dict()
    torch.save(state, tmp_path / "dinov3_convnext.pth")
    assert main(["import", str(tmp_path / "dinov3_convnext.pth"), str(tmp_path / "out"), "--format", "dinov3",
                 "--img-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "dinov3 layout (--format)" in printed and "architecture convnext_tiny (inferred from the shapes)" in printed
    config = read_export_config(tmp_path / "out")
    assert config["model_args"] == {"depths": [1, 1, 2, 1], "dims": [8, 16, 24, 32], "num_classes": 0}
    assert config["source"]["dropped"] == [{"entry": "norms.*", "tensors": 2,
                                            "why": "the final norm again (ConvNeXt.norms[3] is norm)"}]
    assert len(load_file(str(tmp_path / "out" / "model.safetensors"))) == len(state) - 2
    print(f"convnext: max abs diff {_max_diff(tmp_path / 'out', official, [(64, 64), (96, 96), (64, 96)]):.2e}")


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case,expected", [
    ("key_bias", r"blocks\.0\.attn\.qkv\.bias has a non-zero key bias \(trained with mask_k_bias false\)"),
    ("other_width", r"does not fit vit_small_patch16_dinov3_qkvb .*shape checkpoint vs model: blocks\.0\.attn\.proj"
                    r"\.bias \(128,\) vs \(384,\).*These weights are no vit_small_patch16_dinov3_qkvb"),
    ("other_patch", r"its patches are 8 px, vit_small_patch16_dinov3_qkvb has 16 px patches.*leave --arch out"),
    ("other_heads", r"its 8 RoPE periods \(head width 32\) are not those of vit_small_patch16_dinov3_qkvb \(16"),
    ("needs_qkvb", r"its q/v biases are not zero and vit_base_patch16_dinov3 has none: pass --arch "
                   r"vit_base_patch16_dinov3_qkvb"),
    ("no_rope", r"is a DINOv3 ViT with rotary position embeddings; vit_small_patch16_224 has none"),
    ("min_max_periods", r"its RoPE periods .* follow no base"),
    ("cls_norm", r"its CLS token has a final norm of its own \(`cls_norm`"),
    ("as_dinov2", r"--format dinov2, but .* has the keys of a dinov3 checkpoint: leave --format out"),
    ("dinov2_as_dinov3", r"--format dinov3, but .* has the keys of a dinov2 checkpoint"),
    ("convnext_norms", r"norms\.3\.weight is not the final norm"),
    ("dcp_folder", r"is a torch\.distributed\.checkpoint folder .* dcp_to_torch"),
])
def test_bad_inputs_give_one_line(tmp_path, case, expected):
    options, source = {}, tmp_path / "bad.pth"
    if case == "key_bias":
        state = official_vit(4, mask_k_bias=False).state_dict()
    elif case in ("other_width", "other_heads"):  # head width 64 as timm's: the periods agree, the widths not
        state = official_vit(4, dim=128 if case == "other_width" else DIM, patch=16).state_dict()
        options = {"arch": "vit_small_patch16_dinov3_qkvb"}
    elif case == "other_patch":  # timm's eva filter would resample the 8 px patch embedding to 16 px silently
        state, options = official_vit(4, dim=384, heads=6).state_dict(), {"arch": "vit_small_patch16_dinov3_qkvb"}
    elif case == "needs_qkvb":
        state, options = official_vit(4, dim=128).state_dict(), {"arch": "vit_base_patch16_dinov3"}
    elif case == "no_rope":
        state, options = official_vit(4).state_dict(), {"arch": "vit_small_patch16_224"}
    elif case == "min_max_periods":
        state = official_vit(4, base=None, min_period=0.5, max_period=90.0).state_dict()
    elif case == "cls_norm":
        state = official_vit(4, untie_cls_and_patch_norms=True).state_dict()
    elif case == "as_dinov2":
        state, options = official_vit(4).state_dict(), {"fmt": "dinov2"}
    elif case == "dinov2_as_dinov3":
        state, options = randomise(DinoV2ViT(num_register_tokens=4), 4).state_dict(), {"fmt": "dinov3"}
    elif case == "convnext_norms":
        state = randomise(ConvNeXt(), 4).state_dict()
        state["norms.3.weight"] = state["norms.3.weight"] + 1
    else:
        source.mkdir()
        (source / ".metadata").write_bytes(b"")
        state = None
    if state is not None:
        torch.save(state, source)
    with pytest.raises(UnusableCheckpoint, match=re.compile(expected, re.S)) as err:
        import_checkpoint(source, tmp_path / "out", **options)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_rope_needs_no_position_grid():
    """An export of the dinov3 format is never resized: its rule is `rope`, and fit_position_grid leaves the state."""
    module = timm.create_model("vit_small_patch16_224", img_size=SIZE, patch_size=PATCH, embed_dim=DIM, depth=1,
                               num_heads=HEADS, num_classes=0)
    state = {"pos_embed": torch.zeros(1, 5, DIM)}  # another grid than the module's: any other rule would resize it
    assert fit_position_grid(state, module, export_position_rule({"source": {"format": "dinov3"}}, True)) == []
    assert state["pos_embed"].shape == (1, 5, DIM)
