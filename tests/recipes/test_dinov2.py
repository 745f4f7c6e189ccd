"""DINOv2: KoLeo, Sinkhorn-Knopp, the combined loss, the batch masks, the parameter groups and the lr rule against
re-implementations written from facebookresearch/dinov2 (@b8931f7) and hand-computed values; the published and demo
recipes build, step, log their terms and run through the trainer."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from helpers import one_teacher_student_step
from lightly.loss.swav_loss import sinkhorn as lightly_swav_sinkhorn

from sslpipe.data.collate import mask_batch_fields
from sslpipe.engine.schedules import Schedules
from sslpipe.engine.trainer import train
from sslpipe.losses.dinov2 import DINOv2Loss
from sslpipe.losses.koleo import KoLeoLoss
from sslpipe.losses.sinkhorn import sinkhorn_knopp
from sslpipe.recipes import config_from_dict, get_recipe, load_config
from sslpipe.recipes.dinov2 import DINOv2Masks, DINOv2Recipe, dinov2_param_groups
from sslpipe.weights.export import load_backbone
from sslpipe.weights.run_export import export_run

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY = ["model.kwargs={embed_dim: 32, depth: 2, num_heads: 2, init_values: 1.0e-5}", "dinov2.head.out_dim=64",
        "dinov2.head.patch_out_dim=48", "dinov2.head.hidden_dim=32", "dinov2.head.bottleneck_dim=16", "crops.n_local=2",
        "crops.local_size=12"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ------------------------------------------------------------ references written from the official code
def official_koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """dinov2/loss/koleo_loss.py: normalise, nearest neighbour by the largest inner product (diagonal set to -1),
    -mean log(pairwise distance + eps)."""
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    dots = x @ x.t()
    dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
    neighbour = dots.max(dim=1).indices
    return -torch.log(torch.nn.PairwiseDistance(2, eps=1e-8)(x, x[neighbour]) + eps).mean()


def official_sinkhorn(logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """dinov2/loss/dino_clstoken_loss.py `sinkhorn_knopp_teacher` on one process (no max shift)."""
    q = torch.exp(logits / temp).t()
    K, B = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / K
        q = q / q.sum(dim=0, keepdim=True) / B
    return (q * B).t()


class OfficialMaskingGenerator:
    """dinov2/data/masking.py MaskingGenerator (BEiT's block masking, 4-patch minimum, per-block cap)."""

    def __init__(self, size: int, max_num_patches: float, min_num_patches: int = 4, min_aspect: float = 0.3):
        self.h = self.w = size
        self.min_num, self.max_num = min_num_patches, max_num_patches
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _one_block(self, mask: np.ndarray, limit: float) -> int:
        for _ in range(10):
            area = random.uniform(self.min_num, limit)
            aspect = math.exp(random.uniform(*self.log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if w < self.w and h < self.h:
                top, left = random.randint(0, self.h - h), random.randint(0, self.w - w)
                new = h * w - mask[top:top + h, left:left + w].sum()
                if 0 < new <= limit:
                    mask[top:top + h, left:left + w] = True
                    return int(new)
        return 0

    def __call__(self, n: int) -> np.ndarray:
        mask, count = np.zeros((self.h, self.w), dtype=bool), 0
        while count < n:
            delta = self._one_block(mask, min(n - count, self.max_num))
            if delta == 0:
                break
            count += delta
        return mask


def official_collate_masks(n_crops: int, size: int, patch: int, ratio=(0.1, 0.5), probability=0.5) -> torch.Tensor:
    """dinov2/data/collate.py `collate_data_and_cast` masks, with train/train.py's generator settings."""
    generator = OfficialMaskingGenerator(size // patch, max_num_patches=0.5 * size // patch * size // patch)
    n_tokens = (size // patch) ** 2
    n_masked = int(n_crops * probability)
    bins = torch.linspace(*ratio, n_masked + 1)
    masks = [torch.BoolTensor(generator(int(n_tokens * random.uniform(bins[i], bins[i + 1]))))
             for i in range(n_masked)]
    masks += [torch.BoolTensor(generator(0)) for _ in range(n_masked, n_crops)]
    random.shuffle(masks)
    return torch.stack(masks)


def official_dinov2_loss(s_cls, s_local, t_cls, s_patch, t_patch, masks, s_tokens, temp, centering,
                         center=None, center2=None):
    """dinov2/train/ssl_meta_arch.py `forward_backward` (2 global crops) with the losses of dinov2/loss/*.py:
    teacher CLS swapped so crop A meets crop B, local and global DINO terms over (2 + 2 n_local) pairs, the iBOT
    patch term scaled by 2 * 1/2, KoLeo 0.1 * sum over the two global crops."""
    n_local = s_local.shape[0] // (s_cls.shape[0] // 2)
    a, b = t_cls.chunk(2)
    t = torch.cat((b, a))
    if centering == "softmax":
        t_sm = F.softmax((t - center) / temp, dim=-1)
        t_patch_sm = F.softmax((t_patch.unsqueeze(0) - center2) / temp, dim=-1).squeeze(0)
    else:
        t_sm, t_patch_sm = official_sinkhorn(t, temp), official_sinkhorn(t_patch, temp)
    t_list = t_sm.view(2, -1, t_sm.shape[-1])

    def dino(students, teachers):
        total = 0
        for s in students:
            lsm = F.log_softmax(s / 0.1, dim=-1)
            for tt in teachers:
                total = total - (tt * lsm).sum(dim=-1).mean()
        return total

    terms = 2 + max(n_local * 2, 1)
    dino_loss = dino(s_local.chunk(n_local), t_list) / terms + dino([s_cls], [t_list.flatten(0, 1)]) * 2 / terms
    koleo = 0.1 * sum(official_koleo(p) for p in s_tokens.chunk(2))
    per_patch = (t_patch_sm * F.log_softmax(s_patch / 0.1, dim=-1)).sum(dim=-1)
    weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    ibot = -(per_patch * weight).sum() / masks.shape[0] * 2 * 0.5
    return dino_loss + koleo + ibot, dino_loss, ibot, koleo


# -------------------------------------------------------------------------------------------------- KoLeo
def test_koleo_hand_computed_and_equal_to_official():
    # three directions at 0, 90 and 180 degrees (any length): every nearest neighbour is sqrt(2) away
    x = torch.tensor([[3.0, 0.0], [0.0, 0.5], [-2.0, 0.0]])
    assert KoLeoLoss()(x).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-6)
    # 0, 60 and 180 degrees: neighbours at distance 1 (0 <-> 60) and sqrt(3) (180 -> 60)
    y = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [-1.0, 0.0]])
    assert KoLeoLoss()(y).item() == pytest.approx(-(0 + 0 + math.log(math.sqrt(3))) / 3, abs=1e-6)
    torch.manual_seed(0)
    feats = torch.randn(2 * 16, 24)
    a, b = feats.chunk(2)
    got = KoLeoLoss()(feats, n_crops=2)  # per crop, summed: never between the two crops of one image
    assert got.item() == pytest.approx((official_koleo(a) + official_koleo(b)).item(), rel=1e-6)
    assert got.item() != pytest.approx(official_koleo(feats).item(), rel=1e-3)
    with pytest.raises(ValueError, match="B >= 2"):
        KoLeoLoss()(torch.randn(2, 4), n_crops=2)


# ------------------------------------------------------------------------------------------ Sinkhorn-Knopp
def test_sinkhorn_equals_official_and_lightly_and_balances():
    torch.manual_seed(0)
    logits = torch.randn(12, 7) * 0.5
    got = sinkhorn_knopp(logits, 0.07)
    torch.testing.assert_close(got, official_sinkhorn(logits, 0.07), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got, lightly_swav_sinkhorn(logits.clone(), iterations=3, epsilon=0.07),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(12))  # each row a distribution
    softmax = F.softmax(logits / 0.07, dim=-1)
    # the prototypes' shares move from the softmax's towards the uniform 1/K, and reach it as iterations go on
    assert (got.mean(0) - 1 / 7).abs().max() < 0.5 * (softmax.mean(0) - 1 / 7).abs().max()
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.07, n_iterations=200).mean(0), torch.full((7,), 1 / 7),
                               rtol=0, atol=1e-4)
    equal = sinkhorn_knopp(torch.full((5, 4), 0.3), 0.04)
    torch.testing.assert_close(equal, torch.full((5, 4), 0.25))


