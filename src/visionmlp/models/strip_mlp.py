"""Strip-MLP.

Paper: `Strip-MLP: Efficient Token Interaction for Vision MLP`
    Guiping Cao, Shengda Luo, Wenjian Huang, Xiangyang Lan, Dongmei Jiang, Yaowei Wang, Jianguo Zhang
    ICCV 2023, https://arxiv.org/abs/2307.11458
Official code: https://github.com/Med-Process/Strip_MLP

A four-stage network. Each block mixes tokens (a pre-activated depth-wise conv, then half the channels go through
the cascaded strip MLP layers and half through local strip convs with a learned re-weighting) and then channels
(7x7 depth-wise conv, LayerNorm, an MLP with global response norm). Stages 2 and 3 also feed strided depth-wise
shortcuts forward to the later stages.

The strip MLP layers mix whole rows and columns of the token grid with dense weights, so a model is built for one
(square) ``img_size``; a checkpoint trained at another size loads with its strip MLPs and relative position tables
resampled as functions of the tokens' relative positions (:func:`resample_strip_mixing`). The official model
re-uses one hard-coded drop-path rate of 0.1 for every block whatever it is asked for; here ``drop_path_rate``
(default 0.1, applied to every block alike) sets it.

With fast kernels (``visionmlp.set_fast_kernels``) the network runs channels-last from its stem on, where oneDNN
has its fast paths for 1x1 and depth-wise convs on CPU, and each mixing step runs its fast form
(``visionmlp.kernels.strip_mlp``); the maths is the same.
"""

from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_
from timm.layers.grn import GlobalResponseNorm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from torch import nn

from .. import kernels
from ..checkpoint import load_pretrained_file
from ..kernels.strip_mlp import channel_mixing as channel_mixing_kernel
from ..kernels.strip_mlp import local_strip_mixing as local_strip_mixing_kernel
from ..kernels.strip_mlp import strip_mixing as strip_mixing_kernel
from ..kernels.strip_mlp import token_mixing as token_mixing_kernel
from .fold import fold_bn_after
from .layers import check_input_size
from .strip_mlp_convert import checkpoint_filter_fn, resample_strip_mixing
from .weights import pretrained_cfg_entries, resolve_pretrained_kwargs

__all__ = ["StripMLPNet", "checkpoint_filter_fn", "resample_strip_mixing"]

_NUM_STAGES = 4

for _leaf in ("check_input_size", "channel_mixing_kernel", "local_strip_mixing_kernel", "strip_mixing_kernel",
              "token_mixing_kernel"):
    torch.fx.wrap(_leaf)


