"""The uint8 multi-crop path against the torchvision reference: same crop sampling, same adjustments (to rounding),
same branch rates and the same output statistics on real photographs; reduced-size JPEG decoding."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from PIL import Image

from sslpipe.data import fast_views as fv
from sslpipe.data.stream import decode_sample
from sslpipe.data.views import MultiCropTransform

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """60 real 160x120 photographs: crops of scikit-image's bundled colour images (reproducible)."""
    import tempfile
    from pathlib import Path

    from sslpipe.bench.photos import write_photo_folder

    with tempfile.TemporaryDirectory() as tmp:
        write_photo_folder(tmp, 60, size=(160, 120), seed=3)
        return [Image.open(p).convert("RGB") for p in sorted(Path(tmp).rglob("*.jpg"))]


def _tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


@pytest.mark.parametrize("size, scale", [((375, 500), (0.25, 1.0)), ((120, 160), (0.05, 0.25)), ((7, 300), (0.9, 1))])
def test_crop_parameters_are_torchvisions(size, scale):
    rrc = T.RandomResizedCrop(96, scale=scale)
    for seed in range(40):
        torch.manual_seed(seed)
        ours = fv.resized_crop_params(*size, scale)
        torch.manual_seed(seed)
        theirs = rrc.make_params([torch.zeros(3, *size)])
        assert ours == (theirs["top"], theirs["left"], theirs["height"], theirs["width"])


def test_each_adjustment_matches_torchvision_to_rounding(photos):
    img = np.asarray(photos[0])
    ref = _tensor(img)

    def diff(ours: np.ndarray, theirs: torch.Tensor) -> np.ndarray:
        return np.abs(ours.astype(int) - theirs.permute(1, 2, 0).numpy().astype(int))

    for factor in (0.6, 1.3):
        assert diff(fv.adjust_brightness(img, factor), F.adjust_brightness(ref, factor)).max() <= 1
        assert diff(fv.adjust_contrast(img, factor), F.adjust_contrast(ref, factor)).max() <= 2
        assert diff(fv.adjust_saturation(img, factor), F.adjust_saturation(ref, factor)).max() <= 2
    for factor in (-0.1, 0.04, 0.1):  # uint8 HSV in 256 hue steps vs torchvision's float HSV
        d = diff(fv.adjust_hue(img, factor), F.adjust_hue(ref, factor))
        assert d.mean() < 1.5 and np.percentile(d, 99) <= 8
    assert diff(fv.to_grayscale(img), F.rgb_to_grayscale(ref, num_output_channels=3)).max() <= 1
    assert np.array_equal(fv.solarize(img), F.solarize(ref, 128).permute(1, 2, 0).numpy())


