"""Linear segmentation probe: DINOv2's dense protocol (Oquab et al., 2023, §7.4 "Linear"; dinov2
eval/segmentation/models/decode_heads/linear_head.py `BNHead`), `sslpipe linear-seg EXPORT --data SEG_SHARDS`.

The backbone is frozen (eval mode, no gradient). Its patch features -- the last block's, or the last 4 blocks'
concatenated (DINOv2's "+ms" feature; `layers=4`), each after the final norm (`get_intermediate_layers(norm=True)`,
timm `forward_intermediates(norm=True)`), CNNs their last stage(s) -- are resized to the first one's grid and
concatenated; the head is BatchNorm over those channels and one 1x1 convolution to the classes:

    logits = W * BN(concat_l F_l) + b,   F_l in R^{C x h x w}

Logits are upsampled bilinearly to the label size and trained with cross-entropy (label 255 ignored). Training view:
`sslpipe.data.dense.DenseTransform` (the image resized, keeping its ratio, so that its long side is `size` x s with
s drawn from [0.5, 2], flip, crop/pad to `size`). Evaluation at the same base scale (mmseg's protocol, which DINOv2's
configs use: ADE20K trains with `RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0))` and tests with
`Resize(scale=(2048, 512), keep_ratio=True)`, configs/_base_/datasets/ade20k.py): each val image is resized, keeping
its ratio, so that its long side is `size` (the training scale at s = 1; `FitLongSide`), windows of `size` are slid
over it at a stride of 2/3 (scores averaged where they overlap; DINOv2's ADE20K test: slide 512 / 341 px;
ceil(2/3 x 512) = 342 here), and the logits are resized back to the label's native size, where mIoU is computed
over the whole val split (`SegmentationMetric`), beside the trivial baseline of predicting the most frequent val
class everywhere. (sslpipe's base scale is the long side = `size` for training and test alike, where mmseg's is the
short side 512 within a 2048 long side; without the test resize, images of another size than `size` were tested at
a scale the probe never trained at, e.g. ADE-sized 683 x 512 images with `--size 224` at 2.6 x the training mean.)

Optimiser (DINOv2's ADE20K linear config as recalled, second-hand: the file is hosted outside the repository):
AdamW lr 1e-3, weight decay 1e-4, linear warm-up over 3.75 % of the steps (1500 of 40k), then poly decay (power 1)
to 0; batch 16. Named deviations: the step count is an argument (40k in the paper, far too many for a CPU); no
PhotoMetricDistortion; a single process (no SyncBN across GPUs: BatchNorm of one process).
"""
from __future__ import annotations

import inspect
import math
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from sslpipe.data.dense import DenseTransform, collate_dense
from sslpipe.data.seg_classes import segmentation_classes
from sslpipe.data.stream import build_loader
from sslpipe.eval.features import model_device, prepare_backbone, write_json
from sslpipe.eval.seg_eval import slide_logits
from sslpipe.eval.segmentation import SegmentationMetric

if TYPE_CHECKING:
    from sslpipe.eval.spec import FeatureSpec, ProbeData

SLIDE_STRIDE_RATE = 2 / 3
WARMUP_FRACTION = 1500 / 40000
IGNORE_INDEX = 255  # the label of unlabelled pixels in segmentation shards


class PatchFeatures(nn.Module):
    """Frozen backbone -> (B, C, h, w) patch features of its last `layers` blocks (stages), normed, concatenated on
    the first one's grid (mmseg `resize_concat`)."""

    def __init__(self, backbone: nn.Module, layers: int = 1) -> None:
        super().__init__()
        if not hasattr(backbone, "forward_intermediates"):
            raise TypeError(f"{type(backbone).__name__} has no forward_intermediates: the linear segmentation probe "
                            "needs a timm ViT or CNN")
        self.backbone = backbone.eval().requires_grad_(False)
        self.layers = int(layers)
        self.kwargs: dict[str, Any] = {"indices": self.layers, "intermediates_only": True}
        params = inspect.signature(backbone.forward_intermediates).parameters
        if "norm" in params:
            self.kwargs["norm"] = True
        if "output_fmt" in params:
            self.kwargs["output_fmt"] = "NCHW"

    def train(self, mode: bool = True) -> "PatchFeatures":
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm statistics and drop path stay as exported
        return self

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        maps = self.backbone.forward_intermediates(x, **self.kwargs)
        size = maps[0].shape[-2:]
        return torch.cat([m if m.shape[-2:] == size else
                          F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps], 1)

    @torch.no_grad()
    def channels(self, size: int) -> int:
        device = next(self.backbone.parameters()).device
        return int(self(torch.zeros(1, 3, size, size, device=device)).shape[1])


