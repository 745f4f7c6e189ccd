"""The sources `write_shards` reads, each opened as its samples per split (entries not yet read) and what the
manifest says of it.

Sources (``kind``; auto-detected when ``None``):
- ``"dataset"``: a bundled data set name (``fashion-mnist``, ``digits``) with its official split (see datasets.py),
  written as lossless ``png`` in the data set's order.
- ``"folder"``: an ImageFolder tree ``ROOT/<class>/**/<image>`` (classes = sorted sub-folder names). A folder with no
  sub-folders is read as unlabelled images (no ``cls``).
- ``"list"``: a text file, one ``path [label]`` per line (tab-separated when the line has a tab, else whitespace),
  ``#`` comments, relative paths relative to the list file; an image listed twice is refused. Labels are integers
  (classes ``"0".."max"``) or names (classes = sorted names); all lines labelled or none.
- ``"seg-list"``: a text file of ``image_path label_map_path`` lines; the label map (8-bit ``L`` or palette ``P``
  PNG, pixel = class index, 255 = ignore) is stored as ``seg.png`` beside the image. Auto-detected when the second
  column of the first entry ends in an image extension. Its classes are unknown (``classes: []``) unless
  ``classes=`` names them (``sslpipe shards --classes FILE|a,b,c``); every label value is then checked against them.
- ``"coco"``: COCO-format instance annotations, a COCO root folder or one json (``sslpipe/ingest/coco.py``), written
  as ``seg.png`` + ``inst.png`` per image like the scenes; the official layout keeps its splits.
- ``"scenes"`` (source ``"scenes"``): generated segmentation scenes (``sslpipe/ingest/scenes.py``: Fashion-MNIST
  objects on scikit-image's bundled photographs), ``seg.png`` + an instance-id map ``inst.png`` (16-bit PNG, 0 =
  none) per sample; splits ``train``/``val`` with ``scenes={"train": N, "val": M, "size": S, ...}`` (``seed`` seeds
  them).

Segmentation manifests record ``seg_values``: the label values that occur in the label maps (255 included), so a
reader can size a classifier or catch a wrong class count before it trains.

Folder/list sources have no official split: ``val_fraction`` of them (a seeded permutation) goes to ``val``, and both
splits are written in that seeded shuffled order (``shuffle=True``) so a streaming shuffle buffer sees mixed classes.
"""
from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

from sslpipe.ingest.coco import is_coco_source, read_coco
from sslpipe.ingest.datasets import BUNDLED_DATASETS, SPLITS, dataset_classes, dataset_len, iter_dataset
from sslpipe.ingest.encode import Entry
from sslpipe.ingest.options import ShardOptions

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SourceKind = Literal["folder", "list", "dataset", "seg-list", "scenes", "coco"]
SEG_KINDS = ("seg-list", "scenes", "coco")  # the kinds whose samples carry a label map
SCENE_DEFAULTS = {"train": 2000, "val": 500, "size": 64}


@dataclass
class Source:
    """A source opened for writing: its samples per split, in writing order, and what the manifest says of it."""

    kind: SourceKind
    name: str  # the manifest's `source`: a bundled data set, `scenes` or a resolved path
    classes: list[str]
    splits: dict[str, Iterator[Entry]]
    totals: dict[str, int]  # samples per split (the progress bars' totals)
    num_classes: int | None = None  # the named classes of a seg-list: its label values are checked against them
    manifest: dict = field(default_factory=dict)  # the manifest keys of the kind (scenes options, COCO files)


def _detect_kind(source: str) -> SourceKind:
    if source in BUNDLED_DATASETS:
        return "dataset"
    if source == "scenes":
        return "scenes"
    path = Path(source)
    if is_coco_source(path):
        return "coco"
    if path.is_dir():
        return "folder"
    if path.is_file():
        rows = _parse_list(path)
        return ("seg-list" if rows and len(rows[0][1]) == 2 and rows[0][1][1].lower().endswith(IMG_EXTENSIONS)
                else "list")
    raise FileNotFoundError(
        f"shard source {source!r} is neither a bundled data set ({', '.join(BUNDLED_DATASETS)}), a directory nor a file"
    )


def _parse_list(path: Path) -> list[tuple[int, list[str]]]:
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split("\t")] if "\t" in line else line.split()
        if len(fields) > 2:
            raise ValueError(f"{path}:{lineno}: expected 'path [label]' or 'image seg', got {len(fields)} fields")
        rows.append((lineno, fields))
    return rows


def _folder_entries(root: Path) -> tuple[list[Entry], list[str]]:
    def images_under(directory: Path) -> Iterator[str]:
        subdirs, files = [], []
        with os.scandir(directory) as it:
            for d in it:
                if d.name.startswith("."):
                    continue
                if d.is_dir():
                    subdirs.append(d.path)
                elif d.name.lower().endswith(IMG_EXTENSIONS):
                    files.append(d.path)
        yield from sorted(files)
        for sub in sorted(subdirs):
            yield from images_under(Path(sub))

    with os.scandir(root) as it:
        listed = [d for d in it if not d.name.startswith(".")]
    classes = sorted(d.name for d in listed if d.is_dir())
    if not classes:
        return [Entry(p, -1, p) for p in images_under(root)], []
    loose = sorted(d.name for d in listed if not d.is_dir() and d.name.lower().endswith(IMG_EXTENSIONS))
    if loose:  # they belong to no class: silently leaving them out would lose them
        raise ValueError(f"{root} has class sub-folders but also {len(loose)} image(s) directly in it, e.g. "
                         f"{loose[:3]}: move them into a class folder (or elsewhere)")
    return [Entry(p, i, p) for i, c in enumerate(classes) for p in images_under(root / c)], classes


