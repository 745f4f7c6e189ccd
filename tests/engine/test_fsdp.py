"""FSDP2 (issue 36): two real processes over gloo, launched with exactly the command launch/cpu_2proc_fsdp.yaml
documents. A sharded run computes what a DDP run computes (up to the order of float sums), resumes bit-exactly, and
its checkpoints are the usual files, so a DDP run continues one; what sslpipe does not run sharded is refused
before anything is written."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, child_env
from safetensors import safe_open
from safetensors.torch import load_file

from sslpipe.engine import train
from sslpipe.engine.sharding import sharding_from_launcher
from sslpipe.recipes import load_config

FILES = ("model", "optimizer", "extra_state")
# The periodic kNN reads the whole digits splits: its 3 val shards give the 2 processes unequal shares (2 and 1), so
# they run different numbers of forwards through the sharded teacher.
STEPS = ["data.batch_size=8", "data.num_workers=0", "data.steps_per_epoch=2", "train.epochs=2",
         "eval.every_epochs=1", "eval.max_train=null", "eval.max_val=null", "optim.lr=0.02"]


def _documented(launch_file: str) -> list[str]:
    """The launch file's Usage line as argv (RECIPE.yaml left for the caller), checked to be what the docs say."""
    usage = next(line for line in (REPO / "launch" / launch_file).read_text().splitlines() if "Usage:" in line)
    command = usage.split("Usage: ", 1)[1]
    assert command == (f"OMP_NUM_THREADS=1 accelerate launch --config_file launch/{launch_file} -m sslpipe train "
                       "RECIPE.yaml")
    return [sys.executable, "-m", "accelerate.commands.launch", *command.split()[3:-1]]


def _launch(launch_file: str, recipe: str, shards: Path, out: Path, name: str, *extra: str,
            launcher_flags: tuple[str, ...] = ()) -> str:
    documented = _documented(launch_file)
    at = len(documented) - 1 - documented[::-1].index("-m")  # accelerate's `-m sslpipe`, not python's
    cmd = [*documented[:at], *launcher_flags, *documented[at:], f"recipes/{recipe}", f"data.train={shards}",
           f"data.val={shards}", *STEPS, f"output_dir={out}", f"run_name={name}", *extra]
    proc = subprocess.run(cmd, env=child_env(OMP_NUM_THREADS="1"), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _state(run: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    state = {f: load_file(str(ckpt / f"{f}.safetensors")) for f in FILES}
    with safe_open(str(ckpt / "optimizer.safetensors"), "pt") as f:
        state["optimizer_meta"] = f.metadata()
    return state


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:10]
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def _norm_of_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:10]
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)) ** 0.5


def _assert_close(a: dict, b: dict, moved: float, bf16: bool = False) -> None:
    """Equal up to float rounding: the gradients (Adam's moments) to 1e-6 and the EMA teacher to 2e-6 in fp32 (1e-3
    and 1e-4 under bf16 autocast, whose rounding is 2^-8); the student within 2 % of how far two steps move it, in
    norm over all its tensors (Adam's first steps divide by each gradient's own size, which magnifies rounding in
    the tensors whose gradient is near zero)."""
    assert _max_diff(a["optimizer"], b["optimizer"]) < (1e-3 if bf16 else 1e-6)
    assert _max_diff(a["extra_state"], b["extra_state"]) < (1e-4 if bf16 else 2e-6)
    assert _norm_of_difference(a["model"], b["model"]) < 0.02 * moved
    assert a["optimizer_meta"] == b["optimizer_meta"]


def _moved(run: Path) -> float:
    moved = _norm_of_difference(_state(run, 2)["model"], _state(run, 4)["model"])
    assert moved > 0.1, "two steps must change the student for the comparison to mean anything"
    return moved


def _assert_equal(a: dict, b: dict) -> None:
    for f in FILES:
        assert set(a[f]) == set(b[f]) and all(torch.equal(a[f][k], b[f][k]) for k in a[f]), f
    assert a["optimizer_meta"] == b["optimizer_meta"]


