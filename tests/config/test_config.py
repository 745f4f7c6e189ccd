"""Config loading: the core schema plus the method's section, defaults, overrides, keys a method does not read,
configs written before the per-method schema, and errors that name the file, the dotted key and the fix."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sslpipe.config import ConfigError, config_to_dict, save_config
from sslpipe.recipes import KNOWN_RECIPES, config_from_dict, get_recipe, load_config

REPO = Path(__file__).resolve().parents[2]
MINIMAL = "method: dino\ndata:\n  train: /data/shards\n"


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_published_ibot_values(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL.replace("dino", "ibot")))
    assert cfg.ibot.head.out_dim == 8192 and cfg.ibot.head.norm_last_layer is False and cfg.ibot.head.shared_head
    assert cfg.optim.lr == 5e-4 and cfg.optim.clip_grad == 3.0 and cfg.optim.clip_mode == "per_tensor"
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (0.04, 0.4)
    assert cfg.crops.global_scale == (0.25, 1.0) and cfg.crops.n_local == 10
    assert cfg.ibot.masking.pred_ratio == [0.0, 0.3] and cfg.ibot.loss.teacher_temp == 0.07
    assert cfg.ibot.loss.warmup_teacher_temp_epochs == 30 and cfg.train.epochs == 800
    assert (cfg.ibot.momentum_teacher, cfg.ibot.freeze_last_layer_epochs) == (0.996, 1)


def test_a_run_carries_the_core_and_its_own_section_only(tmp_path: Path) -> None:
    data = config_to_dict(load_config(write(tmp_path, MINIMAL.replace("dino", "dinov2"))))
    assert set(data) == {"method", "seed", "output_dir", "run_name", "data", "crops", "model", "optim", "train",
                         "tracking", "eval", "dinov2"}
    assert "sync_batchnorm" not in data["model"] and "mode" not in data["eval"]  # keys dinov2 does not read


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads_in_the_current_layout(path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = load_config(path)
    assert cfg.method in KNOWN_RECIPES and getattr(cfg, get_recipe(cfg.method).config_key) is not None
    assert "layout before per-method sections" not in capsys.readouterr().err  # no key needed moving


def test_a_core_key_the_method_does_not_read_is_refused_naming_the_method(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'model.sync_batchnorm' is not read by method 'dinov2': its ViT has "
                                          r"no BatchNorm"):
        load_config(REPO / "recipes/demo_dinov2.yaml", ["model.sync_batchnorm=false"])
    with pytest.raises(ConfigError, match=r"key 'model.init_from' is not read by method 'distill': the student "
                                          r"starts from random init; the teacher is distill.teacher"):
        load_config(REPO / "recipes/demo_distill.yaml", ["model.init_from=/nonexistent/export"])
    with pytest.raises(ConfigError, match=r"recipe.yaml: key 'crops.n_local' is not read by method 'u2pl'"):
        load_config(write(tmp_path, "method: u2pl\ndata: {train: x}\ncrops: {n_local: 2}\n"))


def test_another_methods_section_is_refused_naming_both(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'ibot' is the section of method 'ibot', not read by method 'dino' "
                                          r"\(its section is 'dino'\)"):
        load_config(write(tmp_path, MINIMAL + "ibot:\n  masking: {pred_ratio: 0.3}\n"))
    with pytest.raises(ConfigError, match=r"override 'ibot.head.out_dim=4': key 'ibot' is the section of method"):
        load_config(write(tmp_path, MINIMAL), ["ibot.head.out_dim=4"])
    with pytest.raises(ConfigError, match=r"unknown key 'dino.head.patch_out_dim'.*Valid keys of dino.head: out_dim"):
        load_config(write(tmp_path, MINIMAL), ["dino.head.patch_out_dim=4"])  # iBOT's patch head, not DINO's


def test_a_config_written_before_the_per_method_schema_is_read_in_its_new_layout(
        capsys: pytest.CaptureFixture) -> None:
    """A run directory of sslpipe 0.1 (its config.yaml holds every method's sections) still loads: the demo's."""
    old = REPO / "tests/fixtures/config_v0.1_dinov2_demo.yaml"
    cfg = load_config(old)
    assert "head.out_dim -> dinov2.head.out_dim" in capsys.readouterr().err
    now = load_config(REPO / "recipes/demo_dinov2.yaml", ["data.train=runs/demo/shards", "data.val=runs/demo/shards",
                                                          "output_dir=runs/demo", "run_name=pretrain"])
    assert cfg == now


def test_an_old_config_with_a_value_its_method_never_read_is_refused_naming_the_key(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "tests/fixtures/config_v0.1_dinov2_demo.yaml").read_text())
    data["u2pl"]["crop_size"] = 96  # a U2PL value in a DINOv2 run: it was never used
    with pytest.raises(ConfigError, match=r"old.yaml: written by sslpipe 0.1, and its key 'u2pl.crop_size' = 96 is "
                                          r"not read by method 'dinov2'"):
        config_from_dict(data, where=str(tmp_path / "old.yaml"))


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
    assert (str(path) in msg and "optim.weight_decay_ned" in msg
            and "did you mean 'optim.weight_decay_end'" in msg.lower())


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
    from sslpipe.config.loading import apply_overrides
    from sslpipe.recipes import schema_for

    data = apply_overrides({"method": "dino", "data": {"train": "x"}}, ["train.mixed_precision=no"], schema_for("dino"))
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
