import os
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))  # shared test helpers (synthetic_weights)
# two workers of pytest-xdist share two cores: one thread each
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


class OneDnnLinearCalls(TorchDispatchMode):
    """Records the post-op ("none", "gelu") of every oneDNN linear product dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.post_ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().startswith("mkldnn::_linear_pointwise"):
            self.post_ops.append(args[3])
        return func(*args, **(kwargs or {}))


@pytest.fixture
def onednn_calls() -> list[str]:
    """The post-ops of the oneDNN linear products made during the test (skipped where torch has no oneDNN linear)."""
    from visionmlp.kernels.torch_ops import LINEAR_POINTWISE

    if LINEAR_POINTWISE is None:
        pytest.skip("this torch has no oneDNN linear")
    with OneDnnLinearCalls() as recorder:
        yield recorder.post_ops


@pytest.fixture(params=[True, False], ids=["fast", "reference"])
def both_forms(request: pytest.FixtureRequest):
    """Runs the test twice, with the models it builds taking the fast kernels and the reference maths
    (through the public switch)."""
    import visionmlp

    previous = visionmlp.use_fast_kernels()
    visionmlp.set_fast_kernels(request.param)
    yield request.param
    visionmlp.set_fast_kernels(previous)
