"""The on-disk form of a set of image embeddings, what `sslpipe embed` writes and `sslpipe search` / `sslpipe curate`
read:

    DIR/embed.json                 {"format": "sslpipe-embed/1", "backbone", "backbone_sha256", "spec", "data",
                                    "split", "dim", "dtype": "float16", "shards": [...], "complete", "count"}
    DIR/part-000017.safetensors    the embeddings of shard 17 of the split: "features" (n, dim) float16 (L2-normalised
                                   rows), with the metadata "keys" and "sources" (JSON lists: each sample's key and the
                                   shard it came from) and "shard"

One part per input shard, written under a temporary name and renamed when whole: a killed run resumes at the first
shard without a part, and processes under `accelerate launch` write disjoint parts (shard i is rank i mod P's). A
shard that gave fewer samples than its manifest lists (truncated, damaged) gets no part but a note,
`DIR/short-NNNNNN.json` {"shard", "url", "read", "samples", "error"} ("samples": None and "error" the read error
for a shard without a count that could not be read to its end), so a rerun embeds it again and the folder is not
marked complete until it does.
Readers walk the parts in shard order and never hold more than one part in memory (`iter_parts`). Every shard has a
part (an empty shard a 0-row one), so in a complete folder a missing or unreadable part, or parts holding another
row count than embed.json's `count`, can only be damage (an interrupted copy): readers refuse it in one line naming
the file, rather than search or curate a smaller pool.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "sslpipe-embed/1"
INDEX = "embed.json"


def part_name(shard_index: int) -> str:
    return f"part-{shard_index:06d}.safetensors"


@dataclass(frozen=True)
class Part:
    """One shard's embeddings: `features` float16 (n, dim) (None when only the keys were read), `keys` and
    `sources` (n each)."""

    shard: int
    keys: list[str]
    sources: list[str]
    features: np.ndarray | None


def write_part(out_dir: str | Path, shard_index: int, features: torch.Tensor, keys: list[str],
               sources: list[str]) -> Path:
    """Write one shard's embeddings atomically (a temporary file renamed when complete)."""
    if len(keys) != len(features) or len(sources) != len(features):
        raise ValueError(f"write_part: {len(features)} features, {len(keys)} keys and {len(sources)} sources differ")
    out = Path(out_dir) / part_name(shard_index)
    tmp = out.with_name(out.name + ".tmp")
    metadata = {"keys": json.dumps(keys), "sources": json.dumps(sources), "shard": str(shard_index)}
    save_file({"features": features.to(torch.float16).contiguous()}, str(tmp), metadata=metadata)
    tmp.replace(out)
    return out


def short_name(shard_index: int) -> str:
    return f"short-{shard_index:06d}.json"


def write_short(out_dir: str | Path, shard_index: int, url: str, read: int, samples: int | None,
                error: str | None = None) -> Path:
    """Note that shard `shard_index` gave `read` of its `samples` samples, or `read` and then `error` (module
    docstring)."""
    return _write_json(Path(out_dir) / short_name(shard_index),
                       {"shard": shard_index, "url": url, "read": read, "samples": samples, "error": error})


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    """`path` written whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return path


def read_shorts(folder: str | Path) -> dict[int, dict[str, Any]]:
    """shard index -> its note, for the shards that gave fewer samples than their manifest lists."""
    notes = (json.loads(p.read_text()) for p in sorted(Path(folder).glob("short-*.json")))
    return {int(note["shard"]): note for note in notes}


def read_index(folder: str | Path) -> dict[str, Any]:
    """embed.json of an embedding folder, or a FileNotFoundError saying how to make one."""
    path = Path(folder) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not an embedding folder (write one with "
                                "`sslpipe embed EXPORT --data SHARDS --out DIR`)")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}")
    return index


def write_index(folder: str | Path, index: dict[str, Any]) -> Path:
    return _write_json(Path(folder) / INDEX, {"format": FORMAT, **index})


def done_shards(folder: str | Path) -> set[int]:
    """Shard indices that already have a complete part (what a resumed run skips)."""
    return {int(p.name[5:11]) for p in Path(folder).glob("part-*.safetensors")}


def _redo(folder: str | Path) -> str:
    return (f"run the `sslpipe embed` that wrote {folder} again (the same EXPORT, --data and --out; embed.json "
            "names them): it embeds only the shards without a part")


def read_part(path: str | Path, features: bool = True) -> Part:
    """One part; `features=False` reads only its header (keys and sources), not the vectors. A damaged file is a
    ValueError naming it (a truncated copy would otherwise surface as a bare SafetensorError)."""
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata()
            return Part(int(meta["shard"]), json.loads(meta["keys"]), json.loads(meta["sources"]),
                        f.get_tensor("features") if features else None)
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err}): the part is damaged; delete it, then "
                         f"{_redo(Path(path).parent)}") from None


def iter_parts(folder: str | Path, features: bool = True) -> Iterator[Part]:
    """The parts of a complete embedding folder in shard order, one in memory at a time (`features=False`: the
    keys and sources alone, for the readers that take the vectors from elsewhere or later)."""
    index = read_index(folder)
    if not index.get("complete"):
        raise ValueError(f"{folder} is incomplete (a run stopped before every shard was embedded): run `sslpipe "
                         "embed` again with the same --out to finish it")
    rows = 0
    for shard in range(len(index["shards"])):
        path = Path(folder) / part_name(shard)
        if not path.is_file():
            raise ValueError(f"{path} is missing: {folder} is damaged (embed.json lists {len(index['shards'])} "
                             f"shards, one part each); {_redo(folder)}")
        part = read_part(path, features)
        rows += len(part.keys)
        yield part
    if rows != index["count"]:
        raise ValueError(f"{folder}: its parts hold {rows} samples and embed.json counts {index['count']}: the folder "
                         f"is damaged (parts replaced since it was written?); {_redo(folder)} with --force")


def load_all(folder: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """(keys, sources, features (N, dim) float16) of a whole folder: for sets that fit in memory (search)."""
    keys, sources, chunks = [], [], []
    for part in iter_parts(folder):
        keys += part.keys
        sources += part.sources
        chunks.append(part.features)
    dim = read_index(folder)["dim"]
    return keys, sources, np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float16)
