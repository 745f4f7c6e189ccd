"""Bad command-line input ends in one line and exit status 2, before any work: an empty --resume, a key given twice, a
folder where a file is expected (or a file where a folder is), flags a setting does not read, and out-of-range
counts. The library functions behind each command are replaced by ones that fail the test if they are reached."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import one_line_error, tiny_export

from sslpipe.cli import main

RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "demo_dino.yaml")


def _never(name: str):
    def called(*args, **kwargs):
        raise AssertionError(f"{name} ran: the bad input was not refused first")
    return called


def _argparse_refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """argparse's refusal: exit status 2, its last line the error (after the usage)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------ train, --resume
def test_an_empty_resume_is_refused_not_taken_as_a_new_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import sslpipe.engine.trainer as trainer

    monkeypatch.setattr(trainer, "run_recipe", _never("run_recipe"))
    line = one_line_error(["train", RECIPE, f"output_dir={tmp_path}", "--resume", ""], capsys)
    assert "--resume is empty (an unset shell variable?)" in line
    assert one_line_error(["train", RECIPE, "--resume", "  "], capsys) == line
    assert list(tmp_path.iterdir()) == []


def test_resume_of_a_runs_checkpoints_folder_resumes_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--resume RUN/checkpoints` was read as a run and answered 'no checkpoint in RUN/checkpoints/checkpoints'."""
    import sslpipe.engine.trainer as trainer

    (tmp_path / "run" / "checkpoints" / "step_00000002").mkdir(parents=True)
    seen: dict = {}
    monkeypatch.setattr(trainer, "run_recipe", lambda recipe, overrides, **kw: seen.update(kw) or "run")
    assert main(["train", RECIPE, "--resume", str(tmp_path / "run" / "checkpoints")]) == 0
    assert seen["resume"] == str(tmp_path / "run")
    assert main(["train", RECIPE, "--resume", str(tmp_path / "run" / "checkpoints" / "step_00000002")]) == 0
    assert seen["resume"] == str(tmp_path / "run" / "checkpoints" / "step_00000002")  # a checkpoint stays one


def test_a_key_given_twice_on_the_command_line_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A shell that splits `data.train=train-{0..2}.tar` into three overrides trained on the last shard only."""
    import sslpipe.engine.trainer as trainer

    monkeypatch.setattr(trainer, "run_recipe", _never("run_recipe"))
    line = one_line_error(["train", RECIPE, "data.train=/d/train-0.tar", "--resume", "auto",
                           "data.train=/d/train-1.tar"], capsys)
    assert line == ("sslpipe train: error: data.train is given twice on the command line ('data.train=/d/train-0.tar', "
                    "then 'data.train=/d/train-1.tar'): keep one")
    line = one_line_error(["train", RECIPE, "model.kwargs.depth=2", "model.kwargs={embed_dim: 32}"], capsys)
    assert line == ("sslpipe train: error: 'model.kwargs={embed_dim: 32}' replaces the whole model.kwargs section "
                    "after 'model.kwargs.depth=2' set a key inside it: give the section first, or put the key into it")


def test_an_output_dir_that_is_a_file_is_one_line(digits_shards: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "file.yaml"
    a_file.write_text("x: 1\n")
    line = one_line_error(["train", RECIPE, f"data.train={digits_shards}", f"output_dir={a_file}", "run_name=r"],
                          capsys)
    assert "Not a directory" in line and str(a_file) in line


# --------------------------------------------------------------------------------- outputs checked before the work
@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("export") / "exp")


@pytest.mark.parametrize(("command", "module", "function", "extra"), [
    ("knn", "sslpipe.eval.knn", "run_knn", []),
    ("linear", "sslpipe.eval.linear", "linear_probe", ["--epochs", "1"]),
    ("qscore", "sslpipe.eval.qscore_report", "qscore_report", []),
])
def test_a_probe_with_a_folder_for_out_is_refused_before_extracting(
        command: str, module: str, function: str, extra: list[str], export: Path, digits_shards: Path,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """knn/linear opened --out only after every feature was extracted and the probe trained, then a traceback."""
    import importlib

    monkeypatch.setattr(importlib.import_module(module), function, _never(function))
    line = one_line_error([command, str(export), "--data", str(digits_shards), "--out", str(tmp_path), *extra],
                          capsys)
    assert line.endswith(f"--out {tmp_path} is a directory: give a file path (e.g. {tmp_path / (command + '.json')})")


@pytest.mark.parametrize("flag", ["--png", "--json"])
def test_search_with_a_folder_for_its_output_leaves_nothing(flag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import sslpipe.embed.search as search

    monkeypatch.setattr(search, "search", _never("search"))
    (tmp_path / "out").mkdir()
    line = one_line_error(["search", str(tmp_path / "emb"), "key:x", flag, str(tmp_path / "out")], capsys)
    assert f"{flag} {tmp_path / 'out'} is a directory" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.tmp


def test_outputs_under_a_file_or_folders_that_are_files_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import sslpipe.embed.embed as embed
    import sslpipe.eval_seg as eval_seg

    a_file = tmp_path / "a.yaml"
    a_file.write_text("x: 1\n")
    monkeypatch.setattr(embed, "embed_shards", _never("embed_shards"))
    monkeypatch.setattr(eval_seg, "eval_seg_run", _never("eval_seg_run"))
    line = one_line_error(["embed", "EXPORT", "--data", "D", "--out", str(a_file)], capsys)
    assert line.endswith(f"--out {a_file} is a file: give a folder (created when missing)")
    line = one_line_error(["eval-seg", "RUN", "--out", str(a_file / "r.json")], capsys)
    assert line.endswith(f"--out {a_file / 'r.json'}: {a_file} is a file, not a folder")
    line = one_line_error(["eval-seg", "RUN", "--out", str(tmp_path)], capsys)
    assert f"--out {tmp_path} is a directory" in line


# ----------------------------------------------------------------------------------------- flags that are not read
def test_curate_from_embeddings_refuses_the_embedding_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import sslpipe.curate.curate as curate

    monkeypatch.setattr(curate, "curate", _never("curate"))
    base = ["curate", "POOL", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "cur"), "--size", "10"]
    line = one_line_error([*base, "--resize", "999", "--crop", "7", "--batch-size", "3", "--workers", "9", "--device",
                           "no-such-device"], capsys)
    assert line == (f"sslpipe curate: error: --resize, --crop, --batch-size, --workers, --device are read only with "
                    f"--backbone: the embeddings in {tmp_path / 'emb'} were made with their own settings (its "
                    "embed.json); leave them out")
    assert "--workers is read only with --backbone" in one_line_error([*base, "--workers", "2"], capsys)


def test_shards_quality_is_refused_where_no_jpeg_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import sslpipe.ingest.route as route

    written: list = []
    monkeypatch.setattr(route, "write_source", lambda out, source, options, **kw: written.append(options) or [])
    out = str(tmp_path / "out")
    line = one_line_error(["shards", "--dataset", "digits", out, "--quality", "5"], capsys)
    assert line.endswith("--quality is read only where JPEGs are written, and a --dataset digits source is stored as "
                         "PNG: add --reencode jpg, or leave --quality out")
    line = one_line_error(["shards", "--folder", str(tmp_path), out, "--reencode", "png", "--quality", "5"], capsys)
    assert "--reencode png writes PNG" in line
    assert written == []
    # read: JPEG re-encodes (--reencode jpg), and a folder's JPEGs re-encoded when downsized or turned upright
    assert main(["shards", "--dataset", "digits", out, "--reencode", "jpg", "--quality", "5"]) == 0
    assert main(["shards", "--folder", str(tmp_path), out, "--max-side", "64", "--quality", "80"]) == 0
    assert [o.quality for o in written] == [5, 80]


# ------------------------------------------------------------------------------------------- out-of-range values
@pytest.mark.parametrize(("argv", "named"), [
    (["shards", "--dataset", "digits", "OUT", "--max-side", "0"], "--max-side: must be an integer >= 1, got 0"),
    (["shards", "--dataset", "digits", "OUT", "--max-side", "-5"], "--max-side: must be an integer >= 1, got -5"),
    (["shards", "--dataset", "digits", "OUT", "--reencode", "jpg", "--quality", "500"],
     "--quality: must be a JPEG quality from 1 to 100, got 500"),
    (["shards", "--dataset", "digits", "OUT", "--samples-per-shard", "0"], "--samples-per-shard: must be an integer"),
    (["show", "EXP", "--data", "D", "--out", "O", "-n", "0"], "-n/--num-images: must be an integer >= 1, got 0"),
    (["show", "EXP", "--data", "D", "--out", "O", "--max-train", "-5"], "--max-train: must be an integer >= 0"),
    (["curate", "P", "--embeddings", "E", "--out", "O", "--size", "10", "--clusters", "0"],
     "--clusters: each value must be an integer >= 1, got '0'"),
    (["curate", "P", "--embeddings", "E", "--out", "O", "--size", "10", "--clusters", "100,0,5"],
     "--clusters: each value must be an integer >= 1, got '100,0,5'"),
    (["curate", "P", "--embeddings", "E", "--out", "O", "--size", "10", "--iters", "0"], "--iters: must be"),
    (["curate", "P", "--embeddings", "E", "--out", "O", "--size", "10", "--resample-steps=-1"],
     "--resample-steps: each value must be an integer >= 0, got '-1'"),
    (["curate", "P", "--embeddings", "E", "--out", "O", "--size", "10", "--resample-sizes", "0"],
     "--resample-sizes: each value must be an integer >= 1"),
    (["import", "SRC", "OUT", "--img-size", "0"], "--img-size: must be an integer >= 1, got 0"),
    (["bench", "step", "--batch-size", "0"], "--batch-size: must be an integer >= 1, got 0"),
    (["bench", "step", "--steps", "0"], "--steps: must be an integer >= 1, got 0"),
    (["search", "DIR", "key:x", "-k", "0"], "-k: must be an integer >= 1, got 0"),
])
def test_out_of_range_counts_are_refused_naming_the_flag(argv: list[str], named: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    line = _argparse_refusal(argv, capsys)
    assert line.startswith(f"sslpipe {argv[0]}") and named in line, line
    assert not (tmp_path / "out").exists()


def test_bench_on_cuda_without_cuda_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    import sslpipe.bench.step as step

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(step, "run_step_bench", _never("run_step_bench"))
    line = one_line_error(["bench", "step", "--device", "cuda"], capsys)
    assert line.startswith("sslpipe bench: error: --device cuda: CUDA is not available on this machine")
