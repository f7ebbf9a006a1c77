"""visionmlp: MS-MLP, Vision Permutator, Strip-MLP, RaftMLP and RepMLPNet as timm models, with tools."""

from .checkpoint import read_checkpoint, unwrap_state_dict
from .inference import optimize_for_inference
from .kernels import set_fast_kernels, use_fast_kernels
from .models import (
    MODEL_NAMES,
    RepMLPBlock,
    convert_official_state_dict,
    create_model,
    fold_batchnorm,
    list_models,
    reparameterize,
)

__version__ = "0.1.0"

__all__ = [
    "MODEL_NAMES",
    "RepMLPBlock",
    "convert_official_state_dict",
    "create_model",
    "fold_batchnorm",
    "list_models",
    "optimize_for_inference",
    "read_checkpoint",
    "reparameterize",
    "set_fast_kernels",
    "unwrap_state_dict",
    "use_fast_kernels",
]
