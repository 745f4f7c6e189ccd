"""A shard set of real photographs at ImageNet-like size, for loader benchmarks (`sslpipe bench loader --photos N`).

The bundled Fashion-MNIST is 28x28 grayscale: decoding it costs nothing, so it cannot show what a loader does on
ImageNet-style data. This writes N JPEG images of 500x375 (quality 90, about ImageNet's median size) made from the
real colour photographs that ship inside scikit-image's wheel (no download): each is a random crop (10-100% of the
photo's area, 4:3) of one of them, resized with Lanczos and flipped at random, reproducibly from a seed.
"""
from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field", "retina", "ihc",
          "immunohistochemistry", "colorwheel")


def _photos() -> list[Image.Image]:
    try:
        import skimage.data
    except ImportError as err:
        raise ValueError("the photo shards need scikit-image (pip install scikit-image)") from err
    images = []
    for name in PHOTOS:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        try:
            array = loader()
        except Exception:  # noqa: BLE001 - a photo that would need a download is simply skipped
            continue
        if array.ndim == 3 and array.shape[2] >= 3 and min(array.shape[:2]) >= 256:
            images.append(Image.fromarray(array[..., :3]).convert("RGB"))
    if not images:
        raise ValueError("no bundled colour photograph found in scikit-image")
    return images


def write_photo_folder(out_dir: str | Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0,
                       quality: int = 90) -> Path:
    """N JPEGs `out_dir/photo_{source}/{i:06d}.jpg` (one class folder per source photograph)."""
    out = Path(out_dir)
    rng = random.Random(seed)
    photos = _photos()
    for i in range(n):
        src = rng.randrange(len(photos))
        photo = photos[src]
        w, h = photo.size
        area = rng.uniform(0.1, 1.0) * w * h
        cw = min(w, int(round((area * 4 / 3) ** 0.5)))
        ch = min(h, int(round(cw * 3 / 4)))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.LANCZOS)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        folder = out / f"photo_{src}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:06d}.jpg", quality=quality)
    return out


PHOTO_CREATOR = "sslpipe bench --photos"  # the manifest's created_by (older sets: "sslpipe bench loader --photos")


def _is_photo_set(manifest: dict) -> bool:
    created_by = str(manifest.get("created_by", ""))
    return created_by.startswith("sslpipe bench") and "--photos" in created_by


def make_photo_shards(out: str | Path, n: int = 1024, *, size: tuple[int, int] = (500, 375), seed: int = 0,
                      samples_per_shard: int = 256, force: bool = False) -> Path:
    """Shards (`train` split, original JPEG bytes) of `write_photo_folder` in `out`.

    A photo set already there is reused when it holds `n` photos in at least as many shards as asked (a loader
    caps its workers at the shard count, so fewer shards would change the measurement), else rewritten. Any other
    content of `out` is the user's: refused, never overwritten (`force` only forces a rewrite of a photo set)."""
    from sslpipe.data.manifest import read_manifest
    from sslpipe.ingest.options import ShardOptions
    from sslpipe.ingest.shards import write_shards

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        try:
            manifest = read_manifest(out)
        except (FileNotFoundError, ValueError):
            manifest = {}
        if not _is_photo_set(manifest):
            raise FileExistsError(f"{out} holds something other than a photo shard set of `--photos`; drop --photos "
                                  "to benchmark it, or give --photos an empty (or new) folder")
        train = manifest.get("splits", {}).get("train", {})
        wanted_shards = -(-n // samples_per_shard)
        if not force and train.get("samples") == n and len(train.get("shards", [])) >= wanted_shards:
            return out
    with tempfile.TemporaryDirectory() as tmp:
        write_photo_folder(tmp, n, size=size, seed=seed)
        write_shards(out, source=tmp, kind="folder", options=ShardOptions(samples_per_shard=samples_per_shard),
                     force=True, progress=False, created_by=f"{PHOTO_CREATOR} {n}")
    return out


def bench_shards(data: str | Path | None, photos: int | None, **photo_options: Any) -> str:
    """The shards a bench reads: `data`, or with `photos` that many photographs written there first
    (`make_photo_shards`, default folder runs/bench_photos)."""
    if photos:
        return str(make_photo_shards(data or "runs/bench_photos", photos, **photo_options))
    if data is None:
        raise ValueError("give a shard directory, or --photos N to make one of photographs")
    return str(data)
