"""Readers of the common semantic segmentation layouts: what `sslpipe shards --voc / --cityscapes / --ade20k /
--dataset scenes --semi / --dataset stardist` reads, before `sslpipe.ingest.semi_shards` writes U2PL's shard sets.

Layouts -> lists of (id, image path, label path), and the layout's class names:
- PASCAL VOC style: `ROOT/JPEGImages/<id>.jpg` (or .png) and `ROOT/<label_dir>/<id>.png` (palette or 8-bit, pixel =
  class, 255 = ignore); `label_dir` is `SegmentationClassAug` when present (the 10582-image train_aug labels that
  U2PL uses), else `SegmentationClass`. Ids come from a split list (one id per line, e.g. ImageSets/Segmentation/
  train.txt, or U2PL's data/splits/pascal/1464/labeled.txt).
- Cityscapes style: `ROOT/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png` with
  `ROOT/gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png` (19 train ids, 255 = ignore); when only
  `*_gtFine_labelIds.png` exist they are converted to train ids (the official cityscapesscripts table) into a cache
  folder first.
- ADE20K (SceneParsing, `ADEChallengeData2016`): `ROOT/images/{training,validation}/<id>.jpg` with
  `ROOT/annotations/{training,validation}/<id>.png` (0 = "other", 1..150 = classes); labels are shifted to 0..149
  with 0 -> 255 (ignore), as mmseg's / Mask2Former's `reduce_zero_label`, into a cache folder.
Converted labels are keyed to their source: a cache holds one root's (`source.json`; another root empties it), and a
label is converted again when its source file's mtime changed.
- generated scenes (sslpipe/ingest/scenes.py), written as a VOC-style folder of PNGs, so that the bundled real data
  goes through the same path as VOC;
- the stardist nuclei image, cut into tiles written the same way.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle"]
# cityscapesscripts labels.py: labelId -> trainId for the 19 evaluated classes; every other id -> 255
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

# mmsegmentation's ADE20KDataset names, in label order 1..150 (objectInfo150 of the SceneParsing benchmark)
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand",
    "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat",
    "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
    "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal",
    "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
]

Pair = tuple[str, str, str]  # (id, image path, label path)


def read_id_list(path: str | Path) -> list[str]:
    """Ids of a split list: one per line (first field), blank lines and `#` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} not found")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not ids:
        raise ValueError(f"split list {path} holds no ids")
    return ids


def voc_label_dir(root: str | Path) -> Path:
    root = Path(root)
    for name in ("SegmentationClassAug", "SegmentationClass"):
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"{root} has neither SegmentationClassAug/ nor SegmentationClass/: not a VOC-style folder")


def voc_pairs(root: str | Path, ids: Sequence[str], label_dir: str | Path | None = None) -> list[Pair]:
    """(id, JPEGImages/<id>.jpg|.png, <label_dir>/<id>.png) for each id; one error listing the missing files."""
    root = Path(root)
    labels = Path(label_dir) if label_dir else voc_label_dir(root)
    pairs, missing = [], []
    for i in ids:
        image = next((root / "JPEGImages" / f"{i}{ext}" for ext in (".jpg", ".png", ".jpeg")
                      if (root / "JPEGImages" / f"{i}{ext}").is_file()), None)
        label = labels / f"{i}.png"
        if image is None:
            missing.append(str(root / "JPEGImages" / f"{i}.jpg"))
        elif not label.is_file():
            missing.append(str(label))
        else:
            pairs.append((i, str(image), str(label)))
    if missing:
        raise FileNotFoundError(f"{len(missing)} files of the VOC split are missing, e.g. {missing[:3]}; check the "
                                "root folder and the split list")
    return pairs


def voc_split_list(root: str | Path, name: str) -> Path:
    """ImageSets/Segmentation/<name>.txt of a VOC root (name: train, val, trainaug, ...) or `name` as a path."""
    path = Path(root) / "ImageSets" / "Segmentation" / f"{name}.txt"
    return path if path.is_file() else Path(name)


