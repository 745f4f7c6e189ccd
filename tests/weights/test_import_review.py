"""`sslpipe import` and `model.init_from` against the review of both (notes/review_import.md, findings 1-10): timm
layouts that share official key names, an export imported again, shape-invisible attributes, iBOT's student mask
token, DINOv3's patch size, normalisation, Hugging Face transformers folders and mis-named files.

Networks are tiny (width 64-192, 1-2 blocks, 32 px inputs); where timm has to build a full-size model only to read
its keys, it is built on the meta device.
"""
from __future__ import annotations

import json
import re
from functools import partial

import pytest
import timm
import torch
import transformers
import yaml
from dinov3_official import official_vit
from helpers import REPO
from safetensors.torch import load_file, save_file
from test_import import (
    DDP,
    DEPTH,
    DIM,
    PATCH,
    SIZE,
    TIMM_ARGS,
    DINOHead,
    DinoViT,
    MultiCropWrapper,
    _same_outputs,
    _save,
    _x,
    randomise,
)
from torch import nn

from sslpipe.cli import main
from sslpipe.weights.export import export_backbone, load_backbone, load_export_into, read_export_config
from sslpipe.weights.heads import load_heads, write_heads
from sslpipe.weights.importing import import_checkpoint
from sslpipe.weights.layouts import UnusableCheckpoint, detect_format

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("no_download")


