"""Crop packing (`<method>.pack_crops`, sslpipe/models/packed_crops.py): the student's crops of both sizes in one pass
of the blocks, attention inside each crop, give what the per-size forwards give."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers import DEVICES

from sslpipe.models.packed_crops import CropAttention, CropLayout
from sslpipe.recipes import get_recipe, load_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
KWARGS = "{embed_dim: 32, depth: 2, num_heads: 2, init_values: 0.1, reg_tokens: 2}"


def _student_outputs(method: str, student: torch.nn.Module, global_crops: torch.Tensor, local_crops: torch.Tensor,
                     masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    indices = masks.flatten().nonzero().flatten()
    if method == "dino":
        return student(global_crops, local_crops)
    if method in ("dinov2", "dinov3"):
        return student(global_crops, masks, indices, local_crops)
    return student(global_crops, masks, local_crops, mask_indices=indices)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe, method, extra", [
    ("demo_dino.yaml", "dino", []),
    ("demo_dinov2.yaml", "dinov2", []),
    ("demo_ibot.yaml", "ibot", []),
    ("demo_dinov3.yaml", "dinov3", ["model.arch=vit_tiny_patch16_224"]),  # DINOv3 on a learned-position ViT
])
def test_packed_crops_equal_the_per_size_forwards(digits_shards: Path, recipe: str, method: str, extra: list[str],
                                                  device: str) -> None:
    """The student's 2 masked global crops and 4 local crops of each image through one pass of the blocks give the
    per-size forwards' outputs and gradients. Registers included (prefix tokens in every crop)."""
    cfg = load_config(RECIPES / recipe, [f"data.train={digits_shards}", f"model.kwargs={KWARGS}", "crops.n_local=4",
                                         "crops.global_size=28", "crops.local_size=12", f"{method}.pack_crops=true",
                                         *extra])
    built = get_recipe(method)(cfg)
    built.build(Accelerator(cpu=device == "cpu"))
    student = built.student.to(device)
    assert student.pack_crops and student.n_global == 2
    assert all(isinstance(block.attn, CropAttention) for block in student.backbone.vit.blocks)
    g = torch.Generator().manual_seed(0)
    images = 3
    global_crops = torch.randn(2 * images, 3, 28, 28, generator=g).to(device)
    local_crops = torch.randn(4 * images, 3, 12, 12, generator=g).to(device)
    masks = (torch.rand(2 * images, 49, generator=g) < 0.3).to(device)
    outputs = {}
    for pack in (True, False):
        student.pack_crops = pack
        student.zero_grad()
        out = [o for o in _student_outputs(method, student, global_crops, local_crops, masks) if o is not None]
        sum(o.float().pow(2).sum() for o in out).backward()
        outputs[pack] = ([o.detach() for o in out],
                         {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    (packed, packed_grads), (plain, plain_grads) = outputs[True], outputs[False]
    assert len(packed) == len(plain) >= 2
    for a, b in zip(packed, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert packed_grads.keys() == plain_grads.keys() and len(plain_grads) > 10
    for name in plain_grads:
        torch.testing.assert_close(packed_grads[name], plain_grads[name], atol=1e-4, rtol=1e-3,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_crop_attention_is_timms_attention_per_crop(device: str) -> None:
    """With a layout of two crop sizes, `CropAttention` equals timm's `Attention` run on each crop alone, with every
    option of timm's attention on (q/k norms, the output norm, the gate, biases) and attention dropout, which must
    apply in training only; with a tensor mask or none it is timm's attention."""
    from timm.layers import Attention

    torch.manual_seed(0)
    options = dict(num_heads=2, qkv_bias=True, qk_norm=True, scale_norm=True, attn_drop=0.5,
                   norm_layer=torch.nn.LayerNorm)
    if "gated" in inspect.signature(Attention).parameters:  # timm >= 1.0.28
        options["gated"] = True
    ours, timms = CropAttention(16, **options).to(device), Attention(16, **options).to(device)
    for p in ours.parameters():  # norms start at identity: move them so that leaving one out shows
        torch.nn.init.normal_(p, std=0.5)
    timms.load_state_dict(ours.state_dict())
    ours.eval()
    timms.eval()
    layout = CropLayout(((2, 5), (3, 4)))
    x = torch.randn(3, layout.length, 16, device=device)
    crops = [x[:, 5 * i:5 * i + 5] for i in range(2)] + [x[:, 10 + 4 * i:14 + 4 * i] for i in range(3)]
    torch.testing.assert_close(ours(x, attn_mask=layout), torch.cat([timms(c) for c in crops], dim=1))
    bias = torch.zeros(layout.length, layout.length, device=device)
    bias.masked_fill_(torch.rand(layout.length, layout.length, device=device) < 0.3, float("-inf")).fill_diagonal_(0)
    torch.testing.assert_close(ours(x), timms(x))  # without a layout the call goes to timm's own forward
    torch.testing.assert_close(ours(x, attn_mask=bias), timms(x, attn_mask=bias))
    ours.train()
    torch.manual_seed(1)
    dropped = ours(x, attn_mask=layout)
    assert not torch.allclose(dropped, ours.eval()(x, attn_mask=layout))  # dropout in training, none in eval
    with pytest.raises(ValueError, match="does not match its crop layout"):
        ours(x, attn_mask=CropLayout(((2, 3),)))


@pytest.mark.parametrize("recipe, key, overrides, message", [
    ("demo_dinov3.yaml", "dinov3", ["crops.n_local=4", "crops.local_size=12"],
     "vit_small_patch16_dinov3 is a timm Eva ViT"),
    ("demo_dinov2.yaml", "dinov2", ["crops.n_local=4", "crops.local_size=12", "model.arch=vit_small_patch16_dinov3"],
     "is a timm Eva ViT"),
    ("demo_ibot.yaml", "ibot", ["model.arch=vit_small_patch16_dinov3"], "is a timm Eva ViT"),
    ("demo_dinov2.yaml", "dinov2", ["crops.n_local=0"], "crops.n_local is 0, so there is nothing to pack"),
    ("demo_ibot.yaml", "ibot", ["model.kwargs={depth: 1, attn_layer: x}"], "model.kwargs.attn_layer and ibot"),
    ("demo_ibot.yaml", "ibot", ["model.arch=vit_small_patch16_18x2_224"], "do not take timm's attn_layer"),
    ("demo_dino.yaml", "dino", ["model.arch=resnet18", "model.patch_size=null", "model.kwargs={}"], "is not a ViT"),
])
def test_what_cannot_pack_is_refused_by_its_key(digits_shards: Path, recipe: str, key: str, overrides: list[str],
                                                message: str) -> None:
    cfg = load_config(RECIPES / recipe, [f"data.train={digits_shards}", f"{key}.pack_crops=true",
                                         "model.kwargs={embed_dim: 32, depth: 1, num_heads: 2}", *overrides])
    with pytest.raises(ValueError, match=message) as refused:
        get_recipe(cfg.method)(cfg).build(Accelerator(cpu=True))
    assert f"{key}.pack_crops=false" in str(refused.value)  # names the key and what to do