def _lut_converted(label: Path, target: Path, lut: np.ndarray) -> Path:
    """`target` = `lut` applied to the label map `label`, written atomically (a run cut short never leaves a
    half-written label behind) with the mtime of `label`, and reused only while `label`'s mtime is still that: a
    corrected annotation is converted again."""
    stamp = label.stat()
    if not (target.is_file() and target.stat().st_mtime_ns == stamp.st_mtime_ns):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial.png")
        Image.fromarray(lut[np.asarray(Image.open(label))]).save(tmp)
        os.utime(tmp, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        os.replace(tmp, target)
    return target


def _source_cache(cache: str | Path, root: Path) -> Path:
    """`cache`, emptied first when it holds the converted labels of another source root (`source.json` names
    it): the labels of two roots share their file names, so they must never be mixed."""
    cache, resolved = Path(cache), str(root.resolve())
    stamp = cache / "source.json"
    try:
        same = json.loads(stamp.read_text()).get("root") == resolved
    except (OSError, ValueError, AttributeError):
        same = False
    if not same:
        if cache.exists():
            shutil.rmtree(cache)
        cache.mkdir(parents=True)
        stamp.write_text(json.dumps({"root": resolved}) + "\n")
    return cache


def cityscapes_pairs(root: str | Path, split: str = "train", cache: str | Path | None = None) -> list[Pair]:
    """(id, leftImg8bit image, train-id label) of a Cityscapes split, sorted by name (module docstring)."""
    root = Path(root)
    images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    if not images:
        raise FileNotFoundError(f"no {root}/leftImg8bit/{split}/<city>/*_leftImg8bit.png images")
    lut = np.full(256, 255, np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    pairs: list[Pair] = []
    converted: Path | None = None
    for img in images:
        stem = img.name[: -len("_leftImg8bit.png")]
        gt = root / "gtFine" / split / img.parent.name
        train_ids = gt / f"{stem}_gtFine_labelTrainIds.png"
        if not train_ids.is_file():
            label_ids = gt / f"{stem}_gtFine_labelIds.png"
            if not label_ids.is_file():
                raise FileNotFoundError(f"neither {train_ids.name} nor {label_ids.name} in {gt}")
            if cache is None:
                raise ValueError("Cityscapes labelIds need converting to train ids: pass a cache folder")
            converted = converted or _source_cache(cache, root)  # checked once, when the first label needs it
            train_ids = _lut_converted(label_ids, converted / split / img.parent.name / train_ids.name, lut)
        pairs.append((f"{img.parent.name}/{stem}", str(img), str(train_ids)))
    return pairs


def ade20k_pairs(root: str | Path, split: str = "training", cache: str | Path | None = None) -> list[Pair]:
    """(id, image, 0..149/255 label) of an ADEChallengeData2016 split (`training` / `validation`), sorted by id;
    the shifted labels are written once into `cache` (module docstring)."""
    root = Path(root)
    images = sorted((root / "images" / split).glob("*.jpg"))
    if not images:
        raise FileNotFoundError(f"no {root}/images/{split}/*.jpg: not an ADEChallengeData2016 folder")
    if cache is None:
        raise ValueError("ADE20K labels need shifting (0 = other -> 255): pass a cache folder")
    lut = np.full(256, 255, np.uint8)
    lut[1:len(ADE20K_CLASSES) + 1] = np.arange(len(ADE20K_CLASSES), dtype=np.uint8)
    cache = _source_cache(cache, root)
    pairs = []
    for img in tqdm(images, desc=f"ADE20K {split} labels", unit="img", leave=False):
        label = root / "annotations" / split / f"{img.stem}.png"
        if not label.is_file():
            raise FileNotFoundError(f"{label} (the label of {img.name}) is missing")
        pairs.append((img.stem, str(img), str(_lut_converted(label, cache / split / label.name, lut))))
    return pairs


def scene_pairs(folder: str | Path, n_train: int, n_val: int, *, size: int = 64, seed: int = 0,
                **options) -> tuple[list[Pair], list[Pair]]:
    """Write generated scenes (sslpipe/ingest/scenes.py) as PNGs in a VOC-style folder; return (train, val) pairs."""
    from sslpipe.ingest.scenes import SceneGenerator

    folder = Path(folder)
    (folder / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (folder / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    out = []
    for split, n in (("train", n_train), ("val", n_val)):
        gen, pairs = SceneGenerator(split, size=size, seed=seed, **options), []
        for i in range(n):
            sid = f"{split}_{i:06d}"
            image, label = folder / "JPEGImages" / f"{sid}.png", folder / "SegmentationClass" / f"{sid}.png"
            scene = gen[i]
            scene.image.save(image)
            Image.fromarray(scene.semantic).save(label)
            pairs.append((sid, str(image), str(label)))
        out.append(pairs)
    return out[0], out[1]


STARDIST_CLASSES = ["background", "nucleus"]


def stardist_pairs(folder: str | Path, *, tile: int = 64, val_fraction: float = 0.25,
                   seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """The one real 2-D fluorescence image with a per-pixel nuclei mask that ships in the stardist wheel
    (`stardist/data/images/img2d.tif`, `mask2d.tif`, 512 x 512; install with `pip install --no-deps stardist`, read
    with tifffile), cut into `tile` x `tile` tiles written as a VOC-style folder: image = the intensity scaled to
    0-255 (grey RGB), label = 1 where the instance mask is non-zero (nucleus), else 0. A seeded `val_fraction` of
    the tiles is the val split."""
    import importlib.util

    import tifffile

    spec = importlib.util.find_spec("stardist")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the stardist wheel is not installed: pip install --no-deps stardist")
    data = Path(spec.origin).parent / "data" / "images"
    image = tifffile.imread(data / "img2d.tif").astype(np.float32)
    mask = tifffile.imread(data / "mask2d.tif")
    image = np.round(255 * (image - image.min()) / max(float(image.max() - image.min()), 1.0)).astype(np.uint8)
    folder = Path(folder)
    (folder / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (folder / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    pairs = []
    for y in range(0, image.shape[0] - tile + 1, tile):
        for x in range(0, image.shape[1] - tile + 1, tile):
            tid = f"tile_{y:04d}_{x:04d}"
            img, lab = folder / "JPEGImages" / f"{tid}.png", folder / "SegmentationClass" / f"{tid}.png"
            Image.fromarray(image[y:y + tile, x:x + tile]).convert("RGB").save(img)
            Image.fromarray((mask[y:y + tile, x:x + tile] > 0).astype(np.uint8)).save(lab)
            pairs.append((tid, str(img), str(lab)))
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = int(round(val_fraction * len(pairs)))
    val = sorted(order[:n_val].tolist())
    return [p for k, p in enumerate(pairs) if k not in set(val)], [pairs[k] for k in val]


def read_layout(folder: Path, *, voc: str | None = None, cityscapes: str | None = None, ade20k: str | None = None,
                scenes: dict | None = None, stardist: bool = False, voc_train: str = "train", voc_val: str = "val",
                seed: int = 0) -> tuple[list[Pair], list[Pair], list[str]]:
    """(train pairs, val pairs, class names) of the one layout given; `folder` holds what a layout writes first
    (converted labels, generated PNGs). scenes: {"train": N, "val": M, "size": S, ...} (`scene_pairs`)."""
    given = [voc is not None, cityscapes is not None, ade20k is not None, scenes is not None, stardist]
    if sum(given) != 1:
        raise ValueError("give exactly one of voc, cityscapes, ade20k, scenes or stardist")
    if voc is not None:
        train_ids, val_ids = (read_id_list(voc_split_list(voc, name)) for name in (voc_train, voc_val))
        both = sorted(set(train_ids) & set(val_ids))
        if both:  # a val image that is also trained on makes the val score meaningless
            raise ValueError(f"the VOC train split {voc_train!r} and val split {voc_val!r} share {len(both)} ids, e.g. "
                             f"{both[:3]}: give disjoint splits (e.g. train and val, not trainval)")
        return voc_pairs(voc, train_ids), voc_pairs(voc, val_ids), VOC_CLASSES
    if cityscapes is not None:
        cache = folder / "labelTrainIds"
        return (cityscapes_pairs(cityscapes, "train", cache=cache), cityscapes_pairs(cityscapes, "val", cache=cache),
                CITYSCAPES_CLASSES)
    if ade20k is not None:
        cache = folder / "ade20k_labels"
        return (ade20k_pairs(ade20k, "training", cache=cache), ade20k_pairs(ade20k, "validation", cache=cache),
                ADE20K_CLASSES)
    if stardist:
        return (*stardist_pairs(folder, seed=seed), STARDIST_CLASSES)
    from sslpipe.ingest.scenes import scene_classes

    opts = dict(scenes)
    classes = scene_classes(opts.get("dataset", "fashion-mnist"), opts.get("classes"))
    train, val = scene_pairs(folder, int(opts.pop("train")), int(opts.pop("val")), seed=seed, **opts)
    return train, val, classes


def read_labelled_ids(path: str | Path) -> list[str]:
    """The labelled ids of a split list (`--labeled-list`), named as this module names them (`_list_id`)."""
    return [_list_id(i) for i in read_id_list(path)]


def _list_id(entry: str) -> str:
    """An id of a split list as this module names it: U2PL's Cityscapes lists give image paths
    (`leftImg8bit/train/ulm/ulm_000079_000019_leftImg8bit.png` -> `ulm/ulm_000079_000019`); VOC ids pass unchanged."""
    if entry.endswith("_leftImg8bit.png"):
        parts = entry[: -len("_leftImg8bit.png")].split("/")
        return "/".join(parts[-2:])
    return entry
