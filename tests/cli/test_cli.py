"""The `sslpipe` command: subcommands reach the library and bad input ends in one clear message, not a traceback."""
from __future__ import annotations

from pathlib import Path

import pytest

from sslpipe.cli import main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_shards_then_refuse_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "digits"
    assert main(["shards", "--dataset", "digits", str(out), "--samples-per-shard", "500"]) == 0
    assert "train: 1438 samples in 3 shards" in capsys.readouterr().out
    before = sorted(p.name for p in out.iterdir())
    assert main(["shards", "--dataset", "digits", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and str(out) in err
    assert sorted(p.name for p in out.iterdir()) == before, "nothing already written is lost"


def test_train_with_a_misspelt_key_names_it_and_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", str(RECIPES / "demo_dino.yaml"), "optim.lrr=1e-3", f"output_dir={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "optim.lr" in err


def test_train_with_missing_shards_names_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    code = main(["train", str(RECIPES / "demo_dino.yaml"), f"data.train={missing}", f"output_dir={tmp_path}",
                 "run_name=r", "--resume", "auto"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "sslpipe shards" in err


def test_a_missing_val_set_is_refused_before_the_run_starts(digits_shards: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """data.val is read at the first evaluation only: found there, a whole epoch was lost with no checkpoint."""
    missing = tmp_path / "no_val"
    code = main(["train", str(RECIPES / "demo_dino.yaml"), f"data.train={digits_shards}", f"data.val={missing}",
                 f"output_dir={tmp_path}", "run_name=r", "eval.every_epochs=1"])
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and f"data.val='{missing}' (split 'val'), read at every evaluation" in err[0]
    assert not (tmp_path / "r").exists()


def test_a_diverged_run_ends_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(f"method: tests.workers.toy_recipe:ToyRecipe\noutput_dir: {tmp_path}\nrun_name: nan\n"
                      "data: {train: synthetic, batch_size: 8}\nmodel: {kwargs: {nan_at_step: 2}}\n")
    assert main(["train", str(recipe)]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(errors) == 1
    assert errors[0].startswith("sslpipe train: error: training diverged at global step 2")


def test_a_tracker_that_is_not_installed_is_refused_before_the_run_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import sslpipe.engine.tracking as tracking

    monkeypatch.setattr(tracking, "is_tensorboard_available", lambda: False)
    code = main(["train", str(RECIPES / "demo_dino.yaml"), "data.train=unused", f"output_dir={tmp_path}",
                 "run_name=tb", "tracking.log_with=[tensorboard]"])
    assert code == 2
    assert "tracking.log_with lists 'tensorboard' but it is not installed" in capsys.readouterr().err
    assert not (tmp_path / "tb").exists()


def test_overrides_after_options_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """`train R.yaml --resume auto a.b=1` (the form launch/slurm.sbatch writes) reaches the trainer with every
    override, before and after the option, in order; an unknown option still exits."""
    import sslpipe.engine.trainer as trainer

    seen: dict = {}
    monkeypatch.setattr(trainer, "run_recipe",
                        lambda recipe, overrides, **kw: seen.update(recipe=recipe, overrides=overrides, **kw) or "run")
    assert main(["train", "r.yaml", "x=0", "--resume", "auto", "train.stop_file=/tmp/stop", "a.b=1"]) == 0
    assert seen["recipe"] == "r.yaml" and seen["resume"] == "auto"
    assert seen["overrides"] == ["x=0", "train.stop_file=/tmp/stop", "a.b=1"]
    with pytest.raises(SystemExit):
        main(["train", "recipe.yaml", "--bogus"])
    with pytest.raises(SystemExit):
        main(["train", "recipe.yaml", "--resume", "auto", "stray"])
