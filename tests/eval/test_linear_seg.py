"""Linear segmentation probe (sslpipe/eval/linear_seg.py): the features against timm's own intermediate layers, the
head, the schedule by hand, and `sslpipe linear-seg` end to end on generated scenes."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from helpers import REPO, child_env
from PIL import Image

from sslpipe.eval.linear_seg import FitLongSide, LinearSegHead, PatchFeatures, probe_lr

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
    mIoU, per-class IoU, the constant baseline and the settings, and the probe learned from the frozen features: its
    training loss is below that of the same probe, with the same settings, seed and batches, on all-zero features
    (what the bias alone learns: the class prior). A random tiny ViT's patch features are weak (a converged logistic
    regression on them does not beat "predict background" on these 32 px scenes), so the margin is small: measured
    1.436 against 1.508."""
    from sslpipe.eval.linear_seg import linear_seg_probe
    from sslpipe.eval.spec import FeatureSpec, ProbeData
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
    no_features = tiny_vit()
    with torch.no_grad():  # the final norm's weight and bias at 0: every patch feature is exactly 0
        no_features.norm.weight.zero_()
        no_features.norm.bias.zero_()
    spec = FeatureSpec.from_export(export, pooling="patch", layers=result["layers"], num_workers=0)
    reference = linear_seg_probe(no_features, spec, ProbeData(str(tmp_path / "scenes"), str(tmp_path / "scenes")),
                                 steps=result["steps"], batch_size=result["batch_size"], lr=result["lr"],
                                 weight_decay=result["weight_decay"], seed=result["seed"], progress=False)
    assert result["final_loss"] < reference["final_loss"] - 0.03 < 0.9 * math.log(11)
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


def test_eval_view_is_at_the_training_scale():
    """mmseg's protocol (train RandomResize around a base scale, test Resize to it, keep ratio): a val image 4x the
    probe's size is resized so its long side is `size`, as the training view resizes at jitter 1 (the same pixels
    within one level of the training view's uint8 resize), and its label stays native. It was not resized at all."""
    from sslpipe.data.dense import DenseTransform

    rng = np.random.default_rng(0)
    raw = {"image": Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)),
           "seg": Image.fromarray(rng.integers(0, 5, (96, 128), dtype=np.uint8)), "key": "k", "url": "u"}
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.25, 0.25)
    out = FitLongSide(DenseTransform(32, (1.0, 1.0), 0.0, mean, std, 255, train=False), 32)(raw)
    assert out["image"].shape == (3, 24, 32) and out["seg"].shape == (96, 128)
    train_view = DenseTransform(32, (1.0, 1.0), 0.0, mean, std, 255, train=True)(raw)["image"]  # s = 1, padded
    torch.testing.assert_close(out["image"], train_view[:, :24, :32], rtol=0, atol=1.01 / 255 / 0.25)  # 1 level


def test_linear_seg_evaluates_at_the_training_scale_and_scores_at_the_label_size(tmp_path, monkeypatch):
    """End to end on 64 px scenes with a 32 px probe: every val image reaches the sliding windows with its long side
    32 (the training scale; it reached them at 64 px before), and the prediction is scored at the label's 64 px."""
    import sslpipe.eval.linear_seg as ls
    from sslpipe.eval.spec import FeatureSpec, ProbeData
    from sslpipe.ingest.options import ShardOptions
    from sslpipe.ingest.shards import write_shards

    write_shards(tmp_path / "scenes", source="scenes", scenes={"train": 2, "val": 3, "size": 64},
                 options=ShardOptions(samples_per_shard=8), progress=False)
    seen, scored = [], []
    slide = ls.slide_logits
    monkeypatch.setattr(ls, "slide_logits", lambda fn, image, *a: seen.append(tuple(image.shape[-2:])) or
                        slide(fn, image, *a))
    update = ls.SegmentationMetric.update
    monkeypatch.setattr(ls.SegmentationMetric, "update",
                        lambda self, pred, target: scored.append(tuple(pred.shape[-2:])) or update(self, pred, target))
    features = PatchFeatures(tiny_vit(), 1)
    spec = FeatureSpec(img_size=32, crop=32, mean=(0.45,) * 3, std=(0.25,) * 3, pooling="patch")
    data = ProbeData(str(tmp_path / "scenes"), str(tmp_path / "scenes"))
    result = ls.evaluate_linear_seg(features, LinearSegHead(32, 11), spec, data, names=[str(i) for i in range(11)],
                                    progress=False)
    assert result["n_val"] == 3 and seen == [(32, 32)] * 3
    assert scored[:3] == [(64, 64)] * 3