@pytest.mark.slow
def test_a_sharded_run_equals_ddp_resumes_exactly_and_a_ddp_run_continues_it(digits_shards: Path,
                                                                             tmp_path: Path) -> None:
    """DINOv2 (global clipping, layer-wise decay, KoLeo, the last layer frozen in epoch 0, periodic kNN on the
    sharded teacher): sharded 4 steps == sharded 2 steps + resume, bit for bit, from a checkpoint whose frozen last
    layer has no optimizer state yet; sharded ~= DDP within float rounding, far below what two steps change; the
    sharded checkpoint of step 2 continued under DDP ends where DDP does."""
    frozen = "dinov2.freeze_last_layer_epochs=1"
    _launch("cpu_2proc_fsdp.yaml", "demo_dinov2.yaml", digits_shards, tmp_path, "stopped", frozen, "train.max_steps=2")
    shutil.copytree(tmp_path / "stopped", tmp_path / "continued_by_ddp")
    (tmp_path / "continued_by_ddp" / "run.lock").unlink(missing_ok=True)
    _launch("cpu_2proc_fsdp.yaml", "demo_dinov2.yaml", digits_shards, tmp_path, "stopped", frozen, "--resume",
            str(tmp_path / "stopped"))
    whole = _launch("cpu_2proc_fsdp.yaml", "demo_dinov2.yaml", digits_shards, tmp_path, "sharded", frozen)
    assert "2 process(es) x batch 8" in whole
    _launch("cpu_2proc.yaml", "demo_dinov2.yaml", digits_shards, tmp_path, "ddp", frozen)
    _launch("cpu_2proc.yaml", "demo_dinov2.yaml", digits_shards, tmp_path, "continued_by_ddp", frozen, "--resume",
            str(tmp_path / "continued_by_ddp"))
    saved = load_file(str(tmp_path / "ddp" / "checkpoints" / "step_00000002" / "optimizer.safetensors"))
    assert len({k.split(".")[1] for k in saved}) < len({k.split(".")[1] for k in _state(tmp_path / "ddp", 4)[
        "optimizer"]}), "at step 2 the frozen last layer has no optimizer state yet"

    sharded, ddp = _state(tmp_path / "sharded", 4), _state(tmp_path / "ddp", 4)
    _assert_equal(_state(tmp_path / "stopped", 4), sharded)
    moved = _moved(tmp_path / "ddp")
    _assert_close(sharded, ddp, moved)
    _assert_close(_state(tmp_path / "continued_by_ddp", 4), ddp, moved)
    knn = [line for line in (tmp_path / "sharded" / "metrics.jsonl").read_text().splitlines() if "knn/" in line]
    assert len(knn) == 2, "the periodic kNN ran on the sharded teacher after each epoch"


MULTI_CROP_PACKED = ("dinov2.pack_crops=true", "crops.global_size=32", "crops.local_size=16", "crops.n_local=4",
                     "dinov2.mask_ratio_min_max=[0.1,0.5]")


