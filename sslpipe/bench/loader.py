"""Loader throughput benchmark: our shard stream (each crop backend) vs torchvision ImageFolder vs decode+augment.

Every path runs the recipe's multi-crop on the same images in one process run, so the ratios answer "does streaming
tar shards cost anything over reading files, how much faster is the uint8 crop path than the torchvision one, and how
close is each loader to its decode+augment ceiling?". Loaders use `num_workers` worker processes (one torch thread
each, as DataLoader sets it); the ceiling runs in this process under one torch thread for at most `max_seconds`, and
so do the loaders with `num_workers=0`. Per-core figures divide a loader's rate by its worker count (the main process
only collates), which is what sizing a GPU node's data workers needs. The stream and the ceiling decode as the trainer
does (`stream.decode_sample`: a JPEG reduced in the decoder when the transform offers a `draft_size`); ImageFolder
decodes with its own PIL loader, in full.

ImageFolder runs the reference transform (torchvision on PIL) -- the loader most users start from.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate
from torchvision.datasets import ImageFolder

from sslpipe.data.remote import Reading
from sslpipe.data.stream import IMAGE_KEYS, StreamDataset, build_loader, decode_sample, resolve_shards


class _ApplyTransform:
    """sample_fn for the stream: the image through `transform` (a class, so it pickles into worker processes)."""

    def __init__(self, transform: Callable[[Image.Image], Any]) -> None:
        self.transform = transform

    @property
    def draft_size(self) -> Callable[[int, int], tuple[int, int]] | None:
        """The transform's reduced-decode hint, offered to the stream as the trainer's `MultiCropSample` offers it."""
        return getattr(self.transform, "draft_size", None)

    def __call__(self, raw: dict) -> Any:
        return self.transform(raw["image"])


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one intra-op thread (as in a DataLoader worker) for a path reported as one core; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _raw_samples(shard_dir: str, split: str, max_images: int) -> list[dict]:
    """The first `max_images` raw samples (encoded bytes) of the split, in shard order."""
    reader = StreamDataset(resolve_shards(shard_dir, split), sample_fn=lambda s: s, epoch=0, seed=0, rank=0,
                           world_size=1, num_workers=1, shuffle=False, shuffle_buffer=1, resampled=False,
                           reading=Reading())
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


def _rate(batches: Any, batch_size: int, num_batches: int, finish: Callable[[Any], Any] | None = None) -> float:
    """Images per second to pull `num_batches` batches (worker start-up included: every epoch pays it), each then
    passed through `finish` when given (the device half of the device crop path)."""
    start = time.perf_counter()
    it = iter(batches)
    for _ in range(num_batches):
        batch = next(it)
        if finish is not None:
            finish(batch)
    elapsed = time.perf_counter() - start
    del it
    return num_batches * batch_size / elapsed


def _collate(batch: list) -> Any:
    return default_collate(batch)


def _keep_list(batch: list) -> list:
    return batch


class _DeviceCrops:
    """The main-process half of `crops.backend: device`: crop a batch of `DeferredCrops` on `device`."""

    def __init__(self, transform: Any, device: torch.device) -> None:
        from sslpipe.data.device_views import crop_sizes

        self.device, self.sizes = device, crop_sizes(transform)

    def __call__(self, batch: list) -> None:
        from sslpipe.data.device_views import augment_batch

        images = [item.image.to(self.device, non_blocking=True) for item in batch]
        augment_batch(images, torch.stack([item.params for item in batch]), self.sizes)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def format_table(result: dict[str, Any]) -> str:
    """A small text table of the rates, per core, and their ratio to ImageFolder."""
    ref = result["imagefolder_img_s"]
    workers = max(1, result["num_workers"])
    rows = [(f"sslpipe stream, {b} crops", result[f"stream_{b}_img_s"], workers) for b in result["backends"]]
    rows.append(("torchvision ImageFolder", ref, workers))
    rows += [(f"decode+augment, {b} crops", result[f"ceiling_{b}_img_s"], 1) for b in result["backends"]]

    def where(name: str) -> str:
        here = not result["num_workers"] or name.startswith("decode")
        return "this process, 1 thread" if here else f"{workers} worker(s), 1 thread each"

    lines = [f"{'path':<34}{'images/s':>10}{'per core':>10}{'x ImageFolder':>15}  processes",
             *(f"{name:<34}{rate:>10.1f}{rate / cores:>10.1f}{rate / ref:>15.2f}  {where(name)}"
               for name, rate, cores in rows)]
    return "\n".join(lines)


def run_loader_bench(shard_dir: str, image_folder: str | None = None, *,
                     transforms: dict[str, Callable[[Image.Image], Any]], batch_size: int = 64, num_workers: int = 0,
                     max_images: int = 1024, split: str = "train", rounds: int = 2,
                     max_seconds: float = 30.0, device: str | None = None) -> dict[str, Any]:
    """Images/s of the shard stream with each transform of `transforms` (name -> transform; the one named
    "torchvision" also drives ImageFolder, else the first), of ImageFolder on the same images, and of
    decode+augment alone (bounded by `max_seconds` per round). If `image_folder` is None the first `max_images`
    images of the shards are written, bytes unchanged, into a temporary ImageFolder tree. A device-path transform
    (`crops.backend: device`) is timed with its second half, the batch cropped on `device` (default: cuda when
    present), included."""
    samples = _raw_samples(shard_dir, split, max_images)
    num_batches = len(samples) // batch_size
    if num_batches < 1:
        raise ValueError(f"{shard_dir}: {len(samples)} images in split {split!r}, fewer than one batch of "
                         f"{batch_size}; lower batch_size")
    n_images = num_batches * batch_size
    backends = list(transforms)
    reference = transforms.get("torchvision", transforms[backends[0]])
    result: dict[str, Any] = {"images": n_images, "batch_size": batch_size, "num_workers": num_workers,
                              "backends": backends, "max_seconds": max_seconds}

    in_process = _one_thread if num_workers == 0 else nullcontext  # 0 workers: the transform runs here

    def device_half(transform: Callable) -> Callable[[Any], Any] | None:
        from sslpipe.data.device_views import DeviceMultiCropTransform

        if not isinstance(transform, DeviceMultiCropTransform):
            return None
        return _DeviceCrops(transform, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))

    def stream_rate(transform: Callable) -> float:
        finish = device_half(transform)
        stream = build_loader(shard_dir, split=split, sample_fn=_ApplyTransform(transform),
                              collate_fn=_keep_list if finish else _collate, batch_size=batch_size,
                              num_workers=num_workers, num_batches=num_batches, shuffle_buffer=min(1000, n_images),
                              resampled=True,  # shards with replacement: no pass ends (and restarts) mid-measure
                              pin_memory=finish is not None and finish.device.type == "cuda")
        with in_process():
            return _rate(stream, batch_size, num_batches, finish)

    def ceiling_rate(transform: Callable) -> float:
        draft = getattr(transform, "draft_size", None)
        finish = device_half(transform)
        with _one_thread():
            start, done = time.perf_counter(), 0
            for i in range(0, n_images, batch_size):
                images = [decode_sample(sample, draft)["image"] for sample in samples[i:i + batch_size]]
                out = [transform(img) for img in images]
                finish(out) if finish is not None else _collate(out)
                done += len(images)
                if time.perf_counter() - start > max_seconds:
                    break
            return done / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory(prefix="sslpipe-bench-") as tmp:
        root = image_folder
        if root is None:
            root = os.path.join(tmp, "images")
            _write_image_folder(samples[:n_images], root)

        def folder_rate() -> float:
            folder = DataLoader(ImageFolder(root, transform=reference), batch_size=batch_size, shuffle=True,
                                num_workers=num_workers, drop_last=True, collate_fn=_collate,
                                generator=torch.Generator().manual_seed(0))
            with in_process():
                return _rate(folder, batch_size, min(num_batches, len(folder)))

        # Rounds alternate the paths so that each sees the same machine state; the best round counts.
        paths: dict[str, Callable[[], float]] = {f"stream_{b}_img_s": (lambda t=t: stream_rate(t))
                                                 for b, t in transforms.items()}
        paths["imagefolder_img_s"] = folder_rate
        paths.update({f"ceiling_{b}_img_s": (lambda t=t: ceiling_rate(t)) for b, t in transforms.items()})
        rates: dict[str, list[float]] = {key: [] for key in paths}
        for _ in range(rounds):
            for key, fn in paths.items():
                rates[key].append(fn())
    result.update({key: max(values) for key, values in rates.items()}, rounds=rounds)
    cores = max(1, num_workers)
    for b in backends:
        result[f"stream_{b}_per_core"] = result[f"stream_{b}_img_s"] / cores
        result[f"stream_{b}_vs_imagefolder"] = result[f"stream_{b}_img_s"] / result["imagefolder_img_s"]
        result[f"stream_{b}_vs_ceiling"] = result[f"stream_{b}_img_s"] / result[f"ceiling_{b}_img_s"]
    if {"fast", "torchvision"} <= set(backends):
        result["fast_vs_torchvision_ceiling"] = result["ceiling_fast_img_s"] / result["ceiling_torchvision_img_s"]
    result["table"] = format_table(result)
    return result


BACKEND_SETS = {"both": ("fast", "torchvision"), "all": ("fast", "torchvision", "device")}


def run_loader_bench_from_recipe(shard_dir: str | None, recipe: str, *,
                                 backends: tuple[str, ...] = ("fast", "torchvision"), batch_size: int = 64,
                                 num_workers: int = 0, max_images: int = 4096, rounds: int = 2,
                                 max_seconds: float = 30.0, device: str | None = None,
                                 photos: int | None = None) -> dict[str, Any]:
    """`sslpipe bench loader`: the benchmark with the recipe's own multi-crop settings, printed as a table. With
    `photos`, first write that many photographs as shards (into `shard_dir`, default runs/bench_photos)."""
    from sslpipe.recipes import load_config
    from sslpipe.recipes.multicrop import multicrop_from_config

    c = load_config(recipe, ["data.train=unused"]).crops  # a bad recipe fails before any photo is written
    from sslpipe.bench.photos import bench_shards

    shard_dir = bench_shards(shard_dir, photos)
    transforms = {b: multicrop_from_config(c.model_copy(update={"backend": b})) for b in backends}
    result = run_loader_bench(shard_dir, transforms=transforms, batch_size=batch_size, num_workers=num_workers,
                              max_images=max_images, rounds=rounds, max_seconds=max_seconds, device=device)
    result["crops"] = f"{c.n_global}x{c.global_size}px + {c.n_local}x{c.local_size}px from {recipe}"
    print(f"{result['images']} images, batch {batch_size}, {result['crops']}")
    print(result["table"])
    return result
