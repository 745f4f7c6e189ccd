"""iBOT patch masks: BEiT-style block masking and uniform random masking (docs/methods.md §1).

Follows bytedance/ibot ``loader.py`` (ImageFolderMask.get_pred_ratio and the block loop of __getitem__), which in turn
follows BEiT's ``masking_generator.py``. Written by hand because no library does this exact algorithm:
``lightly.models.utils.random_block_mask`` is DINOv2's variant (a fixed fraction of the batch masked, a per-image
number of patches drawn from [min, max] ratio, blocks of at least 4 patches) - it neither draws the ratio per crop
from iBOT's list semantics nor uses BEiT's acceptance rule, so its mask statistics differ from the published run.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

Ratio = float | Sequence[float]


def _unwrap(value: Ratio) -> float | list[float]:
    """A one-element list means that scalar (as in the official code)."""
    if isinstance(value, (list, tuple)):
        return float(value[0]) if len(value) == 1 else [float(v) for v in value]
    return float(value)


class MaskGenerator:
    """Draws one boolean patch mask (H, W) per call; True = masked (the student sees the mask token there).

    Ratio r per mask (``get_pred_ratio``): 0 before ``pred_start_epoch``; with a list ``pred_ratio`` one candidate per
    entry (U(m - v, m + v) if v > 0 else m) and one candidate picked at random; with a scalar, the same for that entry.
    The published iBOT setting [0, 0.3] / [0, 0.2] gives r = 0 for half the crops and r ~ U(0.1, 0.5) otherwise.

    Block mode (BEiT): target T = r * H * W, a float, never rounded (the official ``high``). While masked < T, a round
    makes up to 10 attempts: area ~ U(min_num_patches, T - masked), log-aspect ~ U(log a, log 1/a),
    h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)); a block with h < H and w < W is placed uniformly and
    accepted iff it newly masks k cells with 0 < k <= T - masked. A round that adds nothing ends the loop, so the mask
    never exceeds T and may undershoot it.

    ``min_num_patches``: the official code computes it from the grid, (min(H, W) // 3) ** 2, which is 16 on the
    published 14x14 grid; pass ``None`` for that formula. The default keeps the constant 16 (the interface contract).
    On small grids a constant 16 can exceed T - masked; ``random.uniform(a, b)`` with a > b then draws from [b, a], so
    most blocks are too large to accept and masks undershoot T much more (e.g. 8x8 at r=0.2: T=12.8). Use ``None``
    for small grids.

    Rand mode: exactly int(T) = floor(r * H * W) cells, chosen uniformly without replacement (the official code
    shuffles with ``np.random``; here every draw comes from the one ``random`` source, same distribution).

    Randomness comes from ``rng`` (a ``random.Random``) or, by default, the module-level ``random`` that the data
    pipeline seeds per worker and epoch, so masks are reproducible on resume.
    """

    def __init__(
        self,
        grid: int | tuple[int, int] = (14, 14),
        pred_ratio: Ratio = (0.0, 0.3),
        pred_ratio_var: Ratio = (0.0, 0.2),
        pred_shape: str = "block",
        min_num_patches: int | None = 16,
        min_aspect: float = 0.3,
        pred_start_epoch: int = 0,
        rng: random.Random | None = None,
    ) -> None:
        self.grid = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
        if self.grid[0] <= 0 or self.grid[1] <= 0:
            raise ValueError(f"MaskGenerator: grid must be positive, got {grid}")
        if pred_shape not in ("block", "rand"):
            raise ValueError(f"MaskGenerator: pred_shape must be 'block' or 'rand', got {pred_shape!r}")
        if not 0 < min_aspect <= 1:
            raise ValueError(f"MaskGenerator: min_aspect must be in (0, 1], got {min_aspect}")
        ratio, var = _unwrap(pred_ratio), _unwrap(pred_ratio_var)
        if isinstance(ratio, list) and not isinstance(var, list):
            var = [var] * len(ratio)
        if isinstance(ratio, list) != isinstance(var, list) or (
            isinstance(ratio, list) and len(ratio) != len(var)  # type: ignore[arg-type]
        ):
            raise ValueError(
                f"MaskGenerator: pred_ratio {pred_ratio} and pred_ratio_var {pred_ratio_var} must have the same length"
            )
        pairs = list(zip(ratio, var)) if isinstance(ratio, list) else [(ratio, var)]  # type: ignore[arg-type]
        for m, v in pairs:
            if not (0 <= v <= m and m + v <= 1):
                raise ValueError(
                    f"MaskGenerator: need 0 <= pred_ratio_var <= pred_ratio and pred_ratio + var <= 1, got ({m}, {v})"
                )
        self.pred_ratio, self.pred_ratio_var = ratio, var
        self.pred_shape = pred_shape
        self.min_num_patches = min_num_patches
        self.log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
        self.pred_start_epoch = pred_start_epoch
        self.epoch = 0
        self._rng = rng if rng is not None else random

    def set_epoch(self, epoch: int) -> None:
        """Masks are all-zero while epoch < pred_start_epoch."""
        self.epoch = int(epoch)

    def get_pred_ratio(self) -> float:
        """The masking ratio r for one crop (docs/methods.md §1 list semantics)."""
        if self.epoch < self.pred_start_epoch:
            return 0.0
        u = self._rng.uniform
        if isinstance(self.pred_ratio, list):
            candidates = [u(m - v, m + v) if v > 0 else m for m, v in zip(self.pred_ratio, self.pred_ratio_var)]
            return self._rng.choice(candidates)
        m, v = self.pred_ratio, self.pred_ratio_var
        return u(m - v, m + v) if v > 0 else m  # type: ignore[operator]

    def __call__(self) -> np.ndarray:
        """One mask, bool array of shape ``grid``."""
        target = self.get_pred_ratio() * self.grid[0] * self.grid[1]
        if self.pred_shape == "block":
            return self.block_mask(target)
        return self.rand_mask(target)

    def rand_mask(self, target: float) -> np.ndarray:
        """Exactly floor(target) cells masked, uniformly at random."""
        H, W = self.grid
        flat = np.zeros(H * W, dtype=bool)
        flat[self._rng.sample(range(H * W), int(target))] = True
        return flat.reshape(H, W)

    def block_mask(self, target: float) -> np.ndarray:
        """BEiT block masking up to ``target`` cells (never more, possibly fewer)."""
        H, W = self.grid
        mask = np.zeros((H, W), dtype=bool)
        low = (min(H, W) // 3) ** 2 if self.min_num_patches is None else self.min_num_patches
        count = 0
        while count < target:
            budget = target - count
            delta = 0
            for _ in range(10):
                area = self._rng.uniform(low, budget)
                aspect = math.exp(self._rng.uniform(*self.log_aspect))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if h < H and w < W:
                    top = self._rng.randint(0, H - h)
                    left = self._rng.randint(0, W - w)
                    block = mask[top : top + h, left : left + w]
                    new = h * w - int(block.sum())
                    if 0 < new <= budget:
                        block[...] = True
                        delta = new
                        break
            if delta == 0:
                break
            count += delta
        return mask
