"""The input pipeline on uint8 tensors: timm's own transforms, with faster kernels for the pixel work.

``data.pipeline: tensor`` takes the transform ``timm.data.create_transform`` builds for the recipe (the ``pil``
pipeline the official scripts run) and keeps its random draws, in the same order, while replacing the slow kernels:

* decoding: JPEG files are decoded by libjpeg-turbo through ``simplejpeg`` straight into an array (PIL's decoder
  unpacks to four bytes a pixel and copies); the pixels are PIL's (the same library, the same IDCT and upsampling;
  CMYK files, converted to RGB by libjpeg-turbo, within a level).
  Other formats, and JPEGs that need libjpeg's error recovery, go through PIL.
* the random resized crop (timm's parameter sampling and interpolation choice) and the evaluation resize and centre
  crop: torchvision's vectorised uint8 resize on a channels-last image, antialiased as PIL's is;
* RandAugment, AutoAugment, AugMix and colour jitter run on a PIL view of the same pixels, with the geometric ops and
  sharpness on OpenCV's kernels (:mod:`visionmlp.data.opencv_ops`);
* ``ToTensor`` and ``Normalize`` become one pass from uint8 to normalised floats; random erasing is timm's.

The crops and the policies are drawn from the same distributions; the resampled pixels agree with PIL's to a few
levels (``tests/test_tensor_pipeline.py`` compares the two pipelines' statistics). ``docs/performance.md`` has the
measured speeds.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import simplejpeg
import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybePILToTensor, MaybeToTensor, RandomResizedCropAndInterpolation
from timm.data.transforms import ToTensor as TimmToTensor
from torchvision import transforms as T
from torchvision.transforms import v2

from .datasets import decode_pil
from .opencv_ops import with_opencv_ops

__all__ = ["TensorPipeline", "decode_to_tensor", "tensor_pipeline"]

# steps that take an image tensor as they are (torchvision's geometric transforms, timm's erasing)
TENSOR_STEPS = (T.RandomHorizontalFlip, T.RandomVerticalFlip, T.RandomCrop, T.CenterCrop, RandomErasing)
TO_TENSOR = (MaybeToTensor, TimmToTensor, T.ToTensor)


def hwc_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """An (H, W, 3) uint8 array as a (3, H, W) tensor laid out channels-last (a view)."""
    return torch.from_numpy(pixels).permute(2, 0, 1)


def pil_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as a (3, H, W) uint8 tensor laid out channels-last (a view of one HWC copy)."""
    return hwc_to_tensor(np.array(image if image.mode == "RGB" else image.convert("RGB")))


def decode_to_tensor(data: bytes) -> torch.Tensor:
    """An encoded image file as a (3, H, W) uint8 RGB tensor laid out channels-last; raises what PIL raises for a file
    it cannot read."""
    try:
        return hwc_to_tensor(simplejpeg.decode_jpeg(data, colorspace="RGB"))
    except ValueError:  # not a JPEG, or one that only libjpeg's error recovery reads (as PIL does)
        return pil_to_uint8_tensor(decode_pil(data))


def as_uint8_tensor(image: torch.Tensor | Image.Image) -> torch.Tensor:
    """The image as a uint8 tensor; tensors (from :func:`decode_to_tensor`) pass through."""
    return image if isinstance(image, torch.Tensor) else pil_to_uint8_tensor(image)


def resize_uint8(pixels: torch.Tensor, size: int | list[int], interpolation: Any,
                 max_size: int | None = None) -> torch.Tensor:
    """torchvision's antialiased resize (``size`` as ``transforms.Resize`` takes it) of a (3, H, W) uint8 image,
    returned channels-last: its uint8 kernel reads and writes channels-last fastest, and PIL views of the result need
    no strided copy."""
    batch = pixels.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    size = list(size) if isinstance(size, (list, tuple)) else [size]
    return v2.functional.resize(batch, size, interpolation, max_size=max_size, antialias=True)[0]


