"""Fault injection (issue 21): kill -9 between the files of a checkpoint, SIGTERM, truncated / bit-flipped / missing
checkpoint files, a full disk at a checkpoint, the metrics, an export and shard writing, two jobs on one run
directory, a launch whose process count Accelerate does not see, and what the loader skipped.

Every case ends with the last good checkpoint verified and loadable and, where it resumes, with exactly the weights of
an uninterrupted run (the toy recipe: 12 steps, a checkpoint every 4). Killed runs are forked children, so each case
takes a fraction of a second.
"""
from __future__ import annotations

import errno
import io
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from sslpipe.cli import main
from sslpipe.config import RunConfig
from sslpipe.engine import tracking
from sslpipe.engine.run_lock import LOCK_NAME, RunDirectoryInUse, RunLock
from sslpipe.engine.trainer import train
from sslpipe.errors import WriteFailed
from sslpipe.ingest.options import ShardOptions
from sslpipe.ingest.shards import write_shards
from sslpipe.recipes import config_from_dict
from sslpipe.weights import checkpoint_io as ckpt_module
from sslpipe.weights import state_io
from sslpipe.weights.checkpoint import DamagedCheckpointWarning, list_checkpoints
from sslpipe.weights.checkpoint_io import load_checkpoint
from sslpipe.weights.verify import check_run, verify_checkpoint, verify_export

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from tests.workers.toy_recipe import ToyRecipe  # noqa: E402

TOY = "tests.workers.toy_recipe:ToyRecipe"
STEPS = 12  # 2 epochs x 6 steps; checkpoints at 4, 8, 12


@pytest.fixture(autouse=True)
def fresh_accelerate_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(var, raising=False)
    # Faults of the checkpoint files do not depend on the device, and the forked children of `in_child` cannot use
    # CUDA once the parent has: every run of this file trains on the CPU, on a GPU host too.
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    reset()
    torch.set_num_threads(1)
    yield
    reset()


def reset() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def toy_dict(output_dir: Path, run_name: str, **train_opts: object) -> dict:
    return {"method": TOY, "run_name": run_name, "output_dir": str(output_dir),
            "data": {"train": "synthetic", "batch_size": 8}, "optim": {"lr": 0.05, "warmup_epochs": 1},
            "train": {"epochs": 2, "log_every": 2, "checkpoint_every_steps": 4, "checkpoint_every_epochs": 0,
                      "keep_last": 3, **train_opts}}


def toy_cfg(output_dir: Path, run_name: str, **train_opts: object) -> RunConfig:
    return config_from_dict(toy_dict(output_dir, run_name, **train_opts))


def toy_yaml(tmp_path: Path, output_dir: Path, run_name: str, **train_opts: object) -> str:
    import yaml

    path = tmp_path / f"{run_name}.yaml"
    path.write_text(yaml.safe_dump(toy_dict(output_dir, run_name, **train_opts)))
    return str(path)


