"""Export / import of backbones: timm round trip, run-directory key layouts, clear errors."""
from __future__ import annotations

import hashlib
import json

import pytest
import timm
import torch
import yaml
from helpers import REPO
from safetensors.torch import load_file, save_file
from torch import nn

from sslpipe.cli import main
from sslpipe.recipes import load_config
from sslpipe.weights.checkpoint import (
    CheckpointInvalid,
    DamagedCheckpointWarning,
    find_checkpoint,
    list_checkpoints,
)
from sslpipe.weights.export import export_backbone, load_backbone, rewrite_config
from sslpipe.weights.hashing import sha256_file
from sslpipe.weights.heads import load_heads, write_heads
from sslpipe.weights.run_export import export_run, strip_prefix
from sslpipe.weights.verify import verify_export

torch.set_num_threads(1)
VIT_ARGS = {"img_size": 32, "patch_size": 4, "depth": 2, "dynamic_img_size": True}
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


pytestmark = pytest.mark.usefixtures("no_download")


def _vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, **VIT_ARGS).eval()


def _timm_reload(out, arch, model_args):
    """The plain-timm recipe from the export module docstring."""
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == arch and cfg["model_args"] == {**model_args, "num_classes": 0}
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"),
                                                                                custom_load=False),
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


def _checkpoint(run, step: int):
    """A complete (empty) checkpoint folder: trainer_state.json is what makes it one."""
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ckpt


def _fake_run(tmp_path, teacher_prefix: str, student_prefix: str):
    """A run directory as the trainer writes it, with a teacher and a (different) student backbone."""
    run = tmp_path / "run"
    ckpt = _checkpoint(run, 10)
    _checkpoint(run, 4)  # an older checkpoint that must not be picked
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


def test_export_skips_an_incomplete_checkpoint_and_refuses_one_named(tmp_path, capsys):
    """One finder for export, eval-seg and predict: a `step_N` folder without trainer_state.json is incomplete. The
    newest complete checkpoint is exported instead, with a warning naming the folder skipped (as resuming skips a
    damaged one); naming it by step or folder is a one-line error naming it."""
    run, teacher, _ = _fake_run(tmp_path, "teacher.backbone.", "backbone.")
    newer = run / "checkpoints" / "step_00000012"
    newer.mkdir()
    save_file(load_file(str(run / "checkpoints" / "step_00000010" / "extra_state.safetensors")),
              str(newer / "extra_state.safetensors"))
    assert [c.name for c in list_checkpoints(run)] == ["step_00000004", "step_00000010"]
    assert list_checkpoints(run, complete_only=False)[-1] == newer
    with pytest.warns(DamagedCheckpointWarning, match="incomplete checkpoint .*step_00000012"):
        out = export_run(run)
    assert json.loads((out / "config.json").read_text())["source"]["step"] == 10
    _assert_same_state(teacher, load_backbone(out))
    for named in (12, "step_00000012", newer):
        with pytest.raises(CheckpointInvalid, match=f"{newer} is not a complete checkpoint"):
            export_run(run, checkpoint=named)
    assert main(["export", str(run), "--checkpoint", "step_00000012"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{newer} is not a complete checkpoint (no trainer_state.json" in error


def test_find_checkpoint_without_a_complete_one(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="no checkpoints/step_N folders"):
        find_checkpoint(run)
    (run / "checkpoints" / "step_00000003").mkdir(parents=True)
    with pytest.raises(CheckpointInvalid, match="has no complete checkpoint: step_00000003"):
        find_checkpoint(run)
    assert find_checkpoint(run, _checkpoint(run, 2)) == run / "checkpoints" / "step_00000002"
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 5 .*have \[2, 3\]"):
        find_checkpoint(run, 5)


def _card(out):
    """(YAML header, markdown body) of an export's model card."""
    _, header, body = (out / "README.md").read_text().split("---", 2)
    return yaml.safe_load(header), body


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("which, damaged", [("teacher", "extra_state.safetensors"), ("student", "model.safetensors")])
def test_export_refuses_a_checkpoint_whose_weights_fail_their_sha256(tmp_path, which, damaged):
    """A flipped bit in the weights export reads would be exported as the trained network: refused naming the file,
    while a damaged file it does not read (the other network's) is no reason to refuse."""
    run, _, _ = _fake_run(tmp_path, "teacher.backbone.", "backbone.")
    ckpt = run / "checkpoints" / "step_00000010"
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in ckpt.iterdir() if p.suffix != ".json"}
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 10, "files": files}))
    _flip_last_byte(ckpt / damaged)
    with pytest.raises(CheckpointInvalid, match=rf"step_00000010 is damaged \({damaged} does not match its sha256"):
        export_run(run, which=which)
    other = "student" if which == "teacher" else "teacher"
    assert load_backbone(export_run(run, which=other, out=tmp_path / other))


