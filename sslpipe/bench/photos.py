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


def make_photo_shards(out: str | Path, n: int = 1024, *, size: tuple[int, int] = (500, 375), seed: int = 0,
                      samples_per_shard: int = 256, force: bool = False) -> Path:
    """Shards (`train` split, original JPEG bytes) of `write_photo_folder`; reused when they already exist."""
    from sslpipe.data.manifest import read_manifest
    from sslpipe.ingest.options import ShardOptions
    from sslpipe.ingest.shards import write_shards

    out = Path(out)
    try:
        if read_manifest(out)["splits"]["train"]["samples"] == n and not force:
            return out
    except (FileNotFoundError, ValueError, KeyError):
        pass
    with tempfile.TemporaryDirectory() as tmp:
        write_photo_folder(tmp, n, size=size, seed=seed)
        write_shards(out, source=tmp, kind="folder", options=ShardOptions(samples_per_shard=samples_per_shard),
                     force=True, progress=False, created_by=f"sslpipe bench loader --photos {n}")
    return out
