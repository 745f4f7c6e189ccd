"""Distillation (`method: distill`): the queue pseudo-label loss, the cosine and dense terms against hand-computed
values, the recipe's step, resume and refusals, and two processes (gloo) against one at the same global batch."""
from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate import Accelerator
from helpers import REPO

from sslpipe.config import ConfigError
from sslpipe.losses.cosine_distill import cosine_distill_loss
from sslpipe.losses.dense_distill import dense_distill_loss, resample_to_grid
from sslpipe.losses.queue_distill import QueueDistillLoss
from sslpipe.recipes import load_config
from sslpipe.recipes.distill import DistillRecipe, auto_queue_size

RECIPE = REPO / "recipes/demo_distill.yaml"
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
TINY_VIT = "model.kwargs={embed_dim: 32, depth: 1, num_heads: 2}"
VIT_ARGS = {"embed_dim": 48, "depth": 2, "num_heads": 2, "patch_size": 4, "img_size": 32, "dynamic_img_size": True}
EXPORT_ARGS = dict(img_size=32, mean=(0.4,) * 3, std=(0.3,) * 3, source={"which": "test"})


# ------------------------------------------------------------------------------------------------------ losses
def test_queue_loss_by_hand() -> None:
    """Queue of 3 (one slot filled by the teacher [1, 0]), tau 0.5: p_t = softmax([2, 0, 0]); a student equal to the
    teacher gives the entropy of p_t, an orthogonal one ([0, 1]: logits 0) gives log 3."""
    loss = QueueDistillLoss(dim=2, queue_size=3, temperature=0.5)
    t = torch.tensor([[3.0, 0.0]])  # normalised inside
    loss.enqueue(t)
    p = np.exp([2.0, 0.0, 0.0]) / np.exp([2.0, 0.0, 0.0]).sum()
    assert loss(torch.tensor([[2.0, 0.0]]), t).item() == pytest.approx(-(p * np.log(p)).sum(), rel=1e-6)
    assert loss(torch.tensor([[0.0, 5.0]]), t).item() == pytest.approx(math.log(3), rel=1e-6)