class StripMixing(nn.Module):
    """Cascaded group strip mixing: a row strip MLP, then a column strip MLP, each fused with its input.

    The channels are cut into ``channel_patches`` patches of ``groups = dim // channel_patches`` channels; a strip
    MLP owns one dense (L x L) matrix per channel of a patch for each of 3 taps across neighbouring strips, shared by
    all patches. ``proj_h`` mixes along each row (its taps span neighbouring rows), ``proj_w`` along each column.
    Weights keep the official grouped-conv layout ``(groups * L, L, 1, 3)``.
    """

    def __init__(self, dim: int, grid_size: int, channel_patches: int, fast_kernels: bool = False) -> None:
        super().__init__()
        if dim % channel_patches:
            raise ValueError(f"strip mixing width {dim} is not divisible into {channel_patches} channel patches")
        self.fast_kernels = fast_kernels
        self.dim = dim
        self.grid_size = grid_size
        self.channel_patches = channel_patches
        self.groups = dim // channel_patches
        self.proj_h = nn.Conv2d(self.groups * grid_size, self.groups * grid_size, (1, 3), padding=(0, 1),
                                groups=self.groups)
        self.proj_w = nn.Conv2d(self.groups * grid_size, self.groups * grid_size, (1, 3), padding=(0, 1),
                                groups=self.groups)
        self.fuse_h = nn.Conv2d(2 * dim, dim, 1, bias=False)
        self.fuse_w = nn.Conv2d(2 * dim, dim, 1, bias=False)
        self.norm = nn.BatchNorm2d(dim)
        self.act = nn.GELU()
        # Relative position biases: token (i, j) of channel c gets table[j - i + grid_size, c].
        self.pos_h = nn.Parameter(torch.zeros(2 * grid_size + 1, dim))
        self.pos_w = nn.Parameter(torch.zeros(2 * grid_size + 1, dim))
        trunc_normal_(self.pos_h, std=0.02)
        trunc_normal_(self.pos_w, std=0.02)
        coords = torch.arange(grid_size)
        self.register_buffer("pos_index", coords[None, :] - coords[:, None] + grid_size, persistent=False)

    def position_bias(self, table: torch.Tensor) -> torch.Tensor:
        """The (C, H, W) relative position bias of ``table``."""
        return table[self.pos_index].permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Strip-mix an NCHW map of the built grid size."""
        if self.fast_kernels and not torch.jit.is_scripting():
            return strip_mixing_kernel(self, x)
        N, C, H, W = x.shape
        P, G = self.channel_patches, self.groups
        # rows: for each group, a dense map over the W tokens of a row, with taps over the neighbouring rows
        rows = (x + self.position_bias(self.pos_h)).reshape(N, P, G, H, W).permute(0, 2, 4, 1, 3)
        rows = self.proj_h(rows.reshape(N, G * W, P, H)).reshape(N, G, W, P, H).permute(0, 3, 1, 4, 2)
        rows = self.act(self.norm(self.fuse_h(torch.cat([rows.reshape(N, C, H, W), x], dim=1))))
        # columns: the same over the H tokens of a column, taps over the neighbouring columns
        cols = (rows + self.position_bias(self.pos_w)).reshape(N, P, G, H, W).permute(0, 2, 3, 1, 4)
        cols = self.proj_w(cols.reshape(N, G * H, P, W)).reshape(N, G, H, P, W).permute(0, 3, 1, 2, 4)
        return self.fuse_w(torch.cat([x, cols.reshape(N, C, H, W)], dim=1))

    def fold_batchnorm(self) -> int:
        """Fold ``norm`` into ``fuse_h`` (see :mod:`visionmlp.models.fold`); returns how many BNs it folded."""
        if not isinstance(self.norm, nn.BatchNorm2d):
            return 0
        fold_bn_after(self.fuse_h, self.norm)
        self.norm = nn.Identity()
        return 1


class LocalStripMixing(nn.Module):
    """Local strip mixing: 3x7 and 7x3 depth-wise strips plus identity, blended by per-channel softmax weights."""

    def __init__(self, dim: int, fast_kernels: bool = False) -> None:
        super().__init__()
        self.fast_kernels = fast_kernels
        self.conv_row = nn.Conv2d(dim, dim, (3, 7), padding=(1, 3), groups=dim, bias=False)
        self.conv_col = nn.Conv2d(dim, dim, (7, 3), padding=(3, 1), groups=dim, bias=False)
        self.reweight = Mlp(dim, dim // 2, dim * 3, use_conv=True)

    def branch_weights(self, pooled: torch.Tensor) -> torch.Tensor:
        """The softmax weights of the column, row and identity branches per sample and channel, (3, N, C)."""
        N, C = pooled.shape[:2]
        return self.reweight(pooled).reshape(N, C, 3).permute(2, 0, 1).softmax(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blend the row strip, column strip and identity branches of an NCHW map."""
        if self.fast_kernels and not torch.jit.is_scripting():
            return local_strip_mixing_kernel(self, x)
        x_row = self.conv_row(x)
        x_col = self.conv_col(x)
        a = self.branch_weights((x_col + x_row + x).mean((2, 3), keepdim=True))[..., None, None]
        return x_col * a[0] + x_row * a[1] + x * a[2]


