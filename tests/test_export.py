"""Export / import of backbones: timm round trip, run-directory key layouts, clear errors."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from sslpipe.export import export_backbone, export_run, load_backbone, strip_prefix

torch.set_num_threads(1)
VIT_ARGS = {"img_size": 32, "patch_size": 4, "depth": 2, "dynamic_img_size": True}
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    """Any attempt of timm to fetch weights fails the test."""
    from timm.models import _builder

    def refuse(*args, **kwargs):
        raise AssertionError("timm tried to download weights")

    for name in ("load_state_dict_from_url", "load_state_dict_from_hf", "download_cached_file"):
        monkeypatch.setattr(_builder, name, refuse)


def _vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, **VIT_ARGS).eval()


def _timm_reload(out, arch, model_args):
    """The plain-timm recipe from the export module docstring."""
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == arch and cfg["model_args"] == {**model_args, "num_classes": 0}
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
                             **cfg["model_args"]).eval()


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("arch,model_args,size", [
    ("vit_tiny_patch16_224", VIT_ARGS, 32),
    ("resnet18", {}, 32),
])
def test_roundtrip_through_timm(tmp_path, arch, model_args, size):
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=0, **model_args).eval()
    out = export_backbone(model, tmp_path / "exp", arch=arch, model_args=model_args, img_size=size, mean=MEAN,
                          std=STD, source={"run_dir": "r", "step": 3, "which": "teacher"})
    # file keys == model keys: nothing missing, nothing unexpected
    assert load_file(str(out / "model.safetensors")).keys() == model.state_dict().keys()
    x = torch.randn(2, 3, size, size)
    for reloaded in (_timm_reload(out, arch, model_args), load_backbone(out), load_backbone(out / "model.safetensors")):
        _assert_same_state(model, reloaded)
        with torch.no_grad():
            assert torch.equal(reloaded(x), model(x))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mean"] == list(MEAN) and cfg["std"] == list(STD) and cfg["img_size"] == size
    assert cfg["source"]["step"] == 3 and cfg["source"]["which"] == "teacher"
    assert load_backbone(out).pretrained_cfg["mean"] == MEAN


def test_export_from_the_training_device(tmp_path, device):
    """A module still on the GPU (the teacher at the end of training) exports CPU tensors and stays where it was."""
    model = _vit().to(device)
    out = export_backbone(model, tmp_path / "exp", arch="vit_tiny_patch16_224", model_args=VIT_ARGS, img_size=32,
                          mean=MEAN, std=STD, source={})
    assert next(model.parameters()).device.type == device
    assert all(t.device.type == "cpu" for t in load_file(str(out / "model.safetensors")).values())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(out)(x), model(x.to(device)).cpu(), atol=1e-4, rtol=1e-4)


def test_export_strips_mask_token(tmp_path):
    model = _vit()
    model.mask_token = nn.Parameter(torch.ones(1, 192))
    out = export_backbone(model, tmp_path, arch="vit_tiny_patch16_224", model_args=VIT_ARGS, img_size=32,
                          mean=MEAN, std=STD, source={})
    keys = load_file(str(out / "model.safetensors")).keys()
    assert "mask_token" not in keys and "cls_token" in keys


def test_export_check_catches_wrong_model_args(tmp_path):
    model = _vit()
    # qkv_bias=False gives a model without the qkv biases: the strict reload must refuse the file
    with pytest.raises(RuntimeError, match="does not match"):
        export_backbone(model, tmp_path, arch="vit_tiny_patch16_224", model_args={**VIT_ARGS, "qkv_bias": False},
                        img_size=32, mean=MEAN, std=STD, source={})


def test_strip_prefix_layouts_and_error():
    w = torch.zeros(1)
    assert strip_prefix({"teacher.backbone.vit.cls_token": w, "teacher.backbone.mask_token": w,
                         "teacher.head.last_layer.weight": w, "loss.center": w}, "teacher") == {"cls_token": w}
    assert strip_prefix({"module.backbone.fc.weight": w, "module.head.x": w}) == {"fc.weight": w}
    assert strip_prefix({"backbone._orig_mod.blocks.0.w": w}) == {"_orig_mod.blocks.0.w": w}
    with pytest.raises(KeyError, match=r"head\.mlp"):
        strip_prefix({"head.mlp.weight": w, "loss.center": w})


def _fake_run(tmp_path, teacher_prefix: str, student_prefix: str):
    """A run directory as the trainer writes it, with a teacher and a (different) student backbone."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    (run / "checkpoints" / "step_00000004").mkdir()  # an older checkpoint that must not be picked
    cfg = {"model": {"arch": "vit_tiny_patch16_224", "patch_size": 4, "kwargs": {"depth": 2}},
           "crops": {"global_size": 32, "mean": list(MEAN), "std": list(STD)}, "seed": 0}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    teacher, student = _vit(1), _vit(2)
    extra = {f"{teacher_prefix}{k}": v.clone() for k, v in teacher.state_dict().items()}
    extra.update({"teacher.head.last_layer.weight": torch.randn(4, 3), "loss.center": torch.zeros(1, 4)})
    if teacher_prefix.endswith("vit."):
        extra["teacher.backbone.mask_token"] = torch.zeros(1, 192)
    save_file(extra, str(ckpt / "extra_state.safetensors"))
    model = {f"{student_prefix}{k}": v.clone() for k, v in student.state_dict().items()}
    root = student_prefix.split("backbone.")[0] if "backbone." in student_prefix else ""  # DDP's module. prefix
    model[root + "head.w"] = torch.ones(2)  # a head beside the backbone, never exported
    save_file(model, str(ckpt / "model.safetensors"))
    return run, teacher, student


@pytest.mark.parametrize("teacher_prefix,student_prefix", [
    ("teacher.backbone.vit.", "module.backbone.vit."),
    ("teacher.backbone.", "backbone."),
    ("teacher.encoder.model.", "encoder.model."),  # U2PL / supervised_seg CNN encoders
])
def test_export_run(tmp_path, teacher_prefix, student_prefix):
    run, teacher, student = _fake_run(tmp_path, teacher_prefix, student_prefix)
    out = export_run(run)
    assert out == run / "export" / "teacher"
    _assert_same_state(teacher, load_backbone(out))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["source"]["step"] == 10 and cfg["source"]["which"] == "teacher"
    assert cfg["model_args"] == {**VIT_ARGS, "num_classes": 0} and cfg["mean"] == list(MEAN)
    reloaded = _timm_reload(out, "vit_tiny_patch16_224", VIT_ARGS)
    _assert_same_state(teacher, reloaded)

    out_s = export_run(run, which="student", out=tmp_path / "s", checkpoint=10)
    _assert_same_state(student, load_backbone(out_s))


def test_export_run_errors(tmp_path):
    run, _, _ = _fake_run(tmp_path, "teacher.backbone.", "backbone.")
    with pytest.raises(FileNotFoundError, match="step 7"):
        export_run(run, checkpoint=7)
    with pytest.raises(FileNotFoundError, match="extra_state.safetensors"):
        export_run(run, checkpoint="step_00000004")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["kwargs"] = {"depth": 3}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(RuntimeError, match="does not match model.arch"):
        export_run(run)
