"""A visionmlp classifier as a dense-prediction backbone: four feature maps at strides 4, 8, 16 and 32.

Detection and segmentation heads (FPN, UperNet) take a stride-4-to-32 pyramid. Four families give it from their
stages. Vision Permutator keeps one resolution after its first stage (strides 7, 14, 14, 14): its pyramid is built
from the last map alone, as ViTDet does for a plain ViT (resampled for strides 4, 8 and 16, max-pooled from
stride 16 for 32, each followed by a 1x1 and a 3x3 convolution). RaftMLP's one-level models (the MLP-Mixer baseline
and ablations) keep stride 16 throughout: the four maps the seed's detection backbone taps (patch embedding, blocks 4, 10 and 12 of 12)
are resampled the same way, one per stride, as SETR and BEiT do for a ViT's intermediate blocks (the seed feeds the
four stride-16 maps to its FPN as they are; torchvision's heads expect strides 4 to 64).

Input sizes. ViP, Strip-MLP and RaftMLP have token-mixing weights sized for one token grid, so they are built for
one ``img_size`` and each image is padded (bottom and right, zeros) to it; RepMLPNet takes multiples of its
``img_size`` (its partitions tile the map) and MS-MLP multiples of 32, so images are padded to the next such size.
Padding at the bottom and right leaves every box and pixel coordinate where it was; the maps are cropped back to the
image's extent. A RaftMLP built with ``dynamic_img_size=True`` takes any size, resizing its token maps to the trained
grid around each token mixing as the official detection and segmentation code does.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, to_2tuple
from torch import nn

from . import raft_mlp
from .factory import create_model, family_module, load_for_finetuning

__all__ = ["PyramidBackbone", "SimplePyramid", "buildable_img_size", "pad_multiple"]

PYRAMID_STRIDES = (4, 8, 16, 32)


class SimplePyramid(nn.Module):
    """Maps at strides 4, 8, 16 and 32 from one map (or one map per level), after ViTDet's simple feature pyramid:
    the stride-32 level is the stride-16 one max-pooled 2x2, the others are resampled (bilinear) to their size where
    they differ from it (resampling in place of ViTDet's deconvolutions, so that any input stride works); each level
    then goes through a 1x1 and a 3x3 convolution with LayerNorm. Fixed-size pooling and resampling, not adaptive
    pooling: ONNX has no adaptive pooling."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.levels = nn.ModuleList([
            nn.Sequential(
                nn.Conv2d(in_chans, out_chans, 1, bias=False), LayerNorm2d(out_chans),
                nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False), LayerNorm2d(out_chans),
            )
            for _ in PYRAMID_STRIDES
        ])

    @staticmethod
    def resample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``x`` resampled (bilinear) to ``size``; ``x`` itself when it has that size."""
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, maps: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """The maps of the sizes ``sizes`` (strides 4 to 32 of the input) from ``maps``: one for all levels, or one
        per level."""
        out = []
        for i, (level, size, x) in enumerate(zip(self.levels, sizes, maps * len(sizes) if len(maps) == 1 else maps)):
            if i == len(sizes) - 1:  # stride 32: half the stride-16 size, rounded up
                x = F.max_pool2d(self.resample(x, sizes[i - 1]), 2, ceil_mode=True)
            out.append(level(self.resample(x, size)))
        return out


def pad_multiple(size: int, multiple: int) -> int:
    """``size`` rounded up to a multiple of ``multiple``."""
    return -(-size // multiple) * multiple


def buildable_img_size(name: str, size: int | tuple[int, int], model_kwargs: dict[str, Any]) -> tuple[int, int]:
    """The smallest size at least ``size`` that variant ``name`` can be built for: ViP's sides are multiples of its
    patch size times its stage stride (14 by default); the other families' backbones take ``size`` as given."""
    size = tuple(to_2tuple(size))
    if family_module(name).__name__.endswith(".vip"):
        multiple = model_kwargs.get("patch_size", 7) * math.prod(model_kwargs.get("stage_strides", (1, 2, 1, 1)))
        return pad_multiple(size[0], multiple), pad_multiple(size[1], multiple)
    return size


