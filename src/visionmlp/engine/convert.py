"""``visionmlp convert``: official or visionmlp checkpoints into our format, optionally folded or int8-quantized.

``--check`` is the RepMLP seed's ``check`` mode: it folds the training-form model in memory and
prints the largest output difference between the two forms on a random batch, without writing.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
from torch import nn

from ..checkpoint import StateDict, atomic_save, check_state_dict_fits, read_checkpoint, unwrap_state_dict
from ..models import MODEL_NAMES, count_batchnorms, deploy_model_from_state_dict, family_module, reparameterize
from .evaluate import check_trained_grid, checkpoint_variant, recorded_class_names
from .quantize import QUANTIZATION_DTYPES, compare_with_fp32, quantize_dynamic_int8

WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")


def check_output_suffix(path: str | Path, suffixes: tuple[str, ...] = WEIGHT_SUFFIXES) -> Path:
    """``path`` as a Path, or a ValueError naming the accepted suffixes."""
    path = Path(path)
    if path.suffix not in suffixes:
        raise ValueError(f"output {str(path)!r} must end in one of {', '.join(suffixes)} (the suffix picks the format)")
    return path


class CheckpointModel(NamedTuple):
    """What the model flags name: the variant, its weights and constructor arguments, and what its run recorded."""

    name: str
    state_dict: StateDict
    kwargs: dict[str, Any]
    config: Mapping[str, Any] | None  # the run's configuration (a visionmlp train checkpoint)
    class_names: list[str] | None  # its training classes in label order (likewise)


def model_from_flags(args: argparse.Namespace, keep_trained_grid: bool = False) -> CheckpointModel:
    """The checkpoint the model flags name, read (see :func:`visionmlp.engine.evaluate.checkpoint_variant`), its model
    built for ``--img-size`` (a dynamic RaftMLP keeps its grid); with ``keep_trained_grid`` a run's checkpoint whose
    weights that size would resample is refused, as eval refuses it (see
    :func:`visionmlp.engine.evaluate.check_trained_grid`)."""
    checkpoint = read_checkpoint(args.checkpoint, allow_unsafe_pickle=args.allow_unsafe_pickle)
    name, kwargs, config = checkpoint_variant(checkpoint, args.checkpoint, args.model, args.num_classes)
    if args.img_size and not kwargs.get("dynamic_img_size"):  # a dynamic RaftMLP keeps its grid at any input size
        if keep_trained_grid and config is not None:
            check_trained_grid(name, kwargs, args.img_size, args.checkpoint)
        kwargs["img_size"] = args.img_size
    return CheckpointModel(name, unwrap_state_dict(checkpoint), kwargs, config, recorded_class_names(checkpoint))


def training_form_model(name: str, state_dict: StateDict, **kwargs: Any) -> nn.Module:
    """The training form of ``name`` holding an official or visionmlp training-form state dict (strict)."""
    model = timm.create_model(name, **kwargs)
    state_dict = family_module(name).checkpoint_filter_fn(dict(state_dict), model)
    check_state_dict_fits(model, state_dict, repr(name))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def random_batch(img_size: int | tuple[int, int], batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    """A reproducible batch of normal noise, the size of normalized images (``img_size``: a side or height, width)."""
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    return torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(seed))


def input_size(model: nn.Module) -> int:
    """The square input resolution the model was built for."""
    return model.pretrained_cfg["input_size"][-1]


@torch.no_grad()
def check_folding(name: str, state_dict: StateDict, **kwargs: Any) -> dict[str, Any]:
    """Fold a training-form model in memory; the largest output difference between the two forms."""
    trained = training_form_model(name, state_dict, **kwargs)
    folded = reparameterize(copy.deepcopy(trained))
    images = random_batch(kwargs.get("img_size") or input_size(trained))
    reference, output = trained(images), folded(images)
    diff = (reference - output).abs().max().item()
    return {"model": name, "batchnorms_folded": count_batchnorms(trained) - count_batchnorms(folded),
            "max_abs_diff": diff, "max_rel_diff": diff / reference.abs().max().item()}


def save_weights(state_dict: StateDict, path: Path, metadata: dict[str, Any], config: Mapping[str, Any] | None = None,
                 class_names: list[str] | None = None) -> None:
    """Write ``state_dict`` atomically under ``model`` with ``metadata``, and the run ``config`` and class names it came
    with (if any), so that the file still records its model (a ``.safetensors`` file in its header)."""
    state_dict = {k: v.detach().contiguous() for k, v in state_dict.items()}
    records = {"config": config, "classes": class_names}
    atomic_save({"model": state_dict, "visionmlp": metadata, **{k: v for k, v in records.items() if v}}, path)


def convert(args: argparse.Namespace) -> dict[str, Any]:
    """Read, convert (fold, quantize) and save; the facts to report."""
    if args.output and args.checkpoint and Path(args.output).resolve() == Path(args.checkpoint).resolve():
        raise ValueError(f"--output {args.output} is the checkpoint being converted, which it would replace; write to "
                         "another file")
    name, state_dict, kwargs, config, class_names = model_from_flags(args)
    if config is not None and args.img_size:
        config = {**config, "data": {**config["data"], "img_size": args.img_size}}
    if args.check:
        return check_folding(name, state_dict, **kwargs)
    output = check_output_suffix(args.output)
    deploy = args.deploy or args.quantize is not None
    result: dict[str, Any] = {"model": name, "output": str(output), "form": "deploy" if deploy else "training"}
    if args.quantize:
        kwargs["fast_kernels"] = False  # torch's dynamic quantization takes plain nn.Linear layers only
    if deploy:
        model = deploy_model_from_state_dict(name, state_dict, **kwargs).eval()
        with torch.device("meta"):
            result["batchnorms_folded"] = count_batchnorms(timm.create_model(name, **kwargs)) - count_batchnorms(model)
    else:
        model = training_form_model(name, state_dict, **kwargs)
    if args.quantize:
        images = random_batch(kwargs.get("img_size") or input_size(model), batch_size=args.quantize_batch)
        quantized, layers = quantize_dynamic_int8(model, images[:1])
        result.update(quantization=args.quantize, quantized_linear_layers=len(layers),
                      **compare_with_fp32(model, quantized, images))
    save_weights(model.state_dict(), output, {"model": name, "form": result["form"], "quantization": args.quantize},
                 config, class_names)
    return result


def add_model_arguments(parser: argparse.ArgumentParser, checkpoint_metavar: str = "FILE") -> None:
    """The flags that say which model a checkpoint holds, shared by convert, export and predict."""
    parser.add_argument("--model", choices=MODEL_NAMES, metavar="NAME",
                        help="model variant (default: the one a visionmlp train checkpoint records)")
    parser.add_argument("--checkpoint", required=True, metavar=checkpoint_metavar,
                        help="official (any of the five repositories) or visionmlp checkpoint, training or deploy form")
    parser.add_argument("--img-size", type=int,
                        help="input resolution the model is built for (default: the recorded one, else its own)")
    parser.add_argument("--num-classes", type=int,
                        help="classes of the checkpoint's head (default: recorded by visionmlp train, else 1000)")
    parser.add_argument("--allow-unsafe-pickle", action="store_true",
                        help="read a trusted legacy checkpoint that needs full unpickling")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``visionmlp convert``."""
    add_model_arguments(parser, checkpoint_metavar="IN")
    parser.add_argument("--output", metavar="OUT", help="file to write: .pt / .pth (torch) or .safetensors")
    parser.add_argument("--deploy", action="store_true",
                        help="save the folded inference form (locality injection and BatchNorm folding); "
                             "load it with create_model(NAME, deploy=True, checkpoint_path=OUT)")
    parser.add_argument("--quantize", choices=list(QUANTIZATION_DTYPES),
                        help="also quantize the linear layers (implies --deploy), report top-1 agreement and "
                             "speed; the folded fp32 weights are saved and re-quantized on load "
                             "(visionmlp.engine.quantize.load_quantized)")
    parser.add_argument("--quantize-batch", type=int, default=8, metavar="N",
                        help="random images for the quantization comparison (default: 8)")
    parser.add_argument("--check", action="store_true",
                        help="fold in memory and print the largest output difference from the training form; "
                             "writes nothing")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    """Run ``visionmlp convert``."""
    if not args.check and not args.output:
        raise ValueError("--output is required (or pass --check to compare forms only)")
    result = convert(args)
    if args.json:
        print(json.dumps(result))
    elif args.check:
        print(f"{result['model']}: folded {result['batchnorms_folded']} BatchNorms; largest output difference "
              f"{result['max_abs_diff']:.3e} (relative {result['max_rel_diff']:.3e})")
    else:
        print(f"wrote {result['output']} ({result['form']} form"
              + (f", {result['batchnorms_folded']} BatchNorms folded" if "batchnorms_folded" in result else "") + ")")
        if args.quantize:
            print(f"int8 dynamic quantization: {result['quantized_linear_layers']} linear layers; top-1 agreement "
                  f"with fp32 {result['top1_agreement']:.1f} %, largest logit difference "
                  f"{result['max_abs_logit_diff']:.3e}; {result['fp32_ms_per_batch']:.1f} ms fp32 vs "
                  f"{result['int8_ms_per_batch']:.1f} ms int8 per batch ({result['speedup']:.2f}x)")
    return 0
