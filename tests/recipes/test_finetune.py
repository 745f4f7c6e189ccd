"""Fine-tuning: metrics against the libraries and hand-computed values, dense data transform, config keys, optimiser
groups in the engine, and short end-to-end runs of both recipes (marked slow) with predictions PNGs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers import REPO
from PIL import Image
from safetensors.torch import load_file

from sslpipe.config import ConfigError
from sslpipe.data.dense import DenseTransform, collate_dense
from sslpipe.data.targets import masks_to_targets
from sslpipe.eval.detection import DetectionMetric
from sslpipe.eval.segmentation import SegmentationMetric, format_iou_table
from sslpipe.recipes import config_from_dict, load_config

torch.set_num_threads(1)


# -------------------------------------------------------------------------------------------------------- mIoU
def test_miou_by_hand_and_against_torchmetrics():
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 1]]])
    preds = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 1]]])
    metric = SegmentationMetric(4, ignore_index=255, class_names=["bg", "a", "b", "c"])
    metric.update(preds, target)
    r = metric.compute()
    # class 0: tp 1, fp 1 (pixel (1,1)), fn 1 (pixel (0,1)) -> 1/3; class 1: tp 3, fp 1 -> 3/4; class 2: tp 1, fn 1
    # -> 1/2 (the prediction at the ignored pixel does not count); class 3 absent everywhere -> NaN, not averaged
    assert r["per_class"]["bg"] == pytest.approx(1 / 3)
    assert r["per_class"]["a"] == pytest.approx(3 / 4)
    assert r["per_class"]["b"] == pytest.approx(1 / 2)
    assert math.isnan(r["per_class"]["c"])
    assert r["mIoU"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert r["pixel_acc"] == pytest.approx(5 / 7)
    from torchmetrics.functional.classification import multiclass_jaccard_index

    ref = multiclass_jaccard_index(preds, target, 4, average="macro", ignore_index=255)
    assert r["mIoU"] == pytest.approx(float(ref))
    assert "mIoU" in format_iou_table(r) and "n/a" in format_iou_table(r)


def test_miou_accumulates_over_images_of_different_sizes():
    g = torch.Generator().manual_seed(0)
    a_t, a_p = torch.randint(0, 3, (5, 6), generator=g), torch.randint(0, 3, (5, 6), generator=g)
    b_t, b_p = torch.randint(0, 3, (7, 4), generator=g), torch.randint(0, 3, (7, 4), generator=g)
    metric = SegmentationMetric(3)
    metric.update([a_p, b_p], [a_t, b_t])
    from torchmetrics.functional.classification import multiclass_jaccard_index

    ref = multiclass_jaccard_index(torch.cat([a_p.flatten(), b_p.flatten()]),
                                   torch.cat([a_t.flatten(), b_t.flatten()]), 3, average="macro")
    assert metric.compute()["mIoU"] == pytest.approx(float(ref))


# ---------------------------------------------------------------------------------------------------------- AP
def test_ap_by_hand():
    """One object, one detection: box IoU 0.62 matches at IoU thresholds 0.50, 0.55, 0.60 of the ten -> AP 0.3,
    AP50 1, AP75 0; mask IoU 64/100 likewise."""
    gt_mask = torch.zeros(1, 20, 20, dtype=torch.bool)
    gt_mask[0, 0:10, 0:10] = True
    pred_mask = torch.zeros(1, 20, 20, dtype=torch.bool)
    pred_mask[0, 0:8, 0:8] = True
    metric = DetectionMetric()
    metric.update([{"boxes": torch.tensor([[0.0, 0.0, 10.0, 6.2]]), "scores": torch.tensor([0.9]),
                    "labels": torch.tensor([1]), "masks": pred_mask}],
                  [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1]), "masks": gt_mask}])
    r = metric.compute()
    for kind in ("bbox", "segm"):
        assert r[f"{kind}/AP"] == pytest.approx(0.3)
        assert r[f"{kind}/AP50"] == pytest.approx(1.0)
        assert r[f"{kind}/AP75"] == pytest.approx(0.0)


def test_box_ap_agrees_with_pycocotools():
    """A case with several images, classes, misses and false positives: our wrapper == COCOeval run directly."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    g = torch.Generator().manual_seed(0)
    preds, targets, images, anns, dets = [], [], [], [], []
    for img in range(4):
        n = 3
        xy = torch.rand(n, 2, generator=g) * 60
        wh = torch.rand(n, 2, generator=g) * 30 + 5
        gt = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(1, 3, (n,), generator=g)
        pb = gt[:2] + torch.randn(2, 4, generator=g) * 3
        pb = torch.cat([pb, torch.tensor([[10.0, 10, 30, 30]])])
        scores = torch.rand(3, generator=g)
        pl = torch.cat([labels[:2], torch.tensor([1])])
        preds.append({"boxes": pb, "scores": scores, "labels": pl})
        targets.append({"boxes": gt, "labels": labels})
        images.append({"id": img, "width": 100, "height": 100})
        for b, c in zip(gt.tolist(), labels.tolist()):
            anns.append({"id": len(anns) + 1, "image_id": img, "category_id": c, "iscrowd": 0,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])})
        for b, c, s in zip(pb.tolist(), pl.tolist(), scores.tolist()):
            dets.append({"image_id": img, "category_id": c, "score": s, "bbox": [b[0], b[1], b[2] - b[0],
                                                                              b[3] - b[1]]})
    metric = DetectionMetric(("bbox",))
    metric.update(preds, targets)
    ours = metric.compute()
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1}, {"id": 2}]}
    coco.createIndex()
    ev = COCOeval(coco, coco.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ours["bbox/AP"] == pytest.approx(ev.stats[0], abs=1e-6)
    assert ours["bbox/AP50"] == pytest.approx(ev.stats[1], abs=1e-6)
    assert ours["bbox/AP75"] == pytest.approx(ev.stats[2], abs=1e-6)
    assert 0 < ours["bbox/AP"] < 1


def test_masks_to_targets():
    inst = torch.tensor([[0, 1, 1, 0], [0, 1, 2, 2], [3, 0, 2, 2]])
    sem = torch.tensor([[0, 4, 4, 0], [0, 4, 7, 7], [255, 0, 7, 7]])
    t = masks_to_targets(inst, sem, class_offset=0)
    assert t["labels"].tolist() == [4, 7]  # instance 3 has only ignore under it: dropped
    assert t["boxes"].tolist() == [[1, 0, 3, 2], [2, 1, 4, 3]]  # x2/y2 = last pixel + 1
    assert t["masks"].shape == (2, 3, 4)
    on_background = torch.tensor([[5, 5, 1, 1]])  # instance 5 lies on class 0: background for both heads
    for offset, labels in ((0, [4]), (1, [3])):
        assert masks_to_targets(on_background, torch.tensor([[0, 0, 4, 4]]), offset)["labels"].tolist() == labels


# ------------------------------------------------------------------------------------------------------- data
def test_dense_transform_keeps_labels_aligned():
    torch.manual_seed(0)
    inst = np.zeros((40, 30), np.int32)
    inst[5:20, 3:15], inst[22:38, 10:28] = 1, 2
    sem = np.where(inst == 1, 3, np.where(inst == 2, 5, 0)).astype(np.uint8)
    sem[0:2] = 255
    image = Image.fromarray(np.stack([sem] * 3, -1))
    raw = {"key": "k", "url": "u", "image": image, "seg": Image.fromarray(sem), "inst": Image.fromarray(inst, "I")}
    t = DenseTransform(32, (0.5, 1.5), 0.5, (0.5,) * 3, (0.5,) * 3, train=True, need_inst=True)
    for _ in range(20):
        out = t(raw)
        assert out["image"].shape == (3, 32, 32) and out["seg"].shape == (32, 32) == out["inst"].shape
        seg, ins = out["seg"], out["inst"]
        assert (seg[ins == 1] == 3).all() and (seg[ins == 2] == 5).all()
        assert set(seg[ins == 0].unique().tolist()) <= {0, 255}
    ev = DenseTransform(32, (0.5, 1.5), 0.5, (0.5,) * 3, (0.5,) * 3, train=False, need_inst=True)(raw)
    assert ev["image"].shape == (3, 40, 30) and torch.equal(ev["seg"], torch.from_numpy(sem).long())
    batch = collate_dense([ev, ev])
    assert batch["images"].shape == (2, 3, 64, 32) and batch["sizes"] == [(40, 30)] * 2
    no_inst = {k: v for k, v in raw.items() if k != "inst"}
    with pytest.raises(ValueError, match="inst.png"):
        DenseTransform(32, (1.0, 1.0), 0.0, (0.5,) * 3, (0.5,) * 3, need_inst=True)(no_inst)
    small = {**no_inst, "seg": Image.fromarray(sem[:20, :15])}  # it used to be stretched onto the image
    for train in (True, False):
        with pytest.raises(ValueError, match=r"sample k of u: its seg.png is 15x20 px, its image 30x40"):
            DenseTransform(32, (1.0, 1.0), 0.0, (0.5,) * 3, (0.5,) * 3, train=train)(small)


def test_downscaled_labels_keep_the_image_edges():
    """A vertical edge at column 100 of 300, shrunk to 100 px: the label edge lands where the image's resize puts it,
    column 33 (torch's NEAREST put it at 34: its samples are not pixel centres)."""
    sem = np.zeros((30, 300), np.uint8)
    sem[:, 100:] = 1
    raw = {"key": "k", "url": "u", "image": Image.fromarray(np.stack([sem * 255] * 3, -1)), "seg": Image.fromarray(sem)}
    out = DenseTransform(100, (1.0, 1.0), 0.0, (0.0,) * 3, (1.0,) * 3, train=True)(raw)
    row_image, row_seg = out["image"][0, 5, :], out["seg"][5, :]
    image_edge = int((row_image >= 0.5).nonzero()[0])
    assert image_edge == 33 and int((row_seg == 1).nonzero()[0]) == image_edge  # 100 / 3 = 33.3


# ----------------------------------------------------------------------------------------------------- config
def test_finetune_config_keys():
    cfg = config_from_dict({"method": "finetune_vitdet", "data": {"train": "x"},
                            "finetune_vitdet": {"img_size": 64, "global_blocks": [1, 3]}})
    assert cfg.finetune_vitdet.img_size == 64 and cfg.finetune_vitdet.layer_decay == 0.7  # published ViTDet default
    with pytest.raises(ConfigError, match="Did you mean 'finetune_vitdet.img_size'"):
        config_from_dict({"method": "finetune_vitdet", "data": {"train": "x"}, "finetune_vitdet": {"img_sise": 64}})
    with pytest.raises(ConfigError, match="unknown key 'finetune_vitdet.num_queries'"):  # Mask2Former's, not ViTDet's
        config_from_dict({"method": "finetune_vitdet", "data": {"train": "x"}, "finetune_vitdet": {"num_queries": 4}})


@pytest.mark.parametrize("override,message", [
    ("finetune_mask2former.layer_decay=-0.7", "greater than 0"),  # negative learning rates on half the blocks
    ("finetune_mask2former.backbone_lr_mult=0", "greater than 0"),
    ("finetune_mask2former.scale_range=[2.0,0.5]", "0 < low <= high"),  # failed inside the loader
    ("finetune_mask2former.hflip=1.5", "less than or equal to 1"),
    ("finetune_mask2former.img_size=0", "greater than 0"),
    ("finetune_mask2former.importance_sample_ratio=1.5", "less than or equal to 1"),
    ("finetune_mask2former.oversample_ratio=0.1", "greater than or equal to 1"),
    ("finetune_mask2former.no_object_weight=-0.1", "greater than or equal to 0"),
    ("finetune_mask2former.train_num_points=0", "greater than 0"),
    ("finetune_mask2former.window_size=-3", "greater than or equal to 0"),
    ("finetune_vitdet.anchor_sizes=[0,64,128,256,512]", "greater than 0"),
])
def test_finetune_values_out_of_range_are_refused_naming_the_key(override, message):
    recipe = "recipes/demo_finetune_vitdet.yaml" if "vitdet" in override else "recipes/demo_finetune_m2f.yaml"
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"key '{key}' = .* is invalid: .*{message}"):
        load_config(REPO / recipe, ["data.train=x", override])


