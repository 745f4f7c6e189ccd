"""Linear segmentation probe (sslpipe/eval/linear_seg.py): the features against timm's own intermediate layers, the
head, the schedule by hand, and `sslpipe linear-seg` end to end on generated scenes."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import timm
import torch
from helpers import REPO, child_env

from sslpipe.eval.linear_seg import LinearSegHead, PatchFeatures, probe_lr

torch.set_num_threads(1)
TINY = {"embed_dim": 32, "depth": 3, "num_heads": 2, "patch_size": 4, "img_size": 32}


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY).eval()


@pytest.mark.parametrize("layers", [1, 4])
def test_patch_features_are_normed_patch_tokens_of_the_last_blocks(layers):
    """By hand from timm's blocks: tokens after each of the last blocks, the final LayerNorm applied, CLS dropped,
    laid out as (C, h, w) and concatenated block after block (DINOv2 get_intermediate_layers(norm=True))."""
    vit = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        outs = []
        for block in vit.blocks:
            tokens = block(tokens)
            outs.append(vit.norm(tokens)[:, 1:].reshape(2, 8, 8, 32).permute(0, 3, 1, 2))
        expected = torch.cat(outs[-min(layers, 3):], 1)
        got = PatchFeatures(vit, min(layers, 3))(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.requires_grad is False


def test_frozen_features_stay_frozen_in_train_mode():
    features = PatchFeatures(tiny_vit(), 1).train()
    assert not features.backbone.training and all(not p.requires_grad for p in features.parameters())


def test_head_is_batchnorm_then_1x1_conv():
    head = LinearSegHead(6, 3).train()
    x = torch.randn(4, 6, 5, 5)
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    normed = (x - mean) / torch.sqrt(var + 1e-5)
    expected = torch.einsum("kc,bchw->bkhw", head.conv.weight[:, :, 0, 0], normed) + head.conv.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)


def test_probe_lr_warms_up_then_decays_linearly():
    steps, lr = 8000, 1e-3  # warm-up = 3.75 % = 300 steps
    assert probe_lr(0, steps, lr) == pytest.approx(lr * 1e-6)
    assert probe_lr(150, steps, lr) == pytest.approx(lr * (1 - 150 / steps) * (0.5 + 0.5e-6))
    assert probe_lr(300, steps, lr) == pytest.approx(lr * (1 - 300 / steps))
    assert probe_lr(4000, steps, lr) == pytest.approx(lr / 2)
    assert probe_lr(7999, steps, lr) == pytest.approx(lr / steps)


@pytest.mark.slow
def test_linear_seg_command_end_to_end(tmp_path):
    """`sslpipe linear-seg EXPORT --data SHARDS --out RESULT.json` on generated scenes (a tiny export): the JSON holds
    mIoU, per-class IoU, the constant baseline and the settings, and the training loss fell below chance."""
    from sslpipe.ingest.options import ShardOptions
    from sslpipe.ingest.shards import write_shards
    from sslpipe.weights.export import export_backbone

    write_shards(tmp_path / "scenes", source="scenes", scenes={"train": 48, "val": 12, "size": 32},
                 options=ShardOptions(samples_per_shard=16), progress=False)
    export = export_backbone(tiny_vit(), tmp_path / "export", arch="vit_tiny_patch16_224", model_args=TINY,
                             img_size=32, mean=(0.45,) * 3, std=(0.25,) * 3, source={"which": "test"})
    out = tmp_path / "probe.json"
    done = subprocess.run([sys.executable, "-m", "sslpipe", "linear-seg", str(export), "--data",
                           str(tmp_path / "scenes"), "--steps", "60", "--batch-size", "8", "--lr", "0.05",
                           "--out", str(out), "--png", str(tmp_path / "probe.png")],
                          env=child_env(OMP_NUM_THREADS="1"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert 0 <= result["mIoU"] <= 1 and result["n_val"] == 12 and len(result["per_class"]) == 11
    assert result["baseline"]["predict"] == "background" and 0 < result["baseline"]["mIoU"] < 0.2
    assert result["final_loss"] < 0.9 * math.log(11)  # below chance: the probe learned from the frozen features
    assert result["steps"] == 60 and result["size"] == 32 and result["layers"] == 1
    assert "linear-seg mIoU" in done.stdout and (tmp_path / "probe.png").is_file()


def test_linear_seg_on_a_fixed_size_28px_export(tmp_path):
    """`sslpipe linear-seg` on a 28 px ViT export without dynamic_img_size (the demo's random-init export): the
    training crops reach the backbone at the export's 28 px. They were padded to 32 px (a multiple of 32) before,
    which such a ViT rejects: "Input height (32) doesn't match model (28)"."""
    from sslpipe.cli import main
    from sslpipe.weights.export import export_backbone

    scenes = tmp_path / "scenes"
    assert main(["shards", "--dataset", "scenes", str(scenes), "--scene-size", "28", "--scene-train", "12",
                 "--scene-val", "3"]) == 0
    args = {**TINY, "img_size": 28, "depth": 2}
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args).eval()
    export = export_backbone(vit, tmp_path / "random-init", arch="vit_tiny_patch16_224", model_args=args,
                             img_size=28, mean=(0.286,) * 3, std=(0.353,) * 3, source={"which": "random-init"})
    out = tmp_path / "probe.json"
    assert main(["linear-seg", str(export), "--data", str(scenes), "--steps", "3", "--batch-size", "4",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["size"] == 28 and result["n_val"] == 3 and 0 <= result["pixel_acc"] <= 1
