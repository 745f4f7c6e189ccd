"""COCO-format instance annotations -> instance shards (`seg.png` classes + `inst.png` ids) for ViTDet / Mask R-CNN.

Two sources (`sslpipe shards --coco PATH OUT`):
- the official layout: `ROOT/annotations/instances_<name>.json` with images in `ROOT/<name>/` (COCO 2017:
  `instances_train2017.json` + `train2017/`, `instances_val2017.json` + `val2017/`); each json becomes a split named
  by `<name>` without its digits (`train2017` -> `train`, `val2017` -> `val`);
- one COCO-format json (what CVAT, Label Studio, Roboflow, ... export), written as split `train` (`--val-fraction`
  holds some out). `file_name`s are resolved against `images` when given, else the first of the json's folder, its
  `images/` sub-folder, its parent folder and the parent's `images/` where the first image exists.

Rendering (one sample per image record, images without annotations included):
- classes: the json's category ids in increasing order -> 1..K (0 = background; K <= 254, since 255 = ignore);
  manifest `classes` = ["background", names...], `coco.category_ids` keeps the original ids;
- crowd regions (`iscrowd: 1`) -> `seg` 255 (ignore: never a training target, as detectron2 drops crowd boxes from
  training) and instance ids after the others, with their classes in the sample's `crowd.json` ({id: class}): the
  evaluation keeps them as `iscrowd` ground truth, so a detection on a crowd region is not a false positive (COCOeval);
- instances (polygons, RLE or compressed RLE, decoded by pycocotools) are painted in decreasing area order, so where
  two overlap the smaller one is on top and keeps its pixels (the choice of COCO's panoptic conversion); an instance
  with no visible pixel left vanishes from the sample;
- an annotation without a mask (a box-only `"segmentation": []`, or polygons of fewer than 3 points) is left out and
  counted (`coco.files[split].annotations_without_mask`); its image and other instances are kept.
Deviation from detectron2, named: one id per pixel cannot hold overlapping masks, and boxes are taken from the visible
mask (`masks_to_targets`), not from the annotated `bbox`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

MAX_CLASSES = 254  # seg.png is 8-bit with 0 = background and 255 = ignore


@dataclass(frozen=True)
class CocoMasks:
    """The annotations of one image, rendered to label maps on demand (in the shard writer's worker processes)."""

    file: str  # the image, for error messages
    width: int
    height: int
    annotations: tuple[tuple[int, bool, object], ...]  # (class index 1..K, iscrowd, segmentation) per annotation

    def render(self, size: tuple[int, int]) -> tuple[Image.Image, Image.Image, dict[int, int]]:
        """(seg, inst, crowd): 8-bit classes (0 background, 255 crowd), 16-bit instance ids (things 1..N, then the
        crowd regions N+1.., under the things; 0 = none) and {crowd instance id: class}."""
        if size != (self.width, self.height):
            raise ValueError(f"{self.file} is {size[0]}x{size[1]} but its COCO record says {self.width}x{self.height}")
        seg = np.zeros((self.height, self.width), np.uint8)
        inst = np.zeros((self.height, self.width), np.uint16)
        things, crowds = [], []
        for cls, crowd, segmentation in self.annotations:
            (crowds if crowd else things).append((cls, self._decode(segmentation)))
        if len(things) + len(crowds) > np.iinfo(np.uint16).max:
            raise ValueError(f"{self.file} has {len(things) + len(crowds)} instances; inst.png holds at most 65535")
        crowd_classes = {}
        for k, (cls, mask) in enumerate(crowds, len(things) + 1):
            seg[mask] = 255
            inst[mask] = k
            crowd_classes[k] = cls
        # largest first (area of the decoded mask: exports do not always fill in `area`); a stable sort keeps ties
        # in annotation order
        things.sort(key=lambda thing: -int(thing[1].sum()))
        for instance_id, (cls, mask) in enumerate(things, 1):
            seg[mask] = cls
            inst[mask] = instance_id
        return Image.fromarray(seg), Image.fromarray(inst), crowd_classes

    def _decode(self, segmentation: object) -> np.ndarray:
        from pycocotools import mask as mask_utils

        if isinstance(segmentation, list):  # polygons [[x1, y1, x2, y2, ...], ...]
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, self.height, self.width))
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, self.height, self.width)
        elif isinstance(segmentation, dict) and "counts" in segmentation:  # compressed RLE
            rle = dict(segmentation)
            rle["counts"] = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
        else:
            raise ValueError(f"{self.file}: an annotation's segmentation is neither polygons nor RLE")
        return mask_utils.decode(rle).astype(bool)


@dataclass(frozen=True)
class CocoSource:
    splits: dict[str, list[tuple[str, CocoMasks]]]  # split -> (image path, masks), in the json's image order
    classes: list[str]
    info: dict  # for the manifest: category ids, counts


def is_coco_source(path: Path) -> bool:
    return (path.is_file() and path.suffix.lower() == ".json") or (
        path.is_dir() and any((path / "annotations").glob("instances_*.json")))


