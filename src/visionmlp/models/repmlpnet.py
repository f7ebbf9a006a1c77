"""RepMLPNet: a hierarchical vision MLP whose token mixing is a re-parameterizable partition FC.

Paper: "RepMLPNet: Hierarchical Vision MLP with Re-parameterized Locality",
Xiaohan Ding, Honghao Chen, Xiangyu Zhang, Jungong Han, Guiguang Ding, CVPR 2022 (arXiv:2112.11081).
Official code: https://github.com/DingXiaoH/RepMLP

The feature map is cut into partitions of a fixed size, and one fully connected layer ("fc3") maps
each flattened partition of a channel to a partition of the same channel; channels are split into
``num_sharesets`` sets that share one such FC. During training, small depth-wise convolutions with
BN (the local perceptron) run beside the FC; ``local_inject()`` ("locality injection") folds them and
the FC's BN into the FC exactly, which is the inference (``deploy``) form.
``visionmlp.reparameterize`` then also folds the remaining BatchNorms that have a neighbouring conv
(the embeddings' and FFN's, and ``prebn2`` into the FFN's first conv).

Because the FC size is the partition area, the model is built for one image size: each stage's
partition covers the whole stage map at ``img_size``, as in the official configurations. A checkpoint
trained at another (square) size loads with its partition FCs resampled over the output and input
tokens' 2-D positions (:func:`resample_partition_fcs`); the conv branches fold in as before.

Differences from the official code: the partition FC runs as one batched matmul instead of a
grouped 1x1 convolution, and the conv branches run as one depth-wise convolution over all channels
of the partitions; both are the same maths. Drop-path (off by default, as in the official models) is
available on both residual branches. With fast kernels (``visionmlp.set_fast_kernels``) the classifier runs
on oneDNN's matmul on CPU; the FFN's 1x1 convolutions as matrix products did not pay on the CPUs measured
(docs/performance.md).
"""


import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ConvNormAct,
    DropPath,
    SelectAdaptivePool2d,
    calculate_drop_path_rates,
    register_notrace_function,
    to_2tuple,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from torch import nn

from .. import kernels
from ..checkpoint import load_pretrained_file
from .fold import bn_scale_shift, fold_bn_before
from .repmlpnet_convert import checkpoint_filter_fn, resample_partition_fcs
from .weights import pretrained_cfg_entries, resolve_pretrained_kwargs

__all__ = ["RepMLPBlock", "RepMLPNet", "checkpoint_filter_fn", "resample_partition_fcs"]


class GlobalPerceptron(nn.Module):
    """Channel gate from the globally pooled input (squeeze-excite style, sigmoid output)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean((2, 3), keepdim=True)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x))))


class PartitionLinear(nn.Module):
    """One ``area -> area`` linear map per share-set, applied to flattened partitions.

    The weight keeps the ``(num_sharesets * area, area, 1, 1)`` layout of the grouped 1x1
    convolution the official code uses, so its checkpoints load unchanged; the maths runs as one
    batched matmul, which is several times faster on CPU.
    """

    def __init__(self, num_sharesets: int, area: int, bias: bool = False):
        super().__init__()
        self.num_sharesets = num_sharesets
        self.area = area
        self.weight = nn.Parameter(torch.empty(num_sharesets * area, area, 1, 1))
        self.bias = nn.Parameter(torch.empty(num_sharesets * area)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default initialization for a convolution of this shape."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(self.area), 1 / math.sqrt(self.area))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, num_sharesets, area)`` to the same shape."""
        weight = self.weight.view(self.num_sharesets, self.area, self.area).transpose(1, 2)
        x = x.transpose(0, 1)
        if self.bias is None:
            out = torch.bmm(x, weight)
        else:
            out = torch.baddbmm(self.bias.view(self.num_sharesets, 1, self.area), x, weight)
        return out.transpose(0, 1)


