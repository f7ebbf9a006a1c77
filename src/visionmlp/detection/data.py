"""Detection data: COCO instances (torchvision's ``CocoDetection`` read with pycocotools) and built-in synthetic scenes.

Both give ``(image, target)`` pairs in torchvision's detection format: a float image in [0, 1] (``tv_tensors.Image``)
and ``{"boxes": XYXY BoundingBoxes, "labels": int64 1..K, "masks": Mask (N, H, W), "image_id": int}``; label ``k``
is class ``classes[k - 1]``, COCO category ``category_ids[k - 1]`` (0 is the R-CNNs' background). Resizing and
normalisation are the detector's own (``GeneralizedRCNNTransform``), so the data transforms only flip and convert.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..data import DataError, SampleError
from ..data.loader import EvalShardSampler

SHAPES = ("circle", "square", "triangle")

Sample = tuple[torch.Tensor, dict[str, Any]]


def build_transforms(training: bool, hflip: float = 0.5) -> v2.Compose:
    """Flip (training), convert to float in [0, 1], drop boxes left empty (torchvision's detection recipe)."""
    steps: list[Any] = [v2.ToImage()]
    if training and hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes()]
    return v2.Compose(steps)


def spread_indices(length: int, limit: int | None) -> list[int]:
    """``range(length)``, or ``limit`` indices spread evenly over it."""
    if limit is None or limit >= length:
        return list(range(length))
    return np.linspace(0, length - 1, limit).round().astype(int).tolist()


# ---------------------------------------------------------------------------------------------------
# the built-in scenes


