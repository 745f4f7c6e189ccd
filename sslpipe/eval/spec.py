"""What every probe shares, stated once: how images become features (`FeatureSpec`) and which labelled images it
reads (`ProbeData`).

A probe of an export builds its spec with `FeatureSpec.from_export`, so the input size, mean and std always come from
the export's `config.json` (flags only override them); the periodic kNN of a training run builds it from the run's
crops. The kNN, linear, linear-seg and Q-score probes and `sslpipe show` take the spec whole.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from sslpipe.config.core import patch_multiples
from sslpipe.data.remote import Reading
from sslpipe.data.views import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from sslpipe.models.backbones import has_class_token, pooled_features

Pooling = Literal["cls", "blocks", "patch"]
Precision = Literal["fp32", "autocast"]
FeatureFn = Callable[[nn.Module, Tensor], Tensor]


def has_block_cls(model: nn.Module) -> bool:
    """A [CLS] token at every block: a ViT with a class token (`has_class_token`) and timm's
    `forward_intermediates`."""
    return has_class_token(model) and hasattr(model, "forward_intermediates")


class LastBlocksCLS:
    """Feature function of the `blocks` pooling: concat of the last `n` blocks' CLS tokens after the final norm.

    timm's `forward_intermediates(norm=True)` applies `model.norm` to every returned block output, as DINO's
    `get_intermediate_layers` does; `return_prefix_tokens=True` hands back the prefix tokens whose first is CLS.
    A backbone without a class token (a CNN) is refused (`check`): it has no per-block CLS, and a silent fallback to
    its pooled features would leave `n` unread; use the `cls` pooling for it.
    """

    def __init__(self, n: int = 4) -> None:
        if n < 1:
            raise ValueError(f"n_last_blocks must be >= 1, got {n}")
        self.n = n

    def check(self, model: nn.Module) -> None:
        """Refuse a model this pooling cannot read: no class token, or fewer than `n` blocks."""
        if not has_block_cls(model):
            raise ValueError(f"--n-last-blocks (the last blocks' CLS tokens) is read only for ViTs: this "
                             f"{type(model).__name__} backbone has no class token and is probed on its pooled "
                             "features; drop --n-last-blocks")
        depth = len(getattr(model, "blocks", ()))
        if depth and self.n > depth:
            raise ValueError(f"the linear probe asks for the last {self.n} blocks' CLS, but this backbone has "
                             f"{depth} blocks: pass --n-last-blocks {depth} or fewer")

    def __call__(self, model: nn.Module, x: Tensor) -> Tensor:
        self.check(model)
        blocks = model.forward_intermediates(x, indices=self.n, norm=True, output_fmt="NLC",
                                             intermediates_only=True, return_prefix_tokens=True)
        return torch.cat([prefix[:, 0] for _, prefix in blocks], dim=-1)

    def __repr__(self) -> str:
        return f"LastBlocksCLS(n={self.n})"


@dataclass(frozen=True)
class FeatureSpec:
    """How images become features.

    Preprocessing: resize the short side to `resize` (default `img_size` x 256/224, DINO's 256 -> 224 ratio), centre
    crop `crop` (default `img_size`; at most the resize, else refused: the crop would be padded with black),
    normalise with `mean` / `std`. Pooling: `cls` = the pre-logits feature (CLS after the final norm for a ViT,
    pooled features for a CNN: kNN, Q-score, show), `blocks` = the CLS tokens of the last `layers` blocks
    concatenated (the linear probe of a ViT, DINO: 4; refused for a CNN), `patch` = the patch tokens of the last
    `layers` blocks (linear-seg). Execution: `batch_size` images per forward pass with `num_workers` loader
    processes on `device` (None: the model's GPU, else a GPU when present, else the CPU), in float32
    (`precision="fp32"`, DINO's eval) or under CUDA autocast (`"autocast"`: faster, not bit-comparable with the CPU).
    """

    img_size: int = 224
    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    pooling: Pooling = "cls"
    layers: int = 1
    batch_size: int = 256
    num_workers: int = 0
    device: str | torch.device | None = None
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        # lists from config.json or a recipe become tuples: the spec stays hashable and its text stable
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.pooling not in ("cls", "blocks", "patch"):
            raise ValueError(f"pooling must be 'cls', 'blocks' or 'patch', got {self.pooling!r}")
        if self.precision not in ("fp32", "autocast"):
            raise ValueError(f"precision must be 'fp32' or 'autocast', got {self.precision!r}")
        if self.layers < 1:
            raise ValueError(f"layers (the last N blocks) must be >= 1, got {self.layers}")
        if self.pooling != "patch" and self.input_size > self.short_side:
            # T.CenterCrop pads a crop larger than the image with black: features of a frame, not of the image.
            # (`patch`, linear-seg, has its own dense views: `crop` is its window and there is no resize.)
            raise ValueError(f"the centre crop {self.input_size} (--crop, eval.crop) is larger than the resize "
                             f"{self.short_side} (--resize, eval.resize; default: the image size x 256/224), so the "
                             f"image would be padded with black: pass --resize {self.input_size} or more, or a "
                             "smaller --crop")

    @classmethod
    def from_export(cls, export: str | Path, **overrides: Any) -> FeatureSpec:
        """The spec of an export folder: its `img_size`, `mean` and `std`, then every override that is not None
        (a flag left at None keeps the export's value or the default)."""
        from sslpipe.weights.export import read_export_config

        cfg = read_export_config(export)
        fields = {"img_size": int(cfg["img_size"]), "mean": cfg["mean"], "std": cfg["std"]}
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    def check_patches(self, model: nn.Module) -> None:
        """Refuse an input size a ViT's patches do not tile (timm's bare assertion otherwise, at the first batch
        or, in a training run's periodic kNN, after the epoch's training). Nothing to check for a CNN or a ViT
        built with `dynamic_img_pad` (timm pads the image)."""
        embed = getattr(getattr(model, "vit", model), "patch_embed", None)  # a MaskedViT holds its timm ViT
        sides = getattr(embed, "patch_size", None)
        if sides is None or getattr(embed, "dynamic_img_pad", False):
            return
        patch = math.lcm(*(int(s) for s in (sides if isinstance(sides, (tuple, list)) else (sides,))))
        size = self.input_size
        if size % patch:
            raise ValueError(f"the crop {size} (--crop, --size for linear-seg; eval.crop in a recipe) is not a "
                             f"multiple of the backbone's patch size {patch}, so its patches would not tile the "
                             f"image: use {patch_multiples(size, patch)}")

    @property
    def input_size(self) -> int:
        """The side of the images the backbone receives (the centre crop)."""
        return self.crop or self.img_size

    @property
    def short_side(self) -> int:
        """The short side an image is resized to before the centre crop."""
        return self.resize or round(self.img_size * 256 / 224)

    def transform(self) -> EvalTransform:
        """PIL image -> normalised (3, input_size, input_size) tensor."""
        return EvalTransform(resize=self.short_side, crop=self.input_size, mean=self.mean, std=self.std)

    def feature_fn(self) -> FeatureFn:
        """`feature_fn(model, images)` -> (B, D) features of the `cls` or `blocks` pooling."""
        if self.pooling == "cls":
            return pooled_features
        if self.pooling == "blocks":
            return LastBlocksCLS(self.layers)
        raise ValueError("pooling 'patch' gives dense (B, C, h, w) maps, not one vector per image: the linear "
                         "segmentation probe reads them with sslpipe.eval.linear_seg.PatchFeatures")

    def cache_key(self) -> str:
        """Every field that changes the features (not batch size, workers or device): part of the cache
        fingerprint, so a cache written under another spec is not reused."""
        return (f"resize={self.short_side}|crop={self.input_size}|mean={self.mean}|std={self.std}|"
                f"pooling={self.pooling}|layers={self.layers}|precision={self.precision}")


@dataclass(frozen=True)
class ProbeData:
    """Which labelled images a probe reads: shard specs (a directory with manifest.json, a pattern or a list) and
    splits of the train and val sets, the first `max_train` / `max_val` samples of each (None: all), and the number
    of classes (None: from the labels, or the manifest for segmentation)."""

    train: str | Sequence[str]
    val: str | Sequence[str]
    train_split: str = "train"
    val_split: str = "val"
    max_train: int | None = None
    max_val: int | None = None
    num_classes: int | None = None
    reading: Reading = Reading()  # remote retries and timeouts: a training run's data.* keys