@pytest.mark.parametrize("path", ["recipes/finetune_m2f_ade20k_vit_small.yaml",
                                  "recipes/finetune_vitdet_coco_vit_base.yaml",
                                  "recipes/demo_finetune_m2f.yaml", "recipes/demo_finetune_vitdet.yaml"])
def test_recipes_load(path):
    key = "finetune_vitdet" if "vitdet" in path else "finetune_mask2former"
    cfg = load_config(REPO / path, [f"{key}.img_size=96"])
    assert cfg.method == key and getattr(cfg, key).img_size == 96


def test_published_recipes_hold_the_published_values():
    m2f = load_config(REPO / "recipes/finetune_m2f_ade20k_vit_small.yaml")
    f, o = m2f.finetune_mask2former, m2f.optim
    assert (f.num_queries, f.hidden_dim, f.decoder_layers, f.encoder_layers, f.train_num_points) == (
        100, 256, 10, 6, 12544)
    assert (f.class_weight, f.mask_weight, f.dice_weight, f.no_object_weight, f.backbone_lr_mult) == (
        2.0, 5.0, 5.0, 0.1, 0.1)
    assert (o.lr, o.weight_decay, o.clip_grad, o.clip_mode, o.schedule, m2f.data.batch_size) == (
        1e-4, 0.05, 0.01, "global", "poly", 16)
    det = load_config(REPO / "recipes/finetune_vitdet_coco_vit_base.yaml")
    f, o = det.finetune_vitdet, det.optim
    assert (f.window_size, f.global_blocks, f.layer_decay, f.img_size, tuple(f.scale_range)) == (
        14, [2, 5, 8, 11], 0.7, 1024, (0.1, 2.0))
    assert (o.lr, o.weight_decay, o.warmup_iters, o.schedule, det.model.drop_path_rate, det.data.batch_size) == (
        1e-4, 0.1, 250, "step", 0.1, 64)


