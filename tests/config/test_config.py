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
                      ["optim.lr=1e-3", "crops.global_scale=[0.4,1.0]", "run_name=null", "model.kwargs.depth=2",
                       "tracking.log_with=[tensorboard]"])
    assert cfg.optim.lr == 1e-3
    assert cfg.crops.global_scale == (0.4, 1.0)
    assert cfg.run_name is None
    assert cfg.model.kwargs == {"depth": 2}
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
                                                 "optim.schedule=step", "optim.step_epochs=[8, 11]"])
    assert cfg.tracking.log_with == ["wandb"] and cfg.eval.knn_k == [20] and cfg.optim.step_epochs == [8.0, 11.0]
    assert cfg.crops.global_scale == (0.25, 1.0)  # tuples are not lists: a single value stays an error
    with pytest.raises(ConfigError, match="crops.global_scale"):
        load_config(write(tmp_path, MINIMAL), ["crops.global_scale=0.4"])
    with pytest.raises(ConfigError, match="tracking.log_with"):
        load_config(write(tmp_path, MINIMAL), ["tracking.log_with=mlflow"])


# ------------------------------------------------------------------------------------------- review findings
def test_the_method_cannot_be_overridden(tmp_path: Path) -> None:
    """The schema is chosen by the recipe's method: an override would validate under the wrong one."""
    with pytest.raises(ConfigError, match=r"override 'method=simclr': the method cannot be overridden"):
        load_config(write(tmp_path, MINIMAL), ["method=simclr"])


def test_the_method_name_is_the_registry_key(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, MINIMAL.replace("dino", "DINO"))).method == "dino"


def test_an_evaluation_setting_that_would_never_act_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.best_metric=knn/top1_k20 is never computed: eval.every_epochs is "):
        load_config(write(tmp_path, MINIMAL), ["train.best_metric=knn/top1_k20"])
    with pytest.raises(ConfigError, match=r"eval.every_epochs=1 evaluates on data.val, which is not set"):
        load_config(write(tmp_path, MINIMAL), ["eval.every_epochs=1"])
    cfg = load_config(write(tmp_path, MINIMAL), ["data.val=x", "eval.every_epochs=1", "train.best_metric=knn/top1_k20"])
    assert cfg.train.best_metric == "knn/top1_k20"


@pytest.mark.parametrize("override, pattern", [
    ("train.log_every=0", r"key 'train.log_every' = 0 is invalid: .*greater than 0"),
    ("train.grad_accum_steps=0", r"key 'train.grad_accum_steps' = 0 is invalid"),
    ("train.epochs=0", r"key 'train.epochs' = 0 is invalid"),
    ("data.batch_size=0", r"key 'data.batch_size' = 0 is invalid"),
    ("optim.lr=-1", r"key 'optim.lr' = -1 is invalid"),
    ("optim.betas=[0.9,1.5]", r"key 'optim.betas' = \[0.9, 1.5\] is invalid: must both be in \[0, 1\)"),
    ("eval.knn_k=[]", r"key 'eval.knn_k' = \[\] is invalid: must hold one or more k >= 1"),
    ("eval.knn_temperature=0", r"key 'eval.knn_temperature' = 0 is invalid"),
    ("crops.global_scale=[1.0,0.2]", r"key 'crops.global_scale' = \[1.0, 0.2\] is invalid: must be \(low, high\)"),
    ("dino.head.out_dim=0", r"key 'dino.head.out_dim' = 0 is invalid"),
    ("crops.global_size=18", r"crops.global_size=18 is not a multiple of model.patch_size=4: use 16 or 20"),
])
def test_out_of_range_values_are_refused_in_one_line_naming_the_key(tmp_path: Path, override: str,
                                                                    pattern: str) -> None:
    path = write(tmp_path, MINIMAL + "model: {patch_size: 4}\ncrops: {global_size: 16, local_size: 8}\n")
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(path, [override])
    assert "\n" not in str(err.value)


