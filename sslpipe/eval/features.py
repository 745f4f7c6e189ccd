"""Streamed feature extraction for the kNN and linear probes (docs/internals.md §6).

Shards are read once, in a fixed order (no shuffle, every sample, last partial batch kept), through the same
WebDataset stream as training; a `FeatureSpec` (sslpipe/eval/spec.py) says how images become features: by default
the backbone's pre-logits output (`sslpipe.models.backbones.pooled_features`), for the linear probe the CLS tokens of
the last blocks (`LastBlocksCLS`).
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from sslpipe.data.manifest import file_stamp
from sslpipe.data.remote import Reading
from sslpipe.data.stream import build_loader, count_samples, resolve_shards
from sslpipe.errors import WriteFailed, io_failure
from sslpipe.files import write_text_atomic

if TYPE_CHECKING:
    from sslpipe.eval.spec import FeatureSpec, ProbeData

class _EvalSample:
    """sample_fn for the stream: (transformed image, label). A class, so DataLoader workers can pickle it."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, raw: dict[str, Any]) -> tuple[Tensor, int]:
        return self.transform(raw["image"]), int(raw["label"])


def _collate(batch: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    images, labels = zip(*batch)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def fingerprint(model: nn.Module, shards: str | list[str], split: str, spec: FeatureSpec,
                max_samples: int | None, reading: Reading = Reading()) -> str:
    """sha256 over the model weights, the resolved shards (path, size, mtime), the split, the sample cap and the
    spec's `cache_key` (preprocessing, pooling, precision): a cache written for anything else is not reused."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for url in resolve_shards(shards, split, reading):
        h.update(f"{url}|{file_stamp(url) or ''}".encode())
    h.update(f"{split}|{max_samples}|{spec.cache_key()}".encode())
    return h.hexdigest()


def autocast(device: torch.device, precision: str):
    """CUDA autocast (bf16 where supported, else fp16) for `precision="autocast"` on a GPU; nothing otherwise."""
    if precision != "autocast" or device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters (or buffers) live; the CPU for a module without any."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def default_device(model: nn.Module) -> torch.device:
    """The model's GPU when it is on one (this rank's GPU in training), else cuda when present, else the CPU."""
    current = model_device(model)
    if current.type == "cuda":
        return current
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def on_device(model: nn.Module, device: torch.device, *, train: bool = False) -> Iterator[nn.Module]:
    """Run `model` on `device` in eval (or train) mode for the duration of the block, then put it back where and
    how it was: a probe must not move the caller's model (the training teacher, a module a test still uses)."""
    original, was_training = model_device(model), model.training
    model.to(device).train(train)
    try:
        yield model
    finally:
        model.to(original).train(was_training)


def extract_features(
    model: nn.Module,
    shards: str | list[str],
    spec: FeatureSpec,
    *,
    split: str,
    max_samples: int | None = None,
    cache_path: str | Path | None = None,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    reading: Reading = Reading(),
) -> tuple[Tensor, Tensor]:
    """Features (N, D) float32 and labels (N,) int64 of a shard split, on the CPU, as `spec` says (transform,
    pooling, batch size, workers, device, precision).

    Every batch is moved to `spec.device` (default: the model's GPU, else a GPU when present, else the CPU); the model
    is moved there only for the extraction and then returned to its own device and mode. With `cache_path`, features
    are stored as safetensors with a `fingerprint` of model, shards and spec, and reloaded only when it matches.
    With `world_size` > 1 only this rank's shards are read (see `extract_features_sharded`).
    """
    device = torch.device(spec.device) if spec.device is not None else default_device(model)
    fp = None
    if cache_path is not None:
        fp = fingerprint(model, shards, split, spec, max_samples, reading)
        cache = Path(cache_path)
        if cache.is_file():
            with safe_open(str(cache), "pt") as f:
                stored = (f.metadata() or {}).get("fingerprint")
            if stored == fp:
                data = load_file(str(cache))
                return data["features"], data["labels"]

    feature_fn = spec.feature_fn()
    loader = build_loader(
        shards, split=split, sample_fn=_EvalSample(spec.transform()), collate_fn=_collate,
        batch_size=spec.batch_size, num_workers=spec.num_workers, shuffle=False, drop_last=False, rank=rank,
        world_size=world_size, reading=reading,
    )
    total = count_samples(shards, split, reading) if world_size == 1 else None
    if max_samples is not None:
        total = min(total, max_samples) if total is not None else max_samples
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    seen = 0
    with on_device(model, device), torch.inference_mode(), \
            tqdm(total=total, desc=f"features {split}", disable=not progress, unit="img") as bar:
        for images, batch_labels in loader:
            with autocast(device, spec.precision):
                out = feature_fn(model, images.to(device, non_blocking=True))
            feats.append(out.float().cpu())
            labels.append(batch_labels)
            seen += len(batch_labels)
            bar.update(len(batch_labels))
            if max_samples is not None and seen >= max_samples:
                break
    if not feats:
        raise ValueError(f"no samples in split {split!r} of {shards!r}")
    features, all_labels = torch.cat(feats), torch.cat(labels)
    if max_samples is not None:
        features, all_labels = features[:max_samples], all_labels[:max_samples]
    if cache_path is not None:
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(cache_path) + ".tmp")
        save_file({"features": features.contiguous(), "labels": all_labels.contiguous()}, str(tmp),
                  metadata={"fingerprint": fp})
        tmp.replace(cache_path)
    return features, all_labels