def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter moved off its initial value (buffers untouched: timm's RoPE buffers are not saved)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.parameters():
            t.add_(0.05 * torch.randn(t.shape, generator=gen))
    return model.eval()


# ------------------------------------------------------------------------- 1, 7: timm layouts read as official ones
def test_timm_rope_ape_state_dict_is_detected_as_timm(tmp_path):
    """timm's vit_*_rope_ape_224 (Eva: `gamma_1`, a grid-only `pos_embed`, rotary buffers not saved) is no iBOT
    checkpoint: detected as timm, it is not imported into a ViT without RoPE, and imported with its architecture
    (a timm model folder) it computes what the source computes."""
    arch, args = "vit_small_patch16_rope_ape_224", {"img_size": SIZE, "patch_size": PATCH, "embed_dim": 64,
                                                     "depth": DEPTH, "num_heads": 2}
    model = _perturbed(timm.create_model(arch, num_classes=0, **args), 1)
    state = model.state_dict()
    assert "blocks.0.gamma_1" in state and state["pos_embed"].shape[1] == (SIZE // PATCH) ** 2
    assert detect_format({}, state, ".pth") == "timm"
    with pytest.raises(UnusableCheckpoint, match=r"\(timm layout\) does not fit .*pass --arch|--arch TIMM_NAME"):
        import_checkpoint(_save(tmp_path, state, "rope_ape.pth"), tmp_path / "refused")
    folder = tmp_path / "hub"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": arch, "model_args": args}))
    report = import_checkpoint(folder, tmp_path / "out")
    assert report.arch == arch and isinstance(load_backbone(report.out).rope, nn.Module)
    _same_outputs(report.out, model)


@pytest.mark.parametrize("arch,args", [
    ("vit_pe_lang_large_patch14_448", {}),  # cls_token + a 1 + square table, but a pre-norm iBOT never has
    ("vit_pe_spatial_gigantic_patch14_448", {}),  # no cls_token
    ("vit_large_patch16_rope_ape_224", {}),
    ("twins_svt_small", {}),  # `blocks.S.I.attn.qkv` as DINOv2's chunks, beside `attn.q` / `attn.kv`
])
def test_timm_models_with_official_looking_keys_are_detected_as_timm(arch, args):
    with torch.device("meta"):
        state = timm.create_model(arch, num_classes=0, **args).state_dict()
    assert detect_format({}, state, ".pth") == "timm"


def test_a_refusal_after_detection_names_format_timm(tmp_path):
    """Weights read as an official layout by their keys that do not fit: the hint says how to import them as timm's.
    """
    official = randomise(DinoViT(layer_scale="ibot"), 2)
    path = _save(tmp_path, official.state_dict(), "w.pth")
    with pytest.raises(UnusableCheckpoint, match=r"\(ibot layout\).*read as the ibot layout; if this is a timm "
                                                 r"state dict, pass --format timm\)$") as err:
        import_checkpoint(path, tmp_path / "out", arch="vit_small_patch16_224")
    assert "\n" not in str(err.value)


# -------------------------------------------------------------------------------------- 2: an export imported again
def test_export_imported_again_at_another_size_keeps_the_official_rule(tmp_path):
    """An import of an official DINO ViT, imported again at 48 px, resizes its grid by DINO's rule (scale factor
    (n + 0.1) / N), as the official network does at 48 px, and records DINO as its layout, so later sizes do too."""
    official = randomise(DinoViT(), 5)
    first = import_checkpoint(_save(tmp_path, official.state_dict(), "dino.pth"), tmp_path / "first", fmt="dino")
    again = import_checkpoint(first.out, tmp_path / "again", img_size=48)
    assert any("(n + 0.1) / N" in n for n in again.notes) and "an sslpipe export of a dino network" in again.notes
    _same_outputs(again.out, official, 48)
    source = read_export_config(again.out)["source"]
    assert (source["format"], source["imported_as"], source["export_source"]["format"]) == ("dino", "safetensors",
                                                                                           "dino")


# ------------------------------------------------------------------------- 3: model.init_from, what no shape shows
def _tiny_export(tmp_path, arch: str, args: dict) -> tuple[nn.Module, object]:
    model = _perturbed(timm.create_model(arch, num_classes=0, **args), 3)
    out = export_backbone(model, tmp_path / arch, arch=arch, model_args=args, img_size=SIZE, mean=(0.5,) * 3,
                          std=(0.5,) * 3, source={"format": "dinov3" if "dinov3" in arch else None})
    return model, out


D3 = {"img_size": SIZE, "patch_size": PATCH, "embed_dim": 64, "depth": DEPTH, "num_heads": 2,
      "dynamic_img_size": True, "global_pool": "token"}


@pytest.mark.parametrize("arch,args,other,expected", [
    ("vit_tiny_patch16_224", TIMM_ARGS, {"num_heads": 6},
     r"num_heads of blocks\.0\.attn = 3, the backbone built here 6 .*: set model\.kwargs\.num_heads=3$"),
    ("vit_tiny_patch16_224", TIMM_ARGS, {"norm_layer": partial(nn.LayerNorm, eps=1e-5)},
     r"norm eps of blocks\.0\.norm1 = 1e-06, the backbone built here 1e-05 .*: build model\.arch=vit_tiny"),
    ("vit_tiny_patch16_224", TIMM_ARGS, {"global_pool": "avg", "fc_norm": False},
     r"global_pool = token, the backbone built here avg .*: set model\.kwargs\.global_pool=token$"),
    ("vit_small_patch16_dinov3", D3, {"num_heads": 4}, r"num_heads of blocks\.0\.attn = 2, .* here 4"),
    ("vit_small_patch16_dinov3", D3, {"rope_temperature": 10000.0},
     r"RoPE temperature of rope = 100\.0, the backbone built here 10000\.0 .*: set model\.kwargs\.rope_temperature"),
])
def test_init_from_refuses_what_no_shape_shows(tmp_path, arch, args, other, expected):
    """An export loaded into a backbone whose heads, RoPE base, norm eps or pooling differ: every shape fits, the
    network computes something else, so it is refused in one line naming the key; the same backbone loads."""
    model, out = _tiny_export(tmp_path, arch, args)
    differs = timm.create_model(arch, num_classes=0, **{**args, **other})
    with pytest.raises(ValueError, match=re.compile(expected)) as err:
        load_export_into(differs, out)
    assert "\n" not in str(err.value)
    same = timm.create_model(arch, num_classes=0, **args).eval()
    assert load_export_into(same, out) == []
    with torch.no_grad():
        torch.testing.assert_close(same(_x()), model(_x()))


# --------------------------------------------------------------------------------- 4: iBOT's mask token and heads
def test_ibot_teacher_heads_carry_the_students_mask_token(tmp_path):
    """main_ibot.py builds the MIM token in the student only: the teacher's heads (the default) take it from there."""
    def net(seed, mim):
        return MultiCropWrapper(randomise(DinoViT(layer_scale="ibot", masked_im_modeling=mim), seed),
                                randomise(DINOHead(DIM, patch_out=64), seed + 1))

    student, teacher = net(1, True), net(3, False)
    path = _save(tmp_path, {"student": DDP(student).state_dict(), "teacher": DDP(teacher).state_dict(), "epoch": 1})
    report = import_checkpoint(path, tmp_path / "out", with_heads=True)
    assert report.which == "teacher"
    kept = load_file(str(report.out / "heads.safetensors"))
    assert torch.equal(kept["backbone.mask_token"], student.backbone.masked_embed.detach())
    assert read_export_config(report.out)["heads"]["mask_token"] is True
    assert any("mask token from the student" in n for n in report.notes)


def test_heads_without_a_mask_token_say_why_truthfully(tmp_path):
    """Heads of a network that had no mask token: the token starts at zero, and the note does not blame the export."""
    _, out = _tiny_export(tmp_path, "vit_tiny_patch16_224", TIMM_ARGS)
    head = nn.Linear(4, 2)
    write_heads(out, {f"head.{k}": v for k, v in head.state_dict().items()}, "ibot")
    net = nn.Module()
    net.backbone, net.head = nn.Module(), nn.Linear(4, 2)
    net.backbone.mask_token = nn.Parameter(torch.zeros(1, 4))
    notes = load_heads(net, out, "ibot")
    assert "the mask token starts at zero (the network the heads came from had none)" in notes
    assert not any("predates" in n for n in notes)


# --------------------------------------------------------------------------------------------- 6: normalisation
def test_mean_and_std_are_recorded_and_the_normalisation_is_reported(tmp_path, capsys):
    path = _save(tmp_path, randomise(DinoViT(), 6).state_dict(), "dino.pth")
    assert main(["import", str(path), str(tmp_path / "given"), "--mean", "0.5", "0.4", "0.3", "--std", "0.2", "0.2",
                 "0.25"]) == 0
    printed = capsys.readouterr().out
    config = read_export_config(tmp_path / "given")
    assert (config["mean"], config["std"]) == ([0.5, 0.4, 0.3], [0.2, 0.2, 0.25])
    assert "normalisation: mean (0.5, 0.4, 0.3) std (0.2, 0.2, 0.25) (given with --mean/--std)" in printed
    assert main(["import", str(path), str(tmp_path / "assumed")]) == 0
    assert "normalisation: mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225) (ImageNet's, assumed" in \
        capsys.readouterr().out
    with pytest.raises(UnusableCheckpoint, match="pass --mean and --std together"):
        import_checkpoint(path, tmp_path / "half", mean=(0.5, 0.5, 0.5))


def test_dinov3_vit_large_with_local_cls_norm_warns_of_the_satellite_normalisation(tmp_path):
    """The SAT-493M ViT-L unties its local CLS norm (the LVD-1689M one does not): its statistics are named."""
    official = official_vit(8, dim=1024, heads=16, depth=1, untie_global_and_local_cls_norm=True)
    path = _save(tmp_path, official.state_dict(), "vitl.pth")
    report = import_checkpoint(path, tmp_path / "out", img_size=SIZE)
    assert any("SAT-493M" in n and "--mean 0.43 0.411 0.296 --std 0.213 0.156 0.143" in n for n in report.notes)
    given = import_checkpoint(path, tmp_path / "given", img_size=SIZE, mean=(0.430, 0.411, 0.296),
                              std=(0.213, 0.156, 0.143))
    assert not any("SAT-493M" in n for n in given.notes)
    assert read_export_config(given.out)["mean"] == [0.430, 0.411, 0.296]


# ---------------------------------------------------------------------------- 8: Hugging Face transformers folders
@pytest.mark.parametrize("kind", ["dinov2", "dinov2_swiglu", "dinov2_with_registers"])
def test_transformers_dinov2_folder(tmp_path, kind):
    """A `save_pretrained` folder of transformers' Dinov2Model (the hub's facebook/dinov2-*) maps onto timm's
    DINOv2 ViT, the heads read from its config.json: the export's feature is the model's pooler output."""
    common = {"hidden_size": 64, "num_hidden_layers": DEPTH, "num_attention_heads": 4, "image_size": SIZE,
              "patch_size": PATCH}
    if kind == "dinov2_with_registers":
        hf = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**common,
                                                                                         num_register_tokens=4))
    else:
        hf = transformers.Dinov2Model(transformers.Dinov2Config(**common, use_swiglu_ffn=kind == "dinov2_swiglu"))
    _perturbed(hf, 9).save_pretrained(tmp_path / "hf")
    report = import_checkpoint(tmp_path / "hf", tmp_path / "out")
    assert (report.fmt, report.model_args["num_heads"]) == ("dinov2", 4)
    assert {d.entry for d in report.dropped} == {"mask_token"}
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(report.out)(_x()), hf(pixel_values=_x()).pooler_output,
                                   atol=1e-5, rtol=1e-5)