def test_a_runs_saved_config_drops_what_it_never_read_where_a_recipe_is_refused(tmp_path: Path, capsys) -> None:
    """A run made before a refusal (e.g. the demo's `local_size: 12` with no local crops, Q-score keys of a switched
    off regulariser) still resumes, evaluates and predicts: its config.yaml drops those keys with a notice. The same
    file as a recipe, and the same key from the command line, are refused."""
    data = yaml.safe_load((REPO / "recipes/demo_dinov2.yaml").read_text())
    data["data"]["train"] = "x"
    data["crops"].update(local_size=12, local_scale=[0.1, 0.4])
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(run / "config.yaml")
    assert cfg.crops.local_size == 96 and cfg.crops.local_scale == (0.05, 0.25) and cfg.crops.n_local == 0
    notice = capsys.readouterr().err
    assert "written by an earlier sslpipe; dropped what this run's settings never read: crops.local_size = 12" in notice
    with pytest.raises(ConfigError, match=r"'crops.local_size' = 12 is not read with crops.n_local=0"):
        load_config(run / "config.yaml", ["crops.local_size=12"])
    with pytest.raises(ConfigError, match=r"'crops.local_size' = 16 is not read with crops.n_local=0"):
        load_config(run / "config.yaml", ["crops={global_size: 28, n_local: 0, local_size: 16}"])  # a section
    assert load_config(run / "config.yaml", ["data.train=y"]).data.train == "y"  # other keys: still dropped
    with pytest.raises(ConfigError, match=r"'crops.local_size' = 12 is not read with crops.n_local=0"):
        load_config(write(tmp_path, yaml.safe_dump(data), "config.yaml"))  # no run beside it: a recipe
    simclr = yaml.safe_load((REPO / "recipes/demo_simclr_qscore.yaml").read_text())
    simclr["data"]["train"] = "x"
    simclr["simclr"]["qscore"]["enabled"] = False  # a control arm of the old form
    (run / "config.yaml").write_text(yaml.safe_dump(simclr))
    assert load_config(run / "config.yaml").simclr.qscore.version == "v2"
    assert "qscore.version = 'v1' (not read with qscore.enabled=false)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"simclr.qscore.eps"):
        load_config(run / "config.yaml", ["simclr.qscore={enabled: false, eps: 5.0}"])


def test_a_knn_crop_larger_than_its_resize_is_refused_at_load(tmp_path: Path) -> None:
    """The periodic kNN's centre crop must fit its resize (null: crops.global_size x 256/224 = 256 at 224): the
    probe refused it only at the first evaluation, an epoch into the run. A dense method does not read these keys."""
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"eval.crop=300 is larger than eval.resize=256"):
        load_config(path, ["eval.crop=300"])
    with pytest.raises(ConfigError, match=r"eval.crop=224 is larger than eval.resize=200"):
        load_config(path, ["eval.resize=200"])
    assert load_config(path, ["eval.crop=256"]).eval.crop == 256  # fits exactly
    assert load_config(path, ["eval.crop=300", "eval.resize=300"]).eval.resize == 300
    assert load_config(REPO / "recipes/demo_u2pl.yaml", ["data.train=x", "u2pl.unlabeled=y"]).eval.crop is None


def test_crops_that_are_not_made_are_not_checked_against_the_patch(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "model: {patch_size: 4}\ncrops: {global_size: 16, local_size: 9, n_local: 0}\n")
    with pytest.raises(ConfigError, match=r"key 'crops.local_size' = 9 is not read with crops.n_local=0"):
        load_config(path)  # not made, so never read: refused, not checked against the patch
    with pytest.raises(ConfigError, match=r"key 'crops.local_scale' = \(0.1, 0.4\) is not read with crops.n_local=0"):
        load_config(write(tmp_path, MINIMAL), ["crops.n_local=0", "crops.local_scale=[0.1,0.4]"])
    assert load_config(write(tmp_path, MINIMAL + "model: {patch_size: 4}\ncrops: {global_size: 16, n_local: 0}\n"))
    assert load_config(write(tmp_path, MINIMAL), ["model.arch=resnet18", "model.patch_size=null",
                                                   "crops.global_size=18", "crops.local_size=9"])  # a CNN
    with pytest.raises(ConfigError, match="dinov3.gram.refresh_every"):
        load_config(REPO / "recipes/demo_dinov3.yaml", ["dinov3.gram.refresh_every=0"])


