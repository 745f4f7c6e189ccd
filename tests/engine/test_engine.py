"""The training engine with the toy recipe: schedules, clipping, freezing, exact resume, NaN stop, tracking, 2 ranks."""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from helpers import child_env
from safetensors.torch import load_file

from sslpipe.config import ConfigError, RunConfig
from sslpipe.engine.optim import clip_gradients_per_tensor
from sslpipe.engine.schedules import Schedules
from sslpipe.engine.tracking import resolve_wandb_mode, tracker_setup
from sslpipe.engine.trainer import TrainingDiverged, train
from sslpipe.recipes import config_from_dict, get_recipe, load_config
from sslpipe.weights.checkpoint import find_checkpoint, list_checkpoints
from sslpipe.weights.resume import resolve_resume

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from tests.workers.toy_recipe import ToyRecipe  # noqa: E402

TOY = "tests.workers.toy_recipe:ToyRecipe"


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def toy_cfg(tmp_path: Path, run_name: str, **sections) -> RunConfig:
    data = {"method": TOY, "run_name": run_name, "output_dir": str(tmp_path / "runs"),
            "data": {"train": "synthetic", "batch_size": 8},
            "optim": {"lr": 0.05, "warmup_epochs": 1},
            "train": {"epochs": 2, "log_every": 2}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    return config_from_dict(data)


def params(ckpt: Path) -> dict[str, torch.Tensor]:
    state = {f"student.{k}": v for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    state.update(load_file(str(ckpt / "extra_state.safetensors")))
    return state


# ---------------------------------------------------------------------------------------------------- schedules
def dino_cosine_scheduler(base, final, epochs, niter, warmup_epochs=0, start_warmup_value=0.0) -> np.ndarray:
    """DINO utils.cosine_scheduler, the reference our closed form must reproduce element by element."""
    warmup_iters = warmup_epochs * niter
    warmup = np.linspace(start_warmup_value, base, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter - warmup_iters)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


def sched_cfg(**optim) -> RunConfig:
    return config_from_dict({"method": "dino", "data": {"train": "x", "batch_size": 256},
                             "optim": {"lr": 1.0, "min_lr": 0.0, "warmup_epochs": 1, **optim},
                             "dino": {"loss": {"warmup_teacher_temp_epochs": 2}}, "train": {"epochs": 3}})


def schedules(cfg: RunConfig, steps_per_epoch: int, world_size: int = 1) -> Schedules:
    """The trainer's schedules with the method's own values (momentum, temperatures) joined, as in a run."""
    return Schedules(cfg, steps_per_epoch, world_size, recipe=get_recipe(cfg.method)(cfg).schedule)


def test_schedules_match_hand_computed_values() -> None:
    s = schedules(sched_cfg(), steps_per_epoch=10)  # T = 30 iterations, warm-up 10, teacher-temp warm-up 20
    assert s.total == 30
    assert s(0)["lr"] == 0.0                                   # warm-up start
    assert s(5)["lr"] == pytest.approx(5 / 9)                  # linspace(0, 1, 10)[5]
    assert s(9)["lr"] == pytest.approx(1.0)                    # end of warm-up
    assert s(10)["lr"] == pytest.approx(1.0)                   # cosine start
    assert s(20)["lr"] == pytest.approx(0.5)                   # middle of the cosine part: cos(pi/2) = 0
    assert s(29)["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 20)))
    assert s(0)["momentum"] == pytest.approx(0.996)
    assert s(15)["momentum"] == pytest.approx(0.998)           # 1 - 0.004 * (1 + cos(pi/2)) / 2
    assert s(30)["momentum"] == pytest.approx(1.0)
    assert s(0)["weight_decay"] == pytest.approx(0.04)
    assert s(15)["weight_decay"] == pytest.approx(0.22)        # (0.04 + 0.4) / 2
    assert s(0)["teacher_temp"] == s(9)["teacher_temp"] == pytest.approx(0.04)  # linspace(0.04, 0.07, 2)[epoch]
    assert s(10)["teacher_temp"] == s(19)["teacher_temp"] == pytest.approx(0.07)
    assert s(25)["teacher_temp"] == pytest.approx(0.07) and s(10)["last_layer_frozen"] == 0.0
    assert s(25)["epoch"] == 2 and s(25)["it"] == 25


def test_schedules_equal_dino_cosine_scheduler_everywhere() -> None:
    s = schedules(sched_cfg(lr=5e-4, min_lr=1e-6), steps_per_epoch=7)
    lr = dino_cosine_scheduler(5e-4, 1e-6, 3, 7, warmup_epochs=1)
    wd = dino_cosine_scheduler(0.04, 0.4, 3, 7)
    mom = dino_cosine_scheduler(0.996, 1.0, 3, 7)
    np.testing.assert_allclose([s.lr(i) for i in range(21)], lr, rtol=1e-12)
    np.testing.assert_allclose([s.weight_decay(i) for i in range(21)], wd, rtol=1e-12)
    np.testing.assert_allclose([s(i)["momentum"] for i in range(21)], mom, rtol=1e-12)


def test_lr_scaling_rule() -> None:
    cfg = config_from_dict({"method": "dino", "data": {"train": "x", "batch_size": 64},
                            "train": {"grad_accum_steps": 2}, "optim": {"lr": 5e-4}})
    assert Schedules(cfg, steps_per_epoch=5, world_size=2).base_lr == pytest.approx(5e-4 * 64 * 2 * 2 / 256)


def test_step_poly_and_constant_schedules_with_absolute_lr() -> None:
    base = {"method": "dino", "data": {"train": "x", "batch_size": 8}, "train": {"epochs": 10}}
    step = config_from_dict({**base, "optim": {"lr": 1e-4, "lr_scaling": "none", "schedule": "step",
                                               "warmup_iters": 4, "step_epochs": [8, 9.5], "step_gamma": 0.1}})
    s = Schedules(step, steps_per_epoch=10, world_size=4)  # lr_scaling none: the batch does not enter
    assert s.lr(0) == 0.0 and s.lr(2) == pytest.approx(1e-4 * 2 / 3) and s.lr(3) == pytest.approx(1e-4)
    assert s.lr(79) == pytest.approx(1e-4) and s.lr(80) == pytest.approx(1e-5) and s.lr(95) == pytest.approx(1e-6)
    poly = config_from_dict({**base, "optim": {"lr": 1e-3, "lr_scaling": "none", "schedule": "poly",
                                               "warmup_epochs": 0, "poly_power": 0.9, "min_lr": 0.0}})
    p = Schedules(poly, steps_per_epoch=10)
    assert p.lr(0) == pytest.approx(1e-3) and p.lr(50) == pytest.approx(1e-3 * 0.5 ** 0.9)
    assert p.lr(100) == 0.0
    const = config_from_dict({**base, "optim": {"lr": 2.0, "schedule": "constant", "warmup_epochs": 0}})
    assert Schedules(const, steps_per_epoch=10).lr(37) == pytest.approx(2.0 * 8 / 256)


def test_patch_temperature_waits_for_pred_start_epoch() -> None:
    """iBOTLoss: the patch temperature stays at its warm-up value for pred_start_epoch epochs, then warms up."""
    cfg = config_from_dict({"method": "ibot", "data": {"train": "x"}, "train": {"epochs": 10},
                            "ibot": {"masking": {"pred_start_epoch": 2}, "loss": {"warmup_teacher_temp_epochs": 3}}})
    s = schedules(cfg, steps_per_epoch=10)  # per epoch: 3 warm-up epochs, the patch's from epoch 2
    assert s(19)["teacher_patch_temp"] == pytest.approx(0.04)
    assert s(20)["teacher_patch_temp"] == s(29)["teacher_patch_temp"] == pytest.approx(0.04)
    assert s(35)["teacher_patch_temp"] == pytest.approx(0.055)  # linspace(0.04, 0.07, 3)[1]
    assert s(49)["teacher_patch_temp"] == s(50)["teacher_patch_temp"] == pytest.approx(0.07)
    assert s(15)["teacher_temp"] == pytest.approx(0.055)  # the CLS temperature starts at once


def test_teacher_temperatures_equal_the_official_per_epoch_arrays_and_dinov2_per_iteration() -> None:
    """DINO's and iBOT's losses index np.linspace(warm-up, final, warmup_epochs) by the epoch (iBOT's patch one after
    `pred_start_epoch` epochs at the warm-up value); DINOv2's CosineScheduler warms up over the iterations."""
    epochs, spe, warm, start = 8, 5, 3, 2
    cls = np.concatenate((np.linspace(0.04, 0.07, warm), np.ones(epochs - warm) * 0.07))
    patch = np.concatenate((np.ones(start) * 0.03, np.linspace(0.03, 0.06, warm),
                            np.ones(epochs - warm - start) * 0.06))
    for method, extra in (("dino", {}), ("ibot", {"masking": {"pred_start_epoch": start}})):
        loss = {"warmup_teacher_temp_epochs": warm} | (
            {"warmup_teacher_patch_temp": 0.03, "teacher_patch_temp": 0.06} if method == "ibot" else {})
        cfg = config_from_dict({"method": method, "data": {"train": "x"}, "train": {"epochs": epochs},
                                method: {"loss": loss, **extra}})
        s = schedules(cfg, steps_per_epoch=spe)
        np.testing.assert_allclose([s(i)["teacher_temp"] for i in range(epochs * spe)], np.repeat(cls, spe))
        if method == "ibot":
            np.testing.assert_allclose([s(i)["teacher_patch_temp"] for i in range(epochs * spe)],
                                       np.repeat(patch, spe))
    v2 = config_from_dict({"method": "dinov2", "data": {"train": "x"}, "train": {"epochs": epochs},
                           "dinov2": {"loss": {"warmup_teacher_temp_epochs": 1.5}}})
    s = schedules(v2, steps_per_epoch=4)  # 6 warm-up iterations
    np.testing.assert_allclose([s(i)["teacher_temp"] for i in range(8)],
                               [*np.linspace(0.04, 0.07, 6), 0.07, 0.07])
    with pytest.raises(ConfigError, match=r"dino.loss.warmup_teacher_temp_epochs.*1.5 is not a whole number"):
        config_from_dict({"method": "dino", "data": {"train": "x"},
                          "dino": {"loss": {"warmup_teacher_temp_epochs": 1.5}}})


def test_param_group_lr_scale() -> None:
    from sslpipe.engine.optim import apply_schedule, build_optimizer

    cfg = sched_cfg()
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, 2))
    opt = build_optimizer(cfg, [{"params": [a], "apply_wd": False, "lr_scale": 0.1},
                                {"params": iter([b]), "apply_wd": True}])
    apply_schedule(opt, {"lr": 2.0, "weight_decay": 0.5})
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(pytest.approx(0.2), 0.0), (2.0, 0.5)]