def test_sinkhorn_stays_finite_where_the_official_code_overflows():
    torch.manual_seed(1)
    logits = 4.0 + torch.rand(6, 5)  # exp(5 / 0.04) overflows float32
    assert not torch.isfinite(official_sinkhorn(logits, 0.04)).all()
    got = sinkhorn_knopp(logits, 0.04)
    torch.testing.assert_close(got.double(), official_sinkhorn(logits.double(), 0.04), rtol=1e-5, atol=1e-9)


SINKHORN_RANK = """
import sys, torch, torch.distributed as dist
from sslpipe.losses.sinkhorn import sinkhorn_knopp
rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
torch.manual_seed(0)
logits = torch.randn(11, 6) * 0.3
torch.save(sinkhorn_knopp(logits[:4] if rank == 0 else logits[4:], 0.05), out + "." + str(rank))
dist.destroy_process_group()
"""


def test_sinkhorn_over_processes_with_different_row_counts_equals_one_process(tmp_path: Path):
    """Two gloo processes holding 4 and 7 of 11 teacher rows (masked patch counts differ per process)."""
    import subprocess
    import sys

    from helpers import child_env

    args = [str(tmp_path / "store"), str(tmp_path / "q")]
    procs = [subprocess.Popen([sys.executable, "-c", SINKHORN_RANK, str(rank), *args],
                              env=child_env(OMP_NUM_THREADS="1")) for rank in (0, 1)]
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0]
    torch.manual_seed(0)
    logits = torch.randn(11, 6) * 0.3
    parts = torch.cat([torch.load(tmp_path / f"q.{rank}") for rank in (0, 1)])
    torch.testing.assert_close(parts, official_sinkhorn(logits, 0.05), rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------------------- the DINOv2 loss
def _loss_case(n_local: int = 3):
    torch.manual_seed(0)
    B, K, Kp, N, D = 4, 10, 6, 9, 8
    masks = torch.zeros(2 * B, N, dtype=torch.bool)
    masks[0, [1, 2]] = True
    masks[3, [0, 4, 5, 8]] = True
    masks[6, 7] = True  # 5 crops unmasked: they count in the divisor, as in the official forward_masked
    M = int(masks.sum())
    return {"B": B, "K": K, "Kp": Kp, "masks": masks, "s_cls": torch.randn(2 * B, K),
            "s_local": torch.randn(n_local * B, K), "t_cls": torch.randn(2 * B, K), "s_patch": torch.randn(M, Kp),
            "t_patch": torch.randn(M, Kp), "s_tokens": torch.randn(2 * B, D)}


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "softmax"])
def test_dinov2_loss_equals_the_official_forward(centering: str):
    d = _loss_case()
    loss_fn = DINOv2Loss(d["K"], d["Kp"], n_global=2, n_local=3, centering=centering)
    if centering == "softmax":
        loss_fn.center.copy_(torch.randn(1, d["K"]))
        loss_fn.center2.copy_(torch.randn(1, 1, d["Kp"]))
    out = loss_fn(d["s_cls"], d["t_cls"], d["s_patch"], d["t_patch"], d["masks"], d["s_tokens"], 0.05,
                  student_local_cls=d["s_local"])
    total, dino, ibot, koleo = official_dinov2_loss(d["s_cls"], d["s_local"], d["t_cls"], d["s_patch"], d["t_patch"],
                                                    d["masks"], d["s_tokens"], 0.05, centering,
                                                    loss_fn.center, loss_fn.center2)
    assert out["dino"].item() == pytest.approx(dino.item(), rel=1e-5)
    assert out["ibot"].item() == pytest.approx(ibot.item(), rel=1e-5)
    assert 0.1 * out["koleo"].item() == pytest.approx(koleo.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)


