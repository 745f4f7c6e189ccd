"""What an export or checkpoint leaves on disk when something is wrong: a foreign --out folder untouched, an export
folder replaced as a unit, damaged checkpoint files named in one line, config.json / trainer_state.json covered by
`sslpipe check`, and files readable by everyone the umask allows."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from test_export import MEAN, STD, VIT_ARGS, _fake_run, _sha256, _vit

from sslpipe.cli import main
from sslpipe.weights.checkpoint import CheckpointInvalid
from sslpipe.weights.checkpoint_io import save_checkpoint
from sslpipe.weights.export import export_backbone
from sslpipe.weights.run_export import export_run
from sslpipe.weights.verify import verify_checkpoint, verify_export

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("no_download")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _with_table(run: Path, step: int = 10) -> Path:
    """Record the size and sha256 of every file of the checkpoint in its trainer_state.json, as the trainer does."""
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in ckpt.iterdir() if p.suffix != ".json"}
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "files": files}))
    return ckpt


def _one_error_line(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_out_that_is_not_an_sslpipe_export_is_refused_and_left_as_it_was(tmp_path, capsys):
    run, _, _ = _fake_run(tmp_path, "teacher.backbone.", "backbone.")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    (mine / "config.json").write_text('{"my": "config"}')
    (mine / "model.onnx").write_bytes(b"ONNXBYTES")
    save_file({"w": torch.ones(3)}, str(mine / "model.safetensors"))  # another tool's weights
    before = _snapshot(mine)
    with pytest.raises(ValueError, match=rf"--out {mine} holds README.md, config.json, model.onnx, model.safetensors "
                                         "but no sslpipe export"):
        export_run(run, out=mine)
    assert _snapshot(mine) == before
    assert f"--out {mine} holds" in _one_error_line(["export", str(run), "--out", str(mine)], capsys)
    assert _snapshot(mine) == before

    lfs = tmp_path / "lfs"  # a git-lfs pointer where the weights would be: refused, no traceback
    lfs.mkdir()
    (lfs / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    assert f"--out {lfs} holds model.safetensors but no sslpipe export" in _one_error_line(
        ["export", str(run), "--out", str(lfs)], capsys)

    afile = tmp_path / "afile"
    afile.write_text("x")
    assert f"--out {afile} is a file: give a folder" in _one_error_line(["export", str(run), "--out", str(afile)],
                                                                       capsys)
    assert afile.read_text() == "x"

    # --force writes the export's own files into it and leaves the rest (the user's model.onnx) alone
    assert main(["export", str(run), "--out", str(lfs), "--force"]) == 0
    assert main(["export", str(run), "--out", str(mine), "--force"]) == 0
    assert (mine / "model.onnx").read_bytes() == b"ONNXBYTES" and verify_export(mine)[0] == "ok"
    assert "removed" not in capsys.readouterr().err


def test_import_writes_beside_other_files_but_never_over_them(tmp_path):
    """`sslpipe import` (export_backbone) may write into the folder its source sits in; a folder holding files of the
    export's names that is no sslpipe export (a Hugging Face download: config.json, model.safetensors) is refused."""
    beside = tmp_path / "beside"
    beside.mkdir()
    (beside / "weights.safetensors").write_bytes(b"the source")
    export_backbone(_vit(), beside, arch="vit_tiny_patch16_224", model_args=VIT_ARGS, img_size=32, mean=MEAN,
                    std=STD, source={})
    assert (beside / "weights.safetensors").read_bytes() == b"the source" and verify_export(beside)[0] == "ok"
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text('{"model_type": "dinov2"}')
    (hub / "notes.txt").write_text("mine")
    before = _snapshot(hub)
    with pytest.raises(ValueError, match=rf"^{hub} holds config.json but no sslpipe export .*so that none of these "
                                         "files is replaced$"):
        export_backbone(_vit(), hub, arch="vit_tiny_patch16_224", model_args=VIT_ARGS, img_size=32, mean=MEAN,
                        std=STD, source={})
    assert _snapshot(hub) == before


