"""Reproducible segmentation scenes built from shipped real images: Fashion-MNIST objects on real photographs.

No package ships a labelled segmentation data set, so the dense heads (and U2PL) are trained and tested on scenes made
from two sets of real images that are installed anyway:
- objects: Fashion-MNIST images (Debian ``dataset-fashion-mnist``; ``train`` split objects for the ``train`` scenes,
  the official test images for ``val``), masked by an intensity threshold, scaled, tinted and pasted;
- backgrounds: random crops of the real photographs and textures bundled inside the scikit-image wheel
  (``skimage/data/*.png|jpg``, read from the package directory with PIL: no ``pooch`` download is ever triggered).

A scene is a function of ``(seed, split, index)`` only (numpy ``default_rng([seed, split, index])``), so any sample
can be regenerated alone and shards written twice are identical. Each scene gives:
- ``image``: RGB, ``size x size``;
- ``semantic``: uint8, 0 = background, ``c + 1`` = Fashion-MNIST class ``c`` (``SCENE_CLASSES``), 255 = ignore: the
  visible remains of an object that later objects cover almost entirely (fewer than ``min_visible`` of its pixels, or
  fewer than ``min_pixels``) are neither object nor background, like COCO's crowd regions;
- ``instances``: uint16, 0 = no instance, ``1..N`` = the visible objects in paste order (ignored remains are 0).
"""
from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sslpipe.ingest.datasets import FASHION_MNIST_CLASSES, load_arrays

IGNORE_INDEX = 255
SCENE_CLASSES = ["background", *FASHION_MNIST_CLASSES]
# Real photographs and textures that ship inside the scikit-image wheel (checked in scikit-image 0.26). Synthetic or
# drawn images of the same folder (chessboard, logo, phantom, color, horse silhouette) are left out.
BACKGROUND_FILES = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
    "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "page.png", "retina.jpg",
    "rocket.jpg", "text.png",
)
_SPLIT_IDS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class Scene:
    """One generated scene (see the module docstring); ``classes[k - 1]`` is the semantic class of instance ``k``."""

    image: Image.Image
    semantic: np.ndarray
    instances: np.ndarray
    classes: tuple[int, ...]


def skimage_data_dir() -> Path:
    """The folder of images bundled in the installed scikit-image wheel."""
    try:
        import skimage
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("scene backgrounds need scikit-image: pip install scikit-image") from err
    return Path(skimage.__file__).resolve().parent / "data"


