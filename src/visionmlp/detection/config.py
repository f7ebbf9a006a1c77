"""Configuration of ``visionmlp detect``: defaults <- YAML recipe <- ``--opts KEY VALUE`` <- flags, as for ``train``.

The keys follow the classification configuration where they mean the same (``model.name``, ``data.batch_size``,
``train.base_lr``, ``output``, ``resume`` ...); the detection-only ones are explained beside their defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import TRACKERS, Config, ConfigError, ConfigSchema, forget_recipe_backbone

DETECTORS = ("retinanet", "mask_rcnn", "faster_rcnn")

DEFAULTS: Config = {
    "detector": "retinanet",
    "model": {
        "name": "raft_mlp_s",
        "kwargs": {},  # passed to the backbone's constructor as they are (free-form)
        "pretrained": None,  # a classification checkpoint (ours or official) for the backbone
        "drop_path_rate": 0.0,
        # RaftMLP: any input size, token maps resized to the trained grid around each token mixing (official)
        "dynamic_img_size": False,
        # the size the backbone is built for; None: the letterbox side (rounded up to what the family takes) for
        # ViP, Strip-MLP and RaftMLP, the variant's own (the grid of its weights) for RepMLPNet and dynamic RaftMLP
        "img_size": None,
        "fpn_channels": 256,
        "box_head_dim": 1024,  # the R-CNNs' two-FC box head
        # the R-CNNs: proposals the RPN keeps per image after NMS (from twice as many before it when training, as
        # many when testing), and how many of them are sampled to train the box (and mask) head
        "rpn_proposals": 1000,
        "rois_per_image": 512,
        # anchors as mmdetection's configs: None -> RetinaNet octave base scale 4 (3 scales per octave, P3-P7),
        # R-CNN scale 8 (P2-P6); an anchor's side is scale x stride
        "anchor_scale": None,
        "anchor_ratios": [0.5, 1.0, 2.0],
        "score_thresh": 0.05,
        "nms_thresh": 0.5,
        "detections_per_img": 100,
    },
    "data": {
        "dataset": "synthetic",  # synthetic (built in) or coco (--data-path)
        "path": None,
        # None: the seed's 1333 x 800 keep-ratio resize where the backbone takes any size (MS-MLP, RepMLPNet,
        # RaftMLP with dynamic_img_size), else the 1344 letterbox; S: letterbox (the longer side scaled to S, padded);
        # [long, short]: keep-ratio resize within long x short (backbones that take any size)
        "img_size": None,
        "batch_size": 2,  # per process
        "workers": 2,
        "hflip": 0.5,
        "pin_memory": True,
        "max_train_images": None,  # None: every image; a number: that many, spread evenly (tests, quick runs)
        "max_val_images": None,
        "synthetic_train_images": 800,
        "synthetic_val_images": 200,
    },
    "train": {
        "epochs": 12,
        "optimizer": "adamw",
        "base_lr": 1e-4,
        # the learning rate is multiplied by (batch_size * world_size) / lr_base_batch; None leaves it as written
        "lr_base_batch": 16,
        "weight_decay": 1e-4,
        "warmup_iters": 500,  # linear warm-up from warmup_ratio x the rate, per iteration (mmdetection's)
        "warmup_ratio": 0.001,
        "lr_steps": [8, 11],  # epochs after which the rate is multiplied by lr_gamma
        "lr_gamma": 0.1,
        "clip_grad": None,  # max gradient norm; None: no clipping
        "amp": "none",
    },
    "output": None,  # None: runs/detect-<detector>-<model>-<dataset>
    "resume": None,  # a checkpoint file, or "auto" for <output>/last.pt when it exists
    "overwrite": False,  # start afresh in an output folder that holds a run (else: an error, to keep that run)
    "seed": 0,
    "device": "auto",
    "threads": None,
    "print_freq": 50,
    "trackers": ["tensorboard"],  # experiment trackers (docs/tracking.md); [none]: none, not even TensorBoard
}

CHOICES = {
    "detector": DETECTORS,
    "data.dataset": ("synthetic", "coco"),
    "train.amp": ("none", "fp16", "bf16"),
    "trackers": TRACKERS,
}

SCHEMA = ConfigSchema(DEFAULTS, CHOICES, text_keys=("data.path", "output", "resume", "model.pretrained"),
                      free_form=("model.kwargs",))

# argparse destination -> config key; a flag that is given wins over the recipe and --opts
FLAG_KEYS = {
    "detector": "detector",
    "model": "model.name",
    "data_path": "data.path",
    "batch_size": "data.batch_size",
    "workers": "data.workers",
    "img_size": "data.img_size",
    "epochs": "train.epochs",
    "lr": "train.base_lr",
    "amp": "train.amp",
    "pretrained": "model.pretrained",
    "output": "output",
    "resume": "resume",
    "overwrite": "overwrite",
    "seed": "seed",
    "device": "device",
    "tracker": "trackers",
}

# backbones that take inputs of any size (padded to a multiple of their stride or partition)
ANY_SIZE_FAMILIES = ("ms_mlp", "repmlpnet")


def flags_from_args(args: Any) -> dict[str, Any]:
    """Config overrides from the flags present in ``args`` (unset flags are None and left out)."""
    flags = {key: getattr(args, dest) for dest, key in FLAG_KEYS.items() if getattr(args, dest, None) is not None}
    if isinstance(flags.get("data.img_size"), list):  # --img-size S or --img-size LONG SHORT
        sides = flags["data.img_size"]
        flags["data.img_size"] = sides[0] if len(sides) == 1 else sides
    return flags


def default_recipe(opts: Mapping[str, Any], flags: Mapping[str, Any]) -> str:
    """``detect_demo`` for the built-in scenes, else the detector's COCO recipe (the seed's 1x schedule)."""
    dataset = flags.get("data.dataset", opts.get("data.dataset", "synthetic"))
    if dataset == "synthetic":
        return "detect_demo"
    return f"detect_{flags.get('detector', opts.get('detector', DEFAULTS['detector']))}_coco"


def build_config(recipe: str | Path | None = None, opts: Mapping[str, Any] | None = None,
                 flags: Mapping[str, Any] | None = None, base: Mapping[str, Any] | None = None) -> Config:
    """Resolve and validate: ``base`` (default: DEFAULTS) <- recipe <- opts <- flags.

    Without ``recipe`` or ``base`` the demo recipe is used, or the detector's COCO recipe once a data path is given
    (``--data-path`` alone means COCO).
    """
    opts, flags = dict(opts or {}), {k: v for k, v in (flags or {}).items() if v is not None}
    if "data.path" in flags and "data.dataset" not in opts:
        flags.setdefault("data.dataset", "coco")
    if recipe is None and base is None:
        recipe = default_recipe(opts, flags)
    config = SCHEMA.resolve(recipe, None, None, base)
    recipe_model = config["model"]["name"]
    SCHEMA.merge(config, opts, "--opts")
    SCHEMA.merge(config, flags, "command-line flags")
    forget_recipe_backbone(config, recipe_model, opts, DEFAULTS)
    validate(config)
    return config


def family(name: str) -> str:
    """The family of a visionmlp variant (``vip_s7`` -> ``vip``)."""
    from ..models import family_module

    return family_module(name).__name__.rsplit(".", 1)[-1]


def takes_any_size(config: Mapping[str, Any]) -> bool:
    """Whether the configured backbone takes images of any size (else it is built for one token grid)."""
    return family(config["model"]["name"]) in ANY_SIZE_FAMILIES or bool(config["model"]["dynamic_img_size"])


def validate(config: Config) -> None:
    """Raise ConfigError with a clear message for values out of range."""
    SCHEMA.check_choices(config)
    flat = SCHEMA.flatten(config)
    try:
        family(flat["model.name"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for key in ("data.batch_size", "train.epochs", "train.base_lr", "print_freq", "model.fpn_channels",
                "model.box_head_dim", "model.rois_per_image", "model.rpn_proposals",
                "model.detections_per_img", "data.synthetic_train_images",
                "data.synthetic_val_images"):
        if not flat[key] > 0:
            raise ConfigError(f"{key} must be positive; got {flat[key]!r}")
    for key in ("data.workers", "train.warmup_iters", "train.weight_decay", "model.drop_path_rate"):
        if flat[key] < 0:
            raise ConfigError(f"{key} must be >= 0; got {flat[key]!r}")
    for key in ("train.warmup_ratio", "train.lr_gamma"):
        if not 0.0 < flat[key] <= 1.0:
            raise ConfigError(f"{key} must be in (0, 1]; got {flat[key]!r}")
    if not 0.0 <= flat["data.hflip"] <= 1.0:
        raise ConfigError(f"data.hflip is a probability in [0, 1]; got {flat['data.hflip']!r}")
    for key, what in (("model.score_thresh", "a detection score"), ("model.nms_thresh", "an IoU")):
        if not 0.0 <= flat[key] <= 1.0:
            raise ConfigError(f"{key} is {what}, in [0, 1]; got {flat[key]!r}")
    steps = flat["train.lr_steps"]
    if not all(isinstance(s, int) and s > 0 for s in steps) or list(steps) != sorted(steps):
        raise ConfigError(f"train.lr_steps must be increasing positive epochs; got {steps!r}")
    if flat["model.dynamic_img_size"] and family(flat["model.name"]) != "raft_mlp":
        raise ConfigError("model.dynamic_img_size is RaftMLP's way of taking any input size; "
                          f"{flat['model.name']} is not a RaftMLP")
    size = flat["data.img_size"]
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 32 or size % 32:
            raise ConfigError(f"data.img_size (the letterbox side) must be a multiple of 32; got {size}")
    elif isinstance(size, list):
        if len(size) != 2 or not all(isinstance(s, int) and s >= 32 for s in size) or size[0] < size[1]:
            raise ConfigError(f"data.img_size as two numbers is [long, short] for a keep-ratio resize, e.g. "
                              f"[1333, 800]; got {size!r}")
        if not takes_any_size(config):
            raise ConfigError(
                f"{flat['model.name']} is built for one token grid and cannot take the keep-ratio resize "
                f"{size[0]}x{size[1]}: pass one side for the letterbox policy instead (--img-size "
                f"{-(-size[0] // 32) * 32}), or --opts model.dynamic_img_size true for a RaftMLP")
    elif size is not None:
        raise ConfigError(f"data.img_size must be null, a letterbox side or [long, short]; got {size!r}")
    if flat["data.dataset"] == "coco" and not flat["data.path"]:
        raise ConfigError("the COCO data set needs --data-path DIR (annotations/instances_{train,val}2017.json, "
                          "train2017/, val2017/)")
    if flat["threads"] is not None and (not isinstance(flat["threads"], int) or flat["threads"] < 1):
        raise ConfigError(f"threads must be a positive integer or null; got {flat['threads']!r}")


def resize_policy(config: Mapping[str, Any]) -> tuple[int, int]:
    """``(min_size, max_size)`` for torchvision's GeneralizedRCNNTransform: equal for the letterbox policy (the
    longer side becomes that size), the seed's 800 and 1333 for the keep-ratio resize."""
    size = config["data"]["img_size"]
    if size is None:
        return (800, 1333) if takes_any_size(config) else (1344, 1344)
    if isinstance(size, int):
        return size, size
    return size[1], size[0]
