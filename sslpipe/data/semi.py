"""Labelled + unlabelled segmentation streams for semi-supervised training (U2PL).

Labelled shards carry `seg.png` (255 = ignore); unlabelled shards usually only images. Each training batch holds
`batch_size` labelled and `round(batch_size * unlabeled_ratio)` unlabelled images, streamed by two independent
`build_loader`s (own shard schedule, own augmentation seed) and zipped; both are cut at the same number of batches per
epoch, so the smaller set repeats within an epoch (the official code repeats the labelled list to the length of the
unlabelled one: `u2pl/dataset/pascal_voc.py`).

Views: both streams get U2PL's joint augmentation (`sslpipe.data.u2pl_views.U2PLSegTransform`: the official random
scale, flip, crop padded to the crop size). An unlabelled image also gets `valid` (False on the crop's padding: the
recipe gives it no pseudo-label) and `truth_u`: the ground truth when its shard has a `seg.png`, else 255 everywhere.
`truth_u` exists for diagnostics only (pseudo-label accuracy): no loss may read it. Which images are labelled is
chosen when the shards are written (`sslpipe.ingest.semi_shards`).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from sslpipe.data.remote import Reading
from sslpipe.data.stream import build_loader, derive_seed
from sslpipe.data.u2pl_views import U2PLSegTransform


# ------------------------------------------------------------------------------------------------------ samples
class LabeledSample:
    """raw stream sample -> (image (3, H, W), label (H, W) long, key); a clear error when the shard has no seg.png."""

    def __init__(self, transform: U2PLSegTransform) -> None:
        self.transform = transform

    def __call__(self, raw: dict[str, Any]) -> tuple[Tensor, Tensor, str]:
        if "seg" not in raw:
            raise ValueError(f"sample {raw['key']} of {raw['url']} has no seg.png: labelled data (data.train) must "
                             "be segmentation shards (`sslpipe shards --seg-list/--voc/--cityscapes ...`)")
        image, label = self.transform(raw["image"], raw["seg"])
        return image, label, raw["key"]


class UnlabeledSample:
    """raw stream sample -> (image, valid (H, W) bool: False on the crop's padding, truth (H, W) long: the seg.png
    when present (255 on padding), else all 255, key)."""

    def __init__(self, transform: U2PLSegTransform) -> None:
        self.transform = transform

    def __call__(self, raw: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, str]:
        image, valid, truth = self.transform.unlabeled(raw["image"], raw.get("seg"))
        return image, valid, truth, raw["key"]


def collate_samples(samples: list[tuple]) -> tuple:
    """Stack every tensor field of the samples; the last field (the keys) stays a list."""
    return (*(torch.stack([s[i] for s in samples]) for i in range(len(samples[0]) - 1)), [s[-1] for s in samples])


# ------------------------------------------------------------------------------------------------------ loaders
class SemiBatches:
    """Zips the labelled and unlabelled loaders of one epoch into dicts {image_l, label_l, keys_l, image_u, valid_u,
    truth_u, keys_u}; `unlabeled` may be None (supervised only: the *_u entries absent)."""

    def __init__(self, labeled: Any, unlabeled: Any | None, num_batches: int) -> None:
        self.labeled, self.unlabeled, self.num_batches = labeled, unlabeled, num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        it_u = iter(self.unlabeled) if self.unlabeled is not None else None
        for i, (image_l, label_l, keys_l) in enumerate(self.labeled):
            if i >= self.num_batches:
                return
            batch = {"image_l": image_l, "label_l": label_l, "keys_l": keys_l}
            if it_u is not None:
                image_u, valid_u, truth_u, keys_u = next(it_u)
                batch.update(image_u=image_u, valid_u=valid_u, truth_u=truth_u, keys_u=keys_u)
            yield batch


def semi_loader(*, labeled: str, labeled_split: str, unlabeled: str | None, unlabeled_split: str,
                transform: U2PLSegTransform, batch_size: int, unlabeled_batch_size: int, num_batches: int,
                epoch: int, seed: int, rank: int, world_size: int, num_workers: int = 0, shuffle_buffer: int = 1000,
                resampled: bool = False, reading: Reading = Reading()) -> SemiBatches:
    """The paired stream of one rank and epoch (module docstring); deterministic in (seed, epoch, rank)."""
    common = dict(epoch=epoch, rank=rank, world_size=world_size, num_workers=num_workers, shuffle=True,
                  shuffle_buffer=shuffle_buffer, resampled=resampled, num_batches=num_batches, reading=reading)
    lab = build_loader(labeled, split=labeled_split, sample_fn=LabeledSample(transform), collate_fn=collate_samples,
                       batch_size=batch_size, seed=seed, **common)
    unl = None
    if unlabeled is not None:
        unl = build_loader(unlabeled, split=unlabeled_split, sample_fn=UnlabeledSample(transform),
                           collate_fn=collate_samples, batch_size=unlabeled_batch_size,
                           seed=derive_seed(seed, 0x5EED), **common)
    return SemiBatches(lab, unl, num_batches)
