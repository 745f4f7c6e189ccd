"""The vectors of an embedding folder read a few parts at a time: keys and sources of every sample up front (the
part headers), float32 unit vectors of consecutive rows on demand. Search and curate take the set through this, so
neither holds the float16 copy of a large set beside the float32 one that faiss needs."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sslpipe.embed.store import iter_parts, part_name, read_index, read_part

BLOCK_ROWS = 1 << 16  # rows per float32 block: 65,536 x 384 x 4 B = 100 MB


def unit_rows(rows: np.ndarray) -> np.ndarray:
    """Stored (float16) rows as float32 unit vectors: normalised again after the float16 rounding, so that a row's
    similarity with itself (1) is never below its similarity with another."""
    rows = rows.astype(np.float16).astype(np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


class StoredVectors:
    """An embedding folder as rows 0..n-1 in part order: `keys[i]`, `sources[i]` (its shard), and the float32
    L2-normalised vectors through `blocks` and `gather`. Refuses an incomplete or damaged folder (`iter_parts`)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.index = read_index(folder)
        self.dim = int(self.index["dim"])
        self.keys: list[str] = []
        self.sources: list[str] = []
        self.parts: list[tuple[int, int, int]] = []  # (shard, first row, rows)
        interned: dict[str, str] = {}
        for part in iter_parts(folder, features=False):
            self.parts.append((part.shard, len(self.keys), len(part.keys)))
            self.keys += part.keys
            self.sources += [interned.setdefault(s, s) for s in part.sources]  # one string per shard, not per row

    def __len__(self) -> int:
        return len(self.keys)

    def _part(self, shard: int) -> np.ndarray:
        return unit_rows(read_part(self.folder / part_name(shard)).features)

    def block_parts(self, rows: int = BLOCK_ROWS) -> list[list[tuple[int, int, int]]]:
        """The parts (shard, first row, rows) of each block: whole parts, until a block holds `rows` rows or more."""
        blocks: list[list[tuple[int, int, int]]] = [[]]
        held = 0
        for part in self.parts:
            if part[2] == 0:
                continue
            if held >= rows:
                blocks.append([])
                held = 0
            blocks[-1].append(part)
            held += part[2]
        return [b for b in blocks if b]

    def blocks(self, rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 (m, dim)) of each block of `block_parts(rows)`; one block in memory at a time."""
        for parts in self.block_parts(rows):
            yield parts[0][1], np.concatenate([self._part(shard) for shard, _, _ in parts])

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """float32 (len(rows), dim) vectors of the given rows (in the order given), reading only their parts."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        for shard, begin, count in self.parts:
            lo, hi = np.searchsorted(sorted_rows, [begin, begin + count])
            if hi > lo:
                out[order[lo:hi]] = self._part(shard)[sorted_rows[lo:hi] - begin]
        return out

    def row_of(self) -> dict[str, int]:
        """key -> its first row (keys are unique within a shard set)."""
        rows: dict[str, int] = {}
        for i, key in enumerate(self.keys):
            rows.setdefault(key, i)
        return rows
