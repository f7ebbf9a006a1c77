"""Timing our models beside another implementation of the same variant (the official code, for instance).

The baseline comes from a Python file of the user's that defines ``build(name) -> nn.Module``: visionmlp
ships no official code. Steps of the models compared are timed in turn, so that a machine whose speed
drifts slows all of them alike; only ratios of such paired times compare two implementations.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..inference import optimize_for_inference
from .benchmark import MODES, BenchmarkSteps, check_counts
from .machine import num_threads, synchronize


def load_builder(path: Path) -> Callable[[str], nn.Module]:
    """The ``build(name) -> nn.Module`` function of the Python file at ``path``."""
    if not path.is_file():
        raise ValueError(f"--baseline {path}: no such file; pass a Python file that defines build(name)")
    spec = importlib.util.spec_from_file_location("visionmlp_benchmark_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "build", None)):
        raise ValueError(f"--baseline {path} defines no build(name) function returning an nn.Module")
    return module.build


class FastPath(nn.Module):
    """A model in ``dtype`` and channels-last that takes fp32 NCHW images, as the plain model does."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped model's output for ``x`` cast to its dtype, in channels-last."""
        return self.model(x.to(self.dtype).contiguous(memory_format=torch.channels_last))


def fast_path_copy(model: nn.Module, dtype: torch.dtype = torch.float32, compile: bool = False,
                   cuda_graphs: bool = False) -> FastPath:
    """Our fast path of ``model``, on a copy (:func:`visionmlp.optimize_for_inference`): the deploy form, in
    ``dtype``, channels-last, compiled with frozen weights if asked."""
    fast = optimize_for_inference(model, dtype=dtype, channels_last=True, compile=compile, cuda_graphs=cuda_graphs)
    return FastPath(fast, dtype)


def seconds_in_turn(
    steps: dict[str, Callable[[], Any]], warmup: int, reps: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of each step, the steps run in turn ``reps`` times after ``warmup`` untimed rounds.

    Each step is timed alone, ``device`` synchronized before and after it, so that on a GPU its queued
    kernels count in its own time and a passing load on the machine slows every step alike.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    seconds: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(reps):
        for label, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            seconds[label].append(time.perf_counter() - start)
    return seconds


def interleaved_step_seconds(
    models: dict[str, nn.Module],
    batch_size: int = 8,
    img_size: int = 224,
    in_chans: int = 3,
    mode: str = "infer",
    warmup: int = 2,
    reps: int = 10,
    threads: int | None = None,
    unfused_optimizer: Collection[str] = (),
) -> dict[str, list[float]]:
    """CPU step times of several models on the same fp32 images, timed in turn, one step each per repetition.

    Models are put in ``mode`` in place and keep their dtype (a :class:`FastPath` casts the images to its own).
    The training steps of the models labelled in ``unfused_optimizer`` run AdamW's per-parameter loop instead
    of its fused kernel, as the official training scripts do.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    check_counts(batch_size, img_size, warmup, reps, threads)
    cpu = torch.device("cpu")
    with num_threads(threads):
        inputs = torch.randn(batch_size, in_chans, img_size, img_size)
        runs = {}
        for label, model in models.items():
            model.train(mode == "train").to(cpu)
            steps = BenchmarkSteps(model, inputs, mode, torch.float32, cpu, label not in unfused_optimizer)
            runs[label] = functools.partial(steps.run, model)
        return seconds_in_turn(runs, warmup, reps, cpu)
