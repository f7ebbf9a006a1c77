"""RaftMLP

Paper: 'RaftMLP: How Much Can Be Done Without Attention and with Less Spatial Locality?'
    - Yuki Tatsunami, Masato Taki (ACCV 2022) - https://arxiv.org/abs/2108.04384
Official code: https://github.com/okojoalg/raft-mlp

A four-stage MLP whose token mixing is split into a vertical and a horizontal MLP. Each token-mixing
MLP works on a "raft": the ``raft_size`` channel groups of one column (or row) are mixed together,
so an MLP sees ``raft_size * H`` (or ``raft_size * W``) values. Every stage starts with a cross-scale
embedding: patches of several sizes around the same centre, concatenated and projected.

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
from timm.models._manipulate import checkpoint_seq

from .. import kernels
from ..checkpoint import StateDict, load_pretrained_file
from ..kernels.raft_mlp import token_mixing as raft_token_mixing_kernel
from .layers import check_input_size

__all__ = ['RaftMLP', 'checkpoint_filter_fn']


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
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW image or map -> NHWC tokens at 1 / stride resolution."""
        # A channels-last kernel makes the conv's output channels-last, so its permutation below is contiguous
        # tokens; a recorded graph then keeps the image as it came rather than a channels-last copy of it.
        x = F.conv2d(
            x, self.merged_weight().contiguous(memory_format=torch.channels_last), self.proj[0].bias,
            stride=self.stride, padding=(self.max_kernel - self.stride) // 2)
        return x.permute(0, 2, 3, 1)


class RaftBlock(nn.Module):
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
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % raft_size:
            raise ValueError(f'dim {dim} must be divisible by raft_size {raft_size}')
        self.fast_kernels = fast_kernels
        self.dynamic_img_size = dynamic_img_size
        self.grid_size = tuple(grid_size)
        self.raft_size = raft_size
        self.groups = dim // raft_size
        height, width = self.grid_size
        self.norm_vertical = nn.LayerNorm(dim, **dd)
        self.mlp_vertical = Mlp(raft_size * height, int(raft_size * height * token_mlp_ratio), drop=proj_drop, **dd)
        self.norm_horizontal = nn.LayerNorm(dim, **dd)
        self.mlp_horizontal = Mlp(raft_size * width, int(raft_size * width * token_mlp_ratio), drop=proj_drop, **dd)
        self.norm_channels = nn.LayerNorm(dim, **dd)
        self.mlp_channels = Mlp(dim, int(dim * channel_mlp_ratio), drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

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

    def channel_mixing(self, x: torch.Tensor) -> torch.Tensor:
        """The channel-MLP branch of NHWC ``x``."""
        return self.mlp_channels(self.norm_channels(x))

    def token_mixing(self, x: torch.Tensor) -> torch.Tensor:
        """The vertical and then the horizontal residual branch, NHWC in and out, on this block's grid."""
        if self.fast_kernels and not torch.jit.is_scripting():
            return raft_token_mixing_kernel(self, x)
        x = x + self.drop_path(self.vertical_mixing(x))
        return x + self.drop_path(self.horizontal_mixing(x))

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


class RaftStage(nn.Module):
    """Cross-scale embedding followed by raft blocks at one resolution (NCHW in, NHWC out)."""

    def __init__(
            self,
            in_chans: int,
            dim: int,
            grid_size: Tuple[int, int],
            depth: int,
            embed_kernels: Sequence[int],
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
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.grad_checkpointing = False
        self.dynamic_img_size = dynamic_img_size
        self.embed = CrossScaleEmbed(in_chans, dim, embed_kernels, **dd)
        self.blocks = nn.Sequential(*[
            RaftBlock(
                dim, grid_size, raft_size=raft_size, token_mlp_ratio=token_mlp_ratio,
                channel_mlp_ratio=channel_mlp_ratio, proj_drop=proj_drop, drop_path=drop_path,
                dynamic_img_size=dynamic_img_size, fast_kernels=fast_kernels, **dd)
            for _ in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed an NCHW map and mix; returns NHWC. With ``dynamic_img_size`` a map whose sides are not multiples
        of the stride is first resized (bicubic) up to the next multiples, as the official code does."""
        if self.dynamic_img_size:
            stride = self.embed.stride
            height, width = x.shape[-2:]
            if height % stride or width % stride:
                x = F.interpolate(x, (-(-height // stride) * stride, -(-width // stride) * stride), mode='bicubic',
                                  align_corners=False)
        x = self.embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class RaftMLP(nn.Module):
    """RaftMLP with cross-scale embeddings and serial vertical / horizontal raft token mixing.

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
            embed_kernels: Cross-scale embedding kernel sizes per stage; the smallest is the stage's stride.
            raft_size: Channel groups mixed together by each token-mixing MLP.
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

        stages = []
        self.feature_info = []
        prev_chans = in_chans
        reduction = 1
        for i, (dim, depth, stage_kernels) in enumerate(zip(embed_dims, depths, embed_kernels)):
            reduction *= strides[i]
            stages.append(RaftStage(
                prev_chans, dim, (self.img_size[0] // reduction, self.img_size[1] // reduction), depth, stage_kernels,
                raft_size=raft_size, token_mlp_ratio=token_mlp_ratio, channel_mlp_ratio=channel_mlp_ratio,
                proj_drop=proj_drop_rate, drop_path=drop_path_rate, dynamic_img_size=dynamic_img_size,
                fast_kernels=self.fast_kernels, **dd))
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
        """Stage outputs as NCHW maps (and the final features unless ``intermediates_only``).

        Args:
            x: Input images.
            indices: Take the last n stages if int, all if None, or the listed stage indices.
            norm: Apply the final norm to the last stage's output.
            stop_early: Stop after the last requested stage.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the intermediates.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        if not self.dynamic_img_size:
            x = check_input_size(x, self.img_size, self.size_multiple)
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        if torch.jit.is_scripting() or not stop_early:
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
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
        """Drop the stages (and norm / head) not needed for the requested intermediates."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for the last stage only
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


def _raft_channels_first(norm_weight: torch.Tensor, raft_size: int) -> torch.Tensor:
    """Reorder an official token-norm affine from (group, raft) channel order to our (raft, group) order."""
    return norm_weight.reshape(-1, raft_size).t().reshape(-1)


def checkpoint_filter_fn(state_dict: StateDict, model: RaftMLP) -> StateDict:
    """Convert an official RaftMLP state dict (``levels.*``) to this model's keys (ours pass unchanged); a checkpoint
    trained on another token grid is refused with the fix (:func:`check_token_grid`)."""
    if any(k.startswith('levels.') for k in state_dict):
        state_dict = _convert_official(state_dict, model)
    check_token_grid(state_dict, model)
    return state_dict


def check_token_grid(state_dict: StateDict, model: RaftMLP) -> None:
    """A ValueError naming the fix if the checkpoint's token-mixing MLPs were sized for another grid than the model's.

    RaftMLP changes resolution as its authors do, not by resampling weights: a token MLP's hidden layer is twice as
    wide as its input column of rafts and has no spatial order, so there is nothing to interpolate it along. Build
    the model at the checkpoint's ``img_size`` with ``dynamic_img_size=True``: each block then resizes its token map
    to the trained grid for the token mixing and back (bicubic), and the model takes any input size.
    """
    for i, stage in enumerate(model.stages):
        key = f'stages.{i}.blocks.0.mlp_vertical.fc1.weight'
        if key not in state_dict or not len(stage.blocks):
            continue
        expected = stage.blocks[0].mlp_vertical.fc1.weight.shape
        if state_dict[key].shape != expected:
            raise ValueError(
                f'the checkpoint\'s token-mixing MLPs were trained on another token grid than img_size '
                f'{model.img_size[0]}x{model.img_size[1]} gives ({key}: {tuple(state_dict[key].shape)} against '
                f'{tuple(expected)}); RaftMLP does not resample them (their hidden layers have no spatial order). '
                'Build the model at the checkpoint\'s img_size with dynamic_img_size=True, which runs any input '
                'size the way the official code does')


def _convert_official(state_dict: StateDict, model: RaftMLP) -> StateDict:
    """An official RaftMLP state dict (``levels.*``) with this model's keys."""
    out = {}
    for i, stage in enumerate(model.stages):
        src = f'levels.{i}.fn.'
        dst = f'stages.{i}.'
        # the official linear takes the concatenated unfolds (kernel by kernel, each (C_in, k, k))
        fc_weight = state_dict[src + '0.fc.weight']
        offset = 0
        for j, conv in enumerate(stage.embed.proj):
            size = conv.weight[0].numel()
            out[f'{dst}embed.proj.{j}.weight'] = fc_weight[:, offset:offset + size].reshape(conv.weight.shape)
            offset += size
        out[dst + 'embed.proj.0.bias'] = state_dict[src + '0.fc.bias']
        for j, block in enumerate(stage.blocks):
            # official block j = Sequential(shrink, vertical, rearrange, horizontal, expansion, channel)
            blk_src = f'{src}{j + 2}.'
            blk_dst = f'{dst}blocks.{j}.'
            for name, idx in (('vertical', 1), ('horizontal', 3)):
                for p in ('weight', 'bias'):
                    out[f'{blk_dst}norm_{name}.{p}'] = _raft_channels_first(
                        state_dict[f'{blk_src}{idx}.norm.1.{p}'], block.raft_size)
                    out[f'{blk_dst}mlp_{name}.fc1.{p}'] = state_dict[f'{blk_src}{idx}.fn.0.{p}']
                    out[f'{blk_dst}mlp_{name}.fc2.{p}'] = state_dict[f'{blk_src}{idx}.fn.3.{p}']
            for p in ('weight', 'bias'):
                out[f'{blk_dst}norm_channels.{p}'] = state_dict[f'{blk_src}5.norm.{p}']
                out[f'{blk_dst}mlp_channels.fc1.{p}'] = state_dict[f'{blk_src}5.fn.0.{p}']
                out[f'{blk_dst}mlp_channels.fc2.{p}'] = state_dict[f'{blk_src}5.fn.3.{p}']
    # without shortcuts the official model has a single head: (rearrange, LayerNorm, rearrange, mean)
    for p in ('weight', 'bias'):
        out[f'norm.{p}'] = state_dict[f'heads.0.1.{p}']
        if f'classifier.{p}' in state_dict:
            out[f'head.{p}'] = state_dict[f'classifier.{p}']
    return out


def _create_raft_mlp(variant: str, pretrained: bool = False, **kwargs: Any) -> RaftMLP:
    return build_model_with_cfg(
        RaftMLP, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),
        **kwargs,
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
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'raft_mlp_s': _cfg(),
    'raft_mlp_m': _cfg(),
    'raft_mlp_l': _cfg(),
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