@pytest.mark.parametrize("overrides, pattern", [
    (["optim.step_epochs=[1,2]"], r"key 'optim.step_epochs' = \[1.0, 2.0\] is not read with optim.schedule=cosine"),
    (["optim.poly_power=5"], r"key 'optim.poly_power' = 5.0 is not read with optim.schedule=cosine"),
    (["optim.sgd_momentum=0.1"], r"key 'optim.sgd_momentum' = 0.1 is not read with optim.name=adamw"),
    (["optim.name=sgd", "optim.betas=[0.9,0.95]"], r"'optim.betas' = \(0.9, 0.95\) is not read with optim.name=sgd"),
    (["optim.warmup_iters=5", "optim.warmup_epochs=2"], r"'optim.warmup_epochs' = 2.0 is not read with optim.warmup_"),
    (["optim.schedule=step", "optim.min_lr=0.1"], r"key 'optim.min_lr' = 0.1 is not read with optim.schedule=step"),
    # the engine review: two runs differing only in clip_grad under clip_mode=none ended bit-identical
    (["optim.clip_mode=none", "optim.clip_grad=1.0"], r"'optim.clip_grad' = 1.0 is not read with optim.clip_mode=none"),
    (["optim.clip_mode=global", "optim.clip_grad=0"], r"'optim.clip_mode' = 'global' is not read with optim.clip_gr"),
    (["train.compile_backend=eager"], r"'train.compile_backend' = 'eager' is not read with train.compile=false"),
    (["tracking.wandb_mode=offline"], r"'tracking.wandb_mode' = 'offline' is not read with tracking.log_with=\[\]"),
    (["tracking.wandb_project=x"], r"'tracking.wandb_project' = 'x' is not read with tracking.log_with=\[\]"),
    (["data.on_error=raise", "data.max_skipped_shards=3"],
     r"'data.max_skipped_shards' = 3 is not read with data.on_error=raise"),
])
def test_an_optimiser_key_the_chosen_optimiser_or_schedule_does_not_read_is_refused(
        tmp_path: Path, overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(write(tmp_path, MINIMAL), overrides)


def test_method_keys_read_only_with_another_setting_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"'ibot.masking.min_aspect' = 0.5 is not read with ibot.masking.pred_sh"):
        load_config(REPO / "recipes/demo_ibot.yaml", ["ibot.masking.pred_shape=rand", "ibot.masking.min_aspect=0.5"])
    with pytest.raises(ConfigError, match=r"'distill.temperature' = 0.1 is not read with distill.global_loss=cosine"):
        load_config(REPO / "recipes/demo_distill.yaml", ["distill.global_loss=cosine", "distill.temperature=0.1"])
    with pytest.raises(ConfigError, match=r"'eval.mode' = 'slide' is not read with finetune_mask2former.task=instance"):
        load_config(REPO / "recipes/demo_finetune_m2f.yaml", ["finetune_mask2former.task=instance", "eval.mode=slide"])


@pytest.mark.parametrize("overrides, message", [
    (["ibot.masking.min_aspect=2.0"], r"ibot.masking: min_aspect must be in \(0, 1\], got 2.0"),
    (["ibot.masking.pred_ratio=0.7", "ibot.masking.pred_ratio_var=0.5"],
     r"ibot.masking: need 0 <= pred_ratio_var <= pred_ratio and pred_ratio \+ var <= 1, got \(0.7, 0.5\)"),
])
def test_masking_settings_are_checked_when_the_recipe_loads(overrides: list[str], message: str) -> None:
    """They were checked when the first epoch's loader was built, after the run directory was written."""
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "recipes/demo_ibot.yaml", overrides)