def test_an_error_after_the_weights_leaves_the_earlier_export_as_it_was(tmp_path, capsys):
    """--with-heads of a method without heads, and a cut distill_teacher.json the card reads, fail before anything
    in the folder is replaced: weights, config.json and card stay the earlier export's, no temporary file stays."""
    run, _, _ = _fake_run(tmp_path, "teacher.backbone.", "backbone.")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "method": "simclr"}))
    out = export_run(run, which="student", checkpoint=10)
    newer = run / "checkpoints" / "step_00000012"
    newer.mkdir()
    student = _vit(5).state_dict()
    save_file({f"backbone.{k}": v.clone() for k, v in student.items()}, str(newer / "model.safetensors"))
    (newer / "trainer_state.json").write_text(json.dumps({"global_step": 12}))
    before = _snapshot(out)
    with pytest.raises(ValueError, match="--with-heads: method 'simclr' has no projection heads"):
        export_run(run, which="student", with_heads=True)
    assert _snapshot(out) == before

    (run / "distill_teacher.json").write_text('{"teacher": "/some/wh')  # cut short
    error = _one_error_line(["export", str(run), "--which", "student"], capsys)
    assert f"{run / 'distill_teacher.json'} is unreadable" in error
    assert _snapshot(out) == before and verify_export(out)[0] == "ok"


def test_a_damaged_checkpoint_file_is_named_before_it_is_read(tmp_path, capsys):
    run, _, _ = _fake_run(tmp_path, "teacher.backbone.", "backbone.")
    ckpt = _with_table(run)
    extra = ckpt / "extra_state.safetensors"
    os.truncate(extra, extra.stat().st_size - 100)
    for which in ("teacher", None):
        with pytest.raises(CheckpointInvalid, match=r"step_00000010 is damaged \(extra_state.safetensors has \d+ "
                                                    r"bytes, \d+ written"):
            export_run(run, which=which)
    assert "extra_state.safetensors has" in _one_error_line(["export", str(run)], capsys)
    assert export_run(run, which="student", out=tmp_path / "student")  # the student's file is whole

    state = ckpt / "trainer_state.json"
    state.write_text(state.read_text()[:40])  # a copy cut short
    error = _one_error_line(["export", str(run)], capsys)
    assert f"{state} is unreadable" in error


def test_check_covers_config_json_and_trainer_state_json(tmp_path):
    """One flipped bit in the mean of an export's config.json, or in a checkpoint's global step, is `bad`; files of
    an older sslpipe without the digest still check ok, saying so."""
    out = export_backbone(_vit(), tmp_path / "export", arch="vit_tiny_patch16_224", model_args=VIT_ARGS, img_size=32,
                          mean=MEAN, std=STD, source={})
    assert verify_export(out) == ("ok", "model.safetensors matches its sha256, config.json its digest")
    text = (out / "config.json").read_text()
    flipped = text.replace('"mean": [\n    0.5,', '"mean": [\n    0.4,')
    assert flipped != text
    (out / "config.json").write_text(flipped)
    assert verify_export(out) == ("bad", "config.json does not match the digest of its content it records (bit rot, "
                                         "a copy cut short, or edited)")
    older = json.loads(text)
    del older["config_sha256"]
    (out / "config.json").write_text(json.dumps(older))
    assert verify_export(out) == ("ok", "model.safetensors matches its sha256; config.json has no digest (older "
                                        "sslpipe)")

    from accelerate import Accelerator

    ckpt = save_checkpoint(Accelerator(cpu=True), tmp_path / "run", {"global_step": 3, "epoch": 1},
                           {"teacher.w": torch.ones(2)})
    assert verify_checkpoint(ckpt) == ("ok", "2 files and trainer_state.json match their sha256")
    state_file = ckpt / "trainer_state.json"
    text = state_file.read_text()
    state_file.write_text(text.replace('"global_step": 3', '"global_step": 2'))
    status, detail = verify_checkpoint(ckpt)
    assert status == "bad" and detail.startswith("trainer_state.json does not match the digest of its content")
    (tmp_path / "run" / "config.yaml").write_text("model: {arch: vit_tiny_patch16_224}\n")
    with pytest.raises(CheckpointInvalid, match="trainer_state.json does not match the digest"):
        export_run(tmp_path / "run", checkpoint=ckpt)
    older = json.loads(text)
    del older["state_sha256"]
    state_file.write_text(json.dumps(older))
    assert verify_checkpoint(ckpt) == ("ok", "2 files match their sha256; trainer_state.json has no digest (older "
                                             "sslpipe)")


