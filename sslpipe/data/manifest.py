"""A shard set's `manifest.json` (format: docs/internals.md §1): the contract between the shard writer
(`sslpipe.ingest`) and everything that reads shards, and the check of a shard set against it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FORMAT = "sslpipe-shards/1"
MANIFEST = "manifest.json"


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
    return check_manifest(manifest, str(file))


def check_manifest(manifest: object, where: str) -> dict:
    """`manifest` when it has the fields the loaders read (format, and per split an int `samples` and `shards`, each
    with a `name`); else one ValueError naming the file and the field, not a KeyError deep inside a loader."""
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT
            or not isinstance(manifest.get("splits"), dict)):
        raise ValueError(f"{where} is not an {FORMAT} manifest (format/splits missing or wrong)")
    for split, info in manifest["splits"].items():
        problem = None
        if not isinstance(info, dict):
            problem = f"split {split!r} is a {type(info).__name__}, not a mapping"
        elif not isinstance(info.get("samples"), int):
            problem = f"split {split!r} has no integer `samples`"
        elif not isinstance(info.get("shards", []), list):
            problem = f"split {split!r}: `shards` is not a list"
        else:
            bad = [i for i, s in enumerate(info.get("shards", []))
                   if not (isinstance(s, dict) and isinstance(s.get("name"), str)
                           and isinstance(s.get("samples", 0), int))]
            if bad:
                problem = f"split {split!r}: shard entry {bad[0]} lacks a `name` or has a non-integer `samples`"
        if problem:
            raise ValueError(f"{where}: {problem}; rewrite the shards with `sslpipe shards --force` (or fix the file)")
    return manifest



def file_stamp(url: str) -> str | None:
    """A local shard's size and mtime (ns), "size:mtime": what tells a rewritten file from the one recorded when
    there is no sha256 to compare; None for a remote url or a missing file."""
    stat = os.stat(url) if os.path.isfile(url) else None
    return f"{stat.st_size}:{stat.st_mtime_ns}" if stat else None


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