@functools.lru_cache(maxsize=2)
def load_backgrounds(max_side: int = 512) -> tuple[np.ndarray, ...]:
    """The bundled photographs as RGB uint8 arrays, downscaled to at most ``max_side`` (cached per process)."""
    folder = skimage_data_dir()
    out = []
    for name in BACKGROUND_FILES:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the scikit-image install; reinstall scikit-image")
        with Image.open(path) as img:
            img = img.convert("RGB")
            if max(img.size) > max_side:
                scale = max_side / max(img.size)
                img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR)
            out.append(np.asarray(img))
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _objects(dataset: str, split: str, pool: int | None,
             classes: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """Object images and their scene labels minus one: the source class, or its position in `classes`."""
    images, labels = load_arrays(dataset, split, limit=pool)
    if classes is None:
        return images, labels
    index = _class_indices(dataset, classes)
    keep = np.isin(labels, index)
    remap = np.full(int(labels.max()) + 1, -1, np.int64)
    remap[index] = np.arange(len(index))
    return images[keep], remap[labels[keep]]


def _class_indices(dataset: str, classes: Sequence[str]) -> list[int]:
    from sslpipe.ingest.datasets import dataset_classes

    names = dataset_classes(dataset)
    unknown = [c for c in classes if c not in names]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ValueError(f"scene classes {list(classes)}: give distinct names of {dataset} classes "
                         f"({', '.join(names)}); unknown: {unknown}")
    return [names.index(c) for c in classes]


def scene_classes(dataset: str = "fashion-mnist", classes: Sequence[str] | None = None) -> list[str]:
    """Class names of scenes whose objects come from `dataset` (label = object class + 1, or the position in
    `classes` + 1 when only those classes are pasted; 0 = background)."""
    from sslpipe.ingest.datasets import dataset_classes

    if classes is not None:
        _class_indices(dataset, classes)
        return ["background", *classes]
    return ["background", *dataset_classes(dataset)]


def _hsv_tint(rng: np.random.Generator) -> np.ndarray:
    """A saturated random colour (hue uniform, saturation 0.4-1, value 0.7-1) as RGB in [0, 1]."""
    h, s, v = rng.uniform(0, 1), rng.uniform(0.4, 1.0), rng.uniform(0.7, 1.0)
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


class SceneGenerator:
    """Random-access scene source: ``gen[i]`` is scene ``i`` of ``split`` (deterministic in seed, split, i).

    ``size``: square side in pixels; ``objects``: (min, max) objects per scene; ``scale``: object side as a fraction
    of ``size``; ``threshold``: Fashion-MNIST intensity (0-255, after resizing) above which a pixel is object;
    ``min_visible`` / ``min_pixels``: an object left with less of its area becomes ignore (255); ``pool``: use only
    the first N object images of the split (None: all); ``dataset``: where the objects come from, ``fashion-mnist``
    or scikit-learn's ``digits`` (8x8 handwritten digits, a second real object domain; classes `scene_classes`);
    ``classes``: paste only objects of these source classes (names), labelled 1..len(classes) in that order.
    """

    def __init__(self, split: str = "train", *, size: int = 64, seed: int = 0, objects: tuple[int, int] = (1, 4),
                 scale: tuple[float, float] = (0.35, 0.7), threshold: int = 40, min_visible: float = 0.3,
                 min_pixels: int = 12, pool: int | None = None, dataset: str = "fashion-mnist",
                 classes: Sequence[str] | None = None) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"unknown scene split {split!r}; choose one of {', '.join(_SPLIT_IDS)}")
        if size < 16:
            raise ValueError(f"scene size must be >= 16 pixels, got {size}")
        if not 1 <= objects[0] <= objects[1]:
            raise ValueError(f"objects must be (min, max) with 1 <= min <= max, got {objects}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must be (lo, hi) fractions of the scene size in (0, 1], got {scale}")
        self.split, self.size, self.seed = split, size, seed
        self.objects, self.scale, self.threshold = tuple(objects), tuple(scale), threshold
        self.min_visible, self.min_pixels = min_visible, min_pixels
        self.images, self.labels = _objects(dataset, split, pool, None if classes is None else tuple(classes))
        self.backgrounds = load_backgrounds()

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        bg = self.backgrounds[rng.integers(len(self.backgrounds))]
        h, w = bg.shape[:2]
        side = max(8, int(rng.uniform(0.2, 0.7) * min(h, w)))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(bg[y:y + side, x:x + side])
        if rng.uniform() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(crop.resize((self.size, self.size), Image.Resampling.BILINEAR), dtype=np.float32)

    def __getitem__(self, index: int) -> Scene:
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], int(index)])
        image = self._background(rng)
        semantic = np.zeros((self.size, self.size), np.uint8)
        instances = np.zeros((self.size, self.size), np.int32)
        areas, classes = [], []
        for k in range(1, int(rng.integers(self.objects[0], self.objects[1] + 1)) + 1):
            j = int(rng.integers(len(self.images)))
            side = max(6, int(round(rng.uniform(*self.scale) * self.size)))
            obj = np.asarray(Image.fromarray(self.images[j]).resize((side, side), Image.Resampling.BILINEAR),
                             dtype=np.float32)
            if rng.uniform() < 0.5:
                obj = obj[:, ::-1]
            mask = obj >= self.threshold
            y, x = rng.integers(0, self.size - side + 1), rng.integers(0, self.size - side + 1)
            rgb = _hsv_tint(rng)[None, None, :] * (0.3 + 0.7 * obj[..., None] / 255.0) * 255.0
            region = (slice(y, y + side), slice(x, x + side))
            image[region][mask] = rgb[mask]
            semantic[region][mask] = int(self.labels[j]) + 1
            instances[region][mask] = k
            areas.append(int(mask.sum()))
            classes.append(int(self.labels[j]) + 1)
        kept, out = [], np.zeros_like(instances)
        for k, (area, cls) in enumerate(zip(areas, classes), start=1):
            visible = instances == k
            n = int(visible.sum())
            if n == 0:
                continue
            if n < self.min_pixels or n < self.min_visible * area:
                semantic[visible] = IGNORE_INDEX
                continue
            kept.append(cls)
            out[visible] = len(kept)
        return Scene(Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8)), semantic,
                     out.astype(np.uint16), tuple(kept))


def iter_scenes(split: str, n: int, **kwargs) -> Iterator[Scene]:
    """Scenes ``0..n-1`` of ``split`` (keyword arguments go to :class:`SceneGenerator`)."""
    gen = SceneGenerator(split, **kwargs)
    for i in range(n):
        yield gen[i]


def write_scene_files(out: str | Path, n: int, *, split: str = "train", **kwargs) -> tuple[Path, Path]:
    """Scenes written the way a user's own data arrives: `out/images/NNNNN.png` + `out/labels/NNNNN.png` (8-bit
    class maps), a seg-list `out/list.txt` and the class names `out/classes.txt` (for `sslpipe shards --seg-list
    out/list.txt --classes out/classes.txt`). Keyword arguments go to :class:`SceneGenerator`. Returns (list,
    classes)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, scene in enumerate(iter_scenes(split, n, **kwargs)):
        scene.image.save(out / "images" / f"{i:05d}.png")
        Image.fromarray(scene.semantic).save(out / "labels" / f"{i:05d}.png")
        lines.append(f"images/{i:05d}.png labels/{i:05d}.png")
    (out / "list.txt").write_text("\n".join(lines) + "\n")
    names = scene_classes(kwargs.get("dataset", "fashion-mnist"), kwargs.get("classes"))
    (out / "classes.txt").write_text("\n".join(names) + "\n")
    return out / "list.txt", out / "classes.txt"
