"""Static shapes for a compiled DINOv2 step (issue 36). `dinov2.pad_masked_patches`: every batch's masked-patch
indices padded to the mask sampler's bound with weight 0, so that a step's shapes do not change from batch to batch.
The bound is checked by hand, the padded loss against the unpadded one (both centerings, values, gradients, centres),
and the point of it with a counting compile backend: the padded step compiles once, the unpadded one again for every
new mask count. `train.compile_scope: step` compiles the forwards and the loss as one graph: the eager losses, no
recompile as the teacher temperature changes, and the refusals.
"""
from __future__ import annotations

import contextlib
import random

import pytest
import torch
from accelerate import Accelerator
from helpers import REPO
from torch._dynamo import register_backend
from torch._dynamo.backends.registry import lookup_backend

from sslpipe.bench.step import prepared_step, synthetic_batch
from sslpipe.data.collate import mask_batch_fields
from sslpipe.engine.trainer import train_step
from sslpipe.losses.dinov2 import DINOv2Loss
from sslpipe.losses.sinkhorn import sinkhorn_knopp
from sslpipe.recipes import get_recipe, load_config
from sslpipe.recipes.dinov2 import DINOv2Masks


def test_padding_repeats_the_last_masked_position_with_weight_zero() -> None:
    masks = torch.zeros(3, 2, 2, dtype=torch.bool)
    masks[0, 0, 1] = masks[2, 1, 0] = masks[2, 1, 1] = True  # flattened positions 1, 10, 11
    fields = mask_batch_fields(masks, pad_to=6)
    assert fields["mask_indices"].tolist() == [1, 10, 11, 11, 11, 11]
    assert fields["masks_weight"].tolist() == [1.0, 0.5, 0.5, 0.0, 0.0, 0.0]
    assert mask_batch_fields(torch.zeros(2, 2, 2, dtype=torch.bool), pad_to=2)["mask_indices"].tolist() == [0, 0]
    with pytest.raises(ValueError, match="pad_to=2"):
        mask_batch_fields(masks, pad_to=2)


def test_upper_bound_by_hand_and_never_exceeded() -> None:
    sampler = DINOv2Masks((14, 14), (0.1, 0.5), probability=0.5, rng=random.Random(0))
    # 8 crops: 4 masked, bins [0.1, 0.2, 0.3, 0.4, 0.5]; int(196 x top of each bin) = 39 + 58 + 78 + 98
    assert sampler.upper_bound(8) == 273
    assert sampler.upper_bound(1) == 0
    for n_crops in (2, 5, 8, 16):
        bound = sampler.upper_bound(n_crops)
        for _ in range(20):
            fields = sampler.fields(n_crops, pad=True)
            assert fields["mask_indices"].shape == fields["masks_weight"].shape == (bound,)
            assert int(fields["masks"].sum()) == int((fields["masks_weight"] > 0).sum()) <= bound


