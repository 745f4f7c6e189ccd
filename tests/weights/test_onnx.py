"""ONNX export of export folders: onnxruntime equals `load_backbone(export)` at the export's size and another one
(dynamic batch, height, width), the file is recorded in config.json, and every refusal is one line."""
from __future__ import annotations

import json
import sys

import onnxruntime
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

import sslpipe.weights.onnx as onnx_export
from sslpipe.cli import main
from sslpipe.weights.export import export_backbone, load_backbone
from sslpipe.weights.hashing import sha256_file
from sslpipe.weights.onnx import ONNX_NAME, OPSET, export_onnx

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("no_download")
VIT = "vit_tiny_patch16_224"
VIT_ARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "dynamic_img_size": True}
REG_ARGS = {**VIT_ARGS, "reg_tokens": 4, "no_embed_class": True}  # timm's DINOv2-with-registers layout


def _export(tmp_path, arch: str, args: dict, source: dict | None = None):
    """A random-weight export (position grid far from its init, so a wrongly resampled grid shows)."""
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=0, **args).eval()
    if getattr(model, "pos_embed", None) is not None:
        torch.nn.init.normal_(model.pos_embed)
    return export_backbone(model, tmp_path / "exp", arch=arch, model_args=args, img_size=32, mean=(0.5,) * 3,
                           std=(0.25,) * 3, source=source or {})