def test_queue_is_first_in_first_out() -> None:
    loss = QueueDistillLoss(dim=2, queue_size=3)
    loss.enqueue(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    loss.enqueue(torch.tensor([[-1.0, 0.0]]))
    torch.testing.assert_close(loss.queue, torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    loss.enqueue(torch.tensor([[0.0, -2.0]] * 4))  # more than the queue holds: the first 3 of the newest
    torch.testing.assert_close(loss.queue, torch.tensor([[0.0, -1.0]] * 3))


def test_queue_loss_gradient_pulls_the_student_to_the_teacher() -> None:
    torch.manual_seed(0)
    loss = QueueDistillLoss(dim=8, queue_size=64, temperature=0.07)
    teacher = torch.randn(16, 8)
    loss.enqueue(torch.randn(48, 8))
    loss.enqueue(teacher)
    student = torch.randn(16, 8, requires_grad=True)
    before = torch.nn.functional.cosine_similarity(student, teacher).mean().item()
    opt = torch.optim.SGD([student], lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        loss(student, teacher).backward()
        opt.step()
    assert torch.nn.functional.cosine_similarity(student, teacher).mean().item() > max(0.75, before + 0.5)


def test_cosine_loss_by_hand() -> None:
    s, t = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    assert cosine_distill_loss(s, t).item() == pytest.approx((1.0 + 0.0) / 2)
    with pytest.raises(ValueError, match="differ in shape"):
        cosine_distill_loss(s, t[:1])


def test_dense_loss_resamples_the_student_to_the_teacher_grid() -> None:
    """A 1x1 student map (D=3) against a 2x2 teacher grid: resampled, it is the same vector at the four positions.
    mse compares it to the teacher tokens layer-normalised per position; cosine to the raw tokens."""
    torch.manual_seed(1)
    v = torch.tensor([0.5, -1.0, 2.0])
    student = v.view(1, 3, 1, 1)
    teacher = torch.randn(1, 3, 2, 2)
    assert torch.equal(resample_to_grid(student, (2, 2)), v.view(1, 3, 1, 1).expand(1, 3, 2, 2))
    tokens = teacher[0].permute(1, 2, 0).reshape(4, 3).numpy()
    ln = (tokens - tokens.mean(1, keepdims=True)) / np.sqrt(tokens.var(1, keepdims=True) + 1e-5)
    assert dense_distill_loss(student, teacher, "mse").item() == pytest.approx(((v.numpy() - ln) ** 2).mean(), rel=1e-5)
    cos = tokens @ v.numpy() / np.linalg.norm(tokens, axis=1) / np.linalg.norm(v.numpy())
    assert dense_distill_loss(student, teacher, "cosine").item() == pytest.approx((1 - cos).mean(), rel=1e-5)
    with pytest.raises(ValueError, match="same batch and width"):
        dense_distill_loss(torch.zeros(1, 4, 1, 1), teacher)


def test_auto_queue_size() -> None:
    assert (auto_queue_size(60000), auto_queue_size(1797), auto_queue_size(40), auto_queue_size(None)) == \
        (8192, 256, 16, 8192)
    assert [auto_queue_size(n) for n in (17, 16, 10, 1)] == [16, 8, 5, 1]  # always below the set's size


# ------------------------------------------------------------------------------------------------------ recipe
@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two frozen teachers at 32 px: a tiny ViT (patch 4: an 8x8 grid of patch tokens) and a ResNet."""
    from sslpipe.weights.export import export_backbone

    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **VIT_ARGS)
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    return {"vit": export_backbone(vit, root / "vit", arch="vit_tiny_patch16_224", model_args=VIT_ARGS, **EXPORT_ARGS),
            "cnn": export_backbone(cnn, root / "cnn", arch="resnet10t", model_args={}, **EXPORT_ARGS)}


def _cfg(shards: Path, teacher: Path, *extra: str):
    return load_config(RECIPE, [f"data.train={shards}", f"data.val={shards}", f"distill.teacher={teacher}",
                                "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=8", TINY_VIT, *extra])


@pytest.mark.parametrize("teacher, extra", [
    ("vit", ["distill.dense_loss=mse", "distill.teacher_blocks=2"]),
    ("cnn", ["model.arch=resnet10t", "model.patch_size=null", "model.kwargs={}", "distill.global_loss=cosine"]),
])
def test_step_trains_the_student_and_leaves_the_teacher(digits_shards: Path, teachers, teacher: str,
                                                        extra: list[str]) -> None:
    recipe = DistillRecipe(_cfg(digits_shards, teachers[teacher], *extra))
    recipe.build(Accelerator(cpu=True))
    teacher_before = {k: v.clone() for k, v in recipe.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in recipe.student.state_dict().items()}
    opt = torch.optim.AdamW([p for g in recipe.param_groups() for p in g["params"]], lr=1e-3)
    loss, metrics = recipe.step(next(iter(recipe.train_loader(0, 0, 1))), {"it": 0})
    assert torch.isfinite(loss) and "distill/global" in metrics
    assert ("distill/dense" in metrics) == (teacher == "vit")
    loss.backward()
    opt.step()
    assert all(torch.equal(v, teacher_before[k]) for k, v in recipe.teacher.state_dict().items())
    assert any(not torch.equal(v, student_before[k]) for k, v in recipe.student.state_dict().items())
    assert all(not p.requires_grad for p in recipe.teacher.parameters())


def test_refusals_are_one_line(digits_shards: Path, teachers) -> None:
    with pytest.raises(ValueError, match="method distill needs distill.teacher"):
        DistillRecipe(_cfg(digits_shards, teachers["vit"], "distill.teacher=null"))
    with pytest.raises(ValueError, match="both none: nothing to learn"):
        DistillRecipe(_cfg(digits_shards, teachers["vit"], "distill.global_loss=none"))
    with pytest.raises(ConfigError, match="'crops.n_local' is not read by method 'distill'"):
        _cfg(digits_shards, teachers["vit"], "crops.n_local=2")
    recipe = DistillRecipe(_cfg(digits_shards, teachers["cnn"], "model.arch=resnet10t", "model.patch_size=null",
                                "model.kwargs={}", "distill.teacher_blocks=2", "distill.dense_loss=mse"))
    with pytest.raises(ValueError, match="teacher_blocks=2 needs a ViT teacher"):
        recipe.build(Accelerator(cpu=True))
    with pytest.raises(ConfigError, match=r"'distill.teacher_blocks' = 2 is not read with distill.dense_loss=none"):
        _cfg(digits_shards, teachers["vit"], "distill.teacher_blocks=2")
    with pytest.raises(ValueError, match=r"distill.queue_size=2048 is not smaller than the 1438 training images"):
        DistillRecipe(_cfg(digits_shards, teachers["vit"], "distill.queue_size=2048")).build(Accelerator(cpu=True))


def test_teacher_settings_the_teacher_cannot_take_are_refused_in_one_line(digits_shards: Path, teachers) -> None:
    """The ViT teacher has 4 px patches and 2 blocks: a teacher_size its patches do not tile and more teacher_blocks
    than it has are refused naming the key and what fits, before training (timm's bare assertions before)."""
    with pytest.raises(ValueError, match=r"^distill.teacher_size=30 is not a multiple of the 4 px patches of the "
                                         r"teacher .*vit: set it to 28 or 32, or remove it for the export's 32$"):
        DistillRecipe(_cfg(digits_shards, teachers["vit"], "distill.teacher_size=30")).build(Accelerator(cpu=True))
    with pytest.raises(ValueError, match=r"^distill.teacher_size=3 .* set it to 4, or remove"):
        DistillRecipe(_cfg(digits_shards, teachers["vit"], "distill.teacher_size=3")).build(Accelerator(cpu=True))
    with pytest.raises(ValueError, match=r"^distill.teacher_blocks=3: the teacher .*vit has 2 block\(s\): set 1 to 2$"):
        DistillRecipe(_cfg(digits_shards, teachers["vit"], "distill.dense_loss=mse",
                           "distill.teacher_blocks=3")).build(Accelerator(cpu=True))
    DistillRecipe(_cfg(digits_shards, teachers["vit"], "distill.dense_loss=mse", "distill.teacher_blocks=2",
                       "distill.teacher_size=36")).build(Accelerator(cpu=True))  # both at the edge: accepted


def test_teacher_size_is_checked_and_a_larger_teacher_sees_the_crop_at_its_size(digits_shards: Path, teachers,
                                                                                  tmp_path: Path) -> None:
    """A fixed-size ViT teacher cannot take another size: one line naming the key, not timm's assertion. A teacher
    larger than the student gets the crop made at its own size (not the student's pixels upsampled); the student
    gets it resized to its own."""
    from sslpipe.weights.export import export_backbone

    fixed_args = {k: v for k, v in VIT_ARGS.items() if k != "dynamic_img_size"}
    fixed = export_backbone(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **fixed_args),
                            tmp_path / "fixed", arch="vit_tiny_patch16_224", model_args=fixed_args, **EXPORT_ARGS)
    with pytest.raises(ValueError, match=r"distill.teacher_size=48: the teacher .* is a ViT of fixed input size 32"):
        DistillRecipe(_cfg(digits_shards, fixed, "distill.teacher_size=48")).build(Accelerator(cpu=True))
    recipe = DistillRecipe(_cfg(digits_shards, teachers["vit"], "distill.teacher_size=64", "distill.mixup=false"))
    recipe.build(Accelerator(cpu=True))
    recipe.accelerator = Accelerator(cpu=True)
    seen = {}
    recipe.teacher.patch_embed.register_forward_pre_hook(lambda m, args: seen.__setitem__("teacher", args[0]))
    student_vit = recipe.student.backbone
    student_vit.patch_embed.register_forward_pre_hook(lambda m, args: seen.__setitem__("student", args[0]))
    batch = next(iter(recipe.train_loader(0, 0, 1)))
    assert batch["views"].shape[-2:] == (64, 64)
    recipe.step(batch, {"it": 0})
    assert seen["teacher"].shape[-1] == 64 and seen["student"].shape[-1] == 28
    x = batch["views"].float() / 255  # the teacher's input is the 64 px crop itself, normalised with its statistics
    torch.testing.assert_close(seen["teacher"], (x - 0.4) / 0.3)


def test_run_exports_the_student_names_the_teacher_and_refuses_a_changed_teacher(digits_shards: Path, teachers,
                                                                                  tmp_path: Path,
                                                                                  monkeypatch) -> None:
    import shutil

    from sslpipe.engine.trainer import train
    from sslpipe.weights.export import export_backbone, read_export_config
    from sslpipe.weights.run_export import export_run

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    teacher = tmp_path / "teacher"
    shutil.copytree(teachers["vit"], teacher)
    cfg = _cfg(digits_shards, teacher, f"output_dir={tmp_path}", "run_name=d", "train.max_steps=3")
    run = train(cfg)
    record = json.loads((run / "distill_teacher.json").read_text())
    assert record["sha256"] == read_export_config(teacher)["sha256"]["model.safetensors"]
    export = export_run(run, which=None)
    assert export.name == "student" and read_export_config(export)["architecture"] == "vit_tiny_patch16_224"
    card = (export / "README.md").read_text()
    assert f"distilled from | `{teacher.resolve()}` (vit_tiny_patch16_224)" in card and record["sha256"] in card
    cfg = _cfg(digits_shards, teacher, f"output_dir={tmp_path}", "run_name=d", "train.max_steps=5")
    other = export_backbone(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **VIT_ARGS),
                            tmp_path / "other", arch="vit_tiny_patch16_224", model_args=VIT_ARGS, **EXPORT_ARGS)
    shutil.copy(other / "model.safetensors", teacher / "model.safetensors")  # weights that no longer match
    with pytest.raises(ValueError, match="does not match the sha256 its config.json records"):
        train(cfg, resume=str(run))
    shutil.copy(other / "config.json", teacher / "config.json")  # another teacher, consistent in itself
    with pytest.raises(ValueError, match="is not the teacher this run started from"):
        train(cfg, resume=str(run))


def _written_again(export: Path) -> None:
    """Write the export's model.safetensors again with the same tensors and other header bytes, its sha256 recorded
    in config.json: what `sslpipe export RUN --onnx` of the same run did half the time (an older sslpipe wrote the
    file's metadata map in a per-process order)."""
    from safetensors.torch import load_file, save_file

    from sslpipe.weights.export import read_export_config, rewrite_config
    from sslpipe.weights.hashing import sha256_file

    weights = export / "model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"architecture": "vit_tiny_patch16_224", "format": "pt"})
    config = read_export_config(export)
    config["sha256"]["model.safetensors"] = sha256_file(weights)
    rewrite_config(export / "config.json", config)


def _older_record(sha256: str) -> dict[str, torch.Tensor]:
    """The extra state of a checkpoint of an older sslpipe: the teacher file's sha256 as bytes."""
    return {"teacher_sha256": torch.tensor(list(bytes.fromhex(sha256)), dtype=torch.uint8)}


def test_the_same_teacher_exported_again_resumes_and_an_older_checkpoint_is_still_read(
        digits_shards: Path, teachers, tmp_path: Path, monkeypatch) -> None:
    """Resuming compares the teacher's tensors (their sha256), not its file's bytes: the same weights exported again
    resume (they were refused as "not the teacher this run started from"). A checkpoint of an older sslpipe records
    the file's sha256 (`teacher_sha256`): it is still read, and still refuses another file."""
    import shutil

    from sslpipe.engine.trainer import train
    from sslpipe.weights.hashing import sha256_file, tensor_digest

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    teacher = tmp_path / "teacher"
    shutil.copytree(teachers["vit"], teacher)
    run = train(_cfg(digits_shards, teacher, f"output_dir={tmp_path}", "run_name=d", "train.max_steps=2"))
    first = sha256_file(teacher / "model.safetensors")
    _written_again(teacher)
    assert sha256_file(teacher / "model.safetensors") != first
    train(_cfg(digits_shards, teacher, f"output_dir={tmp_path}", "run_name=d", "train.max_steps=3"), resume=str(run))
    assert (run / "checkpoints/step_00000003/trainer_state.json").is_file()
    record = json.loads((run / "distill_teacher.json").read_text())
    assert record["tensor_digest"] == tensor_digest(teacher / "model.safetensors") and record["sha256"] != first

    recipe = DistillRecipe(_cfg(digits_shards, teacher, "distill.global_loss=cosine"))
    recipe.build(Accelerator(cpu=True))
    recipe.load_extra_state(_older_record(sha256_file(teacher / "model.safetensors")))
    with pytest.raises(ValueError, match=r"is not the teacher this run started from \(sha256 of its "
                                         rf"model.safetensors: {sha256_file(teacher / 'model.safetensors')[:12]}"):
        recipe.load_extra_state(_older_record(first))


# ------------------------------------------------------------------------------------- 2 processes (gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch() -> torch.Tensor:
    return torch.randint(0, 256, (8, 3, 28, 28), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)


def _grads_of_one_step(cfg, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Build the recipe, step on this rank's half of the global batch, average the gradients as DDP does."""
    torch.manual_seed(0)
    recipe = DistillRecipe(cfg)
    recipe.build(Accelerator(cpu=True))
    views = _global_batch().chunk(world)[rank]
    loss, _ = recipe.step({"views": views, "labels": torch.zeros(len(views), dtype=torch.long)}, {"it": 0})
    loss.backward()
    grads = {n: p.grad.clone() for n, p in recipe.student.named_parameters() if p.grad is not None}
    if world > 1:
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
    return {**grads, "queue": recipe.queue_loss.queue.clone(), "loss": loss.detach()}


def _worker(rank: int, port: int, out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), ACCELERATE_USE_CPU="1")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.save(_grads_of_one_step(load_config(RECIPE, overrides), rank, 2), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_equal_one_at_the_same_global_batch(digits_shards: Path, teachers, tmp_path: Path) -> None:
    """Mixup off (it permutes within a process's batch): the averaged gradients and the shared queue of two
    processes with 4 images each equal one process with the 8."""
    overrides = [f"data.train={digits_shards}", f"distill.teacher={teachers['vit']}", "distill.mixup=false",
                 "distill.queue_size=16", "distill.dense_loss=mse", TINY_VIT]
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), overrides), nprocs=2, join=True)
    one = _grads_of_one_step(load_config(RECIPE, overrides), 0, 1)
    for rank in range(2):
        two = torch.load(tmp_path / f"rank{rank}.pt")
        assert two.keys() == one.keys()
        for key in one:
            if key != "loss":
                torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)


def test_a_student_of_its_own_patch_size_is_checked_against_the_crops_at_load() -> None:
    """model.patch_size null: the student ViT keeps its architecture's 16-px patches, which 28-px crops do not tile;
    refused when the recipe loads, not at the first step."""
    vit = ["data.train=x", "distill.teacher=x", "model.arch=vit_tiny_patch16_224", "model.patch_size=null",
           "model.kwargs={depth: 1}"]
    with pytest.raises(ConfigError, match=r"crops.global_size=28 is not a multiple of 16, the patch size of "
                                          r"model.arch=vit_tiny_patch16_224"):
        load_config(REPO / "recipes/demo_distill.yaml", vit)
    fits = load_config(REPO / "recipes/demo_distill.yaml", [*vit, "crops.global_size=32", "eval.crop=32",
                                                            "eval.resize=32"])
    assert fits.crops.global_size == 32
