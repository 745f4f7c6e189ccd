"""Write WebDataset tar shards + ``manifest.json`` (format: docs/internals.md §1), read and verify them.

Sources (``kind``; auto-detected when ``None``):
- ``"dataset"``: a bundled data set name (``fashion-mnist``, ``digits``) with its official split (see datasets.py),
  written as lossless ``png`` in the data set's order.
- ``"folder"``: an ImageFolder tree ``ROOT/<class>/**/<image>`` (classes = sorted sub-folder names). A folder with no
  sub-folders is read as unlabelled images (no ``cls``).
- ``"list"``: a text file, one ``path [label]`` per line (tab-separated when the line has a tab, else whitespace),
  ``#`` comments, relative paths relative to the list file. Labels are integers (classes ``"0".."max"``) or names
  (classes = sorted names); all lines labelled or none.
- ``"seg-list"``: a text file of ``image_path label_map_path`` lines; the label map (8-bit ``L`` or palette ``P``
  PNG, pixel = class index, 255 = ignore) is stored as ``seg.png`` beside the image. Auto-detected when the second
  column of the first entry ends in an image extension. Its classes are unknown (``classes: []``) unless
  ``classes=`` names them (``sslpipe shards --classes FILE|a,b,c``); every label value is then checked against them.

Segmentation manifests record ``seg_values``: the label values that occur in the label maps (255 included), so a
reader can size a classifier or catch a wrong class count before it trains.
- ``"coco"``: COCO-format instance annotations, a COCO root folder or one json (``sslpipe/data/coco.py``), written as
  ``seg.png`` + ``inst.png`` per image like the scenes; the official layout keeps its splits.
- ``"scenes"`` (source ``"scenes"``): generated segmentation scenes (``sslpipe/data/scenes.py``: Fashion-MNIST objects
  on scikit-image's bundled photographs), ``seg.png`` + an instance-id map ``inst.png`` (16-bit PNG, 0 = none) per
  sample; splits ``train``/``val`` with ``scenes={"train": N, "val": M, "size": S, ...}`` (``seed`` seeds them).

Folder/list sources have no official split: ``val_fraction`` of them (a seeded permutation) goes to ``val``, and both
splits are written in that seeded shuffled order (``shuffle=True``) so a streaming shuffle buffer sees mixed classes.

Hand-written rather than ``webdataset.ShardWriter``: we need temp names + rename, a byte budget that accounts for tar
padding, per-shard sha256 and a manifest, none of which ShardWriter does; ``webdataset.TarWriter`` writes each tar.
Shards are deterministic: fixed mtime/owner in the tar headers and a single writer per split fed in source order.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from sslpipe.data.coco import CocoMasks, is_coco_source, read_coco
from sslpipe.data.datasets import (
    BUNDLED_DATASETS,
    SPLITS,
    dataset_classes,
    dataset_len,
    iter_dataset,
)
from sslpipe.errors import WriteFailed, io_failure

FORMAT = "sslpipe-shards/1"
MANIFEST = "manifest.json"
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_SHARD_RE = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")
_TAR_BLOCK, _TAR_RECORD = 512, 20 * 512
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}
SourceKind = Literal["folder", "list", "dataset", "seg-list", "scenes", "coco"]
SCENE_DEFAULTS = {"train": 2000, "val": 500, "size": 64}
IGNORE_LABEL = 255
_SEG_VALUES = "__seg_values__"  # not a tar member: the label values of a sample's seg.png, for the manifest
@dataclass(frozen=True)
class _Entry:
    ref: str  # what the user sees in manifest["skipped"]: a path, or "digits/train/17"
    label: int  # -1 = unlabelled
    image: str | Image.Image  # a file path, or an already decoded image (bundled data sets)
    seg: str | Image.Image | None = None
    inst: Image.Image | None = None  # instance ids (uint16), generated scenes only
    masks: CocoMasks | None = None  # COCO annotations, rendered to seg + inst after the image is read


@dataclass(frozen=True)
class _EncodeOptions:
    reencode: Literal["jpg", "png"] | None
    quality: int
    max_side: int | None


def _resized(img: Image.Image, max_side: int | None, resample: int) -> Image.Image:
    if max_side is None or max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, resample)


def _encode_image(img: Image.Image, key: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if key == "jpg":
        img = img if img.mode in ("L", "RGB") else img.convert("RGB")
        img.save(buf, format="JPEG", quality=quality)
    else:
        img = img if img.mode in _PNG_MODES else img.convert("RGB")
        img.save(buf, format="PNG")
    return buf.getvalue()


def _encode(entry: _Entry, opts: _EncodeOptions) -> tuple[_Entry, dict[str, bytes] | str]:
    """Read, check and encode one sample; returns the tar fields or an error string (the sample is then skipped)."""
    try:
        if isinstance(entry.image, Image.Image):
            img, raw, key = entry.image, None, opts.reencode or "png"
        else:
            raw = Path(entry.image).read_bytes()
            img = Image.open(io.BytesIO(raw))
            fmt = img.format
            img.load()  # decode fully: truncated/corrupt files fail here, not in the training stream
            native = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}.get(fmt or "")
            key = opts.reencode or native or "png"
            if key != native or (opts.max_side is not None and max(img.size) > opts.max_side):
                raw = None
        resized = _resized(img, opts.max_side, Image.Resampling.BICUBIC)
        fields = {key: raw if raw is not None else _encode_image(resized, key, opts.quality)}
        if entry.label >= 0:
            fields["cls"] = str(entry.label).encode("ascii")
        seg_source, inst = entry.seg, entry.inst
        if entry.masks is not None:
            seg_source, inst, crowd = entry.masks.render(img.size)
            if crowd:  # visible crowd regions ({instance id: class}), iscrowd ground truth in evaluation
                visible = set(np.unique(np.asarray(_resized(inst, opts.max_side, Image.Resampling.NEAREST))).tolist())
                crowd = {k: c for k, c in crowd.items() if k in visible}
            if crowd:
                fields["crowd.json"] = json.dumps({str(k): c for k, c in crowd.items()}).encode()
        if inst is not None:
            if inst.size != img.size:
                raise ValueError(f"instance map is {inst.size}, image is {img.size}")
            fields["inst.png"] = _encode_image(_resized(inst, opts.max_side, Image.Resampling.NEAREST), "png", 0)
        if seg_source is not None:
            seg = seg_source if isinstance(seg_source, Image.Image) else Image.open(seg_source)
            seg.load()
            if seg.mode not in ("L", "P"):
                raise ValueError(f"label map {seg_source} has mode {seg.mode}; expected 8-bit L or palette P")
            if seg.size != img.size:
                raise ValueError(f"label map {seg_source} is {seg.size}, image is {img.size}")
            values = np.asarray(seg, dtype=np.uint8)  # palette index -> class index, mode L
            seg = Image.fromarray(values)
            fields["seg.png"] = _encode_image(_resized(seg, opts.max_side, Image.Resampling.NEAREST), "png", 0)
            fields[_SEG_VALUES] = np.unique(values).tobytes()
        return entry, fields
    except Exception as e:  # noqa: BLE001 - any unreadable sample is skipped and reported, never fatal
        return entry, f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------------------------- sources
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
        return "seg-list" if rows and len(rows[0][1]) == 2 and rows[0][1][1].lower().endswith(IMG_EXTENSIONS) else "list"
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


def _folder_entries(root: Path) -> tuple[list[_Entry], list[str]]:
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
        classes = sorted(d.name for d in it if d.is_dir() and not d.name.startswith("."))
    if not classes:
        return [_Entry(p, -1, p) for p in images_under(root)], []
    return [_Entry(p, i, p) for i, c in enumerate(classes) for p in images_under(root / c)], classes


def _list_entries(path: Path, seg: bool) -> tuple[list[_Entry], list[str]]:
    rows = _parse_list(path)
    base = path.parent

    def resolve(p: str) -> str:
        return str(base / p) if not os.path.isabs(p) else p

    if seg:
        bad = [n for n, f in rows if len(f) != 2]
        if bad:
            raise ValueError(f"{path}:{bad[0]}: seg-list lines must be 'image_path label_map_path'")
        return [_Entry(resolve(f[0]), -1, resolve(f[0]), resolve(f[1])) for _, f in rows], []
    labelled = {len(f) == 2 for _, f in rows}
    if len(labelled) > 1:
        raise ValueError(f"{path}: some lines have a label and some do not; label every line or none")
    if labelled != {True}:
        return [_Entry(resolve(f[0]), -1, resolve(f[0])) for _, f in rows], []
    names = [f[1] for _, f in rows]
    if all(re.fullmatch(r"\d+", n) for n in names):
        classes = [str(i) for i in range(max(int(n) for n in names) + 1)]
        index = {n: int(n) for n in names}
    else:
        classes = sorted(set(names))
        index = {c: i for i, c in enumerate(classes)}
    return [_Entry(resolve(f[0]), index[f[1]], resolve(f[0])) for _, f in rows], classes


def parse_classes(spec: str) -> list[str]:
    """Class names from a file (one name per line, `#` comments) or a comma-separated list `a,b,c`."""
    path = Path(spec)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--classes {spec!r} names no classes (a file with one name per line, or a,b,c)")
    if len(set(names)) != len(names):
        raise ValueError(f"--classes {spec!r} names a class twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return names


def _named_classes(path: Path, entries: list[_Entry], found: list[str], names: Sequence[str] | None) -> list[str]:
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
    entries[:] = [_Entry(e.ref, relabel[e.label], e.image, e.seg) for e in entries]
    return names


def _dataset_entries(name: str, split: str, limit: int | None) -> Iterator[_Entry]:
    for i, (img, label) in enumerate(iter_dataset(name, split, limit=limit)):
        yield _Entry(f"{name}/{split}/{i}", label, img)


def _scene_entries(split: str, n: int, seed: int, options: dict) -> Iterator[_Entry]:
    from sslpipe.data.scenes import SceneGenerator

    gen = SceneGenerator(split, seed=seed, **options)
    for i in range(n):
        scene = gen[i]
        yield _Entry(f"scenes/{split}/{i}", -1, scene.image, Image.fromarray(scene.semantic),
                     Image.fromarray(scene.instances))


def _split_entries(
    entries: list[_Entry], val_fraction: float, seed: int, shuffle: bool
) -> dict[str, list[_Entry]]:
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


# ----------------------------------------------------------------------------------------------------------- writing
class _HashingFile:
    """A write-only file that hashes and counts what tarfile streams into it (no second read of the shard)."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def close(self) -> None:
        self.f.close()


