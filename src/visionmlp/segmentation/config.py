"""Configuration of ``visionmlp segment``: defaults <- recipe <- ``--opts`` <- flags (see ``ConfigSchema``).

The defaults are the built-in demonstration (``segment_demo``); ``segment_ade20k`` is the RaftMLP seed's semantic FPN
setting and ``segment_ade20k_upernet`` the same with UperNet.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import TRACKERS, Config, ConfigError, ConfigSchema, forget_recipe_backbone

DEFAULTS: Config = {
    "model": {
        "name": "strip_mlp_tiny_light",
        "decoder": "fpn",
        "kwargs": {},  # passed to the backbone's constructor as they are
        "pretrained": None,  # classification checkpoint for the backbone
        "drop_path_rate": 0.1,
        # RaftMLP: any input size, token maps resized to the trained grid around each token mixing (official)
        "dynamic_img_size": False,
        # simple-pyramid width where the backbone has no stride pyramid (ViP, one-level RaftMLP)
        "simple_pyramid_channels": 256,
        "decoder_channels": None,  # None: 256 for FPN (128 per segmentation branch), 512 for UperNet
        "dropout": 0.1,
    },
    "data": {
        "dataset": "shapes",
        "path": None,
        "num_classes": None,  # None: the data set's (150 for ADE20K); fewer for an ADE-layout set of one's own
        "crop_size": [512, 512],  # the training crop, and the input size grid-bound backbones are built for
        "scale": [2048, 512],  # images are resized to fit this (longer, shorter) box, then by ratio_range
        "ratio_range": [0.5, 2.0],
        "cat_max_ratio": 0.75,  # re-draw a crop (up to 10 times) where one class covers more than this
        "photometric": True,
        "hflip": 0.5,
        "batch_size": 4,  # per process
        "workers": 2,
        "max_train_images": None,
        "max_val_images": None,
        "pin_memory": True,
    },
    "train": {
        "iterations": 40000,
        "eval_interval": 4000,
        "base_lr": 2e-4,
        "min_lr": 0.0,
        "power": 0.9,
        "warmup_iterations": 0,
        "weight_decay": 1e-4,
        "optimizer": "adamw",
        "opt_betas": [0.9, 0.999],
        "clip_grad": None,
        "amp": "none",
    },
    "test": {
        # whole: one pass over the resized image; slide: crops of data.crop_size at this stride, averaged
        "mode": "auto",
        "stride": [341, 341],
    },
    "output": None,
    "resume": None,
    "overwrite": False,  # start afresh in an output folder that holds a run (else: an error, to keep that run)
    "seed": 0,
    "device": "auto",
    "threads": None,
    "print_freq": 50,
    "trackers": ["tensorboard"],  # experiment trackers (docs/tracking.md); [none]: none, not even TensorBoard
}

SCHEMA = ConfigSchema(
    DEFAULTS,
    choices={
        "model.decoder": ("fpn", "upernet"),
        "data.dataset": ("shapes", "ade20k", "folder"),
        "train.optimizer": ("adamw", "sgd"),
        "train.amp": ("none", "fp16", "bf16"),
        "test.mode": ("auto", "whole", "slide"),
        "trackers": TRACKERS,
    },
    text_keys=("data.path", "output", "resume", "model.pretrained"),
    free_form=("model.kwargs",),
)

FLAG_KEYS = {
    "model": "model.name",
    "decoder": "model.decoder",
    "pretrained": "model.pretrained",
    "dataset": "data.dataset",
    "data_path": "data.path",
    "num_classes": "data.num_classes",
    "batch_size": "data.batch_size",
    "workers": "data.workers",
    "img_size": "data.crop_size",
    "iterations": "train.iterations",
    "lr": "train.base_lr",
    "amp": "train.amp",
    "output": "output",
    "resume": "resume",
    "overwrite": "overwrite",
    "seed": "seed",
    "device": "device",
    "tracker": "trackers",
}


def build_config(recipe: str | Path | None = None, opts: dict[str, Any] | None = None,
                 flags: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> Config:
    """Defaults (or a recorded ``base``) <- recipe (``segment_demo`` unless given) <- opts <- flags, validated."""
    opts, flags = dict(opts or {}), {k: v for k, v in (flags or {}).items() if v is not None}
    if recipe is None and base is None:
        recipe = "segment_demo"
    config = SCHEMA.resolve(recipe, None, None, base)
    recipe_model = config["model"]["name"]
    SCHEMA.merge(config, opts, "--opts")
    SCHEMA.merge(config, flags, "command-line flags")
    forget_recipe_backbone(config, recipe_model, opts, DEFAULTS)
    validate(config)
    return config


def validate(config: Config) -> None:
    """A ConfigError naming the problem for a value out of range."""
    SCHEMA.check_choices(config)
    flat = SCHEMA.flatten(config)
    for key in ("data.batch_size", "train.iterations", "train.eval_interval", "train.base_lr", "print_freq"):
        if not flat[key] > 0:
            raise ConfigError(f"{key} must be positive; got {flat[key]!r}")
    for key in ("data.crop_size", "data.scale", "data.ratio_range", "test.stride"):
        value = flat[key]
        if not (isinstance(value, list) and len(value) == 2 and all(v > 0 for v in value)):
            raise ConfigError(f"{key} must be two positive numbers; got {value!r}")
    classes = flat["data.num_classes"]
    if classes is not None and (not isinstance(classes, int) or isinstance(classes, bool) or classes < 2):
        raise ConfigError(f"data.num_classes (--num-classes) must be a whole number of at least 2, or null for the "
                          f"data set's own count; got {classes!r}")
    if flat["data.dataset"] != "shapes" and not flat["data.path"]:
        raise ConfigError(f"data set {flat['data.dataset']!r} needs --data-path (data.path)")
    if flat["data.dataset"] == "folder" and not flat["data.num_classes"]:
        raise ConfigError("--dataset folder needs --num-classes (data.num_classes): the masks hold class indices "
                          "0 .. N-1 (255 ignored), and the count cannot be told from a few files")
    if not 0.0 < flat["data.cat_max_ratio"] <= 1.0:
        raise ConfigError(f"data.cat_max_ratio must be in (0, 1]; got {flat['data.cat_max_ratio']!r}")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--cfg and --opts."""
    parser.add_argument("--cfg", metavar="FILE", help="YAML recipe: a file, or a shipped one by name (segment_demo, "
                        "segment_ade20k, segment_ade20k_upernet); default: segment_demo")
    parser.add_argument("--opts", nargs="+", metavar="KEY VALUE", default=None,
                        help="override config keys, e.g. --opts train.base_lr 1e-4 data.batch_size 8")


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Config overrides from the flags present in ``args``."""
    flags = {key: getattr(args, dest) for dest, key in FLAG_KEYS.items() if getattr(args, dest, None) is not None}
    if isinstance(flags.get("data.crop_size"), list) and len(flags["data.crop_size"]) == 1:
        flags["data.crop_size"] = flags["data.crop_size"] * 2
    return flags
