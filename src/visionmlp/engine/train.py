"""``visionmlp train``: image-classification training on one process or many (torchrun + DDP).

The loop is written out step by step: build data, model, optimiser, scheduler, EMA and loss from
the resolved configuration; optionally resume; then per epoch train, validate, checkpoint, log.
Augmentation, mixup, optimisers, schedulers and EMA are timm's.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import random
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, get_optimizer_class, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import atomic_save, check_state_dict_fits, read_checkpoint, writable_folder
from ..config import (
    Config, ConfigError, add_config_arguments, add_tracker_argument, build_config, dump, flags_from_args, image_size,
    parse_opts,
)
from ..data import DataError, build_batch_transform, build_dataset, build_loader, build_transform, subset_evenly
from ..models import load_for_finetuning
from ..models.factory import run_classes
from .distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    broadcast_object,
    setup,
)
from .evaluate import autocast, build_model, evaluate, resolve_input_config
from .machine import resolve_amp
from .optim import parameter_groups, train_classifier_only
from .reporting import RunRecorder, log, trackers_failed_on_error, use_progress_bars
from .trackers import check_installed

ADAM_LIKE = ("adam", "adamw", "nadam", "nadamw", "radam", "adamp", "lamb", "lambw", "adan")

# Compiled graphs leave out the fast kernels the eager step uses on CPU (docs/performance.md has the figures).
COMPILE_ON_CPU_WARNING = (
    "warning: --compile makes a training step on a CPU slower, not faster (docs/performance.md); leave it off on a "
    "CPU, and use it on a GPU"
)
FROZEN_RANDOM_BACKBONE_WARNING = (
    "warning: --freeze-backbone trains the classifier alone, and without --pretrained the backbone stays at its random "
    "initialisation; pass --pretrained FILE (the checkpoint to fine-tune), or leave --freeze-backbone out"
)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``visionmlp train`` (each maps onto a config key; see visionmlp/config.py)."""
    parser.add_argument("--model", help="model name (default: the recipe's; for digits a reduced vip_s7)")
    parser.add_argument("--dataset", choices=("digits", "imagenet", "folder", "cifar10", "cifar100", "flowers102",
                                              "stanford_cars", "inat2018", "inat2019", "caltech101"),
                        help="data set (default: digits, built in; folder: any train/ + val/ tree of class folders)")
    parser.add_argument("--data-path", metavar="DIR", help="data set root (every data set but digits)")
    parser.add_argument("--batch-size", type=int, help="images per batch and process")
    parser.add_argument("--epochs", type=int, help="training epochs")
    parser.add_argument("--lr", type=float, help="base learning rate before batch-size scaling (train.base_lr)")
    parser.add_argument("--output", metavar="DIR", help="output folder (default: runs/<model>-<dataset>)")
    parser.add_argument("--resume", metavar="FILE|auto",
                        help="continue from a checkpoint; 'auto': from <output>/last.pt if it exists")
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="start afresh in an output folder that holds a run (without it, an error keeps that run)")
    parser.add_argument("--accumulation-steps", type=int, help="micro-batches per optimiser step")
    parser.add_argument("--use-checkpoint", action="store_true", default=None,
                        help="gradient checkpointing: less memory, more compute")
    parser.add_argument("--amp", choices=("auto", "none", "fp16", "bf16"),
                        help="mixed precision, replacing apex O0/O1 (default auto: bf16 on a GPU that has it, else "
                             "fp16; none on a CPU)")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the training forward and backward (evaluation stays eager)")
    parser.add_argument("--channels-last", action="store_true", default=None,
                        help="weights and batches in channels-last (NHWC) memory, as timm's --channels-last")
    parser.add_argument("--zip", action="store_true", default=None,
                        help="imagenet from train.zip/val.zip + train_map.txt/val_map.txt")
    parser.add_argument("--cache-mode", choices=("no", "part", "full"),
                        help="keep encoded images in memory: part = this rank's shard, full = all")
    parser.add_argument("--seed", type=int, help="random seed (a fixed seed makes CPU runs repeatable)")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--workers", type=int, help="data-loading worker processes per training process")
    parser.add_argument("--img-size", type=int, nargs="+", metavar="SIZE",
                        help="input resolution, one side or height and width (default: the model's); a --pretrained "
                             "checkpoint of another resolution is adapted (see README, Fine-tune on your data)")
    parser.add_argument("--pretrained", metavar="FILE",
                        help="initialise from a checkpoint (ours or official; not a folded one): fine-tuning. A "
                             "classifier for another number of classes is replaced")
    parser.add_argument("--drop-path", type=float, help="stochastic depth rate (default: the recipe's per variant)")
    parser.add_argument("--freeze-backbone", action="store_true", default=None,
                        help="train the classifier only (linear probing); train.backbone_lr_scale and "
                             "train.layer_decay set per-layer rates instead")
    parser.add_argument("--throughput", action="store_true", help="measure throughput instead of training")
    add_tracker_argument(parser)
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Resolve the configuration and train; returns the process exit status."""
    config = build_config(args.cfg, parse_opts(args.opts), flags_from_args(args))
    if args.throughput:
        return hand_over_to_benchmark(config)
    train(config)
    return 0


def hand_over_to_benchmark(config: Config) -> int:
    """``--throughput``: measure with ``visionmlp benchmark`` instead of training."""
    try:
        from .benchmark import run_benchmark
    except ImportError:
        print("visionmlp train --throughput: the benchmark module is not available in this installation; "
              "use `visionmlp benchmark`", file=sys.stderr)
        return 2
    device = config["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    result = run_benchmark(config["model"]["name"], config["data"]["batch_size"], config["data"]["img_size"], device)
    print(json.dumps(result, indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------------------------------
# reproducibility


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """This process's generator states, in types a weights-only checkpoint reader accepts."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------
# training


