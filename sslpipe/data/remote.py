"""Reading shards over HTTP(S) without hanging and without a traceback: retries with backoff, a read timeout,
resumption of a dropped connection at the byte it stopped, and an optional sha256 check against the manifest.

A failed connect or read (refused, reset, 5xx, 429, nothing for `read_timeout` seconds, a body shorter than its
Content-Length) is retried `retries` times, `retry_backoff` x 2^i seconds apart (at most 30 s), and a dropped
connection goes on at the byte it stopped (`Range: bytes=N-`); any other 4xx is not retried. What each fault ends in,
and its test: the table in docs/internals.md §2, "Remote shards".

Local files, `pipe:` commands and other schemes go through webdataset's `gopen` unchanged.
"""
from __future__ import annotations

import functools
import hashlib
import http.client
import io
import json
import socket
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import BinaryIO

from webdataset.gopen import gopen

from sslpipe.data.manifest import check_manifest

HTTP_PREFIXES = ("http://", "https://")
BACKOFF_CAP_S = 30.0
SPOOL_BYTES = 64 << 20  # a verified shard is held in memory up to this size, then on local disk
_PERMANENT = "permanent"  # marks an HTTP status that no retry can change


@dataclass(frozen=True)
class Reading:
    """How shards are read (the recipe's `data.*` keys of the same names). `max_skipped_shards`: a run stops with one
    line when a process has lost more shards than this (None: never); `on_error="raise"` stops at the first."""

    on_error: str = "warn"
    retries: int = 3
    retry_backoff: float = 1.0
    read_timeout: float = 60.0
    max_skipped_shards: int | None = None
    verify_sha256: bool = False

    def __post_init__(self) -> None:
        if self.on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {self.on_error!r}")
        if self.retries < 0 or self.retry_backoff < 0 or self.read_timeout <= 0:
            raise ValueError(f"data.retries and data.retry_backoff must be >= 0 and data.read_timeout > 0, got "
                             f"{self.retries}, {self.retry_backoff}, {self.read_timeout}")
        if self.max_skipped_shards is not None and self.max_skipped_shards < 0:
            raise ValueError(f"data.max_skipped_shards must be >= 0 or null, got {self.max_skipped_shards}")


class RemoteReadError(OSError):
    """A remote file could not be read after the allowed tries; the message gives the last error (the caller names
    the URL)."""


def _status(err: BaseException) -> str:
    """How to treat a failed request or read: `_PERMANENT` for an HTTP status no retry can change, else its text."""
    if isinstance(err, urllib.error.HTTPError):
        text = f"HTTP {err.code} {err.reason}"
        return _PERMANENT if 400 <= err.code < 500 and err.code != 429 else text
    if isinstance(err, socket.timeout | TimeoutError):
        return "read timed out"
    return f"{type(err).__name__}: {err}"


class HttpShard(io.RawIOBase):
    """A shard read over HTTP(S) as a byte stream; a failed connect or read is retried (module docstring) and goes
    on at the byte it stopped at, so the tar reader above never sees the fault unless every try fails."""

    def __init__(self, url: str, reading: Reading) -> None:
        super().__init__()
        self.url, self.reading = url, reading
        self.offset, self.length, self.tries = 0, None, 0
        self.response: http.client.HTTPResponse | None = None

    def readable(self) -> bool:
        return True

    def _fail(self, err: BaseException) -> None:
        """Count a try; raise `RemoteReadError` when the status is permanent or the tries are spent, else wait."""
        self._drop()
        why = _status(err)
        if why == _PERMANENT:
            raise RemoteReadError(f"{err} (not retried)") from err
        self.tries += 1
        if self.tries > self.reading.retries:
            raise RemoteReadError(f"{why} at byte {self.offset}, after {self.tries} tries "
                                  f"(data.retries={self.reading.retries})") from err
        time.sleep(min(BACKOFF_CAP_S, self.reading.retry_backoff * 2 ** (self.tries - 1)))

    def _connect(self) -> None:
        headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        request = urllib.request.Request(self.url, headers=headers)
        response = urllib.request.urlopen(request, timeout=self.reading.read_timeout)
        if self.offset and response.status != 206:  # Range ignored: read the first bytes again and drop them
            left = self.offset
            while left:
                got = response.read(min(left, 1 << 20))
                if not got:
                    raise http.client.IncompleteRead(b"", left)
                left -= len(got)
        if self.length is None:
            size = response.headers.get("Content-Length")
            self.length = int(size) if size is not None else None
        self.response = response

    def _drop(self) -> None:
        if self.response is not None:
            self.response.close()
            self.response = None

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while True:
            try:
                if self.response is None:
                    self._connect()
                n = self.response.readinto(buffer)
            except (OSError, http.client.HTTPException) as err:
                self._fail(err)
                continue
            if n == 0 and self.length is not None and self.offset < self.length:
                self._fail(http.client.IncompleteRead(b"", self.length - self.offset))  # the connection ended early
                continue
            self.offset += n
            return n

    def close(self) -> None:
        self._drop()
        super().close()


def fetch_bytes(url: str, reading: Reading) -> bytes:
    """A whole remote file (e.g. a manifest.json), with the same retries."""
    with io.BufferedReader(HttpShard(url, reading)) as stream:
        return stream.read()


@functools.lru_cache(maxsize=16)
def fetch_manifest(url: str, reading: Reading = Reading()) -> dict:
    """The manifest at `url` (`.../manifest.json`), read over HTTP(S) once per process: resolving the shards, their
    entries and the sample count of every epoch's loader read the same one (a shard set does not change mid-run).
    Callers must not modify the returned dict."""
    try:
        return check_manifest(json.loads(fetch_bytes(url, reading)), url)
    except RemoteReadError as err:
        raise FileNotFoundError(f"no shard manifest at {url}: {err}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{url} is not valid JSON ({err}); point data.train at a shard set's manifest.json") from err


def _verified(url: str, reading: Reading, sha256: str) -> BinaryIO:
    """The whole shard in a spooled temporary file whose sha256 equals the manifest's (a mismatch is retried)."""
    for attempt in range(reading.retries + 1):
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        digest = hashlib.sha256()
        source = gopen(url) if not url.startswith(HTTP_PREFIXES) else io.BufferedReader(HttpShard(url, reading))
        try:
            with source:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    spool.write(chunk)
        except BaseException:
            spool.close()
            raise
        if digest.hexdigest() == sha256:
            spool.seek(0)
            return spool
        spool.close()
        if attempt < reading.retries:
            time.sleep(min(BACKOFF_CAP_S, reading.retry_backoff * 2 ** attempt))
    raise RemoteReadError(f"sha256 {digest.hexdigest()[:12]}... differs from the manifest's {sha256[:12]}... "
                          f"after {reading.retries + 1} reads; the shard is damaged at the source: rewrite it")


def open_shard(url: str, reading: Reading, sha256: str | None = None) -> BinaryIO:
    """A readable stream of the shard at `url`: HTTP(S) with retries, anything else by webdataset's `gopen`; read
    whole and checked first when `reading.verify_sha256` and the manifest gives its `sha256`."""
    if reading.verify_sha256 and sha256:
        return _verified(url, reading, sha256)
    if url.startswith(HTTP_PREFIXES):
        return io.BufferedReader(HttpShard(url, reading), buffer_size=1 << 16)
    return gopen(url)
