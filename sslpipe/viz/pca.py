"""The first principal components of the patch features as colours (DINOv2, Oquab et al. 2023, Fig. 1 and §7.4).

As in DINOv2: one PCA over the patches of all the images shown; the first component separates foreground from
background and is thresholded (kept: the positive side of the centred component); a second PCA over the foreground
patches only gives three components, each scaled to [0, 1] over the images, shown as RGB (background black). Parts
that match across images then get the same colour. The sign of a component is arbitrary: the foreground side of the
first one is taken to be the one holding fewer of the border patches (objects seldom fill the frame edge).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from sslpipe.viz.figures import heatmap, masked, rgb_panel
from sslpipe.viz.overlays import save_rows


@torch.no_grad()
def patch_features(model: nn.Module, x: Tensor) -> Tensor:
    """Per-position features (B, h, w, D) of the last layer: a ViT's patch tokens after the final norm (prefix tokens
    dropped), or a CNN's last feature map (NCHW or NHWC, told apart by `num_features`)."""
    out = model.forward_features(x)
    if out.ndim == 3:  # tokens: prefix + h*w patches
        ph, pw = model.patch_embed.patch_size
        h, w = x.shape[-2] // ph, x.shape[-1] // pw
        return out[:, int(getattr(model, "num_prefix_tokens", 1)):].reshape(x.shape[0], h, w, -1)
    if out.ndim == 4:
        return out.permute(0, 2, 3, 1) if out.shape[1] == getattr(model, "num_features", -1) else out
    raise ValueError(f"{type(model).__name__}.forward_features gives shape {tuple(out.shape)}: neither tokens "
                     "(B, N, D) nor a feature map (B, C, h, w)")


def _components(x: Tensor, k: int) -> Tensor:
    """Projections (N, k) of the centred rows of x onto its first k principal directions (SVD, float64)."""
    centred = x.double() - x.double().mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vh[:k].T


def _border(h: int, w: int) -> Tensor:
    edge = torch.zeros(h, w, dtype=torch.bool)
    edge[0], edge[-1], edge[:, 0], edge[:, -1] = True, True, True, True
    return edge


def pca_rgb(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Features (B, h, w, D) of the images shown -> (first component (B, h, w), foreground (B, h, w) bool,
    RGB (B, h, w, 3) in [0, 1], black outside the foreground)."""
    B, h, w, D = features.shape
    flat = features.reshape(-1, D)
    first = _components(flat, 1)[:, 0].reshape(B, h, w)
    border = _border(h, w).expand(B, h, w)
    if (first[border] > 0).float().mean() > 0.5:  # the border should lie on the background side
        first = -first
    foreground = first > 0
    rgb = torch.zeros(B * h * w, 3, dtype=torch.float64)
    fg = foreground.reshape(-1)
    if fg.sum() >= 3:
        comps = _components(flat[fg], min(3, D))
        lo, hi = comps.min(dim=0).values, comps.max(dim=0).values
        rgb[fg, : comps.shape[1]] = (comps - lo) / (hi - lo).clamp_min(1e-12)
    return first.float(), foreground, rgb.reshape(B, h, w, 3).float()


def draw_pca(model: nn.Module, x: Tensor, images: Sequence[Tensor], path: str | Path) -> Path:
    """One row per image: the image, the first component, the foreground it keeps, the three components as RGB."""
    feats = patch_features(model, x).cpu()
    first, foreground, rgb = pca_rgb(feats)
    rows, extent = [], float(first.abs().max())
    for image, f, fg, colours in zip(images, first, foreground, rgb):
        size = tuple(image.shape[-2:])
        rows.append([image, heatmap(f, size, cmap="coolwarm", limits=(-extent, extent)), masked(image, fg),
                     rgb_panel(colours, size)])
    h, w = feats.shape[1:3]
    what = (f"PCA of the {h}x{w} patch features, fitted over the {len(images)} images together (DINOv2): the first "
            "component (blue < 0 < red, one scale), the foreground it keeps (> 0), and components 1-3 of a PCA of "
            "the foreground patches as RGB.")
    return save_rows(rows, path, titles=("image", "1st component", "foreground", "PCA 1-3 as RGB"), caption=what)
