"""Run configuration: built-in defaults, then a YAML recipe, then ``--opts KEY VALUE`` pairs, then CLI flags.

A configuration is a plain nested dict (it is saved as ``config.yaml`` and inside checkpoints).
Keys are dotted paths such as ``train.base_lr``. Overrides are checked against the defaults: an
unknown key is an error naming the closest known keys, and a value is coerced to the type of the
default (``"3"`` -> 3 for an int key, ``"true"`` -> True for a bool key, YAML syntax for lists).
"""

from __future__ import annotations

import argparse
import copy
import difflib
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

Config = dict[str, Any]

DEFAULTS: Config = {
    "model": {
        "name": "vip_s7",
        "num_classes": None,  # None: the number of classes of the data set
        "drop_rate": 0.0,
        "drop_path_rate": None,  # None: look the variant up in drop_path_by_variant, else 0.0
        "drop_path_by_variant": {},
        "kwargs": {},  # passed to the model constructor as they are (free-form)
        "pretrained": None,  # checkpoint file to initialise from (fine-tuning)
        # RaftMLP: keep the grid of the weights and take inputs of any size (data.img_size), as the official code
        "dynamic_img_size": False,
    },
    "data": {
        "dataset": "digits",
        "path": None,
        "img_size": None,  # None: the model's default resolution
        "batch_size": 128,  # per process
        "workers": 4,
        "zip": False,
        "cache_mode": "no",
        "interpolation": None,  # None: the model's default
        "crop_pct": None,  # evaluation resize ratio; None: the model's default
        "mean": None,
        "std": None,
        "pin_memory": True,
        # tensor: timm's augmentation with faster kernels -- libjpeg-turbo decoding, uint8 tensor resizing, OpenCV
        # geometry (visionmlp.data.tensor_pipeline); pil: as timm builds it, on PIL images (the official scripts')
        "pipeline": "tensor",
        # device: workers hand over uint8 batches, normalised (and randomly erased) batch by batch on the training
        # device, as timm's prefetcher does: a quarter of the bytes to collate, share and copy; worker: in each worker
        "normalize_on": "device",
        # None: every image; a number: that many, spread evenly over the set (quick experiments, tests)
        "max_train_images": None,
        "max_val_images": None,
        # None: every class; a list of class names: only these, numbered in the order given
        "classes": None,
        # Flowers-102 parts: raftmlp trains on the 6,149-image test part as the RaftMLP code does, official on trnid
        "flowers102_split": "raftmlp",
    },
    "aug": {
        "scale": [0.08, 1.0],  # RandomResizedCrop area range
        "hflip": 0.5,
        "color_jitter": 0.4,
        "auto_augment": None,  # timm policy string, e.g. rand-m9-mstd0.5-inc1
        "reprob": 0.0,
        "remode": "pixel",
        "recount": 1,
        "mixup": 0.0,
        "cutmix": 0.0,
        "cutmix_minmax": None,
        "mixup_prob": 1.0,
        "mixup_switch_prob": 0.5,
        "mixup_mode": "batch",
    },
    "train": {
        "epochs": 300,
        "warmup_epochs": 20,
        "cooldown_epochs": 0,
        "base_lr": 5e-4,
        "warmup_lr": 5e-7,
        "min_lr": 5e-6,
        # learning rates are multiplied by (batch_size * world_size * accumulation_steps) / lr_base_batch;
        # None leaves them as written
        "lr_base_batch": 512,
        "optimizer": "adamw",
        "opt_eps": 1e-8,
        "opt_betas": [0.9, 0.999],
        # torch's single-kernel update where the optimizer has one (Adam, AdamW, SGD, Adagrad): the same
        # update as the per-parameter loop of the official scripts, faster; other optimizers ignore it
        "opt_fused": True,
        "momentum": 0.9,
        "weight_decay": 0.05,
        "sched": "cosine",
        "sched_on_updates": True,  # False: the learning rate changes once per epoch
        "decay_epochs": 30,
        "decay_rate": 0.1,
        "clip_grad": 5.0,  # max gradient norm; None: no clipping
        "label_smoothing": 0.1,
        "accumulation_steps": 1,
        "use_checkpoint": False,
        "amp": "auto",  # bf16 autocast on a GPU that has it (else fp16), none on a CPU; a run records its choice
        "compile": False,
        # weights and batches in channels-last (NHWC) memory: cuDNN's preferred layout for convolutions under
        # autocast, as timm's --channels-last; the same maths
        "channels_last": False,
        # DDP (torchrun): gradients all-reduced in buckets of this many MiB (torch's default 25), and static_graph
        # (the same parameters used in every step: lets DDP skip its per-step search for unused parameters and
        # overlap more; a model whose graph changes between steps must keep it off)
        "ddp_bucket_cap_mb": 25,
        "ddp_static_graph": False,
        "ema": False,
        "ema_decay": 0.9998,
        # fine-tuning: learning rates scaled per layer from the head down (timm's layer decay; None: off), the
        # rate of everything but the classifier scaled, or the backbone frozen (linear probing)
        "layer_decay": None,
        "backbone_lr_scale": 1.0,
        "freeze_backbone": False,
    },
    "output": None,  # None: runs/<model>-<dataset>
    "resume": None,  # a checkpoint file, or "auto" for <output>/last.pt when it exists
    "overwrite": False,  # start afresh in an output folder that holds a run (else: an error, to keep that run)
    "seed": 0,
    "device": "auto",
    "threads": None,  # torch intra-op threads per process; None: torch's default (all cores)
    "print_freq": 20,
    "trackers": ["tensorboard"],  # experiment trackers (docs/tracking.md); [none]: none, not even TensorBoard
}

