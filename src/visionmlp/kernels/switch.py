"""The public switch between the reference maths and the fast kernels.

A model reads it once, when it is built (as timm's layers read ``use_fused_attn()``): ``set_fast_kernels`` changes
the models built afterwards, never a model that exists. The environment variable ``VISIONMLP_FAST_KERNELS``
(``1`` or ``0``) sets the default for the whole process; ``create_model(..., fast_kernels=...)`` decides for one
model. Models built for TorchScript or export (timm's ``set_scriptable`` / ``set_exportable``) take the reference
maths unless told otherwise.
"""

from __future__ import annotations

import os

from timm.layers import is_exportable, is_scriptable

__all__ = ["ENVIRONMENT_VARIABLE", "resolve_fast_kernels", "set_fast_kernels", "use_fast_kernels"]

ENVIRONMENT_VARIABLE = "VISIONMLP_FAST_KERNELS"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _default_from_environment() -> bool:
    value = os.environ.get(ENVIRONMENT_VARIABLE, "1").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{ENVIRONMENT_VARIABLE}={value!r}: set it to 1 (fast kernels, the default) or 0 (the reference "
                     "maths only, public PyTorch ops)")


_FAST_KERNELS = _default_from_environment()


def use_fast_kernels() -> bool:
    """Whether models built now take the fast kernels (never under timm's scriptable or exportable mode)."""
    return _FAST_KERNELS and not is_scriptable() and not is_exportable()


def set_fast_kernels(enable: bool) -> None:
    """Make the models built from now on take the fast kernels (``True``) or the reference maths only."""
    global _FAST_KERNELS
    if not isinstance(enable, bool):
        raise TypeError(f"set_fast_kernels takes True or False, got {enable!r}")
    _FAST_KERNELS = enable


def resolve_fast_kernels(fast_kernels: bool | None) -> bool:
    """A model's ``fast_kernels`` argument: as given, or the process-wide setting when ``None``."""
    return use_fast_kernels() if fast_kernels is None else bool(fast_kernels)