class OnPIL:
    """Runs a PIL-only transform (RandAugment, colour jitter ...) on a uint8 image tensor and returns one."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        pixels = image.permute(1, 2, 0)  # contiguous when the image is channels-last: PIL copies it in one pass
        return pil_to_uint8_tensor(self.transform(Image.fromarray(pixels.contiguous().numpy())))

    def __repr__(self) -> str:
        return f"OnPIL({self.transform!r})"


class TensorRandomResizedCrop:
    """timm's random resized crop (its parameter sampling and interpolation choice) done with torchvision's tensor
    resize, antialiased as PIL's is."""

    def __init__(self, crop: RandomResizedCropAndInterpolation) -> None:
        self.crop = crop

    def __call__(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        pixels = as_uint8_tensor(image)
        top, left, height, width = self.crop.get_params(pixels, self.crop.scale, self.crop.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        return resize_uint8(pixels[:, top:top + height, left:left + width], list(self.crop.size), interpolation)

    def __repr__(self) -> str:
        return f"TensorRandomResizedCrop({self.crop!r})"


class TensorResize:
    """``transforms.Resize`` (the evaluation resize) on a uint8 tensor."""

    def __init__(self, resize: T.Resize) -> None:
        self.resize = resize

    def __call__(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        return resize_uint8(as_uint8_tensor(image), self.resize.size, self.resize.interpolation, self.resize.max_size)

    def __repr__(self) -> str:
        return f"TensorResize({self.resize!r})"


class NormalizeUint8:
    """``ToTensor`` then ``Normalize`` in one pass: uint8 pixels to ``(x / 255 - mean) / std``, channels-first; an
    image in a worker, or a batch of them on ``device`` (``data.normalize_on: device``), with the same arithmetic."""

    def __init__(self, normalize: T.Normalize, device: torch.device | str = "cpu") -> None:
        std = torch.as_tensor(normalize.std, dtype=torch.float32).view(-1, 1, 1)
        self.scale = (1 / (255 * std)).to(device)
        self.shift = (-torch.as_tensor(normalize.mean, dtype=torch.float32).view(-1, 1, 1) / std).to(device)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8:
            raise TypeError(f"expected uint8 pixels, got {image.dtype}: were these images normalised already?")
        out = torch.empty(image.shape, dtype=torch.float32, device=image.device)
        out.copy_(image)
        return out.mul_(self.scale).add_(self.shift)

    def __repr__(self) -> str:
        return f"NormalizeUint8(scale={self.scale.flatten().tolist()}, shift={self.shift.flatten().tolist()})"


def contiguous_uint8(image: torch.Tensor | Image.Image) -> torch.Tensor:
    """The image as a contiguous (3, H, W) uint8 tensor, what workers hand over for normalisation on the device
    (timm's ``MaybePILToTensor``): a batch of them collates with plain copies."""
    return as_uint8_tensor(image).contiguous()


def uint8_to_float(image: torch.Tensor) -> torch.Tensor:
    """Pixels 0-255 as floats 0-1 (``ToTensor``'s scale), channels-first."""
    return image.contiguous().to(torch.float32).div_(255)


class TensorPipeline(T.Compose):
    """The tensor form of a timm transform; ``decode`` is the decoder data sets of encoded files should use."""

    decode = staticmethod(decode_to_tensor)


def tensor_steps(steps: list[Any]) -> list[Any]:
    """The tensor form of each step of a timm transform, ``ToTensor`` and the ``Normalize`` after it as one."""
    out: list[Any] = []
    i = 0
    while i < len(steps):
        step = steps[i]
        if isinstance(step, TO_TENSOR) and i + 1 < len(steps) and isinstance(steps[i + 1], T.Normalize):
            out.append(NormalizeUint8(steps[i + 1]))
            i += 1
        elif isinstance(step, TO_TENSOR):
            out.append(uint8_to_float)
        elif isinstance(step, MaybePILToTensor):
            out.append(contiguous_uint8)
        elif isinstance(step, RandomResizedCropAndInterpolation):
            out.append(TensorRandomResizedCrop(step))
        elif isinstance(step, T.Resize):
            out.append(TensorResize(step))
        elif isinstance(step, TENSOR_STEPS):
            out.append(step)
        else:
            out.append(OnPIL(with_opencv_ops(step)))
        i += 1
    return out


def tensor_pipeline(transform: T.Compose) -> TensorPipeline:
    """``transform`` (timm's, for PIL images) as the same augmentation on uint8 tensors: a PIL image or a uint8 tensor
    from :func:`decode_to_tensor` in, the same kind of float tensor out."""
    steps = tensor_steps(list(transform.transforms))
    if not isinstance(steps[0], (TensorRandomResizedCrop, TensorResize)):  # which take either
        steps.insert(0, as_uint8_tensor)
    return TensorPipeline(steps)
