"""MS-MLP: Mix-Shift MLP

A PyTorch implementation of the model from
    'Mixing and Shifting: Exploiting Global and Local Dependencies in Vision MLPs'
    - Huangjie Zheng, Pengcheng He, Weizhu Chen, Mingyuan Zhou (arXiv:2202.06510, 2022)

Official repository: https://github.com/JegZheng/MS-MLP

Each block splits its channels into groups, rolls every group by its own distance along the width (and, in a
second branch, along the height), mixes each group spatially with a depth-wise conv whose kernel grows with the
distance, adds the two branches and follows with a channel MLP with layer scale.

The state dict keeps the official per-group depth-wise convs (``dwconv_lr.<i>`` / ``dwconv_td.<i>``);
``checkpoint_filter_fn`` maps official checkpoints onto this layout (patch merging moves to the start of the next
stage, the final norm and classifier into ``head``). With fast kernels (``visionmlp.set_fast_kernels``) each block
computes the same sums with fewer, larger ops (``visionmlp.kernels.ms_mlp``) and the linear layers run on oneDNN's
matmul on CPU.
"""
import re
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm, LayerNorm2d, Mlp, NormMlpClassifierHead
from timm.layers import register_notrace_function, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from .. import kernels
from ..checkpoint import load_pretrained_file
from ..kernels.ms_mlp import mix_shift_block as mix_shift_block_kernel
from .weights import pretrained_cfg_entries, resolve_pretrained_kwargs

torch.fx.wrap('mix_shift_block_kernel')

__all__ = ['MsMlp', 'MixShiftBlock', 'checkpoint_filter_fn']

StateDict = Dict[str, torch.Tensor]

# Per-stage kernel sizes of the five channel groups, as in the official configs of all three sizes.
_MIX_SIZES = ((1, 1, 3, 5, 7), (1, 3, 3, 5, 7), (1, 5, 5, 5, 7), (1, 7, 7, 7, 7))
_SHIFT_DISTS = (-2, -1, 0, 1, 2)