def test_current_layout_sections_are_not_read_as_sslpipe_0_1() -> None:
    base = {"data": {"train": "x"}}
    with pytest.raises(ConfigError, match=r"key 'u2pl' is the section of method 'u2pl', not read by method "
                                          r"'supervised_seg'"):
        config_from_dict({"method": "supervised_seg", **base, "supervised_seg": {"crop_size": 128},
                          "u2pl": {"crop_size": 64}})
    with pytest.raises(ConfigError, match=r"key 'optim.momentum_teacher' is a key of sslpipe 0.1: it is "
                                          r"'dino.momentum_teacher' now"):
        config_from_dict({"method": "dino", **base, "dino": {"momentum_teacher": 0.98},
                          "optim": {"momentum_teacher": 0.5}})
    for other in ("simclr", "dinov2"):
        with pytest.raises(ConfigError, match=rf"key '{other}' is the section of method '{other}'"):
            config_from_dict({"method": "dino", **base, other: {"temperature": 0.5}})
    with pytest.raises(ConfigError, match=r"unknown key 'optim.momentum_teacher'"):
        config_from_dict({"method": "simclr", **base, "optim": {"momentum_teacher": 0.5}})


def test_an_old_config_whose_two_keys_move_to_one_place_with_different_values_is_refused() -> None:
    data = yaml.safe_load((REPO / "tests/fixtures/config_v0.1_dinov2_demo.yaml").read_text())
    data["eval"]["every_epochs"] = 3  # and eval.knn_every_epochs: 0, which moves there
    with pytest.raises(ConfigError, match=r"two of its keys set 'eval.every_epochs'"):
        config_from_dict(data)


def test_exponents_without_a_dot_are_floats_in_files_and_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "model: {kwargs: {init_values: 1e-5}}\n")
    assert load_config(path).model.kwargs == {"init_values": 1e-5}
    assert load_config(write(tmp_path, MINIMAL), ["model.kwargs.init_values=1e-5"]).model.kwargs["init_values"] == 1e-5
    assert load_config(write(tmp_path, MINIMAL), ["train.max_steps=1e3"]).train.max_steps == 1000


def test_a_header_with_a_newline_stays_a_comment(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    path = save_config(cfg, tmp_path / "out" / "config.yaml", header="overrides: dino.head={out_dim: 32,\n  x: 1}")
    assert load_config(path) == cfg


def test_a_string_that_reads_as_a_number_is_saved_quoted(tmp_path: Path) -> None:
    """`run_name=1e5` is text (a string key); config.yaml writes it quoted, so it loads back as text under the
    YAML 1.2 number rule (which would read the bare 1e5 as a float) and the run can be resumed from it."""
    cfg = load_config(write(tmp_path, MINIMAL), ["run_name=1e5", "optim.lr=1e-5"])
    assert cfg.run_name == "1e5" and cfg.optim.lr == 1e-5
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert "run_name: '1e5'" in path.read_text() and load_config(path) == cfg


def test_an_error_caused_by_an_override_names_the_override(tmp_path: Path) -> None:
    path = REPO / "recipes/demo_u2pl.yaml"
    with pytest.raises(ConfigError, match=r"^override 'crops.n_local=2': key 'crops.n_local' is not read"):
        load_config(path, ["crops.n_local=2"])
    with pytest.raises(ConfigError, match=r"^override 'train.epochs=0': key 'train.epochs'"):
        load_config(path, ["train.epochs=0"])
    with pytest.raises(ConfigError, match=r"^\S+recipe.yaml with override 'train.compile_scope=step': "):
        load_config(write(tmp_path, MINIMAL), ["train.compile_scope=step"])


def test_a_section_check_prints_its_message_not_the_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "recipes/demo_dinov2.yaml", ["dinov2.sinkhorn_iterations=0"])
    assert str(err.value).endswith(": dinov2.sinkhorn_iterations must be >= 1, got 0")
    assert "koleo" not in str(err.value)


