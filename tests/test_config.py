"""Config loading: defaults, overrides, and errors that name the file, the dotted key and the fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from sslpipe.config import ConfigError, load_config, save_config

MINIMAL = "method: dino\ndata:\n  train: /data/shards\n"


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_published_ibot_values(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.head.out_dim == 8192 and cfg.head.norm_last_layer is False and cfg.head.shared_head is True
    assert cfg.optim.lr == 5e-4 and cfg.optim.clip_grad == 3.0 and cfg.optim.clip_mode == "per_tensor"
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (0.04, 0.4)
    assert cfg.crops.global_scale == (0.25, 1.0) and cfg.crops.n_local == 10
    assert cfg.masking.pred_ratio == [0.0, 0.3] and cfg.loss.teacher_temp == 0.07
    assert cfg.loss.warmup_teacher_temp_epochs == 30 and cfg.train.epochs == 800


def test_overrides_are_parsed_as_yaml(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL + "run_name: x\n"),
                      ["optim.lr=1e-3", "crops.global_scale=[0.4,1.0]", "run_name=null", "model.kwargs.img_size=32",
                       "tracking.log_with=[tensorboard]"])
    assert cfg.optim.lr == 1e-3
    assert cfg.crops.global_scale == (0.4, 1.0)
    assert cfg.run_name is None
    assert cfg.model.kwargs == {"img_size": 32}
    assert cfg.tracking.log_with == ["tensorboard"]


def test_unknown_key_names_the_dotted_key_and_closest_spelling(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "optim:\n  weight_decay_ned: 0.3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "optim.weight_decay_ned" in msg and "did you mean 'optim.weight_decay_end'" in msg.lower()


def test_unknown_top_level_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'crop'.*'crops'"):
        load_config(write(tmp_path, MINIMAL + "crop:\n  n_local: 2\n"))


def test_wrong_type_names_key_value_and_expected_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL + "train:\n  epochs: many\n"))
    msg = str(err.value)
    assert "train.epochs" in msg and "'many'" in msg and "expected int" in msg


def test_wrong_tuple_length_reports_the_whole_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"crops.global_scale' = \[0.2\].*tuple\[float, float\]"):
        load_config(write(tmp_path, MINIMAL), ["crops.global_scale=[0.2]"])


def test_bad_literal(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"optim.clip_mode' = 'norm'"):
        load_config(write(tmp_path, MINIMAL), ["optim.clip_mode=norm"])


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "method: dino\ndata:\n  train: [a, b\nseed: 1\n")
    with pytest.raises(ConfigError, match=rf"{path}:.*line 4"):
        load_config(path)


def test_missing_required_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="required key 'data' is missing"):
        load_config(write(tmp_path, "method: dino\n"))


def test_resampled_needs_steps_per_epoch(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.steps_per_epoch"):
        load_config(write(tmp_path, MINIMAL), ["data.resampled=true"])


@pytest.mark.parametrize("override, pattern", [
    ("optim.lrr=1", r"override 'optim.lrr=1': unknown key 'optim.lrr'. Did you mean 'optim.lr'"),
    ("optim.lr.x=1", r"'optim.lr' is a value, not a section"),
    ("optim.lr", r"not of the form key.sub=value"),
    ("optim.lr=[1", r"not valid YAML"),
])
def test_bad_overrides(tmp_path: Path, override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(write(tmp_path, MINIMAL), [override])


def test_save_and_reload_round_trip(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL), ["optim.lr=2e-3", "crops.local_scale=[0.1,0.3]"])
    again = load_config(save_config(cfg, tmp_path / "out" / "config.yaml"))
    assert again == cfg


def test_unquoted_no_means_no_mixed_precision() -> None:
    from sslpipe.config import apply_overrides, config_from_dict

    data = apply_overrides({"method": "dino", "data": {"train": "x"}}, ["train.mixed_precision=no"])
    assert data["train"]["mixed_precision"] == "no"  # a string field keeps the text of an override
    assert config_from_dict(data).train.mixed_precision == "no"
    recipe = {"method": "dino", "data": {"train": "x"}, "train": {"mixed_precision": False}}  # `no` in a YAML file
    assert config_from_dict(recipe).train.mixed_precision == "no"


@pytest.mark.parametrize("word", ["off", "no", "on", "yes", "Off", "2024", "1e-3"])
def test_a_string_field_keeps_the_text_yaml_would_read_as_another_type(tmp_path: Path, word: str) -> None:
    cfg = load_config(write(tmp_path, MINIMAL), [f"run_name={word}", f"data.val={word}", f"output_dir={word}"])
    assert (cfg.run_name, cfg.data.val, cfg.output_dir) == (word, word, word)
    assert load_config(write(tmp_path, MINIMAL), ["run_name=null"]).run_name is None  # null still means none
    assert load_config(write(tmp_path, MINIMAL), ["train.deterministic=yes"]).train.deterministic is True


def test_one_name_for_a_list_field_is_a_one_element_list(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL), ["tracking.log_with=wandb", "eval.knn_k=20",
                                                 "optim.step_epochs=[8, 11]"])
    assert cfg.tracking.log_with == ["wandb"] and cfg.eval.knn_k == [20] and cfg.optim.step_epochs == [8.0, 11.0]
    assert cfg.crops.global_scale == (0.25, 1.0)  # tuples are not lists: a single value stays an error
    with pytest.raises(ConfigError, match="crops.global_scale"):
        load_config(write(tmp_path, MINIMAL), ["crops.global_scale=0.4"])
    with pytest.raises(ConfigError, match="tracking.log_with"):
        load_config(write(tmp_path, MINIMAL), ["tracking.log_with=mlflow"])
