"""Readers of the data sets bundled with the environment: Fashion-MNIST (Debian idx files) and scikit-learn's digits.

They stream ``(PIL.Image, label)`` pairs so that ``write_shards`` can turn them into shards without keeping the data
set in memory (Fashion-MNIST is read sample by sample from the gzip files; digits is 1797 8x8 arrays, loaded whole).

Fixed splits (documented in the README and relied on by the kNN demo):
- ``fashion-mnist``: ``train`` = the official 60,000 training images, ``val`` = the official 10,000 test images.
- ``digits``: sample ``i`` (in scikit-learn's order) goes to ``val`` when ``i % 5 == 4``, else to ``train``
  (1438 train, 359 val).
``limit=N`` keeps the first N samples of a split (deterministic, not stratified).
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

BUNDLED_DATASETS = ("fashion-mnist", "digits")
SPLITS = ("train", "val")

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the idx files (override: $SSLPIPE_FASHION_MNIST_DIR)."""
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
DIGITS_VAL_EVERY = 5


def _check(name: str, split: str) -> None:
    if name not in BUNDLED_DATASETS:
        raise ValueError(f"unknown bundled data set {name!r}; choose one of {', '.join(BUNDLED_DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {name}; choose one of {', '.join(SPLITS)}")


def dataset_classes(name: str) -> list[str]:
    """Class names of a bundled data set, index = label."""
    _check(name, "train")
    return list(FASHION_MNIST_CLASSES) if name == "fashion-mnist" else [str(d) for d in range(10)]


def fashion_mnist_dir(root: str | Path | None = None) -> Path:
    """The Fashion-MNIST directory: ``root``, else $SSLPIPE_FASHION_MNIST_DIR, else the Debian location."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get("SSLPIPE_FASHION_MNIST_DIR", FASHION_MNIST_DIR))


def _fashion_paths(split: str, root: str | Path | None) -> tuple[Path, Path]:
    directory = fashion_mnist_dir(root)
    paths = tuple(directory / f for f in _FASHION_FILES[split])
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found in {directory} (missing: {', '.join(missing)}). Install them with: "
            "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
        )
    return paths  # type: ignore[return-value]


def _read_header(f, path: Path, magic: int, n_dims: int) -> tuple[int, ...]:
    raw = f.read(4 * (1 + n_dims))
    if len(raw) != 4 * (1 + n_dims):
        raise ValueError(f"{path}: truncated idx header; reinstall dataset-fashion-mnist")
    values = struct.unpack(f">{1 + n_dims}i", raw)
    if values[0] != magic:
        raise ValueError(f"{path}: bad idx magic number {values[0]} (expected {magic}); the file is not an idx file")
    return values[1:]


@contextmanager
def _open_fashion(split: str, root: str | Path | None) -> Iterator[tuple[Path, BinaryIO, BinaryIO, int, int, int]]:
    """Both idx files of a split, positioned after their checked headers: (images path, images, labels, n, rows,
    cols)."""
    images, labels = _fashion_paths(split, root)
    with gzip.open(images, "rb") as fi, gzip.open(labels, "rb") as fl:
        n, rows, cols = _read_header(fi, images, _IDX_IMAGES_MAGIC, 3)
        (n_labels,) = _read_header(fl, labels, _IDX_LABELS_MAGIC, 1)
        if n != n_labels:
            raise ValueError(f"{images} has {n} images but {labels} has {n_labels} labels")
        yield images, fi, fl, n, rows, cols


def _fashion_len(split: str, root: str | Path | None) -> int:
    with _open_fashion(split, root) as (_, _, _, n, _, _):
        return n


def _iter_fashion(split: str, limit: int | None, root: str | Path | None) -> Iterator[tuple[Image.Image, int]]:
    with _open_fashion(split, root) as (images, fi, fl, n, rows, cols):
        size = rows * cols
        for i in range(n if limit is None else min(n, limit)):
            pixels, label = fi.read(size), fl.read(1)
            if len(pixels) != size or len(label) != 1:
                raise ValueError(f"{images}: truncated at sample {i}; reinstall dataset-fashion-mnist")
            yield Image.frombytes("L", (cols, rows), pixels), label[0]


def _digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    is_val = np.arange(len(digits.target)) % DIGITS_VAL_EVERY == DIGITS_VAL_EVERY - 1
    keep = is_val if split == "val" else ~is_val
    # 0..16 -> 0..255 so the images look like ordinary 8-bit grayscale pictures.
    images = np.round(digits.images[keep] * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target[keep].astype(np.int64)


def dataset_len(name: str, split: str, *, limit: int | None = None, root: str | Path | None = None) -> int:
    """Number of samples ``iter_dataset`` yields (reads only the idx headers for Fashion-MNIST)."""
    _check(name, split)
    n = _fashion_len(split, root) if name == "fashion-mnist" else len(_digits_split(split)[1])
    return n if limit is None else min(n, limit)


def load_arrays(
    name: str, split: str, *, limit: int | None = None, root: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A whole split as ``(uint8 images (N, H, W), int64 labels (N,))`` for random access (scene generation).

    Fashion-MNIST is read in one block from the idx files (60,000 images = 47 MB); the order is the data set's own.
    """
    _check(name, split)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if name == "digits":
        images, labels = _digits_split(split)
        return images[:limit], labels[:limit]
    with _open_fashion(split, root) as (path, fi, fl, n, rows, cols):
        n = n if limit is None else min(n, limit)
        pixels, labels = fi.read(n * rows * cols), fl.read(n)
        if len(pixels) != n * rows * cols or len(labels) != n:
            raise ValueError(f"{path}: truncated before sample {n}; reinstall dataset-fashion-mnist")
    images = np.frombuffer(pixels, dtype=np.uint8).reshape(n, rows, cols)
    return images, np.frombuffer(labels, dtype=np.uint8).astype(np.int64)


def iter_dataset(
    name: str, split: str, *, limit: int | None = None, root: str | Path | None = None
) -> Iterator[tuple[Image.Image, int]]:
    """Yield ``(grayscale PIL image, label)`` of a bundled data set split, in the data set's own order."""
    _check(name, split)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if name == "fashion-mnist":
        yield from _iter_fashion(split, limit, root)
        return
    images, labels = _digits_split(split)
    for image, label in zip(images[:limit], labels[:limit]):
        yield Image.fromarray(image), int(label)