def test_sinkhorn_leaves_the_padding_out() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 11, generator=g) * 3
    valid = torch.tensor([True, True, False, True, True, False, True])
    got = sinkhorn_knopp(logits, 0.1, 3, valid=valid)
    torch.testing.assert_close(got[valid], sinkhorn_knopp(logits[valid], 0.1, 3), rtol=1e-5, atol=1e-7)
    assert torch.equal(got[~valid], torch.zeros(2, 11))
    none = sinkhorn_knopp(logits, 0.1, 3, valid=torch.zeros(7, dtype=torch.bool))
    assert torch.equal(none, torch.zeros(7, 11))  # no counted row: zeros, not NaN


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "softmax"])
def test_padded_loss_equals_the_unpadded_one(centering: str) -> None:
    g = torch.Generator().manual_seed(1)
    G, B, N, K, Kp, D = 2, 4, 16, 32, 24, 8
    sampler = DINOv2Masks((4, 4), (0.1, 0.5), probability=0.5, rng=random.Random(3))
    masks = sampler(G * B)
    plain = mask_batch_fields(masks)
    padded = mask_batch_fields(masks, pad_to=sampler.upper_bound(G * B))
    M, U = plain["mask_indices"].numel(), padded["mask_indices"].numel()
    assert 0 < M < U
    patch_s, patch_t = torch.randn(G * B * N, Kp, generator=g), torch.randn(G * B * N, Kp, generator=g) * 2
    common = dict(student_cls=torch.randn(G * B, K, generator=g), teacher_cls=torch.randn(G * B, K, generator=g),
                  student_cls_tokens=torch.randn(G * B, D, generator=g), teacher_temp=0.07,
                  student_local_cls=torch.randn(3 * B, K, generator=g), masks=masks.flatten(1))
    results = []
    for fields in (plain, padded):
        loss_fn = DINOv2Loss(K, Kp, n_global=G, n_local=3, centering=centering, padded_rows=fields is padded)
        student = patch_s.index_select(0, fields["mask_indices"]).requires_grad_()
        teacher = patch_t.index_select(0, fields["mask_indices"])
        out = loss_fn(student_patch=student, teacher_patch=teacher, masks_weight=fields["masks_weight"], **common)
        out["loss"].backward()
        loss_fn.record_center(common["teacher_cls"], teacher, fields["masks_weight"])
        loss_fn.update_center()
        results.append((out, student.grad, loss_fn.center2.clone()))
    (out_p, grad_p, c2_p), (out_q, grad_q, c2_q) = results
    for key in ("loss", "dino", "ibot", "koleo"):
        torch.testing.assert_close(out_q[key], out_p[key], rtol=1e-5, atol=1e-6)
    assert out_p["ibot"] > 0
    torch.testing.assert_close(grad_q[:M], grad_p, rtol=1e-5, atol=1e-7)
    assert torch.equal(grad_q[M:], torch.zeros(U - M, Kp))
    if centering == "sinkhorn_knopp":  # the control: not told of the padding, Sinkhorn-Knopp balances it too
        blind = DINOv2Loss(K, Kp, n_global=G, n_local=3, centering=centering)(
            student_patch=patch_s.index_select(0, padded["mask_indices"]),
            teacher_patch=patch_t.index_select(0, padded["mask_indices"]), masks_weight=padded["masks_weight"],
            **common)
        assert abs(float(blind["ibot"].detach()) - float(out_p["ibot"].detach())) > 1e-3
    if centering == "softmax":  # Sinkhorn-Knopp keeps no centre
        assert c2_p.abs().sum() > 0
        torch.testing.assert_close(c2_q, c2_p, rtol=1e-5, atol=1e-7)