# ------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def finetune_data(tmp_path_factory):
    from sslpipe.ingest.options import ShardOptions
    from sslpipe.ingest.shards import write_shards
    from sslpipe.weights.export import export_backbone

    root = tmp_path_factory.mktemp("finetune")
    write_shards(root / "scenes", source="scenes", scenes={"train": 16, "val": 6, "size": 64},
                 options=ShardOptions(samples_per_shard=8), progress=False)
    torch.manual_seed(0)
    args = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 4, "img_size": 32, "dynamic_img_size": True}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args)
    export = export_backbone(vit, root / "export", arch="vit_tiny_patch16_224", model_args=args, img_size=32,
                             mean=(0.4,) * 3, std=(0.3,) * 3, source={"which": "test"})
    return root, export


def _keyed(overrides: list[str], recipe: str) -> list[str]:
    """`{m}.key=value` overrides written for both heads, with {m} the recipe's method section."""
    key = "finetune_vitdet" if "vitdet" in recipe else "finetune_mask2former"
    return [o.replace("{m}.", f"{key}.") for o in overrides]


TINY_HEADS = ["{m}.img_size=64", "{m}.window_size=8", "{m}.global_blocks=[1]", "{m}.pyramid_channels=32",
              "data.batch_size=4", "data.num_workers=0", "data.steps_per_epoch=2",
              "train.epochs=2", "eval.max_val=4", "eval.predict_images=2",
              "eval.batch_size=2"]