def _max_diff(out, shape: tuple[int, ...]) -> float:
    x = torch.randn(*shape)
    session = onnxruntime.InferenceSession(str(out / ONNX_NAME), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = load_backbone(out)(x)
    got = torch.from_numpy(session.run(["features"], {"images": x.numpy()})[0])
    assert got.shape == expected.shape
    return (got - expected).abs().max().item()


@pytest.mark.parametrize("args", [VIT_ARGS, REG_ARGS], ids=["vit", "vit_reg4"])
def test_vit_matches_torch_at_two_sizes(tmp_path, args):
    out = _export(tmp_path, VIT, args)
    report = export_onnx(out)
    assert report.path == out / ONNX_NAME and report.opset == OPSET == 18
    assert max(report.diffs.values()) <= 1e-4 and list(report.diffs) == ["2x3x32x32", "1x3x48x40"]
    for shape in [(2, 3, 32, 32), (3, 3, 48, 48), (1, 3, 16, 64)]:  # the grid resampled in the graph
        assert _max_diff(out, shape) <= 1e-4, shape
    assert "not the `official` rule" in report.lines()[-1]  # sslpipe's runs train with the official rule


def test_rope_vit_of_dinov3_matches_torch_at_other_sizes(tmp_path):
    """timm's `vit_*_dinov3` (rotary positions, storage tokens): the rotary embedding is computed in the graph for
    each input's own grid, so other sizes need no resampling and still equal torch."""
    out = _export(tmp_path, "vit_small_patch16_dinov3", {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2,
                                                          "num_heads": 2})
    report = export_onnx(out)
    assert max(report.diffs.values()) <= 1e-4
    for shape in [(2, 3, 32, 32), (1, 3, 48, 64)]:
        assert _max_diff(out, shape) <= 1e-4, shape


def test_cnn_matches_torch_with_weights_beside_it(tmp_path, monkeypatch):
    """A CNN; its weights over ONE_FILE_BYTES (here all) go to model.onnx.data, which still loads after the move."""
    monkeypatch.setattr(onnx_export, "ONE_FILE_BYTES", 0)
    out = _export(tmp_path, "resnet10t", {})
    report = export_onnx(out)
    for shape in [(2, 3, 32, 32), (1, 3, 48, 48), (3, 3, 64, 40)]:
        assert _max_diff(out, shape) <= 1e-4, shape
    recorded = json.loads((out / "config.json").read_text())["onnx"]
    assert sorted(recorded["sha256"]) == [ONNX_NAME, ONNX_NAME + ".data"]
    assert recorded["sha256"][ONNX_NAME + ".data"] == sha256_file(out / (ONNX_NAME + ".data"))
    assert report.lines()[-1].startswith("onnxruntime vs torch")  # no position note for a CNN


def test_cli_converts_an_export_and_records_it(tmp_path, capsys):
    out = _export(tmp_path, VIT, REG_ARGS, source={"format": "dinov2"})
    assert main(["onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / ONNX_NAME} (ONNX opset 18; dynamic batch, height, width" in printed
    assert "the rule this network was trained with" in printed  # a DINOv2 register import: timm's rule is its own
    config = json.loads((out / "config.json").read_text())
    recorded = config["onnx"]
    assert recorded["file"] == ONNX_NAME and recorded["opset"] == 18
    assert recorded["dynamic"] == ["batch", "height", "width"]
    assert recorded["sha256"] == {ONNX_NAME: sha256_file(out / ONNX_NAME)}
    meta = onnxruntime.InferenceSession(str(out / ONNX_NAME)).get_modelmeta().custom_metadata_map
    assert meta["opset"] == "18" and json.loads(meta["sslpipe_config"])["model_args"] == config["model_args"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.onnx", "model.safetensors"]


def test_cli_export_run_with_onnx(tmp_path, capsys):
    """`sslpipe export RUN --onnx`: a run's student (no teacher) exported, then converted."""
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints" / "step_00000005"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    kwargs = {k: VIT_ARGS[k] for k in ("embed_dim", "depth", "num_heads")}
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "simclr", "model": {
        "arch": VIT, "patch_size": 4, "kwargs": kwargs}, "crops": {"global_size": 32}}))
    model = timm.create_model(VIT, num_classes=0, **VIT_ARGS)
    save_file({f"backbone.{k}": v for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    assert main(["export", str(run), "--onnx"]) == 0
    assert "ONNX opset 18" in capsys.readouterr().out
    assert json.loads((run / "export" / "student" / "config.json").read_text())["onnx"]["file"] == ONNX_NAME


def _one_line_refusal(capsys, out, match: str) -> None:
    """The library's ValueError and the command's exit 2 with one line; no ONNX file, config.json unchanged."""
    before = (out / "config.json").read_text()
    with pytest.raises(ValueError, match=match) as err:
        export_onnx(out)
    assert "\n" not in str(err.value)
    assert main(["onnx", str(out)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "config.json").read_text() == before


def test_missing_packages_are_one_line(tmp_path, monkeypatch, capsys):
    out = _export(tmp_path, "resnet10t", {})
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    _one_line_refusal(capsys, out, r"needs onnxruntime: pip install 'sslpipe\[onnx\]'")


def test_mismatch_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    class Off(onnxruntime.InferenceSession):
        def run(self, *args, **kwargs):
            return [y + 1e-3 for y in super().run(*args, **kwargs)]

    out = _export(tmp_path, "resnet10t", {})
    monkeypatch.setattr(onnxruntime, "InferenceSession", Off)
    _one_line_refusal(capsys, out, r"does not match torch at input 2x3x32x32: max abs diff 0.001 > 0.0001")


def test_a_graph_with_a_baked_size_is_refused(tmp_path, monkeypatch, capsys):
    """What the legacy exporter does to a ViT (a graph of the trace size only), here a static torch.export graph:
    onnxruntime fails at the export's size, which the check turns into one line."""
    static = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *args, dynamic_shapes, **kwargs: static(*args, **kwargs))
    out = _export(tmp_path, VIT, VIT_ARGS)
    _one_line_refusal(capsys, out, r"fails at input 2x3x32x32 where torch runs \(onnxruntime: .*Got invalid dim")


def test_architectures_that_cannot_be_exported(tmp_path, monkeypatch, capsys):
    fixed = _export(tmp_path / "fixed", VIT, {**VIT_ARGS, "dynamic_img_size": False})
    _one_line_refusal(capsys, fixed, r"does not accept other image sizes in torch \(Input height \(48\)")

    def fails(*args, **kwargs):
        raise RuntimeError("Failed to export the model\nwith many lines of detail")

    out = _export(tmp_path / "cnn", "resnet10t", {})
    with pytest.raises(ValueError, match=r"opset 17: ONNX export needs opset >= 18"):
        export_onnx(out, opset=17)
    monkeypatch.setattr(torch.onnx, "export", fails)
    _one_line_refusal(capsys, out, r"resnet10t cannot be exported to ONNX .*: Failed to export the model$")


@pytest.mark.parametrize("patch, size", [(16, 32), (4, 32), (14, 224)])
def test_the_check_runs_a_non_square_size_other_than_the_exports(patch: int, size: int) -> None:
    """Beside the export's size, the graph is checked (and traced) at H != W, both multiples of the patch and
    neither the export's size: a patch-16 export at 32 px used to round both sides to 48."""
    from sslpipe.weights.onnx import _check_inputs

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, patch_size=patch, img_size=size,
                            depth=1, embed_dim=32, num_heads=2, dynamic_img_size=True)
    first, other = _check_inputs(vit, size)
    h, w = other.shape[-2:]
    assert first.shape[-2:] == (size, size) and h != w and size not in (h, w) and h % patch == w % patch == 0
