"""Weights against the sha256s written with them, and `sslpipe check RUN`: every checkpoint and export of a run, as
a table.

A bad disk or a copy cut short damages files silently; training notices only when it resumes (and then skips the
damaged checkpoint), an export only when it is loaded. A checkpoint's trainer_state.json and an export's
config.json, which no other file's sha256 covers, carry the digest of their own content (`sslpipe.files.with_digest`;
"no digest" for those of older versions). `check_run` looks at all of them at once: checkpoints (`ok`,
`bad`, `unverified` for those of older versions, written without checksums), the export folders `RUN/export/*`, and
`partial` for a `.tmp-step_N` folder a killed run left behind (harmless: the next checkpoint of that step removes it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from sslpipe.files import digest_matches
from sslpipe.weights.checkpoint import FILES, STATE_DIGEST, TRAINER_STATE, interrupted_swaps, list_checkpoints
from sslpipe.weights.export import CONFIG_DIGEST, CONFIG_NAME, WEIGHTS_NAME
from sslpipe.weights.hashing import sha256_file


def file_problems(folder: Path, table: dict[str, dict[str, Any]]) -> list[str]:
    """Files of `table` ({name: {"bytes", "sha256"}}; "bytes" may be absent, as in an export's config.json) that are
    missing, cut short or changed under `folder`."""
    problems = []
    for name, expected in table.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif "bytes" in expected and path.stat().st_size != expected["bytes"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, {expected['bytes']} written (truncated or "
                            "overwritten)")
        elif sha256_file(path) != expected["sha256"]:
            problems.append(f"{name} does not match its sha256 (bit rot, a copy cut short, or modified)")
    return problems


def digests(sha256: dict[str, str]) -> dict[str, dict[str, Any]]:
    """An export's {name: sha256} as a `file_problems` table (no sizes recorded)."""
    return {name: {"sha256": digest} for name, digest in sha256.items()}


def structure_problems(folder: Path) -> list[str]:
    """For files without checksums (older versions): safetensors headers that do not cover their file (truncation)
    and JSON that does not parse. Cannot see a flipped bit inside tensor data."""
    problems = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for any bad header
            problems.append(f"{path.name}: {err}")
    for path in sorted(folder.glob("*.json")):
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as err:
            problems.append(f"{path.name}: {err}")
    return problems


def verify_checkpoint(ckpt: str | Path) -> tuple[str, str]:
    """("ok" | "unverified" | "bad", detail): every file against the sizes and sha256s in trainer_state.json;
    "unverified" for a checkpoint of an older version (no checksums) whose files are at least whole."""
    ckpt = Path(ckpt)
    state_file = ckpt / TRAINER_STATE
    if not state_file.is_file():
        return "bad", f"incomplete: no {TRAINER_STATE}"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as err:
        return "bad", f"{TRAINER_STATE} is unreadable: {err}"
    if FILES not in state:
        problems = structure_problems(ckpt)
        return ("bad", "; ".join(problems)) if problems else (
            "unverified", "written without checksums (older sslpipe): files whole, contents not verifiable")
    own = digest_matches(state, STATE_DIGEST)
    problems = ([] if own is not False else [own_digest_problem(TRAINER_STATE)]) + file_problems(ckpt, state[FILES])
    if problems:
        return "bad", "; ".join(problems)
    return "ok", (f"{len(state[FILES])} files and {TRAINER_STATE} match their sha256" if own else
                  f"{len(state[FILES])} files match their sha256; {TRAINER_STATE} has no digest (older sslpipe)")


def own_digest_problem(name: str) -> str:
    """The problem of a JSON file that no longer matches the digest of its own content it carries."""
    return f"{name} does not match the digest of its content it records (bit rot, a copy cut short, or edited)"


def verify_export(folder: Path) -> tuple[str, str]:
    """(status, detail) of an export folder: every file its config.json records a sha256 of (model.safetensors,
    heads.safetensors, and the ONNX files under `onnx`, which may lie elsewhere) against it."""
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
    own = digest_matches(config, CONFIG_DIGEST)
    problems = ([] if own is not False else [own_digest_problem(CONFIG_NAME)]) + file_problems(
        folder, digests(config["sha256"]))
    onnx = config.get("onnx") or {}
    if onnx.get("sha256"):
        problems += file_problems((folder / onnx["file"]).parent, digests(onnx["sha256"]))  # `file`: name or path
    if problems:
        return "bad", "; ".join(problems)
    files = len(config["sha256"]) + len(onnx.get("sha256") or {})
    detail = f"{WEIGHTS_NAME} matches its sha256" if files == 1 else f"{files} files match their sha256"
    return "ok", (f"{detail}, {CONFIG_NAME} its digest" if own else
                  f"{detail}; {CONFIG_NAME} has no digest (older sslpipe)")


@dataclass(frozen=True)
class CheckRow:
    item: str  # relative to the run directory
    status: str  # ok | bad | unverified | partial
    detail: str


def check_run(run_dir: str | Path) -> list[CheckRow]:
    """One row per checkpoint (oldest first), leftover partial checkpoint and export folder of `run_dir`."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file() and not (run / "checkpoints").is_dir():
        raise FileNotFoundError(f"{run} is not an sslpipe run directory (no config.yaml, no checkpoints/)")
    rows = [CheckRow(f"checkpoints/{c.name}", *verify_checkpoint(c))
            for c in list_checkpoints(run, complete_only=False)]
    if (run / "checkpoints").is_dir():
        rows += [CheckRow(f"checkpoints/{p.name}", "partial", "an unfinished write (the run was killed); removed by "
                          "the next checkpoint of that step, or delete it") for p in
                 sorted((run / "checkpoints").glob(".tmp-step_*"))]
        for aside in interrupted_swaps(run):  # the only copy of its step: a resume renames it back
            status, detail = verify_checkpoint(aside)
            rows.append(CheckRow(f"checkpoints/{aside.name}", status,
                                 f"{detail} (an interrupted re-save set it aside; a resume renames it back)"))
    if (run / "export").is_dir():
        rows += [CheckRow(f"export/{p.name}", *verify_export(p)) for p in sorted((run / "export").iterdir())
                 if p.is_dir()]
    return rows


def format_check(rows: list[CheckRow]) -> str:
    """The rows as the table `sslpipe check` prints."""
    if not rows:
        return "nothing to check: no checkpoints and no exports"
    width = max(len("checkpoint/export"), *(len(r.item) for r in rows))
    lines = [f"{'checkpoint/export':<{width}}  {'status':<10}  detail"]
    lines += [f"{r.item:<{width}}  {r.status:<10}  {r.detail}" for r in rows]
    return "\n".join(lines)
