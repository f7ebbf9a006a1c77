"""``visionmlp eval``: top-1, top-5 and loss of a checkpoint on a validation set; the evaluation loop of training."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import check_state_dict_fits, read_checkpoint, unwrap_state_dict
from ..config import (
    ConfigError, add_config_arguments, build_config, family_recipe, flags_from_args, image_size, parse_opts,
)
from ..data import DataError, build_batch_transform, build_dataset, build_loader, build_transform, subset_evenly
from ..inference import optimize_for_inference
from ..models import MODEL_NAMES, convert_official_state_dict, create_model, deploy_model_from_state_dict, family_module
from .distributed import DistContext, all_reduce_sum, setup
from .machine import DTYPES, resolve_amp, resolve_dtype

AMP_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def model_kwargs(config: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
    """Constructor arguments of the configured model."""
    model_cfg = config["model"]
    kwargs = dict(model_cfg["kwargs"] or {})
    kwargs.update(num_classes=num_classes, drop_rate=model_cfg["drop_rate"], drop_path_rate=model_cfg["drop_path_rate"])
    # our variants take the input size as an argument; timm's CNNs (used in tests) have none
    size = image_size(config)
    if model_cfg["dynamic_img_size"]:  # the model keeps the grid its weights were trained on, any input size
        kwargs["dynamic_img_size"] = True
    elif model_cfg["name"] in MODEL_NAMES and size:
        kwargs["img_size"] = size[0] if size[0] == size[1] else size
    return kwargs


def recorded_config(checkpoint: Any) -> Mapping[str, Any] | None:
    """The run configuration a ``visionmlp train`` checkpoint records; ``None`` for any other checkpoint."""
    config = checkpoint.get("config") if isinstance(checkpoint, Mapping) else None
    return config if isinstance(config, Mapping) and isinstance(config.get("model"), Mapping) else None


def checkpoint_model(
    checkpoint: Any, source: str, model_name: str | None = None, num_classes: int | None = None
) -> tuple[str, dict[str, Any], Mapping[str, Any] | None]:
    """The model name, constructor arguments and recorded run configuration for ``checkpoint`` (read from ``source``).

    A checkpoint of ``visionmlp train`` records its model (variant, architecture, classes, input size), so
    ``model_name`` and ``num_classes`` may be ``None``; given, they must agree with it. Any other checkpoint
    needs ``model_name`` and has ``num_classes`` classes (default 1000).
    """
    config = recorded_config(checkpoint)
    if config is None:
        if model_name is None:
            raise ValueError(f"--model is needed: {source} does not record which model it holds")
        return model_name, {"num_classes": 1000 if num_classes is None else num_classes}, None
    name = config["model"]["name"]
    if model_name not in (None, name):
        raise ValueError(f"{source} holds {name} (recorded by visionmlp train), not {model_name}; leave out --model")
    recorded_classes = config["model"]["num_classes"]
    if recorded_classes is None:
        # the run took the class count from its data set, which need not be on this machine
        classifier = timm.get_pretrained_cfg_value(name, "classifier") if timm.is_model(name) else None
        weight = unwrap_state_dict(checkpoint).get(f"{classifier}.weight")
        recorded_classes = 0 if weight is None else int(weight.shape[0])
    if num_classes not in (None, recorded_classes):
        raise ValueError(f"{source} holds a {recorded_classes}-class {name}, not {num_classes} classes; "
                         "leave out --num-classes")
    return name, model_kwargs(config, recorded_classes), config


def recorded_class_names(checkpoint: Any) -> list[str] | None:
    """The class names a ``visionmlp train`` checkpoint records, in label order (None for any other checkpoint)."""
    names = checkpoint.get("classes") if isinstance(checkpoint, Mapping) else None
    return [str(name) for name in names] if names else None


def check_same_classes(recorded: list[str] | None, found: list[str], source: str) -> None:
    """A ValueError where the data's classes are not the ones the model was trained on, in the same order. Numbered
    classes (a zip map's, the digits') name no class, so they are not compared."""
    found = [str(name) for name in found]
    numbered = [str(i) for i in range(len(found))]
    if recorded is None or recorded == found or numbered in (recorded, found):
        return
    differ = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(recorded, found)) if a != b][:3]
    raise ValueError(f"the data's classes are not those {source} was trained on ({len(recorded)} recorded, "
                     f"{len(found)} here; first differences, recorded vs here: {', '.join(differ) or 'none'}); "
                     "evaluate on a data set with the same class folders")


def checkpoint_variant(
    checkpoint: Any, source: str, model_name: str | None = None, num_classes: int | None = None
) -> tuple[str, dict[str, Any], Mapping[str, Any] | None]:
    """:func:`checkpoint_model` for the commands that handle visionmlp's variants only: any other model is a
    ValueError that says so."""
    name, kwargs, config = checkpoint_model(checkpoint, source, model_name, num_classes)
    if name not in MODEL_NAMES and config is not None:
        raise ValueError(f"{source} holds the timm model {name!r}; this command handles visionmlp's variants")
    family_module(name)  # any other --model: a ValueError naming the variants
    return name, kwargs, config


def check_trained_grid(name: str, trained: Mapping[str, Any], img_size: int | tuple[int, int], source: str) -> None:
    """A ValueError where variant ``name`` built for ``img_size`` has other weight shapes than built with ``trained``,
    the constructor arguments of the run that wrote ``source``: eval, predict and export run a run's checkpoint at
    another input size only where its weights load as they are (``visionmlp convert --img-size`` resamples them)."""
    if img_size == trained.get("img_size"):
        return
    with torch.device("meta"):
        shapes = [{key: value.shape for key, value in timm.create_model(name, **kwargs).state_dict().items()}
                  for kwargs in (trained, {**trained, "img_size": img_size})]
    if shapes[0] == shapes[1]:
        return
    size = trained.get("img_size")
    sides = (size, size) if isinstance(size, int) else size
    trained_at = f"{sides[0]}x{sides[1]}" if sides else "its default size"
    fix = ("; a RaftMLP takes other input sizes where it was trained with --opts model.dynamic_img_size true"
           if name.startswith("raft_mlp") else
           ", or resample them for another into a new checkpoint (a start for fine-tuning) with visionmlp convert "
           f"--checkpoint {source} --img-size SIZE --output FILE")
    raise ValueError(f"{source} holds a {name} trained at {trained_at}, whose token-mixing weights are sized for that "
                     f"input: run it at that size (leave out --img-size){fix}")


def build_model(config: Mapping[str, Any], num_classes: int) -> nn.Module:
    """The configured model, freshly initialised: a visionmlp variant (through its factory) or any other timm model
    (``model.pretrained`` is loaded by the training run, :func:`visionmlp.models.load_for_finetuning`)."""
    name = config["model"]["name"]
    kwargs = model_kwargs(config, num_classes)
    if config["model"]["dynamic_img_size"] and not name.startswith("raft_mlp"):
        raise ConfigError(f"model.dynamic_img_size is RaftMLP's way of taking other input sizes; {name} is built for "
                          "its input size instead: set data.img_size (--img-size), and a checkpoint of another size "
                          "is resampled on load")
    if name in MODEL_NAMES:
        return create_model(name, **kwargs)
    if not timm.is_model(name):
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)} (or any timm model name)")
    return timm.create_model(name, **kwargs)


def resolve_input_config(config: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """Input size, interpolation, mean, std and crop ratio: the config's where set, else the model's defaults."""
    data_config = resolve_data_config(model=model)
    data = config["data"]
    size = image_size(config)
    if size:
        data_config["input_size"] = (3, *size)
    for key in ("interpolation", "crop_pct", "mean", "std"):
        if data[key] is not None:
            data_config[key] = tuple(data[key]) if key in ("mean", "std") else data[key]
    return data_config


def transformed_for(dataset: Dataset, config: Mapping[str, Any], model: nn.Module) -> Dataset:
    """``dataset`` (a validation split) with the evaluation preprocessing of ``config`` for ``model``."""
    data_config = resolve_input_config(config, model)
    dataset.transform = build_transform(config, data_config, training=False)
    if config["data"]["dataset"] == "digits":
        dataset.img_size = max(data_config["input_size"][1:])
    return dataset


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``--amp fp16|bf16``; a no-op for ``none``."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    ctx: DistContext,
    amp: str = "none",
    dtype: torch.dtype | None = None,
    batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Loss and top-1/top-5 accuracy (percent) over the whole loader, summed over all ranks.

    Pass the bare model, not the DDP wrapper: ranks may hold one batch more or less than others,
    and DDP's forward would wait for the ranks that have finished. ``dtype`` is that of a model cast to it; its
    images are cast alike, after ``batch_transform`` (the loader's :func:`build_batch_transform`: uint8 batches
    normalised, channels-last memory) has finished them on the device.
    """
    model.eval()
    # loss sum, top-1 hits, top-5 hits, images, unreadable images
    totals = torch.zeros(5, dtype=torch.float64, device=ctx.device)
    for images, targets, skipped in loader:
        totals[4] += skipped
        if images is None:
            continue
        images = images.to(ctx.device, non_blocking=True)
        if batch_transform is not None:
            images = batch_transform(images)
        images = images.to(dtype=dtype)
        targets = targets.to(ctx.device, non_blocking=True)
        with autocast(ctx.device, amp):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        totals[0] += F.cross_entropy(logits, targets, reduction="sum")
        totals[1] += hits[:, :1].sum()
        totals[2] += hits.sum()
        totals[3] += targets.numel()
    loss_sum, top1, top5, count, skipped = all_reduce_sum(totals, ctx).tolist()
    if count == 0:
        raise DataError("the validation set yielded no readable images")
    return {"loss": loss_sum / count, "acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count,
            "images": int(count), "skipped_images": int(skipped)}


