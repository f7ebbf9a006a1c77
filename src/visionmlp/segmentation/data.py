"""Semantic segmentation data: ADE20K, a folder of images and masks, and the built-in shapes set; their transforms.

Every data set yields ``(image, mask)`` as PIL images; the mask holds class indices with 255 for "ignore". The
transforms follow the RaftMLP seed's ADE20K pipeline (mmsegmentation's): resize into a ``scale`` box times a random
ratio, a random crop in which no class covers more than ``cat_max_ratio`` (up to ten draws), a horizontal flip,
photometric distortion, normalisation, padding of the crop (mask padded with 255). Evaluation resizes the image into
the ``scale`` box and keeps the mask at its own size: predictions are resized back and scored on the original pixels.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import tv_tensors

from ..data import SampleError

__all__ = ["ADE20K", "IGNORE_INDEX", "SegmentationFolder", "Shapes", "build_dataset", "EvalTransform",
           "TrainTransform"]

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class PairedFiles(Dataset):
    """Images and masks matched by file stem; ``transform(image, mask)`` applies to both."""

    def __init__(self, images: list[Path], masks: list[Path], classes: list[str],
                 label_map: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.images, self.masks, self.classes = images, masks, classes
        self.label_map = label_map
        self.transform: Callable[[Image.Image, Image.Image], Any] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Any:
        image_path, mask_path = self.images[index], self.masks[index]
        image, labels = _read_image(image_path, "RGB"), np.array(_read_image(mask_path))
        if labels.ndim != 2:
            raise SampleError(f"{mask_path}: a mask must be a single-channel image of class indices")
        if labels.shape != (image.height, image.width):
            # a resize would shift every label off its pixels: the pair is wrong, not merely scaled
            raise SampleError(f"the mask {mask_path} is {labels.shape[1]}x{labels.shape[0]} but its image "
                              f"{image_path} is {image.width}x{image.height} (width x height); a mask must have its "
                              "image's size")
        if self.label_map is not None:
            try:
                labels = self.label_map(labels)
            except ValueError as exc:
                raise SampleError(f"{mask_path}: {exc}") from None
        mask = Image.fromarray(labels.astype(np.uint8))
        return self.transform(image, mask) if self.transform else (image, mask)


def _read_image(path: Path, mode: str | None = None) -> Image.Image:
    """The image file ``path`` decoded (converted to ``mode``), or a SampleError naming it."""
    try:
        with Image.open(path) as f:
            return f.convert(mode) if mode else f.copy()
    except OSError as exc:  # PIL's UnidentifiedImageError, a truncated file
        raise SampleError(f"could not read {path}: {exc}; replace the file, or remove it and the image or mask "
                          "paired with it") from None


def _paired(image_dir: Path, mask_dir: Path, what: str) -> tuple[list[Path], list[Path]]:
    """Image files of ``image_dir`` and the ``.png`` masks of the same stems in ``mask_dir``."""
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what}: expected the folder {folder}")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"{what}: no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    masks = [mask_dir / (p.stem + ".png") for p in images]
    missing = [m.name for m in masks if not m.is_file()]
    if missing:
        raise FileNotFoundError(f"{what}: {len(missing)} image(s) of {image_dir} have no mask in {mask_dir} (e.g. "
                                f"{missing[0]}); each image needs a .png mask of the same name")
    return images, masks


def ADE20K(root: str | Path, split: str, num_classes: int | None = None) -> PairedFiles:
    """ADE20K (SceneParsing) as ``ADEChallengeData2016/{images,annotations}/{training,validation}`` under ``root``.

    Label 0 ("other") is ignored and 1..N become 0..N-1, as mmsegmentation's ``reduce_zero_label``; with
    ``num_classes`` below 150 (an ADE-layout set of one's own) labels above it are an error.
    """
    root = Path(root)
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    part = {"train": "training", "val": "validation"}[split]
    images, masks = _paired(root / "images" / part, root / "annotations" / part, "ADE20K")
    count = num_classes or 150

    def reduce_zero_label(labels: np.ndarray) -> np.ndarray:
        if labels.max(initial=0) > count:
            raise ValueError(f"the mask holds label {int(labels.max())}, above the {count} classes configured; "
                             "set --num-classes to the data set's count")
        return np.where(labels == 0, IGNORE_INDEX, labels.astype(np.int64) - 1)

    return PairedFiles(images, masks, [f"class_{i}" for i in range(count)], reduce_zero_label)


def SegmentationFolder(root: str | Path, split: str, num_classes: int) -> PairedFiles:
    """``root/images/{train,val}/NAME.jpg`` with ``root/masks/{train,val}/NAME.png`` holding indices 0..N-1 (255
    ignored)."""
    root = Path(root)
    images, masks = _paired(root / "images" / split, root / "masks" / split, "segmentation folder")

    def check(labels: np.ndarray) -> np.ndarray:
        valid = labels[labels != IGNORE_INDEX]
        if valid.size and valid.max() >= num_classes:
            raise ValueError(f"the mask holds class {int(valid.max())} but --num-classes is {num_classes} (classes "
                             f"0 .. {num_classes - 1}, 255 ignored); set --num-classes to the data set's count")
        return labels

    return PairedFiles(images, masks, [f"class_{i}" for i in range(num_classes)], check)


class Shapes(Dataset):
    """A deterministic synthetic scene set: discs, squares and triangles of random colours and sizes on a textured
    background; classes background, disc, square, triangle. Image ``i`` of a split is the same on every machine."""

    classes = ["background", "disc", "square", "triangle"]

    def __init__(self, split: str, size: int = 64, length: int | None = None) -> None:
        self.split, self.size = split, size
        self.length = length or (800 if split == "train" else 200)
        self.transform: Callable[[Image.Image, Image.Image], Any] | None = None

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[Image.Image, Image.Image]:
        """Image and mask number ``index``."""
        rng = random.Random(f"{self.split}-{index}")
        size = self.size
        noise = np.random.default_rng(rng.getrandbits(32)).integers(0, 60, (size, size, 1))
        base = np.array([rng.randrange(60, 196) for _ in range(3)])
        image = Image.fromarray(np.clip(base + noise - 30, 0, 255).astype(np.uint8))
        mask = Image.new("L", (size, size), 0)
        draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
        for _ in range(rng.randint(1, 3)):
            label = rng.randint(1, 3)
            radius = rng.uniform(0.12, 0.25) * size
            cx, cy = rng.uniform(radius, size - radius), rng.uniform(radius, size - radius)
            colour = tuple(rng.randrange(256) for _ in range(3))
            if label == 1:
                shape = [cx - radius, cy - radius, cx + radius, cy + radius]
                draw_image.ellipse(shape, fill=colour)
                draw_mask.ellipse(shape, fill=label)
            elif label == 2:
                shape = [cx - radius, cy - radius, cx + radius, cy + radius]
                draw_image.rectangle(shape, fill=colour)
                draw_mask.rectangle(shape, fill=label)
            else:
                angle = rng.uniform(0, 2 * math.pi)
                shape = [(cx + radius * math.cos(angle + k * 2 * math.pi / 3),
                          cy + radius * math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
                draw_image.polygon(shape, fill=colour)
                draw_mask.polygon(shape, fill=label)
        return image, mask

    def __getitem__(self, index: int) -> Any:
        image, mask = self.scene(index)
        return self.transform(image, mask) if self.transform else (image, mask)


def build_dataset(name: str, split: str, path: str | None, num_classes: int | None) -> Dataset:
    """Data set ``name`` (shapes, ade20k, folder), split ``train`` or ``val``."""
    if name == "shapes":
        return Shapes(split)
    if name == "ade20k":
        return ADE20K(path, split, num_classes)
    return SegmentationFolder(path, split, num_classes)


def fit_scale(height: int, width: int, scale: tuple[float, float]) -> tuple[int, int]:
    """The size of an image resized, keeping its aspect, into a box of (longer, shorter) sides ``scale``."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class TrainTransform:
    """The training pipeline on a PIL image and mask: tensors out, the mask as int64 with 255 ignored."""

    def __init__(self, crop_size: tuple[int, int], scale: tuple[int, int], ratio_range: tuple[float, float],
                 cat_max_ratio: float, hflip: float, photometric: bool) -> None:
        self.crop_size, self.scale, self.ratio_range = tuple(crop_size), tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.hflip = cat_max_ratio, hflip
        # SSD's photometric distortion (each change with probability 0.5): mmsegmentation's, with brightness a
        # factor instead of an offset of up to 32 grey levels, and its hue change of up to 18 of 180 steps
        self.photometric = T.RandomPhotometricDistort(brightness=(0.875, 1.125), contrast=(0.5, 1.5),
                                                      saturation=(0.5, 1.5), hue=(-0.1, 0.1)) if photometric else None
        self.normalize = T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)

    def crop_box(self, mask: torch.Tensor) -> tuple[int, int, int, int]:
        """A random crop (top, left, height, width) in which no class covers more than ``cat_max_ratio``."""
        height, width = mask.shape[-2:]
        crop_h, crop_w = min(self.crop_size[0], height), min(self.crop_size[1], width)
        for _ in range(10):
            top, left = random.randint(0, height - crop_h), random.randint(0, width - crop_w)
            labels = mask[..., top:top + crop_h, left:left + crop_w]
            counts = torch.bincount(labels[labels != IGNORE_INDEX].flatten(), minlength=1)
            counts = counts[counts > 0]
            if self.cat_max_ratio >= 1.0 or (len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio):
                break
        return top, left, crop_h, crop_w

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = TF.to_image(image), tv_tensors.Mask(TF.pil_to_tensor(mask).long())
        ratio = random.uniform(*self.ratio_range)
        size = fit_scale(*image.shape[-2:], (self.scale[0] * ratio, self.scale[1] * ratio))
        image = TF.resize(image, list(size), antialias=True)
        mask = TF.resize(mask, list(size), interpolation=T.InterpolationMode.NEAREST)
        top, left, crop_h, crop_w = self.crop_box(mask)
        image, mask = TF.crop(image, top, left, crop_h, crop_w), TF.crop(mask, top, left, crop_h, crop_w)
        if random.random() < self.hflip:
            image, mask = TF.horizontal_flip(image), TF.horizontal_flip(mask)
        if self.photometric is not None:
            image = self.photometric(image)
        image = self.normalize(TF.to_dtype(image, torch.float32, scale=True))
        pad = [0, 0, self.crop_size[1] - crop_w, self.crop_size[0] - crop_h]
        image, mask = TF.pad(image, pad, fill=0), TF.pad(mask, pad, fill=IGNORE_INDEX)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)[0]


class EvalTransform:
    """The evaluation pipeline: the image resized into the ``scale`` box and normalised; the mask as it is."""

    def __init__(self, scale: tuple[int, int]) -> None:
        self.scale = tuple(scale)
        self.normalize = T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)

    def __call__(self, image: Image.Image, mask: Image.Image | None = None) -> Any:
        tensor = TF.to_image(image)
        tensor = TF.resize(tensor, list(fit_scale(*tensor.shape[-2:], self.scale)), antialias=True)
        tensor = self.normalize(TF.to_dtype(tensor, torch.float32, scale=True)).as_subclass(torch.Tensor)
        if mask is None:
            return tensor
        return tensor, TF.pil_to_tensor(mask).long()[0]


def collate_eval(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Evaluation images differ in size: lists, not stacks."""
    return [b[0] for b in batch], [b[1] for b in batch]
