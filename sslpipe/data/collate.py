"""Per-sample multi-crop + mask building and the crop-major batch collate (docs/internals.md §3).

Written by hand: torch's default collate would nest crops image-major, while iBOT/DINO batch crops of one resolution
together, crop-major (crop 0 of every image, then crop 1, ...), which is what the losses' ``chunk(n_crops)`` expects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sslpipe.data.masking import MaskGenerator


class MultiCropSample:
    """Maps a raw stream sample ``{"image": PIL, "label": int, ...}`` to ``{"crops", "masks", "label", "n_global"}``
    (``n_global`` is an extra key so the collate needs no guessing when global and local crops have one size).

    One mask per GLOBAL crop (local crops are never masked); the mask grid is the generator's ``grid``, which must be
    (global_size // patch_size) squared. The number of global crops is read from ``crop_transform.n_global``.
    """

    def __init__(
        self, crop_transform: Callable[[Image.Image], list[Tensor]], mask_generator: MaskGenerator | None = None
    ) -> None:
        self.crop_transform = crop_transform
        self.mask_generator = mask_generator
        self.n_global = int(getattr(crop_transform, "n_global", 2))
        global_size = getattr(crop_transform, "global_size", None)
        if mask_generator is not None and global_size is not None:
            h, w = mask_generator.grid
            if global_size % h or global_size % w or global_size // h != global_size // w:
                raise ValueError(
                    f"MultiCropSample: mask grid {mask_generator.grid} does not divide global crop size {global_size} "
                    "into square patches; set the grid to (global_size // patch_size,) * 2"
                )

    @property
    def draft_size(self) -> Callable[[int, int], tuple[int, int]] | None:
        """The crop transform's reduced-decode hint (see `stream.decode_sample`), when it has one."""
        return getattr(self.crop_transform, "draft_size", None)

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        if "image" not in raw:
            raise KeyError(f"MultiCropSample: sample {raw.get('key', '?')!r} has no 'image' key")
        crops = self.crop_transform(raw["image"])
        masks = [] if self.mask_generator is None else [self.mask_generator() for _ in range(self.n_global)]
        out = {"masks": masks, "label": int(raw.get("label", -1)), "n_global": self.n_global, "key": raw.get("key")}
        if hasattr(crops, "params"):  # crops.backend device: the image and its crops' parameters travel instead
            return {**out, "image": crops.image, "params": crops.params}
        return {**out, "crops": crops}


def mask_weights(masks: Tensor) -> Tensor:
    """(M,) float: 1 / (number of masked patches of its crop) for each masked position of masks (GB, ...), in the
    order of ``masks.nonzero()`` (the official DINOv2 collate's ``masks_weight``)."""
    m = masks.reshape(masks.shape[0], -1).to(torch.bool)
    return (1.0 / m.sum(dim=1).clamp(min=1)).unsqueeze(1).expand_as(m)[m]


def mask_batch_fields(masks: Tensor, pad_to: int | None = None) -> dict[str, Tensor]:
    """The batch keys of the masks (GB, H, W) bool: ``masks``, ``mask_indices`` (M,), the masked positions in the
    flattened (GB * N) patch tokens, and ``masks_weight`` (M,), 1 / #masked of their crop (the official DINOv2
    collate's keys). Computed in the loader workers, so that a step selects the masked tokens with `index_select`:
    boolean indexing on a GPU waits for the device to count them (a host synchronisation per call).

    ``pad_to`` (the mask sampler's upper bound, the official collate's ``upperbound``) pads both to that length:
    the extra indices repeat the last masked position (0 when none is masked) with weight 0, so that every batch of
    a run has the same shapes and the losses, which weight each row, read the padding as absent."""
    flat = masks.flatten(1)
    indices, weights = flat.flatten().nonzero().flatten(), mask_weights(flat)
    if pad_to is not None:
        if indices.numel() > pad_to:
            raise ValueError(f"mask_batch_fields: {indices.numel()} masked patches exceed the bound pad_to={pad_to}")
        fill = indices[-1:] if indices.numel() else indices.new_zeros(1)
        indices = torch.cat([indices, fill.expand(pad_to - indices.numel())])
        weights = torch.cat([weights, weights.new_zeros(pad_to - weights.numel())])
    return {"masks": masks, "mask_indices": indices, "masks_weight": weights}


def _mask_keys(masks: Tensor | None) -> dict[str, Tensor | None]:
    return {"masks": None} if masks is None else mask_batch_fields(masks)


def collate_multicrop(samples: list[dict[str, Any]]) -> dict[str, Tensor | None]:
    """Stack crops crop-major: ``global_crops`` (n_global*B, C, H, W), ``local_crops`` (n_local*B, C, h, w) or None,
    ``masks`` bool (n_global*B, Hp, Wp) or None, ``labels`` long (B,), ``keys`` (the samples' shard keys). The
    number of global crops is the sample's ``n_global`` key, else its number of masks, else the run of leading crops
    with the first crop's size. Device crops (``params`` in the samples) give ``images`` and ``crop_params`` (a numpy
    array (B, n_crops, 17), so that it stays on the host)."""
    if not samples:
        raise ValueError("collate_multicrop: empty batch")
    if "params" in samples[0]:  # device crops: decoded images (a list: sizes differ) and their crop parameters
        n_global = int(samples[0]["n_global"])
        masks = None
        if samples[0]["masks"]:
            masks = torch.from_numpy(np.stack([np.asarray(s["masks"][i], dtype=bool)
                                               for i in range(n_global) for s in samples]))
        # crop_params as numpy: host metadata that the prefetch leaves on the host, where the crops read it
        params = torch.stack([s["params"] for s in samples]).numpy()
        return {"images": [s["image"] for s in samples], "crop_params": params,
                "global_crops": None, "local_crops": None, **_mask_keys(masks),
                "labels": torch.tensor([int(s["label"]) for s in samples], dtype=torch.long),
                "keys": [s.get("key") for s in samples]}
    n_crops = len(samples[0]["crops"])
    n_masks = len(samples[0]["masks"])
    if any(len(s["crops"]) != n_crops or len(s["masks"]) != n_masks for s in samples):
        raise ValueError("collate_multicrop: samples have different numbers of crops or masks")
    if "n_global" in samples[0]:
        n_global = int(samples[0]["n_global"])
    elif n_masks:
        n_global = n_masks
    else:
        global_hw = samples[0]["crops"][0].shape[-2:]
        n_global = next((i for i, c in enumerate(samples[0]["crops"]) if c.shape[-2:] != global_hw), n_crops)
    if n_masks and n_masks != n_global:
        raise ValueError(f"collate_multicrop: {n_masks} masks per sample but {n_global} global crops")

    def stack(index: range) -> Tensor | None:
        if len(index) == 0:
            return None
        return torch.stack([s["crops"][i] for i in index for s in samples])

    masks = None
    if n_masks:
        masks = torch.from_numpy(
            np.stack([np.asarray(s["masks"][i], dtype=bool) for i in range(n_masks) for s in samples])
        )
    return {
        "global_crops": stack(range(n_global)),
        "local_crops": stack(range(n_global, n_crops)),
        **_mask_keys(masks),
        "labels": torch.tensor([int(s["label"]) for s in samples], dtype=torch.long),
        "keys": [s.get("key") for s in samples],
    }