class LinearSegHead(nn.Module):
    """DINOv2's BNHead: BatchNorm over the feature channels, then a 1x1 convolution to the classes."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)  # mmseg BaseDecodeHead.cls_seg init
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.conv(self.bn(features))


class FitLongSide:
    """Evaluation sample_fn: `transform`'s eval view (the native image, normalised; the label untouched), the image
    then resized keeping its ratio (bilinear, antialiased, as the training view's resize) so that its long side is
    `size`: the scale the probe trained at (module docstring). A class, so DataLoader workers can pickle it."""

    def __init__(self, transform: DenseTransform, size: int) -> None:
        self.transform, self.size = transform, size

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        sample = self.transform(raw)
        h, w = sample["image"].shape[-2:]
        factor = self.size / max(h, w)
        target = [max(1, round(h * factor)), max(1, round(w * factor))]
        if target != [h, w]:
            sample["image"] = TF.resize(sample["image"], target, antialias=True)
        return sample


def probe_lr(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over WARMUP_FRACTION of the steps (from 1e-6 x lr, mmcv's warmup_ratio), then poly power 1 to
    0 over all `steps` (mmcv `PolyLrUpdaterHook` with linear warm-up, by iteration)."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    regular = lr * (1 - step / steps)
    if step < warmup:
        k = (1 - step / warmup) * (1 - 1e-6)
        return regular * (1 - k)
    return regular


def linear_seg_probe(
    backbone: str | Path | nn.Module,
    spec: FeatureSpec,
    data: ProbeData,
    *,
    steps: int = 1000,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    scale_range: tuple[float, float] = (0.5, 2.0),
    seed: int = 0,
    out_json: str | Path | None = None,
    keep_samples: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the linear head on the frozen backbone for `steps` batches of `batch_size` crops of the train split
    (scale jitter in `scale_range`), evaluate on the val split; returns (and writes to `out_json`) mIoU, pixel
    accuracy, IoU per class, the constant-prediction baseline and the settings. From `spec` (`pooling="patch"`): the
    training crop and evaluation window `spec.input_size` (an export's own image size unless overridden), `mean` /
    `std`, `layers`, `num_workers` (training stream) and `device`. `keep_samples`: the first val images with their
    labels and predictions, returned under `samples` (not written to the JSON) for
    `sslpipe.viz.overlays.save_semantic_samples`."""
    if spec.pooling != "patch":
        raise ValueError(f"the linear segmentation probe reads patch tokens: FeatureSpec(pooling='patch'), "
                         f"got pooling={spec.pooling!r}")
    start = time.perf_counter()
    names = segmentation_classes(data.train, data.num_classes, "--num-classes", val=data.val,
                                 ignore_index=IGNORE_INDEX, verbose=progress)
    model, source = prepare_backbone(backbone, spec)
    size = spec.input_size
    dev = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    features = PatchFeatures(model, spec.layers).to(dev)
    head = LinearSegHead(features.channels(size), len(names)).to(dev)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)

    transform = DenseTransform(size, scale_range, 0.5, spec.mean, spec.std, IGNORE_INDEX, train=True)
    # every training crop is `size` x `size` already; collate_dense's default padding to a multiple of 32 would hand
    # a 28 px ViT 32 px images (and shift the logits against the labels)
    loader = build_loader(data.train, split=data.train_split, sample_fn=transform,
                          collate_fn=partial(collate_dense, pad_to=size), batch_size=batch_size,
                          num_workers=spec.num_workers, seed=seed, shuffle=True, resampled=True, num_batches=steps,
                          reading=data.reading)
    head.train()
    losses: list[float] = []
    bar = tqdm(loader, total=steps, desc="linear-seg train", unit="step", disable=not progress)
    for step, batch in enumerate(bar):
        for group in opt.param_groups:
            group["lr"] = probe_lr(step, steps, lr)
        images = batch["images"].to(dev)
        labels = torch.stack(batch["seg"]).to(dev)
        logits = F.interpolate(head(features(images)), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    train_s = time.perf_counter() - start

    result = evaluate_linear_seg(features, head, spec, data, names=names, keep_samples=keep_samples,
                                 progress=progress)
    result.update(backbone=source, data=str(data.train), val=str(data.val), size=size, layers=spec.layers,
                  steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                  final_loss=sum(losses[-20:]) / max(1, len(losses[-20:])), train_seconds=round(train_s, 1),
                  seconds=round(time.perf_counter() - start, 1))
    if out_json:
        write_json(out_json, {k: v for k, v in result.items() if k != "samples"})
    return result


@torch.no_grad()
def evaluate_linear_seg(features: PatchFeatures, head: LinearSegHead, spec: FeatureSpec, data: ProbeData, *,
                        names: list[str], keep_samples: int = 0, progress: bool = True) -> dict[str, Any]:
    """mIoU of the probe on the val split of `data` (its first `max_val` images), each resized to the training scale
    (long side `spec.input_size`, `FitLongSide`) and predicted by sliding `spec.input_size` windows, on the head's
    device, the logits resized back to the label; `baseline` = the same metrics for a constant prediction of the most
    frequent val class; `samples` = (uint8 image, label, prediction) of the first `keep_samples` val images."""
    size, max_images, device = spec.input_size, data.max_val, model_device(head)
    head.eval()
    transform = FitLongSide(DenseTransform(size, (1.0, 1.0), 0.0, spec.mean, spec.std, IGNORE_INDEX, train=False),
                            size)
    loader = build_loader(data.val, split=data.val_split, sample_fn=transform, collate_fn=collate_dense,
                          batch_size=8, num_workers=0, shuffle=False, drop_last=False, reading=data.reading)
    metric = SegmentationMetric(len(names), IGNORE_INDEX, names)
    counts = torch.zeros(len(names), dtype=torch.long)
    targets_all, rows = [], []
    seen = 0

    def scores(x: Tensor) -> Tensor:
        return F.interpolate(head(features(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)

    for batch in tqdm(loader, desc="linear-seg eval", unit="batch", disable=not progress):
        if max_images is not None and seen >= max_images:
            break
        for i, (valid, seg) in enumerate(zip(batch["sizes"], batch["seg"])):
            if max_images is not None and seen >= max_images:
                break
            image = batch["images"][i: i + 1, :, : valid[0], : valid[1]].to(device)
            logits = slide_logits(scores, image, size, SLIDE_STRIDE_RATE)
            if tuple(logits.shape[-2:]) != tuple(seg.shape):
                logits = F.interpolate(logits, size=tuple(seg.shape), mode="bilinear", align_corners=False)
            pred = logits.argmax(1)[0].cpu()
            metric.update(pred[None], seg[None])
            counts += torch.bincount(seg[seg != IGNORE_INDEX].flatten(), minlength=len(names))[: len(names)]
            targets_all.append(seg)
            if len(rows) < keep_samples:
                rows.append((_to_uint8(image[0].cpu(), tuple(seg.shape), spec.mean, spec.std), seg, pred))
            seen += 1
    result = metric.compute()
    majority = int(counts.argmax())
    constant = SegmentationMetric(len(names), IGNORE_INDEX, names)
    for seg in targets_all:
        constant.update(torch.full_like(seg, majority)[None], seg[None])
    base = constant.compute()
    result["baseline"] = {"predict": names[majority], "mIoU": base["mIoU"], "pixel_acc": base["pixel_acc"]}
    result["n_val"] = seen
    if keep_samples:
        result["samples"] = rows
    return result


def _to_uint8(image: Tensor, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """A normalised val image back to uint8 RGB at the label's size, for drawing."""
    img = (image * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).clamp(0, 1)
    img = (img * 255).round()
    if tuple(img.shape[-2:]) != size:
        img = F.interpolate(img[None], size=size, mode="bilinear")[0].round().clamp(0, 255)
    return img.to(torch.uint8)


def format_linear_seg(result: dict[str, Any]) -> str:
    """One line: probe mIoU and pixel accuracy beside the constant baseline."""
    b = result["baseline"]
    miou = result["mIoU"]
    return (f"linear-seg mIoU {miou:.4f}  pixel acc {result['pixel_acc']:.4f}  ({result['n_val']} val images; "
            f"constant '{b['predict']}': mIoU {b['mIoU']:.4f}, pixel acc {b['pixel_acc']:.4f})"
            + ("" if math.isfinite(miou) else "  [no class present]"))