def _run(recipe: str, root, export, extra: list[str]):
    from sslpipe.engine.trainer import train

    cfg = load_config(REPO / recipe, [f"data.train={root / 'scenes'}", f"data.val={root / 'scenes'}",
                               f"model.init_from={export}", f"output_dir={root / 'runs'}",
                                      *_keyed([*TINY_HEADS, *extra], recipe)])
    return train(cfg)


M2F_TINY = ["{m}.num_queries=4", "{m}.hidden_dim=32", "{m}.num_heads=2", "{m}.dim_feedforward=64",
            "{m}.decoder_layers=4", "{m}.encoder_layers=1", "{m}.encoder_feedforward_dim=64",
            "{m}.train_num_points=128"]
VITDET_TINY = ["{m}.head_dim=16", "{m}.fc_dim=32", "{m}.box_head_convs=1", "{m}.mask_head_convs=1",
               "{m}.box_batch_size_per_image=16"]


def _assert_trained(run: Path) -> None:
    """The run trained, not only ran: AdamW's first moments in its last checkpoint are nonzero for at least 9 in 10
    parameter tensors (a zero loss, or gradients that never reach the optimizer, leave every one at exactly 0;
    measured: all of them, all but 1 of 171 in the instance task), and where it wrote two epoch checkpoints some
    weight tensor moved by more than 1 % of its norm between them (decoupled weight decay alone scales each by
    (1 - lr x wd) per step: at most 2 x 1e-3 x 0.1 = 2e-4 of it over those 2 steps; measured: 110 % and more)."""
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    moments = [bool(v.any()) for k, v in load_file(str(ckpts[-1] / "optimizer.safetensors")).items()
               if k.endswith(".exp_avg")]
    assert moments and sum(moments) >= 0.9 * len(moments), f"{sum(moments)} of {len(moments)} first moments nonzero"
    if len(ckpts) > 1:
        first, last = (load_file(str(c / "model.safetensors")) for c in (ckpts[0], ckpts[-1]))
        moved = max(float((last[k] - v).norm() / v.norm()) for k, v in first.items()
                    if v.is_floating_point() and v.any() and ".running_" not in k)
        assert moved > 0.01, f"no weight tensor moved by more than {moved:.2e} of its norm"


