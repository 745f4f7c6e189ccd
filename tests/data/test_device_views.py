"""The device crop path (`crops.backend: device`): workers draw the parameters, the batch is cropped on the device.
Same parameters as the CPU fast path -> the same crops up to rounding; the same masks; a recipe steps with it."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from sslpipe.data.crop_params import P
from sslpipe.data.device_views import DeferredCrops, DeviceMultiCropTransform, augment_batch, device_crops
from sslpipe.data.fast_views import FastMultiCropTransform, as_array, normalize_crops
from sslpipe.recipes import load_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.fixture(scope="module")
def arrays() -> list[np.ndarray]:
    from sslpipe.bench.photos import write_photo_folder

    with tempfile.TemporaryDirectory() as tmp:
        write_photo_folder(tmp, 8, size=(160, 120), seed=3)
        return [as_array(Image.open(p).convert("RGB")) for p in sorted(Path(tmp).rglob("*.jpg"))]


def test_same_parameters_give_the_fast_paths_crops(arrays, device):
    """Every crop of the device path is the CPU fast path's crop to rounding: uint8 vs float resize kernels, and
    OpenCV's 8-bit HSV vs float HSV for the hue."""
    torch.set_num_threads(1)
    fast = FastMultiCropTransform(64, 32, n_global=2, n_local=4)
    torch.manual_seed(0)
    params = torch.stack([fast.sample_params(*a.shape[:2]) for a in arrays])
    views, B = fast.views(), len(arrays)
    groups = augment_batch([torch.from_numpy(a).to(device) for a in arrays], params, [v.size for v in views])
    assert [tuple(g.shape) for g in groups] == [(2 * B, 3, 64, 64), (4 * B, 3, 32, 32)]
    diffs = []
    for k, view in enumerate(views):
        group, index = (groups[0], k) if k < 2 else (groups[1], k - 2)
        for b, array in enumerate(arrays):
            d = (group[index * B + b].cpu() - view.apply(array, params[b, k].tolist()).float()).abs()
            diffs.append(float(d.mean()))
            assert d.mean() < 2.0
            if not params[b, k, P["jitter"]]:  # geometry, grey, blur, solarize only: rounding of the resize
                assert d.max() <= 5
    assert np.mean(diffs) < 0.8
    jittered = params[..., P["jitter"]] > 0
    assert jittered.any() and (~jittered).any() and (params[..., P["sigma"]] > 0).any()


def test_device_crops_normalise_and_split_globals_from_locals(arrays):
    transform = DeviceMultiCropTransform(32, 16, n_global=2, n_local=3)
    out = transform(Image.fromarray(arrays[0]))
    assert isinstance(out, DeferredCrops) and out.image.dtype == torch.uint8 and out.params.shape == (5, 17)
    params = torch.stack([out.params, transform(arrays[1]).params])
    images = [torch.from_numpy(arrays[0]), torch.from_numpy(arrays[1])]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the recipe's autocast must not reach the crop arithmetic
        g, loc = device_crops(images, params, [32, 32, 16, 16, 16], 2, mean, std)
    assert g.dtype == torch.float32 and g.shape == (4, 3, 32, 32) and loc.shape == (6, 3, 16, 16)
    raw = augment_batch(images, params, [32, 32, 16, 16, 16])
    torch.testing.assert_close(g, normalize_crops(raw[0].round().to(torch.uint8), mean, std))


def test_loader_yields_images_and_parameters_with_the_fast_paths_masks(digits_shards, tmp_path):
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    from sslpipe.recipes.ibot import IBOTRecipe

    common = [f"data.train={digits_shards}", "data.batch_size=8", "data.num_workers=0"]
    batches, recipes = {}, {}
    for backend in ("fast", "device"):
        cfg = load_config(RECIPES / "demo_ibot.yaml", [*common, f"crops.backend={backend}"])
        recipe = IBOTRecipe(cfg)
        recipe.build(Accelerator(cpu=True))
        recipes[backend] = recipe
        batches[backend] = next(iter(recipe.train_loader(0, 0, 1)))
    fast, dev = batches["fast"], batches["device"]
    assert dev["global_crops"] is None and len(dev["images"]) == 8 and dev["crop_params"].shape == (8, 6, 17)
    assert torch.equal(fast["masks"], dev["masks"]) and torch.equal(fast["labels"], dev["labels"])
    g_fast, l_fast = recipes["fast"].crops_on_device(fast)
    g_dev, l_dev = recipes["device"].crops_on_device(dev)
    assert g_dev.shape == g_fast.shape and l_dev.shape == l_fast.shape
    # the same draws (one generator, one order) in the workers of both backends: the same crops to rounding
    assert (g_dev - g_fast).abs().mean() < 0.05 and (l_dev - l_fast).abs().mean() < 0.05
    loss, _ = recipes["device"].step(dev, {"teacher_temp": 0.04, "teacher_patch_temp": 0.04, "it": 0})
    assert torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("size, sigma", [(6, 2.0), (32, 0.7), (1, 1.5), (32, 0.2)])
def test_blur_matches_the_fast_path_even_when_the_kernel_is_wider_than_the_crop(size, sigma):

    from sslpipe.data.device_views import _gaussian_blur
    from sslpipe.data.fast_views import pil_blur

    img = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    ref = pil_blur(img, sigma).astype(float)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    got = _gaussian_blur(x, np.array([sigma]))[0].permute(1, 2, 0).numpy()
    assert np.abs(got - ref).max() <= 1.0
    # two crops of other sigmas in one call: each its own kernel, padded to the wider one
    pair = _gaussian_blur(torch.cat([x, x]), np.array([sigma, 2 * sigma]))
    assert torch.equal(pair[0], _gaussian_blur(x, np.array([sigma]))[0])
