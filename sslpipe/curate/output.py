"""The curated shard set: the chosen samples' tar members copied byte for byte from their source shards (no decoding,
no re-encoding) by the ingest shard writer, so the set has the names, sizes, sha256 and manifest of any `sslpipe
shards` output. Everything is written into a staging folder beside --out and renamed to it when whole; a failure
removes the staging folder, so --out is either the old folder or the complete new one."""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sslpipe.embed.samples import by_shard, members_of
from sslpipe.embed.vectors import StoredVectors
from sslpipe.ingest.encode import Encoded, Entry
from sslpipe.ingest.tar_writer import ShardSetWriter


def refuse_existing(out: Path, force: bool) -> None:
    """One line when `out` holds anything and --force was not given."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"--out {out} exists and is not empty: choose a new folder, or pass --force to "
                              "replace it")


@contextmanager
def staged(out: Path, force: bool) -> Iterator[Path]:
    """A fresh staging folder `.NAME.partial` beside `out`, renamed to `out` when the block ends without error
    (an old `out` is removed first, --force), removed when it fails."""
    refuse_existing(out, force)
    stage = out.parent / f".{out.name}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    stage.rename(out)


def copy_samples(writer: ShardSetWriter, vectors: StoredVectors, rows: np.ndarray,
                 progress: bool = True) -> tuple[dict, list[int]]:
    """Write the samples at `rows` of the pool as split `train`, each source shard read once; returns the split's
    manifest entry and the pool row of every written sample, in writing order."""
    written: list[int] = []
    row_of = {(vectors.sources[r], vectors.keys[r]): int(r) for r in rows}

    def samples() -> Iterator[Encoded]:
        with tqdm(total=len(rows), desc="copy samples", unit="img", disable=not progress) as bar:
            for url, keys in by_shard((vectors.sources[r], vectors.keys[r]) for r in np.sort(rows)).items():
                for key, members in members_of(url, keys):
                    written.append(row_of[(url, key)])
                    bar.update()
                    yield Entry(f"{url} {key}", -1, url), dict(members)

    try:
        info = writer.write_split("train", samples())
    except BaseException as err:
        writer.abandon(err)
        raise
    return info, written
