"""Resampling grid-sized weights for a model built at another resolution than its checkpoint.

Token-mixing layers map the tokens of one grid axis (or of a whole partition) to the same tokens, so their weights
are sized for the grid. As timm's ``resample_abs_pos_embed`` treats a ViT's position embeddings, each such weight is
read as a smooth function of the tokens' relative positions and sampled again on the new grid (bicubic): an output
token of the new grid mixes the inputs at the same relative offsets, in image fractions, as the corresponding token of
the old grid did. A mixing matrix is also scaled by ``old / new`` tokens, so that a smooth input (a constant, say)
gives the same output: each of the more (or fewer) inputs stands for a smaller (or larger) share of the axis.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

__all__ = ["log_resampled", "resample_mixing", "resample_positions", "resample_relative_table"]

_logger = logging.getLogger("visionmlp.models")


def _interpolate(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Bicubic interpolation of the last two dims of ``x`` to ``size`` (computed in float32 or wider)."""
    dtype = x.dtype
    work = x if dtype in (torch.float32, torch.float64) else x.float()
    lead = work.shape[:-2]
    out = F.interpolate(work.reshape(-1, 1, *work.shape[-2:]), size=size, mode="bicubic", align_corners=False)
    return out.reshape(*lead, *size).to(dtype)


def resample_positions(x: torch.Tensor, dims: tuple[int, ...], old: tuple[int, ...], new: tuple[int, ...]
                       ) -> torch.Tensor:
    """``x`` with the token axes ``dims`` (sizes ``old``, one or two axes) resampled to ``new``."""
    if len(dims) == 1:  # one axis: a 2-D interpolation with a unit width
        return resample_positions(x.unsqueeze(-1), (dims[0], x.ndim), old + (1,), new + (1,)).squeeze(-1)
    moved = x.movedim(dims, (-2, -1))
    return _interpolate(moved, new).movedim((-2, -1), dims)


def resample_mixing(weight: torch.Tensor, out_dims: tuple[int, ...], in_dims: tuple[int, ...],
                    old: tuple[int, ...], new: tuple[int, ...]) -> torch.Tensor:
    """A mixing weight whose output token axes ``out_dims`` and input token axes ``in_dims`` (each of sizes ``old``)
    are resampled to ``new``, scaled by the ratio of old to new input tokens."""
    weight = resample_positions(weight, out_dims, old, new)
    weight = resample_positions(weight, in_dims, old, new)
    scale = 1.0
    for before, after in zip(old, new):
        scale *= before / after
    return weight * scale


def resample_relative_table(table: torch.Tensor, new_len: int) -> torch.Tensor:
    """A table of relative-offset biases, rows for offsets ``-L .. L``, resampled to ``-new_len .. new_len``: the
    extreme and zero offsets keep their rows, the others are interpolated between (offsets stretch with the grid)."""
    work = table if table.dtype in (torch.float32, torch.float64) else table.float()
    out = F.interpolate(work.t()[None], size=2 * new_len + 1, mode="linear", align_corners=True)[0].t()
    return out.to(table.dtype)


def log_resampled(what: str, img_size: tuple[int, int]) -> None:
    """Say, once per checkpoint, that grid-sized weights were resampled for a model built at ``img_size``."""
    _logger.info("resampled %s of the checkpoint to the token grids of img_size %dx%d", what, *img_size)
