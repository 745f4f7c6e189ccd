"""The tar files and the manifest of one shard set (format: docs/internals.md §1), written so that a failure leaves
nothing half-written behind.

Hand-written rather than ``webdataset.ShardWriter``: we need temp names + rename, a byte budget that accounts for tar
padding, per-shard sha256 and a manifest, none of which ShardWriter does; ``webdataset.TarWriter`` writes each tar.
Shards are deterministic: fixed mtime/owner in the tar headers and a single writer per split fed in source order.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import webdataset as wds

from sslpipe.data.manifest import MANIFEST
from sslpipe.errors import WriteFailed, io_failure
from sslpipe.ingest.encode import SEG_VALUES, Encoded

IGNORE_LABEL = 255
TAR_BLOCK, TAR_RECORD = 512, 20 * 512
_SHARD_RE = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")


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
    return math.ceil((content + 2 * TAR_BLOCK) / TAR_RECORD) * TAR_RECORD


def _member_size(fields: dict[str, bytes]) -> int:
    return sum(TAR_BLOCK + math.ceil(len(v) / TAR_BLOCK) * TAR_BLOCK for v in fields.values())


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


class ShardSetWriter:
    """The shards of every split of one set under temporary names, then (`publish`) renamed and described by a
    manifest written last, or (`abandon`) removed. Gathers what the manifest records of the samples: the skipped
    ones, the image keys and the label values of the label maps."""

    def __init__(self, out: Path, samples_per_shard: int, max_shard_bytes: int | None) -> None:
        self.out, self.samples_per_shard, self.max_shard_bytes = out, samples_per_shard, max_shard_bytes
        self.renames: list[tuple[Path, Path]] = []
        self.skipped: list[dict] = []
        self.keys_seen: set[str] = set()
        self.seg_values: set[int] = set()

    def write_split(self, split: str, samples: Iterable[Encoded], num_classes: int | None = None) -> dict:
        """Write one split (unreadable samples skipped and listed); `num_classes` (named classes of a segmentation
        source): a label value outside 0..num_classes-1 and 255 stops the writing with an error naming the label
        map."""
        writer = _SplitWriter(self.out, split, self.samples_per_shard, self.max_shard_bytes, self.renames)
        try:
            for entry, fields in samples:
                if isinstance(fields, str):
                    self.skipped.append({"source": entry.ref, "split": split, "error": fields})
                    continue
                if SEG_VALUES in fields:
                    values = set(np.frombuffer(fields.pop(SEG_VALUES), dtype=np.uint8).tolist())
                    bad = sorted(v for v in values
                                 if num_classes is not None and v >= num_classes and v != IGNORE_LABEL)
                    if bad:
                        label_map = entry.seg if isinstance(entry.seg, str) else entry.ref
                        raise ValueError(f"label map {label_map} holds class value(s) {bad}, but the classes name "
                                         f"only {num_classes} (values 0..{num_classes - 1}, {IGNORE_LABEL} = ignore): "
                                         "fix the label maps, or the class names (--classes of a list source)")
                    self.seg_values.update(values)
                self.keys_seen.update(k for k in fields if k not in ("cls", "seg.png", "inst.png", "crowd.json"))
                writer.add(fields)
        except BaseException:
            writer.close_shard(keep=False)  # closed, so that `abandon` can remove it
            raise
        writer.close_shard()
        return {"samples": writer.index, "shards": writer.shards}

    def discard(self) -> None:
        """Remove this run's unpublished shard files (earlier shard sets are untouched)."""
        for tmp, _ in self.renames:
            tmp.unlink(missing_ok=True)

    def abandon(self, err: BaseException) -> None:
        """`discard` after `err`; a disk failure becomes a `WriteFailed` that says what to do."""
        self.discard()
        if io_failure(err) is not None:
            where = (err.filename if isinstance(err, OSError) and err.filename
                     else self.renames[-1][0] if self.renames else self.out)
            raise WriteFailed(f"could not write {where}: {io_failure(err)}. Removed the {len(self.renames)} unfinished "
                              f"shard file(s) of this run (.*.tar.partial in {self.out}); no manifest was written. "
                              "Free space (or fix the disk / permissions) and run the command again with --force"
                              ) from err

    def publish(self, manifest: dict) -> None:
        """Replace the set already in `out` (kept until now, so a failed rewrite loses nothing): its manifest
        first (a set cut short never looks complete), then the shards get their names, `manifest` is written
        (atomically) and the old shards the new set did not overwrite are removed. Shards whose manifest cannot be
        written are removed: without it they are no shard set."""
        ours = {p for pair in self.renames for p in pair}
        old = [p for p in _shard_files(self.out) if p not in ours]
        (self.out / MANIFEST).unlink(missing_ok=True)
        for tmp, final in self.renames:
            os.replace(tmp, final)
        tmp = self.out / f".{MANIFEST}.partial"
        try:
            tmp.write_text(json.dumps(manifest, indent=1) + "\n")
            os.replace(tmp, self.out / MANIFEST)
        except OSError as err:
            if io_failure(err) is None:
                raise
            tmp.unlink(missing_ok=True)
            for _, final in self.renames:
                final.unlink(missing_ok=True)
            raise WriteFailed(f"could not write {self.out / MANIFEST}: {io_failure(err)}. Removed the partial manifest "
                              f"and the {len(self.renames)} shard file(s) of this run from {self.out}. Free space (or "
                              "fix the disk / permissions) and run the command again with --force") from err
        for path in old:
            path.unlink(missing_ok=True)


def rewrite_manifest(shard_dir: Path, manifest: dict) -> None:
    """Replace the manifest `write_shards` wrote (atomically), e.g. with a layout's class names added."""
    tmp = shard_dir / f".{MANIFEST}.partial"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, shard_dir / MANIFEST)


def _shard_files(out: Path) -> list[Path]:
    """The shards in `out` and the temporary files of an unfinished run."""
    return [p for p in out.iterdir() if p.is_file() and (_SHARD_RE.match(p.name) or p.name.endswith(".tar.partial"))]


def prepare_out_dir(out: Path, force: bool) -> None:
    """Make `out` ready for a new shard set: refused when it holds anything unless `force`. The set already there
    stays until the new one is published (`ShardSetWriter.publish`)."""
    try:
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"shard output {out} exists and is not a directory; choose another output directory")
        out.mkdir(parents=True, exist_ok=True)
        if not force and any(out.iterdir()):
            raise FileExistsError(f"shard output directory {out} is not empty; pass --force (force=True) to "
                                  "overwrite it")
    except OSError as err:
        if io_failure(err) is None:
            raise
        raise WriteFailed(f"cannot write shards into {out}: {io_failure(err)}; choose another output directory "
                          "or fix its permissions / free space") from err


def remove_shard_set(out: Path) -> None:
    """Remove the shard set in `out` (its manifest first, then its shards), and `out` itself when nothing else is
    left in it."""
    if not out.is_dir():
        return
    (out / MANIFEST).unlink(missing_ok=True)
    for path in _shard_files(out):
        path.unlink()
    if not any(out.iterdir()):
        out.rmdir()
