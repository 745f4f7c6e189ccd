"""What the three multi-crop backends share, below all of them: the published blur range, the blur kernel and the
grey-level weights of the uint8 paths, and the layout of one crop's random draws.

`views` (the torchvision reference), `fast_views` (uint8 on the CPU) and `device_views` (on the accelerator) each
import this module and none imports the others upward: `device_views` builds on `fast_views`, and the factory that
picks a backend from a recipe's `crops` section (`multicrop_from_config`) lives above them, in
`sslpipe.recipes.multicrop`.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import ive

# Gaussian-blur sigma range in pixels of the output crop (iBOT/DINO utils.GaussianBlur, docs/methods.md §1), tuned for
# 224/96 px.
BLUR_SIGMAS: tuple[float, float] = (0.1, 2.0)



def blur_kernel(sigma: float) -> np.ndarray:
    """The 1-D kernel of the uint8 paths' Gaussian blur: the discrete Gaussian T(n, t) = e^-t I_n(t), t = sigma^2
    (I_n: modified Bessel), whose variance is sigma^2 at every sigma, as that of the reference's PIL
    `GaussianBlur(radius=sigma)` (three extended box blurs of variance sigma^2 / 3). A sampled Gaussian (OpenCV's) blurs
    far less below sigma 0.5: variance 0.09^2 for sigma 0.3. Radius ceil(4 sigma) + 1, normalised to sum 1."""
    radius = math.ceil(4 * sigma) + 1
    kernel = ive(np.arange(-radius, radius + 1), sigma * sigma)
    return (kernel / kernel.sum()).astype(np.float32)


# ITU-R 601 grey weights as OpenCV applies them (the fast path's cvtColor and the device path's batched version).
GRAY_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)

# One crop's random draws as a vector: the fast path's `FastCropView.sample` writes it, the device path's
# `augment_batch` reads it (the loader workers hand these to the accelerator).
PARAM_FIELDS: tuple[str, ...] = ("top", "left", "height", "width", "flip", "jitter", "order0", "order1", "order2",
                                 "order3", "brightness", "contrast", "saturation", "hue", "gray", "sigma", "solarize")
P: dict[str, int] = {name: i for i, name in enumerate(PARAM_FIELDS)}
