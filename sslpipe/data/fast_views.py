"""The iBOT/DINO multi-crop on uint8 arrays: the same augmentations as `views.MultiCropTransform`, 4-5x cheaper.

`views.MultiCropTransform` (torchvision transforms on PIL images, lightly's blur/solarize) is the reference. Profiled
on one core (2 global 224 + 10 local 96 crops of 500x375 JPEGs), it spends a third of its time in ColorJitter (PIL's
HSV round trip for the hue), a fifth in PIL's bicubic resize, a tenth in PIL's Gaussian blur and a sixth in the
float conversion and normalisation of the 12 crops, plus Python overhead per transform. Here each crop is one pass
over a uint8 HWC array:

- RandomResizedCrop: torchvision's parameter sampling (scale, log-uniform ratio, 10 tries, centre fallback) and
  torch's antialiased bicubic resize of uint8 images (the kernel torchvision uses on tensors);
- flip; ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8 in a random order of the four adjustments, with torchvision's
  formulas: brightness x b, contrast blended with the mean grey level, saturation blended with the grey image (as
  256-entry lookup tables or one weighted sum, in OpenCV), hue rotated in OpenCV's full-range HSV (256 steps per
  turn, torchvision: float);
- grayscale p 0.2 (ITU-R 601 weights); Gaussian blur with sigma ~ U[sigma_0, sigma_1] as PIL computes it (`pil_blur`:
  three rounded passes of an extended box per axis, clamped borders; a sampled Gaussian blurs far less at small
  sigma); solarize at 128 (lookup table);
- the crop leaves as a uint8 (3, H, W) tensor: normalisation moves to the device, where it costs nothing, and a batch
  is 4x fewer bytes between processes and over PCIe.

Distributions equal the reference's (tests/test_fast_views.py compares crop sizes, colour statistics and the rates of
every random branch); single pixels differ by rounding (uint8 arithmetic, OpenCV's grey weights 0.299/0.587/0.114 vs
torchvision's 0.2989/0.587/0.114). JPEGs much larger than the crops are decoded at a reduced size (`draft_size`).
Random numbers come from torch's generator, which the stream seeds per worker.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sslpipe.data.crop_params import BLUR_PASSES, BLUR_SIGMAS, PARAM_FIELDS, P, blur_box

cv2.setNumThreads(1)  # one loader worker = one core; OpenCV's own threads would oversubscribe it
_LEVELS = np.arange(256, dtype=np.float32)


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high))


def _chance(p: float) -> bool:
    return p > 0 and float(torch.rand(1)) < p


def resized_crop_params(height: int, width: int, scale: tuple[float, float],
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) exactly as torchvision's RandomResizedCrop samples them (10 tries, then a centre crop)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(*scale)
        aspect = math.exp(_uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,)))
            left = int(torch.randint(0, width - w + 1, (1,)))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_square(region: np.ndarray, size: int) -> np.ndarray:
    """Antialiased bicubic resize of a uint8 HWC region to (size, size), HWC contiguous (torch's uint8 kernel)."""
    chw = torch.from_numpy(region).permute(2, 0, 1)  # a strided view of the image: no copy
    out = F.interpolate(chw[None], size=(size, size), mode="bicubic", antialias=True)[0]
    return np.ascontiguousarray(out.permute(1, 2, 0).numpy())


def _lut(img: np.ndarray, table: np.ndarray) -> np.ndarray:
    return cv2.LUT(img, np.clip(np.rint(table), 0, 255).astype(np.uint8))


def _gray(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


def adjust_brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """torchvision: img x factor (blend with black)."""
    return _lut(img, _LEVELS * factor)


def adjust_contrast(img: np.ndarray, factor: float) -> np.ndarray:
    """torchvision: blend with the image's mean grey level."""
    mean = float(_gray(img).mean())
    return _lut(img, _LEVELS * factor + mean * (1 - factor))


def adjust_saturation(img: np.ndarray, factor: float) -> np.ndarray:
    """torchvision: blend with the grey image."""
    gray = cv2.cvtColor(_gray(img), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(img, factor, gray, 1 - factor, 0.0)


def adjust_hue(img: np.ndarray, factor: float) -> np.ndarray:
    """torchvision: rotate the hue by `factor` turns (in [-0.5, 0.5]); here in 256 steps per turn."""
    shift = int(round(factor * 256)) % 256
    if not shift:
        return img
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] = cv2.LUT(hsv[..., 0], ((np.arange(256) + shift) % 256).astype(np.uint8))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def to_grayscale(img: np.ndarray) -> np.ndarray:
    """Three equal channels of the ITU-R 601 grey level."""
    return cv2.cvtColor(_gray(img), cv2.COLOR_GRAY2RGB)


def solarize(img: np.ndarray, threshold: int = 128) -> np.ndarray:
    """Invert the levels >= threshold (PIL ImageOps.solarize, torchvision solarize)."""
    return _lut(img, np.where(_LEVELS < threshold, _LEVELS, 255 - _LEVELS))


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def pil_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """PIL's `GaussianBlur(radius=sigma)` on a uint8 HWC array, pass for pass: BLUR_PASSES rounded passes of the box
    `blur_box(sigma)` along the rows, then along the columns, borders clamped (Pillow BoxBlur.c)."""
    box = blur_box(sigma)
    for kernel in (box[None, :], box[:, None]):
        for _ in range(BLUR_PASSES):
            img = cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REPLICATE)
    return img


class FastCropView:
    """One crop recipe of docs/methods.md §1 on a uint8 HWC array -> uint8 (3, size, size) tensor.

    `sample(height, width)` draws every random choice of the crop (in the order the reference draws them) as a
    `PARAM_FIELDS` vector; `apply(image, params)` executes it. ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8 draws a
    random order of its four adjustments and their factors as torchvision does."""

    def __init__(self, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float,
                 blur_sigma: tuple[float, float] = BLUR_SIGMAS) -> None:
        self.size, self.scale = size, tuple(scale)
        self.blur_p, self.solarize_p, self.blur_sigma = blur_p, solarize_p, tuple(blur_sigma)

    def sample(self, height: int, width: int) -> list[float]:
        p = [0.0] * len(PARAM_FIELDS)
        p[0:4] = resized_crop_params(height, width, self.scale)
        p[P["flip"]] = float(_chance(0.5))
        if _chance(0.8):
            p[P["jitter"]] = 1.0
            p[P["order0"]:P["order3"] + 1] = torch.randperm(4).tolist()
            p[P["brightness"]] = _uniform(0.6, 1.4)
            p[P["contrast"]] = _uniform(0.6, 1.4)
            p[P["saturation"]] = _uniform(0.8, 1.2)
            p[P["hue"]] = _uniform(-0.1, 0.1)
        p[P["gray"]] = float(_chance(0.2))
        if _chance(self.blur_p):
            p[P["sigma"]] = _uniform(*self.blur_sigma)
        p[P["solarize"]] = float(_chance(self.solarize_p))
        return p

    def apply(self, image: np.ndarray, p: Sequence[float]) -> Tensor:
        top, left, h, w = (int(v) for v in p[0:4])
        img = resize_square(image[top:top + h, left:left + w], self.size)
        if p[P["flip"]]:
            img = np.ascontiguousarray(img[:, ::-1])
        if p[P["jitter"]]:
            factors = p[P["brightness"]:P["hue"] + 1]
            for i in p[P["order0"]:P["order3"] + 1]:
                img = JITTER_OPS[int(i)](img, factors[int(i)])
        if p[P["gray"]]:
            img = to_grayscale(img)
        if p[P["sigma"]] > 0:
            img = pil_blur(img, float(p[P["sigma"]]))
        if p[P["solarize"]]:
            img = solarize(img)
        return torch.from_numpy(img).permute(2, 0, 1)

    def __call__(self, image: np.ndarray) -> Tensor:
        return self.apply(image, self.sample(image.shape[0], image.shape[1]))


class FastMultiCropTransform:
    """`views.MultiCropTransform` on uint8 arrays (see the module docstring): PIL image -> list of uint8 crops,
    globals first. Normalise on the device with `normalize_crops`."""

    def __init__(
        self,
        global_size: int,
        local_size: int,
        n_global: int = 2,
        n_local: int = 10,
        global_scale: tuple[float, float] = (0.25, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.25),
        blur_sigma: tuple[float, float] = BLUR_SIGMAS,
        local_blur_sigma: tuple[float, float] | None = None,
    ) -> None:
        if n_global < 1 or n_local < 0:
            raise ValueError(f"FastMultiCropTransform: need n_global >= 1 and n_local >= 0, got {n_global}, {n_local}")
        self.n_global, self.n_local = n_global, n_local
        self.global_size, self.local_size = global_size, local_size
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.global1 = FastCropView(global_size, global_scale, 1.0, 0.0, blur_sigma)
        self.global2 = FastCropView(global_size, global_scale, 0.1, 0.2, blur_sigma)
        self.local = FastCropView(local_size, local_scale, 0.5, 0.0, local_blur_sigma or blur_sigma)

    def draft_size(self, width: int, height: int) -> tuple[int, int]:
        """The smallest decode size (for PIL's JPEG `draft`) at which every possible crop region still has at least
        the output's pixels: a region of the minimum scale and extreme aspect ratio must not be upsampled more than
        it would be from the full image. An image more elongated than the crop ratios falls back to a centre crop
        whose short side is the image's, which can be shorter still (a 4000 x 400 panorama: 400 px)."""
        need = 0.0
        for size, scale, n in ((self.global_size, self.global_scale, 1),
                               (self.local_size, self.local_scale, self.n_local)):
            if n:
                # the side of the smallest, most elongated region, or of the fallback's
                shortest = min(math.sqrt(scale[0] * width * height * 3 / 4), width, height)
                need = max(need, size / shortest)
        return max(1, math.ceil(width * need)), max(1, math.ceil(height * need))

    def views(self) -> list[FastCropView]:
        """The crop recipe of every crop, in output order (globals first)."""
        return [self.global1] + [self.global2] * (self.n_global - 1) + [self.local] * self.n_local

    def sample_params(self, height: int, width: int) -> Tensor:
        """(n_crops, len(PARAM_FIELDS)) float64: every random draw of this image's crops."""
        return torch.tensor([view.sample(height, width) for view in self.views()], dtype=torch.float64)

    def __call__(self, image: Image.Image | np.ndarray) -> list[Tensor]:
        array = as_array(image)
        return [view(array) for view in self.views()]


def as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """RGB uint8 HWC, writable (torch views it without a warning)."""
    if isinstance(image, np.ndarray):
        return image
    return np.array(image.convert("RGB") if image.mode != "RGB" else image)


def normalize_crops(crops: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (N, 3, H, W) crops -> float32 normalised, on whatever device they are (float crops pass through)."""
    if crops.dtype != torch.uint8:
        return crops
    return normalize_levels_(crops.float(), mean, std)


def normalize_levels_(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """In place: float crops (N, 3, H, W) in levels 0-255 -> normalised. Python scalars per channel: no
    host-to-device copy (which a GPU waits for) per call."""
    for channel, (m, s) in enumerate(zip(mean, std)):
        x[:, channel].sub_(255 * m).div_(255 * s)
    return x