# --tracker: more than one may be given; none turns every one off
TRACKERS = ("tensorboard", "mlflow", "wandb", "clearml", "none")

CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": ("digits", "imagenet", "folder", "cifar10", "cifar100", "flowers102", "stanford_cars",
                     "inat2018", "inat2019", "caltech101"),
    "data.flowers102_split": ("raftmlp", "official"),
    "data.cache_mode": ("no", "part", "full"),
    "data.pipeline": ("tensor", "pil"),
    "data.normalize_on": ("device", "worker"),
    "aug.mixup_mode": ("batch", "pair", "elem"),
    "train.amp": ("auto", "none", "fp16", "bf16"),
    "train.sched": ("cosine", "step", "none"),
    "trackers": TRACKERS,
}

# keys whose default is None but whose value is always text: never parsed as YAML
TEXT_KEYS = ("data.path", "output", "resume", "model.pretrained", "aug.auto_augment", "data.interpolation")

# keys below these prefixes take any value: their contents are defined by the model or the recipe
FREE_FORM = ("model.kwargs", "model.drop_path_by_variant")

# argparse destination -> config key; a flag that is given wins over the recipe and --opts
FLAG_KEYS = {
    "model": "model.name",
    "dataset": "data.dataset",
    "data_path": "data.path",
    "batch_size": "data.batch_size",
    "workers": "data.workers",
    "img_size": "data.img_size",
    "zip": "data.zip",
    "cache_mode": "data.cache_mode",
    "epochs": "train.epochs",
    "lr": "train.base_lr",
    "accumulation_steps": "train.accumulation_steps",
    "use_checkpoint": "train.use_checkpoint",
    "amp": "train.amp",
    "compile": "train.compile",
    "channels_last": "train.channels_last",
    "drop_path": "model.drop_path_rate",
    "freeze_backbone": "train.freeze_backbone",
    "pretrained": "model.pretrained",
    "output": "output",
    "resume": "resume",
    "overwrite": "overwrite",
    "seed": "seed",
    "device": "device",
    "tracker": "trackers",
}


class ConfigError(ValueError):
    """A recipe or override that does not fit the configuration schema."""