def _recipe(recipe: str, root, export, extra: list[str]):
    """A fine-tuning recipe object with its network built (no trainer)."""
    from sslpipe.recipes import get_recipe

    cfg = load_config(REPO / recipe, [f"data.train={root / 'scenes'}", f"data.val={root / 'scenes'}",
                                      f"model.init_from={export}", *_keyed([*TINY_HEADS, *extra], recipe)])
    recipe_obj = get_recipe(cfg.method)(cfg)
    recipe_obj.build_model()
    return recipe_obj


def _non_square_batch(h: int, w: int, inst: bool = False) -> dict:
    torch.manual_seed(0)
    seg = torch.zeros(h, w, dtype=torch.long)
    seg[5:20, 8:30] = 3
    sample = {"image": torch.randn(3, h, w), "seg": seg, "inst": (seg > 0).long() if inst else None, "crowd": {},
              "key": "k"}
    return collate_dense([sample])


@pytest.mark.parametrize("task,size", [("semantic", (40, 100)), ("semantic", (48, 48)), ("instance", (48, 80))])
def test_mask2former_evaluates_on_the_training_grid(finetune_data, task, size):
    """Every forward of evaluation sees img_size x img_size inputs (64 here): windows slid over a larger image,
    a smaller one padded, instance images fitted into the square; predictions come back at the label size."""
    root, export = finetune_data
    recipe = _recipe("recipes/demo_finetune_m2f.yaml", root, export, [*M2F_TINY, f"{{m}}.task={task}"])
    model = recipe.model().eval()
    shapes = []
    recipe.vit_trunk().register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        preds, targets = recipe.eval_batch(model, _non_square_batch(*size, inst=task == "instance"))
    assert shapes and set(shapes) == {(64, 64)}
    if task == "semantic":
        windows = (math.ceil((max(size[0], 64) - 64) / 43) + 1) * (math.ceil((max(size[1], 64) - 64) / 43) + 1)
        assert len(shapes) == windows and preds[0].shape == size
    else:
        assert len(shapes) == 1 and preds[0]["masks"].shape[-2:] == size


