"""Strip-MLP checkpoints: official ones (``blocks{1..4}.*``, ``patch_embed``, ``merging*``, ``conv_s*`` keys) in
``StripMLPNet``'s layout, and strip MLPs trained on another token grid resampled to the model's.

The official blocks keep their token mixing under ``token_mixing.dwsc`` (pre-activation BN and depth-wise conv) and
``token_mixing.smlp_block`` (strip MLP layers, local strip convs, re-weighting, fusion), their channel mixing under
``channel_mixing`` with a ``conv_77`` and a GRN whose affine is stored as (1, 1, 1, C); the cross-stage shortcuts are
top-level ``conv_s1_28``, ``conv_s2_14`` and ``conv_s1_14``.
"""

import torch
from torch import nn

from .resample import log_resampled, resample_mixing, resample_positions, resample_relative_table

__all__ = ["checkpoint_filter_fn", "resample_strip_mixing"]

_NUM_STAGES = 4

# Official module paths inside a block (after the block prefix) and ours.
_BLOCK_RENAMES = (
    ("token_mixing.dwsc.conv_merge.BN.", "token_mixing.norm."),
    ("token_mixing.dwsc.conv_merge.Conv.", "token_mixing.conv_dw."),
    ("token_mixing.smlp_block.mlp.0.", "token_mixing.proj_in."),
    ("token_mixing.smlp_block.mlp.1.", "token_mixing.proj_in_norm."),
    ("token_mixing.smlp_block.relate_pos_h.embeddings_table", "token_mixing.strip.pos_h"),
    ("token_mixing.smlp_block.relate_pos_w.embeddings_table", "token_mixing.strip.pos_w"),
    ("token_mixing.smlp_block.proj_", "token_mixing.strip.proj_"),
    ("token_mixing.smlp_block.fuse_", "token_mixing.strip.fuse_"),
    ("token_mixing.smlp_block.BN.", "token_mixing.strip.norm."),
    ("token_mixing.smlp_block.fc_h.", "token_mixing.local.conv_row."),
    ("token_mixing.smlp_block.fc_w.", "token_mixing.local.conv_col."),
    ("token_mixing.smlp_block.reweight.", "token_mixing.local.reweight."),
    ("token_mixing.smlp_block.fuse.", "token_mixing.fuse."),
    ("channel_mixing.conv_77.", "channel_mixing.conv_dw."),
    ("channel_mixing.layer_norm.", "channel_mixing.norm."),
    ("channel_mixing.grn.gamma", "channel_mixing.grn.weight"),
    ("channel_mixing.grn.beta", "channel_mixing.grn.bias"),
)

_TOP_RENAMES = (
    ("patch_embed.", "stem."),
    ("merging1.", "stages.1.downsample."),
    ("merging2.", "stages.2.downsample."),
    ("merging3.", "stages.3.downsample."),
    ("conv_s1_28.", "stages.1.shortcut."),
    ("conv_s2_14.", "stages.2.shortcut."),
    ("conv_s1_14.", "stages.2.shortcut_relay."),
)


def _rename_official_key(key: str) -> str:
    for stage in range(_NUM_STAGES):
        prefix = f"blocks{stage + 1}."
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            for old, new in _BLOCK_RENAMES:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            return f"stages.{stage}.blocks.{index}.{rest}"
    for old, new in _TOP_RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an official Strip-MLP state dict onto ours (ours pass through), and resample the strip MLPs of a
    checkpoint trained on another token grid (:func:`resample_strip_mixing`)."""
    if "patch_embed.weight" in state_dict:
        renamed = {}
        for key, value in state_dict.items():
            key = _rename_official_key(key)
            if key.endswith(("grn.weight", "grn.bias")):
                value = value.reshape(-1)  # official GRN affine is stored as (1, 1, 1, C)
            renamed[key] = value
        state_dict = renamed
    return resample_strip_mixing(dict(state_dict), model)


def resample_strip_mixing(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The strip MLPs and relative position tables of a checkpoint trained on another (square) grid, resampled.

    ``proj_h`` holds, per channel group and tap, an (L x L) matrix mixing the L tokens of a row; ``proj_w`` of a
    column. Each is resampled as a function of the tokens' relative positions (:mod:`visionmlp.models.resample`),
    the bias per token likewise, and the position tables (one row per offset -L .. L) with the offsets stretched.
    Nothing else in Strip-MLP depends on the grid.
    """
    from .strip_mlp import StripMixing  # the model module imports this one

    resampled = False
    for name, module in model.named_modules():
        if not isinstance(module, StripMixing):
            continue
        groups, new = module.groups, module.grid_size
        for proj in ("proj_h", "proj_w"):
            key = f"{name}.{proj}.weight"
            if key not in state_dict or state_dict[key].shape == getattr(module, proj).weight.shape:
                continue
            old = state_dict[key].shape[1]
            weight = state_dict[key].reshape(groups, old, old, 3)  # (group, output token, input token, tap)
            weight = resample_mixing(weight, (1,), (2,), (old,), (new,))
            state_dict[key] = weight.reshape(groups * new, new, 1, 3)
            bias = state_dict[f"{name}.{proj}.bias"].reshape(groups, old)
            state_dict[f"{name}.{proj}.bias"] = resample_positions(bias, (1,), (old,), (new,)).reshape(-1)
            resampled = True
        for table in ("pos_h", "pos_w"):
            key = f"{name}.{table}"
            if key in state_dict and state_dict[key].shape[0] != 2 * new + 1:
                state_dict[key] = resample_relative_table(state_dict[key], new)
    if resampled:
        log_resampled("the strip MLPs and their position tables", model.img_size)
    return state_dict
