import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # shared test helpers (synthetic_weights)
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def onednn_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The post-ops ("none", "gelu") of the oneDNN linear calls made during the test (skipped without oneDNN)."""
    from visionmlp.models import layers

    onednn = layers._ONEDNN_LINEAR
    if onednn is None:
        pytest.skip("this torch has no oneDNN linear")
    calls: list[str] = []
    monkeypatch.setattr(layers, "_ONEDNN_LINEAR", lambda *args: calls.append(args[3]) or onednn(*args))
    return calls
