"""Vision Permutator (ViP)

Paper: "Vision Permutator: A Permutable MLP-Like Architecture for Visual Recognition",
Qibin Hou, Zihang Jiang, Li Yuan, Ming-Ming Cheng, Shuicheng Yan, Jiashi Feng.
IEEE TPAMI 2022, https://arxiv.org/abs/2106.12368

Official code: https://github.com/houqb/VisionPermutator

The Permute-MLP mixes each channel segment along the height and along the width with fully connected
layers whose width is (tokens along that axis) x (channels per segment), so a model is built for one
input size. Tokens are NHWC throughout, as in the official code; official ``network.N`` keys are mapped onto
``stages`` on load. A checkpoint trained at another size loads into a model built with ``img_size=`` (non-square
too): the height and width mixing layers are resampled as functions of the tokens' relative positions, the only
grid-sized weights, as timm resamples a ViT's position embeddings (:func:`resample_permute_mlps`).

With fast kernels (``visionmlp.set_fast_kernels``) the linear layers run on oneDNN's matmul on CPU, the stem
writes its tokens channels-last, the Permute-MLP blends its branches with contiguous weights
(``visionmlp.kernels.vip``), and in training a residual branch runs only for the samples its drop path keeps; the
maths is the same.
"""


import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, PatchEmbed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from torch import nn

from .. import kernels
from ..checkpoint import StateDict, load_pretrained_file
from ..kernels.vip import permute_mlp as permute_mlp_kernel
from .layers import check_input_size
from .resample import log_resampled, resample_mixing, resample_positions
from .weights import pretrained_cfg_entries, resolve_pretrained_kwargs

__all__ = ["PermuteMlp", "PermutatorBlock", "PermutatorStage", "VisionPermutator"]

torch.fx.wrap("check_input_size")
torch.fx.wrap("permute_mlp_kernel")


