"""One job per run directory: `RUN/run.lock`, held by the main process for the whole run (Linux).

Two jobs on one run directory race on every checkpoint and interleave their metrics (issue 21), so a second start is
refused at once, naming the holder's pid and host. The lock is an `fcntl.flock` on the file, which the kernel drops
however the holder ends (kill -9 included), so it cannot outlive its process on this host; the file names the holder
(pid, host, SLURM job, start time) for that message and is emptied when the run ends.

Stale-lock rule, for a file that still names a holder when the flock could be taken (the holder crashed): it is taken
over with a notice when the holder ran on this host (its flock is gone, and so is its pid, or the pid was reused),
or was an earlier run of the same SLURM job (a requeue, possibly on another node). A holder on another host is
refused: not every shared file system carries flocks between hosts, so only the user can tell that it is gone.
Where the file system has no flock at all (some NFS mounts), the rule falls back to the pid: a holder on this host
whose pid no longer exists is stale.

A flock belongs to the open file, which `fork` shares: a DataLoader worker forked during the run would hold the lock
until it noticed its parent was gone (seconds), and a restart right after kill -9 would be refused. So every forked
child closes its copy of a held lock's descriptor at once (`os.register_at_fork`); the lock then dies with the main
process alone (tests/engine/test_faults.py, `test_restart_right_after_kill_9_with_loader_workers`).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

LOCK_NAME = "run.lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_HELD: set[int] = set()  # descriptors of the locks this process holds


def _close_held_in_child() -> None:
    """After fork, in the child: drop the copies of the parent's lock descriptors (the parent keeps its lock)."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class RunDirectoryInUse(FileExistsError):
    """Another live job holds the run directory's lock."""


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{job}, started {holder.get('started', '?')}"


class RunLock:
    """`acquire()` takes the lock of `run_dir` (which must exist) or raises `RunDirectoryInUse`; `release()` frees
    it. `notice` is the line to print when a stale lock was taken over, else None."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.notice: str | None = None
        self._fd: int | None = None

    def _holder(self, fd: int) -> dict[str, Any]:
        """What the file says about its holder; {} for a free lock, {"unreadable": ...} for a garbled file."""
        text = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace").strip()
        try:
            holder = json.loads(text) if text else {}
        except json.JSONDecodeError:
            holder = None
        return holder if isinstance(holder, dict) else {"unreadable": text[:80]}

    def _refuse(self, holder: dict[str, Any], why: str) -> RunDirectoryInUse:
        return RunDirectoryInUse(
            f"run directory {self.path.parent} is in use by {_describe(holder)} ({why}): two jobs on one run "
            f"directory would overwrite each other's checkpoints and metrics. Wait for that job, stop it, or choose "
            f"another run_name; if it is certainly gone, delete {self.path}")

    def acquire(self) -> RunLock:
        host, pid, job = socket.gethostname(), os.getpid(), os.environ.get("SLURM_JOB_ID")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except BlockingIOError:
                raise self._refuse(self._holder(fd), "it holds the lock") from None
            except OSError as err:
                if err.errno not in _NO_FLOCK:
                    raise
                flocked = False
            holder = self._holder(fd)
            if holder:
                self.notice = f"notice: taking over the stale lock {self.path} of {_describe(holder)}: " + \
                    self._stale_reason(holder, flocked, host, job)
            me = {"pid": pid, "host": host, "slurm_job": job,
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _HELD.add(fd)
        return self

    def _stale_reason(self, holder: dict[str, Any], flocked: bool, host: str, job: str | None) -> str:
        """Why the holder named in the file is gone (the stale-lock rule above), or raise `RunDirectoryInUse`."""
        if job and holder.get("slurm_job") == job:
            return "an earlier run of this SLURM job (requeued)"
        if "unreadable" in holder and flocked:
            return "the file is unreadable and nobody holds its flock"
        if holder.get("host") != host:
            raise self._refuse(holder, "on another host: whether it still runs cannot be seen from here")
        pid = holder.get("pid")
        if flocked or not isinstance(pid, int) or not _pid_exists(pid):
            return "its process no longer exists"
        raise self._refuse(holder, "its process is alive")

    def release(self) -> None:
        """Empty the file (an empty lock file is a free one) and drop the flock."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass  # a failing disk: the flock still goes with the close, and the pid rule covers the content
        finally:
            _HELD.discard(self._fd)
            os.close(self._fd)
            self._fd = None
