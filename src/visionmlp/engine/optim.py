"""Optimizer parameter groups for training and fine-tuning: weight decay as timm groups it, layer-wise learning-rate
decay (timm's ``param_groups_layer_decay`` over the model's ``group_matcher``), a learning-rate scale for everything
but the classifier, and a frozen backbone for linear probing.

Each group carries an ``lr_scale``, which timm's schedulers apply at every update.
"""

from __future__ import annotations

from typing import Any

from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

__all__ = ["classifier_parameters", "parameter_groups", "train_classifier_only"]


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model``'s classifier (timm's ``get_classifier``); a ValueError if it has none."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    params = list(classifier.parameters()) if isinstance(classifier, nn.Module) else []
    if not params:
        raise ValueError(f"{type(model).__name__} has no classifier to tell apart from its backbone (num_classes=0?)")
    return params


def parameter_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    backbone_lr_scale: float = 1.0,
    freeze_backbone: bool = False,
) -> list[dict[str, Any]]:
    """Parameter groups for ``model``: no weight decay on 1-D parameters and the model's ``no_weight_decay()``, learning
    rates scaled by ``layer_decay`` per layer from the head down, and by ``backbone_lr_scale`` outside the classifier.

    With ``freeze_backbone`` only the classifier's parameters train (the others stop requiring gradients).
    """
    head = {id(p) for p in classifier_parameters(model)} if (freeze_backbone or backbone_lr_scale != 1.0) else set()
    if freeze_backbone:
        for param in model.parameters():
            param.requires_grad_(id(param) in head)
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if layer_decay is not None:
        groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)
    split = []
    for group in groups:
        scale = group.get("lr_scale", 1.0)
        backbone = [p for p in group["params"] if id(p) not in head]
        classifier = [p for p in group["params"] if id(p) in head]
        for params, group_scale in ((backbone, scale * backbone_lr_scale), (classifier, scale)):
            if params:
                split.append({**group, "params": params, "lr_scale": group_scale})
    return split


def train_classifier_only(model: nn.Module) -> None:
    """Training mode for the classifier and eval mode for the rest (frozen BatchNorm statistics, no dropout or drop
    path): the backbone of a linear probe computes fixed features."""
    model.eval()
    model.get_classifier().train()