# ----------------------------------------------------------------------------------------------- optimisation
def test_per_tensor_clipping_matches_dino_formula() -> None:
    net = torch.nn.Linear(2, 1)
    net.weight.grad = torch.tensor([[3.0, 4.0]])  # norm 5 > clip 1: scaled by 1 / (5 + 1e-6)
    net.bias.grad = torch.tensor([0.5])           # norm 0.5 < clip: unchanged
    norms = clip_gradients_per_tensor(net, clip=1.0)
    assert norms.tolist() == pytest.approx([5.0, 0.5])
    torch.testing.assert_close(net.weight.grad, torch.tensor([[3.0, 4.0]]) / (5.0 + 1e-6), rtol=0, atol=1e-7)
    assert net.bias.grad.item() == 0.5  # a global-norm clip would have scaled it too


def test_foreach_clipping_equals_the_per_parameter_loop(device: str) -> None:
    """The no-sync clipping (one _foreach_norm, one _foreach_mul_) gives DINO's loop result on a real ViT."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4, depth=2).to(device)
    for p in vit.parameters():
        p.grad = torch.randn_like(p) * float(torch.rand(())) * 3 / p.numel() ** 0.5 * 2  # norms around 0-6
    expected = []
    for p in vit.parameters():  # DINO utils.clip_gradients
        g = p.grad.clone()
        coef = 3.0 / (g.norm(2) + 1e-6)
        expected.append(g * coef if coef < 1 else g)
    norms = clip_gradients_per_tensor(vit, 3.0)
    assert (norms > 3.0).any() and (norms < 3.0).any(), "both branches are exercised"
    for e, p in zip(expected, vit.parameters()):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-7)
    assert max(float(p.grad.norm()) for p in vit.parameters()) <= 3.0 + 1e-4


def test_prefetch_yields_every_batch_on_the_device(device: str) -> None:
    from sslpipe.engine.prefetch import prefetch_to_device

    batches = [{"x": torch.full((2, 3), float(i)), "images": [torch.arange(i + 1)], "label": i} for i in range(4)]
    got = list(prefetch_to_device(iter(batches), torch.device(device)))
    assert [b["label"] for b in got] == [0, 1, 2, 3]
    for i, b in enumerate(got):
        assert b["x"].device.type == device and torch.equal(b["x"].cpu(), batches[i]["x"])
        assert torch.equal(b["images"][0].cpu(), torch.arange(i + 1))


def initial_student(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The student the trainer starts from: it seeds with `cfg.seed` right before `build`."""
    set_seed(cfg.seed)
    recipe = ToyRecipe(cfg)
    recipe.build(types.SimpleNamespace(device=torch.device("cpu"), unwrap_model=lambda m: m))
    return {k: v.clone() for k, v in recipe.student.state_dict().items()}


