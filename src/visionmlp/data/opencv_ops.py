"""timm's auto-augment geometry and sharpness ops with OpenCV's image kernels in place of PIL's.

RandAugment, AutoAugment and AugMix draw their ops and magnitudes in timm (:mod:`timm.data.auto_augment`); only the
pixel work of the slowest ops changes here. PIL's affine resampling and its 3x3 smoothing filter run one pixel at a
time; OpenCV's ``warpAffine`` and ``filter2D`` are vectorised. Each function below takes and returns a PIL image with
timm's signature, draws the same random numbers (the interpolation choice), and computes:

* the geometric ops (rotate, shear, translate): the same inverse mapping as PIL's ``Image.transform`` (PIL maps output
  pixel centres, so the matrix is shifted by half a pixel for OpenCV's corner-free convention) with the same fill.
  Nearest-neighbour sampling gives PIL's pixels; bilinear differs in rounding (OpenCV samples at 1/32 pixel and
  rounds, PIL truncates) and along the fill border, which OpenCV blends; bicubic uses OpenCV's cubic (a = -0.75),
  PIL's transform another (a = -1).
* sharpness: PIL's ``ImageFilter.SMOOTH`` (border pixels kept) blended as ``ImageEnhance`` does; equal to PIL's.

``tests/test_tensor_pipeline.py`` bounds each difference; ``docs/performance.md`` has the speeds.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import cv2
import numpy as np
from PIL import Image
from timm.data import auto_augment

__all__ = ["augment_ops", "swap_augment_functions", "with_opencv_ops"]

# These ops run on small images in data-loader workers, one process a core: OpenCV's thread pool would only
# oversubscribe the cores, and a worker forked after the pool has started deadlocks if it tries to resize the pool.
# So, as albumentations does, OpenCV runs single-threaded in a process that imports this module.
cv2.setNumThreads(0)

CV_INTERPOLATION = {Image.NEAREST: cv2.INTER_NEAREST, Image.BILINEAR: cv2.INTER_LINEAR, Image.BICUBIC: cv2.INTER_CUBIC}

# PIL's SMOOTH kernel, which ImageEnhance.Sharpness blends with
SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13


def _resample(resample: Any) -> int:
    # timm draws one of a tuple of filters per call (random.choice, as its _interpolation does)
    if isinstance(resample, (list, tuple)):
        resample = random.choice(resample)
    if resample not in CV_INTERPOLATION:
        raise ValueError(f"auto-augment resample filter {resample!r}: OpenCV's ops take nearest, bilinear or bicubic; "
                         "set data.pipeline: pil for other filters")
    return CV_INTERPOLATION[resample]


def affine(img: Image.Image, matrix: tuple[float, ...], fillcolor: Any = None,
           resample: Any = Image.BILINEAR) -> Image.Image:
    """``img.transform(img.size, Image.AFFINE, matrix, resample, fillcolor=fillcolor)`` with OpenCV's warp."""
    flags = _resample(resample)
    a, b, c, d, e, f = matrix
    # PIL samples input point A (x + 1/2, y + 1/2) + t for output pixel (x, y), both measured from pixel corners
    inverse = np.array([[a, b, c + (a + b - 1) / 2], [d, e, f + (d + e - 1) / 2]], dtype=np.float64)
    pixels = np.asarray(img)
    fill = (0,) * len(img.getbands()) if fillcolor is None else fillcolor
    fill = (fill,) if isinstance(fill, (int, float)) else tuple(fill)
    out = cv2.warpAffine(pixels, inverse, (img.width, img.height), flags=flags | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
    return Image.fromarray(out)


def rotate(img: Image.Image, degrees: float, **kwargs: Any) -> Image.Image:
    """timm's ``rotate``: PIL's ``Image.rotate(degrees)`` about the image centre, same size."""
    angle = -math.radians(degrees)
    cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
    cx, cy = img.width / 2.0, img.height / 2.0
    return affine(img, (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy), **kwargs)


def shear_x(img: Image.Image, factor: float, **kwargs: Any) -> Image.Image:
    """timm's ``shear_x``."""
    return affine(img, (1, factor, 0, 0, 1, 0), **kwargs)


def shear_y(img: Image.Image, factor: float, **kwargs: Any) -> Image.Image:
    """timm's ``shear_y``."""
    return affine(img, (1, 0, 0, factor, 1, 0), **kwargs)


def translate_x_abs(img: Image.Image, pixels: float, **kwargs: Any) -> Image.Image:
    """timm's ``translate_x_abs``."""
    return affine(img, (1, 0, pixels, 0, 1, 0), **kwargs)


def translate_y_abs(img: Image.Image, pixels: float, **kwargs: Any) -> Image.Image:
    """timm's ``translate_y_abs``."""
    return affine(img, (1, 0, 0, 0, 1, pixels), **kwargs)


def translate_x_rel(img: Image.Image, pct: float, **kwargs: Any) -> Image.Image:
    """timm's ``translate_x_rel``: a shift by a fraction of the width."""
    return translate_x_abs(img, pct * img.width, **kwargs)


def translate_y_rel(img: Image.Image, pct: float, **kwargs: Any) -> Image.Image:
    """timm's ``translate_y_rel``: a shift by a fraction of the height."""
    return translate_y_abs(img, pct * img.height, **kwargs)


def sharpness(img: Image.Image, factor: float, **_: Any) -> Image.Image:
    """timm's ``sharpness`` (``ImageEnhance.Sharpness(img).enhance(factor)``)."""
    pixels = np.asarray(img)
    smooth = cv2.filter2D(pixels, -1, SMOOTH, borderType=cv2.BORDER_REPLICATE)
    # PIL's 3x3 filter leaves the outermost rows and columns as they were
    smooth[[0, -1]] = pixels[[0, -1]]
    smooth[:, [0, -1]] = pixels[:, [0, -1]]
    blended = smooth.astype(np.float32)
    blended += factor * (pixels.astype(np.float32) - blended)
    return Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))


OPENCV_OPS: dict[Callable[..., Image.Image], Callable[..., Image.Image]] = {
    auto_augment.rotate: rotate,
    auto_augment.shear_x: shear_x,
    auto_augment.shear_y: shear_y,
    auto_augment.translate_x_abs: translate_x_abs,
    auto_augment.translate_y_abs: translate_y_abs,
    auto_augment.translate_x_rel: translate_x_rel,
    auto_augment.translate_y_rel: translate_y_rel,
    auto_augment.sharpness: sharpness,
}


def augment_ops(transform: Any) -> Iterator[auto_augment.AugmentOp]:
    """The ``AugmentOp`` objects of a timm RandAugment, AugMix or AutoAugment policy (none for other transforms)."""
    for op in getattr(transform, "ops", []):  # RandAugment, AugMixAugment
        if isinstance(op, auto_augment.AugmentOp):
            yield op
    for sub_policy in getattr(transform, "policy", []):  # AutoAugment
        yield from (op for op in sub_policy if isinstance(op, auto_augment.AugmentOp))


def swap_augment_functions(transform: Any, functions: Mapping[Callable[..., Any], Callable[..., Any]]) -> Any:
    """``transform`` (a timm auto-augment policy; other transforms pass) with the image function of each op that
    ``functions`` names replaced by its value, in place; timm's own tables stay as they are."""
    for op in augment_ops(transform):
        op.aug_fn = functions.get(op.aug_fn, op.aug_fn)
    return transform


def with_opencv_ops(transform: Any) -> Any:
    """``transform`` with each of its auto-augment ops that has an OpenCV form here switched to it (in place)."""
    return swap_augment_functions(transform, OPENCV_OPS)

