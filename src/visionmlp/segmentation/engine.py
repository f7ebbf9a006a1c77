"""Training and evaluation of semantic segmentation: an iteration-based loop, read top to bottom.

A run trains for ``train.iterations`` updates (AdamW, polynomial decay of the learning rate, as the RaftMLP seed's
ADE20K setting), evaluates every ``train.eval_interval`` updates and at the end, and after each evaluation writes
``last.pt`` (atomically: a crash keeps the previous one), ``metrics.jsonl`` and TensorBoard events. The figures logged
for an evaluation are those ``visionmlp segment eval`` measures on the same checkpoint.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..checkpoint import atomic_save, read_checkpoint, writable_folder
from ..config import Config, ConfigError, dump
from ..data.datasets import subset_evenly
from ..data.loader import EvalShardSampler
from ..engine.distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    setup,
)
from ..engine.evaluate import autocast
from ..engine.reporting import RunRecorder, log, trackers_failed_on_error
from ..engine.trackers import check_installed
from ..engine.train import NonFiniteLossError, agree_on_resume_path, read_training_checkpoint, seed_everything
from .data import IGNORE_INDEX, EvalTransform, TrainTransform, build_dataset, collate_eval
from .metrics import ConfusionMatrix
from .model import Segmenter, build_segmenter

__all__ = ["evaluate", "load_segmenter", "predict_logits", "train"]


def crop_size(config: Config) -> tuple[int, int]:
    """The training crop (height, width), which grid-bound backbones are built for."""
    size = config["data"]["crop_size"]
    return int(size[0]), int(size[1])


def sliding_windows(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]
                    ) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right) of crops covering an image, the last of each row and column flush with its edge."""
    rows = max(math.ceil((height - crop[0]) / stride[0]), 0) + 1
    cols = max(math.ceil((width - crop[1]) / stride[1]), 0) + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            bottom, right = min(r * stride[0] + crop[0], height), min(c * stride[1] + crop[1], width)
            windows.append((max(bottom - crop[0], 0), max(right - crop[1], 0), bottom, right))
    return windows


@torch.no_grad()
def predict_logits(model: Segmenter, image: torch.Tensor, mode: str, crop: tuple[int, int],
                   stride: tuple[int, int]) -> torch.Tensor:
    """Class logits (classes, H, W) for one normalised image (3, H, W): one pass, or averaged sliding crops."""
    height, width = image.shape[-2:]
    if mode == "auto":
        fits = not model.backbone.fixed_size or (height <= crop[0] and width <= crop[1])
        mode = "whole" if fits else "slide"
    if mode == "whole":
        return model(image[None])[0]
    logits = image.new_zeros(model.num_classes, height, width)
    counts = image.new_zeros(1, height, width)
    for top, left, bottom, right in sliding_windows(height, width, crop, stride):
        logits[:, top:bottom, left:right] += model(image[None, :, top:bottom, left:right])[0]
        counts[:, top:bottom, left:right] += 1
    return logits / counts


@torch.no_grad()
def evaluate(model: Segmenter, loader: DataLoader, ctx: DistContext, config: Config) -> dict[str, float]:
    """mIoU, mAcc, aAcc (percent) over the loader's whole data set, every rank's share counted once."""
    model.eval()
    confusion = ConfusionMatrix(model.num_classes, ctx.device)
    test = config["test"]
    for images, labels in loader:
        for image, label in zip(images, labels):
            with autocast(ctx.device, config["train"]["amp"]):
                logits = predict_logits(model, image.to(ctx.device), test["mode"], crop_size(config),
                                        tuple(test["stride"]))
            logits = F.interpolate(logits[None].float(), size=label.shape, mode="bilinear", align_corners=False)
            confusion.update(logits[0].argmax(0), label.to(ctx.device))
    all_reduce_sum(confusion.matrix, ctx)
    return confusion.compute()


def poly_lr(base_lr: float, min_lr: float, power: float, iteration: int, total: int, warmup: int) -> float:
    """Polynomial decay from ``base_lr`` to ``min_lr`` over ``total`` updates, after a linear warm-up."""
    if iteration < warmup:
        return base_lr * (iteration + 1) / warmup
    return (base_lr - min_lr) * (1 - iteration / total) ** power + min_lr