def params(ckpt: Path) -> dict[str, torch.Tensor]:
    state = {f"student.{k}": v for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    state.update(load_file(str(ckpt / "extra_state.safetensors")))
    return state


def uninterrupted(tmp_path: Path) -> dict[str, torch.Tensor]:
    run = train(toy_cfg(tmp_path / "reference", "straight"))
    reset()
    return params(list_checkpoints(run)[-1])


def assert_same_weights(run: Path, reference: dict[str, torch.Tensor]) -> None:
    last = list_checkpoints(run)[-1]
    assert last.name == f"step_{STEPS:08d}"
    got = params(last)
    assert got.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(got[key], value), key


def assert_loadable(ckpt: Path) -> None:
    """Verified against its sha256s and loaded into a fresh toy model and optimizer."""
    assert verify_checkpoint(ckpt)[0] == "ok", verify_checkpoint(ckpt)
    from accelerate import Accelerator

    from sslpipe.engine.optim import build_optimizer

    reset()
    accelerator = Accelerator(cpu=True)
    recipe = ToyRecipe(toy_cfg(ckpt.parent.parent.parent, ckpt.parent.parent.name))
    recipe.build(accelerator)
    optimizer = build_optimizer(recipe.cfg, recipe.param_groups())
    state, extra = load_checkpoint(accelerator, ckpt, model=recipe.student, optimizer=optimizer)
    assert state["global_step"] == int(ckpt.name.split("_")[1]) and "center" in extra
    reset()


def error_lines(stderr: str) -> list[str]:
    """The `sslpipe CMD: error:` lines of a command's stderr (progress bars also write there)."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("sslpipe ")]


def in_child(target: Callable[[], None]) -> int:
    """Run `target` in a forked process (the trainer as a separate process, without a fresh interpreter's import
    time); its exit code, negative for a signal."""
    def run() -> None:
        reset()
        target()
        os._exit(0)

    child = multiprocessing.get_context("fork").Process(target=run)
    child.start()
    child.join(timeout=60)
    return child.exitcode


def on_file(step: int, name: str, action: Callable[[Path], None]) -> Callable[[Path], None]:
    """A checkpoint hook that runs `action` after file `name` of the checkpoint of `step` (name "renamed": after the
    folder got its final name)."""
    def hook(path: Path) -> None:
        final = f"step_{step:08d}"
        if (name == "renamed" and path.name == final) or (path.name == name and path.parent.name == f".tmp-{final}"):
            action(path)
    return hook


# --------------------------------------------------------------------------------------------------- kill -9
@pytest.mark.parametrize("after", ["model.safetensors", "optimizer.safetensors", "extra_state.safetensors",
                                   "trainer_state.json", "renamed"])
def test_kill_9_inside_a_checkpoint_write_then_resume_equals_uninterrupted(
        tmp_path: Path, after: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    reference = uninterrupted(tmp_path)
    runs = tmp_path / "runs"

    def killed_run() -> None:
        ckpt_module.after_file_written = on_file(8, after, lambda _: os.kill(os.getpid(), signal.SIGKILL))
        train(toy_cfg(runs, "killed"))

    assert in_child(killed_run) == -signal.SIGKILL
    run = runs / "killed"
    complete = [c.name for c in list_checkpoints(run)]
    assert complete == (["step_00000004", "step_00000008"] if after == "renamed" else ["step_00000004"])
    assert (run / "checkpoints" / ".tmp-step_00000008").is_dir() == (after != "renamed")
    assert_loadable(list_checkpoints(run)[-1])
    rows = {r.item: r.status for r in check_run(run)}
    assert rows["checkpoints/step_00000004"] == "ok"
    assert rows.get("checkpoints/.tmp-step_00000008") == (None if after == "renamed" else "partial")
    holder = json.loads((run / LOCK_NAME).read_text())
    assert holder["host"] == socket.gethostname(), "the killed job's lock is left behind, naming it"

    resumed = train(toy_cfg(runs, "killed"), resume="auto")
    assert f"taking over the stale lock {run / LOCK_NAME} of pid {holder['pid']}" in capsys.readouterr().err
    assert_same_weights(resumed, reference)
    assert not list((run / "checkpoints").glob(".tmp-*")) and (run / LOCK_NAME).read_text() == ""


def test_sigterm_mid_checkpoint_removes_the_partial_folder_and_releases_the_lock(tmp_path: Path) -> None:
    reference = uninterrupted(tmp_path)
    runs = tmp_path / "runs"

    def terminated_run() -> None:
        ckpt_module.after_file_written = on_file(8, "optimizer.safetensors",
                                                 lambda _: os.kill(os.getpid(), signal.SIGTERM))
        try:
            train(toy_cfg(runs, "term"))
        except SystemExit as exit_:
            os._exit(exit_.code)

    assert in_child(terminated_run) == 128 + signal.SIGTERM
    run = runs / "term"
    assert [c.name for c in list_checkpoints(run)] == ["step_00000004"]
    assert not list((run / "checkpoints").glob(".tmp-*")), "the half-written checkpoint is removed"
    assert (run / LOCK_NAME).read_text() == "", "released, not left stale"
    assert_loadable(run / "checkpoints" / "step_00000004")
    assert_same_weights(train(toy_cfg(runs, "term"), resume=str(run)), reference)


def test_sigterm_between_checkpoints_says_where_to_continue(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """SIGTERM during step 6 (index 5; checkpoints every 4): exit status 143, one event line in metrics.jsonl and
    one message naming the step, the last checkpoint and --resume; nothing is written on the way out."""
    runs = tmp_path / "runs"

    def terminated_run() -> None:
        step = ToyRecipe.after_optimizer_step

        def after_optimizer_step(self: ToyRecipe, sched: dict[str, float]) -> None:
            step(self, sched)
            if int(sched["it"]) == 5:
                os.kill(os.getpid(), signal.SIGTERM)
        ToyRecipe.after_optimizer_step = after_optimizer_step  # in the forked child only
        try:
            train(toy_cfg(runs, "term"))
        except SystemExit as exit_:
            sys.stderr.flush()
            os._exit(exit_.code)

    assert in_child(terminated_run) == 128 + signal.SIGTERM
    run = runs / "term"
    assert [c.name for c in list_checkpoints(run)] == ["step_00000004"]
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["step"], last["event"], last["signal"]) == (5, "terminated", "SIGTERM")
    assert (f"terminated by SIGTERM at step 5; the last good checkpoint is {run / 'checkpoints' / 'step_00000004'}: "
            f"continue with --resume {run} (or --resume auto)") in capfd.readouterr().err


def test_sigterm_while_a_step_is_saved_again_keeps_that_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step saved a second time (with a metric) goes aside and back: a SIGTERM (SystemExit) landing as the new folder
    is renamed in leaves the first step_6 complete. (The trainer no longer saves an epoch's last step before its
    evaluation, so the second save is made here by the checkpoint writer the trainer calls.)"""
    from accelerate import Accelerator

    from sslpipe.engine.optim import build_optimizer

    runs = tmp_path / "runs"
    run = train(toy_cfg(runs, "resave", checkpoint_every_steps=6, max_steps=6))
    state = json.loads((run / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    reset()
    accelerator = Accelerator(cpu=True)
    recipe = ToyRecipe(toy_cfg(runs, "resave"))
    recipe.build(accelerator)
    optimizer = build_optimizer(recipe.cfg, recipe.param_groups())
    replace = os.replace

    def interrupted(src: str | Path, dst: str | Path) -> None:
        if Path(src).name == ".tmp-step_00000006":
            raise SystemExit(128 + signal.SIGTERM)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(SystemExit):
        ckpt_module.save_checkpoint(accelerator, run, state, recipe.extra_state(), metric=0.5, model=recipe.student,
                                    optimizer=optimizer)
    monkeypatch.undo()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000006"], "nothing aside, no partial"
    assert_loadable(run / "checkpoints" / "step_00000006")


def test_a_hard_kill_between_the_renames_of_a_resaved_step_loses_nothing(tmp_path: Path,
                                                                          capfd: pytest.CaptureFixture) -> None:
    """A kill -9 after step_6 was renamed aside and before the new one was renamed in leaves only .old-step_6: the
    next --resume renames it back, with a notice, and resumes from it (not from step_4 before it)."""
    runs = tmp_path / "runs"
    run = train(toy_cfg(runs, "killed", max_steps=6))
    checkpoints = run / "checkpoints"
    os.replace(checkpoints / "step_00000006", checkpoints / ".old-step_00000006")  # the state a kill -9 leaves
    reset()
    train(toy_cfg(runs, "killed", max_steps=8), resume=str(run))
    assert "step_00000006 was set aside by a save that a hard kill interrupted: restored" in capfd.readouterr().err
    assert not (checkpoints / ".old-step_00000006").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in rows if r.get("event") == "resumed"]
    assert resumed and resumed[-1]["step"] == 6
    # the only checkpoint, and `--resume auto` with the run's name (what slurm.sbatch runs on requeue)
    for older in list_checkpoints(run)[:-1]:
        shutil.rmtree(older)
    os.replace(checkpoints / "step_00000008", checkpoints / ".old-step_00000008")
    reset()
    with pytest.raises(FileExistsError, match="--resume"):
        train(toy_cfg(runs, "killed", max_steps=10))  # a fresh start would lose it
    reset()
    train(toy_cfg(runs, "killed", max_steps=10), resume="auto")
    assert "step_00000008 was set aside" in capfd.readouterr().err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if r.get("event") == "resumed"][-1]["step"] == 8


def test_an_unreadable_best_json_is_ignored_with_a_warning(tmp_path: Path) -> None:
    """best.json cut short (what a kill inside the old in-place write left): a resumed run warns naming it and prunes
    nothing while the best is unknown (keep_last 1); the next evaluation writes it again (toy_eval = epoch index)."""
    runs = tmp_path / "runs"

    def cfg(**train_opts: object) -> RunConfig:
        return config_from_dict({**toy_dict(runs, "best", best_metric="toy_eval", **train_opts),
                                 "eval": {"every_epochs": 1}})

    run = train(cfg(max_steps=6))
    best = run / "checkpoints" / "best.json"
    assert json.loads(best.read_text()) == {"checkpoint": "step_00000006", "value": 0.0}
    best.write_text('{"checkpoint": "step_000')
    reset()
    with pytest.warns(UserWarning, match=f"{best} is unreadable"):
        train(cfg(max_steps=8, keep_last=1), resume=str(run))
    assert [c.name for c in list_checkpoints(run)] == ["step_00000004", "step_00000006", "step_00000008"]
    reset()
    with pytest.warns(UserWarning, match=f"{best} is unreadable"):
        train(cfg(keep_last=1), resume=str(run))
    assert json.loads(best.read_text()) == {"checkpoint": "step_00000012", "value": 1.0}
    assert [c.name for c in list_checkpoints(run)] == ["step_00000012"]


def test_a_failed_write_of_best_json_keeps_the_old_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "best.json").write_text('{"checkpoint": "step_00000001", "value": 1.0}')

    def no_space(fd: int) -> None:
        raise enospc()

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        ckpt_module._update_best(root, root / "step_00000002", 2.0)
    monkeypatch.undo()
    assert [p.name for p in root.iterdir()] == ["best.json"]
    assert json.loads((root / "best.json").read_text()) == {"checkpoint": "step_00000001", "value": 1.0}


