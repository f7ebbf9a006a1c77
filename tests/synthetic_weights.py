"""Deterministic synthetic weights and reference files for the equivalence tests.

A reference file ``tests/data/reference/<case>.safetensors`` holds the eval-mode logits (float64) that
the *official* implementation produced for weights made by :func:`synthetic_state_dict` from the
official state-dict layout (key -> shape, stored in the file's metadata) and for the input made by
:func:`reference_input`. The tests rebuild the same weights, pass them through
``convert_official_state_dict`` and compare our logits with the stored ones. Only these facts are
committed; the official code used to produce them is not.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REFERENCE_DIR = Path(__file__).parent / "data" / "reference"


def _generator(key: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


def synthetic_tensor(key: str, shape: list[int], dtype: str) -> torch.Tensor:
    """A tensor for ``key``: fan-in scaled weights, non-trivial norm affine, BN statistics and layer scales."""
    if not dtype.startswith("float"):
        return torch.zeros(shape, dtype=getattr(torch, dtype))
    g = _generator(key)
    leaf = key.rsplit(".", 1)[-1]
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    if leaf == "running_var":
        values = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
    elif leaf == "running_mean":
        values = 0.1 * noise
    elif len(shape) <= 1 and leaf == "weight":
        values = 1.0 + 0.1 * noise
    elif len(shape) <= 1 and leaf == "bias":
        values = 0.1 * noise
    elif len(shape) <= 1:
        values = 0.5 + 0.1 * noise  # layer scales and other per-channel factors
    else:
        values = noise / math.sqrt(max(1, math.prod(shape[1:])))
    return values.to(getattr(torch, dtype))


def state_dict_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, list]:
    """The layout (key -> [shape, dtype name]) of a state dict, as stored in reference metadata."""
    return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state_dict.items()}


def synthetic_state_dict(layout: dict[str, list]) -> dict[str, torch.Tensor]:
    """Deterministic weights for a state-dict layout; the same on every machine and torch version."""
    return {k: synthetic_tensor(k, shape, dtype) for k, (shape, dtype) in layout.items()}


def reference_input(img_size: int | list[int], batch: int = 2) -> torch.Tensor:
    """The float64 input batch every reference was computed on (``img_size``: a side, or height and width)."""
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    g = torch.Generator().manual_seed(1234)
    return torch.randn(batch, 3, height, width, generator=g, dtype=torch.float64)


def save_reference(case: str, layout: dict[str, list], logits: torch.Tensor, **meta) -> Path:
    """Store reference logits with the official layout and any JSON-able metadata (model kwargs, img_size)."""
    REFERENCE_DIR.mkdir(parents=True, exist_ok=True)
    path = REFERENCE_DIR / f"{case}.safetensors"
    metadata = {"layout": json.dumps(layout), **{k: json.dumps(v) for k, v in meta.items()}}
    save_file({"logits": logits.detach().to(torch.float64).contiguous()}, str(path), metadata=metadata)
    return path


def load_reference(case: str) -> tuple[dict[str, list], torch.Tensor, dict]:
    """Layout, logits and metadata of a stored reference."""
    from safetensors import safe_open

    path = REFERENCE_DIR / f"{case}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    meta = {k: json.loads(v) for k, v in raw.items() if k != "layout"}
    return json.loads(raw["layout"]), load_file(str(path))["logits"], meta


def relative_l2(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """||ours - reference|| / ||reference||."""
    ours, reference = ours.double(), reference.double()
    return float((ours - reference).norm() / reference.norm().clamp_min(1e-30))