def _refuse_repeats(path: Path, rows: list[tuple[int, list[str]]], resolve: Callable[[str], str]) -> None:
    """An image listed twice would be written twice (with --val-fraction into train and val, a leak; with two labels,
    under both): refused, naming both lines. Paths are compared normalised (`a/../x.png` = `./x.png` = `x.png`)."""
    first: dict[str, int] = {}
    for lineno, fields in rows:
        image = os.path.abspath(resolve(fields[0]))
        if image in first:
            raise ValueError(f"{path}:{lineno} repeats {path}:{first[image]} ({fields[0]}): list each image once "
                             "(remove the repeated line)")
        first[image] = lineno


def _list_entries(path: Path, seg: bool) -> tuple[list[Entry], list[str]]:
    rows = _parse_list(path)
    base = path.parent

    def resolve(p: str) -> str:
        return str(base / p) if not os.path.isabs(p) else p

    if seg:
        bad = [n for n, f in rows if len(f) != 2]
        if bad:
            raise ValueError(f"{path}:{bad[0]}: seg-list lines must be 'image_path label_map_path'")
        _refuse_repeats(path, rows, resolve)
        return [Entry(resolve(f[0]), -1, resolve(f[0]), resolve(f[1])) for _, f in rows], []
    labelled = {len(f) == 2 for _, f in rows}
    if len(labelled) > 1:
        raise ValueError(f"{path}: some lines have a label and some do not; label every line or none")
    _refuse_repeats(path, rows, resolve)
    if labelled != {True}:
        return [Entry(resolve(f[0]), -1, resolve(f[0])) for _, f in rows], []
    names = [f[1] for _, f in rows]
    if all(re.fullmatch(r"\d+", n) for n in names):
        classes = [str(i) for i in range(max(int(n) for n in names) + 1)]
        index = {n: int(n) for n in names}
    else:
        classes = sorted(set(names))
        index = {c: i for i, c in enumerate(classes)}
    return [Entry(resolve(f[0]), index[f[1]], resolve(f[0])) for _, f in rows], classes


_CLASS_FILE_SUFFIXES = (".txt", ".names", ".lst", ".csv")


def parse_classes(spec: str) -> list[str]:
    """Class names from a file (one name per line, `#` comments) or a comma-separated list `a,b,c`. A spec with no
    comma that looks like a path but names no file is a mistyped file name, not one class named after it."""
    path = Path(spec)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
    elif "," not in spec and (path.is_dir() or "/" in spec or os.sep in spec
                              or path.suffix.lower() in _CLASS_FILE_SUFFIXES):
        raise FileNotFoundError(f"--classes file {spec} not found (or not a file); give a file of class names, one "
                                "per line, or the names as a,b,c")
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--classes {spec!r} names no classes (a file with one name per line, or a,b,c)")
    if len(set(names)) != len(names):
        raise ValueError(f"--classes {spec!r} names a class twice: "
                         f"{sorted(n for n in set(names) if names.count(n) > 1)}")
    return names


def _named_classes(path: Path, entries: list[Entry], found: list[str], names: Sequence[str] | None) -> list[str]:
    """The classes of a list source: `names` when given (checked against the labels of the list), else `found`.
    A seg-list's label values are checked while its label maps are read (`_write_split`)."""
    if names is None:
        return found
    names = list(names)
    if not found:  # a seg-list, or an unlabelled list
        return names
    if all(re.fullmatch(r"\d+", c) for c in found):  # integer labels 0..max: the names follow them
        if len(found) > len(names):
            raise ValueError(f"{path}: labels go up to {len(found) - 1} but --classes names only {len(names)} "
                             "classes")
        return names
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise ValueError(f"{path}: labels {unknown[:5]} are not among the --classes names {names[:10]}")
    index = {c: i for i, c in enumerate(names)}
    relabel = {i: index[c] for i, c in enumerate(found)}
    entries[:] = [Entry(e.ref, relabel[e.label], e.image, e.seg) for e in entries]
    return names


def _dataset_entries(name: str, split: str, limit: int | None) -> Iterator[Entry]:
    for i, (img, label) in enumerate(iter_dataset(name, split, limit=limit)):
        yield Entry(f"{name}/{split}/{i}", label, img)


def _scene_entries(split: str, n: int, seed: int, options: dict) -> Iterator[Entry]:
    from sslpipe.ingest.scenes import SceneGenerator

    gen = SceneGenerator(split, seed=seed, **options)
    for i in range(n):
        scene = gen[i]
        yield Entry(f"scenes/{split}/{i}", -1, scene.image, Image.fromarray(scene.semantic),
                     Image.fromarray(scene.instances))