def test_dinov2_loss_patch_term_by_hand_and_gradients():
    d = _loss_case()
    loss_fn = DINOv2Loss(d["K"], d["Kp"], n_global=2, n_local=3, centering="softmax", dino_weight=0.0,
                         koleo_weight=0.0)
    s_patch = d["s_patch"].clone().requires_grad_()
    t_patch = d["t_patch"].clone().requires_grad_()
    out = loss_fn(d["s_cls"], d["t_cls"], s_patch, t_patch, d["masks"], d["s_tokens"], 0.04,
                  student_local_cls=d["s_local"])
    # rows of s_patch follow masks.nonzero(): crop 0 holds 2 masked patches, crop 3 four, crop 6 one
    owner = [0, 0, 3, 3, 3, 3, 6]
    count = {0: 2, 3: 4, 6: 1}
    want = 0.0
    for row, crop in enumerate(owner):
        p = F.softmax(d["t_patch"][row] / 0.04, dim=-1)
        want += -(p * F.log_softmax(d["s_patch"][row] / 0.1, dim=-1)).sum().item() / count[crop]
    assert out["ibot"].item() == pytest.approx(want / 8, rel=1e-5)  # / (2 global crops x 4 images)
    assert out["loss"].item() == pytest.approx(out["ibot"].item(), rel=1e-6)
    out["loss"].backward()
    assert t_patch.grad is None and s_patch.grad.abs().sum() > 0


