"""Multi-crop views, eval transform, joint segmentation augmentation, per-sample masks and the crop-major collate."""

import random

import lightly.transforms.gaussian_blur as lightly_blur
import lightly.transforms.solarize as lightly_solarize
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms.v2 import InterpolationMode

from sslpipe.data.collate import MultiCropSample, collate_multicrop
from sslpipe.data.masking import MaskGenerator
from sslpipe.data.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    MultiCropTransform,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def noise_image(h, w, mode="RGB", seed=0):
    rs = np.random.RandomState(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rs.randint(0, 256, shape, dtype=np.uint8), mode)


@pytest.mark.parametrize(
    "gsize, lsize, n_global, n_local, image",
    [(224, 96, 2, 10, noise_image(120, 150)), (32, 16, 2, 4, noise_image(28, 28, "L"))],
)
def test_multicrop_shapes_and_range(gsize, lsize, n_global, n_local, image):
    crops = MultiCropTransform(gsize, lsize, n_global, n_local)(image)
    assert [tuple(c.shape) for c in crops] == [(3, gsize, gsize)] * n_global + [(3, lsize, lsize)] * n_local
    for c in crops:
        assert c.dtype == torch.float32
        raw = c * STD + MEAN  # un-normalised pixels must lie in [0, 1]
        assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5


def test_black_image_normalises_to_minus_mean_over_std():
    # every augmentation keeps black black (jitter scales/blends with 0, solarize only inverts >= 128)
    crops = MultiCropTransform(32, 16, 3, 2)(Image.new("L", (28, 28), 0))
    expected = (-MEAN / STD).expand(3, 32, 32)
    assert len(crops) == 5
    torch.testing.assert_close(crops[0], expected)
    torch.testing.assert_close(crops[4], (-MEAN / STD).expand(3, 16, 16))


def test_recipe_structure():
    mc = MultiCropTransform(32, 16, global_scale=(0.3, 0.9), local_scale=(0.05, 0.2))
    for view, size, scale in [(mc.global1, 32, (0.3, 0.9)), (mc.global2, 32, (0.3, 0.9)), (mc.local, 16, (0.05, 0.2))]:
        rrc = view.transforms[0]
        assert rrc.interpolation == InterpolationMode.BICUBIC and tuple(rrc.size) == (size, size)
        assert tuple(rrc.scale) == scale
        jitter = view.transforms[2]
        assert jitter.p == 0.8
        cj = jitter.transforms[0]
        assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))


def test_blur_and_solarize_probabilities(monkeypatch):
    radii, solarized = [], []
    real_blur, real_solarize = ImageFilter.GaussianBlur, ImageOps.solarize

    def blur(radius):
        radii.append(radius)
        return real_blur(radius)

    def solarize(img, threshold=128):
        solarized.append(threshold)
        return real_solarize(img, threshold)

    monkeypatch.setattr(lightly_blur.ImageFilter, "GaussianBlur", blur)
    monkeypatch.setattr(lightly_solarize.ImageOps, "solarize", solarize)
    np.random.seed(0)
    random.seed(0)
    torch.manual_seed(0)
    mc = MultiCropTransform(16, 8, n_global=1, n_local=0)
    img = noise_image(20, 20)

    def counts(view, n):
        radii.clear()
        solarized.clear()
        for _ in range(n):
            view(img)
        return len(radii), len(solarized)

    n_blur, n_sol = counts(mc, 60)  # n_global=1: only the first recipe
    assert (n_blur, n_sol) == (60, 0)
    assert all(0.1 <= r <= 2.0 for r in radii) and max(radii) > 1.0 and min(radii) < 1.0
    n_blur, n_sol = counts(mc.global2, 400)  # blur p 0.1, solarize p 0.2 at threshold 128
    assert 20 <= n_blur <= 65 and 50 <= n_sol <= 110 and set(solarized) == {128}
    n_blur, n_sol = counts(mc.local, 400)  # blur p 0.5
    assert 160 <= n_blur <= 240 and n_sol == 0

    small = MultiCropTransform(16, 8, n_global=1, n_local=0, blur_sigma=(0.05, 0.3))  # CPU recipes on tiny crops
    counts(small, 60)
    assert all(0.05 <= r <= 0.3 for r in radii) and len(radii) == 60


