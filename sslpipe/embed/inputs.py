"""What `sslpipe embed --data` reads: a shard set (a directory with manifest.json, a pattern or a list), or a FOLDER of
images.

A folder is written as shards into OUT/shards with the ingest code (folder order, bytes kept, no re-encoding), and
then read like any shard set. Why not read its files directly: every sample of an embedding folder is then a key in a
shard, so search draws neighbours and curate copies members from shards whatever the input was, and the images go
through one decoder (`decode_sample`) and one transform. OUT/shards/files.tsv maps each key back to its file by
absolute path (search runs from any directory). Unreadable images are left out and named (`skipped_notice`).
OUT/shards gets the marker file `.sslpipe-embed` before the first shard is written, so --force can tell shards embed
wrote (removed, written again) from a shard set of the user's that happens to sit there (never removed or written
over: `embed_wrote`). A run killed while writing them leaves no embed.json beside them, so the next run refuses OUT
until --force. The manifest records the folder's listing (`folder_listing`: each image's path, size and mtime), so a
rerun whose folder has changed since is refused (`check_folder`) rather than resumed on the old images.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sslpipe.data.manifest import file_stamp, read_manifest
from sslpipe.data.stream import resolve_shards
from sslpipe.ingest.options import ShardOptions
from sslpipe.ingest.shards import write_shards
from sslpipe.ingest.sources import open_source
from sslpipe.ingest.tar_writer import rewrite_manifest

FOLDER_SHARDS = "shards"
FILES = "files.tsv"
MARKER = ".sslpipe-embed"  # in OUT/shards: written by embed (module docstring)
FOLDER_SAMPLES_PER_SHARD = 1000  # a part per 1000 images: a killed run loses little, P processes get shards early


@dataclass(frozen=True)
class Input:
    """The data of an embedding: `data` as embed.json names it, its shard URLs in order (part i = shard i), the
    sample count of each shard where a manifest tells it, and the key -> file map of a folder."""

    data: str
    urls: list[str]
    samples: list[int | None]
    versions: list[str | None]  # each shard's content: its manifest sha256, else size and mtime of a local file
    files: Path | None = None


def is_image_folder(data: str | Path) -> bool:
    """A directory without a manifest.json: a folder of images, not a shard set."""
    path = Path(data)
    return path.is_dir() and not (path / "manifest.json").is_file()


def data_name(data: str | Path) -> str:
    """How embed.json names the data: the absolute path of a local directory or file, else the spec as given."""
    text = os.fspath(data)
    return str(Path(text).resolve()) if os.path.exists(text) else text


def _shard_info(data: str | Path, split: str, urls: list[str]) -> tuple[list[int | None], list[str | None]]:
    """(samples, version) per shard: the manifest's sample count and sha256 (None for patterns and lists: no
    manifest to ask); a local shard without a sha256 is versioned by its size and mtime."""
    path = Path(os.fspath(data))
    entries: dict[str, dict] = {}
    if (path.is_dir() or path.suffix == ".json") and path.exists():
        info = read_manifest(path)["splits"].get(split, {})
        entries = {entry["name"]: entry for entry in info.get("shards", [])}
    samples, versions = [], []
    for url in urls:
        entry = entries.get(Path(url).name, {})
        samples.append(int(entry["samples"]) if "samples" in entry else None)
        versions.append(entry.get("sha256") or file_stamp(url))
    return samples, versions


def _folder_options() -> ShardOptions:
    return ShardOptions(samples_per_shard=FOLDER_SAMPLES_PER_SHARD, shuffle=False)


def _folder_images(folder: str | Path) -> list[Any]:
    """The folder's image entries, in the order its shards are written."""
    return list(open_source(str(folder), "folder", _folder_options()).splits["train"])


