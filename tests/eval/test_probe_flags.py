"""The probe commands' flags and results: bad values refused by argparse naming the flag before any image is read,
flags a backbone does not read refused (--n-last-blocks on a CNN, --crop beyond the resize), and result JSONs written
atomically (a failed write leaves the previous result whole and is one line)."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

import sslpipe.eval.features as feat_mod
import sslpipe.files as files_mod
from sslpipe.cli import main
from sslpipe.errors import WriteFailed
from sslpipe.eval.features import write_json
from sslpipe.eval.spec import FeatureSpec

torch.set_num_threads(1)
VIT_ARGS = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A 2-block 16 px ViT export and a ResNet-18 export (random weights)."""
    from sslpipe.models.backbones import create_backbone
    from sslpipe.weights.export import export_backbone

    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    vit = export_backbone(create_backbone("vit_tiny_patch16_224", **VIT_ARGS), root / "vit",
                          arch="vit_tiny_patch16_224", model_args=VIT_ARGS, img_size=16, mean=(0.5,) * 3,
                          std=(0.5,) * 3, source={"test": True})
    cnn = export_backbone(create_backbone("resnet18", img_size=16), root / "cnn", arch="resnet18", model_args={},
                          img_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, source={"test": True})
    return {"vit": str(vit), "cnn": str(cnn)}