class PermuteMlp(nn.Module):
    """Weighted Permute-MLP: height, width and channel mixing fused by per-channel softmax weights."""

    def __init__(
            self, dim: int, grid_size: tuple[int, int], num_segments: int, qkv_bias: bool = False,
            fast_kernels: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_segments:
            raise ValueError(f"dim ({dim}) must be divisible by the number of segments ({num_segments})")
        self.fast_kernels = fast_kernels
        self.num_segments = num_segments
        segment_chs = dim // num_segments
        self.mlp_c = nn.Linear(dim, dim, bias=qkv_bias)
        self.mlp_h = nn.Linear(grid_size[0] * segment_chs, grid_size[0] * segment_chs, bias=qkv_bias)
        self.mlp_w = nn.Linear(grid_size[1] * segment_chs, grid_size[1] * segment_chs, bias=qkv_bias)
        self.reweight = Mlp(dim, dim // 4, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix an NHWC token map (B, H, W, C) built for this grid size."""
        if self.fast_kernels and not torch.jit.is_scripting():
            return permute_mlp_kernel(self, x)
        B, H, W, C = x.shape
        G = self.num_segments
        S = C // G
        # height mixing: the H tokens of one segment's column are one vector of H * S values; width alike
        h = x.reshape(B, H, W, G, S).permute(0, 3, 2, 1, 4).reshape(B, G, W, H * S)
        h = self.mlp_h(h).reshape(B, G, W, H, S).permute(0, 3, 2, 1, 4).reshape(B, H, W, C)
        w = x.reshape(B, H, W, G, S).permute(0, 1, 3, 2, 4).reshape(B, H, G, W * S)
        w = self.mlp_w(w).reshape(B, H, G, W, S).permute(0, 1, 3, 2, 4).reshape(B, H, W, C)
        c = self.mlp_c(x)
        # a softmax over the three branches per sample and channel, from the pooled sum of the branches
        a = self.reweight((h + w + c).mean((1, 2))).reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0)
        a = a[:, :, None, None, :]
        return self.proj(h * a[0] + w * a[1] + c * a[2])


class PermutatorBlock(nn.Module):
    """Pre-norm residual block: Permute-MLP token mixing, then a channel MLP."""

    def __init__(
            self,
            dim: int,
            grid_size: tuple[int, int],
            num_segments: int,
            mlp_ratio: float = 3.,
            qkv_bias: bool = False,
            drop_path: float = 0.,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = nn.LayerNorm,
            fast_kernels: bool = False,
    ) -> None:
        super().__init__()
        self.fast_kernels = fast_kernels
        self.norm1 = norm_layer(dim)
        self.attn = PermuteMlp(dim, grid_size, num_segments, qkv_bias, fast_kernels)  # `attn`: the official key
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)

    def token_mixing(self, x: torch.Tensor) -> torch.Tensor:
        """The Permute-MLP residual branch."""
        return self.attn(self.norm1(x))

    def channel_mixing(self, x: torch.Tensor) -> torch.Tensor:
        """The channel-MLP residual branch."""
        return self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NHWC tokens in, NHWC tokens out."""
        if self.fast_kernels and not torch.jit.is_scripting():
            x = kernels.drop_path_residual(x, self.token_mixing, self.drop_path)
            return kernels.drop_path_residual(x, self.channel_mixing, self.drop_path)
        x = x + self.drop_path(self.token_mixing(x))
        return x + self.drop_path(self.channel_mixing(x))


class PermutatorStage(nn.Module):
    """An optional transition (strided conv, or 1x1 conv for a width change) followed by Permutator blocks."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            grid_size: tuple[int, int],
            num_segments: int,
            stride: int = 1,
            mlp_ratio: float = 3.,
            qkv_bias: bool = False,
            drop_path_rates: Sequence[float] = (),
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = nn.LayerNorm,
            fast_kernels: bool = False,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        if stride > 1 or in_dim != dim:
            self.downsample = nn.Conv2d(in_dim, dim, kernel_size=stride, stride=stride)
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            PermutatorBlock(
                dim,
                grid_size,
                num_segments,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=drop_path_rates[i] if drop_path_rates else 0.,
                act_layer=act_layer,
                norm_layer=norm_layer,
                fast_kernels=fast_kernels,
            )
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NHWC tokens in, NHWC tokens (downsampled if the stage has a stride) out."""
        x = self.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class VisionPermutator(nn.Module):
    """Vision Permutator: a patch embedding, four stages of Permutator blocks, a norm and a linear classifier."""

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            patch_size: int = 7,
            depths: Sequence[int] = (4, 3, 8, 3),
            embed_dims: Sequence[int] = (192, 384, 384, 384),
            num_segments: Sequence[int] = (32, 16, 16, 16),
            stage_strides: Sequence[int] = (1, 2, 1, 1),
            mlp_ratios: Sequence[float] = (3, 3, 3, 3),
            qkv_bias: bool = False,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = nn.LayerNorm,
            fast_kernels: bool | None = None,
    ) -> None:
        super().__init__()
        self.fast_kernels = kernels.resolve_fast_kernels(fast_kernels)
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        img_size = to_2tuple(img_size)
        total_stride = patch_size * math.prod(stage_strides)
        self.img_size = img_size
        self.size_multiple = total_stride
        if any(s <= 0 or s % total_stride for s in img_size):
            raise ValueError(
                f"img_size must be a positive multiple of {total_stride} in height and width (patch size "
                f"{patch_size} x stage stride {total_stride // patch_size}; the Permute-MLP layers are built for "
                f"the exact token grid), e.g. {total_stride * (224 // total_stride)} or "
                f"{total_stride * (448 // total_stride)}; got {img_size}"
            )
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.output_fmt = "NHWC"  # forward_features returns the token map channels-last

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dims[0],
            output_fmt="NHWC",
            strict_img_size=False,  # check_input_size in forward says what to do about another size
        )
        if self.fast_kernels:
            self.patch_embed.proj = kernels.ChannelsLastConv2d(in_chans, embed_dims[0], patch_size, stride=patch_size)
        grid_size = self.patch_embed.grid_size
        # Stochastic depth grows linearly over all blocks (plain Python: the model may be built on "meta").
        num_blocks = sum(depths)
        rates = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        dpr = [rates[sum(depths[:i]):sum(depths[:i + 1])] for i in range(len(depths))]
        stages = []
        self.feature_info = []
        in_dim, reduction = embed_dims[0], patch_size
        for i, depth in enumerate(depths):
            stride = stage_strides[i]
            grid_size = (grid_size[0] // stride, grid_size[1] // stride)
            reduction *= stride
            stages.append(PermutatorStage(
                in_dim,
                embed_dims[i],
                depth,
                grid_size,
                num_segments[i],
                stride=stride,
                mlp_ratio=mlp_ratios[i],
                qkv_bias=qkv_bias,
                drop_path_rates=dpr[i],
                act_layer=act_layer,
                norm_layer=norm_layer,
                fast_kernels=self.fast_kernels,
            ))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"stages.{i}"))
            in_dim = embed_dims[i]
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if self.fast_kernels:
            kernels.use_onednn_linears(self)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay."""
        return dict(
            stem=r"^patch_embed",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass to save memory."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier layer."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` (0: none)."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        if num_classes > 0:
            reference = next(self.parameters())
            self.head = nn.Linear(self.num_features, num_classes, device=reference.device, dtype=reference.dtype)
        else:
            self.head = nn.Identity()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Final features and the NCHW outputs of the stages picked by ``indices`` (timm convention)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_index = len(self.stages) - 1
        stages = self.stages[:max_index + 1] if stop_early and not torch.jit.is_scripting() else self.stages

        intermediates = []
        x = self.patch_embed(check_input_size(x, self.img_size, self.size_multiple))
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                feature = self.norm(x) if norm and i == last_index else x
                intermediates.append(feature.permute(0, 3, 1, 2).contiguous())
        if intermediates_only:
            return intermediates
        if i == last_index:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: int | list[int] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages (and norm / head) that the features picked by ``indices`` do not need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for, and applied to, the last stage only
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised NHWC token map of the last stage."""
        x = self.patch_embed(check_input_size(x, self.img_size, self.size_multiple))
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the token map (if ``global_pool``) and classify."""
        if self.global_pool == "avg":
            x = x.mean((1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) at the built size to logits."""
        x = self.forward_features(x)
        return self.forward_head(x)

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an official or visionmlp checkpoint file (timm's ``custom_load`` hook)."""
        load_pretrained_file(self, checkpoint_path, checkpoint_filter_fn)


def checkpoint_filter_fn(state_dict: StateDict, model: VisionPermutator) -> StateDict:
    """Map official keys (one ``network`` list of stages and transitions) onto ``stages`` (ours pass through), and
    resample the Permute-MLPs of a checkpoint trained on another token grid (:func:`resample_permute_mlps`)."""
    if any(k.startswith("network.") for k in state_dict):
        # the official list holds each stage's blocks, preceded by a Downsample wherever a transition exists
        targets = []
        for i, stage in enumerate(model.stages):
            if not isinstance(stage.downsample, nn.Identity):
                targets.append(f"stages.{i}.downsample.")
            targets.append(f"stages.{i}.blocks.")
        renamed = {}
        for key, value in state_dict.items():
            match = re.match(r"network\.(\d+)\.(?:proj\.)?(.*)", key)
            if match:
                key = targets[int(match.group(1))] + match.group(2)
            renamed[key] = value
        state_dict = renamed
    return resample_permute_mlps(dict(state_dict), model)


def resample_permute_mlps(state_dict: StateDict, model: nn.Module) -> StateDict:
    """The height and width mixing layers of a checkpoint trained on another token grid, resampled to the model's.

    ``mlp_h`` maps the H tokens of a segment's column (S channels each) to the same tokens: its weight is an (H x H)
    token-mixing matrix per pair of segment channels, resampled as a function of the tokens' relative positions
    (:mod:`visionmlp.models.resample`), its bias per token likewise; ``mlp_w`` along the width. Nothing else in ViP
    depends on the grid.
    """
    resampled = False
    for name, module in model.named_modules():
        if not isinstance(module, PermuteMlp):
            continue
        segment_chs = module.mlp_c.in_features // module.num_segments
        for layer_name in ("mlp_h", "mlp_w"):
            layer = getattr(module, layer_name)
            key = f"{name}.{layer_name}.weight"
            if key not in state_dict or state_dict[key].shape == layer.weight.shape:
                continue
            old, new = state_dict[key].shape[0] // segment_chs, layer.weight.shape[0] // segment_chs
            weight = state_dict[key].reshape(old, segment_chs, old, segment_chs)
            weight = resample_mixing(weight, (0,), (2,), (old,), (new,))
            state_dict[key] = weight.reshape(new * segment_chs, new * segment_chs)
            bias_key = f"{name}.{layer_name}.bias"
            if bias_key in state_dict:
                bias = state_dict[bias_key].reshape(old, segment_chs)
                state_dict[bias_key] = resample_positions(bias, (0,), (old,), (new,)).reshape(-1)
            resampled = True
    if resampled:
        log_resampled("the Permute-MLPs' height and width mixing", model.img_size)
    return state_dict


def _create_vip(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionPermutator:
    return build_model_with_cfg(
        VisionPermutator,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **resolve_pretrained_kwargs(variant, pretrained, kwargs),
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (16, 16),
        "fixed_input_size": True,  # the Permute-MLP is built for one token grid (see ``img_size``)
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "custom_load": True,
        "license": "mit",
        "paper_ids": "arXiv:2106.12368",
        "origin_url": "https://github.com/houqb/VisionPermutator",
        **kwargs,
    }


# Evaluation settings of the official validate.py / model configs (test-time pooling off).
default_cfgs = generate_default_cfgs({
    "vip_s7": _cfg(crop_pct=0.9, **pretrained_cfg_entries("vip_s7")),
    "vip_m7": _cfg(crop_pct=0.9, **pretrained_cfg_entries("vip_m7")),
    "vip_l7": _cfg(crop_pct=0.875, **pretrained_cfg_entries("vip_l7")),
})


@register_model
def vip_s7(pretrained: bool = False, **kwargs: Any) -> VisionPermutator:
    """ViP-Small/7: 25.1M parameters at 224."""
    model_args = dict(
        depths=(4, 3, 8, 3),
        embed_dims=(192, 384, 384, 384),
        num_segments=(32, 16, 16, 16),
        stage_strides=(1, 2, 1, 1),
    )
    return _create_vip("vip_s7", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vip_m7(pretrained: bool = False, **kwargs: Any) -> VisionPermutator:
    """ViP-Medium/7: 55.3M parameters at 224."""
    model_args = dict(
        depths=(4, 3, 14, 3),
        embed_dims=(256, 256, 512, 512),
        num_segments=(32, 32, 16, 16),
        stage_strides=(1, 1, 2, 1),
    )
    return _create_vip("vip_m7", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vip_l7(pretrained: bool = False, **kwargs: Any) -> VisionPermutator:
    """ViP-Large/7: 87.8M parameters at 224."""
    model_args = dict(
        depths=(8, 8, 16, 4),
        embed_dims=(256, 512, 512, 512),
        num_segments=(32, 16, 16, 16),
        stage_strides=(1, 2, 1, 1),
    )
    return _create_vip("vip_l7", pretrained=pretrained, **dict(model_args, **kwargs))
