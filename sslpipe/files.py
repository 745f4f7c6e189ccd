"""Small files below every stage: written whole or not at all (a fault part-way -- a full disk, a kill -- leaves the
previous file as it was, never a truncated one), with the mode a plain `open()` gives, and JSON records that carry a
digest of their own content (so that a flipped bit in a record no other file's sha256 covers is seen)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a synced temporary file beside it, renamed over it; the temporary file is
    removed on failure."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def set_default_mode(path: Path) -> None:
    """Give `path` the mode `open()` gives a new file (0o666 less the umask: 0o644 under umask 022). safetensors 0.8
    writes through a private temporary file (0o600), which would leave weights in a shared run or export folder
    unreadable to everyone else who can read its config.json."""
    os.chmod(path, 0o666 & ~_umask())


def _canonical(record: dict[str, Any], key: str) -> bytes:
    return json.dumps({k: v for k, v in record.items() if k != key}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=True).encode()


def with_digest(record: dict[str, Any], key: str) -> dict[str, Any]:
    """`record` as JSON will read it back, plus `key`: the sha256 of its canonical JSON without `key` (sorted keys,
    no spaces), which `digest_matches` recomputes from the parsed file."""
    parsed = json.loads(json.dumps({k: v for k, v in record.items() if k != key}))
    return {**parsed, key: hashlib.sha256(_canonical(parsed, key)).hexdigest()}


def digest_matches(record: dict[str, Any], key: str) -> bool | None:
    """Whether the parsed JSON `record` still matches the digest it carries under `key` (`with_digest`); None when it
    carries none (written by an older version)."""
    recorded = record.get(key)
    if not isinstance(recorded, str):
        return None
    return hashlib.sha256(_canonical(record, key)).hexdigest() == recorded
