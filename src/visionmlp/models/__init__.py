"""The five vision-MLP families; importing this package registers every variant with timm."""

from . import ms_mlp, raft_mlp, repmlpnet, strip_mlp, vip
from .factory import MODEL_NAMES, convert_official_state_dict, create_model, family_module, list_models, reparameterize

__all__ = [
    "MODEL_NAMES",
    "convert_official_state_dict",
    "create_model",
    "family_module",
    "list_models",
    "reparameterize",
]
