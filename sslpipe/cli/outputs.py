"""Output paths of the commands, checked before any work is done (a probe would otherwise extract every feature
first and fail on its `--out`)."""
from __future__ import annotations

from pathlib import Path


def check_out(path: str | None, flag: str, folder: bool = False, example: str = "result.json") -> None:
    """Refuse an output path that cannot be written, before any work is done (a probe would extract every feature
    first): a folder where a file is expected (or, `folder`, a file where a folder is), or a path under a file."""
    if path is None:
        return
    out = Path(path)
    if folder and out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} is a file: give a folder (created when missing)")
    if not folder and out.is_dir():
        raise ValueError(f"{flag} {out} is a directory: give a file path (e.g. {out / example})")
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ValueError(f"{flag} {out}: {above} is a file, not a folder")