def _split_entries(
    entries: list[Entry], val_fraction: float, seed: int, shuffle: bool
) -> dict[str, list[Entry]]:
    order = list(range(len(entries)))
    rng = random.Random(seed)
    if shuffle or val_fraction > 0:
        rng.shuffle(order)
    n_val = round(len(entries) * val_fraction)
    val, train = sorted(order[:n_val]), order[n_val:]
    if shuffle:
        rng.shuffle(val)  # seeded; the train part is already a random permutation
    else:
        train = sorted(train)
    splits = {"train": [entries[i] for i in train]}
    if n_val:
        splits["val"] = [entries[i] for i in val]
    return splits


def _check_location(path: Path, kind: SourceKind) -> None:
    """A folder source must be a directory and a list a file, else one clear error (not an OS error from deep in
    the reading)."""
    flag = {"folder": "--folder", "list": "--list", "seg-list": "--seg-list"}.get(kind, kind)
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path} does not exist")
    if kind == "folder" and not path.is_dir():
        raise ValueError(f"--folder {path} is a file, not a directory: give the folder of images (one sub-folder "
                         "per class), or pass a list file with --list")
    if kind in ("list", "seg-list") and not path.is_file():
        raise ValueError(f"{flag} {path} is a directory, not a list file: give the text file of paths, or pass an "
                         "image folder with --folder")


def open_source(source: str, kind: SourceKind | None, options: ShardOptions, *, scenes: dict | None = None,
                coco_images: str | Path | None = None, classes: Sequence[str] | None = None) -> Source:
    """`source` as the samples of each split (module docstring; `kind` None = detected). `scenes`: options of the
    scenes source (`train` / `val` counts, `size` and any `SceneGenerator` keyword); `coco_images`: the image folder
    of a single COCO json (default: found next to it, see coco.py); `classes`: the class names of a list or
    seg-list source, in label order (`parse_classes` reads them from a file or `a,b,c`)."""
    kind = kind or _detect_kind(source)
    if classes is not None and kind not in ("list", "seg-list"):
        raise ValueError(f"class names (--classes) are for --list and --seg-list sources; {kind} sources name "
                         "their own classes")
    seed, limit, val_fraction = options.seed, options.limit, options.val_fraction
    if kind == "scenes":
        from sslpipe.ingest.scenes import scene_classes

        scene_options = {**SCENE_DEFAULTS, **(scenes or {})}
        counts = {s: int(scene_options.pop(s)) for s in SPLITS}
        if val_fraction:
            raise ValueError("scenes have their own train/val splits (scenes={'train': N, 'val': M}); "
                             "val_fraction must be 0")
        totals = {s: n if limit is None else min(n, limit) for s, n in counts.items()}
        names = scene_classes(scene_options.get("dataset", "fashion-mnist"), scene_options.get("classes"))
        return Source(kind, "scenes", names,
                      {s: _scene_entries(s, n, seed, scene_options) for s, n in totals.items() if n > 0}, totals,
                      manifest={"has_inst": True, "scenes": scene_options})
    if kind == "dataset":
        if val_fraction:
            raise ValueError(f"{source} has an official train/val split; val_fraction must be 0")
        return Source(kind, source, dataset_classes(source), {s: _dataset_entries(source, s, limit) for s in SPLITS},
                      {s: dataset_len(source, s, limit=limit) for s in SPLITS})
    if kind == "coco":
        coco = read_coco(source, coco_images)
        if len(coco.splits) > 1 and val_fraction:
            raise ValueError(f"{source} has its own splits ({', '.join(coco.splits)}); val_fraction must be 0")
        splits = {}
        for name, samples in coco.splits.items():
            entries = [Entry(path, -1, path, masks=masks) for path, masks in samples]
            for sub, part in _split_entries(entries, val_fraction, seed, options.shuffle and name == "train").items():
                splits[name if sub == "train" else sub] = part[:limit]
        return Source(kind, str(Path(source).resolve()), coco.classes, {s: iter(e) for s, e in splits.items()},
                      {s: len(e) for s, e in splits.items()}, manifest={"has_inst": True, "coco": coco.info})
    path = Path(source)
    if kind in ("folder", "list", "seg-list"):
        _check_location(path, kind)
    num_classes = None
    if kind == "folder":
        entries, names = _folder_entries(path)
    elif kind in ("list", "seg-list"):
        entries, found = _list_entries(path, seg=kind == "seg-list")
        names = _named_classes(path, entries, found, classes)
        num_classes = len(classes) if classes is not None and kind == "seg-list" else None
    else:
        raise ValueError(f"unknown shard source kind {kind!r}; choose folder, list, dataset, seg-list, scenes or coco")
    if not entries:
        raise ValueError(f"no images found in {source} (extensions: {', '.join(IMG_EXTENSIONS)})")
    splits = {s: e[:limit] for s, e in _split_entries(entries, val_fraction, seed, options.shuffle).items()}
    return Source(kind, str(path.resolve()), names, {s: iter(e) for s, e in splits.items()},
                  {s: len(e) for s, e in splits.items()}, num_classes)