def test_written_weights_get_the_umask_mode(tmp_path):
    """safetensors writes through a 0600 temporary file: exports, heads and checkpoints get 0644 under umask 022."""
    from accelerate import Accelerator

    old = os.umask(0o022)
    try:
        run, _, _ = _fake_run(tmp_path, "teacher.backbone.", "backbone.")  # its teacher has a head.* tensor
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "method": "dino"}))
        out = export_run(run, with_heads=True)
        written = save_checkpoint(Accelerator(cpu=True), tmp_path / "ckrun", {"global_step": 1},
                                  {"t": torch.ones(1)})
        os.umask(0o027)
        other = export_backbone(_vit(), tmp_path / "private", arch="vit_tiny_patch16_224", model_args=VIT_ARGS,
                                img_size=32, mean=MEAN, std=STD, source={})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*out.iterdir(), *written.iterdir()]}
    assert modes == {"model.safetensors": 0o644, "heads.safetensors": 0o644, "config.json": 0o644,
                     "README.md": 0o644, "extra_state.safetensors": 0o644, "rng_state_0.safetensors": 0o644,
                     "trainer_state.json": 0o644}
    assert stat.S_IMODE((other / "model.safetensors").stat().st_mode) == 0o640


@pytest.fixture(scope="module")
def not_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What users pass where an export goes: a timm Hugging Face folder (timm's `save_for_hf`), a transformers
    folder (config.json of `model_type`, as `save_pretrained` writes it), an official .pth checkpoint, and the ONNX
    graph of a real export."""
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp("not_exports")
    vit = _vit()
    save_for_hf(vit, root / "timm_hf", model_args=VIT_ARGS, safe_serialization=True)
    (root / "hf").mkdir()
    save_file({"embeddings.cls_token": torch.zeros(1, 1, 8)}, str(root / "hf/model.safetensors"))
    (root / "hf/config.json").write_text(json.dumps({"architectures": ["Dinov2Model"], "model_type": "dinov2"}))
    torch.save(vit.state_dict(), root / "release.pth")
    export = export_backbone(vit, root / "export", arch="vit_tiny_patch16_224", model_args=VIT_ARGS, img_size=32,
                             mean=MEAN, std=STD, source={})
    (export / "model.onnx").write_bytes(b"ONNX graph")
    return {"timm_hf": root / "timm_hf", "hf": root / "hf", "pth": root / "release.pth",
            "onnx": export / "model.onnx"}


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("given, expected", [
    ("timm_hf", "timm_hf is not an sslpipe export (its config.json has no \"format\": \"sslpipe-backbone/1\"; a "
                "Hugging Face / timm download?): bring it in with `sslpipe import {path} OUT` and pass OUT"),
    ("hf", "hf is not an sslpipe export (its config.json has no \"format\""),
    ("pth", "release.pth is a file, not an sslpipe export folder (config.json + model.safetensors): pass an export "
            "folder, or bring a checkpoint in with `sslpipe import {path} OUT`"),
    ("onnx", "model.onnx is a file of the export {parent}: pass the export folder {parent}"),
])
def test_what_is_not_an_export_is_named_in_one_line_by_every_command(not_exports, digits_shards, tmp_path, capsys,
                                                                     given, expected):
    """knn, embed, onnx, distill.teacher and model.init_from read an export through `export_paths`: a folder or file
    that is no sslpipe export gets one line saying what it is and what to run (it used to be a KeyError traceback
    on `img_size` / `architecture` / `mean`, or safetensors' "header too large" on model.onnx)."""
    from helpers import REPO

    path = not_exports[given]
    expected = expected.format(path=path, parent=path.parent)
    data = f"data.train={digits_shards}"
    for argv in (["knn", str(path), "--data", str(digits_shards)],
                 ["embed", str(path), "--data", str(digits_shards), "--out", str(tmp_path / "emb")],
                 ["onnx", str(path)],
                 ["train", str(REPO / "recipes/demo_distill.yaml"), f"distill.teacher={path}", data,
                  f"output_dir={tmp_path}"],
                 ["train", str(REPO / "recipes/demo_adapt.yaml"), f"model.init_from={path}", data,
                  f"data.val={digits_shards}", f"output_dir={tmp_path}"]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1 and "Traceback" not in err, (argv, err)
        assert expected in lines[0], (argv, lines[0])
    assert not (tmp_path / "emb").exists()