@pytest.mark.parametrize("task", ["semantic", "instance"])
def test_mask2former_targets_and_windows_are_padded_like_the_images(finetune_data, task):
    """img_size 40 (not a multiple of 32): the collated images are padded to 64, so the target masks are padded the
    same way with pixels of no mask (official prepare_targets) instead of being stretched over the canvas, and
    evaluation pads each 40 px window to the 64 px canvas of training."""
    root, export = finetune_data
    recipe = _recipe("recipes/demo_finetune_m2f.yaml", root, export,
                     [*M2F_TINY, f"{{m}}.task={task}", "{m}.img_size=40"])
    batch = _non_square_batch(40, 40, inst=task == "instance")
    assert tuple(batch["images"].shape[-2:]) == (64, 64)
    masks, classes = recipe.targets(batch)
    assert masks[0].shape[-2:] == (64, 64) and masks[0][:, 40:].sum() == 0 and masks[0][:, :, 40:].sum() == 0
    seg = batch["seg"][0]
    if task == "semantic":
        assert classes[0].tolist() == [0, 3]
        assert torch.equal(masks[0][:, :40, :40], torch.stack([seg == 0, seg == 3]).float())
    else:
        assert torch.equal(masks[0][:, :40, :40], (seg == 3)[None].float())
    model = recipe.model().eval()
    shapes = []
    recipe.vit_trunk().register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        preds, _ = recipe.eval_batch(model, _non_square_batch(40, 70, inst=task == "instance"))
    assert shapes and set(shapes) == {(64, 64)}
    assert (preds[0] if task == "semantic" else preds[0]["masks"]).shape[-2:] == (40, 70)


def test_vitdet_evaluates_on_the_training_grid(finetune_data):
    root, export = finetune_data
    recipe = _recipe("recipes/demo_finetune_vitdet.yaml", root, export, VITDET_TINY)
    model = recipe.model().eval()
    shapes = []
    recipe.vit_trunk().register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        preds, _ = recipe.eval_batch(model, _non_square_batch(48, 32, inst=True))
    assert shapes == [(64, 64)] and preds[0]["masks"].shape[-2:] == (48, 32)


@pytest.mark.parametrize("recipe_file,extra", [("recipes/demo_finetune_m2f.yaml", M2F_TINY),
                                               ("recipes/demo_finetune_vitdet.yaml", VITDET_TINY)])
def test_built_trunk_holds_the_export_tensor_by_tensor(finetune_data, recipe_file, extra):
    """Regression: after the network is built, every backbone tensor of the export is in the trunk unchanged
    (patch embedding, blocks, the position grid without the CLS entry); only CLS token and final norm are dropped."""
    from safetensors.torch import load_file

    root, export = finetune_data
    exported = load_file(str(export / "model.safetensors"))
    trunk = _recipe(recipe_file, root, export, extra).vit_trunk().state_dict()
    used = set()
    for name, tensor in trunk.items():
        if name.startswith("blocks.") and ".block." in name:
            source = name.replace(".block.", ".", 1)
            assert torch.equal(tensor, exported[source]), name
            used.add(source)
        elif name == "pos_embed":
            grid = exported["pos_embed"][:, 1:].reshape(tensor.shape)
            assert torch.equal(tensor, grid)
            used.add(name)
        elif name in exported:
            assert torch.equal(tensor, exported[name]), name
            used.add(name)
        else:
            assert ".rel_pos_" in name and not tensor.any(), name  # ViTDet's new relative positions start at zero
    assert set(exported) - used == {"cls_token", "norm.weight", "norm.bias"}


