"""RaftMLP

Paper: 'RaftMLP: How Much Can Be Done Without Attention and with Less Spatial Locality?'
    - Yuki Tatsunami, Masato Taki (ACCV 2022) - https://arxiv.org/abs/2108.04384
Official code: https://github.com/okojoalg/raft-mlp

A four-stage MLP whose token mixing is split into a vertical and a horizontal MLP. Each token-mixing
MLP works on a "raft": the ``raft_size`` channel groups of one column (or row) are mixed together,
so an MLP sees ``raft_size * H`` (or ``raft_size * W``) values. Every stage starts with a cross-scale
embedding: patches of several sizes around the same centre, concatenated and projected.

The paper's baseline and ablations are variants of the same model: MLP-Mixer (one level of stride 16 whose token
mixing is one MLP over all H * W tokens, ``token_mixing='mixer'``), one-level raft models of raft size 1, 2 and 4,
with a plain or a cross-scale patch embedding, a deep narrow one, and RaftMLP-M's four levels with plain patch
embeddings. A one-level model's blocks all work at stride 16, and each block's output is a feature map
(``features_only``, ``forward_intermediates``), as the seed's detection and segmentation backbones take them.

Differences from the official implementation (same maths, same weights after conversion):
  * the model is built for one input size (``img_size``) and keeps no per-call state; the official
    levels record the last input's size on their modules during ``forward`` and resize other sizes
    to the trained grid around the token mixing (bicubic). ``dynamic_img_size=True`` does the same here,
    without state: the way to fine-tune or run at another size, since the token MLPs' hidden layers
    (twice their input width, in no spatial order) cannot be resampled (:func:`check_token_grid`).
  * the cross-scale embedding runs as a single strided convolution whose kernel is the sum of the
    zero-padded per-scale kernels, instead of one unfold per scale followed by a linear layer.
  * activations stay channels-last (NHWC) between blocks; each token-mixing MLP permutes its rafts in and out.

With fast kernels (``visionmlp.set_fast_kernels``) the linear layers run on oneDNN's matmul on CPU, each block runs
on raft-shaped views without copies (raft-major in bf16, see ``visionmlp.kernels.raft_mlp``), and in training a
residual branch runs only for the samples its drop path keeps; the maths is the same.
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, get_device_dtype, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq

from .. import kernels
from ..checkpoint import load_pretrained_file
from ..kernels.raft_mlp import token_mixing as raft_token_mixing_kernel
from .layers import check_input_size
from .raft_mlp_convert import check_token_grid, checkpoint_filter_fn
from .weights import pretrained_cfg_entries, resolve_pretrained_kwargs

__all__ = ['RaftMLP', 'check_token_grid', 'checkpoint_filter_fn']


torch.fx.wrap('check_input_size')
torch.fx.wrap('raft_token_mixing_kernel')


def resize_tokens(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """An NHWC token map resized to ``size`` tokens (bicubic, the official code's choice); ``x`` if it has them."""
    if (x.shape[1], x.shape[2]) == tuple(size):
        return x
    x = F.interpolate(x.permute(0, 3, 1, 2), size, mode='bicubic', align_corners=False)
    return x.permute(0, 2, 3, 1)


class CrossScaleEmbed(nn.Module):
    """Cross-scale patch embedding: kernels of several sizes share one stride and one centre.

    The official form unfolds the input once per kernel, concatenates the patches and applies a
    linear layer. That equals a sum of strided convolutions, one per kernel (the linear weight split
    by kernel and reshaped), and since every kernel is centred on the same stride cell the sum is a
    single convolution with the largest kernel and the smaller ones zero-padded into its middle.
    With one kernel size it is a plain patch embedding (MLP-Mixer's, the official ``emb_mixer``).
    """

    def __init__(
            self,
            in_chans: int,
            out_chans: int,
            kernel_sizes: Sequence[int],
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.stride = min(kernel_sizes)
        if any((k - self.stride) % 2 for k in kernel_sizes):
            raise ValueError(f'kernel sizes {tuple(kernel_sizes)} must each exceed the stride {self.stride} by an '
                             'even amount so that every patch shares the same centre')
        self.kernel_sizes = tuple(kernel_sizes)
        self.max_kernel = max(kernel_sizes)
        # one bias suffices for the summed convolutions (the official linear layer has one)
        self.proj = nn.ModuleList([
            nn.Conv2d(in_chans, out_chans, k, stride=self.stride, padding=(k - self.stride) // 2,
                      bias=i == 0, **dd)
            for i, k in enumerate(kernel_sizes)
        ])

    def merged_weight(self) -> torch.Tensor:
        """The kernels of all scales zero-padded to the largest size and summed."""
        weight = 0
        for conv, k in zip(self.proj, self.kernel_sizes):
            pad = (self.max_kernel - k) // 2
            weight = weight + F.pad(conv.weight, (pad, pad, pad, pad))
        # a no-op here; it tells the ONNX exporter the kernel's shape, which it loses through the padding and without
        # which it refuses the convolution
        return weight.view(self.proj[0].out_channels, self.proj[0].in_channels, self.max_kernel, self.max_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW image or map -> NHWC tokens at 1 / stride resolution."""
        # A channels-last kernel makes the conv's output channels-last, so its permutation below is contiguous
        # tokens; a recorded graph then keeps the image as it came rather than a channels-last copy of it.
        x = F.conv2d(
            x, self.merged_weight().contiguous(memory_format=torch.channels_last), self.proj[0].bias,
            stride=self.stride, padding=(self.max_kernel - self.stride) // 2)
        return x.permute(0, 2, 3, 1)


class TokenChannelBlock(nn.Module):
    """A block's token-mixing residual branch (``token_mixing``, by the subclass) on its grid, then the channel-MLP
    residual branch; shared by the raft and MLP-Mixer blocks."""

    def __init__(self, grid_size: Tuple[int, int], dynamic_img_size: bool, fast_kernels: bool) -> None:
        super().__init__()
        self.fast_kernels = fast_kernels
        self.dynamic_img_size = dynamic_img_size
        self.grid_size = tuple(grid_size)

    def add_channel_mixing(self, dim: int, channel_mlp_ratio: float, proj_drop: float, drop_path: float,
                           dd: Dict[str, Any]) -> None:
        """Build the channel-MLP branch and the drop path, after the subclass's token-mixing layers (the order of the
        state dict and of the optimizer's parameters)."""
        self.norm_channels = nn.LayerNorm(dim, **dd)
        self.mlp_channels = Mlp(dim, int(dim * channel_mlp_ratio), drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def channel_mixing(self, x: torch.Tensor) -> torch.Tensor:
        """The channel-MLP branch of NHWC ``x``."""
        return self.mlp_channels(self.norm_channels(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NHWC in, NHWC out. With ``dynamic_img_size`` a map of another size is resized (bicubic) to the block's
        grid for the token mixing and back, as the official code runs inputs of other sizes."""
        if self.dynamic_img_size:
            size = (x.shape[1], x.shape[2])
            x = resize_tokens(self.token_mixing(resize_tokens(x, self.grid_size)), size)
        else:
            x = self.token_mixing(x)
        if self.fast_kernels and not torch.jit.is_scripting():
            return kernels.drop_path_residual(x, self.channel_mixing, self.drop_path)
        return x + self.drop_path(self.channel_mixing(x))


class RaftBlock(TokenChannelBlock):
    """Vertical raft mixing, horizontal raft mixing, channel mixing; each a pre-norm residual MLP.

    Channels are ordered (raft, group): channel ``c = r * (dim // raft_size) + g``. A raft is the set of
    ``raft_size`` channels sharing a group index ``g``; the vertical MLP mixes, for one column and one group, the
    ``raft_size * H`` values indexed (r, h), and the horizontal MLP likewise with (r, w).
    """

    def __init__(
            self,
            dim: int,
            grid_size: Tuple[int, int],
            raft_size: int = 2,
            token_mlp_ratio: float = 2.,
            channel_mlp_ratio: float = 4.,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            dynamic_img_size: bool = False,
            fast_kernels: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(grid_size, dynamic_img_size, fast_kernels)
        dd = {'device': device, 'dtype': dtype}
        if dim % raft_size:
            raise ValueError(f'dim {dim} must be divisible by raft_size {raft_size}')
        self.raft_size = raft_size
        self.groups = dim // raft_size
        height, width = self.grid_size
        self.norm_vertical = nn.LayerNorm(dim, **dd)
        self.mlp_vertical = Mlp(raft_size * height, int(raft_size * height * token_mlp_ratio), drop=proj_drop, **dd)
        self.norm_horizontal = nn.LayerNorm(dim, **dd)
        self.mlp_horizontal = Mlp(raft_size * width, int(raft_size * width * token_mlp_ratio), drop=proj_drop, **dd)
        self.add_channel_mixing(dim, channel_mlp_ratio, proj_drop, drop_path, dd)

    def vertical_mixing(self, x: torch.Tensor) -> torch.Tensor:
        """The vertical token-mixing branch of NHWC ``x``: each raft of a column mixed over its (r, h) values."""
        B, H, W, C = x.shape
        r, g = self.raft_size, self.groups
        y = self.norm_vertical(x).reshape(B, H, W, r, g).permute(0, 2, 4, 3, 1).reshape(B, W, g, r * H)
        return self.mlp_vertical(y).reshape(B, W, g, r, H).permute(0, 4, 1, 3, 2).reshape(B, H, W, C)

    def horizontal_mixing(self, x: torch.Tensor) -> torch.Tensor:
        """The horizontal token-mixing branch of NHWC ``x``: each raft of a row mixed over its (r, w) values."""
        B, H, W, C = x.shape
        r, g = self.raft_size, self.groups
        y = self.norm_horizontal(x).reshape(B, H, W, r, g).permute(0, 1, 4, 3, 2).reshape(B, H, g, r * W)
        return self.mlp_horizontal(y).reshape(B, H, g, r, W).permute(0, 1, 4, 3, 2).reshape(B, H, W, C)

    def token_mixing(self, x: torch.Tensor) -> torch.Tensor:
        """The vertical and then the horizontal residual branch, NHWC in and out, on this block's grid."""
        if self.fast_kernels and not torch.jit.is_scripting():
            return raft_token_mixing_kernel(self, x)
        x = x + self.drop_path(self.vertical_mixing(x))
        return x + self.drop_path(self.horizontal_mixing(x))


class MixerBlock(TokenChannelBlock):
    """MLP-Mixer's block on an NHWC map: token mixing over all H * W tokens, then channel mixing; each a pre-norm
    residual MLP. The paper's baseline (the official ``original_tm`` token mixing).

    The token-mixing MLP sees, for one channel, the ``H * W`` values of the map in row-major order.
    """

    def __init__(
            self,
            dim: int,
            grid_size: Tuple[int, int],
            token_mlp_ratio: float = 2.,
            channel_mlp_ratio: float = 4.,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            dynamic_img_size: bool = False,
            fast_kernels: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(grid_size, dynamic_img_size, fast_kernels)
        dd = {'device': device, 'dtype': dtype}
        num_tokens = self.grid_size[0] * self.grid_size[1]
        self.norm_tokens = nn.LayerNorm(dim, **dd)
        self.mlp_tokens = Mlp(num_tokens, int(num_tokens * token_mlp_ratio), drop=proj_drop, **dd)
        self.add_channel_mixing(dim, channel_mlp_ratio, proj_drop, drop_path, dd)

    def spatial_mixing(self, x: torch.Tensor) -> torch.Tensor:
        """The token-mixing branch of NHWC ``x``: each channel's H * W values mixed by one MLP."""
        B, H, W, C = x.shape
        y = self.norm_tokens(x).reshape(B, H * W, C).transpose(1, 2)
        return self.mlp_tokens(y).transpose(1, 2).reshape(B, H, W, C)

    def token_mixing(self, x: torch.Tensor) -> torch.Tensor:
        """The token-mixing residual branch, NHWC in and out, on this block's grid."""
        if self.fast_kernels and not torch.jit.is_scripting():
            return kernels.drop_path_residual(x, self.spatial_mixing, self.drop_path)
        return x + self.drop_path(self.spatial_mixing(x))


class RaftStage(nn.Module):
    """Cross-scale (or plain patch) embedding followed by raft blocks, or MLP-Mixer blocks, at one resolution
    (NCHW in, NHWC out)."""

    def __init__(
            self,
            in_chans: int,
            dim: int,
            grid_size: Tuple[int, int],
            depth: int,
            embed_kernels: Sequence[int],
            raft_size: int = 2,
            token_mixing: str = 'raft',
            token_mlp_ratio: float = 2.,
            channel_mlp_ratio: float = 4.,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            dynamic_img_size: bool = False,
            fast_kernels: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.grad_checkpointing = False
        self.dynamic_img_size = dynamic_img_size
        self.embed = CrossScaleEmbed(in_chans, dim, embed_kernels, **dd)
        block_args = dict(
            token_mlp_ratio=token_mlp_ratio, channel_mlp_ratio=channel_mlp_ratio, proj_drop=proj_drop,
            drop_path=drop_path, dynamic_img_size=dynamic_img_size, fast_kernels=fast_kernels, **dd)
        if token_mixing == 'mixer':
            blocks = [MixerBlock(dim, grid_size, **block_args) for _ in range(depth)]
        else:
            blocks = [RaftBlock(dim, grid_size, raft_size=raft_size, **block_args) for _ in range(depth)]
        self.blocks = nn.Sequential(*blocks)

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Embed an NCHW map; returns NHWC tokens. With ``dynamic_img_size`` a map whose sides are not multiples
        of the stride is first resized (bicubic) up to the next multiples, as the official code does."""
        if self.dynamic_img_size:
            stride = self.embed.stride
            height, width = x.shape[-2:]
            if height % stride or width % stride:
                x = F.interpolate(x, (-(-height // stride) * stride, -(-width // stride) * stride), mode='bicubic',
                                  align_corners=False)
        return self.embed(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed an NCHW map and mix; returns NHWC."""
        x = self.embed_tokens(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class RaftMLP(nn.Module):
    """RaftMLP with cross-scale embeddings and serial vertical / horizontal raft token mixing (or, for the paper's
    MLP-Mixer baseline, one token-mixing MLP over all tokens).

    The token-mixing weights depend on the token grid, so the model is built for one ``img_size``;
    each side must be a multiple of the total stride (product of the patch sizes, 32 by default).
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (2, 2, 6, 2),
            embed_kernels: Sequence[Sequence[int]] = ((4, 8), (2, 4), (2, 4), (2,)),
            raft_size: int = 2,
            token_mixing: str = 'raft',
            token_mlp_ratio: float = 2.,
            channel_mlp_ratio: float = 4.,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            dynamic_img_size: bool = False,
            fast_kernels: Optional[bool] = None,
            device=None,
            dtype=None,
    ) -> None:
        """Build a RaftMLP.

        Args:
            img_size: Input size the token-mixing MLPs are built for.
            in_chans: Number of input channels.
            num_classes: Number of classes (0 for no classifier).
            global_pool: 'avg' or '' (no pooling).
            embed_dims: Channels of each stage.
            depths: Number of raft blocks in each stage.
            embed_kernels: Cross-scale embedding kernel sizes per stage; the smallest is the stage's stride (one size:
                a plain patch embedding).
            raft_size: Channel groups mixed together by each token-mixing MLP.
            token_mixing: 'raft' (vertical then horizontal raft MLPs) or 'mixer' (MLP-Mixer's one MLP over all
                tokens, the paper's baseline; ``raft_size`` is then unused).
            token_mlp_ratio: Hidden expansion of the vertical / horizontal MLPs.
            channel_mlp_ratio: Hidden expansion of the channel MLP.
            drop_rate: Dropout before the classifier.
            proj_drop_rate: Dropout inside the MLPs.
            drop_path_rate: Stochastic depth rate, the same for every residual branch as in the official code
                (whose ImageNet settings train with 0.1).
            dynamic_img_size: Take inputs of any size, as the official code does: each block resizes its token map
                (bicubic) to the grid ``img_size`` gives for the token mixing and back; ``img_size`` is then the
                size the weights were trained at.
            fast_kernels: Take the fast kernels (default: ``visionmlp.use_fast_kernels()``).
        """
        super().__init__()
        self.fast_kernels = kernels.resolve_fast_kernels(fast_kernels)
        self.dynamic_img_size = dynamic_img_size
        dd = {'device': device, 'dtype': dtype}
        if global_pool not in ('', 'avg'):
            raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
        if token_mixing not in ('raft', 'mixer'):
            raise ValueError(f"token_mixing must be 'raft' or 'mixer', got {token_mixing!r}")
        if not len(embed_dims) == len(depths) == len(embed_kernels):
            raise ValueError(f'embed_dims, depths and embed_kernels must have one entry per stage; got '
                             f'{len(embed_dims)}, {len(depths)} and {len(embed_kernels)}')
        self.img_size = to_2tuple(img_size)
        strides = [min(k) for k in embed_kernels]
        total_stride = self.size_multiple = math.prod(strides)
        if any(side <= 0 or side % total_stride for side in self.img_size):
            raise ValueError(
                f'img_size must be a multiple of {total_stride} on each side (e.g. {7 * total_stride} or '
                f'{8 * total_stride}); got {self.img_size[0]}x{self.img_size[1]}')
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        # A one-level model's features are its patch embedding (tap 0) and each block's output (tap i: block i of
        # 1..depth), all at the level's stride; a model of several levels gives one map per level.
        self.block_features = len(depths) == 1

        stages = []
        self.feature_info = []
        prev_chans = in_chans
        reduction = 1
        for i, (dim, depth, stage_kernels) in enumerate(zip(embed_dims, depths, embed_kernels)):
            reduction *= strides[i]
            stages.append(RaftStage(
                prev_chans, dim, (self.img_size[0] // reduction, self.img_size[1] // reduction), depth, stage_kernels,
                raft_size=raft_size, token_mixing=token_mixing, token_mlp_ratio=token_mlp_ratio,
                channel_mlp_ratio=channel_mlp_ratio, proj_drop=proj_drop_rate, drop_path=drop_path_rate,
                dynamic_img_size=dynamic_img_size, fast_kernels=self.fast_kernels, **dd))
            if self.block_features:
                self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f'stages.{i}.embed'))
                self.feature_info += [
                    dict(num_chs=dim, reduction=reduction, module=f'stages.{i}.blocks.{j}') for j in range(depth)]
            else:
                self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f'stages.{i}'))
            prev_chans = dim
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        if self.fast_kernels:
            kernels.use_onednn_linears(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (timm format)."""
        return dict(
            stem=r'^stages\.0\.embed',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.embed', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Nothing is exempt beyond timm's usual 1-D rule (the official AdamW decays every parameter)."""
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's blocks in the backward pass to save memory."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier layer."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (``num_classes=0`` removes it)."""
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('', 'avg'):
                raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Feature maps (``feature_info``) as NCHW maps, and the final features unless ``intermediates_only``.

        The maps are the stage outputs, or for a one-level model the patch embedding (index 0) and each block's
        output (index i: after block i).

        Args:
            x: Input images.
            indices: Take the last n maps if int, all if None, or the listed map indices.
            norm: Apply the final norm to the last map.
            stop_early: Stop after the last requested map.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the intermediates.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        if not self.dynamic_img_size:
            x = check_input_size(x, self.img_size, self.size_multiple)
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        last_idx = len(self.feature_info) - 1
        feat_idx = 0
        if self.block_features:
            stage = self.stages[0]
            x = stage.embed_tokens(x)  # NHWC
            if 0 in take_indices:
                intermediates.append(x.permute(0, 3, 1, 2))
            blocks = stage.blocks if torch.jit.is_scripting() or not stop_early else stage.blocks[:max_index]
            for feat_idx, block in enumerate(blocks, start=1):
                if stage.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(block, x)
                else:
                    x = block(x)
                if feat_idx in take_indices:
                    y = self.norm(x) if norm and feat_idx == last_idx else x
                    intermediates.append(y.permute(0, 3, 1, 2))
            x = x.permute(0, 3, 1, 2)
        else:
            stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
            for feat_idx, stage in enumerate(stages):
                x = stage(x)  # NHWC
                if feat_idx in take_indices:
                    y = self.norm(x) if norm and feat_idx == last_idx else x
                    intermediates.append(y.permute(0, 3, 1, 2))
                x = x.permute(0, 3, 1, 2)

        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages, or a one-level model's blocks, (and norm / head) not needed for the requested maps."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        prune_end = max_index < len(self.feature_info) - 1
        if self.block_features:
            self.stages[0].blocks = self.stages[0].blocks[:max_index]
        else:
            self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for the last map only
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised final feature map, NCHW."""
        if not self.dynamic_img_size:
            x = check_input_size(x, self.img_size, self.size_multiple)
        for stage in self.stages:
            x = stage(x).permute(0, 3, 1, 2)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the NCHW features and classify (or return the pooled features)."""
        if self.global_pool == 'avg':
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images to logits."""
        return self.forward_head(self.forward_features(x))

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an official or visionmlp checkpoint file (timm calls this for ``custom_load`` configs)."""
        load_pretrained_file(self, checkpoint_path, checkpoint_filter_fn)


def default_out_indices(depths: Sequence[int]) -> Tuple[int, ...]:
    """The maps ``features_only`` gives by default: every level's, or for one level four of its taps. The seed's
    detection and segmentation backbones take MLP-Mixer's patch embedding and the outputs of blocks 4, 10 and 12 of
    12 (taps 0, 4, 10, 12); a one-level model of another depth takes the same fractions of it."""
    if len(depths) > 1:
        return tuple(range(len(depths)))
    depth = depths[0]
    return 0, depth // 3, depth * 5 // 6, depth


def _create_raft_mlp(variant: str, pretrained: bool = False, **kwargs: Any) -> RaftMLP:
    out_indices = default_out_indices(kwargs.get('depths', (2, 2, 6, 2)))
    return build_model_with_cfg(
        RaftMLP, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **resolve_pretrained_kwargs(variant, pretrained, kwargs),
    )


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    # evaluation transform of the official ImageNet loader: Resize(256), CenterCrop(224), ImageNet mean / std
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'fixed_input_size': True,
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stages.0.embed.proj.0', 'classifier': 'head',
        'custom_load': True, 'license': 'apache-2.0', 'paper_ids': 'arXiv:2108.04384',
        'origin_url': 'https://github.com/okojoalg/raft-mlp',
        **pretrained_cfg_entries(family='raft_mlp'),  # the authors released no weights: every variant
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'raft_mlp_s': _cfg(),
    'raft_mlp_m': _cfg(),
    'raft_mlp_l': _cfg(),
    'raft_mlp_org_mixer': _cfg(pool_size=(14, 14)),
    'raft_mlp_r1': _cfg(pool_size=(14, 14)),
    'raft_mlp_r2': _cfg(pool_size=(14, 14)),
    'raft_mlp_r4': _cfg(pool_size=(14, 14)),
    'raft_mlp_hierarchy_m': _cfg(),
    'raft_mlp_r2_cross_emb': _cfg(pool_size=(14, 14)),
    'raft_mlp_deep': _cfg(pool_size=(14, 14)),
})


@register_model
def raft_mlp_s(pretrained: bool = False, **kwargs: Any) -> RaftMLP:
    """RaftMLP-S (official settings imagenet-raft-mlp-cross-mlp-emb-s)."""
    model_args = dict(embed_dims=(64, 128, 256, 512))
    return _create_raft_mlp('raft_mlp_s', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def raft_mlp_m(pretrained: bool = False, **kwargs: Any) -> RaftMLP:
    """RaftMLP-M (official settings imagenet-raft-mlp-cross-mlp-emb-m)."""
    model_args = dict(embed_dims=(96, 192, 384, 768))
    return _create_raft_mlp('raft_mlp_m', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def raft_mlp_l(pretrained: bool = False, **kwargs: Any) -> RaftMLP:
    """RaftMLP-L (official settings imagenet-raft-mlp-cross-mlp-emb-l)."""
    model_args = dict(embed_dims=(128, 192, 512, 1024))
    return _create_raft_mlp('raft_mlp_l', pretrained=pretrained, **dict(model_args, **kwargs))


# The paper's MLP-Mixer baseline and its ablations, as the official ImageNet settings build them.
_ONE_LEVEL = dict(depths=(12,), embed_dims=(768,), embed_kernels=((16,),))


@register_model
def raft_mlp_org_mixer(pretrained: bool = False, **kwargs: Any) -> RaftMLP:
    """The MLP-Mixer baseline (official settings imagenet-org-mixer): one level of patch 16, depth 12, width 768,
    a token MLP over all 196 tokens (expansion 2), channel expansion 4."""
    model_args = dict(_ONE_LEVEL, token_mixing='mixer')
    return _create_raft_mlp('raft_mlp_org_mixer', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def raft_mlp_r1(pretrained: bool = False, **kwargs: Any) -> RaftMLP:
    """One level like the MLP-Mixer baseline with raft token mixing of raft size 1 (official settings
    imagenet-raft-mlp-r-1)."""
    model_args = dict(_ONE_LEVEL, raft_size=1)
    return _create_raft_mlp('raft_mlp_r1', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def raft_mlp_r2(pretrained: bool = False, **kwargs: Any) -> RaftMLP:
    """One level like the MLP-Mixer baseline with raft token mixing of raft size 2 (official settings
    imagenet-raft-mlp-r-2)."""
    model_args = dict(_ONE_LEVEL, raft_size=2)
    return _create_raft_mlp('raft_mlp_r2', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def raft_mlp_r4(pretrained: bool = False, **kwargs: Any) -> RaftMLP:
    """One level like the MLP-Mixer baseline with raft token mixing of raft size 4 (official settings
    imagenet-raft-mlp)."""
    model_args = dict(_ONE_LEVEL, raft_size=4)
    return _create_raft_mlp('raft_mlp_r4', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def raft_mlp_hierarchy_m(pretrained: bool = False, **kwargs: Any) -> RaftMLP:
    """RaftMLP-M's four levels with plain patch embeddings instead of cross-scale ones (official settings
    imagenet-raft-mlp-hierarchy-m)."""
    model_args = dict(embed_dims=(96, 192, 384, 768), embed_kernels=((4,), (2,), (2,), (2,)))
    return _create_raft_mlp('raft_mlp_hierarchy_m', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def raft_mlp_r2_cross_emb(pretrained: bool = False, **kwargs: Any) -> RaftMLP:
    """One level of raft size 2 with a cross-scale embedding of kernels 16 and 32 (official settings
    imagenet-raft-mlp-r-2-cross-mlp-emb)."""
    model_args = dict(_ONE_LEVEL, embed_kernels=((16, 32),), raft_size=2)
    return _create_raft_mlp('raft_mlp_r2_cross_emb', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def raft_mlp_deep(pretrained: bool = False, **kwargs: Any) -> RaftMLP:
    """One deep, narrow level: patch 16, depth 36, width 384, raft size 2 (official settings
    imagenet-raft-mlp-deep, trained at batch 1536 and learning rate 1.5e-3)."""
    model_args = dict(_ONE_LEVEL, depths=(36,), embed_dims=(384,), raft_size=2)
    return _create_raft_mlp('raft_mlp_deep', pretrained=pretrained, **dict(model_args, **kwargs))
