"""RepMLPNet checkpoints: official ones (training or deploy form) in ``RepMLPNet``'s layout, folded into a deploy-form
model where needed, and partition FCs trained at another resolution resampled to the model's partitions.

The official blocks name their local conv branches ``repconv{k}`` by kernel size (ours: ``repconvs.{k}``); a
training-form block holds them beside ``fc3`` and its BN ``fc3_bn``, a deploy-form block only ``fc3`` with a bias.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import torch

from ..checkpoint import StateDict
from .resample import log_resampled, resample_mixing, resample_positions

if TYPE_CHECKING:
    from .repmlpnet import RepMLPBlock, RepMLPNet

__all__ = ["checkpoint_filter_fn", "resample_partition_fcs"]


def _fold_block_state(state_dict: StateDict, prefix: str, block: RepMLPBlock) -> StateDict:
    """State of ``block`` (deploy form) from a training-form checkpoint's entries under ``prefix``."""
    own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    kernels = sorted(v.shape[-1] for k, v in own.items() if k.startswith("repconvs.") and k.endswith(".conv.weight"))
    reference = own["fc3.weight"]
    with torch.device(reference.device):
        trained = type(block)(block.dim, block.partition_size, block.num_sharesets, kernels, block.gp_reduction)
    trained.to(reference.dtype).load_state_dict(own)
    trained.local_inject()
    return {prefix + k: v for k, v in trained.state_dict().items()}


def checkpoint_filter_fn(state_dict: StateDict, model: RepMLPNet) -> StateDict:
    """Official (training or deploy form) or visionmlp state dict -> keys of ``model``.

    Key names match except the conv branches (official ``repconv3.*``, ours ``repconvs.3.*``). A
    training-form checkpoint loaded into a deploy-form model is folded here (locality injection); a deploy
    checkpoint cannot be unfolded into a training-form model.
    """
    from .repmlpnet import RepMLPBlock  # at call time: the model module imports this one

    out = {re.sub(r"(^|\.)repconv(\d+)\.", r"\1repconvs.\2.", k): v for k, v in state_dict.items()}
    out = resample_partition_fcs(out, model)
    for name, block in model.named_modules():
        if not isinstance(block, RepMLPBlock):
            continue
        prefix = name + "."
        trained_ckpt = prefix + "fc3_bn.running_var" in out
        if block.deploy and trained_ckpt:
            out = {k: v for k, v in out.items() if not k.startswith(prefix)} | _fold_block_state(out, prefix, block)
        elif not block.deploy and prefix + "fc3.bias" in out:
            raise ValueError(
                f"the checkpoint holds folded (deploy) RepMLP blocks ({prefix}fc3.bias); "
                "build the model with deploy=True to load it"
            )
    return out


def resample_partition_fcs(state_dict: StateDict, model: RepMLPNet) -> StateDict:
    """The partition FCs of a checkpoint trained at another resolution, resampled to the model's partitions.

    Each stage's partition is its whole feature map, and ``fc3`` maps a partition's (h x w) tokens to the same
    tokens, one matrix per share-set: a function of the output and input tokens' 2-D positions, resampled over both
    (:mod:`visionmlp.models.resample`), the bias per token likewise. The local conv branches, BatchNorms and the rest
    do not depend on the grid. A checkpoint's partitions must be square (its area says nothing of its aspect).
    """
    from .repmlpnet import RepMLPBlock

    resampled = False
    for name, block in model.named_modules():
        key = f"{name}.fc3.weight"
        if not isinstance(block, RepMLPBlock) or key not in state_dict:
            continue
        area = state_dict[key].shape[1]
        new = block.partition_size
        if area == new[0] * new[1]:
            continue
        side = math.isqrt(area)
        if side * side != area:
            raise ValueError(f"{key}: a partition of {area} tokens is not square, so its grid is unknown; build the "
                             "model at the checkpoint's own img_size")
        sets = block.num_sharesets
        weight = state_dict[key].reshape(sets, side, side, side, side)
        weight = resample_mixing(weight, (1, 2), (3, 4), (side, side), new)
        state_dict[key] = weight.reshape(sets * new[0] * new[1], new[0] * new[1], 1, 1)
        bias_key = f"{name}.fc3.bias"
        if bias_key in state_dict:
            bias = state_dict[bias_key].reshape(sets, side, side)
            state_dict[bias_key] = resample_positions(bias, (1, 2), (side, side), new).reshape(-1)
        resampled = True
    if resampled:
        log_resampled("the partition FCs", model.img_size)
    return state_dict
