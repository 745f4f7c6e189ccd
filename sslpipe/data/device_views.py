"""The multi-crop on the accelerator: loader workers only decode and draw the random parameters; the crops are cut,
resized and coloured for the whole batch on the device (`crops.backend: device`).

On a GPU node the CPU-side augmentation is what starves the GPU (issue 13: 12 crops per image cost ~94% of a
worker's time). Here a worker decodes the image and draws every random choice of its crops exactly as the CPU
`fast` path does (`fast_views.FastCropView.sample`: same draws, same order, so with the same seed both paths make the
same crops up to kernel rounding), and hands over the decoded uint8 image plus a (n_crops, 17) parameter tensor. The
batch is then augmented in a handful of batched ops on the device:

- crop + antialiased bicubic resize per crop (one small kernel each; float on CUDA, whose bicubic-AA has no uint8
  kernel), rounded to uint8 levels like the CPU path;
- flip, ColorJitter's four adjustments in each crop's own random order (16 masked batched ops: position x op),
  grayscale, per-crop Gaussian blur (grouped separable convolutions with per-crop kernels, PIL's passes as the fast
  path's `pil_blur`), solarize; levels clamped and rounded after each step as uint8
  arithmetic does;
- normalisation.

It runs on any device: on the CPU it is the same computation (the tests compare it with the `fast` path there).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sslpipe.data.crop_params import BLUR_PASSES, GRAY_WEIGHTS, P, blur_box
from sslpipe.data.fast_views import FastMultiCropTransform, as_array, normalize_levels_


@dataclass
class DeferredCrops:
    """What a worker produces for one image: the decoded uint8 (H, W, 3) image and its crops' parameters."""

    image: Tensor
    params: Tensor


class DeviceMultiCropTransform(FastMultiCropTransform):
    """Worker side of the device path: PIL image -> `DeferredCrops` (decode + parameter draws only)."""

    def __call__(self, image: Image.Image | np.ndarray) -> DeferredCrops:  # type: ignore[override]
        array = as_array(image)
        return DeferredCrops(torch.from_numpy(array), self.sample_params(array.shape[0], array.shape[1]))


def _levels(x: Tensor) -> Tensor:
    """What storing as uint8 does: clamp to [0, 255] and round."""
    return x.clamp_(0, 255).round_()


def _gray(x: Tensor) -> Tensor:
    r, g, b = GRAY_WEIGHTS  # Python scalars: no host-to-device copy
    return x[:, 0:1] * r + x[:, 1:2] * g + x[:, 2:3] * b