class PyramidBackbone(nn.Module):
    """Variant ``name`` as a backbone: images in, an ``OrderedDict`` of four NCHW maps at strides 4 to 32 out.

    ``img_size`` is the size grid-bound families are built for (every image must fit in it); ``checkpoint`` is any
    classification checkpoint ``visionmlp.create_model`` reads, resampled when it was trained at another size.
    ``out_channels`` (default 256) is the width of a simple pyramid, where one is built.
    """

    def __init__(
            self,
            name: str,
            img_size: int | tuple[int, int],
            checkpoint: str | os.PathLike | None = None,
            simple_pyramid_channels: int = 256,
            **model_kwargs: Any,
    ) -> None:
        super().__init__()
        family_module(name)
        model = create_model(name, img_size=img_size, num_classes=0, **model_kwargs)
        self.loaded: list[str] = []
        if checkpoint is not None:
            self.loaded = load_for_finetuning(model, name, checkpoint)
        reductions = [info["reduction"] for info in model.feature_info]
        self.name = name
        self.img_size = tuple(to_2tuple(img_size))
        self.fixed_size = name.startswith(("vip", "strip_mlp", "raft_mlp")) and not model_kwargs.get(
            "dynamic_img_size", False)
        self.size_step = self._size_step(model)
        if list(reductions[-4:]) == list(PYRAMID_STRIDES):
            self.indices = list(range(len(reductions) - 4, len(reductions)))
            self.channels = [model.feature_info[i]["num_chs"] for i in self.indices]
            self.simple_pyramid = None
        else:
            # one stride throughout (RaftMLP's one-level models): the seed's four taps; else the last map
            self.indices = list(raft_mlp.default_out_indices([len(reductions) - 1])) if len(set(reductions)) == 1 \
                else [len(reductions) - 1]
            self.simple_pyramid = SimplePyramid(model.feature_info[-1]["num_chs"], simple_pyramid_channels)
            self.channels = [simple_pyramid_channels] * 4
        model.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
        self.body = model

    def _size_step(self, model: nn.Module) -> tuple[int, int]:
        """The step of the input sizes the body takes."""
        if self.name.startswith("repmlpnet"):
            return tuple(model.img_size)
        if self.name.startswith("ms_mlp"):
            return (model.total_stride, model.total_stride)
        return (32, 32)

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """The size an image of ``height`` x ``width`` is padded to, or a ValueError naming the fix."""
        if self.fixed_size:
            if height > self.img_size[0] or width > self.img_size[1]:
                raise ValueError(
                    f"a {height}x{width} image does not fit the {self.img_size[0]}x{self.img_size[1]} input that "
                    f"{self.name} was built for (its token-mixing weights are sized for one token grid); resize "
                    f"images to fit, or build the backbone with a larger img_size")
            return self.img_size
        return pad_multiple(height, self.size_step[0]), pad_multiple(width, self.size_step[1])

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Maps ``"0"`` to ``"3"`` at strides 4, 8, 16 and 32 of ``x``, cropped to its extent."""
        # Python numbers, also under the ONNX tracer: an exported graph is built for one input size, and the tracer's
        # Pad with computed amounts misplaces them
        height, width = int(x.shape[-2]), int(x.shape[-1])
        padded = self.padded_size(height, width)
        if (height, width) != padded:  # no pad op at all when none is needed (a fixed-size export traces none)
            x = F.pad(x, (0, padded[1] - width, 0, padded[0] - height))
        maps = self.body.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        sizes = [(math.ceil(padded[0] / s), math.ceil(padded[1] / s)) for s in PYRAMID_STRIDES]
        if self.simple_pyramid is not None:
            maps = self.simple_pyramid(maps, sizes)
        out = OrderedDict()
        for i, (feature, stride) in enumerate(zip(maps, PYRAMID_STRIDES)):
            out[str(i)] = feature[..., :math.ceil(height / stride), :math.ceil(width / stride)]
        return out