@pytest.mark.parametrize("freeze_epochs", [1, 0])
def test_freeze_last_layer_in_epoch_zero(tmp_path: Path, freeze_epochs: int) -> None:
    cfg = toy_cfg(tmp_path, "freeze", toy={"freeze_last_layer_epochs": freeze_epochs}, train={"max_steps": 3})
    init = initial_student(cfg)
    after = load_file(str(find_checkpoint(train(cfg)) / "model.safetensors"))
    assert not torch.equal(after["body.0.weight"], init["body.0.weight"])
    frozen = all(torch.equal(after[k], init[k]) for k in ("last_layer.weight", "last_layer.bias"))
    assert frozen == (freeze_epochs == 1)


# ------------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("clip_mode, accum", [("per_tensor", 1), ("global", 2)])
def test_kill_and_resume_equals_uninterrupted_run(tmp_path: Path, clip_mode: str, accum: int,
                                                  trainer_device: str) -> None:
    """Bit-exact on the CPU; on a GPU in deterministic mode (train.deterministic)."""
    extra = {"optim": {"clip_mode": clip_mode, "clip_grad": 0.5},
             "train": {"grad_accum_steps": accum, "deterministic": trainer_device == "cuda"}}
    straight = train(toy_cfg(tmp_path, "straight", **extra))
    total = 2 * (48 // 8 // accum)
    AcceleratorState._reset_state(reset_partial_state=True)
    killed_cfg = toy_cfg(tmp_path, "killed", **extra)
    killed_cfg.train.max_steps = total // 2 - 1  # stop mid-epoch
    run = train(killed_cfg)
    assert [c.name for c in list_checkpoints(run)][-1] == f"step_{total // 2 - 1:08d}"
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = train(toy_cfg(tmp_path, "killed", **extra), resume=str(run))
    assert resumed == run
    a, b = params(find_checkpoint(straight)), params(find_checkpoint(resumed))
    assert find_checkpoint(resumed).name == f"step_{total:08d}" and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kill = total // 2 - 1  # the killed run also logs its last step
    assert [r["step"] for r in lines if "loss" in r] == sorted({*range(2, total + 1, 2), kill})
    assert all(math.isfinite(r["loss"]) and r["world_size"] == 1 for r in lines if "loss" in r)
    written = load_config(run / "config.yaml")
    assert written.method == TOY and written.train.grad_accum_steps == accum


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_steps_under_mixed_precision_on_each_device(tmp_path: Path, trainer_device: str, precision: str) -> None:
    """The trainer steps and checkpoints under autocast: the step computes in bf16 when asked (and in float32 when
    not), parameters stay float32, the loss stays finite."""
    seen: list[torch.dtype] = []

    class Spy(ToyRecipe):
        def build(self, accelerator):
            super().build(accelerator)
            # the first matmul's output dtype: bf16 exactly under autocast (Accelerate casts the model's outputs
            # back to float32, so the loss cannot tell)
            self.student.body[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))

    import tests.workers.toy_recipe as toy_module
    toy_module.AmpSpyRecipe = Spy
    run = train(toy_cfg(tmp_path, f"amp-{precision}", method="tests.workers.toy_recipe:AmpSpyRecipe",
                        train={"max_steps": 3, "mixed_precision": precision}))
    assert seen == [torch.bfloat16 if precision == "bf16" else torch.float32] * 3
    state = load_file(str(find_checkpoint(run) / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in state.values())
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(math.isfinite(v) for v in losses)
    init = initial_student(toy_cfg(tmp_path, "x"))
    assert not torch.equal(state["body.0.weight"], init["body.0.weight"])


def test_logged_recipe_metrics_are_window_means_like_the_loss(tmp_path: Path) -> None:
    """A recipe metric equal to the loss is logged equal to the loss: the mean over the log window's steps (3 here),
    not the last step's value."""
    class Spy(ToyRecipe):
        def step(self, batch, sched):
            loss, metrics = super().step(batch, sched)
            return loss, {**metrics, "loss_again": loss.detach()}

    import tests.workers.toy_recipe as toy_module
    toy_module.WindowSpyRecipe = Spy
    run = train(toy_cfg(tmp_path, "window", method="tests.workers.toy_recipe:WindowSpyRecipe",
                        train={"max_steps": 6, "log_every": 3}))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in lines] == [3, 6]
    assert all(r["loss_again"] == pytest.approx(r["loss"], rel=1e-6) for r in lines)