def test_local_crops_larger_than_the_global_ones_are_refused_but_a_saved_run_still_loads(tmp_path: Path) -> None:
    """`crops.n_local=4` on a 28-px recipe leaves local_size at 96: refused naming both sizes. SimCLR reads no local
    crops and is let through; a run's own saved config that trained so still loads."""
    recipe = yaml.safe_load((REPO / "recipes/demo_dinov2.yaml").read_text())
    recipe["data"]["train"] = "x"
    path = write(tmp_path, yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=r"crops.local_size=96 is larger than crops.global_size=28 with "
                                          r"crops.n_local=4"):
        load_config(path, ["crops.n_local=4"])
    assert load_config(path, ["crops.n_local=4", "crops.local_size=12"]).crops.local_size == 12
    with pytest.raises(ConfigError, match=r"crops.local_size=32 is larger than crops.global_size=28"):
        load_config(path, ["crops.n_local=2", "crops.local_size=32"])
    assert load_config(path, ["crops.n_local=2", "crops.local_size=28"]).crops.n_local == 2  # equal: let through
    simclr = load_config(write(tmp_path, "method: simclr\ndata: {train: x}\ncrops: {global_size: 32}\n", "s.yaml"))
    assert simclr.crops.local_size == 96 and simclr.crops.n_local == 10  # defaults SimCLR never reads
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    recipe["crops"]["n_local"] = 4
    (run / "config.yaml").write_text(yaml.safe_dump(recipe))
    assert load_config(run / "config.yaml").crops.n_local == 4  # the run trained so: it resumes
    with pytest.raises(ConfigError, match=r"crops.local_size=96 is larger"):
        load_config(run / "config.yaml", ["crops.n_local=6"])


def test_a_warmup_temperature_without_warmup_is_refused_unless_held(tmp_path: Path) -> None:
    """No warm-up epochs: the teacher starts at teacher_temp, so another warm-up value is refused at its own key;
    the default and a value equal to teacher_temp (the official configs' "held") pass, as in the shipped recipes."""
    zero = {"warmup_teacher_temp_epochs": 0}
    for method in ("dino", "ibot", "dinov2"):
        with pytest.raises(ConfigError, match=rf"'{method}.loss.warmup_teacher_temp' = 0.05 is invalid: not read "
                                              r"with loss.warmup_teacher_temp_epochs=0"):
            config_from_dict({"method": method, "data": {"train": "x"},
                              method: {"loss": zero | {"warmup_teacher_temp": 0.05}}})
        held = {"method": method, "data": {"train": "x"}, method: {"loss": zero | {"warmup_teacher_temp": 0.07}}}
        assert getattr(config_from_dict(held), method).loss.warmup_teacher_temp == 0.07
    for recipe in ("dino_vit_small", "dinov3_vit_large_high_res", "demo_adapt"):
        assert load_config(REPO / f"recipes/{recipe}.yaml", ["data.train=x"])


@pytest.mark.parametrize("key, instead", [
    ("drop_path_rate: 0.2", "set model.drop_path_rate"), ("patch_size: 4", "set model.patch_size"),
    ("img_size: 32", "set crops.global_size"), ("num_classes: 10", "built without a classifier"),
    ("pretrained: true", "start from an export with model.init_from"),
    ("dynamic_img_size: false", "builds every ViT with dynamic_img_size=true"),
])
def test_model_kwargs_that_sslpipe_sets_itself_are_refused_naming_the_key_to_use(tmp_path: Path, key: str,
                                                                                  instead: str) -> None:
    """Such a key collided with sslpipe's own argument (a TypeError with a traceback) or, dynamic_img_size, was
    overwritten without a word."""
    name = key.split(":")[0]
    with pytest.raises(ConfigError, match=rf"key 'model.kwargs.{name}' is set by sslpipe itself: .*{instead}.*, and "
                                          rf"remove {name} from model.kwargs") as refused:
        load_config(REPO / "recipes/demo_dino.yaml", ["data.train=x", f"model.kwargs={{depth: 2, {key}}}"])
    assert "\n" not in str(refused.value)
    assert load_config(REPO / "recipes/demo_dino.yaml", ["data.train=x", "model.kwargs={depth: 2}"])


