"""Errors every stage shares, below all of them: failed writes the user can act on (`WriteFailed`), runs that cannot
go on for a reason their message gives (`RunStopped`)."""
from __future__ import annotations

import errno
import re

# A full disk, a failing disk, a path we may not write: the user can act on these, so they become `WriteFailed`.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EACCES, errno.EPERM, errno.EROFS,
                          errno.EFBIG})


class WriteFailed(OSError):
    """A file could not be written (disk full, I/O error, no permission). The message names the path, what was
    removed and how to go on; `sslpipe` prints it as one line. Shards, export, checkpoints and metrics share it."""


def io_failure(err: BaseException) -> str | None:
    """The reason (e.g. "No space left on device") when `err` is a failed write, else None. safetensors reports
    I/O errors as `SafetensorError("... I/O error: No space left on device (os error 28)")`, read here too."""
    if isinstance(err, OSError):
        return (err.strerror or str(err)) if err.errno in WRITE_ERRNOS else None
    found = re.search(r"(?:I/O error: )?([^:]*) \(os error (\d+)\)", str(err))
    return found.group(1) if found and int(found.group(2)) in WRITE_ERRNOS else None


class RunStopped(RuntimeError):
    """A run that cannot go on for a reason its message gives with what to do (a diverged loss); `sslpipe` prints
    it as one line and exits with status 1, not a traceback."""