def read_training_checkpoint(path: Path, model: nn.Module, position_key: str) -> dict[str, Any]:
    """A run's checkpoint to resume from, checked: it holds training state (``position_key``: ``epoch`` or
    ``iteration``) and weights that fit ``model``."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, Mapping) or not {"model", "optimizer", position_key} <= set(checkpoint):
        raise ValueError(f"--resume {path}: not the last.pt of a run of this command (it holds no optimizer state "
                         f"and {position_key}); to start from its weights instead, use --pretrained")
    check_state_dict_fits(model, checkpoint["model"], f"this run's model (--resume {path})")
    return checkpoint


def resume_training_state(
    path: Path, ctx: DistContext, seed: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    scaler: torch.amp.GradScaler, ema: ModelEmaV3 | None = None,
) -> tuple[int, int, list[dict[str, Any]]]:
    """Load an epoch checkpoint into the run's state and each rank's random streams; returns the first epoch to run,
    the number of updates so far and the history of the epochs before."""
    checkpoint = read_training_checkpoint(path, model, "epoch")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None and checkpoint.get("scheduler"):
        scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    if ema is not None and checkpoint.get("model_ema") is not None:
        ema.load_state_dict(checkpoint["model_ema"])
    start_epoch = checkpoint["epoch"] + 1
    rng_states = checkpoint.get("rng", [])
    if len(rng_states) == ctx.world_size:
        restore_rng_state(rng_states[ctx.rank])
    else:  # another number of processes: fresh, still seeded, streams per rank
        seed_everything(seed + ctx.rank + 1000 * start_epoch)
    history = [r for r in checkpoint.get("history", []) if r["epoch"] < start_epoch]
    return start_epoch, checkpoint["num_updates"], history


def scaled_learning_rates(config: Config, world_size: int) -> tuple[float, float, float, float]:
    """(base, warm-up, minimum) learning rates scaled to the global batch, and the scale factor."""
    train_cfg = config["train"]
    global_batch = config["data"]["batch_size"] * world_size * train_cfg["accumulation_steps"]
    scale = global_batch / train_cfg["lr_base_batch"] if train_cfg["lr_base_batch"] else 1.0
    return train_cfg["base_lr"] * scale, train_cfg["warmup_lr"] * scale, train_cfg["min_lr"] * scale, scale


def resolve_resume_path(config: Config, output: Path) -> Path | None:
    """The checkpoint to resume from: ``--resume FILE``, or ``auto`` -> ``<output>/last.pt`` when present; a
    ConfigError where a fresh run would replace the run already in ``output``."""
    resume = config["resume"]
    if not resume:
        if (output / "last.pt").is_file() and not config["overwrite"]:
            raise ConfigError(
                f"{output} already holds a run (last.pt); --resume auto continues it, --output DIR starts this one "
                "elsewhere, --overwrite replaces it")
        return None
    if resume == "auto":
        last = output / "last.pt"
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume!r}: no such checkpoint file")
    return path


def agree_on_resume_path(config: Config, output: Path, ctx: DistContext) -> Path | None:
    """Rank 0's :func:`resolve_resume_path` on every rank (its error raised on every rank), so that all ranks resume
    together, start fresh together or stop together."""
    decision: Path | Exception | None = None
    if ctx.is_main:
        try:
            decision = resolve_resume_path(config, output)
        except (ConfigError, FileNotFoundError) as exc:
            decision = exc
    decision = broadcast_object(decision, ctx)
    if isinstance(decision, Exception):
        raise decision
    if decision is not None and not decision.is_file():
        raise FileNotFoundError(f"rank {ctx.rank} cannot see {decision}; to resume, every node needs the output "
                                "folder (a shared file system)")
    return decision


def optimizer_class(opt_name: str) -> Callable[..., torch.optim.Optimizer]:
    """The class (or partial) timm builds for ``opt_name``; a ConfigError for a name timm does not know."""
    try:
        return get_optimizer_class(opt_name)
    except ValueError:
        known = ", ".join(list_optimizers(exclude_filters=["bnb*", "fused*"]))
        raise ConfigError(
            f"train.optimizer {opt_name!r} is not an optimizer timm knows; choose one of {known}"
        ) from None


def train(config: Config) -> dict[str, Any]:
    """Run the configured training to the end; returns the last epoch's metrics."""
    ctx = setup(config["device"])
    data_cfg, train_cfg, aug = config["data"], config["train"], config["aug"]
    train_cfg["amp"] = resolve_amp(train_cfg["amp"], ctx.device)  # recorded as chosen, for eval to follow
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: cuDNN may pick its fastest kernels, as timm does
    output = Path(config["output"] or f"runs/{config['model']['name']}-{data_cfg['dataset']}")
    seed_everything(config["seed"] + ctx.rank)
    opt_name = train_cfg["optimizer"].lower()
    opt_class = optimizer_class(opt_name)  # before the data: a misspelt name fails at once
    resume_path = agree_on_resume_path(config, output, ctx)  # likewise a run in the way of this one
    check_installed(config["trackers"])
    if config["threads"]:
        torch.set_num_threads(config["threads"])

    # ---- data: datasets first, as the model's number of classes comes from them
    dataset_args = dict(data_path=data_cfg["path"], img_size=max(image_size(config) or [32]), use_zip=data_cfg["zip"],
                        cache_mode=data_cfg["cache_mode"], rank=ctx.rank, world_size=ctx.world_size,
                        flowers102_split=data_cfg["flowers102_split"], classes=data_cfg["classes"])
    train_set = build_dataset(data_cfg["dataset"], "train", None, **dataset_args)
    val_set = build_dataset(data_cfg["dataset"], "val", None, **dataset_args)
    num_classes = config["model"]["num_classes"] or len(train_set.classes)
    class_names = [str(name) for name in train_set.classes]  # recorded: predict's labels, eval's check of its data

    # ---- model, initialised from a checkpoint when fine-tuning
    model = build_model(config, num_classes)
    pretrained = config["model"]["pretrained"]
    adapted = load_for_finetuning(model, config["model"]["name"], pretrained, run_classes(config)) if pretrained else []
    if train_cfg["use_checkpoint"]:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError(f"--use-checkpoint: model {config['model']['name']!r} does not support it")
        model.set_grad_checkpointing(True)
    model.to(ctx.device, memory_format=torch.channels_last if train_cfg["channels_last"] else torch.preserve_format)
    model_without_ddp = model
    input_config = resolve_input_config(config, model)
    for dataset, training in ((train_set, True), (val_set, False)):
        dataset.transform = build_transform(config, input_config, training)
        if data_cfg["dataset"] == "digits":
            dataset.img_size = max(input_config["input_size"][1:])
    # what the collated batches still need on the device (data.normalize_on)
    train_batch_transform = build_batch_transform(config, input_config, True, ctx.device)
    val_batch_transform = build_batch_transform(config, input_config, False, ctx.device)
    train_set = subset_evenly(train_set, data_cfg["max_train_images"])
    val_set = subset_evenly(val_set, data_cfg["max_val_images"])
    loader_args = dict(batch_size=data_cfg["batch_size"], workers=data_cfg["workers"], rank=ctx.rank,
                       world_size=ctx.world_size, seed=config["seed"],
                       pin_memory=data_cfg["pin_memory"] and ctx.device.type == "cuda")
    train_loader = build_loader(train_set, training=True, shard_by_cache=data_cfg["cache_mode"] == "part",
                                **loader_args)
    val_loader = build_loader(val_set, training=False, **loader_args)

    # ---- optimisation: learning rates scale with the global batch as in the recipe's official script
    base_lr, warmup_lr, min_lr, lr_scale = scaled_learning_rates(config, ctx.world_size)
    opt_kwargs = {"eps": train_cfg["opt_eps"], "betas": tuple(train_cfg["opt_betas"])} if opt_name in ADAM_LIKE else {}
    if train_cfg["opt_fused"] and "fused" in inspect.signature(opt_class).parameters:
        opt_kwargs["fused"] = True
    groups = parameter_groups(model_without_ddp, train_cfg["weight_decay"], train_cfg["layer_decay"],
                              train_cfg["backbone_lr_scale"], train_cfg["freeze_backbone"])
    optimizer = create_optimizer_v2(groups, opt=opt_name, lr=base_lr, weight_decay=train_cfg["weight_decay"],
                                    momentum=train_cfg["momentum"], **opt_kwargs)
    accumulation = train_cfg["accumulation_steps"]
    updates_per_epoch = math.ceil(len(train_loader) / accumulation)
    # --epochs counts every epoch run; the cool-down at min_lr (ViP's recipe) is the tail of them
    num_epochs = train_cfg["epochs"]
    cooldown_epochs = min(train_cfg["cooldown_epochs"], num_epochs - 1)
    scheduler = None
    if train_cfg["sched"] != "none":
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=train_cfg["sched"], num_epochs=num_epochs - cooldown_epochs,
            decay_epochs=train_cfg["decay_epochs"], decay_rate=train_cfg["decay_rate"], min_lr=min_lr,
            warmup_lr=warmup_lr, warmup_epochs=train_cfg["warmup_epochs"], cooldown_epochs=cooldown_epochs,
            step_on_epochs=not train_cfg["sched_on_updates"], updates_per_epoch=updates_per_epoch)
    else:  # timm's schedulers apply each group's lr_scale at every update; without one, once here
        for group in optimizer.param_groups:
            group["lr"] *= group["lr_scale"]
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=train_cfg["amp"] == "fp16")
    ema = ModelEmaV3(model, decay=train_cfg["ema_decay"]) if train_cfg["ema"] else None
    mixup_fn = None
    if aug["mixup"] > 0 or aug["cutmix"] > 0 or aug["cutmix_minmax"] is not None:
        mixup_fn = Mixup(mixup_alpha=aug["mixup"], cutmix_alpha=aug["cutmix"], cutmix_minmax=aug["cutmix_minmax"],
                         prob=aug["mixup_prob"], switch_prob=aug["mixup_switch_prob"], mode=aug["mixup_mode"],
                         label_smoothing=train_cfg["label_smoothing"], num_classes=num_classes)
    if mixup_fn is not None:
        loss_fn: nn.Module = SoftTargetCrossEntropy()  # mixup already produces smoothed soft targets
    elif train_cfg["label_smoothing"] > 0:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=train_cfg["label_smoothing"])
    else:
        loss_fn = nn.CrossEntropyLoss()

    # ---- resume
    start_epoch, num_updates, history = 0, 0, []
    if resume_path is not None:
        start_epoch, num_updates, history = resume_training_state(
            resume_path, ctx, config["seed"], model_without_ddp, optimizer, scheduler, scaler, ema)
        if ctx.is_main:
            log(f"resumed from {resume_path} at epoch {start_epoch}/{num_epochs}")
    if ctx.distributed:
        # gradients as views of the buckets: no second copy of every gradient
        model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                        bucket_cap_mb=train_cfg["ddp_bucket_cap_mb"],
                                        static_graph=train_cfg["ddp_static_graph"], gradient_as_bucket_view=True)
    if train_cfg["compile"]:
        # around DDP, so that its graph breaks at the gradient buckets; shares the parameters of model_without_ddp
        model = torch.compile(model)
        if ctx.device.type == "cpu" and ctx.is_main:
            log(COMPILE_ON_CPU_WARNING)

    recorder = None
    if ctx.is_main:
        writable_folder(output)
        (output / "config.yaml").write_text(dump(config))
        recorder = RunRecorder(output, config, history, start_epoch)
        n_params = sum(p.numel() for p in model_without_ddp.parameters())
        log(f"model {config['model']['name']} ({n_params / 1e6:.2f} M parameters, {num_classes} classes, input "
            f"{tuple(input_config['input_size'])}) on {ctx.device} x {ctx.world_size} process(es)")
        if pretrained and resume_path is None:
            log(f"initialised from {pretrained}" + "".join(f"; {note}" for note in adapted))
        elif train_cfg["freeze_backbone"] and resume_path is None:
            log(FROZEN_RANDOM_BACKBONE_WARNING)
        log(f"data {data_cfg['dataset']}: {len(train_set)} train / {len(val_set)} val images; batch "
            f"{data_cfg['batch_size']} per process x {ctx.world_size} x {accumulation} accumulation; "
            f"lr {train_cfg['base_lr']:g} x {lr_scale:g} = {base_lr:g}; output {output}")

    # ---- epochs
    best_acc1 = max((r["val_acc1"] for r in history), default=0.0)
    record: dict[str, Any] = history[-1] if history else {}
    with trackers_failed_on_error(recorder):
        for epoch in range(start_epoch, num_epochs):
            train_loader.sampler.set_epoch(epoch)
            epoch_start = time.perf_counter()
            train_stats, num_updates = train_one_epoch(
                model, model_without_ddp, train_loader, train_batch_transform, optimizer, scheduler, scaler, loss_fn,
                mixup_fn, ema, ctx, config, epoch, num_epochs, num_updates, output, recorder)
            train_time = time.perf_counter() - epoch_start
            if train_stats["images"] == 0:
                raise DataError(f"epoch {epoch + 1}: not one training image could be read "
                                f"({train_stats['skipped_images']} skipped as unreadable); check the image files")
            broadcast_buffers(model_without_ddp, ctx)
            val_stats = evaluate(model_without_ddp, val_loader, ctx, amp=train_cfg["amp"],
                                 batch_transform=val_batch_transform)
            record = {
                "epoch": epoch,
                "train_loss": train_stats["loss"],
                "val_loss": val_stats["loss"],
                "val_acc1": val_stats["acc1"],
                "val_acc5": val_stats["acc5"],
                "lr": train_stats["lr"],
                "epoch_time_s": time.perf_counter() - epoch_start,
                "images_per_s": train_stats["images"] / train_time,
                "world_size": ctx.world_size,
                "skipped_images": train_stats["skipped_images"] + val_stats["skipped_images"],
            }
            if ema is not None:
                broadcast_buffers(ema.module, ctx)
                ema_stats = evaluate(ema.module, val_loader, ctx, amp=train_cfg["amp"],
                                     batch_transform=val_batch_transform)
                record.update(val_loss_ema=ema_stats["loss"], val_acc1_ema=ema_stats["acc1"],
                              val_acc5_ema=ema_stats["acc5"])
            if scheduler is not None:
                scheduler.step(epoch + 1)
            history.append(record)
            # every rank's generator states, so that a resumed run continues each rank's random streams exactly
            rng_states = all_gather_objects(capture_rng_state(), ctx)
            if ctx.is_main:
                is_best = record["val_acc1"] > best_acc1
                best_acc1 = max(best_acc1, record["val_acc1"])
                checkpoint = {
                    "model": model_without_ddp.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "model_ema": ema.state_dict() if ema is not None else None,
                    "epoch": epoch,
                    "num_updates": num_updates,
                    "best_acc1": best_acc1,
                    "history": history,
                    "rng": rng_states,
                    "config": config,
                    "classes": class_names,
                }
                atomic_save(checkpoint, output / "last.pt")
                if is_best:
                    atomic_save(checkpoint, output / "best.pt")
                recorder.write_epoch(record)
                log(f"epoch {epoch + 1}/{num_epochs}: train loss {record['train_loss']:.4f}  val loss "
                    f"{record['val_loss']:.4f}  top-1 {record['val_acc1']:.2f} %  top-5 {record['val_acc5']:.2f} %  "
                    f"({record['epoch_time_s']:.1f} s, {record['images_per_s']:.0f} img/s)"
                    + (f"  skipped {record['skipped_images']} unreadable images" if record["skipped_images"] else ""))
            barrier(ctx)

    if ctx.is_main:
        # the weights alone, with what eval and predict need to rebuild and label the model
        records = {"config": config, "classes": class_names}
        atomic_save({"model": model_without_ddp.state_dict(), **records}, output / "model.safetensors")
        if ema is not None:
            atomic_save({"model": ema.module.state_dict(), **records}, output / "model_ema.safetensors")
        recorder.close()
        if record:
            log(f"done: best top-1 {best_acc1:.2f} %, last top-1 {record['val_acc1']:.2f} %; outputs in {output}")
    return record


