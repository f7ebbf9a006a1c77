"""``visionmlp detect predict``: a detector's boxes, classes, scores and masks on images, drawn with torchvision."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

# one colour per class, distinct for the first ten (matplotlib's tab10)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def drawing_paths(stems: Sequence[str], output: Path, tag: str, inputs: Sequence[str | Path] = ()) -> list[Path]:
    """A PNG in ``output`` per stem, ``<stem>_<tag>.png``, numbered ``<stem>_<tag>-2.png`` and on where a name would
    repeat or be one of the ``inputs``: no drawing overwrites another, nor an image it was drawn from."""
    taken = {Path(path).resolve() for path in inputs}
    paths = []
    for stem in stems:
        target, count = output / f"{stem}_{tag}.png", 1
        while target.resolve() in taken:
            count += 1
            target = output / f"{stem}_{tag}-{count}.png"
        taken.add(target.resolve())
        paths.append(target)
    return paths


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as a 3xHxW uint8 RGB tensor, or a ValueError naming the file."""
    from torchvision.io import ImageReadMode, decode_image

    if not Path(path).is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        raise ValueError(f"could not read image {str(path)!r}: {exc}") from None


@torch.no_grad()
def predict_image(model: nn.Module, image: torch.Tensor, classes: Sequence[str], score_thresh: float,
                  device: torch.device) -> list[dict[str, Any]]:
    """The detections of ``image`` (uint8 3xHxW) scoring at least ``score_thresh``, best first: label (class name),
    score, box (XYXY in the image's pixels) and, for Mask R-CNN, a boolean mask."""
    output = model([image.to(device, torch.float32) / 255])[0]
    keep = output["scores"] >= score_thresh
    detections = []
    for i in keep.nonzero().flatten().tolist():
        detection = {"label": classes[int(output["labels"][i]) - 1], "score": float(output["scores"][i]),
                     "box": [float(v) for v in output["boxes"][i]]}
        if "masks" in output:
            detection["mask"] = output["masks"][i, 0].cpu() > 0.5
        detections.append(detection)
    return detections


def draw_detections(image: torch.Tensor, detections: Sequence[dict[str, Any]], classes: Sequence[str]) -> Image.Image:
    """``image`` with each detection's mask (half transparent), box and ``label score`` drawn on it."""
    colours = [PALETTE[list(classes).index(d["label"]) % len(PALETTE)] for d in detections]
    if detections and "mask" in detections[0]:
        image = draw_segmentation_masks(image, torch.stack([d["mask"] for d in detections]), alpha=0.45,
                                        colors=colours)
    if detections:
        boxes = torch.tensor([d["box"] for d in detections])
        image = draw_bounding_boxes(image, boxes, labels=[f"{d['label']} {d['score']:.2f}" for d in detections],
                                    colors=colours, width=2)
    return Image.fromarray(image.permute(1, 2, 0).numpy())