def _tiny_dinov3(seed: int, **config) -> transformers.DINOv3ViTModel:
    """A randomly initialised transformers DINOv3ViTModel, 64 wide, 4 heads of 16 (4 RoPE periods each)."""
    args = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": DEPTH, "num_attention_heads": 4,
            "patch_size": 16, "num_register_tokens": 4, **config}
    return _perturbed(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**args)), seed)


@pytest.mark.parametrize("kind", ["mlp", "swiglu", "no_biases_or_registers_bin"])
def test_transformers_dinov3_vit_folder(tmp_path, kind):
    """A transformers DINOv3ViTModel folder (the hub's facebook/dinov3-vit*) maps onto timm's vit_*_dinov3: the
    RoPE periods from rope_theta and the head width, the missing biases zero; the export's feature is the model's
    pooler output at its size and at another (RoPE: no grid to resize). The last kind: the in-memory names
    (`model.layer.N`) in a pytorch_model.bin, no register tokens, every optional bias off, another RoPE base."""
    config = {"mlp": {}, "swiglu": {"use_gated_mlp": True, "hidden_act": "silu"},
              "no_biases_or_registers_bin": {"num_register_tokens": 0, "query_bias": False, "value_bias": False,
                                             "proj_bias": False, "mlp_bias": False, "rope_theta": 200.0}}[kind]
    hf = _tiny_dinov3(11, **config)
    folder = tmp_path / "hf"
    if kind.endswith("_bin"):
        folder.mkdir()
        torch.save(hf.state_dict(), folder / "pytorch_model.bin")
        hf.config.to_json_file(folder / "config.json")
    else:
        hf.save_pretrained(folder)
    report = import_checkpoint(folder, tmp_path / "out")
    args = report.model_args
    assert (report.fmt, args["num_heads"], args["swiglu_mlp"], args["rope_temperature"]) == (
        "dinov3", 4, kind == "swiglu", config.get("rope_theta", 100.0))
    assert args["num_reg_tokens"] == config.get("num_register_tokens", 4)
    assert {d.entry for d in report.dropped} == {"mask_token", "rope_embed.periods"}
    assert any("transformers dinov3_vit folder" in n and "rope_theta" in n for n in report.notes)
    backbone = load_backbone(report.out)
    with torch.no_grad():
        for size in (224, 96):
            out = hf(pixel_values=_x(size))
            torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])
            torch.testing.assert_close(backbone(_x(size)), out.pooler_output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config, expected", [
    ({"key_bias": True}, r"non-zero key bias .*timm's Eva fixes the key bias at zero"),
    ({"use_gated_mlp": True}, r"config\.json sets hidden_act='gelu' with use_gated_mlp=True \(timm computes silu\)"),
    ({"layer_norm_eps": 1e-6}, r"config\.json sets layer_norm_eps=1e-06 \(timm's is 1e-5\)")])
