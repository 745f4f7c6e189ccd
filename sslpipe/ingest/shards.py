"""Write a source as WebDataset tar shards + ``manifest.json`` (format: docs/internals.md §1).

The pieces: the source's samples (`sslpipe.ingest.sources`), their encoding in a process pool
(`sslpipe.ingest.encode`) and the tar files and manifest (`sslpipe.ingest.tar_writer`); here they are put together
and the manifest is assembled.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from sslpipe.data.manifest import FORMAT
from sslpipe.ingest.encode import encoded
from sslpipe.ingest.options import ShardOptions
from sslpipe.ingest.sources import SEG_KINDS, SourceKind, open_source
from sslpipe.ingest.tar_writer import TAR_RECORD, ShardSetWriter, prepare_out_dir


def write_shards(
    out_dir: str | Path,
    *,
    source: str,
    kind: SourceKind | None = None,
    options: ShardOptions = ShardOptions(),
    num_workers: int = 0,
    force: bool = False,
    created_by: str | None = None,
    progress: bool = True,
    scenes: dict | None = None,
    coco_images: str | Path | None = None,
    classes: Sequence[str] | None = None,
) -> dict:
    """Write ``source`` as ``out_dir/{split}-{i:06d}.tar`` shards + ``manifest.json``; return the manifest.

    ``kind``, ``scenes``, ``coco_images``, ``classes``: the source (`sslpipe.ingest.sources.open_source`; None =
    auto-detect); ``options``: sharding, split and encoding (`ShardOptions`). ``num_workers`` > 0 decodes and encodes
    in a process pool; results stay in order, so shards are identical for any worker count. ``force``: allow a
    non-empty ``out_dir`` (its old shards and manifest stay until the new set replaces them). Unreadable samples are
    skipped and listed in ``manifest["skipped"]``; a split none of whose samples can be read, or a label map of the
    wrong mode or size (`InputError`), stops the writing with nothing written. Shards are written under temporary
    names and renamed, and the manifest is written last.
    """
    writer, manifest = write_unpublished(out_dir, source=source, kind=kind, options=options, num_workers=num_workers,
                                         force=force, created_by=created_by, progress=progress, scenes=scenes,
                                         coco_images=coco_images, classes=classes)
    writer.publish(manifest)
    return manifest


def write_unpublished(
    out_dir: str | Path,
    *,
    source: str,
    kind: SourceKind | None = None,
    options: ShardOptions = ShardOptions(),
    num_workers: int = 0,
    force: bool = False,
    created_by: str | None = None,
    progress: bool = True,
    scenes: dict | None = None,
    coco_images: str | Path | None = None,
    classes: Sequence[str] | None = None,
    split_names: dict[str, str] | None = None,
) -> tuple[ShardSetWriter, dict]:
    """`write_shards` up to its last step: the shards under temporary names and the manifest not yet written, so a
    caller writing several sets (`sslpipe.ingest.semi_shards`) publishes them only once all are whole
    (`writer.publish(manifest)`), or removes them all (`writer.discard()`). `split_names`: a split written under
    another name (a layout's val list is a one-split list source, whose split is `train`)."""
    if options.samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {options.samples_per_shard}")
    if options.max_shard_bytes is not None and options.max_shard_bytes < TAR_RECORD:
        raise ValueError(f"max_shard_bytes must be >= {TAR_RECORD} (one tar record), got {options.max_shard_bytes}")
    if not 0.0 <= options.val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {options.val_fraction}")
    if options.reencode not in (None, "jpg", "png"):
        raise ValueError(f"reencode must be None, 'jpg' or 'png', got {options.reencode!r}")
    opened = open_source(source, kind, options, scenes=scenes, coco_images=coco_images, classes=classes)
    if split_names:
        opened.splits = {split_names.get(s, s): e for s, e in opened.splits.items()}
        opened.totals = {split_names.get(s, s): n for s, n in opened.totals.items()}

    out = Path(out_dir)
    prepare_out_dir(out, force)
    writer = ShardSetWriter(out, options.samples_per_shard, options.max_shard_bytes)
    split_info: dict[str, dict] = {}
    pool = multiprocessing.Pool(num_workers) if num_workers > 0 else None
    try:
        for split, entries in opened.splits.items():
            bar = tqdm(encoded(entries, options, pool, window=max(64, 64 * num_workers)), total=opened.totals[split],
                       desc=f"shards {split}", unit="img", disable=not progress)
            split_info[split] = writer.write_split(split, iter(bar), opened.num_classes)
            if opened.totals[split] and not split_info[split]["samples"]:
                first = writer.skipped[0]
                raise ValueError(f"none of the {opened.totals[split]} samples of split {split!r} could be read, e.g. "
                                 f"{first['source']}: {first['error']}; nothing was written")
    except BaseException as err:
        writer.abandon(err)
        raise
    finally:
        if pool is not None:
            pool.terminate()

    has_seg = opened.kind in SEG_KINDS
    manifest = {
        "format": FORMAT,
        "created_by": created_by if created_by is not None else " ".join(sys.argv),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": opened.name,
        "source_kind": opened.kind,
        "classes": opened.classes,
        "image_key": ";".join(sorted(writer.keys_seen)) or (options.reencode or "png"),
        "has_seg": has_seg,
        **({"seg_values": sorted(writer.seg_values)} if has_seg else {}),
        **opened.manifest,
        "splits": split_info,
        "skipped": writer.skipped,
        "options": dataclasses.asdict(options),
    }
    return writer, manifest
