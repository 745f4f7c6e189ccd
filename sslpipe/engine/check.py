"""`sslpipe check RUN`: every checkpoint and export of a run against the sha256s written with it, as a table.

A bad disk or a copy cut short damages files silently; training notices only when it resumes (and then skips the
damaged checkpoint), an export only when it is loaded. This looks at all of them at once: checkpoints (`ok`, `bad`,
`unverified` for those of older versions, written without checksums), the export folders `RUN/export/*`, and
`partial` for a `.tmp-step_N` folder a killed run left behind (harmless: the next checkpoint of that step removes it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sslpipe.engine.checkpoint import checkpoint_dirs, file_problems, structure_problems, verify_checkpoint
from sslpipe.export import CONFIG_NAME, WEIGHTS_NAME


@dataclass(frozen=True)
class CheckRow:
    item: str  # relative to the run directory
    status: str  # ok | bad | unverified | partial
    detail: str


def verify_export(folder: Path) -> tuple[str, str]:
    """(status, detail) of an export folder: model.safetensors against the sha256 in its config.json."""
    config_file, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_file.is_file() or not weights.is_file():
        missing = [p.name for p in (weights, config_file) if not p.is_file()]
        return "bad", f"incomplete: no {' and no '.join(missing)}"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        return "bad", f"{CONFIG_NAME} is unreadable: {err}"
    digest = (config.get("sha256") or {}).get(WEIGHTS_NAME)
    if digest is None:
        problems = structure_problems(folder)
        return ("bad", "; ".join(problems)) if problems else (
            "unverified", "exported without a checksum (older sslpipe): weights whole, contents not verifiable")
    problems = file_problems(folder, {WEIGHTS_NAME: {"bytes": weights.stat().st_size, "sha256": digest}})
    return ("bad", "; ".join(problems)) if problems else ("ok", f"{WEIGHTS_NAME} matches its sha256")


def check_run(run_dir: str | Path) -> list[CheckRow]:
    """One row per checkpoint (oldest first), leftover partial checkpoint and export folder of `run_dir`."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file() and not (run / "checkpoints").is_dir():
        raise FileNotFoundError(f"{run} is not an sslpipe run directory (no config.yaml, no checkpoints/)")
    rows = [CheckRow(f"checkpoints/{c.name}", *verify_checkpoint(c)) for c in checkpoint_dirs(run)]
    if (run / "checkpoints").is_dir():
        rows += [CheckRow(f"checkpoints/{p.name}", "partial", "an unfinished write (the run was killed); removed by "
                          "the next checkpoint of that step, or delete it") for p in
                 sorted((run / "checkpoints").glob(".tmp-step_*"))]
    if (run / "export").is_dir():
        rows += [CheckRow(f"export/{p.name}", *verify_export(p)) for p in sorted((run / "export").iterdir())
                 if p.is_dir()]
    return rows


def format_check(rows: list[CheckRow]) -> str:
    if not rows:
        return "nothing to check: no checkpoints and no exports"
    width = max(len("checkpoint/export"), *(len(r.item) for r in rows))
    lines = [f"{'checkpoint/export':<{width}}  {'status':<10}  detail"]
    lines += [f"{r.item:<{width}}  {r.status:<10}  {r.detail}" for r in rows]
    return "\n".join(lines)
