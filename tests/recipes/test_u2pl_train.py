"""U2PL and its supervised baseline end to end on tiny bundled real data (scenes): layouts -> shards -> trainer ->
evaluation, exact resume of teacher and queues, `sslpipe eval-seg`, VOC/Cityscapes readers, the queues under
`accelerate launch` with 2 CPU processes; one U2PL step against the supervised one (no leak of the unlabelled
machinery into the supervised path), the unlabelled ground truth kept out of every loss, the teacher update wired
into the recipe, and the diagnostics in metrics.jsonl."""
from __future__ import annotations

import copy
import io
import json
import math
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, child_env
from PIL import Image
from safetensors.torch import load_file

from sslpipe.cli import main as cli_main
from sslpipe.ingest.layouts import ADE20K_CLASSES, CITYSCAPES_TRAIN_IDS, cityscapes_pairs
from sslpipe.ingest.options import ShardOptions
from sslpipe.ingest.route import ShardSource, write_source
from sslpipe.recipes import load_config
from sslpipe.recipes.seg_supervised import SupervisedSegRecipe
from sslpipe.recipes.u2pl import CONTRASTIVE_KEYS, U2PLRecipe

SEG_TINY = ["model.arch=resnet10t", "{m}.crop_size=32", "{m}.decoder_channels=16", "{m}.aspp_channels=16",
            "data.batch_size=2", "data.num_workers=0", "data.steps_per_epoch=2", "train.epochs=3", "train.log_every=1",
            "train.checkpoint_every_epochs=1", "train.keep_last=3", "eval.every_epochs=3", "eval.batch_size=8"]
U2PL_TINY = ["u2pl.rep_dim=16", "u2pl.num_queries=8", "u2pl.num_negatives=4", "u2pl.queue_size=64",
             "u2pl.background_queue_size=96", "u2pl.cutmix_p=1.0"]
TINY = [o.replace("{m}.", "u2pl.") for o in SEG_TINY] + U2PL_TINY  # method u2pl


@pytest.fixture(scope="module")
def semi(tmp_path_factory) -> Path:
    """Scenes (32 px): 24 train images of which 1/4 labelled, 8 val images."""
    out = tmp_path_factory.mktemp("u2pl") / "semi"
    write_source(out, ShardSource(dataset="scenes", scenes={"train": 24, "val": 8, "size": 32}),
                 ShardOptions(samples_per_shard=4, seed=0), semi=True, labeled="1/4", created_by="pytest")
    return out


def _cfg(semi: Path, recipe: str, out: Path, extra: list[str]):
    """The recipe shrunk to seconds: U2PL's unlabelled data and sizes only for method u2pl."""
    method = yaml.safe_load((REPO / recipe).read_text())["method"]
    off = [CONTRASTIVE_KEYS if "u2pl.contrastive=false" in extra else (), ("cutmix_p",) if "u2pl.cutmix=false" in
           extra else ()]  # the sizes those settings leave unread are refused
    tiny = [o for o in U2PL_TINY if o.split("=")[0].removeprefix("u2pl.") not in (*off[0], *off[1])]
    u2pl = [f"u2pl.unlabeled={semi / 'unlabeled'}", *tiny] if method == "u2pl" else []
    overrides = [f"data.train={semi / 'labeled'}", f"data.val={semi / 'val'}", *u2pl, f"output_dir={out}", *SEG_TINY,
                 *extra]
    return load_config(REPO / recipe, [o.replace("{m}.", f"{method}.") for o in overrides])


def test_semi_shards_from_scenes(semi: Path) -> None:
    split = json.loads((semi / "split.json").read_text())
    assert len(split["labeled"]) == 6 and len(split["unlabeled"]) == 18 and not set(split["labeled"]) & set(
        split["unlabeled"])
    lab = json.loads((semi / "labeled" / "manifest.json").read_text())
    unl = json.loads((semi / "unlabeled" / "manifest.json").read_text())
    val = json.loads((semi / "val" / "manifest.json").read_text())
    # the unlabelled images keep their labels for the pseudo-label diagnostics (no loss reads them)
    assert lab["has_seg"] and unl["has_seg"] and val["has_seg"] and list(val["splits"]) == ["val"]
    assert lab["classes"][0] == "background" and len(lab["classes"]) == 11


