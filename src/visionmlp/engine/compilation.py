"""Compiled models: frozen-weight inference graphs (inductor's ``freezing``) and plain training graphs."""

from __future__ import annotations

from typing import Any

import torch
import torch._inductor.config
from torch import nn


class FrozenCompiled(nn.Module):
    """A model compiled for inference with its weights frozen into the graph (inductor's ``freezing``).

    Frozen weights are constants: the compiler folds what depends only on them and packs them once for
    oneDNN, whose matmuls and convolutions then take the pointwise ops that follow them. The setting is on
    while dynamo traces, not only while inductor compiles (as ``torch.compile(options=...)`` would set it):
    dynamo lifts the weights of a model it traces without it into graph inputs, which nothing can freeze.
    The weights must not change after the first call. With ``cuda_graphs`` each compiled graph is replayed as
    a CUDA graph, launched at once instead of kernel by kernel; an output is valid until the next call.
    """

    def __init__(self, model: nn.Module, cuda_graphs: bool = False) -> None:
        super().__init__()
        self.compiled = torch.compile(model, mode="reduce-overhead" if cuda_graphs else None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The compiled model's output; compiled on the first call, which must record no gradients to freeze."""
        with torch._inductor.config.patch(freezing=True):
            return self.compiled(*args, **kwargs)


def compiled(model: nn.Module, mode: str = "infer", cuda_graphs: bool = False) -> nn.Module:
    """``torch.compile(model)``; for inference a :class:`FrozenCompiled` (weights frozen into the graph).

    Over compilation without freezing in bf16 on 2 cores of an AVX-512 EPYC (torch 2.15): Strip-MLP-T-light
    103 ms a batch of 8 against 138 ms. Training needs the weights as parameters. Compilations made before in
    this process are dropped first: each one of another model counts against dynamo's per-function
    recompilation limit, past which it would silently run the functions eagerly (from the ninth model of one
    ``--model all`` run on). ``cuda_graphs`` (inference on a GPU) replays the graphs as CUDA graphs.
    """
    torch._dynamo.reset()
    if mode == "infer":
        return FrozenCompiled(model, cuda_graphs)
    return torch.compile(model)