# ------------------------------------------------------------------------------------------- damaged files
def damage(ckpt: Path, how: str) -> str:
    """Damage one file of `ckpt` the way a bad disk or a cut copy does; return the file's name."""
    if how == "truncated":
        target = ckpt / "model.safetensors"
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif how == "bit-flipped":
        target = ckpt / "optimizer.safetensors"
        data = bytearray(target.read_bytes())
        data[len(data) - 20] ^= 0x01  # inside the tensor data: the file still parses
        target.write_bytes(bytes(data))
    else:
        target = ckpt / "rng_state_0.safetensors"
        target.unlink()
    return target.name


@pytest.mark.parametrize("how", ["truncated", "bit-flipped", "missing"])
def test_damaged_checkpoint_is_skipped_by_resume_auto_and_refused_by_name(
        tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]) -> None:
    reference = uninterrupted(tmp_path)
    runs = tmp_path / "runs"
    run = train(toy_cfg(runs, "damaged", max_steps=8))
    reset()
    bad = run / "checkpoints" / "step_00000008"
    name = damage(bad, how)
    capsys.readouterr()

    assert main(["check", str(run)]) == 1
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["checkpoint/export", "status", "detail"]
    assert table[1].split()[:2] == ["checkpoints/step_00000004", "ok"]
    assert table[2].split()[:2] == ["checkpoints/step_00000008", "bad"] and name in table[2]

    assert main(["train", toy_yaml(tmp_path, runs, "damaged"), "--resume", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(error_lines(err)) == 1
    assert "damaged" in err and name in err and "--resume auto" in err

    reset()
    with pytest.warns(DamagedCheckpointWarning, match=f"skipping the damaged checkpoint .*step_00000008.*{name}"):
        resumed = train(toy_cfg(runs, "damaged"), resume="auto")
    assert_same_weights(resumed, reference)
    assert_loadable(list_checkpoints(resumed)[-1])


def test_checkpoints_of_the_previous_version_still_load_unverified(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    reference = uninterrupted(tmp_path)
    runs = tmp_path / "runs"
    run = train(toy_cfg(runs, "old", max_steps=8))
    reset()
    for ckpt in list_checkpoints(run):  # what the previous version wrote: no "files" table
        state_file = ckpt / "trainer_state.json"
        state = json.loads(state_file.read_text())
        del state["files"]
        state_file.write_text(json.dumps(state))
    old = run / "checkpoints" / "step_00000008"
    assert verify_checkpoint(old)[0] == "unverified"
    capsys.readouterr()
    assert main(["check", str(run)]) == 0
    assert "unverified  written without checksums" in capsys.readouterr().out
    with pytest.warns(DamagedCheckpointWarning, match="without checksums"):
        resumed = train(toy_cfg(runs, "old"), resume="auto")
    assert_same_weights(resumed, reference)
    damage(run / "checkpoints" / "step_00000004", "truncated")
    assert verify_checkpoint(run / "checkpoints" / "step_00000004")[0] == "bad", "an old checkpoint cut short is caught"


# --------------------------------------------------------------------------------------------- full disk
@pytest.fixture(params=["tmpfs", "injected"])
def small_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[types.SimpleNamespace]:
    """A 2 MB tmpfs (as root: a real ENOSPC from the kernel) or, where mounting is not possible, a plain folder
    where `fill()` makes the next write raise OSError(ENOSPC) by injection. `free()` undoes `fill()`."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mount_cmd = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)]
    real = request.param == "tmpfs" and os.geteuid() == 0 and \
        subprocess.run(mount_cmd, capture_output=True, check=False).returncode == 0
    disk = types.SimpleNamespace(path=mount, real=real, full=False)

    def fill() -> None:
        disk.full = True
        if real:
            with open(mount / "filler", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError as err:
                    assert err.errno == errno.ENOSPC

    def free() -> None:
        disk.full = False
        (mount / "filler").unlink(missing_ok=True)

    disk.fill, disk.free = fill, free
    yield disk
    if real:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_during_a_checkpoint(tmp_path: Path, small_disk: types.SimpleNamespace,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    reference = uninterrupted(tmp_path)
    runs = small_disk.path / "runs"
    monkeypatch.setattr(ckpt_module, "after_file_written", on_file(8, "model.safetensors", lambda _: small_disk.fill()))
    if not small_disk.real:
        save_optimizer_state = state_io.save_optimizer_state

        def failing(state: dict, path: Path) -> None:
            if small_disk.full:
                raise enospc()
            save_optimizer_state(state, path)
        monkeypatch.setattr(state_io, "save_optimizer_state", failing)
    capsys.readouterr()

    assert main(["train", toy_yaml(tmp_path, runs, "full")]) == 1
    err = capsys.readouterr().err
    run = runs / "full"
    assert "Traceback" not in err and len(error_lines(err)) == 1, err
    assert f"could not write {run / 'checkpoints' / '.tmp-step_00000008' / 'optimizer.safetensors'}" in err
    assert "No space left on device" in err and f"removed the partial checkpoint {run / 'checkpoints'}" in err
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step_00000004'}" in err and "--resume auto" in err
    assert not list((run / "checkpoints").glob(".tmp-*")), "the partial checkpoint no longer holds the space"
    assert [c.name for c in list_checkpoints(run)] == ["step_00000004"]
    assert_loadable(run / "checkpoints" / "step_00000004")
    assert all(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())

    small_disk.free()
    monkeypatch.setattr(ckpt_module, "after_file_written", lambda path: None)
    reset()
    assert main(["train", toy_yaml(tmp_path, runs, "full"), "--resume", "auto"]) == 0
    assert_same_weights(run, reference)


def test_disk_full_when_writing_metrics(tmp_path: Path, small_disk: types.SimpleNamespace,
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    reference = uninterrupted(tmp_path)
    runs = small_disk.path / "runs"
    metrics = runs / "metrics-full" / "metrics.jsonl"

    def fill_after_checkpoint_4(_: Path) -> None:
        if small_disk.real:  # end metrics.jsonl on a page boundary: the next line needs a page the disk lacks
            pad = -(metrics.stat().st_size + len('{"pad": ""}\n')) % 4096
            with open(metrics, "a") as f:
                f.write(json.dumps({"pad": "x" * pad}) + "\n")
        small_disk.fill()

    monkeypatch.setattr(ckpt_module, "after_file_written", on_file(4, "renamed", fill_after_checkpoint_4))
    real_os = tracking.os
    if not small_disk.real:
        fake_os = types.SimpleNamespace(**{k: getattr(real_os, k) for k in dir(real_os) if not k.startswith("__")})

        def write(fd: int, data: bytes) -> int:
            if small_disk.full:
                raise enospc()
            return real_os.write(fd, data)
        fake_os.write = write
        monkeypatch.setattr(tracking, "os", fake_os)
    capsys.readouterr()

    assert main(["train", toy_yaml(tmp_path, runs, "metrics-full")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"could not write {metrics}: No space left on device" in err
    assert "step_00000004" in err and "--resume auto" in err
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]  # no half line at the end
    assert [r["step"] for r in lines if "loss" in r] == [2, 4]
    assert_loadable(runs / "metrics-full" / "checkpoints" / "step_00000004")

    small_disk.free()
    monkeypatch.setattr(ckpt_module, "after_file_written", lambda path: None)
    monkeypatch.setattr(tracking, "os", real_os)
    reset()
    assert_same_weights(train(toy_cfg(runs, "metrics-full"), resume="auto"), reference)


def test_a_line_cut_by_a_kill_is_ended_before_the_next_start_appends(tmp_path: Path) -> None:
    """A kill mid-line leaves metrics.jsonl without its last newline: the next start's first record (a resume's
    `resumed` event) gets a line of its own instead of being glued to the cut one."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 2, "loss": 1.5}\n{"step": 4, "lo')
    writer = tracking.JsonlWriter(metrics)
    writer.write({"step": 2, "event": "resumed"})
    writer.close()
    lines = metrics.read_text().splitlines()
    assert lines[1] == '{"step": 4, "lo' and json.loads(lines[2])["event"] == "resumed" and len(lines) == 3
    writer = tracking.JsonlWriter(metrics)  # a whole file gets no blank line
    writer.write({"step": 3})
    writer.close()
    assert metrics.read_text().count("\n") == 4 and "\n\n" not in metrics.read_text()


def test_disk_full_during_an_export_keeps_the_earlier_export(tmp_path: Path, small_disk: types.SimpleNamespace,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    from sslpipe.weights import export

    model_args = {"img_size": 32, "patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2}
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **model_args)
    out = small_disk.path / "export" / "teacher"
    kwargs = {"arch": "vit_tiny_patch16_224", "model_args": model_args, "img_size": 32, "mean": (0.5,) * 3,
              "std": (0.5,) * 3, "source": {"test": True}}
    export.export_backbone(vit, out, **kwargs)
    assert verify_export(out)[0] == "ok"
    before = (out / "model.safetensors").read_bytes()
    small_disk.fill()
    if not small_disk.real:
        def failing(*args: object, **kw: object) -> None:
            raise enospc()
        monkeypatch.setattr(export, "save_file", failing)
    torch.nn.init.normal_(vit.pos_embed)  # different weights, which must not land half-way
    with pytest.raises(WriteFailed, match=f"could not write the export {out}: No space left on device"):
        export.export_backbone(vit, out, **kwargs)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"], "temporary files removed"
    assert (out / "model.safetensors").read_bytes() == before and verify_export(out)[0] == "ok"
    small_disk.free()
    (out / "model.safetensors").write_bytes(before[:-8])
    assert verify_export(out)[0] == "bad"


def test_disk_full_while_writing_shards(tmp_path: Path, small_disk: types.SimpleNamespace,
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = small_disk.path / "shards"
    from sslpipe.ingest import tar_writer

    if small_disk.real:  # leave room for about one shard
        small_disk.fill()
        filler = small_disk.path / "filler"
        os.truncate(filler, filler.stat().st_size - 100_000)
    else:
        write = tar_writer._HashingFile.write

        def failing(self: object, data: bytes) -> int:
            if self.bytes > 100_000:
                raise enospc()
            return write(self, data)
        monkeypatch.setattr(tar_writer._HashingFile, "write", failing)
    assert main(["shards", "--dataset", "digits", str(out), "--samples-per-shard", "200"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "No space left on device" in err and "--force" in err
    assert "unfinished shard file(s)" in err
    assert not out.exists(), "no .partial file, no manifest, and no empty OUT left behind"


# ----------------------------------------------------------------------------------- two jobs, one directory
def test_a_second_start_on_a_run_directory_in_use_is_refused(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    reference = uninterrupted(tmp_path)
    runs = tmp_path / "runs"
    go = tmp_path / "go"

    def first_job() -> None:  # holds the run at its first checkpoint until the second start has been tried
        def wait(_: Path) -> None:
            while not go.exists():
                time.sleep(0.02)
        ckpt_module.after_file_written = on_file(4, "model.safetensors", wait)
        train(toy_cfg(runs, "shared"))

    child = multiprocessing.get_context("fork").Process(target=lambda: (reset(), first_job(), os._exit(0)))
    child.start()
    lock = runs / "shared" / LOCK_NAME
    deadline = time.time() + 30
    while not (lock.is_file() and lock.read_text()) and time.time() < deadline:
        time.sleep(0.02)
    capsys.readouterr()
    try:
        code = main(["train", toy_yaml(tmp_path, runs, "shared"), "--resume", "auto"])
        err = capsys.readouterr().err
    finally:
        go.touch()
        child.join(timeout=60)
    assert code == 2 and "Traceback" not in err
    assert f"is in use by pid {child.pid} on host {socket.gethostname()}" in err and "it holds the lock" in err
    assert child.exitcode == 0
    lines = [json.loads(line) for line in (runs / "shared" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == list(range(2, STEPS + 1, 2)), "one job's metrics only"
    assert_same_weights(runs / "shared", reference)
    assert lock.read_text() == "", "released at the end"


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_restart_right_after_kill_9_with_loader_workers(tmp_path: Path, digits_shards: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A scheduler's path: `sslpipe train` with 2 loader workers is killed with SIGKILL while its workers run, and
    `--resume auto` starts at once. The orphaned workers must not hold the run's lock (they would for seconds if the
    flock went with their copy of its descriptor)."""
    args = ["train", str(REPO / "recipes" / "demo_simclr.yaml"), f"data.train={digits_shards}",
            f"data.val={digits_shards}", "data.batch_size=8", "data.num_workers=2", "data.steps_per_epoch=3",
            "train.epochs=3", "train.checkpoint_every_epochs=1", "eval.every_epochs=0", f"output_dir={tmp_path}",
            "run_name=killed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    job = subprocess.Popen([sys.executable, "-m", "sslpipe", *args], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    first = tmp_path / "killed" / "checkpoints" / "step_00000003"
    deadline, workers = time.time() + 120, []
    while time.time() < deadline and job.poll() is None:  # the first checkpoint, then the next epoch's workers
        workers = _children(job.pid) if first.is_dir() else []
        if workers:
            break
        time.sleep(0.05)
    assert workers, "the run reached its first checkpoint with its loader workers running"
    job.send_signal(signal.SIGKILL)
    job.wait()
    capsys.readouterr()
    assert main([*args, "--resume", "auto"]) == 0  # at once: no sleep
    err = capsys.readouterr().err
    assert "in use by" not in err and (tmp_path / "killed" / "checkpoints" / "step_00000009").is_dir()


def test_stale_lock_rule(tmp_path: Path) -> None:
    held = RunLock(tmp_path).acquire()
    with pytest.raises(RunDirectoryInUse, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
        RunLock(tmp_path).acquire()  # a live holder, seen through its flock
    held.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    taken = RunLock(tmp_path).acquire()
    assert taken.notice is not None and f"pid {dead.pid}" in taken.notice and "no longer exists" in taken.notice
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    taken.release()
    lock.write_text(json.dumps({"pid": 1, "host": "gpu-node-17"}))
    with pytest.raises(RunDirectoryInUse, match="pid 1 on host gpu-node-17.*another host"):
        RunLock(tmp_path).acquire()


# ---------------------------------------------------------------------------------------------- launches
def test_world_size_mismatch_stops_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A launcher that says 2 processes while Accelerate sees 1 (here: ACCELERATE_USE_CPU=0 forced on a machine
    without a GPU) would train two independent jobs on one directory: each process stops at once instead."""
    reference = uninterrupted(tmp_path)
    runs = tmp_path / "runs"
    run = train(toy_cfg(runs, "mismatch", max_steps=8))
    reset()
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "0")
    capsys.readouterr()
    assert main(["train", toy_yaml(tmp_path, runs, "mismatch"), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "WORLD_SIZE=2" in err and "Accelerate sees 1" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before, "nothing was touched"
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    reset()
    assert_loadable(list_checkpoints(run)[-1])
    assert_same_weights(train(toy_cfg(runs, "mismatch"), resume="auto"), reference)


# ---------------------------------------------------------------------------------------- skipped samples
class SkippingToy(ToyRecipe):
    """The toy recipe fed from real shards (digits rows averaged to 8 features) through the streaming loader."""

    def train_loader(self, epoch: int, rank: int, world_size: int):
        from sslpipe.data.stream import build_loader

        def sample(raw: dict) -> tuple[torch.Tensor, torch.Tensor]:
            rows = np.asarray(raw["image"].convert("L"), dtype=np.float32).mean(1) / 255.0
            return torch.from_numpy(rows), torch.tensor(raw["label"])

        def collate(items: list) -> dict[str, torch.Tensor]:
            return {"x": torch.stack([x for x, _ in items]), "labels": torch.stack([y for _, y in items])}

        return build_loader(self.cfg.data.train, sample_fn=sample, collate_fn=collate, batch_size=8, epoch=epoch,
                            seed=self.cfg.seed, rank=rank, world_size=world_size, shuffle_buffer=200,
                            num_batches=self.steps_per_epoch(world_size))


def test_end_of_run_reports_what_the_loader_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = tmp_path / "shards"
    write_shards(shards, source="digits", options=ShardOptions(samples_per_shard=32, limit=96), progress=False)
    first = shards / "train-000000.tar"  # one undecodable image
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(first, "w") as tar:
        for i, (member, data) in enumerate(members):
            data = b"not a png" if i == 0 else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    last = shards / "train-000002.tar"  # a shard cut short, inside a member (a cut between members reads as EOF)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2 + 700])

    import tests.workers.toy_recipe as toy_module
    toy_module.SkippingToy = SkippingToy
    cfg = config_from_dict({**toy_dict(tmp_path / "runs", "skips"), "method": "tests.workers.toy_recipe:SkippingToy",
                            "data": {"train": str(shards), "batch_size": 8}})
    capsys.readouterr()
    with pytest.warns(UserWarning, match="skipping"):
        run = train(cfg)
    out = capsys.readouterr().out
    assert "loader skipped 2 corrupt sample(s) and 2 unreadable shard(s) since this start" in out  # 2 epochs
    event = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert event["event"] == "loader skipped" and (event["corrupt_samples"], event["shard_errors"]) == (2, 2)


# ------------------------------------------------------------------------------------ shards without labels
def test_a_periodic_knn_on_shards_without_labels_is_refused_before_the_run_starts(
        tmp_path: Path, digits_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sslpipe shards --folder` of a folder of images (no class sub-folders) writes no `cls`: the periodic kNN
    used to refuse them only at its first evaluation, a whole evaluation period in. The start-up check reads the
    manifest's `classes` ([]), else the first sample of the first local shard; a remote shard it does not open."""
    from PIL import Image

    from sslpipe.engine import preflight as pf

    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(pool / f"img{i}.png")
    mine = tmp_path / "mine"
    write_shards(mine, source=str(pool), options=ShardOptions(val_fraction=0.5), progress=False)

    def dino(train_spec: str, val_spec: str, every: int = 1) -> RunConfig:
        return config_from_dict({"method": "dino", "output_dir": str(tmp_path / "runs"), "run_name": "unlab",
                                 "data": {"train": train_spec, "val": val_spec}, "eval": {"every_epochs": every}})

    with pytest.raises(ValueError, match=rf"^data.val='{mine}' \(split 'val'\) has no labels \(its manifest.json "
                                         r"lists no classes\): the periodic kNN \(eval.every_epochs=1\) .* set "
                                         r"eval.every_epochs=0 \(no evaluation\), or a labelled data.val$"):
        train(dino(str(mine), str(mine)))
    assert not (tmp_path / "runs").exists(), "refused before the run directory is written"
    # a shard pattern has no manifest: its first sample is read; the kNN's train set is checked too
    with pytest.raises(ValueError, match=rf"^data.train='{mine}/train-{{000000..000000}}.tar' \(split 'train'\) has "
                                         rf"no labels \(the first sample of {mine}/train-000000.tar has no `cls`\)"):
        pf.preflight(dino(f"{mine}/train-{{000000..000000}}.tar", str(digits_shards)))
    pf.preflight(dino(str(digits_shards), str(digits_shards)))  # labelled: passes
    pf.preflight(dino(str(mine), str(mine), every=0))  # no evaluation, nothing to refuse
    # remote: a manifest URL is read (once per process), a pipe: shard is never opened at start-up
    monkeypatch.setattr(pf, "fetch_manifest", lambda url, reading: {"classes": []})
    assert pf.unlabelled("https://host/mine/manifest.json", "val") == "its manifest.json lists no classes"
    assert pf.unlabelled("pipe:false", "val") is None


def test_a_knn_k_above_the_training_samples_is_refused_before_the_run_starts(tmp_path: Path,
                                                                             digits_shards: Path) -> None:
    """k=200 (the default knn_k's largest) of 96 training samples (the manifest's count) or of eval.max_train=50
    stopped the run at its first evaluation ("k=200 exceeds the 50 training samples"): refused at start-up."""
    from sslpipe.engine.preflight import preflight

    small = tmp_path / "small"
    write_shards(small, source="digits", options=ShardOptions(limit=96), progress=False)

    def dino(spec: Path, **ev: object) -> RunConfig:
        return config_from_dict({"method": "dino", "data": {"train": str(spec), "val": str(spec)},
                                 "eval": {"every_epochs": 1, **ev}})

    with pytest.raises(ValueError, match=r"^eval.knn_k=\[10, 20, 100, 200\] holds k=200, more than the 96 training "
                                         r"samples .*eval.max_train=None\): set eval.knn_k to values <= 96"):
        preflight(dino(small))
    with pytest.raises(ValueError, match=r"more than the 50 training samples .*eval.max_train=50\)"):
        preflight(dino(digits_shards, max_train=50))
    preflight(dino(small, knn_k=[10, 20]))
    preflight(dino(digits_shards, max_train=200))