def train_one_epoch(
    model: nn.Module,
    model_without_ddp: nn.Module,
    loader: torch.utils.data.DataLoader,
    batch_transform: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    loss_fn: nn.Module,
    mixup_fn: Mixup | None,
    ema: ModelEmaV3 | None,
    ctx: DistContext,
    config: Config,
    epoch: int,
    num_epochs: int,
    num_updates: int,
    output: Path,
    recorder: RunRecorder | None = None,
) -> tuple[dict[str, float], int]:
    """One pass over the training data; returns (mean loss, last lr, images seen, skipped) and the update count.
    ``batch_transform`` finishes each batch on the device (:func:`build_batch_transform`); ``recorder`` (rank 0's)
    gets the loss and learning rate at every console step."""
    train_cfg = config["train"]
    accumulation, clip_grad, amp = train_cfg["accumulation_steps"], train_cfg["clip_grad"], train_cfg["amp"]
    model.train()
    if train_cfg["freeze_backbone"]:
        train_classifier_only(model_without_ddp)
    optimizer.zero_grad(set_to_none=True)
    images_seen, skipped_total, num_steps, print_freq = 0, 0, len(loader), config["print_freq"]
    # losses stay on the device and are read every print_freq steps: a read per step would wait for the device
    # at every step; a non-finite loss makes the window's sum non-finite, which the next read reports
    window = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # (sum of losses, steps) since the last read
    epoch_loss, epoch_steps, window_start = 0.0, 0, 0
    bar = None
    if ctx.is_main and use_progress_bars():
        from tqdm import tqdm

        bar = tqdm(total=num_steps, desc=f"epoch {epoch + 1}/{num_epochs}", leave=False)
    for step, (images, targets, skipped) in enumerate(loader):
        skipped_total += skipped
        if images is not None:
            images = batch_transform(images.to(ctx.device, non_blocking=True))
            targets = targets.to(ctx.device, non_blocking=True)
            if mixup_fn is not None:
                if images.shape[0] % 2:  # mixup pairs images; a batch shortened by unreadable files may be odd
                    images, targets = images[:-1], targets[:-1]
                images, targets = mixup_fn(images, targets)
            is_update_step = (step + 1) % accumulation == 0 or step + 1 == num_steps
            # gradients are all-reduced only on the micro-batch that ends an accumulation
            sync = model.no_sync() if ctx.distributed and not is_update_step else contextlib.nullcontext()
            with sync:
                with autocast(ctx.device, amp):
                    loss = loss_fn(model(images), targets)
                scaler.scale(loss / accumulation).backward()
            window[0] += loss.detach().double()
            window[1] += 1
            if is_update_step:
                if clip_grad:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
                    nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                num_updates += 1
                if scheduler is not None:
                    scheduler.step_update(num_updates)
                if ema is not None:
                    ema.update(model_without_ddp, step=num_updates)
            images_seen += images.shape[0]

        if (step + 1) % print_freq == 0 or step + 1 == num_steps:
            # every rank reads the same sums and so agrees to stop: ranks that carried on would wait forever
            loss_sum, steps = all_reduce_sum(window.clone(), ctx).tolist()
            window.zero_()
            if not math.isfinite(loss_sum):
                raise NonFiniteLossError(
                    f"stopping: the training loss is {loss_sum} at epoch {epoch + 1}, between steps "
                    f"{window_start + 1} and {step + 1}. The last good checkpoint, if any, is {output / 'last.pt'}. "
                    "Try a lower learning rate (--lr / --opts train.base_lr), --amp bf16 or none, or gradient "
                    "clipping (train.clip_grad); --opts print_freq 1 finds the step."
                )
            epoch_loss, epoch_steps, window_start = epoch_loss + loss_sum, epoch_steps + steps, step + 1
            lr = optimizer.param_groups[0]["lr"]
            mean_loss = loss_sum / max(steps, 1)
            if recorder is not None:
                recorder.log_step(num_updates, {"loss": mean_loss, "lr": lr})
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            elif ctx.is_main:
                log(f"epoch {epoch + 1}/{num_epochs} step {step + 1}/{num_steps}: loss {mean_loss:.4f} lr {lr:.3e}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    counts = torch.tensor([images_seen, skipped_total], dtype=torch.float64, device=ctx.device)
    images_seen, skipped_total = (int(n) for n in all_reduce_sum(counts, ctx).tolist())  # over all ranks
    return {"loss": epoch_loss / max(1, epoch_steps), "lr": optimizer.param_groups[0]["lr"], "images": images_seen,
            "skipped_images": skipped_total}, num_updates