def test_softmax_centres_follow_the_official_update():
    d = _loss_case()
    loss_fn = DINOv2Loss(d["K"], d["Kp"], n_global=2, n_local=3, centering="softmax")
    c1, c2 = torch.randn(1, d["K"]), torch.randn(1, 1, d["Kp"])
    loss_fn.center.copy_(c1)
    loss_fn.center2.copy_(c2)
    loss_fn.record_center(d["t_cls"], d["t_patch"])
    loss_fn.update_center()
    torch.testing.assert_close(loss_fn.center, 0.9 * c1 + 0.1 * d["t_cls"].mean(0, keepdim=True))
    # DINOv2's patch centre: the mean over the MASKED teacher tokens (iBOT's: each image's mean over all patches)
    torch.testing.assert_close(loss_fn.center2, 0.9 * c2 + 0.1 * d["t_patch"].mean(0).view(1, 1, -1))
    sk = DINOv2Loss(d["K"], d["Kp"], n_global=2, n_local=3, centering="sinkhorn_knopp")
    sk.record_center(d["t_cls"], d["t_patch"])
    sk.update_center()
    assert not sk.center.any() and not sk.center2.any(), "Sinkhorn-Knopp keeps no centre"


# ------------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("size, patch, n_crops", [(224, 14, 32), (32, 4, 64)])
def test_batch_masks_equal_the_official_collate(size: int, patch: int, n_crops: int):
    grid = size // patch
    random.seed(3)
    want = official_collate_masks(n_crops, size, patch)
    random.seed(3)
    got = DINOv2Masks((grid, grid))(n_crops)
    assert got.shape == (n_crops, grid, grid) and got.dtype == torch.bool
    assert torch.equal(got, want)
    counts = got.flatten(1).sum(1)
    assert int((counts > 0).sum()) == n_crops // 2  # exactly half the crops masked
    assert counts.max() <= grid * grid // 2 and counts[counts > 0].min() >= 1
    # the collate's companions of the masks: flat indices of the masked tokens and 1 / #masked of their crop
    fields = mask_batch_fields(got)
    flat = want.flatten(1)
    assert torch.equal(fields["mask_indices"], flat.flatten().nonzero().flatten())
    torch.testing.assert_close(fields["masks_weight"],
                               (1 / flat.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(flat)[flat])


def test_batch_masks_refuse_ratios_above_the_official_cap():
    with pytest.raises(ValueError, match="at most 0.5 on this grid"):
        DINOv2Masks((8, 8), ratio_min_max=(0.1, 0.7))
    # an odd grid height caps lower: (7 // 2) * 7 = 21 of 49 patches, so the published 0.5 is refused with the
    # ratio that fits, and that ratio is accepted
    with pytest.raises(ValueError, match=r"cap of 21 patches .* at most 0\.428 on this grid"):
        DINOv2Masks((7, 7), ratio_min_max=(0.1, 0.5))
    assert DINOv2Masks((7, 7), ratio_min_max=(0.1, 0.428))(4).flatten(1).sum(1).max() <= 21


# -------------------------------------------------------------------------- optimiser groups and lr rule
def official_lr_multiplier(name: str, num_layers: int, decay: float, patch_mult: float) -> float:
    """dinov2/utils/param_groups.py for a parameter of the backbone submodule (names without a prefix)."""
    layer_id = num_layers + 1
    if any(k in name for k in ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")):
        layer_id = 0
    elif "blocks." in name:
        layer_id = int(name[name.find("blocks."):].split(".")[1]) + 1
    rate = decay ** (num_layers + 1 - layer_id)
    return rate * patch_mult if "patch_embed" in name else rate


def test_param_groups_follow_dinov2_layer_decay_and_weight_decay(digits_shards: Path):
    kwargs = "{embed_dim: 32, depth: 3, num_heads: 2, init_values: 1.0e-5, reg_tokens: 2, no_embed_class: true}"
    cfg = load_config(RECIPES / "demo_dinov2.yaml", [f"data.train={digits_shards}", f"model.kwargs={kwargs}"])
    recipe = DINOv2Recipe(cfg)
    recipe.build(Accelerator(cpu=True))
    groups = dinov2_param_groups(recipe.student, layerwise_decay=0.9, patch_embed_lr_mult=0.2)
    of = {id(p): (g["lr_scale"], g["apply_wd"]) for g in groups for p in g["params"]}
    names = dict(recipe.student.named_parameters())
    assert len(of) == sum(p.requires_grad for p in names.values())
    for name, param in names.items():
        official_name = name.removeprefix("backbone.vit.").removeprefix("backbone.").replace("reg_token",
                                                                                              "register_tokens")
        want = (official_lr_multiplier(official_name, 3, 0.9, 0.2) if name.startswith("backbone.") else 1.0,
                not (name.endswith("bias") or "norm" in name or "gamma" in name))  # param_groups.py
        assert of[id(param)][0] == pytest.approx(want[0]) and of[id(param)][1] == want[1], name
    assert of[id(names["backbone.vit.patch_embed.proj.weight"])][0] == pytest.approx(0.9 ** 4 * 0.2)
    assert of[id(names["backbone.vit.blocks.2.ls2.gamma"])] == (pytest.approx(0.9), False)
    assert of[id(names["backbone.vit.cls_token"])] == (pytest.approx(0.9 ** 4), True)


def test_uniform_drop_path_and_layerscale_init(digits_shards: Path):
    cfg = load_config(RECIPES / "demo_dinov2.yaml", [f"data.train={digits_shards}", *TINY,
                                                     "model.drop_path_rate=0.2"])
    recipe = DINOv2Recipe(cfg)
    recipe.build(Accelerator(cpu=True))
    blocks = recipe.student.backbone.vit.blocks
    assert [b.drop_path1.drop_prob for b in blocks] == [0.2, 0.2] == [b.drop_path2.drop_prob for b in blocks]
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in recipe.teacher.backbone.vit.blocks)
    assert torch.allclose(blocks[0].ls1.gamma, torch.full_like(blocks[0].ls1.gamma, 1e-5))
    assert recipe.teacher.backbone.mask_token is None and recipe.student.ibot_head is not None


def test_shared_head_and_softmax_centering_in_the_recipe(digits_shards: Path):
    """ssl_default_config.yaml's variant: the CLS head also maps the patches, softmax centering with centres."""
    overrides = [f"data.train={digits_shards}", "data.batch_size=4", "data.num_workers=0", *TINY,
                 "dinov2.separate_head=false", "dinov2.centering=softmax"]
    with pytest.raises(ValueError, match="dinov2.head.patch_out_dim"):
        DINOv2Recipe(load_config(RECIPES / "demo_dinov2.yaml", overrides)).build(Accelerator(cpu=True))
    recipe = DINOv2Recipe(load_config(RECIPES / "demo_dinov2.yaml", [*overrides, "dinov2.head.patch_out_dim=64"]))
    recipe.build(Accelerator(cpu=True))
    assert recipe.student.ibot_head is None and "ibot_head.mlp.0.weight" not in recipe.student.state_dict()
    batch = next(iter(recipe.train_loader(0, 0, 1)))
    loss, metrics = recipe.step(batch, {"teacher_temp": 0.04, "it": 0})
    assert torch.isfinite(loss) and float(metrics["loss_ibot"]) > 0
    assert not recipe.loss.center.any(), "the centres move after the optimizer step, once per step"
    recipe.after_optimizer_step({"momentum": 0.996})
    assert recipe.loss.center.abs().sum() > 0 and recipe.loss.center2.abs().sum() > 0, "the centres moved"


@pytest.mark.parametrize("overrides, match", [
    (["dinov2.loss.center_momentum=0.8"], r"'dinov2.loss.center_momentum' = 0.8 is not read with "
                                          r"dinov2.centering=sinkhorn_knopp"),
    (["dinov2.centering=softmax", "dinov2.sinkhorn_iterations=5"],
     r"'dinov2.sinkhorn_iterations' = 5 is not read with dinov2.centering=softmax"),
    (["dinov2.separate_head=false", "dinov2.ibot_nlayers=2"],
     r"'dinov2.ibot_nlayers' = 2 is not read with dinov2.separate_head=false"),
])
def test_dinov2_keys_its_settings_leave_unread_are_refused(overrides: list[str], match: str) -> None:
    from sslpipe.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(RECIPES / "demo_dinov2.yaml", ["data.train=x", *overrides])
    # the settings that read them
    cfg = load_config(RECIPES / "demo_dinov2.yaml", ["data.train=x", "dinov2.centering=softmax",
                                                     "dinov2.loss.center_momentum=0.8", "dinov2.ibot_nlayers=2"])
    assert cfg.dinov2.loss.center_momentum == 0.8 and cfg.dinov2.ibot_nlayers == 2


def test_sqrt_lr_rule_of_dinov2():
    base = {"method": "dinov2", "data": {"train": "x", "batch_size": 64}, "train": {"epochs": 3},
            "optim": {"lr": 4e-3, "lr_scaling": "sqrt_wrt_1024"}}
    cfg = config_from_dict(base)
    assert Schedules(cfg, steps_per_epoch=5, world_size=16).base_lr == pytest.approx(4e-3)  # batch 1024
    assert Schedules(cfg, steps_per_epoch=5, world_size=1).base_lr == pytest.approx(4e-3 * math.sqrt(64 / 1024))


# ------------------------------------------------------------------------------------------------ recipes
def _one_step(cfg) -> tuple[DINOv2Recipe, torch.Tensor, dict]:
    recipe = get_recipe(cfg.method)(cfg)
    assert isinstance(recipe, DINOv2Recipe)
    loss, metrics = one_teacher_student_step(recipe, momentum=0.99)
    assert recipe.student.ibot_head.last_layer.parametrizations.weight.original1.grad is not None
    return recipe, loss, metrics


def test_gpu_quality_recipe_is_the_demo_network_on_the_whole_set_and_steps(digits_shards: Path) -> None:
    """recipes/gpu_fmnist_dinov2.yaml (issue 36): the demo's network and loss settings; batch 256 over full epochs,
    30 of them, bf16, kNN on the full splits. It builds and takes a step here (fp32 on the CPU)."""
    demo, gpu = load_config(RECIPES / "demo_dinov2.yaml"), load_config(RECIPES / "gpu_fmnist_dinov2.yaml")
    assert gpu.model == demo.model and gpu.crops == demo.crops
    assert gpu.dinov2.head == demo.dinov2.head and gpu.dinov2.mask_ratio_min_max == demo.dinov2.mask_ratio_min_max
    assert (gpu.data.batch_size, gpu.data.steps_per_epoch, gpu.train.epochs, gpu.train.mixed_precision) == \
        (256, None, 30, "bf16")
    assert (gpu.eval.max_train, gpu.eval.max_val, gpu.eval.every_epochs) == (None, None, 10)
    cfg = load_config(RECIPES / "gpu_fmnist_dinov2.yaml", [f"data.train={digits_shards}", "data.batch_size=4",
                                                          "data.num_workers=0", "train.mixed_precision=no"])
    _, loss, _ = _one_step(cfg)
    assert torch.isfinite(loss)


@pytest.mark.slow
def test_published_dinov2_vit_small_builds_and_steps(digits_shards: Path) -> None:
    cfg = load_config(RECIPES / "dinov2_vit_small.yaml", [f"data.train={digits_shards}", "data.batch_size=2",
                                                         "data.num_workers=0", "data.shuffle_buffer=4"])
    d = cfg.dinov2
    assert (d.centering, d.separate_head, d.koleo_loss_weight, tuple(d.mask_ratio_min_max)) == \
        ("sinkhorn_knopp", True, 0.1, (0.1, 0.5))
    assert (cfg.optim.lr, cfg.optim.lr_scaling, cfg.dinov2.momentum_teacher, cfg.optim.weight_decay_end,
            d.layerwise_decay, d.patch_embed_lr_mult) == (4e-3, "sqrt_wrt_1024", 0.992, 0.4, 0.9, 0.2)
    recipe, _, metrics = _one_step(cfg)
    vit = recipe.student.backbone.vit
    assert (vit.embed_dim, len(vit.blocks), vit.patch_embed.patch_size) == (384, 12, (14, 14))
    assert cfg.model.kwargs["init_values"] == 1e-5 and vit.blocks[0].ls1.gamma.shape == (384,)  # LayerScale
    assert recipe.patch_grid() == (16, 16) and (cfg.crops.global_size, cfg.crops.local_size) == (224, 98)
    assert recipe.student.dino_head.last_layer.out_features == 65536
    assert recipe.student.ibot_head.last_layer.out_features == 65536
    assert {"loss_dino", "loss_ibot", "loss_koleo"} <= set(metrics)


def test_demo_dinov2_steps_and_logs_each_term(digits_shards: Path) -> None:
    torch.set_num_threads(1)
    cfg = load_config(RECIPES / "demo_dinov2.yaml", [f"data.train={digits_shards}", "data.batch_size=8",
                                                     "data.num_workers=0", "train.health_every=1"])
    recipe, loss, metrics = _one_step(cfg)
    assert recipe.patch_grid() == (7, 7)  # 28 px crops, 4 px patches
    terms = {k: float(metrics[k]) for k in ("loss_dino", "loss_ibot", "loss_koleo")}
    assert all(math.isfinite(v) and v != 0.0 for v in terms.values())
    assert float(loss) == pytest.approx(terms["loss_dino"] + terms["loss_ibot"] + 0.1 * terms["loss_koleo"], rel=1e-5)
    assert 0.0 < metrics["mask_ratio"] <= 0.25 and "teacher_patch_entropy" in metrics
    assert {"rankme/teacher", "prototype_usage"} <= set(metrics)


def test_demo_dinov2_trains_with_registers_exports_and_checkpoints_its_state(digits_shards: Path, tmp_path: Path,
                                                                     monkeypatch) -> None:
    """The real trainer on digits (3 steps, tiny network with 2 register tokens): each loss term is logged, the
    teacher exports and loads back in timm, the checkpoint holds the teacher and the loss state."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    torch.set_num_threads(1)
    kwargs = "{embed_dim: 32, depth: 2, num_heads: 2, init_values: 1.0e-5, reg_tokens: 2, no_embed_class: true}"
    run = train(load_config(RECIPES / "demo_dinov2.yaml", [
        f"data.train={digits_shards}", "data.batch_size=8", "data.num_workers=0", "data.steps_per_epoch=3",
        "train.epochs=1", "train.log_every=1", "train.health_every=0", f"output_dir={tmp_path}", "run_name=dv2",
        *TINY[1:], f"model.kwargs={kwargs}"]))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all({"loss_dino", "loss_ibot", "loss_koleo"} <= set(r) for r in steps)
    model = load_backbone(export_run(run, which="teacher"))
    assert model.num_prefix_tokens == 3 and model(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    from safetensors.torch import load_file

    state = load_file(str(run / "checkpoints" / "step_00000003" / "extra_state.safetensors"))
    assert {"loss.center", "loss.center2", "teacher.ibot_head.mlp.0.weight"} <= set(state)


def test_bench_step_times_the_dinov2_recipe() -> None:
    from sslpipe.bench.step import run_step_bench

    torch.set_num_threads(1)
    r = run_step_bench(str(RECIPES / "demo_dinov2.yaml"), device="cpu", batch_size=4, steps=1, warmup=1,
                       overrides=TINY)
    assert r["ours_ms"] > 0 and r["bare_ms"] > 0
    assert r["gflop_per_image_ours"] > r["gflop_per_image_bare"] > 0
    assert r["crops"] == "2x28 + 2x12"