def test_init_from_names_the_recipe_keys_the_export_overrides(finetune_data, capsys):
    """From an export the network and normalisation are the export's: a model.arch / kwargs / crops.mean that differ
    are named in one line (not dropped without a word); none is named when the recipe agrees with the export."""
    from sslpipe.recipes.finetune import load_vit

    root, export = finetune_data
    agree = ["model.arch=vit_tiny_patch16_224", "model.patch_size=4", "model.kwargs={embed_dim: 32, depth: 2}",
             "crops.mean=[0.4,0.4,0.4]", "crops.std=[0.3,0.3,0.3]"]
    base = [f"data.train={root / 'scenes'}", f"model.init_from={export}"]
    load_vit(load_config(REPO / "recipes/demo_finetune_m2f.yaml", [*base, *agree]), 32, init_weights=False)
    assert "not used" not in capsys.readouterr().out
    differ = ["model.arch=vit_large_patch16_224", "model.kwargs={embed_dim: 1024}", "crops.mean=[0.9,0.9,0.9]"]
    cfg = load_config(REPO / "recipes/demo_finetune_m2f.yaml", [*base, *differ])
    vit, mean, _ = load_vit(cfg, 32, init_weights=False)
    out = capsys.readouterr().out
    assert vit.embed_dim == 32 and mean == (0.4,) * 3
    assert "model.arch=vit_large_patch16_224 (the export: vit_tiny_patch16_224)" in out
    assert "model.kwargs.embed_dim=1024 (the export: 32)" in out and "crops.mean=[0.9, 0.9, 0.9]" in out


def test_frozen_backbone_trains_only_the_head(finetune_data):
    from sslpipe.engine.optim import build_optimizer

    root, export = finetune_data
    recipe = _recipe("recipes/demo_finetune_m2f.yaml", root, export,
                     [*M2F_TINY, "{m}.freeze_backbone=true", "model.drop_path_rate=0.5"])
    model = recipe.model().train()
    trunk = recipe.vit_trunk()
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    head_before = model.model.transformer_module.queries_features.weight.clone()
    groups = recipe.param_groups()
    assert all(not p.requires_grad for p in trunk.parameters())
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)
    opt = build_optimizer(recipe.cfg, groups)
    for group in opt.param_groups:
        group["lr"] = 1e-3  # the engine sets it every step
    batch = next(iter(recipe.train_loader(0, 0, 1)))
    for _ in range(2):
        loss, _ = recipe.step(batch, {})
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert not trunk.training  # drop path off in the frozen trunk even though the model trains
    assert all(torch.equal(before[k], v) for k, v in trunk.state_dict().items())
    assert not torch.equal(head_before, model.model.transformer_module.queries_features.weight)