def _tar_size(content: int) -> int:
    """Final size of a streamed tar whose members take ``content`` bytes: end blocks + padding to a record."""
    return math.ceil((content + 2 * _TAR_BLOCK) / _TAR_RECORD) * _TAR_RECORD


def _member_size(fields: dict[str, bytes]) -> int:
    return sum(_TAR_BLOCK + math.ceil(len(v) / _TAR_BLOCK) * _TAR_BLOCK for v in fields.values())


def _encoded(
    entries: Iterable[_Entry], opts: _EncodeOptions, pool, window: int
) -> Iterator[tuple[_Entry, dict[str, bytes] | str]]:
    if pool is None:
        yield from (_encode(e, opts) for e in entries)
        return
    # Feed the pool window by window: Pool.imap would otherwise pull the whole (possibly in-memory) source at once.
    batch: list[_Entry] = []
    for e in entries:
        batch.append(e)
        if len(batch) == window:
            yield from pool.imap(_encode_star, [(b, opts) for b in batch], chunksize=8)
            batch = []
    yield from pool.imap(_encode_star, [(b, opts) for b in batch], chunksize=8)


def _encode_star(args: tuple[_Entry, _EncodeOptions]) -> tuple[_Entry, dict[str, bytes] | str]:
    return _encode(*args)


