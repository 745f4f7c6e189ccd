"""What the pictures of a backbone share: images back to uint8, heat maps and masks on the patch grid, and matplotlib
figures saved atomically (the Agg backend: no display needed on a cluster node).

Panels are laid out by `sslpipe.viz.overlays.save_rows`, the one drawer of image grids; plots (embedding maps, the
run report's curves) are matplotlib figures written by `save_figure`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def display_image(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """A normalised (3, H, W) network input back to the uint8 image the network saw."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return ((x * s + m).clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def read_rgb(path: str | Path, role: str = "image") -> Any:
    """The RGB PIL image of a file (the `convert("RGB")` the shard decoder does), or one ValueError naming it: a
    file the user named that PIL cannot read is bad input, not a crash."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{role} {path} cannot be read: {err}") from None


def thumbnail(image: Any, side: int) -> Tensor:
    """A PIL image as a uint8 (3, side, side) panel: short side resized to `side` (nearest when enlarging, so
    small images stay sharp), centre crop (grids of images of any size line up)."""
    from PIL import Image

    image = image.convert("RGB")
    scale = side / min(image.size)
    size = (max(side, round(image.width * scale)), max(side, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC)
    left, top = (size[0] - side) // 2, (size[1] - side) // 2
    array = np.asarray(image.crop((left, top, left + side, top + side)))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def upsample(grid: Tensor, size: tuple[int, int]) -> Tensor:
    """A (h, w) patch-grid map to `size` pixels, nearest (each patch a block, as DINO draws it)."""
    return F.interpolate(grid[None, None].float(), size=size, mode="nearest")[0, 0]


def heatmap(values: Tensor, size: tuple[int, int], cmap: str = "inferno",
            limits: tuple[float, float] | None = None) -> Tensor:
    """A (h, w) map scaled to `limits` (default: its own [min, max]), coloured with a matplotlib colour map, as a
    uint8 (3, H, W) panel."""
    import matplotlib

    v = values.float()
    lo, hi = limits if limits is not None else (v.min(), v.max())
    v = ((v - lo) / max(float(hi - lo), 1e-12)).clamp(0, 1)
    rgb = matplotlib.colormaps[cmap](upsample(v, size).cpu().numpy())[..., :3]
    return torch.from_numpy((rgb * 255).round().astype(np.uint8)).permute(2, 0, 1)


def rgb_panel(rgb: Tensor, size: tuple[int, int]) -> Tensor:
    """A (h, w, 3) map in [0, 1] as a uint8 (3, H, W) panel, nearest-upsampled to `size`."""
    up = F.interpolate(rgb.permute(2, 0, 1)[None].float(), size=size, mode="nearest")[0]
    return (up.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def masked(image: Tensor, keep: Tensor, dim: float = 0.2) -> Tensor:
    """uint8 (3, H, W) image with the patches outside `keep` ((h, w) bool) darkened to `dim` of their brightness."""
    factor = upsample(keep, tuple(image.shape[-2:])).clamp(dim, 1.0)
    return (image.float() * factor).round().to(torch.uint8)


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