def endless(loader: DataLoader, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches epoch after epoch from ``epoch`` on, each epoch shuffled by its number."""
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def build_loaders(config: Config, ctx: DistContext) -> tuple[DataLoader, DataLoader, list[str]]:
    """Training and validation loaders of this rank, and the class names."""
    data = config["data"]
    train_set = build_dataset(data["dataset"], "train", data["path"], data["num_classes"])
    val_set = build_dataset(data["dataset"], "val", data["path"], data["num_classes"])
    train_set.transform = TrainTransform(crop_size(config), data["scale"], data["ratio_range"],
                                         data["cat_max_ratio"], data["hflip"], data["photometric"])
    val_set.transform = EvalTransform(data["scale"])
    classes = list(train_set.classes)
    train_set = subset_evenly(train_set, data["max_train_images"])
    val_set = subset_evenly(val_set, data["max_val_images"])
    pin = data["pin_memory"] and ctx.device.type == "cuda"
    train_loader = DataLoader(
        train_set, batch_size=data["batch_size"], num_workers=data["workers"], pin_memory=pin, drop_last=True,
        sampler=DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=config["seed"]))
    val_loader = DataLoader(val_set, batch_size=1, num_workers=data["workers"], collate_fn=collate_eval,
                            sampler=EvalShardSampler(len(val_set), ctx.rank, ctx.world_size))
    if len(train_set) < data["batch_size"] * ctx.world_size:
        raise ConfigError(f"the training set has {len(train_set)} images, fewer than one batch of "
                          f"{data['batch_size']} x {ctx.world_size} processes; lower --batch-size")
    return train_loader, val_loader, classes


def train(config: Config) -> dict[str, Any]:
    """Run the configured training to the end; returns the last evaluation's record."""
    ctx = setup(config["device"])
    train_cfg = config["train"]
    output = Path(config["output"] or f"runs/segment-{config['model']['name']}-{config['data']['dataset']}")
    seed_everything(config["seed"] + ctx.rank)
    check_installed(config["trackers"])
    resume = agree_on_resume_path(config, output, ctx)  # before the data: a run in the way fails at once
    if config["threads"]:
        torch.set_num_threads(config["threads"])

    # ---- data, then the network for its classes
    train_loader, val_loader, classes = build_loaders(config, ctx)
    num_classes = config["data"]["num_classes"] or len(classes)
    model = build_segmenter(config["model"], num_classes, crop_size(config), config["model"]["pretrained"])
    model.to(ctx.device)
    model_without_ddp = model
    if ctx.distributed:
        if ctx.device.type == "cuda":  # batch statistics over all processes, as the seed's SyncBN (CUDA only)
            model = model_without_ddp = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    # ---- optimisation: the decoder at the base rate, norms and biases without weight decay
    decay, no_decay = [], []
    for param in model_without_ddp.parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": train_cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if train_cfg["optimizer"] == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=train_cfg["base_lr"],
                                                             betas=tuple(train_cfg["opt_betas"]))
    else:
        optimizer = torch.optim.SGD(groups, lr=train_cfg["base_lr"], momentum=0.9)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=train_cfg["amp"] == "fp16")
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)

    # ---- resume
    iteration, history = 0, []
    if resume is not None:
        checkpoint = read_training_checkpoint(resume, model_without_ddp, "iteration")
        model_without_ddp.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        iteration, history = checkpoint["iteration"], checkpoint["history"]
        seed_everything(config["seed"] + ctx.rank + 1000 * iteration)
        if ctx.is_main:
            log(f"resumed from {resume} at iteration {iteration}/{train_cfg['iterations']}")

    recorder = None
    if ctx.is_main:
        writable_folder(output)
        (output / "config.yaml").write_text(dump(config))
        recorder = RunRecorder(output, config, history, iteration, x_key="iteration")
        n_params = sum(p.numel() for p in model_without_ddp.parameters())
        log(f"{config['model']['decoder']} on {config['model']['name']} ({n_params / 1e6:.2f} M parameters, "
            f"{num_classes} classes, crop {crop_size(config)}) on {ctx.device} x {ctx.world_size} process(es)")
        if config["model"]["pretrained"] and resume is None:
            log(f"backbone initialised from {config['model']['pretrained']}"
                + "".join(f"; {note}" for note in model_without_ddp.backbone.loaded))
        log(f"data {config['data']['dataset']}: {len(train_loader.dataset)} train / {len(val_loader.dataset)} val "
            f"images; batch {config['data']['batch_size']} per process; output {output}")

    # ---- iterations
    total, interval = train_cfg["iterations"], train_cfg["eval_interval"]
    batches = endless(train_loader, epoch=iteration * config["data"]["batch_size"] * ctx.world_size
                      // max(len(train_loader.dataset), 1))
    record: dict[str, Any] = history[-1] if history else {}
    loss_sum, loss_count, interval_start = torch.zeros((), device=ctx.device), 0, time.perf_counter()
    # losses stay on the device and are read every print_freq iterations and before each evaluation, not at each
    # step; a non-finite loss makes the window's sum non-finite, which the read reports on every rank
    window, window_start = torch.zeros(2, dtype=torch.float64, device=ctx.device), iteration
    model.train()
    with trackers_failed_on_error(recorder):
        while iteration < total:
            images, labels = next(batches)
            images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
            lr = poly_lr(train_cfg["base_lr"], train_cfg["min_lr"], train_cfg["power"], iteration, total,
                         train_cfg["warmup_iterations"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(ctx.device, train_cfg["amp"]):
                loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if train_cfg["clip_grad"]:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), train_cfg["clip_grad"])
            scaler.step(optimizer)
            scaler.update()
            iteration += 1
            loss_sum += loss.detach()
            loss_count += 1
            window[0] += loss.detach().double()
            window[1] += 1
            if iteration % config["print_freq"] == 0 or iteration % interval == 0 or iteration == total:
                window_loss, steps = all_reduce_sum(window.clone(), ctx).tolist()
                window.zero_()
                if not math.isfinite(window_loss):
                    raise NonFiniteLossError(
                        f"stopping: the training loss is {window_loss} between iterations {window_start + 1} and "
                        f"{iteration}. The last good checkpoint, if any, is {output / 'last.pt'}. Try a lower learning "
                        "rate (--lr), --amp bf16 or none, or gradient clipping (train.clip_grad); --opts print_freq 1 "
                        "finds the iteration.")
                window_start = iteration
                if ctx.is_main and (iteration % config["print_freq"] == 0 or iteration == total):
                    log(f"iteration {iteration}/{total}: loss {window_loss / steps:.4f}  lr {lr:.3g}")
                    recorder.log_step(iteration, {"loss": window_loss / steps, "lr": lr})

            if iteration % interval == 0 or iteration == total:
                train_loss = float(all_reduce_sum(loss_sum, ctx)) / (loss_count * ctx.world_size)
                elapsed = time.perf_counter() - interval_start
                broadcast_buffers(model_without_ddp, ctx)
                metrics = evaluate(model_without_ddp, val_loader, ctx, config)
                model.train()
                record = {"iteration": iteration, "train_loss": train_loss, "lr": lr,
                          **{f"val_{k}": v for k, v in metrics.items()},
                          "images_per_s": loss_count * config["data"]["batch_size"] * ctx.world_size / elapsed}
                history.append(record)
                if ctx.is_main:
                    checkpoint = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                                  "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                                  "iteration": iteration, "history": history, "classes": classes, "config": config}
                    atomic_save(checkpoint, output / "last.pt")
                    recorder.write_epoch(record)
                    log(f"iteration {iteration}/{total}: train loss {train_loss:.4f}  val mIoU "
                        f"{metrics['mIoU']:.2f} %  mAcc {metrics['mAcc']:.2f} %  aAcc {metrics['aAcc']:.2f} %  "
                        f"({record['images_per_s']:.1f} img/s)")
                barrier(ctx)
                loss_sum, loss_count, interval_start = torch.zeros((), device=ctx.device), 0, time.perf_counter()

    if ctx.is_main:
        atomic_save(model_without_ddp.state_dict(), output / "model.safetensors")
        recorder.close()
        log(f"done: val mIoU {record.get('val_mIoU', float('nan')):.2f} %; outputs in {output}")
    return record


def load_segmenter(checkpoint_path: str | Path, deploy: bool = False) -> tuple[Segmenter, Config, list[str]]:
    """The network of a ``segment train`` checkpoint, its configuration and class names; ``deploy`` folds the
    backbone (RepMLPNet's re-parameterisation; BatchNorms elsewhere)."""
    checkpoint = read_checkpoint(checkpoint_path)
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "classes" not in checkpoint:
        raise ValueError(f"{checkpoint_path} is not a checkpoint of visionmlp segment train (last.pt): it records no "
                         "configuration; to segment with a classification checkpoint, train with --pretrained FILE")
    from .config import build_config

    config = build_config(base=checkpoint["config"])
    classes = list(checkpoint["classes"])
    num_classes = config["data"]["num_classes"] or len(classes)
    model = build_segmenter(config["model"], num_classes, crop_size(config))
    model.load_state_dict(checkpoint["model"])
    if deploy:
        from ..models import reparameterize

        reparameterize(model.backbone.body)
    return model.eval(), config, classes


def segment_image(model: Segmenter, image: torch.Tensor, config: Config, size: tuple[int, int]) -> torch.Tensor:
    """The class map (H, W) of one normalised image, at ``size``."""
    logits = predict_logits(model, image, config["test"]["mode"], crop_size(config), tuple(config["test"]["stride"]))
    return F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0].argmax(0)


def evaluate_checkpoint(checkpoint_path: str | Path, overrides: dict[str, Any], device: str = "auto",
                        deploy: bool = False) -> dict[str, float]:
    """Evaluate a ``segment train`` checkpoint on its data set (or the one ``overrides`` names)."""
    ctx = setup(device)
    model, config, _ = load_segmenter(checkpoint_path, deploy)
    from .config import SCHEMA, validate

    SCHEMA.merge(config, overrides, "command-line flags")
    validate(config)
    _, val_loader, _ = build_loaders(config, ctx)
    return evaluate(model.to(ctx.device), val_loader, ctx, config)