def test_a_runs_saved_config_with_a_kwarg_sslpipe_overwrote_still_resumes(tmp_path: Path, capsys) -> None:
    """A ViT run made with model.kwargs.dynamic_img_size: false trained with true (the value was overwritten): its
    saved config drops the key and says so; given on the command line it is refused as ever."""
    data = yaml.safe_load((REPO / "recipes/demo_dino.yaml").read_text())
    data["data"]["train"] = "x"
    data["model"]["kwargs"]["dynamic_img_size"] = False
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(data))
    assert load_config(run / "config.yaml").model.kwargs == {"embed_dim": 128, "depth": 4, "num_heads": 4}
    assert "model.kwargs.dynamic_img_size = False (sslpipe sets it)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"'model.kwargs.dynamic_img_size' is set by sslpipe itself"):
        load_config(run / "config.yaml", ["model.kwargs.dynamic_img_size=false"])


@pytest.mark.parametrize("recipe, overrides", [
    ("demo_dino.yaml", ["crops.global_size=28", "crops.local_size=12"]),
    ("demo_ibot.yaml", ["crops.global_size=28", "crops.local_size=12"]),
    ("demo_dinov2.yaml", ["crops.global_size=28"]),
    ("demo_dinov3.yaml", ["model.arch=vit_tiny_patch16_224", "crops.global_size=28"]),
    ("demo_simclr.yaml", ["crops.global_size=28"]),
])
def test_crops_are_checked_against_the_architectures_patch_at_load(recipe: str, overrides: list[str]) -> None:
    """model.patch_size null keeps the architecture's own patch size (16 for vit_tiny_patch16_224), which the crops
    must fit too: refused when the recipe is loaded, before a run directory is written, where timm's assertion
    failed at the first step. The fitting crops pass; a CNN is not checked."""
    vit = ["data.train=x", "model.arch=vit_tiny_patch16_224", "model.patch_size=null", "model.kwargs={depth: 1}"]
    with pytest.raises(ConfigError, match=r"crops.global_size=28 is not a multiple of 16, the patch size of "
                                          r"model.arch=vit_tiny_patch16_224 \(model.patch_size=null: the "
                                          r"architecture's own\): use 16 or 32 \(or set model.patch_size\)"):
        load_config(REPO / "recipes" / recipe, vit + overrides)
    fits = [o.replace("=28", "=32").replace("=12", "=16") for o in overrides]
    assert load_config(REPO / "recipes" / recipe, vit + fits).model.patch_size is None
    cnn = load_config(REPO / "recipes/demo_simclr.yaml", ["data.train=x", "model.arch=resnet18",
                                                          "model.patch_size=null", "crops.global_size=28"])
    assert cnn.crops.global_size == 28