def _weights_moved(run: Path) -> float:
    """The largest change of a weight tensor from the run's first checkpoint to its last, relative to its norm: what
    shows that the run trained, not only ran. Without gradients, SGD's weight decay alone (lr at most 0.1, the
    head's 10 x 0.01; wd 1e-4; momentum 0.9) moves each by at most 4 steps x lr x wd / (1 - momentum) = 4e-4 of it
    in these runs; BatchNorm's running statistics, which every forward moves, are left out."""
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert len(ckpts) > 1
    first, last = (load_file(str(c / "model.safetensors")) for c in (ckpts[0], ckpts[-1]))
    return max(float((last[k] - v).norm() / v.norm()) for k, v in first.items()
               if v.is_floating_point() and v.any() and ".running_" not in k)


@pytest.mark.slow
def test_u2pl_trains_evaluates_and_resumes_exactly(semi: Path, tmp_path: Path, monkeypatch) -> None:
    """6 steps (2 supervised-only) straight vs 3 + resume: identical student, teacher and queues; eval-seg of the
    final teacher reproduces the logged mIoU."""
    from sslpipe.engine.trainer import train

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    full = train(_cfg(semi, "recipes/demo_u2pl.yaml", tmp_path, ["run_name=full"]))
    train(_cfg(semi, "recipes/demo_u2pl.yaml", tmp_path, ["run_name=cut", "train.max_steps=3"]))
    cut = train(_cfg(semi, "recipes/demo_u2pl.yaml", tmp_path, ["run_name=cut"]), resume=str(tmp_path / "cut"))
    lines = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss/sup" in r]
    assert [("loss/unsup" in r) for r in steps] == [False, False, True, True, True, True]
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert all(r["cutmix"] == 1.0 and 0 < r["pseudo/reliable_frac"] <= 1 for r in steps[2:])
    # unlabelled shards with seg.png: queue fill per class and the pseudo-label accuracy
    assert all("queue_fill/background" in r and 0 <= r["pseudo/acc"] <= 1 for r in steps[2:])
    evals = [r for r in lines if "mIoU" in r]
    assert len(evals) == 1 and 0 <= evals[0]["mIoU"] <= 1 and "iou/background" in evals[0]
    assert _weights_moved(full) > 0.01  # step 2 -> 6: the U2PL epochs trained the student

    a = load_file(str(full / "checkpoints" / "step_00000006" / "extra_state.safetensors"))
    b = load_file(str(cut / "checkpoints" / "step_00000006" / "extra_state.safetensors"))
    assert sorted(a) == sorted(b) and int(a["teacher_ready"]) == 1
    assert sum(a[f"queue.{c}"].shape[0] for c in range(11)) > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    sa = load_file(str(full / "checkpoints" / "step_00000006" / "model.safetensors"))
    sb = load_file(str(cut / "checkpoints" / "step_00000006" / "model.safetensors"))
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], msg=key)

    assert cli_main(["eval-seg", str(full), "--out", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["model"] == "teacher" and result["mIoU"] == pytest.approx(evals[0]["mIoU"], abs=1e-9)
    assert cli_main(["eval-seg", str(full), "--which", "student", "--mode", "slide", "--crop", "24",
                     "--out", str(tmp_path / "s.json")]) == 0
    assert 0 <= json.loads((tmp_path / "s.json").read_text())["mIoU"] <= 1
    # a window size in whole-image mode is not read: refused
    assert cli_main(["eval-seg", str(full), "--crop", "24", "--out", str(tmp_path / "w.json")]) == 2
    assert not (tmp_path / "w.json").exists()
    # the step-2 checkpoint was written in the supervised-only epoch: its teacher never trained, so the student is
    # evaluated, as in training (the teacher copy is the initial network)
    early = ["eval-seg", str(full), "--checkpoint", "2"]
    assert int(load_file(str(full / "checkpoints" / "step_00000002" / "extra_state.safetensors"))["teacher_ready"]) == 0
    assert cli_main([*early, "--out", str(tmp_path / "t2.json")]) == 0
    assert cli_main([*early, "--which", "student", "--out", str(tmp_path / "s2.json")]) == 0
    t2, s2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("t2", "s2"))
    assert t2["model"] == s2["model"] == "student" and t2["mIoU"] == s2["mIoU"]
    # a segmentation run holds no backbone to export: one line, not a KeyError traceback
    assert cli_main(["export", str(full), "--out", str(tmp_path / "exp")]) == 2
    assert not (tmp_path / "exp").exists()


@pytest.mark.slow
def test_supervised_baseline_runs_on_the_same_labelled_images(semi: Path, tmp_path: Path, monkeypatch) -> None:
    from sslpipe.engine.trainer import train

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    run = train(_cfg(semi, "recipes/demo_supervised_seg.yaml", tmp_path, ["run_name=sup", "train.epochs=1",
                                                                          "eval.every_epochs=1"]))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("mIoU" in r for r in lines) and all("loss/unsup" not in r for r in lines)
    extra = load_file(str(next((run / "checkpoints").glob("step_*")) / "extra_state.safetensors"))
    assert extra == {}


def test_u2pl_requires_unlabelled_shards(semi: Path, tmp_path: Path) -> None:
    recipe = U2PLRecipe(_cfg(semi, "recipes/demo_u2pl.yaml", tmp_path, ["u2pl.unlabeled=null"]))
    recipe.build_model()
    with pytest.raises(ValueError, match="u2pl.unlabeled"):
        recipe.train_loader(0, 0, 1)


# ------------------------------------------------------------------------------------------------- one step
def _built(cls: type, semi: Path, tmp_path: Path, recipe: str, extra: list[str]):
    from accelerate import Accelerator

    built = cls(_cfg(semi, recipe, tmp_path, extra))
    torch.manual_seed(0)
    built.build(Accelerator(cpu=True))
    return built


def _batch(seed: int = 0, n: int = 2, size: int = 32, classes: int = 11) -> dict[str, torch.Tensor]:
    """A synthetic U2PL batch: labelled images with labels (some 255), unlabelled images (last 4 columns padding) with
    a ground truth."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, classes, (n, size, size), generator=g)
    label[:, :3] = 255
    valid = torch.ones(n, size, size, dtype=torch.bool)
    valid[..., -4:] = False
    truth = torch.where(valid, torch.randint(0, classes, (n, size, size), generator=g), 255)
    return {"image_l": torch.randn(n, 3, size, size, generator=g), "label_l": label,
            "image_u": torch.randn(n, 3, size, size, generator=g), "valid_u": valid, "truth_u": truth}


def _grads(recipe, batch: dict[str, torch.Tensor], epoch: int = 1) -> tuple[torch.Tensor, dict, dict]:
    """(loss, {parameter: gradient}, metrics) of one step, the global RNG seeded first."""
    net = recipe.model()
    net.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss, metrics = recipe.step(batch, {"epoch": epoch, "it": 2 * epoch})
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}, metrics


def _close(a: dict, b: dict) -> bool:
    """Same gradients up to float rounding: every difference below 1e-4 of the largest gradient (elementwise relative
    tolerances fail on the ~0 gradients of conv biases before BatchNorm; BatchNorm's batch statistics over a doubled
    batch round differently with the thread count: 1.2e-5 on one thread, 7.9e-6 on two, against 2.1 when the
    unlabelled images differ)."""
    scale = max(float(g.abs().max()) for g in b.values())
    return a.keys() >= b.keys() and all(float((a[k] - b[k]).abs().max()) <= 1e-4 * scale for k in b)


def test_without_unlabelled_losses_u2pl_has_the_supervised_gradients(semi: Path, tmp_path: Path) -> None:
    """unsup_weight 0 and no contrastive loss: the U2PL step's gradients are the supervised step's on the same
    labelled images, up to BatchNorm, whose batch statistics cover the unlabelled half of the student's batch too (the
    code's one forward on [labelled; unlabelled]). Dropout off so that only BatchNorm can differ."""
    u2pl = _built(U2PLRecipe, semi, tmp_path, "recipes/demo_u2pl.yaml",
                  ["u2pl.unsup_weight=0", "u2pl.contrastive=false", "u2pl.cutmix=false"])
    sup = _built(SupervisedSegRecipe, semi, tmp_path, "recipes/demo_supervised_seg.yaml", [])
    u2pl_state = u2pl.model().state_dict()
    sup.model().load_state_dict({k: u2pl_state[k] for k in sup.model().state_dict()})
    for net in (u2pl.model(), sup.model()):
        for m in net.modules():
            if isinstance(m, torch.nn.Dropout2d):
                m.p = 0.0
    batch = _batch()
    # BatchNorm on running statistics (eval mode): the gradients are the supervised ones, the representation head
    # gets none
    u2pl.model().eval()
    sup.model().eval()
    _, g_sup, _ = _grads(sup, batch)
    loss_u, g_u, metrics = _grads(u2pl, batch)
    assert set(g_sup) < set(g_u) and _close(g_u, g_sup)
    assert all(not g_u[k].any() for k in set(g_u) - set(g_sup))
    assert metrics["loss/unsup"] > 0 and float(loss_u) == pytest.approx(float(metrics["loss/sup"]), abs=1e-6)
    # the check can fail: with L_u weighted in, the same comparison sees the unlabelled images
    u2pl.section.unsup_weight = 1.0
    assert not _close(_grads(u2pl, batch)[1], g_sup)
    u2pl.section.unsup_weight = 0.0
    # BatchNorm on batch statistics (train mode): an unlabelled half equal to the labelled half leaves them as they
    # are, so the gradients are the supervised ones; other unlabelled images change them, and only that differs
    u2pl.model().train()
    sup.model().train()
    _, g_sup, _ = _grads(sup, batch)
    assert _close(_grads(u2pl, dict(batch, image_u=batch["image_l"].clone()))[1], g_sup)
    assert not _close(_grads(u2pl, batch)[1], g_sup)


def test_unlabelled_ground_truth_never_enters_a_loss(semi: Path, tmp_path: Path) -> None:
    """The same U2PL step (CutMix on, contrastive loss with anchors) with the true, a shuffled or no ground truth of
    the unlabelled images: identical loss and gradients, while the pseudo-label accuracy does read it."""
    recipe = _built(U2PLRecipe, semi, tmp_path, "recipes/demo_u2pl.yaml", ["u2pl.current_class_threshold=0.0"])
    student, queues = copy.deepcopy(recipe.model().state_dict()), recipe.queues.state()
    batch = _batch()
    shuffled = torch.where(batch["truth_u"] == 255, 255, (batch["truth_u"] + 1) % 11)
    runs = []
    for truth in (batch["truth_u"], shuffled, None):
        recipe.model().load_state_dict(student)
        recipe.queues.load_state(queues)
        recipe.teacher_ready = False
        b = {k: v for k, v in batch.items() if k != "truth_u"}
        runs.append(_grads(recipe, b if truth is None else dict(b, truth_u=truth)))
    (loss, grads, metrics), *others = runs
    assert metrics["cutmix"] == 1.0 and metrics["contrastive/classes"] > 0 and metrics["loss/unsup"] > 0
    for other_loss, other_grads, _ in others:
        assert torch.equal(other_loss, loss)
        assert other_grads.keys() == grads.keys() and all(torch.equal(other_grads[k], grads[k]) for k in grads)
    assert "pseudo/acc" in metrics and float(metrics["pseudo/acc"]) != float(runs[1][2]["pseudo/acc"])
    assert "pseudo/acc" not in runs[2][2] and "pseudo/reliable_frac" in runs[2][2]


def test_another_ignore_index_gives_the_same_step(semi: Path, tmp_path: Path) -> None:
    """Ignored labelled pixels written 254 under u2pl.ignore_index=254 are what 255 is under 255: the same L_s, and
    L_c neither anchors on them nor queues their features as negatives (it read 255 only, so 254 entered the queues:
    348 keys became 540 on this batch)."""
    batch = _batch()
    runs = []
    for ignore in (255, 254):
        recipe = _built(U2PLRecipe, semi, tmp_path, "recipes/demo_u2pl.yaml",
                        ["u2pl.cutmix=false", "u2pl.current_class_threshold=0.0"])
        recipe.section.ignore_index = ignore  # after the build: the bundled shards mark ignore with 255
        label = batch["label_l"].masked_fill(batch["label_l"] == 255, ignore)
        truth = batch["truth_u"].masked_fill(batch["truth_u"] == 255, ignore)
        runs.append((_grads(recipe, dict(batch, label_l=label, truth_u=truth)), sum(recipe.queues.sizes())))
    ((loss_a, _, m_a), queued_a), ((loss_b, _, m_b), queued_b) = runs
    assert queued_a > 0 and queued_a == queued_b
    assert float(m_a["contrastive/negatives"]) == float(m_b["contrastive/negatives"])
    assert torch.equal(loss_a, loss_b) and float(m_a["pseudo/acc"]) == float(m_b["pseudo/acc"])


@pytest.mark.parametrize("overrides, match", [
    (["u2pl.drop_percent=150"], r"u2pl.drop_percent.*less than or equal to 100"),
    (["u2pl.low_entropy_threshold=-1"], r"u2pl.low_entropy_threshold.*greater than or equal to 0"),
    (["u2pl.ema_decay=1.5"], r"u2pl.ema_decay"),
    (["u2pl.unlabeled_ratio=0"], r"u2pl.unlabeled_ratio.*greater than 0"),
    (["u2pl.temperature=0"], r"u2pl.temperature"),
    (["u2pl.low_rank=20"], r"u2pl.low_rank \(20\) must be below u2pl.high_rank \(20\)"),
    (["u2pl.scale_range=[1.5,2.0]"], r"u2pl.scale_range.*0 < lo <= 1 <= hi"),
    (["u2pl.cutmix=false", "u2pl.cutmix_p=0.9"], r"'u2pl.cutmix_p' = 0.9 is not read with u2pl.cutmix=false"),
    (["u2pl.contrastive=false", "u2pl.num_negatives=500"],
     r"'u2pl.num_negatives' = 500 is not read with u2pl.contrastive=false"),
    (["u2pl.vit_window_size=14"], r"'u2pl.vit_window_size' = 14 is not read with model.arch=resnet10t \(a CNN\)"),
    (["model.arch=vit_tiny_patch16_224", "model.patch_size=16", "u2pl.low_level_index=3"],
     r"'u2pl.low_level_index' = 3 is not read with model.arch=vit_tiny_patch16_224 \(a ViT\)"),
    (["eval.window=48"], r"'eval.window' = 48 is not read with eval.mode=whole"),
])
def test_u2pl_values_out_of_range_or_unread_are_refused_at_load(overrides: list[str], match: str) -> None:
    """Each was accepted: the percentiles failed one supervised-only epoch later naming no key, the others were never
    read (a cap above 1, one unlabelled image per batch for a ratio of 0, a NaN loss at temperature 0)."""
    from sslpipe.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(REPO / "recipes/demo_u2pl.yaml", ["data.train=x", "u2pl.unlabeled=y", *overrides])
    # the settings that read them load
    load_config(REPO / "recipes/demo_u2pl.yaml", ["data.train=x", "u2pl.unlabeled=y", "u2pl.cutmix_p=0.9",
                                                  "u2pl.num_negatives=500", "eval.mode=slide", "eval.window=48"])


def test_recipe_teacher_is_the_student_in_the_first_u2pl_epoch(semi: Path, tmp_path: Path) -> None:
    """After each optimizer step of epoch sup_only_epoch (1) the teacher's parameters equal the student's; after the
    first step of epoch 2 (it 4, 2 steps per epoch) it is the EMA with decay 1 - 1/(4 - 2 + 1) = 2/3."""
    recipe = _built(U2PLRecipe, semi, tmp_path, "recipes/demo_u2pl.yaml", [])
    net = recipe.model()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    batch = _batch()
    for it in (2, 3):
        _grads(recipe, batch)
        opt.step()
        recipe.after_optimizer_step({"epoch": 1, "it": it})
        teacher = dict(recipe.teacher.named_parameters())
        assert all(torch.equal(teacher[k], p) for k, p in net.named_parameters())
    before = {k: p.clone() for k, p in recipe.teacher.named_parameters()}
    _grads(recipe, batch, epoch=2)
    opt.step()
    recipe.after_optimizer_step({"epoch": 2, "it": 4})
    for k, p in net.named_parameters():
        torch.testing.assert_close(dict(recipe.teacher.named_parameters())[k], 2 / 3 * before[k] + 1 / 3 * p)


def test_diagnostics_are_logged_with_unlabelled_ground_truth(semi: Path, tmp_path: Path, monkeypatch) -> None:
    """Unlabelled shards with seg.png (as `sslpipe shards --semi` writes them): pseudo-label accuracy, recall per
    class, the kept share, queue fill per class and the three losses reach metrics.jsonl at every log step of the
    U2PL epochs."""
    from sslpipe.engine.trainer import train

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    run = train(_cfg(semi, "recipes/demo_u2pl.yaml", tmp_path, ["run_name=diag", "train.epochs=2",
                                                                "eval.every_epochs=0"]))
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss/sup" in r]
    assert len(steps) == 4 and all("pseudo/acc" not in r for r in steps[:2])
    for r in steps[2:]:
        assert {"loss/unsup", "loss/contrastive", "pseudo/reliable_frac", "queue_fill/background"} <= set(r)
        assert 0 <= r["pseudo/acc"] <= 1 and 0 < r["pseudo/reliable_frac"] <= 1
        recalls = [k for k in r if k.startswith("pseudo/recall/")]
        assert recalls and all(0 <= r[k] <= 1 for k in recalls)
        assert len([k for k in r if k.startswith("queue_fill/")]) == 11


def test_voc_layout_to_semi_shards(tmp_path: Path) -> None:
    """A VOC-style folder (JPEGImages, SegmentationClass palette PNGs, ImageSets lists) -> `sslpipe shards --voc`."""
    root = tmp_path / "VOC"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"2007_{i:06d}" for i in range(10)]
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        label = Image.fromarray(rng.choice([0, 5, 15, 255], (20, 24)).astype(np.uint8), mode="L").convert("P")
        label.save(root / "SegmentationClass" / f"{i}.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[:8]) + "\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids[8:]) + "\n")
    (tmp_path / "labeled.txt").write_text(f"{ids[1]}\n{ids[4]}\n")
    out = tmp_path / "shards"
    assert cli_main(["shards", "--voc", str(root), str(out), "--labeled-list", str(tmp_path / "labeled.txt")]) == 0
    split = json.loads((out / "split.json").read_text())
    assert split["labeled"] == [ids[1], ids[4]] and len(split["unlabeled"]) == 6
    from sslpipe.data.stream import build_loader

    samples = list(build_loader(str(out / "labeled"), sample_fn=lambda r: r, collate_fn=lambda s: s, batch_size=1,
                                shuffle=False, drop_last=False))
    seg = {s[0]["key"]: np.asarray(s[0]["seg"]) for s in samples}
    assert len(seg) == 2
    for key, arr in seg.items():
        assert set(np.unique(arr)) <= {0, 5, 15, 255}
    manifest = json.loads((out / "val" / "manifest.json").read_text())
    assert manifest["classes"][15] == "person" and manifest["splits"]["val"]["samples"] == 2
    assert cli_main(["shards", "--voc", str(root), str(tmp_path / "frac"), "--labeled", "1/4", "--seed", "1"]) == 0
    assert len(json.loads((tmp_path / "frac" / "split.json").read_text())["labeled"]) == 2