def _fits(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> bool:
    try:
        check_state_dict_fits(model, state_dict, "")
    except ValueError:
        return False
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``visionmlp eval``."""
    parser.add_argument("--model", help="model name (default: the one recorded in the checkpoint)")
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="last.pt / best.pt / .safetensors from visionmlp train, or an official checkpoint")
    parser.add_argument("--dataset", choices=("digits", "imagenet", "folder", "cifar10", "cifar100", "flowers102",
                                              "stanford_cars", "inat2018", "inat2019", "caltech101"),
                        help="data set (default: the checkpoint's recorded one, else the family recipe's: imagenet; "
                             "folder: a val/ folder of class folders, train/ beside it not needed)")
    parser.add_argument("--data-path", metavar="DIR", help="data set root (not needed for digits)")
    parser.add_argument("--batch-size", type=int, help="images per batch and process")
    parser.add_argument("--workers", type=int, help="data-loading worker processes")
    parser.add_argument("--img-size", type=int, nargs="+", metavar="SIZE",
                        help="input resolution: one side, or height and width")
    parser.add_argument("--zip", action="store_true", default=None, help="read val.zip + val_map.txt")
    parser.add_argument("--cache-mode", choices=("no", "part", "full"), help="in-memory cache of encoded images")
    parser.add_argument("--amp", choices=("auto", "none", "fp16", "bf16"),
                        help="autocast precision (default: the run's own; none for an official or bare checkpoint)")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights stored in the checkpoint")
    parser.add_argument("--deploy", action="store_true",
                        help="evaluate the folded inference form; the checkpoint may be in training form (folded "
                             "after loading) or deploy form (from visionmlp convert --deploy). To compare the two "
                             "forms without data, use visionmlp convert --check")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="cast the weights and images to this dtype (default: fp32); unlike --amp, every "
                             "operation then runs in it, as visionmlp benchmark's fast path does")
    parser.add_argument("--channels-last", action="store_true", default=None,
                        help="channels-last weights and images (default: as the run was trained, train.channels_last)")
    parser.add_argument("--compile", dest="compile_frozen", action="store_true",
                        help="torch.compile the model with its weights frozen into the graph, as visionmlp "
                             "benchmark --compile does")
    parser.add_argument("--allow-unsafe-pickle", action="store_true",
                        help="read a trusted legacy checkpoint that needs full unpickling")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint and print top-1, top-5 and loss."""
    result = evaluate_checkpoint(args)
    if result is None:  # not rank 0
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['model']} on {result['dataset']} ({result['images']} images): "
              f"top-1 {result['acc1']:.2f} %  top-5 {result['acc5']:.2f} %  loss {result['loss']:.4f}")
    return 0