class ConfigSchema:
    """The keys of one task's configuration: defaults, allowed choices, text keys, free-form sub-trees."""

    def __init__(self, defaults: Config, choices: Mapping[str, tuple[str, ...]] = (),
                 text_keys: Iterable[str] = (), free_form: Iterable[str] = ()) -> None:
        self.defaults = defaults
        self.choices = dict(choices)
        self.text_keys = tuple(text_keys)
        self.free_form = tuple(free_form)
        self.known_keys = set(self.flatten(defaults))

    def flatten(self, config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; free-form sub-trees stay whole."""
        flat = {}
        for key, value in config.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, Mapping) and dotted not in self.free_form:
                flat.update(self.flatten(value, dotted + "."))
            else:
                flat[dotted] = value
        return flat

    def check_key(self, dotted: str, source: str) -> str:
        """``dotted`` if it is a key of this schema, else a ConfigError naming the closest keys."""
        if dotted in self.known_keys or any(dotted.startswith(free + ".") for free in self.free_form):
            return dotted
        close = difflib.get_close_matches(dotted, sorted(self.known_keys), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see the task's DEFAULTS for the keys"
        raise ConfigError(f"unknown config key {dotted!r} in {source}{hint}")

    def default_of(self, dotted: str) -> Any:
        """The default value of a key (None for free-form keys)."""
        try:
            return get(self.defaults, dotted)
        except (KeyError, TypeError):
            return None

    def coerce(self, dotted: str, value: Any, source: str) -> Any:
        """Convert ``value`` (a string from the command line, or a YAML value) to the type of the key's default."""
        default = self.default_of(dotted)
        if isinstance(value, str) and dotted not in self.text_keys and not isinstance(default, str):
            try:
                value = yaml.safe_load(value) if value.strip() else None
            except yaml.YAMLError as exc:
                raise ConfigError(f"{source}: cannot parse {value!r} for {dotted}: {exc}") from None
        if value is None or default is None or any(dotted.startswith(f + ".") or dotted == f for f in self.free_form):
            return value
        expected = type(default)
        if expected is float and isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" as text
            except ValueError:
                pass
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if expected is list and isinstance(value, tuple):
            return list(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(
                f"{source}: {dotted} must be of type {expected.__name__} (like {default!r}), got {value!r}"
            )
        return value

    def merge(self, config: Config, overrides: Mapping[str, Any], source: str) -> None:
        """Apply nested or dotted ``overrides`` onto ``config`` in place, checking keys and types."""
        for dotted, value in self.flatten(overrides).items():
            _set(config, self.check_key(dotted, source), self.coerce(dotted, value, source))

    def resolve(self, recipe: str | Path | None, opts: Mapping[str, Any] | None, flags: Mapping[str, Any] | None,
                base: Mapping[str, Any] | None = None) -> Config:
        """``base`` (default: the defaults) <- recipe <- opts <- flags, unvalidated."""
        config = copy.deepcopy(self.defaults)
        if base is not None:  # a recorded run's configuration, which may predate keys added since
            for dotted, value in self.flatten(base).items():
                _set(config, dotted, copy.deepcopy(value))
        if recipe is not None:
            self.merge(config, load_recipe(recipe), f"recipe {str(recipe)!r}")
        self.merge(config, dict(opts or {}), "--opts")
        self.merge(config, {k: v for k, v in (flags or {}).items() if v is not None}, "command-line flags")
        return config

    def check_choices(self, config: Config) -> None:
        """A ConfigError for a key outside its choices (for a list, an item outside them)."""
        flat = self.flatten(config)
        for key, choices in self.choices.items():
            for value in flat[key] if isinstance(flat[key], list) else [flat[key]]:
                if value not in choices:
                    raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
        if "trackers" in flat and "none" in flat["trackers"] and len(flat["trackers"]) > 1:
            raise ConfigError(f"trackers: none turns every tracker off and stands alone; got {flat['trackers']!r} "
                              "(--tracker none, or name the trackers wanted)")


def get(config: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted key."""
    node: Any = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _set(config: Config, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = value


SCHEMA = ConfigSchema(DEFAULTS, CHOICES, TEXT_KEYS, FREE_FORM)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` for a classification configuration."""
    return SCHEMA.flatten(config, prefix)


def merge(config: Config, overrides: Mapping[str, Any], source: str) -> None:
    """Apply nested or dotted ``overrides`` onto a classification ``config`` in place, checking keys and types."""
    SCHEMA.merge(config, overrides, source)


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file: a path, or the name of one shipped in ``visionmlp/configs`` (``vip`` or ``vip.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = resources.files("visionmlp") / "configs" / (path.stem + ".yaml")
    if path.parent == Path(".") and shipped.is_file():
        return Path(str(shipped))
    raise ConfigError(
        f"recipe {str(name_or_path)!r} not found; pass a YAML file or one of: {', '.join(shipped_recipes())}"
    )


def shipped_recipes() -> list[str]:
    """Names of the recipes that ship with the package."""
    folder = resources.files("visionmlp") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping that gives a key twice is a ConfigError naming it and its lines
    (YAML forbids it; PyYAML keeps the last value silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """The mapping of ``node``, its keys checked for repeats (before merge keys ``<<`` bring in others)."""
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in lines:
                raise ConfigError(f"recipe {self.name!r}: key {key!r} is given twice, on lines {lines[key]} and "
                                  f"{line} (only the last would count): remove one")
            lines[key] = line
        return super().construct_mapping(node, deep)


def load_recipe(name_or_path: str | Path) -> Config:
    """Read a recipe file as a nested dict."""
    path = recipe_path(name_or_path)
    try:
        with open(path) as f:
            recipe = yaml.load(f, Loader=RecipeLoader) or {}
    except yaml.YAMLError as exc:  # the parser's message names the line and column
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"recipe {str(path)!r} must hold a mapping of keys, not {type(recipe).__name__}")
    return recipe


def parse_opts(opts: Iterable[str] | None) -> dict[str, str]:
    """``["train.epochs", "5", "data.zip", "true"]`` -> ``{"train.epochs": "5", "data.zip": "true"}``."""
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f"--opts takes KEY VALUE pairs; got an odd number of items: {opts}")
    return dict(zip(opts[0::2], opts[1::2], strict=True))


def family_recipe(model_name: str) -> str | None:
    """The shipped recipe of a visionmlp variant's family (``vip_s7`` -> ``vip``), or None for other models; a variant
    the authors trained otherwise than its family has a recipe of its own (``raft_mlp_deep``)."""
    from .models import MODEL_NAMES, family_module

    if model_name not in MODEL_NAMES:
        return None
    if model_name in shipped_recipes():
        return model_name
    family = family_module(model_name).__name__.rsplit(".", 1)[-1]
    return family if family in shipped_recipes() else None


def forget_recipe_backbone(config: Config, recipe_model: str, opts: Mapping[str, Any], defaults: Config) -> None:
    """Where the flags or --opts chose another backbone than the recipe's: the recipe's ``model.kwargs`` and
    ``model.img_size`` describe its own backbone, and its ``model.dynamic_img_size`` suits RaftMLPs only; each goes
    back to ``defaults`` unless --opts set it (detection and segmentation recipes)."""
    model = config["model"]
    if model["name"] == recipe_model:
        return
    keys = [key for key in ("kwargs", "img_size") if key in model]
    if not str(model["name"]).startswith("raft_mlp"):
        keys.append("dynamic_img_size")
    for key in keys:
        if f"model.{key}" not in opts:
            model[key] = copy.deepcopy(defaults["model"][key])


def build_config(
    recipe: str | Path | None = None,
    opts: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
    pick_recipe: bool = True,
) -> Config:
    """Resolve a configuration: ``base`` (default: DEFAULTS) <- recipe <- opts <- flags, then validate.

    Without an explicit recipe one is chosen: ``digits`` for the digits data set (the default run),
    otherwise the recipe of the model's family, so ``--model vip_s7 --dataset imagenet`` trains as
    the ViP authors did. ``pick_recipe=False`` turns that choice off.
    """
    opts, flags = dict(opts or {}), {k: v for k, v in (flags or {}).items() if v is not None}
    if recipe is None and base is None and pick_recipe:
        dataset = flags.get("data.dataset", opts.get("data.dataset", DEFAULTS["data"]["dataset"]))
        model = flags.get("model.name", opts.get("model.name", DEFAULTS["model"]["name"]))
        recipe = "digits" if dataset == "digits" else family_recipe(str(model))
    config = SCHEMA.resolve(recipe, None, None, base)
    recipe_model = config["model"]["name"]
    SCHEMA.merge(config, opts, "--opts")
    SCHEMA.merge(config, flags, "command-line flags")
    if config["model"]["name"] != recipe_model and config["model"]["kwargs"] and "model.kwargs" not in opts:
        # a recipe's constructor arguments, and the input size chosen for them, describe its own model, not the one
        # chosen instead (a recipe without them keeps its input size: that of its data)
        config["model"]["kwargs"] = {}
        if "data.img_size" not in opts and "data.img_size" not in flags:
            config["data"]["img_size"] = None
    if config["model"]["drop_path_rate"] is None:
        by_variant = config["model"]["drop_path_by_variant"] or {}
        config["model"]["drop_path_rate"] = float(by_variant.get(config["model"]["name"], 0.0))
    data = config["data"]
    # a recorded run's own path (of the data set it was trained on) was not given this time
    if data["dataset"] == "digits" and data["path"] and data["path"] != ((base or {}).get("data") or {}).get("path"):
        raise ConfigError(f"--dataset digits is built in and reads no files, so --data-path (data.path) "
                          f"{data['path']!r} would be ignored: pass --dataset folder to read a train/ and val/ tree of "
                          "class folders there, or the --dataset it holds (imagenet, cifar10, ...)")
    validate(config)
    return config


def validate(config: Config) -> None:
    """Raise ConfigError with a clear message for values out of range."""
    SCHEMA.check_choices(config)
    flat = flatten(config)
    positive = ("data.batch_size", "train.epochs", "train.accumulation_steps", "train.base_lr", "print_freq")
    for key in positive:
        if not flat[key] > 0:
            raise ConfigError(f"{key} must be positive; got {flat[key]!r}")
    non_negative = ("data.workers", "train.warmup_epochs", "train.cooldown_epochs", "train.weight_decay",
                    "model.drop_rate", "model.drop_path_rate", "aug.reprob", "aug.mixup", "aug.cutmix")
    for key in non_negative:
        if flat[key] < 0:
            raise ConfigError(f"{key} must be >= 0; got {flat[key]!r}")
    if not flat["model.drop_path_rate"] < 1.0:
        raise ConfigError(f"model.drop_path_rate must be in [0, 1); got {flat['model.drop_path_rate']!r}")
    for key in ("train.clip_grad", "data.max_train_images", "data.max_val_images"):
        if flat[key] is not None and not flat[key] > 0:
            raise ConfigError(f"{key} must be positive, or null for none; got {flat[key]!r}")
    if not 0.0 <= flat["train.label_smoothing"] < 1.0:
        raise ConfigError(f"train.label_smoothing must be in [0, 1); got {flat['train.label_smoothing']!r}")
    size = flat["data.img_size"]
    sides = size if isinstance(size, (list, tuple)) else [size]
    if size is not None and (len(sides) not in (1, 2) or not all(isinstance(s, int) and s >= 8 for s in sides)):
        raise ConfigError(f"data.img_size must be an integer >= 8, or [height, width] of two; got {size!r}")
    if flat["data.dataset"] != "digits" and not flat["data.path"]:
        raise ConfigError(f"data set {flat['data.dataset']!r} needs --data-path (data.path)")
    if flat["data.zip"] and flat["data.dataset"] != "imagenet":
        raise ConfigError("--zip applies to --dataset imagenet only")
    if flat["data.cache_mode"] != "no" and flat["data.dataset"] in ("digits", "cifar10", "cifar100"):
        raise ConfigError("--cache-mode applies to data sets of image files (imagenet, folder, flowers102, ...), "
                          f"not to {flat['data.dataset']}, which is held in memory anyway")
    if flat["train.layer_decay"] is not None and not 0.0 < flat["train.layer_decay"] <= 1.0:
        raise ConfigError(f"train.layer_decay must be in (0, 1] or null; got {flat['train.layer_decay']!r}")
    if not flat["train.backbone_lr_scale"] >= 0.0:
        raise ConfigError(f"train.backbone_lr_scale must be >= 0; got {flat['train.backbone_lr_scale']!r}")
    if flat["threads"] is not None and (not isinstance(flat["threads"], int) or flat["threads"] < 1):
        raise ConfigError(f"threads must be a positive integer or null; got {flat['threads']!r}")
    if not 0.0 < flat["train.ema_decay"] < 1.0:
        raise ConfigError(f"train.ema_decay must be in (0, 1); got {flat['train.ema_decay']!r}")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The --cfg and --opts flags shared by train and eval."""
    parser.add_argument("--cfg", metavar="FILE", help="YAML recipe: a file, or a shipped one by name "
                        "(digits, ms_mlp, vip, strip_mlp, raft_mlp, raft_mlp_deep, repmlpnet, or a fine-tuning recipe); "
                        "default: picked from the model (its family's recipe, or its own)")
    parser.add_argument("--opts", nargs="+", metavar="KEY VALUE", default=None,
                        help="override config keys, e.g. --opts train.base_lr 1e-3 aug.mixup 0")


def add_tracker_argument(parser: argparse.ArgumentParser) -> None:
    """The --tracker flag of the training commands."""
    parser.add_argument("--tracker", nargs="+", choices=TRACKERS, metavar="NAME",
                        help="experiment trackers, one or more of tensorboard (default), mlflow, wandb, clearml; "
                             "none: no tracker (docs/tracking.md)")


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Config overrides from the flags present in ``args`` (unset flags are None and left out)."""
    flags = {key: getattr(args, dest) for dest, key in FLAG_KEYS.items() if getattr(args, dest, None) is not None}
    if isinstance(flags.get("data.img_size"), list):  # --img-size SIDE or --img-size HEIGHT WIDTH
        sides = flags["data.img_size"]
        flags["data.img_size"] = sides[0] if len(sides) == 1 else sides
    return flags


def image_size(config: Mapping[str, Any]) -> tuple[int, int] | None:
    """``data.img_size`` as (height, width); None where the model's own size applies."""
    size = config["data"]["img_size"]
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def dump(config: Config) -> str:
    """The configuration as YAML text."""
    return yaml.safe_dump(config, sort_keys=False)