def test_transformers_dinov3_vit_folder_timm_cannot_compute_is_refused_in_one_line(tmp_path, config, expected):
    _tiny_dinov3(12, **config).save_pretrained(tmp_path / "hf")
    with pytest.raises(UnusableCheckpoint, match=expected) as err:
        import_checkpoint(tmp_path / "hf", tmp_path / "out")
    assert "\n" not in str(err.value)


def test_transformers_dinov3_convnext_folder_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"stages.0.layers.0.gamma": torch.zeros(8)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov3_convnext",
                                                    "architectures": ["DINOv3ConvNextModel"]}))
    with pytest.raises(UnusableCheckpoint, match=r"is a Hugging Face transformers dinov3_convnext folder .*reads "
                                                 r"transformers' dinov2 and dinov3_vit folders only; import the "
                                                 r"official DINOv3 \.pth .* or timm's weights") as err:
        import_checkpoint(folder, tmp_path / "out")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------- 9: bf16 RoPE periods
def test_bfloat16_rope_note_says_the_periods_differ(tmp_path):
    official = official_vit(2, dtype=torch.bfloat16, n_storage_tokens=0)
    report = import_checkpoint(_save(tmp_path, official.state_dict(), "bf16.pth"), tmp_path / "out", img_size=SIZE)
    assert any("timm computes the periods exactly" in n and "0.3 %" in n for n in report.notes)