def test_blur_scaled_with_the_crop_sizes():
    from sslpipe.config import CropsConfig
    from sslpipe.data.views import GaussianBlur
    from sslpipe.recipes.multicrop import multicrop_from_config

    def sigmas(compose):
        return next(t.sigmas for t in compose.transforms if isinstance(t, GaussianBlur))

    ref = dict(backend="torchvision")
    published = multicrop_from_config(CropsConfig(global_size=32, local_size=16, **ref))
    assert sigmas(published.global1) == sigmas(published.local) == (0.1, 2.0)
    scaled = multicrop_from_config(CropsConfig(global_size=32, local_size=16, blur_scale_with_size=True, **ref))
    assert sigmas(scaled.global1) == pytest.approx((0.1 * 32 / 224, 2.0 * 32 / 224))
    assert sigmas(scaled.global2) == pytest.approx((0.1 * 32 / 224, 2.0 * 32 / 224))
    assert sigmas(scaled.local) == pytest.approx((0.1 * 16 / 96, 2.0 * 16 / 96))
    at_224 = multicrop_from_config(CropsConfig(blur_scale_with_size=True, **ref))  # the published sizes: unchanged
    assert sigmas(at_224.global1) == pytest.approx((0.1, 2.0)) and sigmas(at_224.local) == pytest.approx((0.1, 2.0))
    fast = multicrop_from_config(CropsConfig(global_size=32, local_size=16, blur_scale_with_size=True))
    assert fast.global2.blur_sigma == pytest.approx((0.1 * 32 / 224, 2.0 * 32 / 224))
    assert fast.local.blur_sigma == pytest.approx((0.1 * 16 / 96, 2.0 * 16 / 96))


def test_crop_order_uses_recipes():
    mc = MultiCropTransform(8, 4, n_global=3, n_local=2)
    mc.global1 = lambda img: torch.tensor(1)
    mc.global2 = lambda img: torch.tensor(2)
    mc.local = lambda img: torch.tensor(3)
    assert [int(c) for c in mc(noise_image(8, 8))] == [1, 2, 2, 3, 3]


