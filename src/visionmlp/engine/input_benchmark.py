"""``visionmlp benchmark --data DIR``: images per second of one data-loading worker, ours against the official one.

A training run's input pipeline is its data-loader workers, each a process on one core running one torch thread:
read a file, decode the JPEG, run the recipe's augmentation, and collate each batch (into shared memory, which the
main process maps). This command times that work in a data-loader worker process, over the same files for both
pipelines, taking turns round by round:

* ours: the training and validation datasets ``visionmlp train`` builds for the recipe (``data.pipeline``, by
  default ``tensor``: :mod:`visionmlp.data.tensor_pipeline`; ``data.normalize_on``, by default ``device``: uint8
  batches, normalised on the training device) and its collate function;
* baseline: what the official scripts run, torchvision's ``ImageFolder`` (PIL decoding) with the transform
  ``timm.data.create_transform`` builds from the same recipe, float batches collated by the data loader's default;
  with ``--zip``, our zip reader with that transform.

Each figure is the best of ``--reps`` rounds over ``--images`` files spread evenly over the split.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.datasets import ImageFolder

from ..config import Config, build_config, parse_opts
from ..data import build_dataset, build_transform, collate_readable, subset_evenly
from ..data.loader import timm_transform
from .evaluate import resolve_input_config
from .machine import cpu_name


def input_config(config: Config) -> dict[str, Any]:
    """The input size, interpolation, mean, std and crop ratio ``visionmlp train`` resolves for the recipe's model
    (built on the meta device: only its configuration is read)."""
    with torch.device("meta"):
        model = timm.create_model(config["model"]["name"])
    return resolve_input_config(config, model)


def pipelines(config: Config, split: str) -> dict[str, Any]:
    """``{"ours": dataset, "baseline": dataset}`` for ``split``, each giving transformed samples."""
    data_config = input_config(config)
    training = split == "train"
    data = config["data"]
    ours = build_dataset("imagenet", split, build_transform(config, data_config, training), data_path=data["path"],
                         use_zip=data["zip"])
    official = timm_transform(config, data_config, training)
    if data["zip"]:
        baseline: Any = build_dataset("imagenet", split, official, data_path=data["path"], use_zip=True)
    else:
        baseline = ImageFolder(str(Path(data["path"]) / split), transform=official)
    if len(baseline) != len(ours):
        raise ValueError(f"the baseline reader finds {len(baseline)} images in {split}/, ours {len(ours)}")
    return {"baseline": baseline, "ours": ours}


def images_per_second(sample: Callable[[int], Any], collate: Callable[[list[Any]], Any], indices: list[int],
                      batch_size: int) -> float:
    """Images per second of a worker's work over ``indices``: ``sample`` each, ``collate`` each batch of
    ``batch_size``."""
    start = time.perf_counter()
    for first in range(0, len(indices), batch_size):
        collate([sample(index) for index in indices[first:first + batch_size]])
    return len(indices) / (time.perf_counter() - start)


class InWorker(Dataset):
    """A one-item data set whose item is ``function()`` and the bad-input error it raised, if any: a data loader runs
    it in a worker process."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self.function = function

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[Any, Exception | None]:
        try:
            return self.function(), None
        except (ValueError, OSError) as error:  # handed back whole: the loader would bury it in a worker traceback
            return None, error


def in_a_worker(function: Callable[[], Any]) -> Any:
    """``function()`` run in a data-loader worker process, set up by torch as its workers are (one torch thread,
    batches collated into shared memory); its ValueError or OSError is raised here as it was."""
    result, error = next(iter(DataLoader(InWorker(function), batch_size=None, num_workers=1)))
    if error is not None:
        raise error
    return result


def best_rates(config: Config, split: str, images: int, reps: int) -> tuple[dict[str, float], int]:
    """Images/s of both pipelines on ``split``: the best of ``reps`` rounds, the two taking turns; and the number of
    images timed (fewer than ``images`` where the split has fewer)."""
    datasets = pipelines(config, split)
    collate = {"baseline": default_collate, "ours": collate_readable}
    indices = list(subset_evenly(list(range(len(datasets["ours"]))), images))
    best = {name: 0.0 for name in datasets}
    for _ in range(reps):  # in turn, so that both see the same machine state
        for name, dataset in datasets.items():
            torch.manual_seed(0)
            rate = images_per_second(dataset.__getitem__, collate[name], indices, config["data"]["batch_size"])
            best[name] = max(best[name], rate)
    return best, len(indices)


def measure(config: Config, images: int, reps: int) -> dict[str, Any]:
    """Per-worker images/s of both pipelines on both splits, and the speed-ups."""
    data = config["data"]
    result: dict[str, Any] = {"cpu": cpu_name(), "pipeline": data["pipeline"], "normalize_on": data["normalize_on"],
                              "zip": bool(data["zip"]), "batch_size": data["batch_size"], "reps": reps,
                              "model": config["model"]["name"]}
    for split in ("train", "val"):
        best, result[f"{split}_images"] = in_a_worker(functools.partial(best_rates, config, split, images, reps))
        result[f"{split}_images_per_s_per_worker"] = best["ours"]
        result[f"baseline_{split}_images_per_s_per_worker"] = best["baseline"]
        result[f"{split}_speedup"] = best["ours"] / best["baseline"]
    return result


def benchmark_config(args: argparse.Namespace) -> Config:
    """The recipe the measured pipelines are built from."""
    flags = {"data.dataset": "imagenet", "data.path": args.data, "data.zip": args.zip or None,
             "model.name": args.model}
    return build_config(args.cfg, parse_opts(args.opts), flags)


def report(result: dict[str, Any]) -> str:
    """The measurement as a Markdown table."""
    baseline = "zip reader + PIL + timm" if result["zip"] else "ImageFolder + PIL + timm"
    lines = [f"data-loading worker, one process on one core ({result['cpu']}), {result['model']}'s recipe, batches of "
             f"{result['batch_size']}, best of {result['reps']} rounds over {result['train_images']} train and "
             f"{result['val_images']} val images", "",
             f"| split | ours (data.pipeline: {result['pipeline']}, normalize_on: {result['normalize_on']}) | "
             f"baseline ({baseline}) | speed-up |",
             "|---|--:|--:|--:|"]
    for split in ("train", "val"):
        lines.append(f"| {split} | {result[f'{split}_images_per_s_per_worker']:.1f} img/s | "
                     f"{result[f'baseline_{split}_images_per_s_per_worker']:.1f} img/s | "
                     f"{result[f'{split}_speedup']:.2f}x |")
    return "\n".join(lines)
