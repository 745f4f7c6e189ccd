"""Read, check and encode each sample of a source into its tar fields, in this process or a pool of them.

Results come back in source order whatever the number of processes, so shards are identical for any worker count.

Every image is stored as it is shown, whatever the flags: its EXIF orientation is applied (`ImageOps.exif_transpose`;
the stored file then carries no orientation tag) and 16-bit values are scaled to 8 bits (`sslpipe.data.stream.to_8bit`,
value >> 8); such an image is re-encoded even where the bytes are otherwise kept. A label map paired with an image is
read the same way (shown orientation) and must match the image as shown.
"""
from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from sslpipe.data.stream import to_8bit
from sslpipe.ingest.coco import CocoMasks
from sslpipe.ingest.options import ShardOptions

_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}  # I;16: the instance-id maps (images are 8-bit by then)
_ORIENTATION = 0x0112  # the EXIF tag; 1 = as stored, 2..8 = flipped and/or rotated
SEG_VALUES = "__seg_values__"  # not a tar member: the label values of a sample's seg.png, for the manifest


@dataclass(frozen=True)
class Entry:
    """One sample of a source, before its image is read (in the encoder, maybe in another process)."""

    ref: str  # what the user sees in manifest["skipped"]: a path, or "digits/train/17"
    label: int  # -1 = unlabelled
    image: str | Image.Image  # a file path, or an already decoded image (bundled data sets)
    seg: str | Image.Image | None = None
    inst: Image.Image | None = None  # instance ids (uint16), generated scenes only
    masks: CocoMasks | None = None  # COCO annotations, rendered to seg + inst after the image is read


Encoded = tuple[Entry, dict[str, bytes] | str]  # a sample's tar fields, or why it is skipped


class InputError(ValueError):
    """A sample that shows the input itself is wrong (colour-coded label maps, label maps of another size), not one
    unreadable file: skipping it would skip the whole source, so the writing stops and says what to fix."""


def _resized(img: Image.Image, max_side: int | None, resample: int) -> Image.Image:
    if max_side is None or max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, resample)


def _upright(img: Image.Image) -> tuple[Image.Image, int]:
    """(`img` as it is shown, its EXIF orientation): viewers and annotation tools show a photo rotated by the tag, and
    a stored copy that kept or dropped the tag depending on the flags would differ between runs."""
    orientation = img.getexif().get(_ORIENTATION, 1)
    if orientation not in range(2, 9):
        return img, 1
    return ImageOps.exif_transpose(img), orientation


def _exif_note(orientation: int, stored: tuple[int, int], label: tuple[int, int]) -> str:
    """What a size error says of an image whose EXIF orientation swaps its sides (5..8): the label may follow the
    unrotated pixels."""
    if orientation < 5:
        return ""
    note = (f" (its EXIF orientation {orientation} turns the stored {stored[0]}x{stored[1]} pixels into the image as "
            "shown, which is what sslpipe stores")
    if label == stored:
        note += "; this label follows the stored, unrotated pixels: rotate it like the image, or strip the tag"
    return note + ")"


def _encode_image(img: Image.Image, key: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if key == "jpg":
        img = img if img.mode in ("L", "RGB") else img.convert("RGB")
        img.save(buf, format="JPEG", quality=quality)
    else:
        img = img if img.mode in _PNG_MODES else img.convert("RGB")
        img.save(buf, format="PNG")
    return buf.getvalue()


def _encode(entry: Entry, opts: ShardOptions) -> Encoded:
    """Read, check and encode one sample; returns the tar fields or an error string (the sample is then skipped);
    raises `InputError`."""
    try:
        if isinstance(entry.image, Image.Image):
            img, raw, native, key = entry.image, None, None, opts.reencode or "png"
        else:
            raw = Path(entry.image).read_bytes()
            img = Image.open(io.BytesIO(raw))
            fmt = img.format
            img.load()  # decode fully: truncated/corrupt files fail here, not in the training stream
            native = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}.get(fmt or "")
            key = opts.reencode or native or "png"
        stored = img.size
        img, orientation = _upright(img)
        shown = to_8bit(img)
        if raw is not None and (key != native or shown is not img or orientation != 1
                                or (opts.max_side is not None and max(img.size) > opts.max_side)):
            raw = None
        img = shown
        resized = _resized(img, opts.max_side, Image.Resampling.BICUBIC)
        fields = {key: raw if raw is not None else _encode_image(resized, key, opts.quality)}
        if entry.label >= 0:
            fields["cls"] = str(entry.label).encode("ascii")
        seg_source, inst = entry.seg, entry.inst
        if entry.masks is not None:
            if orientation != 1 and (entry.masks.width, entry.masks.height) != img.size:
                raise ValueError(f"{entry.ref} is {img.size[0]}x{img.size[1]} as shown but its COCO record says "
                                 f"{entry.masks.width}x{entry.masks.height}"
                                 + _exif_note(orientation, stored, (entry.masks.width, entry.masks.height)))
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
            seg, _ = _upright(seg)
            if seg.mode not in ("L", "P"):
                raise InputError(f"label map {seg_source} has mode {seg.mode}, but label maps must be 8-bit L or "
                                 "palette P PNGs whose pixel is the class index (255 = ignore): convert colour-coded "
                                 "masks to class-index PNGs")
            if seg.size != img.size:
                raise InputError(f"label map {seg_source} is {seg.size[0]}x{seg.size[1]} but its image {entry.ref} is "
                                 f"{img.size[0]}x{img.size[1]}{_exif_note(orientation, stored, seg.size)}: each "
                                 "label map must match its image's size as shown")
            values = np.asarray(seg, dtype=np.uint8)  # palette index -> class index, mode L
            seg = Image.fromarray(values)
            fields["seg.png"] = _encode_image(_resized(seg, opts.max_side, Image.Resampling.NEAREST), "png", 0)
            fields[SEG_VALUES] = np.unique(values).tobytes()
        return entry, fields
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any other unreadable sample is skipped and reported, never fatal
        return entry, f"{type(e).__name__}: {e}"


def encoded(entries: Iterable[Entry], opts: ShardOptions, pool: Pool | None, window: int) -> Iterator[Encoded]:
    """Every entry encoded, in order: here, or by `pool` fed `window` entries at a time."""
    if pool is None:
        yield from (_encode(e, opts) for e in entries)
        return
    # Feed the pool window by window: Pool.imap would otherwise pull the whole (possibly in-memory) source at once.
    batch: list[Entry] = []
    for e in entries:
        batch.append(e)
        if len(batch) == window:
            yield from pool.imap(_encode_star, [(b, opts) for b in batch], chunksize=8)
            batch = []
    yield from pool.imap(_encode_star, [(b, opts) for b in batch], chunksize=8)


def _encode_star(args: tuple[Entry, ShardOptions]) -> Encoded:
    return _encode(*args)
