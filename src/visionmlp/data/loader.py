"""Transforms (timm), samplers that split the data over ranks, and the data loaders."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from PIL import Image, ImageOps
from timm.data import auto_augment, create_transform
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate
from torchvision import transforms as T

from .opencv_ops import swap_augment_functions
from .tensor_pipeline import NormalizeUint8, tensor_pipeline


def _pillow_posterizes_to_zero_bits() -> bool:
    """Whether this Pillow posterizes to 0 bits (a black image); Pillow 13 raises instead."""
    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
    except ValueError:
        return False
    return True


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op, also for 0 bits, which older Pillow turned into black and Pillow 13 rejects."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def with_posterize_any_bits(transform: Any) -> Any:
    """``transform`` with the posterize ops of its timm auto-augment policy replaced by :func:`posterize_any_bits`,
    where this Pillow rejects 0 bits: RandAugment's increasing posterize reaches 0 bits at magnitude 10 (and from 9
    with magnitude noise). Changes this transform only, never timm's tables."""
    if _pillow_posterizes_to_zero_bits():
        return transform
    for step in getattr(transform, "transforms", []):
        swap_augment_functions(step, {auto_augment.posterize: posterize_any_bits})
    return transform


def build_transform(config: Mapping[str, Any], data_config: Mapping[str, Any], training: bool) -> Any:
    """timm's train or eval transform for the resolved input size, interpolation, mean/std and crop ratio, on uint8
    tensors with ``data.pipeline: tensor`` (:mod:`visionmlp.data.tensor_pipeline`), on PIL images with ``pil``.
    With ``data.normalize_on: device`` it ends at uint8 pixels, and :func:`build_batch_transform` does the rest."""
    on_device = config["data"]["normalize_on"] == "device"
    transform = timm_transform(config, data_config, training, use_prefetcher=on_device)
    return tensor_pipeline(transform) if config["data"]["pipeline"] == "tensor" else transform


def build_batch_transform(config: Mapping[str, Any], data_config: Mapping[str, Any], training: bool,
                          device: torch.device) -> T.Compose:
    """What a batch from :func:`build_transform`'s samples still needs on ``device``: with ``data.normalize_on:
    device``, normalisation and (training) timm's random erasing, image by image as timm's prefetcher does; with
    ``train.channels_last``, channels-last memory for a model in that layout."""
    steps: list[Any] = []
    if config["data"]["normalize_on"] == "device":
        steps.append(NormalizeUint8(T.Normalize(data_config["mean"], data_config["std"]), device))
        aug = config["aug"]
        if training and aug["reprob"] > 0:
            steps.append(RandomErasing(aug["reprob"], mode=aug["remode"], max_count=aug["recount"], device=device))
    if config["train"]["channels_last"]:
        steps.append(to_channels_last)
    return T.Compose(steps)


def to_channels_last(images: torch.Tensor) -> torch.Tensor:
    """A batch in channels-last (NHWC) memory, the same values."""
    return images.contiguous(memory_format=torch.channels_last)


def timm_transform(config: Mapping[str, Any], data_config: Mapping[str, Any], training: bool,
                   use_prefetcher: bool = False) -> Any:
    """timm's train or eval transform for PIL images, as the official scripts build it; ``use_prefetcher`` leaves
    out its normalisation and random erasing (timm's prefetcher, or :func:`build_batch_transform`, does them)."""
    aug = config["aug"]
    input_size = data_config["input_size"]
    if not training:
        return create_transform(input_size, is_training=False, interpolation=data_config["interpolation"],
                                mean=data_config["mean"], std=data_config["std"], crop_pct=data_config["crop_pct"],
                                use_prefetcher=use_prefetcher)
    transform = create_transform(
        input_size,
        is_training=True,
        scale=tuple(aug["scale"]),
        hflip=aug["hflip"],
        color_jitter=aug["color_jitter"] or None,
        auto_augment=aug["auto_augment"] or None,
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        re_prob=aug["reprob"],
        re_mode=aug["remode"],
        re_count=aug["recount"],
        use_prefetcher=use_prefetcher,
    )
    if input_size[-1] <= 32 and config["data"]["dataset"] in ("cifar10", "cifar100"):
        # at CIFAR's native 32 px a random-resized crop destroys too much: pad-and-crop instead, as the seeds do
        transform.transforms[0] = T.RandomCrop(input_size[-1], padding=4)
    return with_posterize_any_bits(transform)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` -- the shard a ``part`` cache holds -- reshuffled every epoch.

    Every rank yields the same count (short shards repeat their first indices) so that DDP ranks run
    the same number of steps.
    """

    def __init__(self, dataset_len: int, rank: int, world_size: int, shuffle: bool = True, seed: int = 0) -> None:
        self.indices = list(range(rank, dataset_len, world_size))
        self.num_samples = math.ceil(dataset_len / world_size)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (deterministic in seed and epoch)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        indices = self.indices
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        padding = self.num_samples - len(indices)
        return iter(indices + indices[:padding])

    def __len__(self) -> int:
        return self.num_samples


class EvalShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` without padding, so that reduced metrics count every image once."""

    def __init__(self, dataset_len: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, dataset_len, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def collate_readable(batch: list[Any]) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """Stack the samples that could be read; returns ``(images, targets, number_skipped)``."""
    kept = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, skipped
    images, targets = default_collate(kept)
    return images, targets, skipped


def build_loader(
    dataset: Dataset,
    *,
    training: bool,
    batch_size: int,
    workers: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shard_by_cache: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader over this rank's part of ``dataset``; training shuffles per epoch (call ``sampler.set_epoch``)."""
    if not training:
        sampler: Sampler[int] = EvalShardSampler(len(dataset), rank, world_size)
    elif shard_by_cache:
        sampler = ShardSampler(len(dataset), rank, world_size, shuffle=True, seed=seed)
    else:
        # also with one process: the order is then a function of (seed, epoch) alone, which resuming relies on
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=training and len(sampler) >= batch_size,
        collate_fn=collate_readable,
        # fresh workers each epoch take their seeds from the main process RNG, which checkpoints restore
        persistent_workers=False,
    )
