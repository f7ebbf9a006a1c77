"""The five vision-MLP families; importing this package registers every variant with timm."""

from . import ms_mlp, raft_mlp, repmlpnet, strip_mlp, vip
from .factory import (
    MODEL_NAMES,
    convert_official_state_dict,
    create_model,
    deploy_model_from_state_dict,
    family_module,
    list_models,
    load_for_finetuning,
)
from .fold import count_batchnorms, fold_batchnorm, reparameterize
from .repmlpnet import RepMLPBlock

__all__ = [
    "MODEL_NAMES",
    "RepMLPBlock",
    "convert_official_state_dict",
    "count_batchnorms",
    "create_model",
    "deploy_model_from_state_dict",
    "fold_batchnorm",
    "family_module",
    "list_models",
    "load_for_finetuning",
    "reparameterize",
]
