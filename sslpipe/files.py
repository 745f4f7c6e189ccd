"""Writing a small file whole or not at all, below every stage: a fault part-way (a full disk, a kill) leaves the
previous file as it was, never a truncated one."""
from __future__ import annotations

import os
from pathlib import Path


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
