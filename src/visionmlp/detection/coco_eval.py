"""The COCO evaluation protocol through pycocotools: box and mask AP, AP50, AP75 and AP for small, medium, large.

Detections are turned into COCO results (``[x, y, w, h]`` boxes, run-length-encoded masks) in the original image's
pixels and the annotation file's category ids; ``COCOeval`` then scores them over the images that were evaluated.
An AP of -1 means, as in pycocotools, that no ground-truth object of that size exists.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A binary HxW mask as COCO's run-length encoding, with text counts (JSON- and pickle-friendly)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_ground_truth(scenes: Iterable[tuple[int, int, int, Sequence[int], np.ndarray]],
                      classes: Sequence[str]) -> Any:
    """A pycocotools ``COCO`` object from ``(image_id, height, width, labels, masks)`` per image; label ``k`` is
    category ``k`` named ``classes[k - 1]``. Boxes and areas come from the masks."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    images, annotations = [], []
    for image_id, height, width, labels, masks in scenes:
        images.append({"id": image_id, "height": height, "width": width})
        for label, mask in zip(labels, masks):
            rle = encode_mask(mask)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "segmentation": rle, "area": float(mask_utils.area(rle)),
                                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": i, "name": name} for i, name in enumerate(classes, start=1)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detections_to_coco(output: dict[str, torch.Tensor], image_id: int, category_ids: Sequence[int],
                       ) -> dict[str, list[dict[str, Any]]]:
    """One image's detector output (boxes in its pixels, labels 1..K, scores, masks if any) as COCO results, per
    evaluation type (``bbox``, and ``segm`` where there are masks)."""
    boxes = output["boxes"].detach().float().cpu()
    boxes[:, 2:] -= boxes[:, :2]  # XYXY -> XYWH
    scores, labels = output["scores"].tolist(), output["labels"].tolist()
    results: dict[str, list[dict[str, Any]]] = {"bbox": [
        {"image_id": image_id, "category_id": category_ids[label - 1], "bbox": box, "score": score}
        for box, label, score in zip(boxes.tolist(), labels, scores)
    ]}
    if "masks" in output:
        masks = (output["masks"][:, 0] > 0.5).cpu().numpy()  # Mask R-CNN's per-pixel probabilities
        results["segm"] = [
            {"image_id": image_id, "category_id": category_ids[label - 1], "segmentation": encode_mask(mask),
             "score": score}
            for mask, label, score in zip(masks, labels, scores)
        ]
    return results


def coco_evaluate(coco_gt: Any, results: dict[str, list[dict[str, Any]]],
                  image_ids: Sequence[int] | None = None) -> dict[str, dict[str, float]]:
    """COCOeval of ``results`` (per evaluation type) against ``coco_gt`` on ``image_ids`` (default: all images):
    ``{"bbox": {"AP": ..., "AP50": ..., ...}, "segm": {...}}``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    metrics = {}
    for iou_type, detections in results.items():
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
            if detections:
                coco_dt = coco_gt.loadRes(detections)
            else:  # loadRes cannot take an empty list: no detections score 0 where there are objects
                coco_dt = COCO()
                coco_dt.dataset = {"images": coco_gt.dataset["images"], "annotations": [],
                                   "categories": coco_gt.dataset["categories"]}
                coco_dt.createIndex()
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = sorted(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        metrics[iou_type] = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}
    return metrics