class PartitionConvBn(nn.Module):
    """Depth-wise conv + BN of the local perceptron, one kernel per share-set.

    Channel ``c`` belongs to share-set ``c % num_sharesets`` (the official partition reshape). The
    kernel is tiled over all channels so the partitions are convolved in a single depth-wise call.
    """

    def __init__(self, num_sharesets: int, kernel_size: int, channels: int) -> None:
        super().__init__()
        self.num_sharesets = num_sharesets
        self.kernel_size = kernel_size
        # a constant, not read from the input: an exported graph then knows the tiled kernel's shape
        self.channels = channels
        self.conv = nn.Conv2d(num_sharesets, num_sharesets, kernel_size, padding=kernel_size // 2,
                              groups=num_sharesets, bias=False)
        self.bn = nn.BatchNorm2d(num_sharesets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map partitions ``(N, C, h, w)`` to ``(N * C / num_sharesets, num_sharesets, h, w)``."""
        h, w = x.shape[-2:]
        weight = self.conv.weight.repeat(self.channels // self.num_sharesets, 1, 1, 1)
        x = F.conv2d(x, weight, padding=self.kernel_size // 2, groups=self.channels)
        return self.bn(x.reshape(-1, self.num_sharesets, h, w))

    def fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The conv kernel and bias with the (eval-mode) BN folded in."""
        scale, shift = bn_scale_shift(self.bn)
        return self.conv.weight * scale.view(-1, 1, 1, 1), shift


@register_notrace_function
@torch.fx.wrap
def partition_grid(x: torch.Tensor, h: int, w: int) -> tuple[int, int]:
    """Partition rows and columns of ``x`` (``(B, C, H, W)``); raises if ``H``, ``W`` are off the ``h x w`` grid.

    Not traced by FX (a leaf call), so the size check stays a clear ``ValueError`` in eager use.
    """
    H, W = x.shape[-2:]
    if H % h or W % w:
        raise ValueError(
            f"RepMLPBlock input size {H}x{W} is not a multiple of the partition size {h}x{w}: RepMLPNet takes images "
            "whose height and width are multiples of its img_size; resize the input, or build the model with "
            "img_size set to the input's size")
    return H // h, W // w


class RepMLPBlock(nn.Module):
    """RepMLP block: partition FC (channel-shared per share-set) + local conv branches + global gate.

    A reusable building block. Input ``(B, dim, H, W)`` with ``H``, ``W`` multiples of
    ``partition_size`` and ``dim`` a multiple of ``num_sharesets``; output has the same shape.

    Args:
        dim: Number of channels.
        partition_size: Partition height and width; the FC maps ``h * w`` values to ``h * w``.
        num_sharesets: Number of channel sets with their own FC and conv kernels.
        conv_kernels: Kernel sizes of the training-time conv branches (odd), e.g. ``(1, 3)``.
        gp_reduction: Channel reduction of the global perceptron's hidden layer.
        deploy: Build the folded inference form (``fc3`` with bias, no BN, no conv branches).

    Call :meth:`local_inject` after training to fold the conv branches and BN into ``fc3``.
    """

    def __init__(
            self,
            dim: int,
            partition_size: int | tuple[int, int],
            num_sharesets: int = 1,
            conv_kernels: Sequence[int] = (1, 3),
            gp_reduction: int = 4,
            deploy: bool = False,
    ):
        super().__init__()
        if dim % num_sharesets:
            raise ValueError(f"dim ({dim}) must be a multiple of num_sharesets ({num_sharesets})")
        if any(k % 2 == 0 for k in conv_kernels):
            raise ValueError(f"conv_kernels must be odd, got {tuple(conv_kernels)}")
        self.dim = dim
        self.partition_size = to_2tuple(partition_size)
        self.num_sharesets = num_sharesets
        self.gp_reduction = gp_reduction
        self.deploy = deploy
        self.conv_kernels = () if deploy else tuple(conv_kernels)

        area = self.partition_size[0] * self.partition_size[1]
        self.gp = GlobalPerceptron(dim, dim // gp_reduction)
        self.fc3 = PartitionLinear(num_sharesets, area, bias=deploy)
        self.fc3_bn = nn.Identity() if deploy else nn.BatchNorm2d(num_sharesets)
        # keyed by kernel size; the official checkpoints name these ``repconv{k}`` (see checkpoint_filter_fn)
        self.repconvs = nn.ModuleDict({str(k): PartitionConvBn(num_sharesets, k, dim) for k in self.conv_kernels})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h, w = self.partition_size
        rows, cols = partition_grid(x, h, w)
        gate = self.gp(x)

        # (B * rows * cols, C, h, w); free of copies when the partition covers the whole map
        parts = x.reshape(B, C, rows, h, cols, w).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, h, w)
        out = self.fc3(parts.reshape(-1, self.num_sharesets, h * w)).reshape(-1, self.num_sharesets, h, w)
        out = self.fc3_bn(out)
        for branch in self.repconvs.values():
            out = out + branch(parts)

        out = out.reshape(B, rows, cols, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
        return out * gate

    def equivalent_fc3(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight ``(S * h * w, h * w, 1, 1)`` and bias of the single FC equal to fc3 + BN + conv branches (eval)."""
        S, (h, w) = self.num_sharesets, self.partition_size
        area = h * w
        weight = self.fc3.weight.view(S, area, area)
        bias = self.fc3.bias.view(S, area) if self.fc3.bias is not None else weight.new_zeros(S, area)
        if isinstance(self.fc3_bn, nn.BatchNorm2d):
            scale, shift = bn_scale_shift(self.fc3_bn)
            weight = weight * scale.view(S, 1, 1)
            bias = bias * scale.view(S, 1) + shift.view(S, 1)
        if self.conv_kernels:
            size = max(self.conv_kernels)
            kernel = weight.new_zeros(S, 1, size, size)
            for branch in self.repconvs.values():
                branch_kernel, branch_bias = branch.fused_kernel()
                kernel = kernel + F.pad(branch_kernel, [(size - branch.kernel_size) // 2] * 4)
                bias = bias + branch_bias.view(S, 1)
            # column p of the FC is the conv's response to a unit impulse at position p
            impulses = torch.eye(area, dtype=weight.dtype, device=weight.device).view(area, 1, h, w)
            responses = F.conv2d(impulses.expand(area, S, h, w), kernel, padding=size // 2, groups=S)
            weight = weight + responses.reshape(area, S, area).permute(1, 2, 0)
        return weight.reshape(S * area, area, 1, 1), bias.reshape(S * area)

    @torch.no_grad()
    def local_inject(self) -> None:
        """Locality injection: fold BN and conv branches into ``fc3`` in place; a no-op once folded."""
        if self.deploy:
            return
        weight, bias = self.equivalent_fc3()
        fc3 = PartitionLinear(self.num_sharesets, weight.shape[1], bias=True).to(weight)
        fc3.weight.copy_(weight)
        fc3.bias.copy_(bias)
        self.fc3 = fc3
        self.fc3_bn = nn.Identity()
        self.repconvs = nn.ModuleDict()
        self.conv_kernels = ()
        self.deploy = True


class ConvFfn(nn.Module):
    """Pointwise conv FFN with BN after each conv: conv-BN-GELU-conv-BN."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.ffn_fc1 = ConvNormAct(dim, hidden_dim, 1, act_layer=nn.GELU)
        self.ffn_fc2 = ConvNormAct(hidden_dim, dim, 1, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW in and out."""
        return self.ffn_fc2(self.ffn_fc1(x))


class RepMLPNetLayer(nn.Module):
    """Pre-BN residual RepMLP block followed by a pre-BN residual FFN."""

    def __init__(
            self,
            dim: int,
            partition_size: tuple[int, int],
            num_sharesets: int,
            conv_kernels: Sequence[int],
            gp_reduction: int = 4,
            ffn_ratio: int = 4,
            drop_path: float = 0.0,
            deploy: bool = False,
    ):
        super().__init__()
        self.prebn1 = nn.BatchNorm2d(dim)
        self.repmlp_block = RepMLPBlock(dim, partition_size, num_sharesets, conv_kernels, gp_reduction, deploy)
        self.prebn2 = nn.BatchNorm2d(dim)
        self.ffn_block = ConvFfn(dim, dim * ffn_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.repmlp_block(self.prebn1(x)))
        return x + self.drop_path(self.ffn_block(self.prebn2(x)))

    def fold_batchnorm(self) -> int:
        """Fold ``prebn2`` into the FFN's first 1x1 conv (see :mod:`visionmlp.models.fold`); returns 1 or 0.

        ``prebn1`` stays: the partition FC shares one weight across the channels of a share-set, so a
        per-channel scale in front of it has no equivalent FC weight.
        """
        if not isinstance(self.prebn2, nn.BatchNorm2d):
            return 0
        fold_bn_before(self.prebn2, self.ffn_block.ffn_fc1.conv)
        self.prebn2 = nn.Identity()
        return 1


class RepMLPNet(nn.Module):
    """RepMLPNet: conv patch embedding, four stages of RepMLP layers joined by 2x2 stride-2 conv embeddings.

    Args:
        img_size: Input size the partition FCs are built for (each stage's partition is its whole map).
        depths, dims, sharesets: Layers, channels and FC share-sets per stage.
        conv_kernels: Kernel sizes of the training-time local conv branches.
        gp_reduction: Hidden-layer reduction of the global perceptron.
        ffn_ratio: FFN hidden width as a multiple of the stage width.
        deploy: Build the folded inference form (as after :meth:`locality_injection`).
        fast_kernels: Take the fast kernels (default: ``visionmlp.use_fast_kernels()``).
    """

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            patch_size: int = 4,
            depths: Sequence[int] = (2, 2, 6, 2),
            dims: Sequence[int] = (64, 128, 256, 512),
            sharesets: Sequence[int] = (1, 4, 16, 128),
            conv_kernels: Sequence[int] = (1, 3),
            gp_reduction: int = 4,
            ffn_ratio: int = 4,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            deploy: bool = False,
            fast_kernels: bool | None = None,
    ):
        super().__init__()
        self.fast_kernels = kernels.resolve_fast_kernels(fast_kernels)
        num_stages = len(depths)
        img_size = self.img_size = to_2tuple(img_size)
        stride = patch_size * 2 ** (num_stages - 1)
        if min(img_size) <= 0 or img_size[0] % stride or img_size[1] % stride:
            raise ValueError(
                f"img_size must be a multiple of {stride} in height and width (e.g. 224 or 256); got {img_size}"
            )
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = dims[-1]
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.conv_embedding = ConvNormAct(in_chans, dims[0], patch_size, stride=patch_size, padding=0)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        stages, embeds, self.feature_info = [], [], []
        for i in range(num_stages):
            # each stage's partition is its whole feature map at img_size
            partition = (grid[0] >> i, grid[1] >> i)
            stages.append(nn.Sequential(*[
                RepMLPNetLayer(
                    dims[i], partition, sharesets[i], conv_kernels, gp_reduction, ffn_ratio, dpr[i][j], deploy
                )
                for j in range(depths[i])
            ]))
            # the embedding that follows each stage; the last stage's is an Identity so that stages and
            # embeds pair up in one zip, which TorchScript compiles (it indexes module lists only by literals)
            if i < num_stages - 1:
                embeds.append(ConvNormAct(dims[i], dims[i + 1], 2, stride=2, padding=0))
            else:
                embeds.append(nn.Identity())
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.ModuleList(stages)
        self.embeds = nn.ModuleList(embeds)
        self.head_norm = nn.BatchNorm2d(dims[-1])
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if self.fast_kernels:
            kernels.use_onednn_linears(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups (stem, blocks) for layer-wise learning-rate decay."""
        return dict(
            stem=r"^conv_embedding",
            blocks=[
                (r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)", None),
                (r"^embeds\.(\d+)", (99999,)),
                (r"^head_norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's layers in the backward pass to save memory."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """No parameter needs special exclusion (there are no position embeddings or layer scales)."""
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear classifier."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (``num_classes=0`` removes it); optionally change the pooling."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        weight = self.conv_embedding.conv.weight
        device, dtype = weight.device, weight.dtype
        self.head = (
            nn.Linear(self.num_features, num_classes, device=device, dtype=dtype) if num_classes > 0 else nn.Identity()
        )

    def locality_injection(self) -> None:
        """Fold every RepMLP block into its inference form (see :meth:`RepMLPBlock.local_inject`)."""
        for module in self.modules():
            if isinstance(module, RepMLPBlock):
                module.local_inject()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Final features and the outputs of the selected stages (NCHW), timm's feature-extraction API."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_index = len(self.stages) - 1
        num_run = max_index + 1 if stop_early else len(self.stages)

        intermediates = []
        x = self.conv_embedding(x)
        for i, (stage, embed) in enumerate(zip(self.stages[:num_run], self.embeds[:num_run])):
            x = checkpoint_seq(stage, x) if self.grad_checkpointing and not torch.jit.is_scripting() else stage(x)
            if i in take_indices:
                intermediates.append(self.head_norm(x) if norm and i == last_index else x)
            if i < num_run - 1:
                x = embed(x)
        if intermediates_only:
            return intermediates
        if num_run - 1 == last_index:
            x = self.head_norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: int | list[int] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages (and norm / head) that the selected intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        if prune_norm or prune_end:
            self.head_norm = nn.Identity()  # sized for the last stage only
        self.stages = self.stages[:max_index + 1]
        self.embeds = nn.ModuleList([*self.embeds[:max_index], nn.Identity()])
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized last-stage feature map, ``(B, C, H / 32, W / 32)``."""
        x = self.conv_embedding(x)
        for stage, embed in zip(self.stages, self.embeds):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            x = embed(x)
        return self.head_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool and classify a feature map from :meth:`forward_features`."""
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an official (training or deploy form) or visionmlp checkpoint file."""
        load_pretrained_file(self, checkpoint_path, checkpoint_filter_fn)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "fixed_input_size": True,  # the partition FCs are sized for the input grid
        "crop_pct": 1.0,  # official eval: resize to img_size then center crop img_size
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv_embedding.conv",
        "classifier": "head",
        "custom_load": True,
        "license": "mit",
        "paper_ids": "arXiv:2112.11081",
        "origin_url": "https://github.com/DingXiaoH/RepMLP",
        **kwargs,
    }


_cfg256 = partial(_cfg, input_size=(3, 256, 256), pool_size=(8, 8))

default_cfgs = generate_default_cfgs({
    "repmlpnet_t224": _cfg(**pretrained_cfg_entries("repmlpnet_t224")),
    "repmlpnet_b224": _cfg(**pretrained_cfg_entries("repmlpnet_b224")),
    "repmlpnet_t256": _cfg256(**pretrained_cfg_entries("repmlpnet_t256")),
    "repmlpnet_b256": _cfg256(**pretrained_cfg_entries("repmlpnet_b256")),
    "repmlpnet_d256": _cfg256(**pretrained_cfg_entries("repmlpnet_d256")),
    "repmlpnet_l256": _cfg256(**pretrained_cfg_entries("repmlpnet_l256")),
})


def _create_repmlpnet(variant: str, pretrained: bool = False, **kwargs: Any) -> RepMLPNet:
    return build_model_with_cfg(
        RepMLPNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **resolve_pretrained_kwargs(variant, pretrained, kwargs),
    )


@register_model
def repmlpnet_t224(pretrained: bool = False, **kwargs: Any) -> RepMLPNet:
    """RepMLPNet-T224 (38.3M params at 224x224)."""
    args = dict(img_size=224, depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), sharesets=(1, 4, 16, 128))
    return _create_repmlpnet("repmlpnet_t224", pretrained, **(args | kwargs))


@register_model
def repmlpnet_b224(pretrained: bool = False, **kwargs: Any) -> RepMLPNet:
    """RepMLPNet-B224 (68.2M params at 224x224)."""
    args = dict(img_size=224, depths=(2, 2, 12, 2), dims=(96, 192, 384, 768), sharesets=(1, 4, 32, 128))
    return _create_repmlpnet("repmlpnet_b224", pretrained, **(args | kwargs))


@register_model
def repmlpnet_t256(pretrained: bool = False, **kwargs: Any) -> RepMLPNet:
    """RepMLPNet-T256 (58.7M params at 256x256)."""
    args = dict(img_size=256, depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), sharesets=(1, 4, 16, 128))
    return _create_repmlpnet("repmlpnet_t256", pretrained, **(args | kwargs))


@register_model
def repmlpnet_b256(pretrained: bool = False, **kwargs: Any) -> RepMLPNet:
    """RepMLPNet-B256 (96.4M params at 256x256)."""
    args = dict(img_size=256, depths=(2, 2, 12, 2), dims=(96, 192, 384, 768), sharesets=(1, 4, 32, 128))
    return _create_repmlpnet("repmlpnet_b256", pretrained, **(args | kwargs))


@register_model
def repmlpnet_d256(pretrained: bool = False, **kwargs: Any) -> RepMLPNet:
    """RepMLPNet-D256 (86.9M params at 256x256)."""
    args = dict(img_size=256, depths=(2, 2, 18, 2), dims=(80, 160, 320, 640), sharesets=(1, 4, 16, 128))
    return _create_repmlpnet("repmlpnet_d256", pretrained, **(args | kwargs))


@register_model
def repmlpnet_l256(pretrained: bool = False, **kwargs: Any) -> RepMLPNet:
    """RepMLPNet-L256 (117.6M params at 256x256)."""
    args = dict(img_size=256, depths=(2, 2, 18, 2), dims=(96, 192, 384, 768), sharesets=(1, 4, 32, 256))
    return _create_repmlpnet("repmlpnet_l256", pretrained, **(args | kwargs))
