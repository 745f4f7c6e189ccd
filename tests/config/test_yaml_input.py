"""What the YAML a user writes becomes: a key written twice is refused (PyYAML kept the last one, so a second `optim:`
block dropped every key of the first), a broken override or a folder given as the recipe is one line, a recipe of
today's layout with one 0.1 key name refuses what it never reads, and every reader of a run's config.yaml reads it
as the YAML 1.2 it was written in."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sslpipe.config.loading import ConfigError, load_yaml, save_config
from sslpipe.recipes import load_config

REPO = Path(__file__).resolve().parents[2]
DEMO = (REPO / "recipes" / "demo_dinov2.yaml").read_text()


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_a_section_written_twice_is_refused_naming_it_and_both_lines(tmp_path: Path) -> None:
    first = 1 + next(i for i, line in enumerate(DEMO.splitlines()) if line == "optim:")
    second = len(DEMO.splitlines()) + 1
    path = _recipe(tmp_path, DEMO + "optim:\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: line {second}, column 1: invalid YAML: key 'optim' appears twice (lines "
                              f"{first} and {second}): keep one")


def test_a_leaf_written_twice_is_refused_with_its_dotted_key(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "method: dino\ndata:\n  train: /d\n  batch_size: 64\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"line 5, column 3: invalid YAML: key 'data.batch_size' appears twice "
                                          r"\(lines 4 and 5\): keep one$"):
        load_config(path)


def test_a_key_written_twice_in_an_override_or_a_list_is_refused_in_one_line(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "method: dino\ndata:\n  train: /d\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["model.kwargs={depth: 1, depth: 2}"])
    assert str(err.value) == ("override 'model.kwargs={depth: 1, depth: 2}': value '{depth: 1, depth: 2}' is not "
                              "valid YAML (column 12: key 'depth' appears twice (line 1, columns 2 and 12): keep one)")
    with pytest.raises(yaml.YAMLError, match=r"key 'a.1.b' appears twice \(line 1, columns 20 and 26\)"):
        load_yaml("a: [{b: 1}, {c: 2, b: 3, b: 4}]")


def test_keys_merged_from_an_anchor_may_be_overridden() -> None:
    """`<<: *base` then a key of base is YAML's way to override one key: not a key written twice."""
    assert load_yaml("base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\n") == {"base": {"x": 1, "y": 2},
                                                                           "d": {"x": 3, "y": 2}}


def test_a_broken_override_value_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "recipes" / "demo_dinov2.yaml", ["optim.betas=[0.9,0.99"])
    assert str(err.value) == ("override 'optim.betas=[0.9,0.99': value '[0.9,0.99' is not valid YAML (column 10: "
                              "expected ',' or ']', but got '<stream end>')")


def test_a_folder_given_as_the_recipe_says_it_is_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert str(err.value) == f"{tmp_path} is a directory, not a recipe: give a recipe YAML (e.g. recipes/demo_*.yaml)"
    (tmp_path / "config.yaml").write_text("method: dino\n")
    with pytest.raises(ConfigError, match=r"is a directory, not a recipe: .*; to continue the run there: sslpipe "
                                          rf"train {tmp_path / 'config.yaml'} --resume {tmp_path}$"):
        load_config(tmp_path)


def test_a_recipe_of_todays_layout_with_one_0_1_key_still_refuses_what_it_never_reads(tmp_path: Path) -> None:
    """`eval.knn_every_epochs` (a 0.1 name) made the file read as a saved 0.1 config, which drops unread values."""
    text = (REPO / "recipes" / "demo_simclr.yaml").read_text()
    assert "\noptim:\n" in text and "\neval:\n" in text
    text = text.replace("\noptim:\n", "\noptim:\n  poly_power: 2.0\n").replace("\neval:\n",
                                                                             "\neval:\n  knn_every_epochs: 0\n")
    with pytest.raises(ConfigError, match=r"key 'optim.poly_power' = 2.0 is not read with optim.schedule=cosine"):
        load_config(_recipe(tmp_path, text), ["data.train=/d", "data.val=/d"])


def _saved_run(tmp_path: Path, recipe: str, overrides: list[str]) -> Path:
    run = tmp_path / "0.5_1"
    save_config(load_config(REPO / "recipes" / recipe, ["run_name=0.5_1", *overrides]), run / "config.yaml")
    assert "run_name: 0.5_1\n" in (run / "config.yaml").read_text()  # plain: YAML 1.1 reads it as 0.51
    return run


def test_report_and_export_read_config_yaml_as_yaml_1_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sslpipe.weights.run_export as run_export
    from sslpipe.viz.report import read_run

    run = _saved_run(tmp_path, "demo_dinov2.yaml", ["data.train=/d", "data.val=/d", "model.kwargs.tag='1_0.5'"])
    config = read_run(run).config
    assert config["run_name"] == "0.5_1" and config["model"]["kwargs"]["tag"] == "1_0.5"
    read: list = []
    monkeypatch.setattr(run_export, "load_yaml", lambda text: read.append(load_yaml(text)) or read[-1])
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        run_export.export_run(run)
    assert read[0]["run_name"] == "0.5_1" and read[0]["model"]["kwargs"]["tag"] == "1_0.5"


def test_eval_seg_reads_a_run_named_like_a_yaml_1_1_number(tmp_path: Path) -> None:
    """`run_name=0.5_1` trained, and eval-seg refused the run: `key 'run_name' = 0.51 is invalid`."""
    from sslpipe.eval_seg import eval_seg_run

    run = _saved_run(tmp_path, "demo_supervised_seg.yaml",
                     ["data.train=/d", "data.val=/d", "supervised_seg.num_classes=3"])
    with pytest.raises(FileNotFoundError, match=r"no checkpoints/step_N folders in .*0.5_1"):  # read: past the config
        eval_seg_run(run)
