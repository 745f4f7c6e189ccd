"""How a source becomes shards: the options `write_shards` records whole in the manifest (`options`).

One record instead of nine keyword arguments, so the writer, its encoder processes and the manifest read the same
values; its field order is the order of the manifest's `options` keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ShardOptions:
    """A shard is closed at `samples_per_shard` samples or before its file would exceed `max_shard_bytes` (tar
    padding included; a single larger sample gets its own shard). `val_fraction` / `seed` / `shuffle`: split and
    order of folder, list and single-json COCO sources (bundled data sets and scenes keep their own splits and
    order; a segmentation layout refuses `val_fraction` and `limit`). `reencode`: None keeps JPEG/PNG bytes as they
    are (other formats become PNG; EXIF-rotated and 16-bit images are re-encoded too, upright and scaled to 8 bits:
    `sslpipe.ingest.encode`), "jpg" / "png" re-encodes everything; `quality` is the JPEG quality; `max_side`
    downsizes (keeping aspect) images whose longer side exceeds it. `limit`: at most this many samples per split."""

    samples_per_shard: int = 10000
    max_shard_bytes: int | None = None
    val_fraction: float = 0.0
    seed: int = 0
    shuffle: bool = True
    reencode: Literal["jpg", "png"] | None = None
    quality: int = 95
    max_side: int | None = None
    limit: int | None = None