def read_coco(source: str | Path, images: str | Path | None = None) -> CocoSource:
    """Read a COCO root folder or one annotation json (module docstring); `images`: the image folder of a single
    json."""
    source = Path(source)
    if source.is_dir():
        files = sorted((source / "annotations").glob("instances_*.json"))
        if not files:
            raise FileNotFoundError(f"{source} has no annotations/instances_*.json: not a COCO folder")
        jobs = []
        for file in files:
            name = file.stem[len("instances_"):]
            jobs.append((re.sub(r"\d+$", "", name) or name, file, source / name))
    elif source.is_file():
        jobs = [("train", source, Path(images) if images else None)]  # `images` is for a single json only
    else:
        raise FileNotFoundError(f"COCO source {source} does not exist")
    if len({split for split, _, _ in jobs}) != len(jobs):
        raise ValueError(f"{source}: two annotation files give the same split: {[str(f) for _, f, _ in jobs]}")

    splits, classes, category_ids, info = {}, None, None, {"files": {}}
    for split, file, image_root in jobs:
        data = _load_json(file)
        ids = sorted(int(c["id"]) for c in data["categories"])
        names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        if category_ids is None:
            category_ids, classes = ids, ["background", *(names[i] for i in ids)]
        elif ids != category_ids:
            raise ValueError(f"{file} lists other categories than {jobs[0][1]}; all splits must share them")
        splits[split], counts = _split_samples(file, data, {c: k for k, c in enumerate(ids, 1)}, image_root)
        info["files"][split] = {"annotations": str(file.resolve()), **counts}
    if len(category_ids) > MAX_CLASSES:
        raise ValueError(f"{source} has {len(category_ids)} categories; seg.png holds at most {MAX_CLASSES}")
    info["category_ids"] = category_ids
    return CocoSource(splits, classes, info)


def _load_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise ValueError(f"{file} is not a COCO instances file: no {' / '.join(missing)} list")
    for what, keys in (("images", ("id", "file_name", "width", "height")), ("categories", ("id", "name"))):
        for k, record in enumerate(data[what]):
            absent = [key for key in keys if not isinstance(record, dict) or key not in record]
            if absent:
                raise ValueError(f"{file}: {what[:-1] if what == 'images' else 'category'} #{k} has no "
                                 f"{' / '.join(repr(a) for a in absent)}; every record needs {', '.join(keys)}")
    return data


def _mask_polygons(segmentation: object) -> object | None:
    """The segmentation without the polygons that hold no area (fewer than 3 points, or an odd number of
    coordinates), as detectron2 drops them; None when no mask is left (a box-only annotation: `[]`)."""
    if not isinstance(segmentation, list):
        return segmentation
    polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
    return polygons or None


def _split_samples(file: Path, data: dict, class_of: dict[int, int],
                   image_root: Path | None) -> tuple[list[tuple[str, CocoMasks]], dict]:
    by_image: dict[int, list] = {int(im["id"]): [] for im in data["images"]}
    crowd = without_mask = 0
    for k, ann in enumerate(data["annotations"]):
        where = f"{file}: annotation {ann.get('id', f'#{k}')}"
        if int(ann.get("image_id", -1)) not in by_image:
            raise ValueError(f"{where} refers to image_id {ann.get('image_id')}, which the json does not list")
        if int(ann.get("category_id", -1)) not in class_of:
            raise ValueError(f"{where} has category_id {ann.get('category_id')}, which the json does not list")
        if "segmentation" not in ann:
            raise ValueError(f"{where} has no segmentation: instance shards need masks (boxes alone are not enough)")
        segmentation = _mask_polygons(ann["segmentation"])
        if segmentation is None:  # a box alone, or a degenerate polygon: no instance to paint; the image is kept
            without_mask += 1
            continue
        crowd += bool(ann.get("iscrowd", 0))
        by_image[int(ann["image_id"])].append((class_of[int(ann["category_id"])], bool(ann.get("iscrowd", 0)),
                                               segmentation))
    if not data["images"]:
        raise ValueError(f"{file} lists no images")
    root = image_root or _find_image_root(file, str(data["images"][0]["file_name"]))
    samples = []
    for im in data["images"]:
        path = str(root / im["file_name"])
        samples.append((path, CocoMasks(path, int(im["width"]), int(im["height"]), tuple(by_image[int(im["id"])]))))
    counts = {"images": len(samples), "instances": len(data["annotations"]) - crowd - without_mask, "crowd": crowd,
              "annotations_without_mask": without_mask,
              "images_without_annotations": sum(not a for a in by_image.values())}
    return samples, counts


def _find_image_root(file: Path, first: str) -> Path:
    here = file.resolve().parent
    candidates = [here, here / "images", here.parent, here.parent / "images"]
    for root in candidates:
        if (root / first).is_file():
            return root
    raise FileNotFoundError(f"images of {file} not found: {first!r} is in none of {[str(c) for c in candidates]}; "
                            "pass the image folder (--coco-images DIR)")
