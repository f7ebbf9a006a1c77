"""An ImageNet-like JPEG set for measuring input pipelines: ImageNet's layout, sizes and encoding, generated content.

What decides a loader's speed is each file's pixel count and JPEG entropy, not what it shows. Sizes follow
ImageNet's training set: most images 500 pixels on the longer side, the shorter side mostly 375 or 333 (4:3 and 3:2,
either orientation), with a minority square, smaller or larger; JPEG quality 90. The content is smooth colour fields
with edges and fine grain, which encode to about 100 KB an image (ImageNet: 110 KB). Both layouts ``visionmlp``
reads are written: ``train/`` and ``val/`` folders of class sub-folders, and with ``zipped`` also Swin's
``train.zip``, ``val.zip``, ``train_map.txt`` and ``val_map.txt`` (``--zip``).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["write_imagenet_like"]

# (longer side, shorter side / longer side, share of images)
SIZE_MIX = ((500, 0.75, 0.55), (500, 0.666, 0.2), (500, 1.0, 0.08), (400, 0.75, 0.07), (800, 0.75, 0.05),
            (1024, 0.68, 0.05))
PORTRAIT_SHARE = 0.2
QUALITY = 90


def _image(rng: np.random.Generator) -> Image.Image:
    """One picture: a blurred colour field with a few shapes, and fine grain."""
    longer, ratio, _ = SIZE_MIX[rng.choice(len(SIZE_MIX), p=[share for *_, share in SIZE_MIX])]
    width, height = longer, int(round(longer * ratio))
    if rng.random() < PORTRAIT_SHARE:
        width, height = height, width
    field = rng.integers(0, 256, (height // 12 + 2, width // 12 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.BICUBIC)
    shapes = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8) // 2 + 64)
    mask = Image.new("L", (width, height))
    draw = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        x1, y1 = x0 + int(rng.integers(8, width // 2)), y0 + int(rng.integers(8, height // 2))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=255)
    image = Image.composite(shapes.filter(ImageFilter.GaussianBlur(3)), image, mask)
    grain = rng.normal(0, 10, (height, width, 3))
    return Image.fromarray((np.asarray(image, dtype=np.float32) + grain).clip(0, 255).astype(np.uint8))


def write_imagenet_like(root: str | os.PathLike, train_images: int, val_images: int, classes: int = 10,
                        zipped: bool = False, seed: int = 0) -> Path:
    """Write the set under ``root`` (``train/`` and ``val/``, and the zipped layout with ``zipped``); ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_images), ("val", val_images)):
        lines = []
        for i in range(count):
            name = f"n{i % classes:08d}/{split}_{i:08d}.JPEG"
            (root / split / name).parent.mkdir(parents=True, exist_ok=True)  # a small split has fewer classes
            _image(rng).save(root / split / name, quality=QUALITY)
            lines.append(f"{name}\t{i % classes}\n")
        if zipped:  # stored, not deflated: JPEGs do not compress, and the official zip sets are stored
            with zipfile.ZipFile(root / f"{split}.zip", "w", zipfile.ZIP_STORED) as archive:
                for line in lines:
                    archive.write(root / split / line.split("\t")[0], line.split("\t")[0])
            (root / f"{split}_map.txt").write_text("".join(lines))
    return root