def test_export_run_writes_a_model_card(tmp_path, monkeypatch):
    """Hugging Face header, the recipe's config sha256, the shard manifest's sha256 and the probe results that were
    measured on exactly the exported weights; nothing else."""
    run, teacher, _ = _fake_run(tmp_path, "teacher.backbone.", "backbone.")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text('{"format": "sslpipe-shards/1", "splits": {}}')
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "method": "ibot", "data": {"train": str(shards)}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 4, "epoch": 1, "knn/top1_k20": 0.25}) + "\n"
                                       + json.dumps({"step": 10, "loss": 3.0}) + "\n"
                                       + json.dumps({"step": 10, "epoch": 2, "knn/top1_k20": 0.5}) + "\n")
    out = export_run(run)
    header, body = _card(out)
    assert header == {"library_name": "timm", "pipeline_tag": "image-feature-extraction",
                      "tags": ["timm", "sslpipe", "ibot"]}
    assert _sha256(run / "config.yaml") in body and _sha256(shards / "manifest.json") in body
    assert _sha256(out / "model.safetensors") in body and "step_00000010" in body
    assert "| kNN top1_k20, data.val, measured during training at step 10 | 0.5000 |" in body and "0.2500" not in body

    # the card's own snippet loads the weights in plain timm, with the export's data config for timm's pipeline
    code = body.split("```python")[1].split("```")[0]
    monkeypatch.chdir(out)
    namespace: dict = {}
    exec(code, namespace)
    _assert_same_state(teacher, namespace["model"])
    monkeypatch.undo()
    assert {k: namespace["data_config"][k] for k in ("input_size", "mean", "std", "interpolation")} == {
        "input_size": (3, 32, 32), "mean": MEAN, "std": STD, "interpolation": "bicubic"}
    assert "Inputs: RGB at 32x32 px (bicubic resize), normalised with mean [0.5, 0.4, 0.3] and std" in body
    # ... and its finetune command is one the config accepts
    override = body.split("`sslpipe finetune RECIPE.yaml ")[1].split("`")[0].replace("FOLDER", str(out))
    assert load_config(REPO / "recipes/demo_finetune_m2f.yaml", [override]).model.init_from == str(out)

    # the periodic kNN probed the teacher: the student's card has no result
    _, student_body = _card(export_run(run, which="student", out=tmp_path / "student"))
    assert "None recorded for these weights" in student_body

    # a kNN result of this export folder, written after the folder held these weights, is listed on re-export ...
    knn = {"k": {"20": {"top1": 0.61, "top5": 0.95}}, "n_train": 100, "n_test": 20, "T": 0.07, "backbone": str(out)}
    (run.parent / "knn_pretrained.json").write_text(json.dumps(knn))
    (run.parent / "knn_other.json").write_text(json.dumps({**knn, "backbone": str(tmp_path / "elsewhere")}))
    _, body = _card(export_run(run))
    assert "| kNN k=20, T=0.07, 100 train / 20 val samples (`knn_pretrained.json`) | top1 0.6100, top5 0.9500 |" in body
    assert "knn_other.json" not in body

    # ... and no longer once the folder holds other weights (a newer checkpoint)
    newer = _checkpoint(run, 12)
    extra = load_file(str(run / "checkpoints" / "step_00000010" / "extra_state.safetensors"))
    save_file({k: v + 1 if k.startswith("teacher.backbone.") else v for k, v in extra.items()},
              str(newer / "extra_state.safetensors"))
    _, body = _card(export_run(run))
    assert "knn_pretrained.json" not in body and "None recorded for these weights" in body


