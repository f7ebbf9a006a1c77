"""``visionmlp export``: ONNX (checked with onnxruntime) or a ``torch.export`` program, with a dynamic batch axis.

Both outputs are verified inside the command: the written file is run on a random batch of another
size than the one traced, and the largest difference from PyTorch is printed. Files are written to a
temporary name and renamed only after they pass.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from ..checkpoint import temporary_file_beside
from ..inference import optimize_for_inference
from ..models import deploy_model_from_state_dict
from .convert import add_model_arguments, input_size, model_from_flags, random_batch, training_form_model

FORMAT_SUFFIXES = {"onnx": ".onnx", "exported-program": ".pt2"}
ONNX_OPSET = 18
Result = TypeVar("Result")


def write_verified(output: Path, write: Callable[[Path], Result]) -> Result:
    """Run ``write(path)`` (export, then check the file) on a temporary file beside ``output`` and move it into place
    only if it returns; its result. Nothing is left behind when it raises."""
    temporary = temporary_file_beside(output)
    try:
        result = write(temporary)
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
    return result


def require_onnxruntime() -> Any:
    """The onnxruntime module, or a ValueError naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise ValueError("ONNX export is verified with onnxruntime, which is not installed: "
                         "pip install 'visionmlp[deploy]'") from None
    return onnxruntime


def onnxruntime_session(path: Path) -> Any:
    """An onnxruntime CPU session for the ONNX file ``path``."""
    onnxruntime = require_onnxruntime()
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: detectors' outputs of data-dependent length draw shape warnings
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_onnx(model: nn.Module, path: Path, img_size: int | tuple[int, int]) -> float:
    """Write ``model`` as ONNX with a dynamic batch axis; the largest onnxruntime-vs-PyTorch difference."""
    require_onnxruntime()  # before the export, which can take minutes
    with warnings.catch_warnings():
        # the tracer notes the input-size checks in forward; the verification below covers the batch axis
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # the TorchScript-based exporter (dynamo=False) needs no onnxscript; torch marks it deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (random_batch(img_size, batch_size=1),), str(path), dynamo=False, opset_version=ONNX_OPSET,
            input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
    images = random_batch(img_size, batch_size=2, seed=1)
    (output,) = onnxruntime_session(path).run(None, {"images": images.numpy()})
    with torch.no_grad():
        return (model(images) - torch.from_numpy(output)).abs().max().item()


def export_program(model: nn.Module, path: Path, img_size: int | tuple[int, int]) -> float:
    """Save a ``torch.export`` program with a dynamic batch axis; the largest difference of the reloaded program."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (random_batch(img_size, batch_size=2),),
                                  dynamic_shapes=({0: batch},), strict=False)
    torch.export.save(program, str(path))
    images = random_batch(img_size, batch_size=3, seed=1)
    with torch.no_grad():
        return (model(images) - torch.export.load(str(path)).module()(images)).abs().max().item()


def export(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model, export, verify and move the file into place; the facts to report."""
    output = Path(args.output)
    suffix = FORMAT_SUFFIXES[args.format]
    if output.suffix != suffix:
        raise ValueError(f"--format {args.format} writes {suffix} files; got --output {str(output)!r}")
    name, state_dict, kwargs, _, _ = model_from_flags(args, keep_trained_grid=True)
    # an exported graph runs elsewhere (onnxruntime, another torch): the reference maths, public ops only
    kwargs["fast_kernels"] = False
    if args.deploy:
        model = deploy_model_from_state_dict(name, state_dict, **kwargs)
    else:
        model = training_form_model(name, state_dict, **kwargs)
    model = optimize_for_inference(model, fold=args.deploy, inplace=True)
    img_size = args.img_size or kwargs.get("img_size") or input_size(model)
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if args.format == "onnx" and getattr(model, "dynamic_img_size", False) and size != tuple(model.img_size):
        raise ValueError(f"--format onnx: this RaftMLP (dynamic_img_size) resizes its token maps to the grid of a "
                         f"{model.img_size[0]}x{model.img_size[1]} input and back at any other input size, and "
                         "onnxruntime's bicubic Resize cannot shrink a map; export it at that size (leave out "
                         "--img-size), or as --format exported-program")
    writer = export_onnx if args.format == "onnx" else export_program
    max_diff = write_verified(output, lambda path: writer(model, path, img_size))
    return {"model": name, "format": args.format, "output": str(output), "img_size": img_size,
            "deploy": args.deploy, "max_abs_diff": max_diff}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``visionmlp export``."""
    add_model_arguments(parser)
    parser.add_argument("--format", required=True, choices=list(FORMAT_SUFFIXES),
                        help="onnx (.onnx, opset %d) or exported-program (.pt2, torch.export)" % ONNX_OPSET)
    parser.add_argument("--output", required=True, metavar="OUT", help="file to write")
    parser.add_argument("--deploy", action="store_true", help="export the folded inference form")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    """Run ``visionmlp export``."""
    result = export(args)
    if args.json:
        print(json.dumps(result))
    else:
        checker = "onnxruntime" if args.format == "onnx" else "the reloaded program"
        size = result["img_size"] if isinstance(result["img_size"], (list, tuple)) else [result["img_size"]] * 2
        print(f"wrote {result['output']} ({args.format}, dynamic batch, {size[0]}x{size[1]}); "
              f"largest difference between {checker} and PyTorch: {result['max_abs_diff']:.3e}")
    return 0
