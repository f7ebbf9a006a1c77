"""Creating models by name, converting official checkpoints, re-parameterizing."""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any

import timm
import torch
from timm.models import is_model, model_entrypoint
from torch import nn

from ..checkpoint import StateDict, check_state_dict_fits, read_checkpoint, unwrap_state_dict

# Public names, in the order of the reference table (family by family, small to large).
MODEL_NAMES = (
    "ms_mlp_tiny", "ms_mlp_small", "ms_mlp_base",
    "vip_s7", "vip_m7", "vip_l7",
    "strip_mlp_tiny_light", "strip_mlp_tiny", "strip_mlp_small", "strip_mlp_base",
    "raft_mlp_s", "raft_mlp_m", "raft_mlp_l",
    "repmlpnet_t224", "repmlpnet_b224", "repmlpnet_t256", "repmlpnet_b256", "repmlpnet_d256", "repmlpnet_l256",
)


def list_models(family: str | None = None) -> list[str]:
    """Names of the visionmlp variants, optionally only those of one family (e.g. ``"vip"``)."""
    return [n for n in MODEL_NAMES if family is None or family_module(n).__name__.rsplit(".", 1)[-1] == family]


def family_module(name: str) -> ModuleType:
    """The module that defines variant ``name`` (and its ``checkpoint_filter_fn``)."""
    if name not in MODEL_NAMES or not is_model(name):
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    return sys.modules[model_entrypoint(name).__module__]


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build variant ``name`` through timm; ``checkpoint_path`` loads an official or visionmlp checkpoint."""
    family_module(name)
    if checkpoint_path is not None:
        # custom_load sends the file to the model's own safe reader; timm resets it when a file is given
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, file=str(checkpoint_path), custom_load=True)
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def convert_official_state_dict(name: str, checkpoint: Any, **model_kwargs: Any) -> StateDict:
    """Turn an official checkpoint (object or file path) into a state dict that loads strictly into ours."""
    module = family_module(name)
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint)
    with torch.device("meta"):
        model = timm.create_model(name, **model_kwargs)
    state_dict = module.checkpoint_filter_fn(unwrap_state_dict(checkpoint), model)
    check_state_dict_fits(model, state_dict, repr(name))
    return state_dict


def reparameterize(model: nn.Module) -> nn.Module:
    """Fold every re-parameterizable branch (RepMLPNet locality injection) in place; returns ``model``."""
    for module in list(model.modules()):
        if hasattr(module, "local_inject"):
            module.local_inject()
    return model
