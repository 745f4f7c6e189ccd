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