def test_card_after_a_roll_back_lists_only_the_trajectory_of_these_weights(tmp_path):
    """`--resume RUN/checkpoints/step_5` keeps the abandoned trajectory's lines after step 5 in metrics.jsonl; the
    card of the new step 10 lists the kNN measured on these weights only (none of the abandoned one's, even a key
    the new trajectory did not log), and a line cut by a crash is skipped."""
    run, _, _ = _fake_run(tmp_path, "teacher.backbone.", "backbone.")
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 5, "epoch": 1, "knn/top1_k20": 0.3},
        {"step": 10, "epoch": 2, "knn/top1_k20": 0.4, "knn/top5_k20": 0.9},  # the abandoned trajectory
        {"step": 5, "event": "resumed", "checkpoint": str(run / "checkpoints" / "step_00000005")},
        {"step": 10, "epoch": 2, "knn/top1_k20": 0.1},  # the weights exported
    ]) + '\n{"step": 10, "epoch": 2, "loss": 1.2')  # a torn last line
    _, body = _card(export_run(run))
    rows = [line for line in body.splitlines() if line.startswith("| kNN")]
    assert rows == ["| kNN top1_k20, data.val, measured during training at step 10 | 0.1000 |"]


def test_card_names_the_manifest_recorded_when_training_started(tmp_path):
    """Shards rewritten after training: the card keeps the manifest sha256 the run recorded when it started, and
    says the file changed since; a resume given other shards adds them."""
    from sslpipe.weights.training_data import record_training_data

    run, _, _ = _fake_run(tmp_path, "teacher.backbone.", "backbone.")
    shards = tmp_path / "shards"
    shards.mkdir()
    manifest = shards / "manifest.json"
    manifest.write_text('{"format": "sslpipe-shards/1", "splits": {"train": 1}}')
    trained_on = _sha256(manifest)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "method": "dino", "data": {"train": str(shards)}}))
    record_training_data(run, str(shards))
    record_training_data(run, str(shards))  # a resume on the same shards: nothing new
    manifest.write_text('{"format": "sslpipe-shards/1", "splits": {"train": 2}}')
    _, body = _card(export_run(run))
    row = f"| training data | `{shards}`, manifest.json sha256 `{trained_on}` when training started; the file has " \
          f"changed since (now sha256 `{_sha256(manifest)}`) |"
    assert row in body
    record_training_data(run, str(shards))  # a resume on the rewritten shards
    _, body = _card(export_run(run))
    assert (f"| training data | `{shards}`, manifest.json sha256 `{trained_on}`; from a resume on, `{shards}`, "
            f"manifest.json sha256 `{_sha256(manifest)}` |") in body


def test_model_card_without_a_manifest_says_so(tmp_path):
    run, _, _ = _fake_run(tmp_path, "teacher.backbone.", "backbone.")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "method": "dino",
                                                     "data": {"train": "pipe:curl -s s3://b/train-{0..9}.tar"}}))
    _, body = _card(export_run(run))
    assert "`pipe:curl -s s3://b/train-{0..9}.tar` (no manifest.json there: the shards are not identified)" in body
    assert "manifest.json sha256" not in body


def _flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _with_heads_and_onnx(tmp_path):
    """An export with heads.safetensors and an ONNX entry in config.json whose file lies outside the folder (the
    bytes stand in for a model: only their sha256 is checked)."""
    out = export_backbone(_vit(), tmp_path / "export", arch="vit_tiny_patch16_224", model_args=VIT_ARGS, img_size=32,
                          mean=MEAN, std=STD, source={"which": "teacher"})
    write_heads(out, {"head.weight": torch.randn(8, 4), "head.bias": torch.randn(8)}, "dino")
    onnx = tmp_path / "elsewhere" / "model.onnx"
    onnx.parent.mkdir()
    onnx.write_bytes(b"not really onnx")
    config = json.loads((out / "config.json").read_text())
    config["onnx"] = {"file": str(onnx), "sha256": {"model.onnx": sha256_file(onnx)}}
    rewrite_config(out / "config.json", config)  # as `sslpipe onnx` records it
    return out, onnx