def evaluate_checkpoint(args: argparse.Namespace) -> dict[str, Any] | None:
    """Build the model from the checkpoint's recorded config (when it has one) and evaluate it."""
    checkpoint = read_checkpoint(args.checkpoint, allow_unsafe_pickle=args.allow_unsafe_pickle)
    recorded = recorded_config(checkpoint)
    flags = flags_from_args(args)
    if recorded is not None:
        name, trained, _ = checkpoint_model(checkpoint, args.checkpoint, args.model)  # a --model that disagrees fails
        # the recorded run's model and input settings, with only evaluation-relevant keys overridable
        recorded = {**recorded, "resume": None, "output": None}
        config = build_config(args.cfg, parse_opts(args.opts), flags, base=recorded)
        img_size = model_kwargs(config, trained["num_classes"]).get("img_size")  # None: any input size
        if name in MODEL_NAMES and img_size is not None:
            check_trained_grid(name, trained, img_size, args.checkpoint)
    else:
        if args.model is None:
            raise ConfigError("--model is needed: this checkpoint does not record which model it holds")
        # an official or bare checkpoint: evaluate as its family's recipe does (resize, crop, interpolation), in
        # fp32 unless --amp (or --opts train.amp) asks otherwise
        recipe = args.cfg or family_recipe(args.model)
        config = build_config(recipe, {"train.amp": "none", **parse_opts(args.opts)}, flags, pick_recipe=False)
    ctx = setup(config["device"])
    dtype = resolve_dtype(args.dtype, ctx.device)
    amp = resolve_amp(config["train"]["amp"], ctx.device)
    if dtype != torch.float32:
        if args.amp not in (None, "none"):
            raise ValueError(f"--dtype {args.dtype} casts the weights themselves and --amp {args.amp} autocasts "
                             "fp32 ones: give one of the two")
        amp = "none"  # a run recorded with autocast is evaluated in the dtype asked for
    data = config["data"]
    dataset = build_dataset(data["dataset"], "val", None, data_path=data["path"],
                            img_size=max(image_size(config) or [32]), use_zip=data["zip"],
                            cache_mode=data["cache_mode"], rank=ctx.rank, world_size=ctx.world_size,
                            flowers102_split=data["flowers102_split"], classes=data["classes"])
    num_classes = config["model"]["num_classes"] or len(dataset.classes)
    check_same_classes(recorded_class_names(checkpoint), list(dataset.classes), args.checkpoint)
    if args.ema:
        if not isinstance(checkpoint, Mapping) or checkpoint.get("model_ema") is None:
            raise ValueError("--ema: this checkpoint holds no EMA weights (train with --opts train.ema true)")
        checkpoint = checkpoint["model_ema"]
    state_dict = unwrap_state_dict(checkpoint)
    name = config["model"]["name"]
    if args.deploy and name in MODEL_NAMES:
        # a training-form, official or folded checkpoint, evaluated in the folded form (strict)
        model = deploy_model_from_state_dict(name, state_dict, **model_kwargs(config, num_classes))
    else:
        model = build_model(config, num_classes)
        if recorded is None and name in MODEL_NAMES and not _fits(model, state_dict):
            # not in our layout: an official checkpoint, which the family's converter maps onto ours
            state_dict = convert_official_state_dict(name, checkpoint, **model_kwargs(config, num_classes))
        check_state_dict_fits(model, state_dict, repr(name))  # strict: a classifier of another size is an error
        model.load_state_dict(state_dict, strict=True)
    dataset = subset_evenly(transformed_for(dataset, config, model), data["max_val_images"])
    loader = build_loader(dataset, training=False, batch_size=data["batch_size"], workers=data["workers"],
                          rank=ctx.rank, world_size=ctx.world_size, pin_memory=ctx.device.type == "cuda")
    batch_transform = build_batch_transform(config, resolve_input_config(config, model), False, ctx.device)
    # --channels-last, or as the run was trained and validated; the batch transform lays the images out alike
    channels_last = config["train"]["channels_last"]
    model = optimize_for_inference(model, dtype=dtype, channels_last=channels_last, fold=args.deploy,
                                   compile=args.compile_frozen, device=ctx.device, inplace=True)
    metrics = evaluate(model, loader, ctx, amp=amp, dtype=dtype, batch_transform=batch_transform)
    if metrics["skipped_images"]:
        print(f"skipped {metrics['skipped_images']} unreadable images", file=sys.stderr)
    if not ctx.is_main:
        return None
    return {"model": config["model"]["name"], "checkpoint": str(args.checkpoint), "dataset": data["dataset"],
            "dtype": args.dtype, "amp": amp, "channels_last": channels_last, "compile": args.compile_frozen, **metrics}
