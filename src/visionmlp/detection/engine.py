"""``visionmlp detect train``: the detection training loop, on one process or many (torchrun + DDP), and the COCO
evaluation it runs after every epoch.

Written out step by step as ``visionmlp train`` is: data, detector, optimiser and schedule from the resolved
configuration; optionally resume; then per epoch train, evaluate, checkpoint, log. The schedule is the seed's 1x:
AdamW, a linear warm-up per iteration, the rate divided by ten after the epochs of ``train.lr_steps``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import ChainedScheduler, LinearLR, MultiStepLR
from torch.utils.data import DataLoader

from ..checkpoint import atomic_save, writable_folder
from ..config import Config, dump
from ..data import DataError
from ..engine.distributed import DistContext, all_gather_objects, all_reduce_sum, barrier, broadcast_object, setup
from ..engine.evaluate import autocast
from ..engine.reporting import RunRecorder, log, trackers_failed_on_error, use_progress_bars
from ..engine.trackers import check_installed
from ..engine.train import (
    NonFiniteLossError,
    agree_on_resume_path,
    capture_rng_state,
    optimizer_class,
    resume_training_state,
    seed_everything,
)
from .coco_eval import coco_evaluate, detections_to_coco
from .config import resize_policy
from .data import build_dataset, build_loader
from .model import build_detector


def iou_types(detector: str) -> tuple[str, ...]:
    """The COCO evaluation types of a detector: boxes, and masks for Mask R-CNN."""
    return ("bbox", "segm") if detector == "mask_rcnn" else ("bbox",)


def default_output(config: Config) -> Path:
    """``output``, or ``runs/detect-<detector>-<model>-<dataset>``."""
    return Path(config["output"] or f"runs/detect-{config['detector']}-{config['model']['name']}-"
                                    f"{config['data']['dataset']}")


def to_device(targets: Sequence[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """Targets with their tensors on ``device``."""
    return [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
            for t in targets]


def summary(metrics: dict[str, dict[str, float]]) -> str:
    """``box AP 0.412 AP50 0.713  mask AP ...`` for a log line."""
    names = {"bbox": "box", "segm": "mask"}
    return "  ".join(f"{names[kind]} AP {values['AP']:.3f} AP50 {values['AP50']:.3f}"
                     for kind, values in metrics.items())


# ---------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, ctx: DistContext, coco_gt: Any, category_ids: Sequence[int],
             kinds: Sequence[str], amp: str = "none") -> dict[str, dict[str, float]]:
    """COCO AP of ``model`` over ``loader``'s images, every rank's detections scored together on rank 0.

    Pass the bare model, not the DDP wrapper: ranks may hold one batch more or less than others.
    """
    model.eval()
    image_ids: list[int] = []
    results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for images, targets in loader:
        with autocast(ctx.device, amp):
            outputs = model([image.to(ctx.device, non_blocking=True) for image in images])
        for target, output in zip(targets, outputs):
            image_ids.append(target["image_id"])
            for kind, entries in detections_to_coco(output, target["image_id"], category_ids).items():
                results[kind].extend(entries)
    gathered = all_gather_objects((image_ids, results), ctx)
    metrics = None
    if ctx.is_main:
        merged = {kind: [entry for _, part in gathered for entry in part[kind]] for kind in kinds}
        metrics = coco_evaluate(coco_gt, merged, [i for ids, _ in gathered for i in ids])
    return broadcast_object(metrics, ctx)


# ---------------------------------------------------------------------------------------------------
# training


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config, iters_per_epoch: int) -> ChainedScheduler:
    """Per-iteration rate factors: a linear warm-up from ``warmup_ratio``, times ``lr_gamma`` after each epoch of
    ``lr_steps`` (mmdetection's ``step`` policy with linear warm-up)."""
    train_cfg = config["train"]
    warmup = LinearLR(optimizer, start_factor=train_cfg["warmup_ratio"] if train_cfg["warmup_iters"] else 1.0,
                      total_iters=max(1, train_cfg["warmup_iters"]))
    steps = MultiStepLR(optimizer, [epoch * iters_per_epoch for epoch in train_cfg["lr_steps"]],
                        gamma=train_cfg["lr_gamma"])
    return ChainedScheduler([warmup, steps], optimizer)


def train(config: Config) -> dict[str, Any]:
    """Run the configured training to the end; returns the last epoch's record."""
    ctx = setup(config["device"])
    data_cfg, train_cfg, detector = config["data"], config["train"], config["detector"]
    output = default_output(config)
    seed_everything(config["seed"] + ctx.rank)
    opt_name = train_cfg["optimizer"].lower()
    optimizer_class(opt_name)  # before the data: a misspelt name fails at once
    resume_path = agree_on_resume_path(config, output, ctx)  # likewise a run in the way of this one
    check_installed(config["trackers"])
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    kinds = iou_types(detector)

    # ---- data: the classes are the data set's (the annotation file's categories)
    train_set = build_dataset(config, "train", with_masks="segm" in kinds)
    val_set = build_dataset(config, "val", with_masks=False)  # scored against the annotation file, not the targets
    if tuple(train_set.category_ids) != tuple(val_set.category_ids):
        raise DataError("the training and validation annotation files name different categories")
    if len(train_set) == 0 or len(val_set) == 0:
        raise DataError(f"no images to train on or to evaluate ({len(train_set)} train, {len(val_set)} val)")
    classes, category_ids = list(train_set.classes), list(train_set.category_ids)
    loader_args = dict(batch_size=data_cfg["batch_size"], workers=data_cfg["workers"], rank=ctx.rank,
                       world_size=ctx.world_size, seed=config["seed"],
                       pin_memory=data_cfg["pin_memory"] and ctx.device.type == "cuda")
    train_loader = build_loader(train_set, training=True, **loader_args)
    val_loader = build_loader(val_set, training=False, **loader_args)

    # ---- detector (the backbone initialised from model.pretrained) and optimisation
    model = build_detector(config, len(classes) + 1).to(ctx.device)
    model_without_ddp = model
    global_batch = data_cfg["batch_size"] * ctx.world_size
    lr_scale = global_batch / train_cfg["lr_base_batch"] if train_cfg["lr_base_batch"] else 1.0
    base_lr = train_cfg["base_lr"] * lr_scale
    # mmdetection's AdamW decays every parameter, norms and biases included
    optimizer = create_optimizer_v2(model, opt=opt_name, lr=base_lr, weight_decay=train_cfg["weight_decay"],
                                    filter_bias_and_bn=False)
    scheduler = build_scheduler(optimizer, config, len(train_loader))
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=train_cfg["amp"] == "fp16")
    num_epochs = train_cfg["epochs"]

    # ---- resume
    start_epoch, num_updates, history = 0, 0, []
    if resume_path is not None:
        start_epoch, num_updates, history = resume_training_state(
            resume_path, ctx, config["seed"], model_without_ddp, optimizer, scheduler, scaler)
        if ctx.is_main:
            log(f"resumed from {resume_path} at epoch {start_epoch}/{num_epochs}")
    if ctx.distributed:
        # RetinaNet reads C3-C5 only: a simple pyramid's stride-4 level then takes no part in the loss
        unused = detector == "retinanet" and model_without_ddp.backbone.body.simple_pyramid is not None
        model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                        find_unused_parameters=unused)

    recorder = None
    if ctx.is_main:
        writable_folder(output)
        (output / "config.yaml").write_text(dump(config))
        recorder = RunRecorder(output, config, history, start_epoch)
        n_params = sum(p.numel() for p in model_without_ddp.parameters())
        short, long = resize_policy(config)
        sizing = f"letterboxed to {long}" if short == long else f"resized to fit {long} x {short} keeping their aspect"
        log(f"{detector} on {config['model']['name']} ({n_params / 1e6:.2f} M parameters, {len(classes)} classes, "
            f"images {sizing}) on {ctx.device} x {ctx.world_size} process(es)")
        if config["model"]["pretrained"] and resume_path is None:
            log(f"backbone initialised from {config['model']['pretrained']}"
                + "".join(f"; {note}" for note in model_without_ddp.backbone.body.loaded))
        log(f"data {data_cfg['dataset']}: {len(train_set)} train / {len(val_set)} val images; batch "
            f"{data_cfg['batch_size']} per process x {ctx.world_size}; lr {train_cfg['base_lr']:g} x {lr_scale:g} = "
            f"{base_lr:g}; output {output}")

    # ---- epochs
    best_ap = max((r["bbox"]["AP"] for r in history), default=-1.0)
    record: dict[str, Any] = history[-1] if history else {}
    with trackers_failed_on_error(recorder):
        for epoch in range(start_epoch, num_epochs):
            train_loader.sampler.set_epoch(epoch)
            epoch_start = time.perf_counter()
            train_stats, num_updates = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, ctx, config,
                                                       epoch, num_updates, output, recorder)
            train_time = time.perf_counter() - epoch_start
            metrics = evaluate(model_without_ddp, val_loader, ctx, val_set.coco, category_ids, kinds, train_cfg["amp"])
            record = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats["losses"].items()}, **metrics,
                      "lr": train_stats["lr"], "epoch_time_s": time.perf_counter() - epoch_start,
                      "images_per_s": train_stats["images"] / train_time, "world_size": ctx.world_size}
            history.append(record)
            rng_states = all_gather_objects(capture_rng_state(), ctx)
            if ctx.is_main:
                is_best = record["bbox"]["AP"] > best_ap
                best_ap = max(best_ap, record["bbox"]["AP"])
                checkpoint = {
                    "model": model_without_ddp.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "epoch": epoch,
                    "num_updates": num_updates,
                    "history": history,
                    "rng": rng_states,
                    "config": config,
                    "classes": classes,
                    "category_ids": category_ids,
                }
                atomic_save(checkpoint, output / "last.pt")
                if is_best:
                    atomic_save(checkpoint, output / "best.pt")
                recorder.write_epoch(record)
                log(f"epoch {epoch + 1}/{num_epochs}: train loss {record['train_loss']:.4f}  {summary(metrics)}  "
                    f"({record['epoch_time_s']:.1f} s, {record['images_per_s']:.1f} img/s)")
            barrier(ctx)

    if ctx.is_main:
        recorder.close()
        if record:
            log(f"done: {summary({k: record[k] for k in kinds})} after {num_epochs} epochs; outputs in {output}")
    return record


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: torch.amp.GradScaler, ctx: DistContext, config: Config, epoch: int, num_updates: int,
                    output: Path, recorder: RunRecorder | None = None) -> tuple[dict[str, Any], int]:
    """One pass over the training data; returns the mean losses (the total and each part), the last rate and the
    images seen, and the update count. ``recorder`` (rank 0's) gets the loss and rate at every console step."""
    train_cfg = config["train"]
    num_epochs, num_steps, print_freq = train_cfg["epochs"], len(loader), config["print_freq"]
    model.train()
    # losses stay on the device and are read every print_freq steps, as visionmlp train does: a read per step would
    # wait for the device at every step; a non-finite loss makes the window's sum non-finite, which the next read
    # reports. window: each loss summed since the last read, then the step count
    names: list[str] = []
    window: torch.Tensor | None = None
    totals: list[float] = []
    images_seen, window_start = 0, 0
    bar = None
    if ctx.is_main and use_progress_bars():
        from tqdm import tqdm

        bar = tqdm(total=num_steps, desc=f"epoch {epoch + 1}/{num_epochs}", leave=False)
    for step, (images, targets) in enumerate(loader):
        images = [image.to(ctx.device, non_blocking=True) for image in images]
        with autocast(ctx.device, train_cfg["amp"]):
            loss_parts = model(images, to_device(targets, ctx.device))
        loss = sum(loss_parts.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if train_cfg["clip_grad"]:
            scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), train_cfg["clip_grad"])
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        num_updates += 1
        values = torch.stack([loss.detach(), *(v.detach() for v in loss_parts.values())]).double()
        if window is None:
            # RetinaNet names its parts "classification" and "bbox_regression", the R-CNNs "loss_classifier" ...
            names = ["loss", *(k if k.startswith("loss") else f"loss_{k}" for k in loss_parts)]
            window = torch.zeros(len(names) + 1, dtype=torch.float64, device=ctx.device)
            totals = [0.0] * (len(names) + 1)
        window[:-1] += values
        window[-1] += 1
        images_seen += len(images) * ctx.world_size

        if (step + 1) % print_freq == 0 or step + 1 == num_steps:
            # every rank reads the same sums and so agrees to stop: ranks that carried on would wait forever
            read = all_reduce_sum(window.clone(), ctx).tolist()
            window.zero_()
            if not math.isfinite(read[0]):
                raise NonFiniteLossError(
                    f"stopping: the training loss is {read[0]} at epoch {epoch + 1}, between steps {window_start + 1} "
                    f"and {step + 1}. The last good checkpoint, if any, is {output / 'last.pt'}. Try a lower learning "
                    "rate (--lr), a longer warm-up (train.warmup_iters), --amp bf16 or none, or gradient clipping "
                    "(train.clip_grad); --opts print_freq 1 finds the step.")
            totals = [total + value for total, value in zip(totals, read)]
            window_start = step + 1
            lr, mean_loss = optimizer.param_groups[0]["lr"], read[0] / max(read[-1], 1)
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
    losses = {name: total / max(totals[-1], 1) for name, total in zip(names, totals)}
    return {"losses": losses, "lr": optimizer.param_groups[0]["lr"], "images": images_seen}, num_updates