def test_deterministic_mode_is_scoped_to_the_run(tmp_path: Path) -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    seen = {}

    class Spy(ToyRecipe):
        def step(self, batch, sched):
            seen["deterministic"] = torch.are_deterministic_algorithms_enabled()
            return super().step(batch, sched)

    import tests.workers.toy_recipe as toy_module
    toy_module.SpyRecipe = Spy
    cfg = toy_cfg(tmp_path, "det", method="tests.workers.toy_recipe:SpyRecipe",
                  train={"max_steps": 1, "deterministic": True})
    train(cfg)
    assert seen["deterministic"] is True and not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("how", ["signal", "stop_file"])
def test_stop_request_checkpoints_and_resume_finishes_the_same_run(tmp_path: Path, how: str) -> None:
    """SIGUSR1 (or the stop file) at step 3: the run stops at the next log step (4) with a checkpoint; resumed, it
    ends exactly where an uninterrupted run ends."""
    straight = train(toy_cfg(tmp_path, "straight"))
    AcceleratorState._reset_state(reset_partial_state=True)
    stop_file = tmp_path / "STOP"
    if how == "signal":
        cfg = toy_cfg(tmp_path, "asked", model={"kwargs": {"signal_at_step": 3}})
    else:
        cfg = toy_cfg(tmp_path, "asked", model={"kwargs": {"touch_at_step": 3}}, train={"stop_file": str(stop_file)})
    run = train(cfg)
    assert [c.name for c in list_checkpoints(run)] == ["step_00000004"]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[-1] == {**events[-1], "event": "stopped on request", "step": 4}
    if how == "stop_file":  # a stop file left in place would stop the next start at once: it is refused
        AcceleratorState._reset_state(reset_partial_state=True)
        with pytest.raises(ValueError, match=rf"train.stop_file {stop_file} exists already: .* remove it"):
            train(toy_cfg(tmp_path, "again", train={"stop_file": str(stop_file)}))
        assert not (tmp_path / "runs" / "again").exists()
    stop_file.unlink(missing_ok=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = train(toy_cfg(tmp_path, "asked"), resume=str(run))
    a, b = params(find_checkpoint(straight)), params(find_checkpoint(resumed))
    assert find_checkpoint(resumed).name == find_checkpoint(straight).name
    assert all(torch.equal(a[k], b[k]) for k in a)
    import signal
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL, "the handler is restored after the run"


def events_of(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


@pytest.mark.parametrize("signal_at, stop, evals", [(5, 6, [(6, 0.0)]), (11, 12, [(6, 0.0), (12, 1.0)])])
def test_stop_request_at_an_epoch_end_evaluates_that_epoch_first(tmp_path: Path, signal_at: int, stop: int,
                                                                 evals: list[tuple[int, float]]) -> None:
    """6 steps per epoch, log every 2: a stop asked at step 5 (11) is agreed at 6 (12), an epoch's last step (the
    run's last). That epoch's evaluation (toy_eval = the finished epoch's index) and metric checkpoint come first:
    a resumed run starts the next epoch and would never run them."""
    cfg = toy_cfg(tmp_path, "asked", model={"kwargs": {"signal_at_step": signal_at}}, eval={"every_epochs": 1},
                  train={"best_metric": "toy_eval"})
    run = train(cfg)
    events = events_of(run)
    assert [(e["step"], e["toy_eval"]) for e in events if "toy_eval" in e] == evals
    assert events[-1] == {**events[-1], "event": "stopped on request", "step": stop}
    assert json.loads((run / "checkpoints" / "best.json").read_text()) == {"checkpoint": f"step_{stop:08d}",
                                                                           "value": evals[-1][1]}


def test_a_kill_during_the_epoch_end_evaluation_does_not_lose_it(tmp_path: Path, monkeypatch) -> None:
    """checkpoint_every_steps on an epoch's last step (6) waits for its evaluation: a kill in that evaluation resumes
    from the checkpoint before it (step 3) and the epoch is evaluated. The step checkpoint used to come first, and
    the resumed run went on to the next epoch: the first epoch's evaluation was lost for good."""
    tr = {"checkpoint_every_steps": 3, "checkpoint_every_epochs": 0, "max_steps": 8}
    killed = []

    def evaluate_or_die(self, epoch):
        if not killed:
            killed.append(epoch)
            raise SystemExit(143)  # what the trainer's SIGTERM handler raises
        return {"toy_eval": float(epoch)}

    monkeypatch.setattr(ToyRecipe, "evaluate", evaluate_or_die)
    with pytest.raises(SystemExit):
        train(toy_cfg(tmp_path, "k", eval={"every_epochs": 1}, train=tr))
    run = tmp_path / "runs" / "k"
    assert [c.name for c in list_checkpoints(run)] == ["step_00000003"]
    AcceleratorState._reset_state(reset_partial_state=True)
    train(toy_cfg(tmp_path, "k", eval={"every_epochs": 1}, train=tr), resume=str(run))
    assert [(e["step"], e["toy_eval"]) for e in events_of(run) if "toy_eval" in e] == [(6, 0.0)]
    assert [c.name for c in list_checkpoints(run)][-2:] == ["step_00000006", "step_00000008"]


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Roll back: a run to step 10 (checkpoints 8, 10 kept), resumed from step 8 to step 9 with a lower lr. step_10
    of the abandoned trajectory moves to checkpoints/abandoned-*/, so pruning (the highest 2 steps) keeps step 8
    and 9, and a later --resume RUN continues the new trajectory (step 9), not the abandoned one."""
    tr = {"checkpoint_every_steps": 2, "keep_last": 2, "epochs": 3}
    run = train(toy_cfg(tmp_path, "r", train={**tr, "max_steps": 10}))
    assert [c.name for c in list_checkpoints(run)] == ["step_00000008", "step_00000010"]
    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    train(toy_cfg(tmp_path, "r", optim={"lr": 0.01}, train={**tr, "max_steps": 9}),
          resume=str(run / "checkpoints" / "step_00000008"))
    assert [c.name for c in list_checkpoints(run)] == ["step_00000008", "step_00000009"]
    (aside,) = (run / "checkpoints").glob("abandoned-*")
    assert [p.name for p in aside.iterdir()] == ["step_00000010"]
    assert (aside / "step_00000010" / "trainer_state.json").is_file()
    err = capsys.readouterr().err
    assert "step_00000010" in err and str(aside) in err
    assert resolve_resume(str(run), tmp_path / "runs").name == "step_00000009"
    resumed = [e for e in events_of(run) if e.get("event") == "resumed"]
    assert [e["step"] for e in resumed] == [8]


def test_a_fresh_start_after_a_failed_one_keeps_the_old_metrics_apart(tmp_path: Path) -> None:
    """A start that diverged at step 3 wrote metrics but no checkpoint; starting again with the same run_name moves
    its metrics.jsonl aside, so the new file holds the second start's lines only."""
    with pytest.raises(TrainingDiverged):
        train(toy_cfg(tmp_path, "again", model={"kwargs": {"nan_at_step": 3}}))
    AcceleratorState._reset_state(reset_partial_state=True)
    run = train(toy_cfg(tmp_path, "again", train={"max_steps": 4}))
    assert [e["step"] for e in events_of(run) if "loss" in e] == [2, 4]
    assert not [e for e in events_of(run) if "event" in e]
    (old,) = run.glob("metrics-*.jsonl")
    assert [(e["step"], e.get("event")) for e in events_of(run, old.name)] == [(2, None), (3, "diverged")]


def test_rescaled_step_keeps_the_position_in_the_epoch() -> None:
    from sslpipe.engine.trainer import rescaled_step

    assert rescaled_step(8, 4, 16) == 32  # 4 processes -> 1: end of epoch 2 stays the end of epoch 2
    assert rescaled_step(10, 4, 16) == 40  # epoch 2 + half an epoch
    assert rescaled_step(37, 16, 4) == 9  # 1 process -> 4: epoch 2 + 5/16 of an epoch -> 2 epochs + round(1.25)
    assert rescaled_step(7, 5, 5) == 7


def test_resume_auto_picks_newest_run(tmp_path: Path) -> None:
    assert resolve_resume("auto", tmp_path / "runs") is None
    run = train(toy_cfg(tmp_path, "first", train={"max_steps": 2}))
    assert resolve_resume("auto", tmp_path / "runs") == run / "checkpoints" / "step_00000002"
    AcceleratorState._reset_state(reset_partial_state=True)
    other = train(toy_cfg(tmp_path, "second", train={"max_steps": 2}))
    newest = {run: 1_000_000_000, other: 1_000_000_100}  # the newest checkpoint folder's time decides, not the name
    for r, t in newest.items():
        os.utime(r / "checkpoints" / "step_00000002", (t, t))
    assert resolve_resume("auto", tmp_path / "runs") == other / "checkpoints" / "step_00000002"
    os.utime(run / "checkpoints" / "step_00000002", (1_000_000_200, 1_000_000_200))
    assert resolve_resume("auto", tmp_path / "runs") == run / "checkpoints" / "step_00000002"
    with pytest.raises(FileExistsError, match="--resume"):
        AcceleratorState._reset_state(reset_partial_state=True)
        train(toy_cfg(tmp_path, "first", train={"max_steps": 2}))


def test_resume_with_changed_keys_names_them_and_keeps_the_old_config(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A resume that changes the lr says so, keeps the run's previous config.yaml beside the new one; one that builds
    another network fails at the load naming the changed key, and leaves config.yaml as it was."""
    run = train(toy_cfg(tmp_path, "r", train={"max_steps": 2}))
    first = (run / "config.yaml").read_text()
    capsys.readouterr()
    AcceleratorState._reset_state(reset_partial_state=True)
    wide = toy_cfg(tmp_path, "r", train={"max_steps": 4}, model={"kwargs": {"hidden": 32}})
    with pytest.raises(ValueError, match=r"step_00000002 does not fit .*model.kwargs.hidden: None -> 32"):
        train(wide, resume=str(run))
    AcceleratorState._reset_state(reset_partial_state=True)
    deep = toy_cfg(tmp_path, "r", train={"max_steps": 4}, model={"kwargs": {"depth": 2}})  # tensors, not shapes
    with pytest.raises(ValueError, match=r"step_00000002 does not fit .*model.kwargs.depth: None -> 2"):
        train(deep, resume=str(run))
    assert (run / "config.yaml").read_text() == first and not list(run.glob("config-*.yaml"))
    AcceleratorState._reset_state(reset_partial_state=True)
    train(toy_cfg(tmp_path, "r", train={"max_steps": 4}, optim={"lr": 0.01}), resume=str(run))
    err = capsys.readouterr().err
    assert "2 key(s) changed" in err and "optim.lr: 0.05 -> 0.01" in err and "train.max_steps: 2 -> 4" in err
    (kept,) = run.glob("config-*.yaml")
    assert kept.read_text() == first
    assert load_config(run / "config.yaml").optim.lr == 0.01 and load_config(kept).optim.lr == 0.05
    AcceleratorState._reset_state(reset_partial_state=True)  # step 4 of a 6-step epoch: another worker count
    train(toy_cfg(tmp_path, "r", train={"max_steps": 5}, optim={"lr": 0.01}, data={"num_workers": 2}),
          resume=str(run))
    assert "data.num_workers 8 -> 2 in the middle of an epoch" in capsys.readouterr().out



def test_the_workers_that_split_a_process_shards_decide_its_read_order(digits_shards: Path) -> None:
    """0 and 1 worker read alike (one stream); no more workers than a process's shards are started: a resume that
    changes data.num_workers within those is not told that its order changed (12 shards: 6 per process of 2)."""
    from sslpipe.engine.trainer import workers_change_order

    cfg = config_from_dict({"method": "dino", "data": {"train": str(digits_shards)}})
    assert not workers_change_order(cfg, 0, 1, 2) and not workers_change_order(cfg, 6, 8, 2)
    assert workers_change_order(cfg, 1, 4, 2) and workers_change_order(cfg, 4, 6, 2)
    assert workers_change_order(toy_cfg(Path("/nowhere"), "x"), 3, 2, 2)  # not shards: as asked


def test_a_best_metric_the_evaluation_never_returns_stops_with_a_checkpoint(tmp_path: Path) -> None:
    """A misspelt train.best_metric would keep no best checkpoint without a word: the first evaluation stops the run
    naming the metrics it returned, after a checkpoint of the epoch."""
    cfg = toy_cfg(tmp_path, "bm", eval={"every_epochs": 1}, train={"best_metric": "toy/acc"})
    with pytest.raises(ValueError, match=r"train.best_metric=toy/acc is not .* \(toy_eval\)"):
        train(cfg)
    assert [c.name for c in list_checkpoints(tmp_path / "runs" / "bm")] == ["step_00000006"]


def test_nan_loss_stops_with_the_step_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    cfg = toy_cfg(tmp_path, "nan", model={"kwargs": {"nan_at_step": 3}}, train={"checkpoint_every_steps": 2})
    with pytest.raises(TrainingDiverged) as err:
        train(cfg)
    run = tmp_path / "runs" / "nan"
    assert "global step 3" in str(err.value) and "step_00000002" in str(err.value) and "optim.lr" in str(err.value)
    assert [c.name for c in list_checkpoints(run)] == ["step_00000002"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "diverged" and events[-1]["step"] == 3
    AcceleratorState._reset_state(reset_partial_state=True)
    fixed = toy_cfg(tmp_path, "nan", train={"max_steps": 4})  # the last checkpoint loads and training continues
    assert find_checkpoint(train(fixed, resume=str(run))).name == "step_00000004"


def test_unknown_method_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="known methods are .*dino.*ibot"):
        get_recipe("byol")
    assert get_recipe(TOY) is ToyRecipe


# ---------------------------------------------------------------------------------------------------- tracking
@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))


def test_wandb_mode_resolution(wandb_env, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_wandb_mode(None) == "offline"  # no key anywhere: never try the network
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode(None) == "online"
    assert resolve_wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode("online") == "offline"  # the environment wins


def test_a_run_leaves_wandb_mode_unset(tmp_path: Path, wandb_env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's wandb mode must not outlive it: the next run in the process (disabled) gets no wandb tracker."""
    monkeypatch.delenv("WANDB_MODE")
    train(toy_cfg(tmp_path, "a", tracking={"log_with": ["wandb"], "wandb_mode": "offline"}, train={"max_steps": 1}))
    assert "WANDB_MODE" not in os.environ
    disabled = toy_cfg(tmp_path, "b", tracking={"log_with": ["wandb"], "wandb_mode": "disabled"})
    assert tracker_setup(disabled, tmp_path / "b") == ([], {})


def test_wandb_run_id_is_new_per_fresh_start_and_kept_on_resume(tmp_path: Path, wandb_env) -> None:
    cfg = toy_cfg(tmp_path, "w", tracking={"log_with": ["wandb"], "wandb_mode": "offline"})
    run = tmp_path / "runs" / "w"
    ids = [tracker_setup(cfg, run, resumed=resumed)[1]["wandb"]["id"] for resumed in (False, True, False, True)]
    assert ids[0] == ids[1] != ids[2] == ids[3]


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_wandb_offline_writes_a_run_and_disabled_none(tmp_path: Path, wandb_env, mode: str) -> None:
    cfg = toy_cfg(tmp_path, mode, tracking={"log_with": ["wandb"], "wandb_mode": mode}, train={"max_steps": 2})
    run = train(cfg)
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    if mode == "offline":
        assert len(offline_runs) == 1
    else:
        assert not (run / "wandb").exists()
    assert (run / "metrics.jsonl").is_file()


# ------------------------------------------------------------------------------------------------- 2 processes
@pytest.mark.slow
def test_two_process_cpu_run_keeps_ranks_identical(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(
        f"method: {TOY}\nrun_name: ddp\noutput_dir: {tmp_path / 'runs'}\n"
        "data: {train: synthetic, batch_size: 4}\nmodel: {kwargs: {write_checksums: true}}\n"
        "optim: {lr: 0.05, warmup_epochs: 1}\ntrain: {epochs: 2, log_every: 3}\neval: {every_epochs: 1}\n"
    )
    env = child_env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "sslpipe", "train", str(recipe), "optim.clip_grad=1.0"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    ckpt = find_checkpoint(run)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_step"] == 2 * (48 // 2 // 4)
    assert sorted(p.name for p in ckpt.glob("rng_state_*")) == ["rng_state_0.safetensors", "rng_state_1.safetensors"]
    assert not list(ckpt.glob("*.pkl")) and not list(ckpt.glob("*.bin")), "no pickles in a checkpoint"
    sums = [(run / f"params_rank{r}.txt").read_text() for r in (0, 1)]
    assert len(sums[0]) == 64 and sums[0] == sums[1]
    assert "# overrides: optim.clip_grad=1.0" in (run / "config.yaml").read_text()


def test_lean_step_gives_the_parameters_of_the_plain_step(tmp_path: Path) -> None:
    """`train_step` (foreach clipping without host syncs, one schedule call, EMA after the step) leaves the student
    and teacher with exactly the parameters of a plain loop that clips parameter by parameter and reads every norm
    back to Python (the step before the lean rewrite), over a few steps on the CPU."""
    from accelerate import Accelerator

    from sslpipe.engine.optim import apply_schedule, build_optimizer
    from sslpipe.engine.trainer import train_step

    cfg = toy_cfg(tmp_path, "lean", optim={"clip_grad": 0.05}, toy={"freeze_last_layer_epochs": 0})
    results = []
    for lean in (True, False):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True)
        set_seed(0)
        recipe = ToyRecipe(cfg)
        recipe.build(accelerator)
        optimizer = build_optimizer(cfg, recipe.param_groups())
        recipe.student, optimizer = accelerator.prepare(recipe.student, optimizer)
        steps = schedules(cfg, steps_per_epoch=6)
        batches = list(recipe.train_loader(0, 0, 1))[:4]
        set_seed(1)
        for it, batch in enumerate(batches):
            s = steps(it)
            if lean:
                train_step(accelerator, recipe, optimizer, [batch], s, cfg)
                continue
            apply_schedule(optimizer, s)
            loss, _ = recipe.step(batch, s)
            loss.backward()
            for p in recipe.student.parameters():  # DINO utils.clip_gradients, one sync per parameter
                norm = float(p.grad.norm(2))
                if cfg.optim.clip_grad / (norm + 1e-6) < 1:
                    p.grad.mul_(cfg.optim.clip_grad / (norm + 1e-6))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            recipe.after_optimizer_step(s)
        results.append({**recipe.student.state_dict(), **{f"t.{k}": v for k, v in recipe.teacher.state_dict().items()}})
    lean_state, plain_state = results
    assert lean_state.keys() == plain_state.keys()
    for key in lean_state:
        torch.testing.assert_close(lean_state[key], plain_state[key], rtol=1e-6, atol=1e-7, msg=key)


def test_prefetch_waits_for_each_batchs_own_copy_not_the_next_ones(monkeypatch) -> None:
    """The step of batch i waits on the event recorded after batch i's copy; batch i+1's copy, queued on the side
    stream before batch i is handed out, is not waited for (a whole-stream wait would). CUDA calls are logged."""
    from sslpipe.engine import prefetch

    log: list[str] = []

    class Event:
        count = 0

        def __init__(self) -> None:
            self.id, Event.count = Event.count, Event.count + 1

        def record(self, stream) -> None:
            log.append(f"record {self.id}")

    class Stream:
        def __init__(self, device=None) -> None:
            pass

        def wait_event(self, event: Event) -> None:
            log.append(f"wait {event.id}")

        def wait_stream(self, stream) -> None:
            log.append("wait all")

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(prefetch, "_move", lambda batch, device: log.append(f"copy {batch}") or batch)
    monkeypatch.setattr(prefetch, "_record", lambda batch, stream: None)
    for batch in prefetch.prefetch_to_device(iter(range(3)), torch.device("cuda")):
        log.append(f"step {batch}")
    assert log == ["copy 0", "record 0", "copy 1", "record 1", "wait 0", "step 0", "copy 2", "record 2", "wait 1",
                   "step 1", "wait 2", "step 2"]


def test_a_failed_evaluation_keeps_the_epoch_and_the_resume_evaluates_it_first(tmp_path: Path, monkeypatch) -> None:
    """3 epochs of 6 steps, evaluated after each; the evaluation after epoch 2 fails once (a ValueError, as the kNN's
    on shards without labels). The epoch's checkpoint (step 12) is written before the error, which names it and
    --resume; the resumed run evaluates epoch 2 first, so its evaluations, best.json and weights equal a run that
    never failed. The old trainer evaluated before the epoch's checkpoint: step 12 was lost with the error."""
    def score(self, epoch):  # depends on the weights: a resume that skipped or moved the evaluation would differ
        torch.rand(4)  # draws from the global RNG: the failed one's checkpoint must hold the RNG it started from
        return {"toy_eval": float(self.teacher.last_layer.weight.sum())}

    settings = {"eval": {"every_epochs": 1}, "train": {"epochs": 3, "best_metric": "toy_eval"}}
    monkeypatch.setattr(ToyRecipe, "evaluate", score)
    straight = train(toy_cfg(tmp_path, "straight", **settings))
    AcceleratorState._reset_state(reset_partial_state=True)
    failed = []

    def fail_once_after_epoch_2(self, epoch):
        if epoch == 1 and not failed:
            failed.append(epoch)
            torch.rand(4)  # drawn before the failure: the resume must draw them again, from the same state
            raise ValueError("kNN needs labelled train and test samples")
        return score(self, epoch)

    monkeypatch.setattr(ToyRecipe, "evaluate", fail_once_after_epoch_2)
    with pytest.raises(ValueError, match=r"^the evaluation after epoch 2 failed: kNN needs labelled .*; the epoch's "
                                         r"training is kept in checkpoint \S+step_00000012: .* --resume \S+/runs/f, "
                                         r"which evaluates epoch 2 first$"):
        train(toy_cfg(tmp_path, "f", **settings))
    run = tmp_path / "runs" / "f"
    assert [c.name for c in list_checkpoints(run)] == ["step_00000006", "step_00000012"]
    state = json.loads((run / "checkpoints" / "step_00000012" / "trainer_state.json").read_text())
    assert state["eval_pending"] is True and state["global_step"] == 12
    AcceleratorState._reset_state(reset_partial_state=True)
    train(toy_cfg(tmp_path, "f", **settings), resume=str(run))
    evals = [(e["step"], e["toy_eval"]) for e in events_of(run) if "toy_eval" in e]
    assert [s for s, _ in evals] == [6, 12, 18]
    assert evals == [(e["step"], e["toy_eval"]) for e in events_of(straight) if "toy_eval" in e]
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best == json.loads((straight / "checkpoints" / "best.json").read_text())
    assert [c.name for c in list_checkpoints(run)] == [c.name for c in list_checkpoints(straight)]
    a, b = params(find_checkpoint(straight)), params(find_checkpoint(run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = json.loads((find_checkpoint(run) / "trainer_state.json").read_text())
    assert "eval_pending" not in last and last["best"] == max(v for _, v in evals)
    rng = [load_file(str(find_checkpoint(r) / "rng_state_0.safetensors")) for r in (straight, run)]
    assert rng[0].keys() == rng[1].keys() and all(torch.equal(rng[0][k], rng[1][k]) for k in rng[0])
    redone = json.loads((run / "checkpoints" / "step_00000012" / "trainer_state.json").read_text())
    assert "eval_pending" not in redone  # re-saved once evaluated: a later resume from it does not evaluate again


def test_an_empty_resume_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """`resume=""` (an unset shell variable in `--resume "$RUN"`) is not a fresh start: refused, nothing written."""
    cfg = config_from_dict({"method": "dino", "data": {"train": "x"}, "output_dir": str(tmp_path / "runs")})
    with pytest.raises(ValueError, match="resume is empty"):
        train(cfg, resume=" ")
    assert not (tmp_path / "runs").exists()