def _group_sizes(dim: int, num_groups: int) -> Tuple[int, ...]:
    """Channel counts of ``torch.chunk(dim, num_groups)``, the split the official weights were trained with."""
    step = -(-dim // num_groups)
    sizes = tuple(min(step, dim - start) for start in range(0, dim, step))
    if len(sizes) != num_groups:
        raise ValueError(
            f'cannot split {dim} channels into {num_groups} chunks the way torch.chunk does '
            f'(it gives {len(sizes)}); choose a wider embed_dim')
    return sizes


def _check_size(height: int, width: int, total_stride: int, patch_size: int, what: str) -> None:
    """Raise a clear ValueError unless ``height`` and ``width`` are positive multiples of ``total_stride``."""
    if height % total_stride != 0 or width % total_stride != 0 or height <= 0 or width <= 0:
        raise ValueError(
            f'MS-MLP needs height and width that are positive multiples of {total_stride} '
            f'(patch size {patch_size} times 2 per patch merging); got {what} {height}x{width}')


# The FX leaf functions below have public names on purpose: timm's feature extractor has torch.fx auto-wrap
# them, which it does only for module globals whose names do not start with an underscore.
@register_notrace_function  # a leaf under FX: the check branches on the input's (traced) size
@torch.fx.wrap
def check_input_multiple(x: torch.Tensor, total_stride: int, patch_size: int) -> torch.Tensor:
    """Check an NCHW input's spatial size (see ``_check_size``) and return it unchanged."""
    _check_size(x.shape[-2], x.shape[-1], total_stride, patch_size, 'input')
    return x


class ConvPatchEmbed(nn.Module):
    """Non-overlapping patches by a strided conv, then LayerNorm over channels; NCHW in and out."""

    def __init__(self, in_chs: int, out_chs: int, patch_size: int, norm_layer: type = LayerNorm2d):
        super().__init__()
        self.proj = nn.Conv2d(in_chs, out_chs, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class MixShiftBlock(nn.Module):
    """Grouped shift + depth-wise mixing along width and height, then a channel MLP with layer scale."""

    def __init__(
            self,
            dim: int,
            mix_sizes: Sequence[int] = _MIX_SIZES[0],
            shift_dists: Sequence[int] = _SHIFT_DISTS,
            mlp_ratio: float = 4.,
            ls_init_value: float = 1e-6,
            drop_path: float = 0.,
            act_layer: type = nn.GELU,
            norm_layer: type = LayerNorm,
            fast_kernels: bool = False,
    ):
        super().__init__()
        if len(mix_sizes) != len(shift_dists):
            raise ValueError(f'need one mix size per shift distance, got {list(mix_sizes)} and {list(shift_dists)}')
        if any(k < 1 or k % 2 == 0 for k in mix_sizes):
            raise ValueError(f'mix sizes must be odd and positive to keep the map size, got {list(mix_sizes)}')
        self.fast_kernels = fast_kernels
        self.group_sizes = list(_group_sizes(dim, len(shift_dists)))
        self.shift_dists = list(shift_dists)
        self.dwconv_lr = nn.ModuleList([
            nn.Conv2d(c, c, kernel_size=k, padding=k // 2, groups=c) for c, k in zip(self.group_sizes, mix_sizes)])
        self.dwconv_td = nn.ModuleList([
            nn.Conv2d(c, c, kernel_size=k, padding=k // 2, groups=c) for c, k in zip(self.group_sizes, mix_sizes)])
        self.norm = norm_layer(dim)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=act_layer)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim)) if ls_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the width-shifted and height-shifted branches, each group rolled by its distance and mixed by its
        own depth-wise conv."""
        groups = x.split(self.group_sizes, dim=1)
        lr: List[torch.Tensor] = []
        td: List[torch.Tensor] = []
        for i, (conv_lr, conv_td) in enumerate(zip(self.dwconv_lr, self.dwconv_td)):
            lr.append(conv_lr(torch.roll(groups[i], self.shift_dists[i], 3)))
            td.append(conv_td(torch.roll(groups[i], self.shift_dists[i], 2)))
        return torch.cat(lr, dim=1) + torch.cat(td, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW in and out."""
        if self.fast_kernels and not torch.jit.is_scripting():
            return mix_shift_block_kernel(self, x)
        y = self.mlp(self.norm(self.mix(x).permute(0, 2, 3, 1)))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class MsMlpStage(nn.Module):
    """Optional patch-merging downsample followed by a sequence of MixShiftBlocks."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            downsample: bool,
            mix_sizes: Sequence[int],
            shift_dists: Sequence[int],
            mlp_ratio: float = 4.,
            ls_init_value: float = 1e-6,
            drop_path_rates: Sequence[float] = (),
            norm_layer: type = LayerNorm,
            norm_layer_2d: type = LayerNorm2d,
            fast_kernels: bool = False,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = ConvPatchEmbed(in_dim, dim, 2, norm_layer=norm_layer_2d) if downsample else nn.Identity()
        drop_path_rates = list(drop_path_rates) or [0.] * depth
        self.blocks = nn.Sequential(*[
            MixShiftBlock(
                dim,
                mix_sizes=mix_sizes,
                shift_dists=shift_dists,
                mlp_ratio=mlp_ratio,
                ls_init_value=ls_init_value,
                drop_path=drop_path_rates[i],
                norm_layer=norm_layer,
                fast_kernels=fast_kernels,
            )
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class MsMlp(nn.Module):
    """MS-MLP: a four-stage pyramid of mix-shift blocks with a pool -> LayerNorm -> linear head.

    Runs at any input whose height and width are multiples of the total stride (``patch_size * 8``).
    ``drop_rate`` is dropout after the patch embedding, where the official model applies it.
    """

    def __init__(
            self,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            img_size: Optional[Union[int, Tuple[int, int]]] = None,
            patch_size: int = 4,
            embed_dim: int = 96,
            depths: Sequence[int] = (2, 2, 6, 2),
            mix_sizes: Sequence[Sequence[int]] = _MIX_SIZES,
            shift_dists: Sequence[int] = _SHIFT_DISTS,
            mlp_ratio: float = 4.,
            ls_init_value: float = 1e-6,
            norm_eps: float = 1e-6,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            fast_kernels: Optional[bool] = None,
    ):
        super().__init__()
        self.fast_kernels = kernels.resolve_fast_kernels(fast_kernels)
        num_stages = len(depths)
        if len(mix_sizes) != num_stages:
            raise ValueError(f'need one list of mix sizes per stage ({num_stages}), got {len(mix_sizes)}')
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.total_stride = patch_size * 2 ** (num_stages - 1)
        if img_size is not None:
            _check_size(*to_2tuple(img_size), self.total_stride, patch_size, 'img_size')
        norm_layer = partial(LayerNorm, eps=norm_eps)
        norm_layer_2d = partial(LayerNorm2d, eps=norm_eps)
        dims = [embed_dim * 2 ** i for i in range(num_stages)]

        self.patch_embed = ConvPatchEmbed(in_chans, embed_dim, patch_size, norm_layer=norm_layer_2d)
        self.embed_drop = nn.Dropout(drop_rate)
        dp_rates = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').split(list(depths))
        self.feature_info = []
        stages = []
        for i in range(num_stages):
            stages.append(MsMlpStage(
                dims[max(i - 1, 0)],
                dims[i],
                depth=depths[i],
                downsample=i > 0,
                mix_sizes=mix_sizes[i],
                shift_dists=shift_dists,
                mlp_ratio=mlp_ratio,
                ls_init_value=ls_init_value,
                drop_path_rates=dp_rates[i].tolist(),
                norm_layer=norm_layer,
                norm_layer_2d=norm_layer_2d,
                fast_kernels=self.fast_kernels,
            ))
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dims[-1]
        self.head = NormMlpClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, norm_layer=norm_layer_2d)
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
    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an official or visionmlp checkpoint file (timm calls this for ``custom_load`` configs)."""
        load_pretrained_file(self, checkpoint_path, checkpoint_filter_fn)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Layer scales, which the official training also kept free of weight decay."""
        return {name for name, _ in self.named_parameters() if name.endswith('.gamma')}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay."""
        return dict(
            stem=r'^patch_embed',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^head\.norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear classifier."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False) -> None:
        """Replace the classifier (and optionally the pooling, or drop the head norm with ``reset_other``)."""
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, reset_other=reset_other)
        self.head_hidden_size = self.head.num_features

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (NCHW) selected by ``indices``; ``norm`` has no effect (the head norm follows pooling)."""
        if output_fmt != 'NCHW':
            raise ValueError(f"MS-MLP features are NCHW maps, got output_fmt={output_fmt!r}")
        x = check_input_multiple(x, self.total_stride, self.patch_size)
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.embed_drop(self.patch_embed(x))
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        for idx, stage in enumerate(stages):
            x = stage(x)
            if idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last wanted feature (and the head, if asked or no longer fitting)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        # prune_norm alone changes nothing: the only final norm is the head's, after pooling.
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            self.head = NormMlpClassifierHead(self.num_features, 0, pool_type='', norm_layer=nn.Identity)
        elif prune_head:
            self.reset_classifier(0, '', reset_other=True)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final stage feature map (B, C, H/32, W/32) before pooling."""
        x = check_input_multiple(x, self.total_stride, self.patch_size)
        x = self.embed_drop(self.patch_embed(x))
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, normalize and classify a final feature map."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: StateDict, model: nn.Module) -> StateDict:
    """Map an official MS-MLP state dict onto ours (ours pass through unchanged)."""
    if 'head.fc.weight' in state_dict or any(k.startswith('stages.') for k in state_dict):
        return dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        match = re.match(r'layers\.(\d+)\.(blocks|downsample)\.(.*)', key)
        if match:
            stage, part, rest = int(match.group(1)), match.group(2), match.group(3)
            if part == 'downsample':
                key = f'stages.{stage + 1}.downsample.{rest}'
            else:
                rest = rest.replace('.pwconv1.', '.mlp.fc1.').replace('.pwconv2.', '.mlp.fc2.')
                key = f'stages.{stage}.blocks.{rest}'
        elif key.startswith('norm.'):
            key = 'head.' + key
        elif key.startswith('head.'):
            key = 'head.fc.' + key[len('head.'):]
        out[key] = value
    return out


def _create_ms_mlp(variant: str, pretrained: bool = False, **kwargs: Any) -> MsMlp:
    return build_model_with_cfg(
        MsMlp,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),
        **resolve_pretrained_kwargs(variant, pretrained, kwargs),
    )


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head.fc',
        'custom_load': True,
        'license': 'mit',
        'paper_ids': 'arXiv:2202.06510',
        'paper_name': 'Mixing and Shifting: Exploiting Global and Local Dependencies in Vision MLPs',
        'origin_url': 'https://github.com/JegZheng/MS-MLP',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'ms_mlp_tiny': _cfg(**pretrained_cfg_entries('ms_mlp_tiny')),
    'ms_mlp_small': _cfg(**pretrained_cfg_entries('ms_mlp_small')),
    'ms_mlp_base': _cfg(**pretrained_cfg_entries('ms_mlp_base')),
})


@register_model
def ms_mlp_tiny(pretrained: bool = False, **kwargs: Any) -> MsMlp:
    """MS-MLP-Tiny: 96 channels, depths 3-3-9-3 (28.7M params)."""
    model_args = dict(embed_dim=96, depths=(3, 3, 9, 3), drop_path_rate=0.1)
    return _create_ms_mlp('ms_mlp_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def ms_mlp_small(pretrained: bool = False, **kwargs: Any) -> MsMlp:
    """MS-MLP-Small: 96 channels, depths 3-3-27-3 (50.3M params)."""
    model_args = dict(embed_dim=96, depths=(3, 3, 27, 3), drop_path_rate=0.4)
    return _create_ms_mlp('ms_mlp_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def ms_mlp_base(pretrained: bool = False, **kwargs: Any) -> MsMlp:
    """MS-MLP-Base: 128 channels, depths 3-3-27-3 (88.7M params)."""
    model_args = dict(embed_dim=128, depths=(3, 3, 27, 3), drop_path_rate=0.5)
    return _create_ms_mlp('ms_mlp_base', pretrained=pretrained, **dict(model_args, **kwargs))
