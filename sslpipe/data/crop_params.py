"""What the three multi-crop backends share, below all of them: the published blur range, PIL's blur kernel and the
grey-level weights of the uint8 paths, and the layout of one crop's random draws.

`views` (the torchvision reference), `fast_views` (uint8 on the CPU) and `device_views` (on the accelerator) each
import this module and none imports the others upward: `device_views` builds on `fast_views`, and the factory that
picks a backend from a recipe's `crops` section (`multicrop_from_config`) lives above them, in
`sslpipe.recipes.multicrop`.
"""
from __future__ import annotations

import math

import numpy as np

# Gaussian-blur sigma range in pixels of the output crop (iBOT/DINO utils.GaussianBlur, docs/methods.md §1), tuned for
# 224/96 px.
BLUR_SIGMAS: tuple[float, float] = (0.1, 2.0)



# PIL's GaussianBlur(radius=sigma), the reference's (lightly's, as the official utils.GaussianBlur): this many passes
# of an extended box along each axis, each pass rounded to uint8 (Pillow BoxBlur.c `ImagingGaussianBlur`)
BLUR_PASSES = 3


def blur_box(sigma: float) -> np.ndarray:
    """The 1-D kernel of one pass of PIL's Gaussian blur: a box of radius l + a (weight 1 inside, a at both ends;
    Pillow's `_gaussian_blur_radius`, after Gwosdek et al. 2011) of variance sigma^2 / BLUR_PASSES, so that the
    passes together have variance sigma^2. OpenCV's sampled Gaussian, used before, blurred far less below sigma 0.5
    (a line spread 0.09 px at sigma 0.3 where PIL spreads it 0.29)."""
    var = sigma * sigma / BLUR_PASSES
    whole = math.floor((math.sqrt(12 * var + 1) - 1) / 2)
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * var) / (6 * (var - (whole + 1) ** 2))
    box = np.full(2 * whole + 3, 1.0)
    box[0] = box[-1] = frac
    return (box / (2 * (whole + frac) + 1)).astype(np.float32)


# ITU-R 601 grey weights as OpenCV applies them (the fast path's cvtColor and the device path's batched version).
GRAY_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)

# One crop's random draws as a vector: the fast path's `FastCropView.sample` writes it, the device path's
# `augment_batch` reads it (the loader workers hand these to the accelerator).
PARAM_FIELDS: tuple[str, ...] = ("top", "left", "height", "width", "flip", "jitter", "order0", "order1", "order2",
                                 "order3", "brightness", "contrast", "saturation", "hue", "gray", "sigma", "solarize")
P: dict[str, int] = {name: i for i, name in enumerate(PARAM_FIELDS)}
