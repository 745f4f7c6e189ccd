"""Per-class FIFO memory queues of U2PL's negative keys (official `u2pl/utils/utils.py: dequeue_and_enqueue`,
capacity 30000 per class, 50000 for class 0 = background; docs/methods.md §3).

Every step each process offers, per class, the teacher representations of its negative candidates. They are gathered
from all processes (rank 0's keys first, then rank 1's, ...: the official `all_gather_object` order) and appended
to the class's queue; only the newest `capacity` rows are kept (first in, first out). All processes therefore hold
identical queues. The gather is one `all_gather` of the per-rank counts plus one of the padded keys of all classes
together (tensors, so it runs on gloo and NCCL alike; the official code pickles CPU tensors with
`all_gather_object`, once per class). Queues live on the device of the keys.

State for checkpoints is a flat dict of tensors `{prefix}{c}` -> (n_c, dim), oldest row first.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def gather_rows(keys: Tensor) -> Tensor:
    """Concatenate `keys` (n_r, ...) of every process in rank order (variable n_r); identity on one process."""
    if not _distributed():
        return keys
    world = dist.get_world_size()
    count = torch.tensor([keys.shape[0]], device=keys.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    if longest == 0:
        return keys[:0]
    padded = keys.new_zeros((longest, *keys.shape[1:]))
    padded[: keys.shape[0]] = keys
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class ClassQueues:
    """One FIFO queue of `dim`-d keys per class with its own capacity.

    Stored as ring buffers (grown by doubling up to the capacity), so a push copies only the new keys (the official
    `torch.cat` + slice copies the whole queue, up to 50000 x 256 floats per class and step). Row j of a queue in
    FIFO order (0 = oldest) is physical row (start + j) % capacity; sampling draws logical rows, so a queue restored
    from a checkpoint (written oldest first) samples exactly as the uninterrupted one."""

    def __init__(self, num_classes: int, dim: int, capacities: int | Sequence[int],
                 device: torch.device | str = "cpu") -> None:
        if isinstance(capacities, int):
            capacities = [capacities] * num_classes
        if len(capacities) != num_classes or min(capacities) < 1:
            raise ValueError(f"need {num_classes} positive queue capacities, got {list(capacities)}")
        self.num_classes, self.dim = num_classes, dim
        self.capacities = [int(c) for c in capacities]
        self.device = torch.device(device)
        self.buffers: list[Tensor] = [torch.zeros(0, dim, device=self.device) for _ in range(num_classes)]
        self.lengths = [0] * num_classes
        self.ptrs = [0] * num_classes  # next physical row to write

    def __len__(self) -> int:
        return self.num_classes

    def sizes(self) -> list[int]:
        return list(self.lengths)

    def _start(self, c: int) -> int:
        return self.ptrs[c] if self.lengths[c] == self.capacities[c] else 0

    def queue(self, c: int) -> Tensor:
        """Queue c in FIFO order, oldest row first (a copy)."""
        n, buf = self.lengths[c], self.buffers[c]
        if n < self.capacities[c]:
            return buf[:n].clone()
        return torch.cat([buf[self.ptrs[c]:n], buf[: self.ptrs[c]]])

    @property
    def queues(self) -> list[Tensor]:
        return [self.queue(c) for c in range(self.num_classes)]

    def _append(self, c: int, new: Tensor) -> None:
        cap = self.capacities[c]
        new = new[-cap:]
        n = new.shape[0]
        if n == 0:
            return
        need = min(cap, self.lengths[c] + n)
        buf = self.buffers[c]
        if buf.shape[0] < need:
            grown = new.new_zeros(min(cap, max(need, 2 * buf.shape[0])), self.dim)
            grown[: self.lengths[c]] = buf[: self.lengths[c]]
            self.buffers[c] = buf = grown
        idx = (self.ptrs[c] + torch.arange(n, device=buf.device)) % cap
        buf[idx] = new
        self.ptrs[c] = (self.ptrs[c] + n) % cap
        self.lengths[c] = need

    @torch.no_grad()
    def push(self, keys: Sequence[Tensor], gather: bool = True) -> list[int]:
        """Append `keys[c]` (n_c, dim) to queue c for every class, after gathering them from all processes when
        `gather` (and torch.distributed is initialised); only the newest `capacity` rows stay. Returns the number of
        keys offered per class (all ranks)."""
        if len(keys) != self.num_classes:
            raise ValueError(f"push needs one key tensor per class ({self.num_classes}), got {len(keys)}")
        counts = torch.tensor([k.shape[0] for k in keys], dtype=torch.long)
        flat = torch.cat([k.detach().float().reshape(-1, self.dim).to(self.device) for k in keys])
        labels = torch.repeat_interleave(torch.arange(self.num_classes), counts).to(self.device)
        if gather and _distributed():
            both = gather_rows(torch.cat([flat, labels[:, None].float()], dim=1))
            flat, labels = both[:, : self.dim], both[:, self.dim].long()
        added = []
        for c in range(self.num_classes):
            new = flat[labels == c]
            added.append(new.shape[0])
            self._append(c, new)
        return added

    def sample(self, c: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        """`n` keys of class c drawn uniformly with replacement (the official `torch.randint` over the queue)."""
        size = self.lengths[c]
        if size == 0:
            raise ValueError(f"queue of class {c} is empty")
        idx = torch.randint(size, (n,), device=self.device, generator=generator)
        return self.buffers[c][(idx + self._start(c)) % self.capacities[c]]

    def state(self, prefix: str = "queue.") -> dict[str, Tensor]:
        return {f"{prefix}{c}": self.queue(c) for c in range(self.num_classes)}

    def load_state(self, state: dict[str, Tensor], prefix: str = "queue.") -> None:
        """Restore from `state()`; a queue longer than its capacity keeps its newest rows."""
        missing = [f"{prefix}{c}" for c in range(self.num_classes) if f"{prefix}{c}" not in state]
        if missing:
            raise KeyError(f"memory-queue state lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}: the "
                           f"checkpoint was written for another number of classes or without queues")
        for c in range(self.num_classes):
            q = state[f"{prefix}{c}"]
            if q.dim() != 2 or (q.shape[0] and q.shape[1] != self.dim):
                raise ValueError(f"{prefix}{c} has shape {tuple(q.shape)}, expected (n, {self.dim})")
            q = q.reshape(-1, self.dim).float().to(self.device)[-self.capacities[c]:].clone()
            self.buffers[c], self.lengths[c] = q, q.shape[0]
            self.ptrs[c] = q.shape[0] % self.capacities[c]