class SyntheticScenes(Dataset):
    """Circles, squares and triangles of random colours on textured backgrounds, with boxes and instance masks.

    Scene ``index`` of a split is a function of ``(seed, split, index)`` alone, so the set needs no files and reads
    the same everywhere. Images are 96 to 128 pixels a side and hold one to four shapes 14 to 48 pixels across that
    do not overlap, so every mask is the whole shape.
    """

    classes = SHAPES
    category_ids = tuple(range(1, len(SHAPES) + 1))

    def __init__(self, split: str, num_images: int, seed: int = 0, transforms: Any = None,
                 limit: int | None = None) -> None:
        self.split_key = {"train": 0, "val": 1}[split]
        self.seed, self.transforms = seed, transforms
        self.ids = spread_indices(num_images, limit)
        self._coco = None

    def __len__(self) -> int:
        return len(self.ids)

    def scene(self, image_id: int) -> tuple[np.ndarray, list[int], np.ndarray]:
        """The scene ``image_id``: an HxWx3 uint8 image, the shapes' labels and their (N, H, W) uint8 masks."""
        from PIL import Image, ImageDraw

        rng = np.random.default_rng([self.seed, self.split_key, image_id])
        height, width = (int(s) for s in rng.integers(96, 129, size=2))
        image, background = self._background(rng, height, width)
        labels, masks, boxes = [], [], []
        for _ in range(int(rng.integers(1, 5))):
            for _attempt in range(20):  # rejection sampling of a place that overlaps no shape drawn so far
                side = int(rng.integers(14, 49))
                x0, y0 = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
                box = (x0 - 2, y0 - 2, x0 + side + 2, y0 + side + 2)
                if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
                    break
            else:
                continue
            label = int(rng.integers(1, len(SHAPES) + 1))
            canvas = Image.new("L", (width, height))
            draw = ImageDraw.Draw(canvas)
            corners = [x0, y0, x0 + side - 1, y0 + side - 1]
            if SHAPES[label - 1] == "circle":
                draw.ellipse(corners, fill=1)
            elif SHAPES[label - 1] == "square":
                draw.rectangle(corners, fill=1)
            elif rng.random() < 0.5:  # a triangle pointing up or down
                draw.polygon([(x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1), (x0 + (side - 1) / 2, y0)], fill=1)
            else:
                draw.polygon([(x0, y0), (x0 + side - 1, y0), (x0 + (side - 1) / 2, y0 + side - 1)], fill=1)
            mask = np.asarray(canvas, dtype=np.uint8)
            colour = rng.integers(0, 256, size=3)
            while np.abs(background - colour).sum(axis=1).min() < 120:  # a colour that stands out of both
                colour = rng.integers(0, 256, size=3)
            image[mask.astype(bool)] = colour
            labels.append(label)
            masks.append(mask)
            boxes.append(box)
        return image, labels, np.stack(masks) if masks else np.zeros((0, height, width), np.uint8)

    @staticmethod
    def _background(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Two random muted colours blended along random stripes, with pixel noise: texture the shapes must stand out
        of; returns the image and the two colours."""
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        angle, period = rng.uniform(0, math.pi), rng.uniform(6, 40)
        blend = 0.5 + 0.5 * np.sin((x * math.cos(angle) + y * math.sin(angle)) * 2 * math.pi / period)
        colours = rng.integers(40, 216, size=(2, 3)).astype(np.float32)
        image = colours[0] + blend[..., None] * (colours[1] - colours[0]) + rng.normal(0, 12, size=(height, width, 3))
        return image.clip(0, 255).astype(np.uint8), colours

    def __getitem__(self, index: int) -> Sample:
        image_id = self.ids[index]
        image, labels, masks = self.scene(image_id)
        masks_tensor = torch.from_numpy(masks)
        canvas = tuple(image.shape[:2])
        target = {
            "boxes": tv_tensors.BoundingBoxes(masks_to_boxes(masks_tensor), format="XYXY", canvas_size=canvas),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": tv_tensors.Mask(masks_tensor),
            "image_id": image_id,
        }
        image_tensor = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        return self.transforms(image_tensor, target) if self.transforms else (image_tensor, target)

    @property
    def coco(self) -> Any:
        """The scenes' ground truth as a pycocotools ``COCO`` object, for the COCO evaluation."""
        if self._coco is None:
            from .coco_eval import coco_ground_truth

            scenes = []
            for image_id in self.ids:
                image, labels, masks = self.scene(image_id)
                scenes.append((image_id, image.shape[0], image.shape[1], labels, masks))
            self._coco = coco_ground_truth(scenes, self.classes)
        return self._coco


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """XYXY boxes around binary masks, in the COCO convention (``x1 + w`` past the last pixel)."""
    from torchvision.ops import masks_to_boxes as tight_boxes

    if masks.shape[0] == 0:
        return torch.zeros((0, 4))
    boxes = tight_boxes(masks)
    boxes[:, 2:] += 1  # torchvision's boxes end on the last pixel; COCO's (and the masks' area) past it
    return boxes


# ---------------------------------------------------------------------------------------------------
# COCO


def check_coco_annotations(dataset: dict[str, Any], path: Path, with_segmentation: bool) -> None:
    """A DataError naming ``path`` and the entry for what would fail mid-epoch: a missing top-level key, an
    annotation of an unknown category, a bbox that is not four numbers, or no segmentation where masks are needed."""
    missing = [key for key in ("images", "annotations", "categories") if key not in dataset]
    if missing:
        raise DataError(f"{path} has no {' or '.join(map(repr, missing))} key: a COCO instances file holds images, "
                        "annotations and categories")
    categories = {category["id"] for category in dataset["categories"]}
    for annotation in dataset["annotations"]:
        where = f"{path}: annotation {annotation.get('id')!r} (image {annotation.get('image_id')!r})"
        category = annotation.get("category_id")
        if category not in categories:
            raise DataError(f"{where} has category_id {category!r}, which is not among the categories' ids "
                            f"({', '.join(map(str, sorted(categories)))}); add the category or fix the id")
        box = annotation.get("bbox")
        if not (isinstance(box, list) and len(box) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise DataError(f"{where} has bbox {box!r}: a COCO bbox is a list of four numbers [x, y, width, height]")
        if with_segmentation and "segmentation" not in annotation:
            raise DataError(f"{where} has no 'segmentation' (polygons or RLE), the instance mask Mask R-CNN learns "
                            "and is scored on; use annotations with masks, or a box detector: --detector "
                            "faster_rcnn or --detector retinanet")


class CocoInstances(Dataset):
    """The COCO instances layout the RaftMLP seed reads: ``annotations/instances_{split}2017.json`` and
    ``{split}2017/``; the classes are the annotation file's categories in id order.

    Crowd annotations are left out of the targets (the evaluation still uses them, as the COCO protocol does), and for
    training so are images without any other annotation, as torchvision's and mmdetection's COCO loaders do. The
    annotation file is checked whole when the set is built (see ``check_coco_annotations``), with the masks where the
    targets hold them (``with_masks``) or the evaluation scores them (``masks_scored``).
    """

    def __init__(self, root: str | Path, split: str, transforms: Any = None, with_masks: bool = False,
                 limit: int | None = None, masks_scored: bool = False) -> None:
        from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2

        root = Path(root)
        annotations, images = root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017"
        for path in (annotations, images):
            if not path.exists():
                raise DataError(f"{path} does not exist: --data-path must hold the COCO layout "
                                "annotations/instances_{train,val}2017.json, train2017/ and val2017/")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
                base = CocoDetection(str(images), str(annotations))
        except ValueError as exc:  # json's decoding errors
            raise DataError(f"{annotations} is not valid JSON ({exc}); it must be a COCO instances file") from None
        except (AssertionError, KeyError, TypeError) as exc:  # pycocotools indexing something else than COCO's layout
            raise DataError(f"{annotations} is not a COCO instances file (an object of images, annotations and "
                            f"categories, each a list of objects with an id): {type(exc).__name__}: {exc}") from None
        check_coco_annotations(base.coco.dataset, annotations, with_masks or masks_scored)
        keys = ("image_id", "boxes", "labels", "iscrowd") + (("masks",) if with_masks else ())
        self.base = wrap_dataset_for_transforms_v2(base, target_keys=keys)
        self.coco = base.coco
        self.category_ids = tuple(sorted(self.coco.getCatIds()))
        self.classes = tuple(self.coco.cats[c]["name"] for c in self.category_ids)
        self.label_of = {category: label for label, category in enumerate(self.category_ids, start=1)}
        self.transforms, self.with_masks, self.image_dir = transforms, with_masks, images
        positions = range(len(base.ids))
        if split == "train":
            positions = [i for i in positions if any(
                not a.get("iscrowd", 0) and a["bbox"][2] > 1 and a["bbox"][3] > 1
                for a in self.coco.imgToAnns.get(base.ids[i], []))]
        self.positions = [positions[i] for i in spread_indices(len(positions), limit)]
        self.ids = [base.ids[i] for i in self.positions]
        # found now rather than when an epoch, hours in, first reads the file
        missing = [name for name in (self.coco.imgs[i]["file_name"] for i in self.ids) if not (images / name).is_file()]
        if missing:
            raise DataError(f"{len(missing)} of the images {annotations} lists are not in {images} (first: "
                            f"{', '.join(missing[:3])}); put them there, or drop their entries from the annotation file")

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> Sample:
        try:
            image, raw = self.base[self.positions[index]]
        except OSError as exc:  # PIL's UnidentifiedImageError, a truncated file, a missing one
            name = self.coco.imgs[self.ids[index]]["file_name"]
            raise SampleError(f"could not read image {self.image_dir / name}: {exc}; replace the file, or drop its "
                              "entry from the annotation file") from None
        height, width = image.height, image.width
        target = {"image_id": raw["image_id"]}
        if "boxes" in raw:
            keep = torch.tensor(raw["iscrowd"]) == 0
            # indexing gives plain tensors: wrap them again so that the transforms see boxes and masks
            target["boxes"] = tv_tensors.wrap(raw["boxes"][keep], like=raw["boxes"])
            target["labels"] = torch.tensor([self.label_of[int(c)] for c in raw["labels"][keep]], dtype=torch.int64)
            if self.with_masks:
                target["masks"] = tv_tensors.wrap(raw["masks"][keep], like=raw["masks"])
        else:  # an image without annotations
            target["boxes"] = tv_tensors.BoundingBoxes(torch.zeros((0, 4)), format="XYXY", canvas_size=(height, width))
            target["labels"] = torch.zeros((0,), dtype=torch.int64)
            if self.with_masks:
                target["masks"] = tv_tensors.Mask(torch.zeros((0, height, width), dtype=torch.uint8))
        return self.transforms(image, target) if self.transforms else (image, target)


# ---------------------------------------------------------------------------------------------------
# building


def build_dataset(config: dict[str, Any], split: str, with_masks: bool) -> Dataset:
    """The configured data set's ``split`` (train or val) with its transforms."""
    data = config["data"]
    training = split == "train"
    transforms = build_transforms(training, data["hflip"])
    limit = data["max_train_images"] if training else data["max_val_images"]
    if data["dataset"] == "synthetic":
        count = data["synthetic_train_images"] if training else data["synthetic_val_images"]
        return SyntheticScenes(split, count, config["seed"], transforms, limit)
    return CocoInstances(data["path"], split, transforms, with_masks, limit,
                         masks_scored=config["detector"] == "mask_rcnn")


def collate(batch: Sequence[Sample]) -> tuple[tuple[torch.Tensor, ...], tuple[dict[str, Any], ...]]:
    """Images and targets as tuples: detectors take lists of images of different sizes."""
    images, targets = zip(*batch)
    return images, targets


def build_loader(dataset: Dataset, *, training: bool, batch_size: int, workers: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, pin_memory: bool = False) -> DataLoader:
    """A loader over this rank's part of ``dataset``; training shuffles per epoch (call ``sampler.set_epoch``)."""
    if training:
        # also with one process: the order is a function of (seed, epoch) alone, which resuming relies on
        sampler: Any = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    else:
        sampler = EvalShardSampler(len(dataset), rank, world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, persistent_workers=False)