def folder_listing(folder: str | Path, images: list[Any] | None = None) -> str:
    """sha256 of the images a folder's shards are written from (relative path, size, mtime in ns, in folder order):
    an image added, removed or replaced changes it. `images`: `_folder_images(folder)` when already listed."""
    digest = hashlib.sha256()
    for entry in _folder_images(folder) if images is None else images:
        stat = os.stat(entry.ref)
        digest.update(f"{os.path.relpath(entry.ref, folder)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def check_folder(folder: str | Path, out: Path) -> None:
    """Refuse to resume on OUT/shards written from another state of `folder` (its listing differs, or an older
    sslpipe recorded none): their embeddings would silently miss the images added or replaced since."""
    shards = out / FOLDER_SHARDS
    if not (shards / "manifest.json").is_file():
        return  # not written yet, or a run stopped while writing them: `write_folder_shards` writes them
    recorded = read_manifest(shards).get("folder_listing")
    if recorded == folder_listing(folder):
        return
    why = ("images were added, removed or replaced since" if recorded else
           f"{shards / 'manifest.json'} records no listing of it: written by an older sslpipe, or a run stopped "
           "while writing them")
    raise FileExistsError(f"the folder {folder} changed since {out} was written ({why}): pass --force to embed it "
                          f"again (replaces the embeddings in {out}), or choose another --out")


def write_folder_shards(folder: str | Path, out: Path, progress: bool = True) -> None:
    """Write the folder's images as OUT/shards (split `train`, folder order) and files.tsv, unless a complete set
    of this folder is there already (a resumed run; `check_folder` has compared the listings), and record the
    folder's listing in their manifest. The caller has refused a foreign OUT/shards (`refuse_foreign_shards`)."""
    shards = out / FOLDER_SHARDS
    source = data_name(folder)
    if (shards / "manifest.json").is_file() and read_manifest(shards).get("source") == source:
        return
    images = _folder_images(folder)
    listing = folder_listing(folder, images)  # before writing: an image changed meanwhile shows at the next run
    shards.mkdir(parents=True, exist_ok=True)
    (shards / MARKER).write_text(f"written by sslpipe embed from the images of {source}\n")
    manifest = write_shards(shards, source=str(folder), kind="folder", options=_folder_options(), force=True,
                            created_by=f"sslpipe embed (images of {source})", progress=progress)
    if manifest["skipped"]:
        print(skipped_notice(manifest["skipped"], folder, shards), file=sys.stderr)
    skipped = {entry["source"] for entry in manifest["skipped"]}
    written = [entry.ref for entry in images if entry.ref not in skipped]
    # the keys _SplitWriter gives; absolute paths, so that the map holds from any working directory
    lines = [f"train_{i:08d}\t{os.path.abspath(path)}\n" for i, path in enumerate(written)]
    tmp = shards / f".{FILES}.tmp"
    tmp.write_text("".join(lines))
    tmp.replace(shards / FILES)
    rewrite_manifest(shards, {**manifest, "folder_listing": listing})


def skipped_notice(skipped: list[dict[str, Any]], folder: str | Path, shards: Path) -> str:
    """One line on the images a folder's shards left out (an embedding that silently lacks them looks complete)."""
    first = skipped[0]
    return (f"sslpipe embed: skipped {len(skipped)} unreadable image(s) of {folder}, e.g. {first['source']}: "
            f"{first['error']} (all listed in {shards / 'manifest.json'})")


def embed_wrote(shards: Path) -> bool:
    """Whether the folder `shards` (OUT/shards) was written by `sslpipe embed`: its marker, or (an older sslpipe)
    the manifest's `created_by`."""
    if (shards / MARKER).is_file():
        return True
    try:
        return str(json.loads((shards / "manifest.json").read_text()).get("created_by", "")).startswith(
            "sslpipe embed")
    except (OSError, ValueError, AttributeError):
        return False


def refuse_foreign_shards(out: Path, folder: str | Path) -> None:
    """A folder's shards go to OUT/shards: refused when that holds files embed did not write (another shard set:
    writing there would replace it)."""
    shards = out / FOLDER_SHARDS
    if shards.exists() and (not shards.is_dir() or any(shards.iterdir())) and not embed_wrote(shards):
        raise FileExistsError(f"--out {out}: {shards} holds files sslpipe embed did not write (a shard set of yours?); "
                              f"the images of {folder} are written as shards there, so choose another --out (or "
                              f"move {shards} away)")


def resolve_input(data: str | Path, split: str, out: Path) -> Input:
    """The shards of `data`'s split; a folder's are those `write_folder_shards` wrote into `out`."""
    if is_image_folder(data):
        if split != "train":
            raise ValueError(f"--split {split}: a folder of images ({data}) is embedded whole as split 'train'; "
                             "--split picks a split of a shard set")
        shards = out / FOLDER_SHARDS
        urls = resolve_shards(str(shards), "train")
        return Input(data_name(data), urls, *_shard_info(shards, "train", urls), files=shards / FILES)
    urls = resolve_shards(data, split)
    return Input(data_name(data), urls, *_shard_info(data, split, urls))


def files_record(out: Path, files: Path | None) -> str | None:
    """How embed.json names the key -> file map: relative to the embedding folder, so it holds wherever the folder
    is read from (or moved to)."""
    return os.path.relpath(files, out) if files is not None else None


def read_files(folder: Path, index: dict[str, Any]) -> dict[str, str]:
    """key -> image file of an embedded folder ({} for shard sets). Read from its place in `folder` whatever
    embed.json's `files` says: an older sslpipe recorded it relative to the directory embed ran in."""
    if not index.get("files"):
        return {}
    path = folder / FOLDER_SHARDS / FILES
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} embeds the folder {index['data']} and its key -> file "
                                f"map is gone; embed it again (`sslpipe embed ... --data {index['data']} --out "
                                f"{folder} --force`)")
    return dict(line.rstrip("\n").split("\t", 1) for line in path.read_text().splitlines() if line)
