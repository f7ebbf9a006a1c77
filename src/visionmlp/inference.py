"""Preparing a model for inference only: one explicit call for every transform that derives new weights from the
trained ones (folding, casting, channels-last, compiling with frozen weights).

Training never sees these forms: a model being trained holds only its own parameters, which every forward reads as
they are, so a validation pass after any optimizer step measures exactly the weights a checkpoint would save.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch._inductor.config
from torch import nn

from .models.fold import reparameterize

__all__ = ["FrozenCompiled", "optimize_for_inference"]


class FrozenCompiled(nn.Module):
    """A model compiled for inference with its weights frozen into the graph (inductor's ``freezing``).

    Frozen weights are constants: the compiler folds what depends only on them and packs them once for oneDNN, whose
    matmuls and convolutions then take the pointwise ops that follow them. The setting is on while dynamo traces, not
    only while inductor compiles (as ``torch.compile(options=...)`` would set it): dynamo lifts the weights of a model
    it traces without it into graph inputs, which nothing can freeze. With ``cuda_graphs`` each compiled graph is
    replayed as a CUDA graph; an output is then valid until the next call.
    """

    def __init__(self, model: nn.Module, cuda_graphs: bool = False) -> None:
        super().__init__()
        self.compiled = torch.compile(model, mode="reduce-overhead" if cuda_graphs else None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The compiled model's output; compiled on the first call."""
        with torch._inductor.config.patch(freezing=True), torch.no_grad():
            return self.compiled(*args, **kwargs)


def optimize_for_inference(
    model: nn.Module,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    fold: bool = True,
    compile: bool = False,
    cuda_graphs: bool = False,
    device: torch.device | str | None = None,
    inplace: bool = False,
) -> nn.Module:
    """``model`` prepared for inference only (a copy unless ``inplace``); its weights are frozen from then on.

    In the manner of timm's ``reparameterize_model``. Each step is optional:

    * ``fold``: :func:`visionmlp.reparameterize` (RepMLPNet's locality injection, BatchNorms into neighbouring convs
      and linears); outputs equal the eval-mode outputs up to rounding;
    * ``device``, ``dtype``: moved and cast (feed images of that dtype);
    * ``channels_last``: weights channels-last (feed channels-last images);
    * ``compile``: ``torch.compile`` with the weights frozen into the graph (:class:`FrozenCompiled`), CUDA graphs
      with ``cuda_graphs`` (GPU).

    The result is in eval mode and records no gradients. Its weights must not change afterwards: a compiled model
    keeps the values it was compiled with, and folded ones no longer exist in the trained form.
    """
    if cuda_graphs and not compile:
        raise ValueError("cuda_graphs replays a compiled graph: pass compile=True as well")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if fold:
        reparameterize(model)
    model.requires_grad_(False).to(device=device, dtype=dtype)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return FrozenCompiled(model, cuda_graphs) if compile else model