class CountingBackend:
    """A torch.compile backend that runs the captured graphs as they are and counts them: one per compiled frame."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("pad", [True, False])
def test_padded_step_compiles_once(pad: bool, trainer_device: str, fresh_accelerate_state: None) -> None:
    """The control (pad False) must recompile, or the test would prove nothing."""
    cfg = load_config(REPO / "recipes" / "demo_dinov2.yaml",
                      ["data.batch_size=4", "train.health_every=0", "model.kwargs.depth=1",
                       f"dinov2.pad_masked_patches={str(pad).lower()}"])
    recipe = get_recipe(cfg.method)(cfg)
    recipe.build(Accelerator(cpu=trainer_device == "cpu"))
    recipe.student.to(trainer_device)
    sched = {"teacher_temp": 0.04, "it": 5.0}
    backend = CountingBackend()
    torch._dynamo.reset()
    step = torch.compile(lambda batch: recipe.step(batch, sched)[0], backend=backend, dynamic=False)
    counts, n_masked = [], set()
    for seed in range(4):
        batch = synthetic_batch(cfg, recipe, 4, seed=seed)
        n_masked.add(int(batch["masks"].sum()))
        step(batch).backward()
        counts.append(backend.graphs)
    torch._dynamo.reset()
    assert len(n_masked) > 1  # the batches' mask counts differ
    if pad:
        assert counts == [counts[0]] * 4, counts
    else:
        assert counts[-1] > counts[0], counts


GRAPHS: list[str] = []


@register_backend
def sslpipe_test_counting_aot_eager(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    """aot_eager (the graphs and autograd of inductor's path, without its code generation), counting the graphs."""
    GRAPHS.append(gm.__class__.__name__)
    return lookup_backend("aot_eager")(gm, example_inputs)


def _trainer_run(recipe_name: str, device: str, overrides: list[str], steps: int = 3
                 ) -> tuple[list[float], dict[str, float], list[int]]:
    """`train_step` over `steps` batches, the teacher temperature changing each step, health metrics every step:
    the losses, the last step's metrics and the graphs compiled so far after each step. From the second step on a
    recompile is an error."""
    method = recipe_name.removeprefix("demo_").removesuffix(".yaml")
    cfg, dev, accelerator, recipe, optimizer, sched = prepared_step(
        str(REPO / "recipes" / recipe_name), device=device, batch_size=4,
        overrides=["train.health_every=1", "model.kwargs.depth=2", f"{method}.pad_masked_patches=true", *overrides])
    assert cfg.train.mixed_precision in (None, "no")  # fp32: the teacher's logits are the tensors the metrics read
    losses, graphs, metrics = [], [], {}
    GRAPHS.clear()
    with contextlib.ExitStack() as stack:
        for i in range(steps):
            if i == 1:
                stack.enter_context(torch._dynamo.config.patch(error_on_recompile=True))
            step_sched = {**sched, "teacher_temp": 0.04 + 0.01 * i}
            batch = synthetic_batch(cfg, recipe, 4, seed=i)
            loss, metrics = train_step(accelerator, recipe, optimizer, [batch], step_sched, cfg)
            losses.append(float(loss[0]))
            graphs.append(len(GRAPHS))
    return losses, {k: float(v) for k, v in metrics.items()}, graphs


MULTI_CROP = ["crops.global_size=32", "crops.local_size=16", "crops.n_local=4", "dinov2.mask_ratio_min_max=[0.1,0.5]"]


@pytest.mark.parametrize("recipe, extra", [
    ("demo_dinov2.yaml", []),
    ("demo_dinov2.yaml", [*MULTI_CROP, "dinov2.pack_crops=true"]),
    ("demo_dinov3.yaml", ["dinov3.gram.load_at=0"]),  # Gram anchoring from the first step, eager after the graph
], ids=["dinov2", "dinov2-multicrop-packed", "dinov3-gram"])
def test_whole_step_compile_gives_the_eager_step_and_compiles_once(recipe: str, extra: list[str],
                                                                   device: str) -> None:
    """`train.compile_scope: step` over three trainer steps whose teacher temperature changes: compiled at the first
    step and never again, the eager run's losses and health metrics (which read the teacher's logits after the loss
    has used them)."""
    torch._dynamo.reset()
    losses, metrics, graphs = _trainer_run(recipe, device, ["train.compile=true", "train.compile_scope=step",
                                                            "train.compile_backend=sslpipe_test_counting_aot_eager",
                                                            *extra])
    torch._dynamo.reset()
    eager_losses, eager_metrics, eager_graphs = _trainer_run(recipe, device, extra)
    assert graphs[0] >= 1 and graphs == [graphs[0]] * 3, graphs
    assert eager_graphs == [0, 0, 0]
    assert len(set(eager_losses)) == 3
    torch.testing.assert_close(losses, eager_losses, rtol=1e-4, atol=1e-5)
    assert {"teacher_entropy", "teacher_patch_entropy", "loss_ibot"} <= set(metrics) == set(eager_metrics)
    assert ("loss_gram" in metrics) == (recipe == "demo_dinov3.yaml")
    for key, value in eager_metrics.items():
        assert value == pytest.approx(metrics[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("recipe, overrides, message", [
    ("demo_dinov2.yaml", ["train.compile=true", "train.compile_scope=step"], "dinov2.pad_masked_patches=true"),
    ("demo_ibot.yaml", ["train.compile=true", "train.compile_scope=step"], "set train.compile_scope=blocks"),
    ("demo_dinov2.yaml", ["train.compile_scope=step"], "set train.compile=true"),
])
def test_whole_step_compile_refusals(recipe: str, overrides: list[str], message: str,
                                     fresh_accelerate_state: None) -> None:
    with pytest.raises(ValueError, match=message):
        cfg = load_config(REPO / "recipes" / recipe, overrides)
        get_recipe(cfg.method)(cfg).build(Accelerator(cpu=True))