def _rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r, g, b = x.unbind(1)
    v, _ = x.max(dim=1)
    c = v - x.min(dim=1).values
    s = torch.where(v > 0, c / v.clamp(min=1e-12), torch.zeros_like(v))
    safe = c.clamp(min=1e-12)
    h = torch.where(v == r, ((g - b) / safe) % 6, torch.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(c > 0, h / 6, torch.zeros_like(h))
    return h, s, v


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    t = torch.stack([(k + h * 6) % 6 for k in (5.0, 3.0, 1.0)], dim=1)
    return v.unsqueeze(1) - v.unsqueeze(1) * s.unsqueeze(1) * torch.clamp(torch.minimum(t, 4 - t), 0, 1)


def _jitter_op(op: int, x: Tensor, factor: Tensor) -> Tensor:
    f = factor.view(-1, 1, 1, 1).to(x.dtype)
    if op == 0:  # brightness
        return _levels(x * f)
    if op == 1:  # contrast: blend with the mean grey level
        mean = _levels(_gray(x)).mean(dim=(1, 2, 3), keepdim=True)
        return _levels(x * f + mean * (1 - f))
    if op == 2:  # saturation: blend with the grey image
        return _levels(x * f + _levels(_gray(x)) * (1 - f))
    h, s, v = _rgb_to_hsv(x / 255)  # hue: rotate by factor turns
    return _levels(_hsv_to_rgb((h + f.view(-1, 1, 1)) % 1.0, s, v) * 255)


def _clamped(n: int, r: int, device: torch.device) -> Tensor:
    """Indices of positions -r .. n-1+r clamped into [0, n) (PIL's border: the edge pixel repeated)."""
    return torch.arange(-r, n + r, device=device).clamp_(0, n - 1)


def _gaussian_blur(x: Tensor, host_sigma: np.ndarray) -> Tensor:
    """Per-crop Gaussian blur (sigma > 0) as the fast path's `pil_blur`: BLUR_PASSES passes of each crop's box
    (`crop_params.blur_box`) along the rows, then the columns, each rounded to uint8 levels, borders clamped.
    `host_sigma`: the sigmas on the host, where the kernels are made (not read back from the device)."""
    n, c, height, width = x.shape
    boxes = [blur_box(float(s)) for s in host_sigma]
    r = max(len(k) for k in boxes) // 2
    padded = np.stack([np.pad(k, r - len(k) // 2) for k in boxes])  # (n, 2r+1), centred
    kernel = _to_device(padded, x.device).to(x.dtype).repeat_interleave(c, dim=0)  # (n*c, 2r+1)
    y = x.reshape(1, n * c, height, width)
    for _ in range(BLUR_PASSES):
        y = _levels(F.conv2d(y.index_select(3, _clamped(width, r, x.device)), kernel.view(n * c, 1, 1, -1),
                             groups=n * c))
    for _ in range(BLUR_PASSES):
        y = _levels(F.conv2d(y.index_select(2, _clamped(height, r, x.device)), kernel.view(n * c, 1, -1, 1),
                             groups=n * c))
    return y.reshape(n, c, height, width)


def _to_device(array: np.ndarray, device: torch.device) -> Tensor:
    """A host array on `device` without making the host wait (pinned, asynchronous on a GPU)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def augment_batch(images: Sequence[Tensor], params: np.ndarray | Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """Crops of a batch on the images' device, crop-major per size group.

    `images`: B uint8 (H_b, W_b, 3) tensors on the device; `params`: (B, n_crops, 17), best on the host (the collate
    hands over a numpy array): every decision (crop boxes, which crops to jitter, grey, blur) is read there, so the
    device never waits for the host to look at a value. `sizes[k]`: output size of crop k. Returns one float tensor
    (levels 0-255) per run of equal sizes, each (n_k * B, 3, S, S), crop-major (crop k of every image, then crop
    k + 1, ...), the layout of `collate_multicrop`.
    """
    device = images[0].device
    params = params.detach().cpu().numpy() if isinstance(params, Tensor) else np.asarray(params)
    B, K = params.shape[:2]
    out: list[Tensor] = []
    start = 0
    while start < K:
        stop = start
        while stop < K and sizes[stop] == sizes[start]:
            stop += 1
        size = sizes[start]
        crops = []
        for k in range(start, stop):
            for b in range(B):
                top, left, h, w = (int(v) for v in params[b, k, 0:4])
                region = images[b][top:top + h, left:left + w].permute(2, 0, 1)[None].float()
                crops.append(F.interpolate(region, size=(size, size), mode="bicubic", antialias=True))
        x = _levels(torch.cat(crops))
        host = params[:, start:stop].transpose(1, 0, 2).reshape(-1, params.shape[-1]).astype(np.float32)
        out.append(_colour(x, _to_device(host, device), host))
        start = stop
    return out


def _colour(x: Tensor, p: Tensor, host: np.ndarray) -> Tensor:
    """Flip, jitter (per-crop order), grayscale, blur, solarize of crops x (N, 3, S, S) with params p (N, 17) on the
    device and the same `host` (N, 17) on the host, which picks the crops of each masked op (as index lists: no
    boolean indexing, whose size the host would wait for)."""
    flip = p[:, P["flip"]] > 0
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    jitter = host[:, P["jitter"]] > 0
    order = host[:, P["order0"]:P["order3"] + 1].astype(np.int64)
    factors = p[:, P["brightness"]:P["hue"] + 1]
    for position in range(4):
        for op in range(4):
            sel = np.flatnonzero(jitter & (order[:, position] == op))
            if len(sel):
                idx = _to_device(sel, x.device)
                x[idx] = _jitter_op(op, x[idx], factors[idx, op])
    gray = np.flatnonzero(host[:, P["gray"]] > 0)
    if len(gray):
        idx = _to_device(gray, x.device)
        x[idx] = _levels(_gray(x[idx])).expand(-1, 3, -1, -1)
    blur = np.flatnonzero(host[:, P["sigma"]] > 0)
    if len(blur):
        idx = _to_device(blur, x.device)
        x[idx] = _gaussian_blur(x[idx], host[blur, P["sigma"]])
    solar = (p[:, P["solarize"]] > 0).view(-1, 1, 1, 1)
    return torch.where(solar & (x >= 128), 255 - x, x)


def device_crops(images: Sequence[Tensor], params: np.ndarray | Tensor, sizes: Sequence[int], n_global: int,
                 mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor | None]:
    """(global crops, local crops or None), normalised, from a batch of decoded images already on the device.
    Computed in float32 whatever the surrounding autocast (levels 0-255 need more than bf16's 8 bits)."""
    with torch.autocast(images[0].device.type, enabled=False):
        groups = augment_batch(images, params, sizes)
    for g in groups:
        normalize_levels_(g, mean, std)
    if len(groups) == 1 and len(sizes) > n_global:  # global and local crops of one size
        B = params.shape[0]
        return groups[0][: n_global * B], groups[0][n_global * B:]
    return groups[0], (torch.cat(groups[1:]) if len(groups) > 1 else None)


def crop_sizes(transform: FastMultiCropTransform) -> list[int]:
    return [view.size for view in transform.views()]