@pytest.mark.slow
def test_own_seg_list_fine_tunes_end_to_end(finetune_data, tmp_path):
    """The own-data path of docs/finetune.md, command for command: image + label PNG files and a class file ->
    `sslpipe shards --seg-list LIST --classes FILE OUT --val-fraction 0.2` -> `sslpipe finetune
    recipes/demo_finetune_m2f.yaml data.train=OUT data.val=OUT model.init_from=EXPORT` (sizes shrunk by more
    overrides). Without --classes the class count comes from the label values (it crashed before)."""
    import subprocess
    import sys

    from helpers import child_env

    from sslpipe.ingest.scenes import scene_classes, write_scene_files

    _, export = finetune_data
    listing, classes = write_scene_files(tmp_path / "mine", 30, size=64, dataset="digits")
    one_epoch = [o for o in TINY_HEADS if not o.startswith("train.epochs=")] + ["train.epochs=1"]  # a key once
    shrink = _keyed([*one_epoch, *M2F_TINY, f"output_dir={tmp_path / 'runs'}"], "m2f")
    env = child_env(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    for name, class_args in (("named", ["--classes", str(classes)]), ("unnamed", [])):
        shards = tmp_path / f"shards_{name}"
        cmd = [sys.executable, "-m", "sslpipe", "shards", "--seg-list", str(listing), *class_args, str(shards),
               "--val-fraction", "0.2"]
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        cmd = [sys.executable, "-m", "sslpipe", "finetune", "recipes/demo_finetune_m2f.yaml", f"data.train={shards}",
               f"data.val={shards}", f"model.init_from={export}", *shrink, f"run_name={name}"]
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads((tmp_path / "runs" / name / "eval" / "epoch_001.json").read_text())
        expected = scene_classes("digits") if name == "named" else [str(i) for i in range(11)]
        assert list(result["per_class"]) == expected and 0 <= result["mIoU"] <= 1
        _assert_trained(tmp_path / "runs" / name)
    assert "11 classes from its label values 0..10" in done.stdout


@pytest.mark.slow
def test_mask2former_finetune_end_to_end(finetune_data, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    root, export = finetune_data
    run = _run("recipes/demo_finetune_m2f.yaml", root, export, [
        "run_name=m2f", *M2F_TINY])
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "mIoU" in r]
    assert len(evals) == 2 and all(0 <= r["mIoU"] <= 1 for r in evals)
    assert all(math.isfinite(r["loss"]) for r in lines if "loss" in r)
    _assert_trained(run)
    result = json.loads((run / "eval" / "epoch_002.json").read_text())
    assert set(result["per_class"]) == {"background", "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"}
    png = Image.open(run / "predictions" / "epoch_002.png")
    assert png.size[0] > png.size[1] > 0
    from sslpipe.predict import predict_run

    out = predict_run(run, n=3, out=root / "pred.png")
    assert out["png"].is_file() and 0 <= out["metrics"]["mIoU"] <= 1
    # predict builds what the run trained: from RUN/init_from.json, not from the export as it is now
    config_file = export / "config.json"
    original = config_file.read_text()
    assert json.loads((run / "init_from.json").read_text())["config"] == json.loads(original)
    try:
        config_file.write_text(json.dumps({**json.loads(original), "mean": [0.9, 0.9, 0.9]}))
        changed = predict_run(run, n=3, out=root / "pred_changed.png")
        moved = export.rename(export.with_name("moved"))
        gone = predict_run(run, n=3, out=root / "pred_gone.png")
        moved.rename(export)
    finally:
        config_file.write_text(original)
    same = [json.dumps(r["metrics"], sort_keys=True) for r in (changed, gone, out)]  # NaN for absent classes
    assert same[0] == same[1] == same[2]
    assert "has changed since the run started (mean): the run's init_from.json is used" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="export folder"):
        _run("recipes/demo_finetune_m2f.yaml", root, root / "nowhere", ["run_name=bad"])


@pytest.mark.slow
def test_vitdet_finetune_end_to_end(finetune_data, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    root, export = finetune_data
    run = _run("recipes/demo_finetune_vitdet.yaml", root, export, [
        "run_name=vitdet", *VITDET_TINY, "optim.warmup_iters=1",
        "optim.step_epochs=[1.5]"])
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "segm/AP" in r]
    assert len(evals) == 2 and all(-1 <= r["segm/AP"] <= 1 and -1 <= r["bbox/AP"] <= 1 for r in evals)
    steps = [r for r in lines if "loss_mask" in r]
    assert steps and all(math.isfinite(r["loss"]) for r in steps)
    _assert_trained(run)
    assert (run / "predictions" / "epoch_002.png").is_file()
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert ckpts and (ckpts[-1] / "model.safetensors").is_file()


@pytest.mark.slow
def test_mask2former_instance_task_reports_ap(finetune_data, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    root, export = finetune_data
    run = _run("recipes/demo_finetune_m2f.yaml", root, export, [
        "run_name=m2f_inst", "{m}.task=instance", "train.best_metric=segm/AP", "train.epochs=1", *M2F_TINY,
        "{m}.test_topk=10"])
    result = json.loads((run / "eval" / "epoch_001.json").read_text())
    assert {"segm/AP", "bbox/AP", "segm/AP50"} <= set(result) and -1 <= result["segm/AP"] <= 1
    _assert_trained(run)
    assert (run / "predictions" / "epoch_001.png").is_file()