# ------------------------------------------------------------------------------------------ 10: mis-named files
@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_misnamed_safetensors_and_torchscript_say_what_the_file_is(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "weights.pth"))
    with pytest.raises(UnusableCheckpoint, match=r"weights\.pth is a safetensors file .*rename it to "
                                                 r"weights\.safetensors"):
        import_checkpoint(tmp_path / "weights.pth", tmp_path / "a")
    torch.jit.save(torch.jit.script(nn.Linear(3, 3)), str(tmp_path / "scripted.pt"))
    with pytest.raises(UnusableCheckpoint, match=r"scripted\.pt is a TorchScript archive \(torch\.jit\.save\), not a "
                                                 r"state dict: .*torch\.jit\.load"):
        import_checkpoint(tmp_path / "scripted.pt", tmp_path / "b")


# ------------------------------------------------------------------------- the DINOv3 ViT-L recipe's architecture
def test_dinov3_vit_large_recipe_names_timms_eps_and_fixed_key_bias():
    """[I] (vitl_im1k_lin834.yaml) trains LayerNorm eps 1e-6 and a key bias; timm's network has neither, and the
    recipe and docs/methods.md say so (checked against timm, so the note stays true)."""
    recipe = (REPO / "recipes/dinov3_vit_large_in1k.yaml").read_text()
    arch = yaml.safe_load(recipe)["model"]["arch"]
    with torch.device("meta"):
        net = timm.create_model(arch, num_classes=0)
    assert net.blocks[0].norm1.eps == net.norm.eps == 1e-5
    attn = net.blocks[0].attn
    assert "k_bias" in dict(attn.named_buffers()) and "k_bias" not in dict(attn.named_parameters())
    for text in (recipe, (REPO / "docs/methods.md").read_text()):
        flat = " ".join(text.replace("#", " ").split())
        assert "eps 1e-5 and a key bias fixed at zero" in flat and "eps 1e-6" in flat and "trained key bias" in flat


def test_transformers_dinov2_folder_saved_as_pytorch_model_bin(tmp_path):
    """save_pretrained(safe_serialization=False)'s pytorch_model.bin: read with the same config.json."""
    hf = _perturbed(transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=SIZE, patch_size=PATCH)), 10)
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")  # transformers 5's own names: q_proj, k_proj, ...
    hf.config.to_json_file(folder / "config.json")
    report = import_checkpoint(folder, tmp_path / "out")
    assert report.model_args["num_heads"] == 2
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(report.out)(_x()), hf(pixel_values=_x()).pooler_output,
                                   atol=1e-5, rtol=1e-5)
