"""``visionmlp predict``: the top-5 classes of images (ImageNet's, or a run's own), with the model's own preprocessing."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.data import ImageNetInfo, create_transform, resolve_data_config
from torch import nn

from ..inference import optimize_for_inference
from ..models import deploy_model_from_state_dict
from .convert import add_model_arguments, model_from_flags, training_form_model
from .evaluate import resolve_input_config


def load_image(path: str | Path) -> Any:
    """An RGB PIL image, or a ValueError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"could not read image {str(path)!r}: {exc}") from None


def eval_transform(model: nn.Module, img_size: int | None = None, config: Mapping[str, Any] | None = None) -> Any:
    """The evaluation preprocessing of a recorded run ``config`` (else of the model's ``pretrained_cfg``)."""
    data_config = resolve_data_config(model=model) if config is None else resolve_input_config(config, model)
    if img_size:  # the model was built for another resolution than its pretrained_cfg records
        data_config["input_size"] = (data_config["input_size"][0], img_size, img_size)
    return create_transform(**data_config)


@torch.no_grad()
def predict(
    model: nn.Module,
    paths: list[str],
    top_k: int = 5,
    img_size: int | None = None,
    config: Mapping[str, Any] | None = None,
    class_names: list[str] | None = None,
) -> tuple[list[dict[str, Any]], list[Exception]]:
    """Top-``k`` classes of each readable image, preprocessed as the run ``config`` or the model's ``pretrained_cfg``
    says; labelled with ImageNet's descriptions for a 1000-way head, else with ``class_names`` (a run's classes) if
    given, else with the class index. Also the error of each image that could not be read; where none could, the
    error (the first one's alone for one image)."""
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1; got {top_k}")
    model.eval()
    transform = eval_transform(model, img_size, config)
    num_classes = getattr(model, "num_classes", None)
    info = ImageNetInfo() if num_classes == 1000 else None
    names = class_names if class_names is not None and len(class_names) == num_classes else None
    results, unreadable = [], []
    for path in paths:
        try:
            image = load_image(path)
        except (FileNotFoundError, ValueError) as exc:
            unreadable.append(exc)
            continue
        probabilities = model(transform(image).unsqueeze(0)).softmax(dim=1)[0]
        values, indices = probabilities.topk(min(top_k, probabilities.numel()))
        results.append({"image": str(path), "top": [
            {"index": i, "label": info.index_to_description(i) if info else names[i] if names else str(i),
             "probability": p}
            for i, p in zip(indices.tolist(), values.tolist())
        ]})
    if not results:
        if len(unreadable) == 1:
            raise unreadable[0]
        raise ValueError(f"none of the {len(unreadable)} images could be read: "
                         + "; ".join(str(exc) for exc in unreadable))
    return results, unreadable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``visionmlp predict``."""
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (anything PIL reads)")
    add_model_arguments(parser)
    parser.add_argument("--deploy", action="store_true", help="run the folded inference form")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default: 5)")
    parser.add_argument("--json", action="store_true", help="print the result as a JSON list")


def run(args: argparse.Namespace) -> int:
    """Run ``visionmlp predict``."""
    name, state_dict, kwargs, config, class_names = model_from_flags(args, keep_trained_grid=True)
    build = deploy_model_from_state_dict if args.deploy else training_form_model
    model = optimize_for_inference(build(name, state_dict, **kwargs), fold=args.deploy, inplace=True)
    results, unreadable = predict(model, args.images, args.top_k, args.img_size, config, class_names)
    for exc in unreadable:
        print(f"visionmlp predict: warning: skipped: {exc}", file=sys.stderr)
    if args.json:
        print(json.dumps(results))
    else:
        for result in results:
            print(result["image"])
            for entry in result["top"]:
                print(f"  {100 * entry['probability']:6.2f} %  {entry['label']}")
    return 1 if unreadable else 0  # a script sees that not every image was predicted