def extract_features_sharded(model: nn.Module, shards: str | list[str], spec: FeatureSpec, accelerator: Any, *,
                             split: str, max_samples: int | None = None, progress: bool = True,
                             reading: Reading = Reading()) -> tuple[Tensor, Tensor]:
    """Every process extracts its own share of the split's shards (the training split rule: rank r reads shards
    r, r + P, ...) and the shares are gathered, so a probe on P processes reads each image once and takes about
    1/P of the time. Every process returns all features, in rank order (kNN does not depend on the order).
    With fewer shards than processes the extra processes contribute nothing; `max_samples` caps each share at
    ceil(max_samples / P) (a different subset than one process would take, of the same size)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if world == 1:
        return extract_features(model, shards, spec, split=split, max_samples=max_samples, progress=progress,
                                reading=reading)
    readers = min(world, len(resolve_shards(shards, split, reading)))
    share = None if max_samples is None else -(-max_samples // readers)
    if rank < readers:
        feats, labels = extract_features(model, shards, spec, split=split, max_samples=share, progress=progress,
                                         rank=rank, world_size=readers, reading=reading)
    else:
        feats, labels = torch.zeros(0, feature_dim(model, spec)), torch.zeros(0, dtype=torch.long)
    device = accelerator.device
    counts = accelerator.gather(torch.tensor([len(labels)], device=device)).tolist()
    feats = accelerator.gather(accelerator.pad_across_processes(feats.to(device), dim=0)).cpu()
    labels = accelerator.gather(accelerator.pad_across_processes(labels.to(device), dim=0)).cpu()
    size = max(counts)
    keep = torch.cat([torch.arange(r * size, r * size + n) for r, n in enumerate(counts)])
    return feats[keep], labels[keep]


@torch.no_grad()
def feature_dim(model: nn.Module, spec: FeatureSpec) -> int:
    """The feature width, from one forward pass on a blank image through the spec's transform and pooling."""
    from PIL import Image

    image = spec.transform()(Image.new("RGB", (256, 256)))
    with on_device(model, model_device(model)):
        return int(spec.feature_fn()(model, image[None].to(model_device(model))).shape[-1])


def _fit_input_size(model: nn.Module, size: int) -> None:
    """A ViT exported at another size runs on `size` crops: timm resamples its position embedding (bicubic)."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not hasattr(model, "set_input_size"):
        return
    if tuple(patch_embed.img_size) != (size, size):
        model.set_input_size(img_size=(size, size))


def prepare_backbone(backbone: str | Path | nn.Module, spec: FeatureSpec) -> tuple[nn.Module, str | None]:
    """(model, source) for a probe. An export folder is loaded and, when it is a ViT of another input size,
    fitted to `spec.input_size` (a fixed-size ViT would reject the crops otherwise); its source is the path. A
    module is used as it is, never changed (it may be the training teacher); its source is None. Either is refused
    in one line when its patches do not tile the spec's crop (`FeatureSpec.check_patches`), before any image is
    read."""
    if isinstance(backbone, nn.Module):
        spec.check_patches(backbone)
        return backbone, None
    from sslpipe.weights.export import load_backbone

    model = load_backbone(backbone)
    spec.check_patches(model)
    _fit_input_size(model, spec.input_size)
    return model, str(backbone)


def extract_train_val(model: nn.Module, spec: FeatureSpec, data: ProbeData, *, cache_dir: str | Path | None = None,
                      cache_name: str = "", accelerator: Any = None,
                      progress: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Features and labels of the train and val splits (what every probe starts from), cached under `cache_dir`
    as `{cache_name}train.safetensors` / `{cache_name}val.safetensors` when it is given. With an `accelerator` of
    several processes each extracts its share and all get everything (`extract_features_sharded`; no cache)."""
    if accelerator is not None and accelerator.num_processes > 1:
        train_x, train_y = extract_features_sharded(model, data.train, spec, accelerator, split=data.train_split,
                                                    max_samples=data.max_train, progress=progress,
                                                    reading=data.reading)
        val_x, val_y = extract_features_sharded(model, data.val, spec, accelerator, split=data.val_split,
                                                max_samples=data.max_val, progress=progress, reading=data.reading)
        return train_x, train_y, val_x, val_y
    cache = Path(cache_dir) if cache_dir is not None else None
    train_x, train_y = extract_features(model, data.train, spec, split=data.train_split, max_samples=data.max_train,
                                        cache_path=cache / f"{cache_name}train.safetensors" if cache else None,
                                        progress=progress, reading=data.reading)
    val_x, val_y = extract_features(model, data.val, spec, split=data.val_split, max_samples=data.max_val,
                                    cache_path=cache / f"{cache_name}val.safetensors" if cache else None,
                                    progress=progress, reading=data.reading)
    return train_x, train_y, val_x, val_y


def write_json(path: str | Path, data: Any) -> Path:
    """Write a probe's result JSON atomically (a temporary file in the same folder, then `os.replace`), so a fault
    part-way (a full disk, a quota) leaves the previous result whole instead of truncated; a failed write is one
    `WriteFailed` line. A path that exists and is not a regular file (/dev/stdout, a pipe) is written in place: a
    rename over it would replace the device."""
    path = Path(path)
    text = json.dumps(data, indent=2) + "\n"
    in_place = path.exists() and not path.is_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if in_place:
            path.write_text(text)
            return path
        write_text_atomic(path, text)
    except OSError as err:
        if io_failure(err) is None:
            raise
        kept = "" if in_place else f" (a previous {path.name} is left as it was)"
        raise WriteFailed(f"could not write {path}: {io_failure(err)}{kept}; free space (or fix the disk / "
                          "permissions, or pass another --out) and run again") from err
    return path


def report(result: dict[str, Any], values: dict[str, float], out_json: str | Path | None, tracker: Any,
           step: int | None) -> None:
    """Write a probe's result as JSON (`write_json`) and log its headline `values` through `tracker.log` (an
    Accelerator)."""
    if out_json is not None:
        write_json(out_json, result)
    if tracker is not None:
        tracker.log(values, step=step)
