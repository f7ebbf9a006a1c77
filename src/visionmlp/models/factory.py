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
from . import repmlpnet
from .fold import reparameterize

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
    deploy: bool = False,
    fast_kernels: bool | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build variant ``name`` through timm; ``checkpoint_path`` loads an official or visionmlp checkpoint.

    With ``deploy=True`` the model comes in its folded inference form (see :func:`reparameterize`);
    the checkpoint may then be in training form (folded after loading) or already folded. ``fast_kernels``
    chooses between the fast kernels and the reference maths (default: :func:`visionmlp.use_fast_kernels`).
    """
    family_module(name)
    if fast_kernels is not None:
        kwargs["fast_kernels"] = fast_kernels
    if deploy:
        if checkpoint_path is None:
            model = timm.create_model(name, pretrained=pretrained, **_architecture_deploy(name), **kwargs)
            return reparameterize(model)
        return deploy_model_from_state_dict(name, unwrap_state_dict(read_checkpoint(checkpoint_path)), **kwargs)
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


def _architecture_deploy(name: str) -> dict[str, Any]:
    # RepMLPNet's constructor builds folded RepMLP blocks itself, and its checkpoint filter folds a
    # training-form checkpoint into them and accepts the official deploy form; other families fold after building
    return {"deploy": True} if family_module(name) is repmlpnet else {}


def _load_strict(model: nn.Module, state_dict: StateDict, filter_fn: Any) -> None:
    state_dict = filter_fn(dict(state_dict), model)
    check_state_dict_fits(model, state_dict, type(model).__name__)
    model.load_state_dict(state_dict, strict=True)


def deploy_model_from_state_dict(name: str, state_dict: StateDict, **kwargs: Any) -> nn.Module:
    """The folded inference form of ``name`` holding ``state_dict`` (training, official or folded form)."""
    filter_fn = family_module(name).checkpoint_filter_fn
    model = timm.create_model(name, **_architecture_deploy(name), **kwargs)
    try:
        _load_strict(model, state_dict, filter_fn)
    except ValueError as training_form_error:
        reparameterize(model)  # not a training-form checkpoint: try the folded form
        try:
            _load_strict(model, state_dict, filter_fn)
        except ValueError as folded_form_error:
            raise ValueError(
                f"the checkpoint fits neither the training form of {name!r} ({training_form_error}) "
                f"nor its folded deploy form ({folded_form_error})"
            ) from None
        return model
    return reparameterize(model)