@pytest.mark.parametrize("sigma", [0.1, 0.2, 0.3, 0.5, 1.0, 2.0])
def test_blur_is_the_references_pil_blur(sigma):
    """The reference blurs with PIL's GaussianBlur(radius=sigma) (lightly's, as the official utils.GaussianBlur):
    three rounded passes of an extended box per axis, of variance sigma^2 in all. The fast path does the same passes
    (`pil_blur`). OpenCV's sampled Gaussian, used before, spread a line by 0.09 px at sigma 0.3 where PIL spreads it
    by 0.29."""
    import cv2
    from PIL import ImageFilter

    from sslpipe.data.crop_params import BLUR_PASSES, blur_box

    box = blur_box(sigma).astype(np.float64)
    offsets = np.arange(len(box)) - len(box) // 2
    assert box.sum() == pytest.approx(1.0) and (box * offsets**2).sum() * BLUR_PASSES == pytest.approx(sigma**2)
    rng = np.random.default_rng(0)
    line = np.zeros((41, 41, 3), np.uint8)
    line[:, 20] = 255
    for img in (line, cv2.GaussianBlur((rng.random((64, 64, 3)) * 255).astype(np.uint8), (0, 0), 1.5),
                rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)):
        ours = fv.pil_blur(img, sigma).astype(int)
        pil = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=sigma))).astype(int)
        # PIL's 24-bit fixed-point sums round a little lower than exact arithmetic (-0.16 levels a pass measured)
        assert np.abs(ours - pil).max() <= 3 and np.abs(ours - pil).mean() < 0.65
        assert np.array_equal(ours[img.shape[0] // 2], pil[img.shape[0] // 2]) or img is not line
    if sigma in (0.2, 0.3):  # a line: PIL spreads 6-11 levels to each neighbour, a sampled Gaussian 0-1
        sampled = cv2.GaussianBlur(line, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
        assert sampled[20, 19, 0] <= 1 and fv.pil_blur(line, sigma)[20, 19, 0] >= 6


def test_branches_fire_at_their_probabilities(photos, monkeypatch):
    """Every random branch (flip 0.5, jitter 0.8, grey 0.2, blur 1 / 0.1 / 0.5, solarize 0.2) at its rate."""
    seen: dict[float, list[bool]] = {}
    chance = fv._chance

    def recording(p: float) -> bool:
        out = chance(p)
        seen.setdefault(p, []).append(out)
        return out

    monkeypatch.setattr(fv, "_chance", recording)
    torch.manual_seed(0)
    mc = fv.FastMultiCropTransform(32, 16, n_global=2, n_local=4)
    for i in range(300):
        mc(photos[i % len(photos)])
    for p, outcomes in seen.items():
        n = len(outcomes)
        assert abs(np.mean(outcomes) - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (p, np.mean(outcomes), n)
    assert set(seen) - {0.0} == {0.5, 0.8, 0.2, 1.0, 0.1} and not any(seen.get(0.0, []))  # p 0: never
    assert len(seen[1.0]) == 300 and len(seen[0.1]) == 300  # global 1 always blurred; global 2: blur p 0.1


def test_output_statistics_match_the_reference(photos):
    """Same photos, same crop settings: the per-crop colour statistics of both paths agree."""
    sizes = dict(global_size=64, local_size=32, n_global=2, n_local=4, global_scale=(0.25, 1.0),
                 local_scale=(0.05, 0.25))
    ref = MultiCropTransform(**sizes, mean=(0, 0, 0), std=(1, 1, 1))
    fast = fv.FastMultiCropTransform(**sizes)

    def stats(transform, scale: float) -> dict[str, np.ndarray]:
        torch.manual_seed(1)
        np.random.seed(1)
        crops = [c.float() * scale for _ in range(4) for img in photos for c in transform(img)]
        shapes = {tuple(c.shape) for c in crops}
        means = np.array([c.mean().item() for c in crops])
        stds = np.array([c.std().item() for c in crops])
        grey = np.array([bool((c.max(0).values - c.min(0).values).max() <= 1.0) for c in crops])
        sat = np.array([(c.max(0).values - c.min(0).values).mean().item() for c in crops])
        return {"shapes": shapes, "mean": means, "std": stds, "grey": grey, "sat": sat}

    a, b = stats(ref, 255.0), stats(fast, 1.0)
    assert a["shapes"] == b["shapes"] == {(3, 64, 64), (3, 32, 32)}
    assert abs(a["mean"].mean() - b["mean"].mean()) < 4.0  # levels of 255
    assert abs(a["std"].mean() / b["std"].mean() - 1) < 0.1
    assert abs(a["sat"].mean() / b["sat"].mean() - 1) < 0.1
    assert abs(a["grey"].mean() - b["grey"].mean()) < 0.06 and 0.1 < b["grey"].mean() < 0.3


def test_crops_leave_as_uint8_and_normalise_like_torchvision(photos):
    crops = fv.FastMultiCropTransform(32, 16, n_local=3)(photos[0])
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.uint8 for c in crops)
    batch = torch.stack(crops[:2])
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = T.Normalize(mean, std)(T.ToDtype(torch.float32, scale=True)(batch))
    torch.testing.assert_close(fv.normalize_crops(batch, mean, std), expected)
    floats = torch.randn(2, 3, 4, 4)
    assert fv.normalize_crops(floats, mean, std) is floats  # the reference path is normalised already


def test_large_jpegs_decode_at_a_reduced_size_that_keeps_every_crop_sharp():
    big = Image.fromarray((np.random.default_rng(0).random((1500, 2000, 3)) * 255).astype(np.uint8))
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=90)
    sample = {"__key__": "k", "__url__": "u", "jpg": buffer.getvalue()}
    mc = fv.FastMultiCropTransform(224, 96, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25))
    need = mc.draft_size(2000, 1500)
    image = decode_sample(sample, mc.draft_size)["image"]
    assert image.size[0] < 2000 and image.size[0] >= need[0] and image.size[1] >= need[1]
    w, h = image.size  # the smallest, most elongated region of each crop kind still has the crop's pixels
    assert math.sqrt(0.25 * w * h * 3 / 4) >= 224 and math.sqrt(0.05 * w * h * 3 / 4) >= 96
    assert decode_sample(sample)["image"].size == (2000, 1500)
    assert mc.draft_size(500, 375)[0] >= 500  # ImageNet-sized images: decoded in full
    # a panorama more elongated than the crop ratios: every global crop is the centre fallback as high as the image,
    # so the decode keeps at least 224 rows (the smallest-region rule alone asked for 2000 x 200: upsampled crops)
    w, h = mc.draft_size(4000, 400)
    assert 224 <= h < 400 and 2240 <= w <= 2241
    torch.manual_seed(0)
    assert {fv.resized_crop_params(400, 4000, (0.25, 1.0))[2] for _ in range(20)} == {400}
