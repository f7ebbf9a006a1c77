"""Creating models by name, converting official checkpoints, re-parameterizing."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

import timm
import torch
from timm.models import is_model, model_entrypoint
from torch import nn

from ..checkpoint import StateDict, check_state_dict_fits, load_checkpoint_state, read_checkpoint, unwrap_state_dict
from . import repmlpnet
from .fold import reparameterize

# Public names, in the order of the reference table (family by family, small to large).
MODEL_NAMES = (
    "ms_mlp_tiny", "ms_mlp_small", "ms_mlp_base",
    "vip_s7", "vip_m7", "vip_l7",
    "strip_mlp_tiny_light", "strip_mlp_tiny", "strip_mlp_small", "strip_mlp_base",
    "raft_mlp_s", "raft_mlp_m", "raft_mlp_l",
    "raft_mlp_org_mixer", "raft_mlp_r1", "raft_mlp_r2", "raft_mlp_r4", "raft_mlp_hierarchy_m", "raft_mlp_r2_cross_emb",
    "raft_mlp_deep",
    "repmlpnet_t224", "repmlpnet_b224", "repmlpnet_t256", "repmlpnet_b256", "repmlpnet_d256", "repmlpnet_l256",
)


# a key name that each family's checkpoints hold, in our layout and the official one, and no other family's (anchored:
# timm's MLP-Mixer has blocks.N.mlp_tokens too)
FAMILY_KEYS = {
    "ms_mlp": ("MS-MLP", re.compile(r"(stages|layers)\.\d+\.blocks\.\d+\.dwconv_lr\.")),
    "vip": ("ViP", re.compile(r"(stages\.\d+\.blocks|network\.\d+)\.\d+\.attn\.mlp_h\.")),
    "strip_mlp": ("Strip-MLP", re.compile(r"(stages\.\d+\.blocks\.|blocks\d\.)\d+\.token_mixing\.")),
    "raft_mlp": ("RaftMLP", re.compile(r"stages\.\d+\.blocks\.\d+\.mlp_(vertical|tokens)\.|levels\.\d+\.fn\.")),
    "repmlpnet": ("RepMLPNet", re.compile(r"stages\.\d+\.\d+\.repmlp_block\.")),
}


def checkpoint_family(keys: Iterable[str]) -> str | None:
    """The family (``vip``, ``raft_mlp``, ...) whose distinctive key names ``keys`` hold; None where none's do."""
    keys = list(keys)
    return next((family for family, (_, pattern) in FAMILY_KEYS.items() if any(map(pattern.match, keys))), None)


def other_family_hint(model: nn.Module, keys: Iterable[str]) -> str:
    """Where ``keys`` are those of another family's checkpoint than ``model``'s, a sentence naming that family and its
    variants; else ``""``."""
    family = checkpoint_family(keys)
    if family is None or type(model).__module__ == f"{__package__}.{family}":
        return ""
    return (f"this looks like a checkpoint of {FAMILY_KEYS[family][0]}: pass --model with one of its variants "
            f"({', '.join(list_models(family))})")


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
        if other_family_hint(model, state_dict):  # another family's checkpoint: no form of this model holds it
            raise
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


class _Notes(logging.Handler):
    """Collects the messages the model files log while a checkpoint loads (resampled weights)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_for_finetuning(
    model: nn.Module, name: str, path: str | os.PathLike, classes: tuple[Any, ...] | None = None,
) -> list[str]:
    """Initialise ``model`` (variant or timm model ``name``) from checkpoint ``path`` to fine-tune it; returns what was
    adapted: a classifier replaced for another number of classes (or for other ``classes``, a description of the
    run's classes compared with the one a ``visionmlp train`` checkpoint records), grid-sized weights resampled for
    another size.

    Any checkpoint ``create_model(checkpoint_path=...)`` reads (ours, official, training or EMA weights) is taken,
    except a folded (deploy) one: folding merges branches and BatchNorms into single layers and cannot be undone.
    """
    checkpoint = read_checkpoint(path)
    state_dict = unwrap_state_dict(checkpoint)
    own = model.state_dict()
    folded_repmlp = [k for k in state_dict if k.endswith("fc3.bias") and k not in own and k.replace(
        "fc3.bias", "fc3.weight") in own]
    recorded_form = (checkpoint.get("visionmlp") or {}).get("form") if isinstance(checkpoint, Mapping) else None
    if recorded_form == "deploy" or folded_repmlp:
        raise ValueError(
            f"{path} holds the folded (deploy) form of the model, which cannot be trained: folding merges branches "
            "and BatchNorms into single layers and cannot be undone. Fine-tune from the training-form checkpoint "
            "(the file that visionmlp convert --deploy read, or an official *-train-* checkpoint)")
    recorded = checkpoint.get("config") if isinstance(checkpoint, Mapping) else None
    new_classes = (classes is not None and isinstance(recorded, Mapping) and isinstance(recorded.get("data"), Mapping)
                   and run_classes(recorded) != classes)
    filter_fn = family_module(name).checkpoint_filter_fn if name in MODEL_NAMES else (lambda sd, _: dict(sd))
    notes, logger = _Notes(), logging.getLogger("visionmlp.models")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(notes)
    try:
        adapted = load_checkpoint_state(model, state_dict, filter_fn, new_classes)
    finally:
        logger.removeHandler(notes)
        logger.setLevel(level)
    return adapted + notes.messages


def run_classes(config: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a run's classes are, for comparing two runs: its data set and the classes it selects."""
    data = config["data"]
    return data.get("dataset"), tuple(map(str, data.get("classes") or ()))
