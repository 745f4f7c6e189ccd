"""Image views: iBOT/DINO multi-crop, the kNN evaluation transform, joint image + label segmentation augmentation.

Built from torchvision ``transforms.v2`` (crops, flips, colour jitter, grayscale, resize, normalisation, joint
image/mask geometry through ``tv_tensors``) and lightly's ``GaussianBlur`` / ``RandomSolarization``, which match the
official iBOT/DINO ``utils.GaussianBlur`` (PIL ``ImageFilter.GaussianBlur(radius=sigma)``, sigma ~ U[0.1, 2]) and
``utils.Solarization`` (PIL ``ImageOps.solarize``, threshold 128). lightly's ``DINOTransform`` is not used: it is fixed
at exactly two global crops, and it forgets ``cj_strength`` for the second global view.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision.transforms.v2 as T
from lightly.transforms.gaussian_blur import GaussianBlur
from lightly.transforms.solarize import RandomSolarization
from PIL import Image
from torch import Tensor

from sslpipe.data.crop_params import BLUR_SIGMAS

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _to_rgb(image: Image.Image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(mean), std=list(std))]


def crop_view(
    size: int,
    scale: tuple[float, float],
    blur_p: float,
    solarize_p: float,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    blur_sigma: tuple[float, float] = BLUR_SIGMAS,
) -> T.Compose:
    """One iBOT crop recipe (main_ibot.py DataAugmentationiBOT): RandomResizedCrop (bicubic), hflip 0.5,
    ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2, Gaussian blur p=blur_p, solarize p=solarize_p,
    normalise. Blur and solarize draw from numpy's global RNG (lightly), the official code from ``random``: same
    distribution, both seeded per worker by the stream."""
    steps = [
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        GaussianBlur(prob=blur_p, sigmas=blur_sigma),
    ]
    if solarize_p > 0:
        steps.append(RandomSolarization(prob=solarize_p, threshold=128))
    return T.Compose(steps + _to_normalised_tensor(mean, std))


class MultiCropTransform:
    """iBOT/DINO multi-crop (docs/methods.md §1): crop 1 global with blur p=1; every further global crop blur p=0.1 +
    solarize p=0.2; local crops blur p=0.5. Any image size works (RandomResizedCrop upsamples small images).

    ``blur_sigma`` is the published U[0.1, 2] in pixels of the output crop, tuned for 224/96 px crops;
    ``local_blur_sigma`` (default: the same) sets the local crops' range, so that a small CPU recipe can scale each
    with its crop size (``crops.blur_scale_with_size``)."""

    def __init__(
        self,
        global_size: int,
        local_size: int,
        n_global: int = 2,
        n_local: int = 10,
        global_scale: tuple[float, float] = (0.25, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.25),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        blur_sigma: tuple[float, float] = BLUR_SIGMAS,
        local_blur_sigma: tuple[float, float] | None = None,
    ) -> None:
        if n_global < 1 or n_local < 0:
            raise ValueError(f"MultiCropTransform: need n_global >= 1 and n_local >= 0, got {n_global}, {n_local}")
        self.n_global, self.n_local = n_global, n_local
        self.global_size, self.local_size = global_size, local_size
        self.global1 = crop_view(global_size, global_scale, 1.0, 0.0, mean, std, blur_sigma)
        self.global2 = crop_view(global_size, global_scale, 0.1, 0.2, mean, std, blur_sigma)
        self.local = crop_view(local_size, local_scale, 0.5, 0.0, mean, std, local_blur_sigma or blur_sigma)

    def __call__(self, image: Image.Image) -> list[Tensor]:
        """Globals first (crop 1 recipe, then the second recipe), then locals."""
        image = _to_rgb(image)
        crops = [self.global1(image)]
        crops += [self.global2(image) for _ in range(self.n_global - 1)]
        crops += [self.local(image) for _ in range(self.n_local)]
        return crops


class EvalTransform:
    """kNN / linear evaluation view (dino eval_knn.py): Resize short side to ``resize`` (bicubic), CenterCrop ``crop``,
    normalise."""

    def __init__(
        self,
        resize: int = 256,
        crop: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.transform = T.Compose(
            [T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(crop)]
            + _to_normalised_tensor(mean, std)
        )

    def __call__(self, image: Image.Image) -> Tensor:
        return self.transform(_to_rgb(image))
