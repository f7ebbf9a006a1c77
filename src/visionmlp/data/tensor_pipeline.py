"""The input pipeline on uint8 tensors: timm's own transforms, with the resizing done by torchvision's tensor kernels.

``data.pipeline: tensor`` takes the transform ``timm.data.create_transform`` builds for the recipe (the ``pil``
pipeline the official scripts run) and runs it on a uint8 image tensor held channels-last, where torchvision's
resize has a vectorised kernel that PIL's lacks: the random resized crop (timm's own parameter sampling and
interpolation choice) and the evaluation resize and centre crop run as ``torchvision.transforms.v2`` tensor ops, as do
flips and random crops; the photometric policies (RandAugment, AutoAugment, AugMix, colour jitter) run on a PIL view
of the same pixels, unchanged; the image becomes float for normalisation and random erasing at the end, as before.
The crops and the policies are drawn from the same distributions; the resampled pixels agree with PIL's antialiased
bicubic and bilinear filters to a few levels (``tests/test_tensor_pipeline.py`` compares the two pipelines'
statistics). ``docs/performance.md`` has the measured speeds.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from timm.data.transforms import ToTensor as TimmToTensor
from torchvision import transforms as T
from torchvision.transforms import v2

__all__ = ["tensor_pipeline"]

# steps that take an image tensor as they are (torchvision's geometric transforms and normalisation, timm's erasing)
TENSOR_STEPS = (T.RandomHorizontalFlip, T.RandomVerticalFlip, T.RandomCrop, T.CenterCrop, T.Normalize, RandomErasing)


def pil_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image as a (3, H, W) uint8 tensor laid out channels-last (a view of one HWC copy)."""
    return torch.from_numpy(np.array(image if image.mode == "RGB" else image.convert("RGB"))).permute(2, 0, 1)


def uint8_to_float(image: torch.Tensor) -> torch.Tensor:
    """Pixels 0-255 as floats 0-1 (``ToTensor``'s scale), laid out channels-first: normalisation's per-channel
    broadcast is several times slower over a channels-last image."""
    return image.contiguous().to(torch.float32).div_(255)


class OnPIL:
    """Runs a PIL-only transform (RandAugment, colour jitter ...) on a uint8 image tensor and returns one."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        # channels-last pixels: the HWC view is contiguous, and PIL takes it without a strided copy
        return pil_to_uint8_tensor(self.transform(Image.fromarray(image.permute(1, 2, 0).numpy())))

    def __repr__(self) -> str:
        return f"OnPIL({self.transform!r})"


class TensorRandomResizedCrop:
    """timm's random resized crop (its parameter sampling and interpolation choice) done with torchvision's tensor
    resize, antialiased as PIL's is. Takes the PIL image: only the cropped pixels become a tensor."""

    def __init__(self, crop: RandomResizedCropAndInterpolation) -> None:
        self.crop = crop

    def __call__(self, image: Image.Image) -> torch.Tensor:
        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        pixels = pil_to_uint8_tensor(image.crop((left, top, left + width, top + height)))
        return v2.functional.resize(pixels, list(self.crop.size), interpolation, antialias=True)

    def __repr__(self) -> str:
        return f"TensorRandomResizedCrop({self.crop!r})"


def tensor_step(step: Any) -> Any:
    """The tensor form of one step of a timm transform."""
    if isinstance(step, RandomResizedCropAndInterpolation):
        return TensorRandomResizedCrop(step)
    if isinstance(step, T.Resize):  # v1's tensor resize computes in float; v2's has the uint8 kernels
        return v2.Resize(step.size, step.interpolation, step.max_size, antialias=True)
    if isinstance(step, (MaybeToTensor, TimmToTensor, T.ToTensor)):
        return uint8_to_float
    if isinstance(step, TENSOR_STEPS):
        return step
    return OnPIL(step)


def tensor_pipeline(transform: T.Compose) -> T.Compose:
    """``transform`` (timm's, for PIL images) as the same augmentation on uint8 tensors: PIL image in, the same kind of
    float tensor out."""
    steps = [tensor_step(step) for step in transform.transforms]
    if not isinstance(steps[0], TensorRandomResizedCrop):  # which converts only its crop
        steps.insert(0, pil_to_uint8_tensor)
    return T.Compose(steps)