@pytest.mark.slow
@pytest.mark.parametrize("recipe, extra, flags", [
    ("demo_dino.yaml", (), ()),         # per-tensor clipping of sharded gradients
    ("demo_dino.yaml", (), ("--fsdp_reshard_after_forward", "false")),  # the student kept whole forward to backward
    # a head shared by two names, stored once; crops packed through regionally compiled blocks (both runs)
    ("demo_ibot.yaml", ("ibot.pack_crops=true", "train.compile=true"), ()),
    ("demo_dinov3.yaml", ("dinov3.gram.load_at=1", "dinov3.gram.first_refresh=2", "dinov3.gram.refresh_every=2"), ()),
    ("demo_dinov2.yaml", MULTI_CROP_PACKED, ()),  # the demo's multi-crop recipe, packed
    ("demo_dinov2.yaml", ("train.mixed_precision=bf16",), ()),  # what launch/8gpu_fsdp.yaml runs: bf16 autocast
])
def test_each_teacher_student_method_sharded_equals_ddp(recipe: str, extra: tuple[str, ...], flags: tuple[str, ...],
                                                        digits_shards: Path, tmp_path: Path) -> None:
    """The EMA teacher, the centres and (DINOv3) the Gram teacher taken at step 1 and refreshed every 2 steps end where
    the DDP run's do."""
    _launch("cpu_2proc_fsdp.yaml", recipe, digits_shards, tmp_path, "sharded", *extra, launcher_flags=flags)
    _launch("cpu_2proc.yaml", recipe, digits_shards, tmp_path, "ddp", *extra)
    sharded, ddp = _state(tmp_path / "sharded", 4), _state(tmp_path / "ddp", 4)
    _assert_close(sharded, ddp, _moved(tmp_path / "ddp"), bf16="train.mixed_precision=bf16" in extra)
    if recipe == "demo_dinov3.yaml":
        assert int(sharded["extra_state"]["gram_refreshes"]) == 2  # after steps 2 and 4
        assert any(k.startswith("gram_teacher.") for k in sharded["extra_state"])


@pytest.mark.parametrize("env, message", [
    ({"FSDP_VERSION": "1"}, r"FSDP version 1: sslpipe shards with FSDP2 only .* `fsdp_version: 2`"),
    ({"FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, r"fsdp_offload_params: true"),
    ({"FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"}, r"fsdp_activation_checkpointing: true"),
])
def test_what_sslpipe_does_not_shard_is_refused(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                message: str) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        sharding_from_launcher()


def test_launcher_settings_are_read_and_taken_out_of_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accelerate must not see the FSDP request (it would wrap the student itself)."""
    import os

    assert sharding_from_launcher() is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    sharding = sharding_from_launcher()
    assert sharding is not None and sharding.reshard_after_forward is False
    assert "ACCELERATE_USE_FSDP" not in os.environ and "FSDP_VERSION" not in os.environ


@pytest.mark.parametrize("recipe, extra, message", [
    ("demo_simclr.yaml", [], r"method simclr does not run sharded .* launch/8gpu_ddp.yaml"),
    ("demo_dinov2.yaml", ["train.mixed_precision=fp16"], r"fp16 under an FSDP2 launch file: .* use bf16"),
])
def test_what_does_not_run_sharded_is_refused_before_anything_is_written(
        monkeypatch: pytest.MonkeyPatch, digits_shards: Path, tmp_path: Path, recipe: str, extra: list[str],
        message: str) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    cfg = load_config(REPO / "recipes" / recipe, [f"data.train={digits_shards}", f"output_dir={tmp_path}",
                                                  "run_name=x", *extra])
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_the_whole_step_compiled_sharded_and_under_ddp_ends_where_the_eager_step_does(digits_shards: Path,
                                                                                      tmp_path: Path) -> None:
    """`train.compile_scope: step` (backend aot_eager: inductor's graphs and autograd, without its code generation)
    on the demo's multi-crop DINOv2, packed, its masks padded to their bound: sharded and under DDP, with the
    Sinkhorn-Knopp sums all-reduced inside the graph, it ends where the eager DDP run does."""
    padded = (*MULTI_CROP_PACKED, "dinov2.pad_masked_patches=true")
    compiled = (*padded, "train.compile=true", "train.compile_scope=step", "train.compile_backend=aot_eager")
    _launch("cpu_2proc_fsdp.yaml", "demo_dinov2.yaml", digits_shards, tmp_path, "sharded", *compiled)
    _launch("cpu_2proc.yaml", "demo_dinov2.yaml", digits_shards, tmp_path, "ddp", *compiled)
    _launch("cpu_2proc.yaml", "demo_dinov2.yaml", digits_shards, tmp_path, "eager", *padded)
    eager = _state(tmp_path / "eager", 4)
    moved = _moved(tmp_path / "eager")
    for run in ("sharded", "ddp"):
        _assert_close(_state(tmp_path / run, 4), eager, moved)