class TokenMixing(nn.Module):
    """Pre-activated depth-wise 3x3 conv, a 1x1 conv, then strip mixing on one half and local mixing on the other."""

    def __init__(self, dim: int, grid_size: int, channel_patches: int, fast_kernels: bool = False) -> None:
        super().__init__()
        self.fast_kernels = fast_kernels
        self.norm = nn.BatchNorm2d(dim)
        self.act = nn.GELU()
        self.conv_dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.proj_in_norm = nn.BatchNorm2d(dim)
        self.strip = StripMixing(dim // 2, grid_size, channel_patches, fast_kernels)
        self.local = LocalStripMixing(dim // 2, fast_kernels)
        self.fuse = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix the tokens of an NCHW map."""
        if self.fast_kernels and not torch.jit.is_scripting():
            return token_mixing_kernel(self, x)
        x = self.conv_dw(self.act(self.norm(x)))
        x = self.act(self.proj_in_norm(self.proj_in(x)))
        x_strip, x_local = x.chunk(2, dim=1)
        return self.fuse(torch.cat([self.strip(x_strip), self.local(x_local)], dim=1))

    def fold_batchnorm(self) -> int:
        """Fold ``proj_in_norm`` into ``proj_in``; ``norm`` stays (a GELU separates it from ``conv_dw``)."""
        if not isinstance(self.proj_in_norm, nn.BatchNorm2d):
            return 0
        fold_bn_after(self.proj_in, self.proj_in_norm)
        self.proj_in_norm = nn.Identity()
        return 1


class ChannelMixing(nn.Module):
    """Depth-wise 7x7 conv, then a channels-last LayerNorm and GRN MLP (ConvNeXt-V2 style, no residual)."""

    def __init__(self, dim: int, mlp_ratio: int, fast_kernels: bool = False) -> None:
        super().__init__()
        hidden = mlp_ratio * dim
        self.fast_kernels = fast_kernels
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.grn = GlobalResponseNorm(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix the channels of an NCHW map."""
        if self.fast_kernels and not torch.jit.is_scripting():
            return channel_mixing_kernel(self, x)
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = self.fc2(self.grn(self.act(self.fc1(self.norm(x)))))
        return x.permute(0, 3, 1, 2)


class StripMLPBlock(nn.Module):
    """Token mixing then channel mixing, each residual with drop path."""

    def __init__(
            self, dim: int, grid_size: int, mlp_ratio: int, channel_patches: int, drop_path: float,
            fast_kernels: bool = False,
    ) -> None:
        super().__init__()
        self.token_mixing = TokenMixing(dim, grid_size, channel_patches, fast_kernels)
        self.channel_mixing = ChannelMixing(dim, mlp_ratio, fast_kernels)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW in and out."""
        x = x + self.drop_path(self.token_mixing(x))
        return x + self.drop_path(self.channel_mixing(x))


class StripMLPStage(nn.Module):
    """Optional 2x2 strided downsampling, then blocks; may start and pass on strided depth-wise shortcuts.

    ``shortcut`` projects this stage's downsampled input towards the next stage; ``shortcut_relay`` carries the
    shortcut received from the previous stage one stage further.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        grid_size: int,
        mlp_ratio: int,
        channel_patches: int,
        drop_path: float,
        downsample: bool,
        shortcut: bool,
        shortcut_relay: bool,
        fast_kernels: bool = False,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = nn.Conv2d(in_dim, dim, 2, stride=2, bias=False) if downsample else nn.Identity()
        # a depth-wise conv with two outputs per channel; oneDNN's form of it is slow, the fast kernel's is not
        shortcut_layer = kernels.ExpandingDepthwiseConv2d if fast_kernels else nn.Conv2d
        strided_shortcut = dict(kernel_size=2, stride=2, groups=dim, bias=False)
        self.shortcut = shortcut_layer(dim, 2 * dim, **strided_shortcut) if shortcut else None
        self.shortcut_relay = shortcut_layer(dim, 2 * dim, **strided_shortcut) if shortcut_relay else None
        self.blocks = nn.Sequential(*[
            StripMLPBlock(dim, grid_size, mlp_ratio, channel_patches, drop_path, fast_kernels) for _ in range(depth)
        ])

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the stage output and the shortcut for the next stage (``None`` if there is none)."""
        x = self.downsample(x)
        skip_out = self.shortcut(x) if self.shortcut is not None else None
        if skip is not None:
            if self.shortcut_relay is not None:
                relayed = self.shortcut_relay(skip)
                skip_out = relayed if skip_out is None else skip_out + relayed
            x = x + skip
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x, skip_out


def _default_channel_patches(dim: int) -> int:
    # The official rule: stages whose width is a multiple of 80 use 2 channel patches, others 4.
    return 2 if dim % 80 == 0 else 4


class StripMLPNet(nn.Module):
    """Strip-MLP: a patchify stem, four stages of strip MLP blocks, BatchNorm, average pool and a linear head.

    Args:
        img_size: Input size the strip MLPs are built for (square, a multiple of ``patch_size * 8``).
        patch_size: Stem patch size.
        in_chans: Input channels.
        num_classes: Classifier outputs (0 for none).
        global_pool: ``'avg'`` or ``''`` (no pooling).
        embed_dim: Width of the first stage; it doubles at every stage.
        depths: Blocks per stage.
        mlp_ratio: Hidden width multiple of the channel MLP (the official ``alpha``).
        channel_patches: Channel patches of the strip mixing, per stage or for all; ``None`` follows the
            official rule (2 for widths that are multiples of 80, else 4).
        drop_rate: Dropout before the classifier (the official model has none).
        drop_path_rate: Stochastic depth rate, the same for every block (official: always 0.1).
        fast_kernels: Take the fast kernels (default: ``visionmlp.use_fast_kernels()``).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 80,
        depths: Sequence[int] = (2, 2, 6, 2),
        mlp_ratio: int = 3,
        channel_patches: int | Sequence[int] | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        fast_kernels: bool | None = None,
    ) -> None:
        super().__init__()
        self.fast_kernels = kernels.resolve_fast_kernels(fast_kernels)
        img_size = to_2tuple(img_size)
        multiple = patch_size * 2 ** (_NUM_STAGES - 1)
        if img_size[0] != img_size[1] or img_size[0] % multiple or img_size[0] <= 0:
            raise ValueError(
                f"img_size must be square and a positive multiple of {multiple} (patch_size {patch_size} "
                f"times 8, e.g. {7 * multiple} or {8 * multiple}), got {img_size}"
            )
        if len(depths) != _NUM_STAGES:
            raise ValueError(f"Strip-MLP has {_NUM_STAGES} stages; depths must have 4 entries, got {depths}")
        if global_pool not in ("", "avg"):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        dims = [embed_dim * 2 ** i for i in range(_NUM_STAGES)]
        if channel_patches is None:
            channel_patches = [_default_channel_patches(d) for d in dims]
        elif isinstance(channel_patches, int):
            channel_patches = [channel_patches] * _NUM_STAGES
        if len(channel_patches) != _NUM_STAGES:
            raise ValueError(f"channel_patches must be an int or have 4 entries, got {channel_patches}")
        self.img_size = img_size
        self.size_multiple = multiple
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dims[-1]
        self.drop_rate = drop_rate

        # the fast kernels run channels-last from here on (see the module docstring)
        stem_layer = kernels.ChannelsLastConv2d if self.fast_kernels else nn.Conv2d
        self.stem = stem_layer(in_chans, embed_dim, patch_size, stride=patch_size, bias=False)
        grid_size = img_size[0] // patch_size
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i, dim in enumerate(dims):
            stage_grid = grid_size // 2 ** i
            self.stages.append(StripMLPStage(
                dims[max(i - 1, 0)], dim, depths[i], stage_grid, mlp_ratio, channel_patches[i], drop_path_rate,
                downsample=i > 0, shortcut=i in (1, 2), shortcut_relay=i == 2, fast_kernels=self.fast_kernels,
            ))
            self.feature_info.append({"num_chs": dim, "reduction": patch_size * 2 ** i, "module": f"stages.{i}"})
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if self.fast_kernels:
            kernels.use_onednn_linears(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay."""
        return {
            "stem": r"^stem",
            "blocks": r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.(?:downsample|shortcut|shortcut_relay)\.", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier layer."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (``num_classes=0`` removes it) and optionally the pooling."""
        if global_pool is not None:
            if global_pool not in ("", "avg"):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        device, dtype = self.stem.weight.device, self.stem.weight.dtype
        self.head = (nn.Linear(self.num_features, num_classes, device=device, dtype=dtype)
                     if num_classes > 0 else nn.Identity())

    def _stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(check_input_size(x, self.img_size, self.size_multiple))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward returning the outputs of the selected stages (NCHW), and the final features unless told not to."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        last_idx = len(self.stages) - 1
        intermediates = []
        x, skip = self._stem_forward(x), None
        for feat_idx, stage in enumerate(stages):
            x, skip = stage(x, skip)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last_idx else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and norm / head) not needed for the selected intermediates."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.head_drop = nn.Identity()
            self.head = nn.Identity()
            self.num_classes = 0
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised final feature map, (B, C, H/32, W/32)."""
        x, skip = self._stem_forward(x), None
        for stage in self.stages:
            x, skip = stage(x, skip)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, dropout and classify (or stop before the classifier when ``pre_logits``)."""
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        x = self.head_drop(x)
        if pre_logits:
            return x
        if not self.global_pool:  # no pooling: classify every location
            return self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        return self.forward_head(self.forward_features(x))

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an official or visionmlp checkpoint file (timm calls this for ``custom_load`` configs)."""
        load_pretrained_file(self, checkpoint_path, checkpoint_filter_fn)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # Evaluation settings of the official main_eval.py: resize 256/224, centre crop, bicubic, ImageNet mean/std.
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "stem",
        "classifier": "head",
        "custom_load": True,
        "license": "mit",
        "paper_ids": "arXiv:2307.11458",
        "paper_name": "Strip-MLP: Efficient Token Interaction for Vision MLP",
        "origin_url": "https://github.com/Med-Process/Strip_MLP",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "strip_mlp_tiny_light": _cfg(**pretrained_cfg_entries("strip_mlp_tiny_light")),
    "strip_mlp_tiny": _cfg(**pretrained_cfg_entries("strip_mlp_tiny")),
    "strip_mlp_small": _cfg(**pretrained_cfg_entries("strip_mlp_small")),
    "strip_mlp_base": _cfg(**pretrained_cfg_entries("strip_mlp_base")),
})


def _create_strip_mlp(variant: str, pretrained: bool = False, **kwargs: Any) -> StripMLPNet:
    return build_model_with_cfg(
        StripMLPNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"out_indices": (0, 1, 2, 3), "feature_cls": "getter"},
        **resolve_pretrained_kwargs(variant, pretrained, kwargs),
    )


@register_model
def strip_mlp_tiny_light(pretrained: bool = False, **kwargs: Any) -> StripMLPNet:
    """Strip-MLP-T* (light tiny): width 80, depths 2-2-6-2."""
    model_args = {"embed_dim": 80, "depths": (2, 2, 6, 2), "mlp_ratio": 3, "channel_patches": 2}
    return _create_strip_mlp("strip_mlp_tiny_light", pretrained, **{**model_args, **kwargs})


@register_model
def strip_mlp_tiny(pretrained: bool = False, **kwargs: Any) -> StripMLPNet:
    """Strip-MLP-T: width 80, depths 2-2-12-2."""
    model_args = {"embed_dim": 80, "depths": (2, 2, 12, 2), "mlp_ratio": 3, "channel_patches": 2}
    return _create_strip_mlp("strip_mlp_tiny", pretrained, **{**model_args, **kwargs})


@register_model
def strip_mlp_small(pretrained: bool = False, **kwargs: Any) -> StripMLPNet:
    """Strip-MLP-S: width 96, depths 2-2-18-2."""
    model_args = {"embed_dim": 96, "depths": (2, 2, 18, 2), "mlp_ratio": 3, "channel_patches": 4}
    return _create_strip_mlp("strip_mlp_small", pretrained, **{**model_args, **kwargs})


@register_model
def strip_mlp_base(pretrained: bool = False, **kwargs: Any) -> StripMLPNet:
    """Strip-MLP-B: width 112, depths 2-2-18-2."""
    model_args = {"embed_dim": 112, "depths": (2, 2, 18, 2), "mlp_ratio": 3, "channel_patches": 4}
    return _create_strip_mlp("strip_mlp_base", pretrained, **{**model_args, **kwargs})