def test_eval_transform_matches_pil_reference():
    img = noise_image(300, 400)  # h=300, w=400 -> short side 256: 256 x 341, centre crop 224
    out = EvalTransform(256, 224)(img)
    ref = img.resize((341, 256), Image.BICUBIC)
    left, top = round((341 - 224) / 2), round((256 - 224) / 2)
    ref = np.asarray(ref.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255
    ref = (torch.from_numpy(ref).permute(2, 0, 1) - MEAN) / STD
    torch.testing.assert_close(out, ref)


def blocks_image(block=16, n=8, seed=0):
    """Flat colour blocks; the label of a pixel is R // 32 (R in {16, 48, ..., 240})."""
    rs = np.random.RandomState(seed)
    k = rs.randint(0, 8, (n, n))
    r = np.kron(32 * k + 16, np.ones((block, block), dtype=np.int64)).astype(np.uint8)
    g = rs.randint(0, 256, (n, n)).astype(np.uint8).repeat(block, 0).repeat(block, 1)
    rgb = np.stack([r, g, np.full_like(r, 100)], -1)
    return Image.fromarray(rgb), Image.fromarray((r // 32).astype(np.uint8), "L")


def label_of(image):
    red = torch.round((image[0] * STD[0, 0, 0] + MEAN[0, 0, 0]) * 255)
    return (red // 32).long()


def test_collate_crop_major_order():
    B, n_global, n_local = 3, 2, 3
    samples = []
    for b in range(B):
        crops = [torch.full((1, 4, 4), 100.0 * b + c) for c in range(n_global)]
        crops += [torch.full((1, 2, 2), 100.0 * b + c) for c in range(n_global, n_global + n_local)]
        masks = []
        for c in range(n_global):
            m = np.zeros((3, 2), dtype=bool)
            m[b, c] = True
            masks.append(m)
        samples.append({"crops": crops, "masks": masks, "label": 10 + b})
    out = collate_multicrop(samples)
    assert out["global_crops"].shape == (n_global * B, 1, 4, 4)
    assert out["local_crops"].shape == (n_local * B, 1, 2, 2)
    assert out["masks"].shape == (n_global * B, 3, 2) and out["masks"].dtype == torch.bool
    for c in range(n_global):
        for b in range(B):
            assert out["global_crops"][c * B + b].eq(100 * b + c).all()
            assert out["masks"][c * B + b].nonzero().tolist() == [[b, c]]
    # the masked positions in the flattened (n_global*B*6) patches, by hand: crop c*B+b has patch b*2+c masked,
    # the only one of its crop (weight 1)
    assert out["mask_indices"].tolist() == [(c * B + b) * 6 + b * 2 + c for c in range(n_global) for b in range(B)]
    assert out["masks_weight"].tolist() == [1.0] * (n_global * B)
    for c in range(n_local):
        for b in range(B):
            assert out["local_crops"][c * B + b].eq(100 * b + n_global + c).all()
    assert out["labels"].tolist() == [10, 11, 12] and out["labels"].dtype == torch.long


def test_multicrop_sample_end_to_end():
    random.seed(0)
    torch.manual_seed(0)
    sample_fn = MultiCropSample(MultiCropTransform(32, 16, 2, 4), MaskGenerator(grid=(8, 8), min_num_patches=None))
    raws = [{"key": f"k{i}", "image": noise_image(28, 28, seed=i), "label": i} for i in range(5)]
    samples = [sample_fn(r) for r in raws]
    assert all(len(s["crops"]) == 6 and len(s["masks"]) == 2 for s in samples)
    out = collate_multicrop(samples)
    assert out["global_crops"].shape == (10, 3, 32, 32) and out["local_crops"].shape == (20, 3, 16, 16)
    assert out["masks"].shape == (10, 8, 8) and out["labels"].tolist() == list(range(5))
    # no mask generator, no locals, global and local of one size: n_global comes from the sample
    plain = MultiCropSample(MultiCropTransform(16, 16, 2, 2))
    out = collate_multicrop([plain(r) for r in raws[:2]])
    assert out["masks"] is None and out["global_crops"].shape == (4, 3, 16, 16) and out["local_crops"].shape[0] == 4
    out = collate_multicrop([MultiCropSample(MultiCropTransform(16, 8, 2, 0))(raws[0])])
    assert out["local_crops"] is None
    with pytest.raises(ValueError, match="mask grid"):
        MultiCropSample(MultiCropTransform(32, 16), MaskGenerator(grid=(5, 5)))


def _sslpipe_imports(relative: str) -> set[str]:
    """The sslpipe modules a source file imports (inside functions too)."""
    import ast
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "sslpipe" / relative
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sslpipe"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sslpipe")}
    return found


def test_crop_modules_and_multicrop_recipe_import_only_downward():
    """The crop backends build on each other in one direction (crop_params <- views, fast_views <- device_views),
    the factory sits above them, and the multi-crop recipe reaches nothing in the engine (the stage above it)."""
    assert _sslpipe_imports("data/crop_params.py") == set()
    assert _sslpipe_imports("data/views.py") == {"sslpipe.data.crop_params"}
    assert _sslpipe_imports("data/fast_views.py") == {"sslpipe.data.crop_params"}
    assert _sslpipe_imports("data/device_views.py") == {"sslpipe.data.crop_params", "sslpipe.data.fast_views"}
    recipe = _sslpipe_imports("recipes/multicrop.py")
    assert {"sslpipe.data.views", "sslpipe.data.fast_views", "sslpipe.data.device_views"} <= recipe
    assert not any(m.startswith(("sslpipe.engine", "sslpipe.cli", "sslpipe.bench")) for m in recipe), recipe
    assert "sslpipe.weights.state_dict" in _sslpipe_imports("weights/state_io.py")
