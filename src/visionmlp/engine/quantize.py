"""Post-training int8 dynamic quantization of the linear layers (CPU), and how it compares with fp32.

As the RepMLP authors recommend, quantization comes after re-parameterization: quantize the folded
model. Dynamic quantization stores ``nn.Linear`` weights as int8 and quantizes activations on the fly.
Only ``nn.Linear`` modules whose own forward runs are quantized: several families compute their
token-mixing FCs with matmuls on the weights (RepMLPNet's partition FC, Strip-MLP's GRN-fused fc2),
and those stay in fp32.

Dynamic quantization is a deterministic function of the fp32 weights, so a quantized model is saved
as its folded fp32 weights plus a note, and re-quantized on load (:func:`load_quantized`): nothing
but tensors is ever unpickled.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from typing import Any

import torch
from torch import nn

from ..models import create_model
from ..kernels import OneDnnLinear

QUANTIZATION_DTYPES = {"int8": torch.qint8}


def called_linear_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the ``nn.Linear`` modules whose forward runs when ``model`` processes ``example``."""
    called: list[str] = []
    handles = [
        module.register_forward_hook(lambda *_, name=name: called.append(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return sorted(set(called))


def quantize_dynamic_int8(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, list[str]]:
    """An int8 dynamically quantized copy of ``model`` (CPU) and the names of the layers it quantized."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    if any(isinstance(module, OneDnnLinear) for module in model.modules()):
        raise ValueError("dynamic quantization replaces plain nn.Linear layers: build the model with "
                         "fast_kernels=False (its reference form)")
    model = copy.deepcopy(model).cpu().eval()
    names = called_linear_layers(model, example.cpu())
    with warnings.catch_warnings():
        # torch announces the future removal of quantized tensors on every quantized weight
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        quantized = quantize_dynamic(model, {name: default_dynamic_qconfig for name in names},
                                     dtype=torch.qint8, inplace=True)
    return quantized, names


def load_quantized(name: str, checkpoint_path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """A model saved by ``visionmlp convert --quantize int8``: load its folded weights, then quantize again."""
    model = create_model(name, deploy=True, checkpoint_path=checkpoint_path, fast_kernels=False, **kwargs).eval()
    size = kwargs.get("img_size") or model.pretrained_cfg["input_size"][-1]
    return quantize_dynamic_int8(model, torch.zeros(1, 3, size, size))[0]


def _seconds_per_batch(model: nn.Module, images: torch.Tensor, reps: int) -> float:
    with torch.no_grad():
        model(images)  # warm-up
        start = time.perf_counter()
        for _ in range(reps):
            model(images)
    return (time.perf_counter() - start) / reps


@torch.inference_mode()
def fp32_agreement(
    model: nn.Module, reference: nn.Module, images: torch.Tensor, batch_size: int, dtype: torch.dtype,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, float]:
    """Top-1 agreement (percent) of ``model``, fed ``dtype`` in ``memory_format``, with fp32 ``reference``.

    Also the largest logit difference, as it is and relative to the reference's largest logit. Both run on the
    device of ``reference`` in chunks of ``batch_size`` images.
    """
    device = next(reference.parameters()).device
    agreeing, largest_diff, largest_logit = 0, 0.0, 0.0
    for chunk in images.split(batch_size):
        expected = reference(chunk.to(device)).float()
        logits = model(chunk.to(device, dtype).contiguous(memory_format=memory_format)).float()
        agreeing += int((logits.argmax(1) == expected.argmax(1)).sum())
        largest_diff = max(largest_diff, (logits - expected).abs().max().item())
        largest_logit = max(largest_logit, expected.abs().max().item())
    return {"top1_agreement": 100.0 * agreeing / len(images), "max_abs_logit_diff": largest_diff,
            "max_rel_logit_diff": largest_diff / largest_logit}


def compare_with_fp32(
    fp32: nn.Module, quantized: nn.Module, images: torch.Tensor, reps: int = 3
) -> dict[str, float]:
    """Top-1 agreement (percent), largest logit difference and CPU latencies of ``quantized`` vs ``fp32``."""
    fp32, images = fp32.cpu().eval(), images.cpu()
    agreement = fp32_agreement(quantized, fp32, images, len(images), torch.float32)
    fp32_s = _seconds_per_batch(fp32, images, reps)
    int8_s = _seconds_per_batch(quantized, images, reps)
    return {
        "top1_agreement": agreement["top1_agreement"],
        "max_abs_logit_diff": agreement["max_abs_logit_diff"],
        "fp32_ms_per_batch": 1000 * fp32_s,
        "int8_ms_per_batch": 1000 * int8_s,
        "speedup": fp32_s / int8_s,
    }