def test_the_knn_crop_is_checked_against_the_patch_at_load(tmp_path: Path) -> None:
    """eval.crop=30 with 4-pixel patches passed the load and stopped the run at its first evaluation, an epoch in,
    with timm's assertion. Refused at load now, with model.patch_size set or (null) the architecture's own; only
    when the run evaluates (every_epochs > 0), and not in a run's own saved config unless the command line sets it."""
    path = write(tmp_path, "method: dino\nmodel: {patch_size: 4}\ncrops: {global_size: 32, local_size: 16}\n"
                           "data: {train: /data/shards, val: /data/shards}\n")
    with pytest.raises(ConfigError, match=r"eval.crop=30 is not a multiple of model.patch_size=4: use 28 or 32 "):
        load_config(path, ["eval.every_epochs=1", "eval.crop=30", "eval.resize=32"])
    assert load_config(path, ["eval.every_epochs=1", "eval.crop=28", "eval.resize=32"]).eval.crop == 28
    assert load_config(path, ["eval.crop=30", "eval.resize=32"]).eval.every_epochs == 0  # no kNN: not read
    vit = ["data.train=x", "data.val=x", "model.arch=vit_tiny_patch16_224", "model.patch_size=null",
           "model.kwargs={depth: 1}", "eval.every_epochs=1", "eval.crop=40", "eval.resize=64"]
    with pytest.raises(ConfigError, match=r"eval.crop=40 is not a multiple of 16, the patch size of "
                                          r"model.arch=vit_tiny_patch16_224 .*: use 32 or 48 "):
        load_config(REPO / "recipes" / "demo_dino.yaml", vit)
    saved = tmp_path / "run"
    (saved / "checkpoints").mkdir(parents=True)
    cfg = load_config(path, ["eval.every_epochs=1", "eval.crop=28", "eval.resize=32"])
    save_config(cfg, saved / "config.yaml")
    text = (saved / "config.yaml").read_text().replace("crop: 28", "crop: 30")
    (saved / "config.yaml").write_text(text)
    assert load_config(saved / "config.yaml").eval.crop == 30  # the run was made so: its export still loads
    with pytest.raises(ConfigError, match=r"eval.crop=30 is not a multiple"):
        load_config(saved / "config.yaml", ["eval.crop=30"])


@pytest.mark.parametrize("override, pattern", [
    ("data.batch_size=yes", r"'data.batch_size' = True is invalid: true is a boolean where a number is expected"),
    ("train.checkpoint_every_steps=true", r"'train.checkpoint_every_steps' = True is invalid: true is a boolean"),
    ("optim.lr=.inf", r"'optim.lr' = inf is invalid: .*finite number"),
    ("model.init_from=", r"'model.init_from' = '' is invalid: is empty: give a value, or null"),
    ("run_name=", r"'run_name' = '' is invalid: is empty"),
])
def test_booleans_for_numbers_empty_text_and_infinities_are_refused(tmp_path: Path, override: str,
                                                                    pattern: str) -> None:
    """YAML reads yes/on/true as booleans, which pydantic would take as 1 (a batch of one, a checkpoint every step);
    an unset shell variable gives an empty text (`model.init_from=$EXPORT` trained from random weights)."""
    with pytest.raises(ConfigError, match=pattern):
        load_config(write(tmp_path, MINIMAL), [override])
    cfg = load_config(write(tmp_path, MINIMAL), ["train.compile=true", "model.kwargs={class_token: true}"])
    assert cfg.train.compile is True and cfg.model.kwargs == {"class_token": True}  # booleans where they belong


def test_a_runs_saved_config_with_values_now_refused_still_resumes(tmp_path: Path) -> None:
    """Empty texts (read as unset then), a fractional DINO temperature warm-up and an infinite number in a run's
    own config.yaml, written before these refusals: the run still loads as it trained; the same as a recipe is
    refused."""
    data = yaml.safe_load((REPO / "recipes/demo_dino.yaml").read_text())
    data["data"].update(train="x", val="")
    data["model"]["init_from"] = ""
    data["dino"]["loss"]["warmup_teacher_temp_epochs"] = 1.5
    data["optim"]["clip_grad"] = float("inf")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(run / "config.yaml")
    assert cfg.model.init_from is None and cfg.data.val is None and cfg.optim.clip_grad == float("inf")
    assert cfg.dino.loss.warmup_teacher_temp_epochs == 1.5
    with pytest.raises(ConfigError, match="is empty"):
        load_config(write(tmp_path, yaml.safe_dump(data)))
