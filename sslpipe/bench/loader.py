"""Loader throughput benchmark: our shard stream vs torchvision ImageFolder vs decode+augment from memory.

All three paths run the same transform on the same images in one process run, so the ratios answer "does
streaming tar shards cost anything over reading files, and how close are both to the decode+augment ceiling?".
The ceiling runs in this process only (one core); the two loaders use `num_workers` worker processes, so with
`num_workers > 1` a loader can beat the single-core ceiling -- the table prints the worker count next to it.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate
from torchvision.datasets import ImageFolder

from sslpipe.data.stream import IMAGE_KEYS, StreamDataset, build_loader, resolve_shards


class _ApplyTransform:
    """sample_fn for the stream: the image through `transform` (a class, so it pickles into worker processes)."""

    def __init__(self, transform: Callable[[Image.Image], Any]) -> None:
        self.transform = transform

    def __call__(self, raw: dict) -> Any:
        return self.transform(raw["image"])


def _raw_samples(shard_dir: str, split: str, max_images: int) -> list[dict]:
    """The first `max_images` raw samples (encoded bytes) of the split, in shard order."""
    reader = StreamDataset(resolve_shards(shard_dir, split), sample_fn=lambda s: s, epoch=0, seed=0, rank=0,
                           world_size=1, num_workers=1, shuffle=False, shuffle_buffer=1, resampled=False,
                           repeat=False, on_error="warn")
    out: list[dict] = []
    for url in reader.urls:
        for sample in reader.read_shard(url):
            if any(k in sample for k in IMAGE_KEYS):
                out.append(sample)
            if len(out) >= max_images:
                return out
    return out


def _write_image_folder(samples: list[dict], root: str) -> None:
    """Write the encoded bytes unchanged as `root/<class>/<key>.<ext>` (class "0" for unlabelled samples)."""
    for sample in samples:
        ext = next(k for k in IMAGE_KEYS if k in sample)
        label = sample["cls"].decode().strip() if "cls" in sample else "0"
        os.makedirs(os.path.join(root, label), exist_ok=True)
        name = sample["__key__"].replace("/", "_") + "." + ext
        with open(os.path.join(root, label, name), "wb") as f:
            f.write(sample[ext])


def _rate(batches: Any, batch_size: int, num_batches: int) -> float:
    """Images per second to pull `num_batches` batches (worker start-up included: every epoch pays it)."""
    start = time.perf_counter()
    it = iter(batches)
    for _ in range(num_batches):
        next(it)
    elapsed = time.perf_counter() - start
    del it
    return num_batches * batch_size / elapsed


def _collate(batch: list) -> Any:
    return default_collate(batch)


def format_table(result: dict[str, Any]) -> str:
    """A small text table of the three rates and their ratios to ImageFolder."""
    ref = result["imagefolder_img_s"]
    rows = [("sslpipe stream (shards)", result["stream_img_s"], f"{result['num_workers']} workers"),
            ("torchvision ImageFolder", ref, f"{result['num_workers']} workers"),
            ("decode+augment in memory", result["decode_augment_img_s"], "1 process (ceiling)")]
    lines = [f"{'path':<26}{'images/s':>10}{'x ImageFolder':>15}  setting",
             *(f"{name:<26}{rate:>10.1f}{rate / ref:>15.2f}  {note}" for name, rate, note in rows)]
    return "\n".join(lines)


def run_loader_bench(shard_dir: str, image_folder: str | None = None, *,
                     transform: Callable[[Image.Image], Any], batch_size: int = 64, num_workers: int = 0,
                     max_images: int = 1024, split: str = "train", rounds: int = 2) -> dict[str, Any]:
    """Measure images/s of (1) the shard stream, (2) ImageFolder on the same images, (3) decode+augment only.

    If `image_folder` is None the first `max_images` images of the shards are written, bytes unchanged, into a
    temporary ImageFolder tree. Returns the rates, the ratios and a printable `table`.
    """
    samples = _raw_samples(shard_dir, split, max_images)
    num_batches = len(samples) // batch_size
    if num_batches < 1:
        raise ValueError(f"{shard_dir}: {len(samples)} images in split {split!r}, fewer than one batch of "
                         f"{batch_size}; lower batch_size")
    n_images = num_batches * batch_size
    result: dict[str, Any] = {"images": n_images, "batch_size": batch_size, "num_workers": num_workers}

    encoded = [s[next(k for k in IMAGE_KEYS if k in s)] for s in samples[:n_images]]

    def stream_rate() -> float:
        stream = build_loader(shard_dir, split=split, sample_fn=_ApplyTransform(transform), collate_fn=_collate,
                              batch_size=batch_size, num_workers=num_workers, num_batches=num_batches,
                              shuffle_buffer=min(1000, n_images))
        return _rate(stream, batch_size, num_batches)

    def ceiling_rate() -> float:
        start = time.perf_counter()
        for i in range(0, n_images, batch_size):
            _collate([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in encoded[i:i + batch_size]])
        return n_images / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory(prefix="sslpipe-bench-") as tmp:
        root = image_folder
        if root is None:
            root = os.path.join(tmp, "images")
            _write_image_folder(samples[:n_images], root)

        def folder_rate() -> float:
            folder = DataLoader(ImageFolder(root, transform=transform), batch_size=batch_size, shuffle=True,
                                num_workers=num_workers, drop_last=True, collate_fn=_collate,
                                generator=torch.Generator().manual_seed(0))
            return _rate(folder, batch_size, min(num_batches, len(folder)))

        # Rounds alternate the three paths so that each sees the same machine state; the best round counts.
        rates: dict[str, list[float]] = {"stream_img_s": [], "imagefolder_img_s": [], "decode_augment_img_s": []}
        for _ in range(rounds):
            for key, fn in zip(rates, (stream_rate, folder_rate, ceiling_rate)):
                rates[key].append(fn())
    result.update({key: max(values) for key, values in rates.items()}, rounds=rounds)

    result["stream_vs_imagefolder"] = result["stream_img_s"] / result["imagefolder_img_s"]
    result["stream_vs_ceiling"] = result["stream_img_s"] / result["decode_augment_img_s"]
    result["table"] = format_table(result)
    return result


def run_loader_bench_from_recipe(shard_dir: str, recipe: str, *, batch_size: int = 64, num_workers: int = 0,
                                 max_images: int = 4096) -> dict[str, Any]:
    """`sslpipe bench loader`: the benchmark with the recipe's own multi-crop transform, printed as a table."""
    from sslpipe.config import load_config
    from sslpipe.data.views import multicrop_from_config

    c = load_config(recipe).crops
    transform = multicrop_from_config(c)
    result = run_loader_bench(shard_dir, transform=transform, batch_size=batch_size, num_workers=num_workers,
                              max_images=max_images)
    print(f"{result['images']} images, batch {batch_size}, {c.n_global}x{c.global_size}px + "
          f"{c.n_local}x{c.local_size}px crops from {recipe}")
    print(result["table"])
    return result