class _SplitWriter:
    """The shards of one split, written under temporary names (each appended to `renames` as it opens, so a caller
    can remove them on failure); a shard is closed at `samples_per_shard` samples or before it would pass
    `max_shard_bytes`."""

    def __init__(self, out: Path, split: str, samples_per_shard: int, max_shard_bytes: int | None,
                 renames: list[tuple[Path, Path]]) -> None:
        self.out, self.split, self.renames = out, split, renames
        self.samples_per_shard, self.max_shard_bytes = samples_per_shard, max_shard_bytes
        self.shards: list[dict] = []
        self.state: dict = {}
        self.index = 0

    def add(self, fields: dict[str, bytes]) -> None:
        size = _member_size(fields)
        state = self.state
        if state and (state["n"] >= self.samples_per_shard or (self.max_shard_bytes is not None and _tar_size(
                state["content"] + size) > self.max_shard_bytes)):
            self.close_shard()
        if not self.state:
            self.open_shard()
        self.state["writer"].write({"__key__": f"{self.split}_{self.index:08d}", **fields})
        self.state["n"] += 1
        self.state["content"] += size
        self.index += 1

    def open_shard(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        tmp = self.out / f".{name}.partial"
        file = _HashingFile(tmp)
        self.state.update(name=name, file=file, n=0, content=0,
                          writer=wds.TarWriter(file, encoder=False, mtime=0, user="sslpipe", group="sslpipe"))
        self.renames.append((tmp, self.out / name))

    def close_shard(self, keep: bool = True) -> None:
        if self.state:
            if keep:
                self.state["writer"].close()
                self.state["file"].close()
                self.shards.append({"name": self.state["name"], "samples": self.state["n"],
                                    "bytes": self.state["file"].bytes, "sha256": self.state["file"].sha.hexdigest()})
            else:  # discarded after a failure, which closing may repeat (a full disk): the file is closed anyway
                for part in ("writer", "file"):
                    with contextlib.suppress(OSError):
                        self.state[part].close()
            self.state.clear()


def _write_split(
    out: Path, split: str, samples: Iterator[tuple[_Entry, dict[str, bytes] | str]], samples_per_shard: int,
    max_shard_bytes: int | None, skipped: list[dict], keys_seen: set[str], seg_values: set[int],
    renames: list[tuple[Path, Path]], num_classes: int | None = None,
) -> dict:
    """Write one split (unreadable samples skipped and listed); `num_classes` (named classes of a segmentation
    source): a label value outside 0..num_classes-1 and 255 stops the writing with an error naming the label map."""
    writer = _SplitWriter(out, split, samples_per_shard, max_shard_bytes, renames)
    try:
        for entry, fields in samples:
            if isinstance(fields, str):
                skipped.append({"source": entry.ref, "split": split, "error": fields})
                continue
            if _SEG_VALUES in fields:
                values = set(np.frombuffer(fields.pop(_SEG_VALUES), dtype=np.uint8).tolist())
                bad = sorted(v for v in values if num_classes is not None and v >= num_classes and v != IGNORE_LABEL)
                if bad:
                    label_map = entry.seg if isinstance(entry.seg, str) else entry.ref
                    raise ValueError(f"label map {label_map} holds class value(s) {bad}, but the classes name only "
                                     f"{num_classes} (values 0..{num_classes - 1}, {IGNORE_LABEL} = ignore): fix "
                                     "--classes or the label maps")
                seg_values.update(values)
            keys_seen.update(k for k in fields if k not in ("cls", "seg.png", "inst.png", "crowd.json"))
            writer.add(fields)
    except BaseException:
        writer.close_shard(keep=False)  # closed, so the caller can remove it
        raise
    writer.close_shard()
    return {"samples": writer.index, "shards": writer.shards}


def _prepare_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"shard output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    existing = list(out.iterdir())
    if existing and not force:
        raise FileExistsError(f"shard output directory {out} is not empty; pass --force (force=True) to overwrite it")
    (out / MANIFEST).unlink(missing_ok=True)  # first, so an interrupted rewrite never looks complete
    for p in existing:
        if p.is_file() and (_SHARD_RE.match(p.name) or p.name.endswith(".tar.partial")):
            p.unlink()


def write_shards(
    out_dir: str | Path,
    *,
    source: str,
    kind: SourceKind | None = None,
    samples_per_shard: int = 10000,
    max_shard_bytes: int | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    shuffle: bool = True,
    reencode: Literal["jpg", "png"] | None = None,
    quality: int = 95,
    max_side: int | None = None,
    limit: int | None = None,
    num_workers: int = 0,
    force: bool = False,
    created_by: str | None = None,
    progress: bool = True,
    scenes: dict | None = None,
    coco_images: str | Path | None = None,
    classes: Sequence[str] | None = None,
) -> dict:
    """Write ``source`` as ``out_dir/{split}-{i:06d}.tar`` shards + ``manifest.json``; return the manifest.

    ``kind``: see the module docstring (None = auto-detect). A shard is closed at ``samples_per_shard`` samples or
    before its file would exceed ``max_shard_bytes`` (tar padding included; a single larger sample gets its own shard).
    ``val_fraction``/``seed``/``shuffle``: split and order of folder/list sources (bundled data sets keep their
    official split and order). ``reencode``: None keeps JPEG/PNG bytes as they are (other formats become PNG),
    "jpg"/"png" re-encodes everything; ``quality`` is the JPEG quality; ``max_side`` downsizes (keeping aspect) images
    whose longer side exceeds it. ``limit``: at most this many samples per split. ``num_workers`` > 0 decodes and
    encodes in a process pool; results stay in order, so shards are identical for any worker count. ``force``:
    allow a non-empty ``out_dir`` (its old shards and manifest are removed). ``scenes``: options of the ``scenes``
    source (``train``/``val`` counts, ``size`` and any `SceneGenerator` keyword). ``coco_images``: the image folder of
    a single COCO json (default: found next to it, see coco.py). ``classes``: the class names of a ``list`` or
    ``seg-list`` source, in label order (``parse_classes`` reads them from a file or ``a,b,c``); label maps are
    checked against them. Unreadable images are skipped and
    listed in ``manifest["skipped"]``. Shards are written under temporary names and renamed, and the manifest is
    written last.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if max_shard_bytes is not None and max_shard_bytes < _TAR_RECORD:
        raise ValueError(f"max_shard_bytes must be >= {_TAR_RECORD} (one tar record), got {max_shard_bytes}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if reencode not in (None, "jpg", "png"):
        raise ValueError(f"reencode must be None, 'jpg' or 'png', got {reencode!r}")
    kind = kind or _detect_kind(source)
    opts = _EncodeOptions(reencode, quality, max_side)
    named = None  # class names given by the caller, checked against the label maps
    if classes is not None and kind not in ("list", "seg-list"):
        raise ValueError(f"class names (--classes) are for --list and --seg-list sources; {kind} sources name "
                         "their own classes")

    totals: dict[str, int] = {}
    scene_options: dict | None = None
    if kind == "scenes":
        from sslpipe.data.scenes import scene_classes

        scene_options = {**SCENE_DEFAULTS, **(scenes or {})}
        counts = {s: int(scene_options.pop(s)) for s in SPLITS}
        if val_fraction:
            raise ValueError("scenes have their own train/val splits (scenes={'train': N, 'val': M}); "
                             "val_fraction must be 0")
        totals = {s: n if limit is None else min(n, limit) for s, n in counts.items()}
        classes = scene_classes(scene_options.get("dataset", "fashion-mnist"), scene_options.get("classes"))
        split_iters = {s: _scene_entries(s, n, seed, scene_options) for s, n in totals.items() if n > 0}
        source_name = "scenes"
    elif kind == "dataset":
        if val_fraction:
            raise ValueError(f"{source} has an official train/val split; val_fraction must be 0")
        classes = dataset_classes(source)
        split_iters = {s: _dataset_entries(source, s, limit) for s in SPLITS}
        totals = {s: dataset_len(source, s, limit=limit) for s in SPLITS}
        source_name = source
    elif kind == "coco":
        coco = read_coco(source, coco_images)
        classes = coco.classes
        if len(coco.splits) > 1 and val_fraction:
            raise ValueError(f"{source} has its own splits ({', '.join(coco.splits)}); val_fraction must be 0")
        splits = {}
        for name, samples in coco.splits.items():
            entries = [_Entry(path, -1, path, masks=masks) for path, masks in samples]
            for sub, part in _split_entries(entries, val_fraction, seed, shuffle and name == "train").items():
                splits[name if sub == "train" else sub] = part[:limit]
        split_iters = {s: iter(e) for s, e in splits.items()}
        totals = {s: len(e) for s, e in splits.items()}
        source_name = str(Path(source).resolve())
    else:
        path = Path(source)
        if kind == "folder":
            entries, classes = _folder_entries(path)
        elif kind in ("list", "seg-list"):
            entries, found = _list_entries(path, seg=kind == "seg-list")
            named, classes = classes, _named_classes(path, entries, found, classes)
        else:
            raise ValueError(f"unknown shard source kind {kind!r}; choose folder, list, dataset, seg-list, scenes or coco")
        if not entries:
            raise ValueError(f"no images found in {source} (extensions: {', '.join(IMG_EXTENSIONS)})")
        splits = {s: e[:limit] for s, e in _split_entries(entries, val_fraction, seed, shuffle).items()}
        split_iters = {s: iter(e) for s, e in splits.items()}
        totals = {s: len(e) for s, e in splits.items()}
        source_name = str(path.resolve())

    out = Path(out_dir)
    try:
        _prepare_out_dir(out, force)
    except OSError as err:
        if io_failure(err) is None:
            raise
        raise WriteFailed(f"cannot write shards into {out}: {io_failure(err)}; choose another output directory "
                          "or fix its permissions / free space") from err
    skipped: list[dict] = []
    keys_seen: set[str] = set()
    seg_values: set[int] = set()
    split_info: dict[str, dict] = {}
    renames: list[tuple[Path, Path]] = []
    pool = multiprocessing.Pool(num_workers) if num_workers > 0 else None
    try:
        for split, entries_iter in split_iters.items():
            bar = tqdm(_encoded(entries_iter, opts, pool, window=max(64, 64 * num_workers)), total=totals[split],
                       desc=f"shards {split}", unit="img", disable=not progress)
            split_info[split] = _write_split(out, split, iter(bar), samples_per_shard, max_shard_bytes, skipped,
                                             keys_seen, seg_values, renames,
                                             len(named) if named is not None and kind == "seg-list" else None)
    except BaseException as err:
        for tmp, _ in renames:  # nothing half-written stays behind; earlier shard sets are untouched
            tmp.unlink(missing_ok=True)
        if io_failure(err) is not None:
            where = err.filename if isinstance(err, OSError) and err.filename else renames[-1][0] if renames else out
            raise WriteFailed(f"could not write {where}: {io_failure(err)}. Removed the {len(renames)} unfinished "
                              f"shard file(s) of this run (.*.tar.partial in {out}); no manifest was written. Free "
                              "space (or fix the disk / permissions) and run the command again with --force") from err
        raise
    finally:
        if pool is not None:
            pool.terminate()
    for tmp, final in renames:
        os.replace(tmp, final)

    manifest = {
        "format": FORMAT,
        "created_by": created_by if created_by is not None else " ".join(sys.argv),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source_name,
        "source_kind": kind,
        "classes": classes,
        "image_key": ";".join(sorted(keys_seen)) or (reencode or "png"),
        "has_seg": kind in ("seg-list", "scenes", "coco"),
        **({"seg_values": sorted(seg_values)} if kind in ("seg-list", "scenes", "coco") else {}),
        **({"has_inst": True, "scenes": scene_options} if kind == "scenes" else {}),
        **({"has_inst": True, "coco": coco.info} if kind == "coco" else {}),
        "splits": split_info,
        "skipped": skipped,
        "options": {"samples_per_shard": samples_per_shard, "max_shard_bytes": max_shard_bytes,
                    "val_fraction": val_fraction, "seed": seed, "shuffle": shuffle, "reencode": reencode,
                    "quality": quality, "max_side": max_side, "limit": limit},
    }
    tmp = out / f".{MANIFEST}.partial"
    try:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, out / MANIFEST)
    except OSError as err:
        if io_failure(err) is None:
            raise
        tmp.unlink(missing_ok=True)
        for _, final in renames:  # shards without a manifest are no shard set: leave the directory as it was
            final.unlink(missing_ok=True)
        raise WriteFailed(f"could not write {out / MANIFEST}: {io_failure(err)}. Removed the partial manifest and "
                          f"the {len(renames)} shard file(s) of this run from {out}. Free space (or fix the disk / "
                          "permissions) and run the command again with --force") from err
    return manifest


# ----------------------------------------------------------------------------------------------------------- reading
def read_manifest(path: str | Path) -> dict:
    """Load a shard set's manifest from its directory or from the json file itself."""
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no shard manifest at {file}; write the shards first with `sslpipe shards`")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}); rewrite the shards with `sslpipe shards --force`") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("splits"), dict):
        raise ValueError(f"{file} is not an {FORMAT} manifest (format/splits missing or wrong)")
    return manifest


def verify_shards(path: str | Path) -> list[str]:
    """Re-hash every shard listed in the manifest; return one message per missing/changed shard (empty = all good)."""
    manifest = read_manifest(path)
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    problems = []
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            file = directory / shard["name"]
            if not file.is_file():
                problems.append(f"{split}: {file} is missing")
                continue
            sha = hashlib.sha256()
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
            size = file.stat().st_size
            if size != shard["bytes"] or sha.hexdigest() != shard["sha256"]:
                problems.append(f"{split}: {file} differs from the manifest (bytes {size} vs {shard['bytes']}, "
                                f"sha256 {sha.hexdigest()[:12]}... vs {shard['sha256'][:12]}...)")
    return problems