@pytest.mark.parametrize("damaged", ["heads.safetensors", "model.onnx"])
def test_check_compares_every_file_with_a_recorded_sha256(tmp_path, damaged):
    out, onnx = _with_heads_and_onnx(tmp_path)
    assert verify_export(out) == ("ok", "3 files match their sha256, config.json its digest")
    _flip_last_byte(out / damaged if damaged == "heads.safetensors" else onnx)
    assert verify_export(out) == ("bad", f"{damaged} does not match its sha256 (bit rot, a copy cut short, or "
                                         "modified)")


def test_a_new_export_removes_the_onnx_and_heads_of_the_weights_it_replaces(tmp_path, capsys):
    """An ONNX graph and heads left beside new weights would be unrecorded, unchecked and stale: an inference runtime
    loading model.onnx would run the old weights."""
    out = export_backbone(_vit(), tmp_path / "export", arch="vit_tiny_patch16_224", model_args=VIT_ARGS, img_size=32,
                          mean=MEAN, std=STD, source={"which": "teacher"})
    write_heads(out, {"head.weight": torch.randn(8, 4)}, "dino")
    for name in ("model.onnx", "model.onnx.data"):
        (out / name).write_bytes(b"a graph of the old weights")
    (out / "notes.txt").write_text("the user's own file")
    export_backbone(_vit(), out, arch="vit_tiny_patch16_224", model_args=VIT_ARGS, img_size=32, mean=MEAN, std=STD,
                    source={"which": "teacher"})  # the same weights again: their graph and heads still hold
    assert {"heads.safetensors", "model.onnx", "model.onnx.data"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["heads"]["file"] == "heads.safetensors"
    # the heads' record and sha256 carried over
    assert verify_export(out) == ("ok", "2 files match their sha256, config.json its digest")
    config = json.loads((out / "config.json").read_text())  # a config.json naming a file outside the folder
    (out / "config.json").write_text(json.dumps({**config, "onnx": {"sha256": {"../victim.txt": "x"}}}))
    (tmp_path / "victim.txt").write_text("not the export's")
    export_backbone(_vit(1), out, arch="vit_tiny_patch16_224", model_args=VIT_ARGS, img_size=32, mean=MEAN, std=STD,
                    source={"which": "teacher"})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    assert (tmp_path / "victim.txt").is_file()
    assert f"{out}: removed heads.safetensors, model.onnx, model.onnx.data of the export" in capsys.readouterr().err
    assert "heads" not in json.loads((out / "config.json").read_text())
    assert verify_export(out)[0] == "ok"


def test_dinov3_heads_kept_as_weight_norm_load_into_the_plain_last_layer(tmp_path):
    """DINOv3 heads exported as g / v by an earlier sslpipe load into today's plain Linear last layer as
    W = g v / ||v||, the weight they computed; a mask token beside them goes to the student's backbone."""
    from sslpipe.models.heads import DINOHead

    torch.manual_seed(0)
    out = export_backbone(_vit(), tmp_path / "export", arch="vit_tiny_patch16_224", model_args=VIT_ARGS, img_size=32,
                          mean=MEAN, std=STD, source={"which": "teacher"})
    old = DINOHead(4, 8, hidden_dim=6, bottleneck_dim=5, nlayers=2, norm_last_layer=False)
    with torch.no_grad():
        old.last_layer.parametrizations.weight.original0.uniform_(0.5, 2.0)
    token = torch.randn(1, 3)
    write_heads(out, {**{f"dino_head.{k}": v for k, v in old.state_dict().items()}, "backbone.mask_token": token},
                "dinov3")
    net = nn.Module()
    net.backbone = nn.Module()
    net.backbone.mask_token = nn.Parameter(torch.zeros(1, 3))
    net.dino_head = DINOHead(4, 8, hidden_dim=6, bottleneck_dim=5, nlayers=2, norm_last_layer=False,
                             plain_last_layer=True)
    notes = load_heads(net, out, "dinov3")
    assert notes == [f"heads from {out} (5 tensors)", "the mask token from the export"]
    x = torch.randn(3, 4)
    torch.testing.assert_close(net.dino_head(x), old(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(net.backbone.mask_token.data, token)


def test_heads_are_loaded_only_when_they_match_their_sha256(tmp_path):
    out, _ = _with_heads_and_onnx(tmp_path)
    net = nn.Module()
    net.head = nn.Linear(4, 8)
    assert load_heads(net, out, "dino") == [f"heads from {out} (2 tensors)"]
    assert torch.equal(net.head.weight, load_file(str(out / "heads.safetensors"))["head.weight"])
    _flip_last_byte(out / "heads.safetensors")
    before = net.head.bias.detach().clone()
    with pytest.raises(ValueError, match=r"heads\.safetensors does not match the sha256 in its config\.json.*"
                                         r"dino\.init_heads=false"):
        load_heads(net, out, "dino")
    assert torch.equal(net.head.bias, before)


def test_check_lists_a_set_aside_checkpoint_that_is_the_only_copy_of_its_step(tmp_path, capsys):
    """A hard kill between the two renames of a re-saved step leaves `.old-step_N` (no `step_N`): the only copy,
    which a resume renames back, so `sslpipe check` verifies it too and fails when it is damaged."""
    run = tmp_path / "run"
    _checkpoint(run, 4)
    aside = run / "checkpoints" / ".old-step_00000008"
    aside.mkdir()
    save_file({"w": torch.arange(6.0)}, str(aside / "model.safetensors"))
    table = {"model.safetensors": {"bytes": (aside / "model.safetensors").stat().st_size,
                                   "sha256": sha256_file(aside / "model.safetensors")}}
    (aside / "trainer_state.json").write_text(json.dumps({"global_step": 8, "files": table}))
    assert main(["check", str(run)]) == 0
    assert "checkpoints/.old-step_00000008  ok" in capsys.readouterr().out
    _flip_last_byte(aside / "model.safetensors")
    assert main(["check", str(run)]) == 1
    row = next(line for line in capsys.readouterr().out.splitlines() if ".old-step_00000008" in line)
    assert "bad" in row and "model.safetensors does not match its sha256" in row and "a resume renames it back" in row


_EXPORT_IN_A_PROCESS = """
import hashlib, sys, timm, torch
from sslpipe.weights.export import export_backbone
from sslpipe.weights.heads import write_heads
torch.manual_seed(0)
args = {"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
out = export_backbone(timm.create_model("vit_tiny_patch16_224", num_classes=0, **args), sys.argv[1],
                      arch="vit_tiny_patch16_224", model_args=args, img_size=16, mean=(0.5,) * 3, std=(0.5,) * 3,
                      source={"which": "test"})
write_heads(out, {"head.weight": torch.ones(2, 3)}, "dino")
print(*(hashlib.sha256((out / name).read_bytes()).hexdigest() for name in ("model.safetensors", "heads.safetensors")))
"""


def test_the_same_weights_give_the_same_file_bytes_in_every_process(tmp_path):
    """safetensors writes a metadata map of several entries in a per-process random order, so `sslpipe export` of
    the same run used to give another model.safetensors sha256 half the time (and heads.safetensors too), and the
    checks that identified a backbone by it refused it. Four fresh processes (each with its own PYTHONHASHSEED)
    write the same bytes: a random order of two entries passes four processes with p = 1/8 per file."""
    import os
    import subprocess
    import sys

    runs = [subprocess.Popen([sys.executable, "-c", _EXPORT_IN_A_PROCESS, str(tmp_path / f"out{seed}")],
                             env={**os.environ, "PYTHONHASHSEED": str(seed), "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in range(4)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err for _, err in outputs]
    digests = {out.strip() for out, _ in outputs}
    assert len(digests) == 1 and len(next(iter(digests)).split()) == 2, digests
