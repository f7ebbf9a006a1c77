"""RaftMLP checkpoints: official ones (``levels.*`` keys, as the authors' trainer saves them) in ``RaftMLP``'s
layout, and the token-grid check every checkpoint passes.

The official model is a list of levels; level ``i`` is one ``Sequential`` (``levels.i.fn``) of

* the patch embedding: a cross-scale embedding (``fn.0.fc``: one linear layer over the concatenated unfolds, kernel
  by kernel, each flattened (C_in, k, k)), or a plain one (``fn.0`` rearranges each patch to (row, column, C_in),
  ``fn.1`` is the linear layer);
* then block ``j`` at ``fn.{j + 2}``: for raft token mixing ``Sequential(shrink, vertical, rearrange, horizontal,
  expansion, channel)``, for MLP-Mixer's ``Sequential(shrink, tokens, expansion, channel)``; each MLP branch holds its
  norm at ``norm`` (at ``norm.1`` for token norms, between two rearranges) and its layers at ``fn.0`` and ``fn.3``.

Without shortcuts the model has one head, ``heads.0`` (rearrange, LayerNorm, rearrange, mean), and ``classifier``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..checkpoint import StateDict

if TYPE_CHECKING:
    from .raft_mlp import RaftMLP

__all__ = ['check_token_grid', 'checkpoint_filter_fn', 'convert_official']


def _raft_channels_first(norm_weight: torch.Tensor, raft_size: int) -> torch.Tensor:
    """Reorder an official token-norm affine from (group, raft) channel order to our (raft, group) order."""
    return norm_weight.reshape(-1, raft_size).t().reshape(-1)


def convert_official(state_dict: StateDict, model: RaftMLP) -> StateDict:
    """An official RaftMLP state dict (``levels.*``) with ``model``'s keys; a ValueError if it is another setting's."""

    def take(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise ValueError(f'the official RaftMLP checkpoint does not fit this model (no {key!r}): it was trained '
                             'with another setting (levels, embedding, token mixing or depth)')
        return state_dict[key]

    out = {}
    for i, stage in enumerate(model.stages):
        src = f'levels.{i}.fn.'
        dst = f'stages.{i}.'
        convs = stage.embed.proj
        if src + '0.fc.weight' in state_dict:  # cross-scale: the concatenated unfolds, each (C_in, k, k)
            fc_weight = state_dict[src + '0.fc.weight']
            bias = take(src + '0.fc.bias')
            offset = 0
            for j, conv in enumerate(convs):
                size = conv.weight[0].numel()
                out[f'{dst}embed.proj.{j}.weight'] = fc_weight[:, offset:offset + size].reshape(conv.weight.shape)
                offset += size
        else:  # a plain patch embedding: each patch flattened (row, column, C_in)
            fc_weight, bias = take(src + '1.weight'), take(src + '1.bias')
            out_chans, in_chans, k, _ = convs[0].weight.shape
            if len(convs) != 1 or fc_weight.shape != (out_chans, k * k * in_chans):
                raise ValueError(f'the official checkpoint\'s level {i} has a plain {tuple(fc_weight.shape)} patch '
                                 f'embedding; this model\'s stage {i} embeds with kernels {stage.embed.kernel_sizes}')
            out[dst + 'embed.proj.0.weight'] = fc_weight.reshape(out_chans, k, k, in_chans).permute(0, 3, 1, 2)
        out[dst + 'embed.proj.0.bias'] = bias
        for j, block in enumerate(stage.blocks):
            blk_src = f'{src}{j + 2}.'
            blk_dst = f'{dst}blocks.{j}.'
            if hasattr(block, 'mlp_tokens'):  # MLP-Mixer: (shrink, tokens, expansion, channel)
                token_branches, channel_idx = (('tokens', 1, None),), 3
            else:  # raft: (shrink, vertical, rearrange, horizontal, expansion, channel)
                token_branches, channel_idx = (('vertical', 1, block.raft_size), ('horizontal', 3, block.raft_size)), 5
            for name, idx, raft_size in token_branches:
                for p in ('weight', 'bias'):
                    norm = take(f'{blk_src}{idx}.norm.1.{p}')
                    out[f'{blk_dst}norm_{name}.{p}'] = norm if raft_size is None else _raft_channels_first(
                        norm, raft_size)
                    out[f'{blk_dst}mlp_{name}.fc1.{p}'] = take(f'{blk_src}{idx}.fn.0.{p}')
                    out[f'{blk_dst}mlp_{name}.fc2.{p}'] = take(f'{blk_src}{idx}.fn.3.{p}')
            for p in ('weight', 'bias'):
                out[f'{blk_dst}norm_channels.{p}'] = take(f'{blk_src}{channel_idx}.norm.{p}')
                out[f'{blk_dst}mlp_channels.fc1.{p}'] = take(f'{blk_src}{channel_idx}.fn.0.{p}')
                out[f'{blk_dst}mlp_channels.fc2.{p}'] = take(f'{blk_src}{channel_idx}.fn.3.{p}')
    for p in ('weight', 'bias'):
        out[f'norm.{p}'] = take(f'heads.0.1.{p}')
        if f'classifier.{p}' in state_dict:
            out[f'head.{p}'] = state_dict[f'classifier.{p}']
    return out


def checkpoint_filter_fn(state_dict: StateDict, model: RaftMLP) -> StateDict:
    """Convert an official RaftMLP state dict (``levels.*``) to this model's keys (ours pass unchanged); a checkpoint
    trained on another token grid is refused with the fix (:func:`check_token_grid`)."""
    if any(k.startswith('levels.') for k in state_dict):
        state_dict = convert_official(state_dict, model)
    check_token_grid(state_dict, model)
    return state_dict


def check_token_grid(state_dict: StateDict, model: RaftMLP) -> None:
    """A ValueError naming the fix if the checkpoint's token-mixing MLPs were sized for another grid than the model's.

    RaftMLP changes resolution as its authors do, not by resampling weights: a token MLP's hidden layer is twice as
    wide as its input (a column or row of rafts, or all tokens) and has no spatial order, so there is nothing to
    interpolate it along. Build the model at the checkpoint's ``img_size`` with ``dynamic_img_size=True``: each
    block then resizes its token map to the trained grid for the token mixing and back (bicubic), and the model
    takes any input size.
    """
    for i, stage in enumerate(model.stages):
        if not len(stage.blocks):
            continue
        for name in ('mlp_vertical', 'mlp_horizontal', 'mlp_tokens'):
            key = f'stages.{i}.blocks.0.{name}.fc1.weight'
            if key not in state_dict or not hasattr(stage.blocks[0], name):
                continue
            expected = getattr(stage.blocks[0], name).fc1.weight.shape
            if state_dict[key].shape != expected:
                raise ValueError(
                    f'the checkpoint\'s token-mixing MLPs were trained on another token grid than img_size '
                    f'{model.img_size[0]}x{model.img_size[1]} gives ({key}: {tuple(state_dict[key].shape)} against '
                    f'{tuple(expected)}); RaftMLP does not resample them (their hidden layers have no spatial order). '
                    'Build the model at the checkpoint\'s img_size with dynamic_img_size=True, which runs any input '
                    'size the way the official code does')
