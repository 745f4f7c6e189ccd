"""Run tracking: a JSON-lines metrics file that is always written, plus Accelerate's wandb/TensorBoard trackers.

wandb must never block a run without network: when no API key is configured it runs offline (sync later with
`wandb sync RUN/wandb/offline-run-*`); `disabled` drops the tracker entirely so that no `wandb/` folder appears.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import netrc
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from accelerate.utils import is_tensorboard_available, is_wandb_available

from sslpipe.config import RunConfig, config_to_dict
from sslpipe.errors import WriteFailed, io_failure

WANDB_ID_FILE = "wandb_run_id"


class JsonlWriter:
    """Append one JSON object per line, unbuffered, so a crash loses at most the line being written; a line that
    cannot be written in full (disk full) is cut off again and raises `WriteFailed`, so the file never holds half a
    line. A line a kill cut (no newline at the end of the file) is ended first, so the next record (a resume's
    `resumed` event) starts a line of its own."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        end = os.lseek(self._fd, 0, os.SEEK_END)
        if end and os.pread(self._fd, 1, end - 1) != b"\n":
            os.write(self._fd, b"\n")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in record.items()}
        clean.setdefault("time", time.time())
        line = memoryview((json.dumps(clean) + "\n").encode())
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            while line:
                line = line[os.write(self._fd, line):]
        except OSError as err:
            if io_failure(err) is None:
                raise
            with contextlib.suppress(OSError):  # a disk that failed the write may fail this too
                os.ftruncate(self._fd, start)
            raise WriteFailed(f"could not write {self.path}: {io_failure(err)}") from err

    def close(self) -> None:
        os.close(self._fd)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def wandb_api_key_configured() -> bool:
    """True when WANDB_API_KEY is set or ~/.netrc has credentials for api.wandb.ai (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(cfg_mode: str | None) -> str:
    """The WANDB_MODE env var wins, then `tracking.wandb_mode`, then online with a key / offline without one."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return "disabled" if env in ("disabled", "dryrun-disabled") else env
    if cfg_mode:
        return cfg_mode
    return "online" if wandb_api_key_configured() else "offline"


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """`{"optim.lr": 5e-4, ...}`: trackers store hyper-parameters as flat scalars (lists become strings)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node if isinstance(node, (bool, int, float, str)) or node is None else str(node)

    walk("", config_to_dict(cfg))
    return flat


def tracker_setup(cfg: RunConfig, run_dir: Path, *, resumed: bool = False, main: bool = True
                  ) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """(log_with for the Accelerator, init_kwargs for `accelerator.init_trackers`); run the trackers inside
    `wandb_mode_scope(init_kwargs)`. `main`: the process that logs (the only one that keeps a wandb run id)."""
    log_with: list[str] = []
    init_kwargs: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(cfg.tracking.log_with):
        if name == "wandb":
            mode = resolve_wandb_mode(cfg.tracking.wandb_mode)
            if mode == "disabled":
                continue
            init_kwargs["wandb"] = {"dir": str(run_dir), "name": run_dir.name, "mode": mode, "resume": "allow"}
            if main:
                init_kwargs["wandb"]["id"] = wandb_run_id(run_dir, resumed)
        log_with.append(name)
    return log_with, init_kwargs


def check_trackers(cfg: RunConfig) -> None:
    """Every tracker in tracking.log_with is installed (checked before the run writes anything)."""
    available = {"wandb": is_wandb_available, "tensorboard": is_tensorboard_available}
    for name in dict.fromkeys(cfg.tracking.log_with):
        if not available[name]():
            raise ValueError(f"tracking.log_with lists {name!r} but it is not installed: pip install {name} "
                             f"(or remove it from tracking.log_with)")


def wandb_run_id(run_dir: Path, resumed: bool) -> str:
    """The wandb run id of this start: a resumed run continues its own (kept in RUN/wandb_run_id; runs started
    before that file existed used the hash of the run directory), a fresh start gets a new one, so a run started
    again in the same directory never continues the wandb run of the start that failed."""
    path = run_dir / WANDB_ID_FILE
    if resumed and path.is_file():
        return path.read_text().strip()
    if resumed:
        return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
    run_id = hashlib.sha1(f"{run_dir.resolve()} {time.time_ns()}".encode()).hexdigest()[:16]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id)
    except OSError as err:
        if io_failure(err) is None:
            raise
        raise WriteFailed(f"could not write {path}: {io_failure(err)}; free space (or fix the disk / permissions) "
                          "and start again") from err
    return run_id


@contextlib.contextmanager
def wandb_mode_scope(init_kwargs: dict[str, dict[str, Any]]) -> Iterator[None]:
    """WANDB_MODE set to the run's wandb mode while the run lasts (wandb reads it too, and fails on an empty one),
    and its previous value restored after: left set, it would override the next run's `tracking.wandb_mode` in the
    same process (a notebook, a sweep, `sslpipe demo`)."""
    mode = init_kwargs.get("wandb", {}).get("mode")
    previous = os.environ.get("WANDB_MODE")
    if mode is not None:
        os.environ["WANDB_MODE"] = mode
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = previous


@contextlib.contextmanager
def command_tracker(log_with: str | None, project: str, log_dir: str | Path,
                    config: dict[str, Any]) -> Iterator[Any]:
    """The tracker of a one-off command (`sslpipe show`, `sslpipe qscore`): an Accelerator on the CPU that logs to
    `log_with` (wandb offline without an API key, as in training), or None without one; ended on exit."""
    if not log_with:
        yield None
        return
    from accelerate import Accelerator

    init = {"wandb": {"mode": resolve_wandb_mode(None), "dir": str(log_dir)}} if log_with == "wandb" else {}
    accelerator = Accelerator(cpu=True, log_with=log_with, project_dir=str(log_dir))
    accelerator.init_trackers(project, config={k: str(v) for k, v in config.items()}, init_kwargs=init)
    try:
        yield accelerator
    finally:
        accelerator.end_training()
