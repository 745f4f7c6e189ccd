"""Stop cleanly when asked: a checkpoint at the next log step (after that epoch's evaluation when the step ends an
epoch), then `train` returns (resume with `--resume auto`); and end cleanly when terminated.

Two ways to ask, both checked only at log steps (every `train.log_every` steps) with one gather, so every process
stops at the same step and no step pays a collective for it:
- SIGUSR1 to a training process (`kill -USR1 PID`; what `sbatch --signal=USR1@120` sends job steps);
- a stop file (`train.stop_file`) appearing: the SLURM template traps the time-limit warning in the batch shell
  (`--signal=B:USR1@...`), touches the file on the shared file system and requeues the job after the checkpoint,
  which is more robust than signalling processes through srun and the launcher.

SIGTERM (what `kill`, torchrun on a failed peer and schedulers send) would end the process on the spot;
`sigterm_as_exit` turns it into `SystemExit(143)` in the main thread instead, so `finally` blocks run: the
run-directory lock is released, a half-written checkpoint removed, trackers closed, and the trainer says which
signal ended the run (`exit_signal`), at which step, and how to continue.
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import torch


class StopRequest:
    """Records SIGUSR1 between `install()` and `restore()` (a handler only in the main thread) and watches the
    stop file."""

    def __init__(self, stop_file: str | None = None) -> None:
        self.stop_file = stop_file
        self.signalled = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR1"):
            self._previous = signal.signal(signal.SIGUSR1, self._handle)
        return self

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None

    def requested_locally(self) -> bool:
        return self.signalled or (self.stop_file is not None and os.path.exists(self.stop_file))

    def agreed(self, accelerator: Any) -> bool:
        """True on every process when any process was asked to stop (one gather)."""
        flag = torch.tensor([1.0 if self.requested_locally() else 0.0], device=accelerator.device)
        return bool(accelerator.gather(flag).max() > 0)


def exit_signal(err: BaseException) -> str:
    """The signal behind an exit, for the message: SIGINT for Ctrl-C, the signal of `SystemExit(128 + signum)`."""
    if isinstance(err, KeyboardInterrupt):
        return "SIGINT"
    code = getattr(err, "code", None)
    try:
        return signal.Signals(code - 128).name
    except (TypeError, ValueError):
        return f"exit({code})"


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit(143) (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
