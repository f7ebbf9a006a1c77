"""Our models against logits the official implementations produced for the same (synthetic) weights.

Each reference file was made by building the official model, filling its state dict with
:func:`synthetic_weights.synthetic_state_dict` (non-trivial BatchNorm statistics and layer scales
included) and running it in float64 on :func:`synthetic_weights.reference_input`. Here the same
official-layout weights go through ``convert_official_state_dict`` into our model.
"""

from __future__ import annotations

import pytest
import timm
import torch

from synthetic_weights import REFERENCE_DIR, load_reference, reference_input, relative_l2, synthetic_state_dict
from visionmlp import MODEL_NAMES, convert_official_state_dict, reparameterize

CASES = sorted(p.name.removesuffix(".safetensors") for p in REFERENCE_DIR.glob("*.safetensors"))


def test_every_variant_has_a_reference():
    assert set(MODEL_NAMES) <= set(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_logits_match_official_implementation(case):
    layout, expected, meta = load_reference(case)
    name, kwargs = meta["model"], meta.get("model_kwargs", {})
    state_dict = convert_official_state_dict(name, {"model": synthetic_state_dict(layout)}, **kwargs)
    x = reference_input(meta["img_size"], batch=expected.shape[0])
    # the same weights (made once: for the larger models that takes longer than running them) in both forms of the
    # model: with the fast kernels and with the reference maths
    for fast_kernels in (True, False):
        # timm's constructor gives the official architecture (for RepMLPNet deploy=True: the official folded
        # form); float64 because the deep variants amplify fp32 rounding of the weights
        model = timm.create_model(name, fast_kernels=fast_kernels, **kwargs).double().eval()
        model.load_state_dict(state_dict, strict=True)
        if meta.get("reparameterize") or kwargs.get("deploy"):
            reparameterize(model)  # what visionmlp.create_model(name, deploy=True) adds: every remaining fold
        with torch.no_grad():
            logits = model(x)
        assert relative_l2(logits, expected) <= 1e-5, f"fast_kernels={fast_kernels}"
        assert torch.equal(logits.argmax(-1), expected.argmax(-1)), f"fast_kernels={fast_kernels}"
        del model