def test_cityscapes_label_ids_become_train_ids(tmp_path: Path) -> None:
    root = tmp_path / "cs"
    (root / "leftImg8bit" / "train" / "ulm").mkdir(parents=True)
    (root / "gtFine" / "train" / "ulm").mkdir(parents=True)
    Image.new("RGB", (8, 4)).save(root / "leftImg8bit" / "train" / "ulm" / "ulm_000001_000019_leftImg8bit.png")
    ids = np.array([[7, 8, 26, 33, 0, 1, 5, 24]] * 4, np.uint8)
    Image.fromarray(ids).save(root / "gtFine" / "train" / "ulm" / "ulm_000001_000019_gtFine_labelIds.png")
    pairs = cityscapes_pairs(root, "train", cache=tmp_path / "cache")
    assert pairs[0][0] == "ulm/ulm_000001_000019"
    got = np.asarray(Image.open(pairs[0][2]))
    want = [CITYSCAPES_TRAIN_IDS.get(v, 255) for v in ids[0]]
    assert got[0].tolist() == want == [0, 1, 13, 18, 255, 255, 255, 11]


def test_ade20k_layout_shifts_labels_and_keeps_splits(tmp_path: Path, capsys) -> None:
    """ADEChallengeData2016 -> `sslpipe shards --ade20k`: 0 ("other") -> 255, 1..150 -> 0..149; training / validation
    become OUT/labeled (split train) and OUT/val (split val) with the 150 names."""
    root = tmp_path / "ADEChallengeData2016"
    labels = np.array([[0, 1, 2, 150, 13, 0, 149, 21]] * 4, np.uint8)
    for split, n in (("training", 3), ("validation", 1)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 4), (i * 40, 90, 200)).save(root / "images" / split / f"ADE_{split}_{i:08d}.jpg")
            Image.fromarray(labels).save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")
    out = tmp_path / "shards"
    assert cli_main(["shards", "--ade20k", str(root), str(out), "--labeled", "2"]) == 0
    assert len(ADE20K_CLASSES) == 150 and ADE20K_CLASSES[12] == "person" and ADE20K_CLASSES[-1] == "flag"
    counts = {}
    for name, split in (("labeled", "train"), ("unlabeled", "train"), ("val", "val")):
        manifest = json.loads((out / name / "manifest.json").read_text())
        counts[name] = manifest["splits"][split]["samples"]
        if name != "unlabeled":
            assert manifest["classes"] == ADE20K_CLASSES
            for tar in (out / name).glob("*.tar"):
                with tarfile.open(tar) as f:
                    for m in f.getmembers():
                        if m.name.endswith("seg.png"):
                            seg = np.asarray(Image.open(io.BytesIO(f.extractfile(m).read())))
                            assert seg[0].tolist() == [255, 0, 1, 149, 12, 255, 148, 20]
    assert counts == {"labeled": 2, "unlabeled": 1, "val": 1}
    assert cli_main(["shards", "--ade20k", str(tmp_path / "nowhere"), str(tmp_path / "x")]) != 0
    assert "not an ADEChallengeData2016 folder" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_queues_identical_on_two_processes(semi: Path, tmp_path: Path) -> None:
    """`accelerate launch` with 2 CPU processes (gloo): different unlabelled images per rank, yet after every step
    both ranks hold the same queues (the keys are all-gathered)."""
    env = child_env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), "-m", "sslpipe", "train", str(REPO / "recipes/demo_u2pl.yaml"),
           "method=tests.workers.ddp_u2pl:CheckedU2PL", f"data.train={semi / 'labeled'}", f"data.val={semi / 'val'}",
           f"u2pl.unlabeled={semi / 'unlabeled'}", f"output_dir={tmp_path}", "run_name=ddp",
           *(o for o in TINY if o.split("=")[0] not in ("train.epochs", "eval.every_epochs")),
           "train.epochs=2", "eval.every_epochs=0", "u2pl.sup_only_epoch=0"]  # a key twice is refused
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [[json.loads(x) for x in (tmp_path / "ddp" / f"queues_rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4
    for a, b in zip(*ranks):
        assert a["it"] == b["it"] and a["sizes"] == b["sizes"] and a["queues"] == b["queues"]
        assert not set(a["keys_u"]) & set(b["keys_u"])  # each rank saw its own unlabelled images
    assert sum(ranks[0][-1]["sizes"]) > sum(ranks[0][0]["sizes"]) > 0


def test_published_voc_recipes_hold_the_published_values() -> None:
    cfg = load_config(REPO / "recipes/u2pl_voc_1464.yaml")
    u, o = cfg.u2pl, cfg.optim
    assert (cfg.method, u.crop_size, cfg.data.batch_size, cfg.train.epochs) == ("u2pl", 513, 4, 80)
    assert (o.name, o.lr, o.sgd_momentum, o.weight_decay, o.schedule, o.poly_power) == ("sgd", 1e-3, 0.9, 1e-4,
                                                                                          "poly", 0.9)
    assert (u.head_lr_mult, u.ema_decay, u.sup_only_epoch, tuple(u.scale_range)) == (10.0, 0.99, 1, (0.5, 2.0))
    assert (u.drop_percent, u.low_rank, u.high_rank, u.current_class_threshold, u.low_entropy_threshold) == (
        80.0, 3, 20, 0.3, 20.0)
    assert (u.num_negatives, u.num_queries, u.temperature, u.queue_size, u.background_queue_size) == (
        50, 256, 0.5, 30000, 50000)
    assert u.contrastive_weight == 0.1 and u.output_stride == 8 and u.aspp_dilations == [12, 24, 36]
    sup = load_config(REPO / "recipes/supervised_voc_1464.yaml")
    assert sup.method == "supervised_seg" and sup.data.train == cfg.data.train and sup.data.batch_size == 8


def test_shards_cli_rejects_labeled_without_a_layout(tmp_path: Path, capsys) -> None:
    assert cli_main(["shards", "--dataset", "digits", str(tmp_path / "x"), "--labeled", "1/8"]) == 2
    assert "--labeled" in capsys.readouterr().err


def test_shards_cli_scene_objects_scale_and_classes(tmp_path: Path, capsys) -> None:
    """`--scene-objects 1,1 --scene-scale 0.8,0.9`: one large object per scene, written into every set; a malformed
    pair is refused with the flag named and nothing written."""
    out = tmp_path / "big"
    assert cli_main(["shards", "--dataset", "scenes", str(out), "--semi", "--labeled", "1/4", "--scene-train", "8",
                     "--scene-val", "4", "--scene-size", "32", "--scene-objects", "1,1", "--scene-scale",
                     "0.8,0.9", "--scene-classes", "Trouser,Bag"]) == 0
    for name in ("labeled", "unlabeled", "val"):
        assert json.loads((out / name / "manifest.json").read_text())["classes"] == ["background", "Trouser", "Bag"]
    labels = sorted((out / "source" / "SegmentationClass").glob("*.png"))
    assert len(labels) == 12
    for path in labels:
        seg = np.asarray(Image.open(path))
        assert len(set(np.unique(seg).tolist()) - {0, 255}) == 1 and seg[seg != 255].max() <= 2
        ys, xs = np.nonzero((seg != 0) & (seg != 255))
        extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        assert int(0.8 * 32) // 2 <= extent <= round(0.9 * 32)  # pasted at a side of 25-29 px of the 32
    assert cli_main(["shards", "--dataset", "scenes", str(tmp_path / "bad"), "--semi", "--scene-objects", "3"]) == 2
    assert "--scene-objects" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert cli_main(["shards", "--dataset", "scenes", str(tmp_path / "bad"), "--semi", "--scene-classes", "Hat"]) == 2
    assert "Hat" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_scenes_recipe_pair_pretrains_exports_and_starts_both_runs_from_the_export(semi: Path, tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """Issue 18's pipeline story, shrunk: SimCLR (recipes/scenes_simclr_resnet10t.yaml) on the training images,
    export, then recipes/scenes_u2pl.yaml and recipes/scenes_supervised.yaml from that export. The pair differs only in
    what U2PL adds; both encoders start as the exported weights; both runs train and evaluate."""
    from accelerate import Accelerator

    from sslpipe.engine.trainer import train
    from sslpipe.weights.run_export import export_run

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    u2pl, sup = load_config(REPO / "recipes/scenes_u2pl.yaml"), load_config(REPO / "recipes/scenes_supervised.yaml")

    def same(c):
        return (c.data.train, c.data.val, c.data.batch_size, c.data.steps_per_epoch, c.train.epochs,
                c.model.arch, c.model.init_from, c.optim, c.eval, getattr(c, c.method).crop_size,
                getattr(c, c.method).scale_range, c.seed)

    assert same(u2pl) == same(sup) and (u2pl.train.epochs, u2pl.u2pl.sup_only_epoch) == (40, 10)
    simclr = load_config(REPO / "recipes/scenes_simclr_resnet10t.yaml", [
        f"data.train={semi / 'unlabeled'}", f"output_dir={tmp_path}", "data.batch_size=4", "data.num_workers=0",
        "data.shuffle_buffer=4", "train.epochs=1", "data.steps_per_epoch=2", "train.health_every=0",
        "crops.global_size=32"])
    assert simclr.method == "simclr" and u2pl.model.arch == simclr.model.arch == "resnet10t"
    export = export_run(train(simclr), which=None)
    exported = load_file(str(export / "model.safetensors"))
    for recipe, cls, extra in (("recipes/scenes_u2pl.yaml", U2PLRecipe, ["u2pl.sup_only_epoch=1"]),
                               ("recipes/scenes_supervised.yaml", SupervisedSegRecipe, [])):
        cfg = _cfg(semi, recipe, tmp_path, [f"model.init_from={export}", "train.epochs=2", "eval.every_epochs=2",
                                            *extra])
        built = cls(cfg)
        built.build(Accelerator(cpu=True))
        start = built.student.state_dict()
        for key, value in exported.items():  # every exported tensor is in the encoder, unchanged
            assert any(k.endswith("." + key) and torch.equal(v, value) for k, v in start.items()), key
        run = train(cfg)
        assert any("mIoU" in json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines())
        assert _weights_moved(run) > 0.01  # step 2 -> 4: the second epoch trained the network
    # eval-seg builds the network and normalisation the run recorded, its weights from the checkpoint: the export may
    # have moved since
    assert json.loads((run / "init_from.json").read_text())["init_from"] == str(export)
    moved = export.rename(export.with_name("moved"))
    try:
        assert cli_main(["eval-seg", str(run), "--out", str(tmp_path / "e.json")]) == 0
    finally:
        moved.rename(export)
    assert 0 <= json.loads((tmp_path / "e.json").read_text())["mIoU"] <= 1