@pytest.fixture
def no_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any read of the shards fails the test: the refusal must come before the extraction."""
    monkeypatch.setattr(feat_mod, "build_loader", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))


@pytest.mark.parametrize("command, flags, named", [
    ("qscore", ["--ci", "95"], "--ci"),
    ("qscore", ["--v2-coverage", "0"], "--v2-coverage"),
    ("qscore", ["--v2-coverage", "abc"], "--v2-coverage"),
    ("qscore", ["--percentiles", "95", "50"], "--percentiles"),
    ("qscore", ["--percentiles", "50", "150"], "--percentiles"),
    ("qscore", ["--k", "0"], "--k"),
    ("qscore", ["--eps", "0"], "--eps"),
    ("qscore", ["--bootstrap", "-1"], "--bootstrap"),
    ("linear", ["--batch-size", "0"], "--batch-size"),
    ("linear", ["--epochs", "0"], "--epochs"),
    ("linear", ["--lr", "-1"], "--lr"),
    ("linear", ["--n-last-blocks", "0"], "--n-last-blocks"),
    ("knn", ["--k", "10", "0"], "--k"),
    ("knn", ["--max-val", "0"], "--max-val"),
])
def test_bad_flag_values_are_refused_naming_the_flag_before_reading(exports, no_reading, capsys, command: str,
                                                                    flags: list[str], named: str) -> None:
    """They used to fail after both splits were extracted ("Percentiles must be in the range [0, 100]", "range() arg
    3 must not be zero"), or not at all (`--epochs 0` reported the untrained classifier)."""
    with pytest.raises(SystemExit) as exit_:
        main([command, exports["vit"], "--data", "unread", *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {named}" in err, err


def test_accepted_flag_values_parse(exports) -> None:
    from sslpipe.cli import build_parser

    args = build_parser().parse_args(["qscore", exports["vit"], "--data", "d", "--v2-coverage", "none", "--ci", "0.9",
                                      "--percentiles", "40", "90"])
    assert (args.v2_coverage, args.ci, args.percentiles) == (None, 0.9, [40.0, 90.0])
    assert build_parser().parse_args(["qscore", "e", "--data", "d"]).v2_coverage == 0.5


def test_n_last_blocks_is_refused_for_a_cnn_before_reading(exports, no_reading, capsys) -> None:
    """A ResNet has no class token: --n-last-blocks was accepted, written to the JSON and never read."""
    assert main(["linear", exports["cnn"], "--data", "unread", "--n-last-blocks", "2"]) == 2
    err = capsys.readouterr().err
    assert "--n-last-blocks" in err and "ResNet" in err and len(err.strip().splitlines()) == 1
    # a ViT with fewer blocks than asked is refused before reading too (it was refused at the first batch)
    assert main(["linear", exports["vit"], "--data", "unread", "--n-last-blocks", "3"]) == 2
    assert "pass --n-last-blocks 2 or fewer" in capsys.readouterr().err


def test_linear_probe_records_the_features_it_used(exports, digits_shards: Path, tmp_path: Path) -> None:
    """CNN: pooled features (512), `n_last_blocks` null; ViT: the last 2 blocks' CLS (2 x 32)."""
    common = ["--data", str(digits_shards), "--epochs", "1", "--max-train", "64", "--max-val", "32"]
    assert main(["linear", exports["cnn"], *common, "--out", str(tmp_path / "cnn.json")]) == 0
    assert main(["linear", exports["vit"], *common, "--n-last-blocks", "2", "--out", str(tmp_path / "vit.json")]) == 0
    cnn, vit = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("cnn", "vit"))
    assert (cnn["n_last_blocks"], cnn["feature_dim"]) == (None, 512)
    assert (vit["n_last_blocks"], vit["feature_dim"]) == (2, 64)


def test_a_crop_larger_than_the_resize_is_refused(exports, no_reading, capsys) -> None:
    """CenterCrop pads a crop larger than the resized image with black (59% of a 448 crop of a 256 resize)."""
    with pytest.raises(ValueError, match=r"centre crop 448 \(--crop.*larger than the resize 256 \(--resize.*"
                                         r"pass --resize 448 or more"):
        FeatureSpec(img_size=224, crop=448)
    assert FeatureSpec(img_size=224, crop=448, resize=448).short_side == 448
    assert FeatureSpec(img_size=224, crop=256).input_size == 256  # equal to the default resize 256: no padding
    assert FeatureSpec(img_size=224, crop=512, pooling="patch").input_size == 512  # linear-seg's window: no resize
    assert main(["knn", exports["vit"], "--data", "unread", "--crop", "32"]) == 2  # default resize 16 x 256/224 = 18
    err = capsys.readouterr().err
    assert "--crop" in err and "--resize" in err and len(err.strip().splitlines()) == 1


def _failing_open(after: int):
    """`open` whose files raise ENOSPC once `after` bytes are written: a disk that fills up part-way."""
    real_open = open

    class Full:
        def __init__(self, *args, **kwargs) -> None:
            self.f = real_open(*args, **kwargs)

        def write(self, text: str) -> int:
            self.f.write(text[:after])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self) -> "Full":
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

    return Full


def test_a_failed_result_write_keeps_the_previous_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The JSON was truncated in place: a full disk left 200 bytes of an unparsable file and no old result."""
    out = tmp_path / "probe.json"
    write_json(out, {"top1": 0.777})
    monkeypatch.setattr(files_mod, "open", _failing_open(after=10), raising=False)
    with pytest.raises(WriteFailed, match=r"could not write .*probe\.json: No space left on device"):
        write_json(out, {"top1": 0.8, "per_class": {str(i): 0.5 for i in range(100)}})
    assert json.loads(out.read_text()) == {"top1": 0.777} and [p.name for p in tmp_path.iterdir()] == ["probe.json"]
    monkeypatch.undo()
    write_json(out, {"top1": 0.8})
    assert json.loads(out.read_text()) == {"top1": 0.8}


def test_a_failed_result_write_is_one_line_from_the_cli(exports, digits_shards: Path, tmp_path: Path, capsys,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out` on a full disk: one line, exit 1 (it was an OSError traceback); a device is written in place, never
    renamed over (/dev/full is still a device afterwards)."""
    out = tmp_path / "knn.json"
    out.write_text('{"old": true}\n')
    monkeypatch.setattr(files_mod, "open", _failing_open(after=5), raising=False)
    assert main(["knn", exports["vit"], "--data", str(digits_shards), "--k", "5", "--max-train", "64", "--max-val",
                 "32", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()  # the progress bars, then the error
    assert err[-1].startswith("sslpipe knn: error: could not write") and "Traceback" not in "".join(err)
    assert json.loads(out.read_text()) == {"old": True}
    monkeypatch.undo()
    with pytest.raises(WriteFailed, match="/dev/full"):
        write_json("/dev/full", {"a": 1})
    assert Path("/dev/full").is_char_device()


def test_a_crop_the_patches_do_not_tile_is_refused_in_one_line_before_reading(exports, no_reading, tmp_path: Path,
                                                                               digits_shards: Path, capsys) -> None:
    """knn / embed --crop 18 on a 4-pixel-patch ViT ended in timm's bare assertion and a traceback at the first batch,
    and the same eval.crop in a training run's periodic kNN after the epoch's training: refused before any image is
    read, naming the flag and the crops that fit. A CNN, and a ViT that pads (dynamic_img_pad), take any crop."""
    import re

    from sslpipe.eval.knn import knn_probe
    from sslpipe.eval.spec import ProbeData
    from sslpipe.models.backbones import create_backbone

    fits = r"the crop 18 \(--crop, .*eval.crop in a recipe\) is not a multiple of the backbone's patch size 4, .*: " \
           r"use 16 or 20$"
    for command in (["knn", exports["vit"], "--data", "unread"],
                    ["embed", exports["vit"], "--data", str(digits_shards), "--out", str(tmp_path / "emb")]):
        assert main([*command, "--resize", "32", "--crop", "18"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"sslpipe {command[0]}: error: the crop 18 ")
        assert re.search(fits, err[0])
    assert not (tmp_path / "emb").exists()
    spec = FeatureSpec(img_size=16, resize=32, crop=18)
    teacher = create_backbone("vit_tiny_patch16_224", **VIT_ARGS)  # a training run's module: refused the same way
    with pytest.raises(ValueError, match=fits):
        knn_probe(teacher, spec, ProbeData("unread", "unread"))
    spec.check_patches(create_backbone("resnet18", img_size=16))
    spec.check_patches(create_backbone("vit_tiny_patch16_224", **VIT_ARGS, dynamic_img_pad=True))
    FeatureSpec(img_size=16, resize=32, crop=20).check_patches(teacher)
