"""``visionmlp benchmark``: throughput, latency, peak memory and roofline fraction of one or all variants."""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import get_pretrained_cfg_value
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..checkpoint import load_checkpoint_state, read_checkpoint, unwrap_state_dict
from ..data import DataError, build_dataset
from ..data.datasets import IMG_EXTENSIONS, subset_evenly
from ..inference import optimize_for_inference
from ..models import MODEL_NAMES, count_batchnorms, create_model, family_module
from .evaluate import checkpoint_variant, transformed_for
from .machine import (
    DTYPES,
    PeakMemory,
    cpu_name,
    matmul_peak_gflops,
    num_threads,
    resolve_device,
    resolve_dtype,
    synchronize,
)
from .predict import eval_transform, load_image
from .quantize import QUANTIZATION_DTYPES, fp32_agreement, quantize_dynamic_int8

MODES = ("infer", "train")


def default_img_size(model_name: str) -> int:
    """The resolution a variant is defined at (its pretrained config's input size)."""
    family_module(model_name)
    return int(get_pretrained_cfg_value(model_name, "input_size")[-1])


def family_name(model_name: str) -> str:
    """The family a variant belongs to, as its module is named (``"ms_mlp"``, ``"vip"``, ...)."""
    return family_module(model_name).__name__.rsplit(".", 1)[-1]


def has_deploy_form(model: nn.Module) -> bool:
    """Whether ``model`` has branches that :func:`visionmlp.reparameterize` folds for inference."""
    return any(hasattr(module, "local_inject") for module in model.modules())


def fold_for_deploy(model: nn.Module) -> str:
    """Fold ``model`` in place into its deploy form (``optimize_for_inference``'s folding); what that did to it."""
    branches, batchnorms = has_deploy_form(model), count_batchnorms(model)
    optimize_for_inference(model, fold=True, inplace=True)
    if not branches and count_batchnorms(model) == batchnorms:
        return "none: this model has no re-parameterizable branches or foldable BatchNorms and runs as is"
    return "folded (visionmlp.reparameterize)"


def validation_batch(path: str | os.PathLike, count: int, model: nn.Module, img_size: int) -> torch.Tensor:
    """``count`` images spread evenly over the image files under ``path``, preprocessed for ``model``."""
    if count < 1:
        raise ValueError(f"--val-images must be >= 1, got {count}")
    files = image_files(Path(path).expanduser())
    transform = eval_transform(model, img_size)
    return torch.stack([transform(load_image(file)) for file in subset_evenly(list(files), count)])


def run_validation_batch(config: Mapping[str, Any], count: int, model: nn.Module, img_size: int) -> torch.Tensor | None:
    """``count`` images spread evenly over the validation set of a recorded run, preprocessed as it evaluated
    them; ``None`` if that data set is not on this machine."""
    data = config["data"]
    try:
        dataset = build_dataset(data["dataset"], "val", None, data_path=data["path"], img_size=img_size,
                                use_zip=data["zip"], flowers102_split=data.get("flowers102_split", "raftmlp"))
    except DataError:
        return None
    # stacked here as the model's input: normalised in the transform, not on a device afterwards
    config = {**config, "data": {**data, "img_size": img_size, "normalize_on": "worker"}}
    dataset = subset_evenly(transformed_for(dataset, config, model), count)
    samples = [dataset[i] for i in range(len(dataset))]
    images = [sample[0] for sample in samples if sample is not None]  # unreadable files come back as None
    return torch.stack(images) if images else None


@functools.cache  # listed once for all the models of a run: ImageNet's val/ holds 50,000 files
def image_files(root: Path) -> tuple[Path, ...]:
    """The image files under ``root``, searched recursively, sorted; a ValueError if there are none."""
    if not root.is_dir():
        raise ValueError(f"--val-data {str(root)!r} is not a directory; give a folder of validation images "
                         "(searched recursively, e.g. ImageNet's val/)")
    files = tuple(sorted(p for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()))
    if not files:
        raise ValueError(f"--val-data {str(root)!r} holds no image files ({', '.join(IMG_EXTENSIONS)})")
    return files


class BenchmarkSteps:
    """One benchmark step (inference, or training with AdamW), timed as is or counted by ``FlopCounterMode``."""

    def __init__(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        mode: str,
        dtype: torch.dtype,
        device: torch.device,
        fused_optimizer: bool = True,
    ) -> None:
        self.model = model
        self.inputs = inputs
        self.mode = mode
        self.forward_counter = FlopCounterMode(display=False)
        self.backward_counter = FlopCounterMode(display=False)
        if mode == "train":
            self.targets: torch.Tensor | None = None
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_optimizer)
            self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
            self.autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def run(self, model: nn.Module) -> None:
        """One step of ``model`` (the eager or the compiled module)."""
        if self.mode == "infer":
            with torch.inference_mode():
                model(self.inputs)
        else:
            self._train(model, contextlib.nullcontext(), contextlib.nullcontext())

    def run_counted(self) -> None:
        """One eager step under ``FlopCounterMode``, forward and backward counted apart."""
        if self.mode == "infer":
            with self.forward_counter, torch.inference_mode():
                self.model(self.inputs)
        else:
            self._train(self.model, self.forward_counter, self.backward_counter)

    def _train(
        self,
        model: nn.Module,
        forward_context: contextlib.AbstractContextManager,
        backward_context: contextlib.AbstractContextManager,
    ) -> None:
        with forward_context, self.autocast:
            logits = model(self.inputs)
            if self.targets is None:  # from the first output, so any classifier will do
                self.targets = torch.randint(0, logits.shape[-1], logits.shape[:1], device=logits.device)
            loss = F.cross_entropy(logits, self.targets)
        with backward_context:
            self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


def check_counts(batch_size: int, img_size: int, warmup: int, reps: int, threads: int | None) -> None:
    """Raise a ValueError naming the first count below its minimum (one image, one timed step, ...)."""
    counts = {"batch_size": (batch_size, 1), "img_size": (img_size, 1), "warmup": (warmup, 0), "reps": (reps, 1)}
    if threads is not None:
        counts["threads"] = (threads, 1)
    for label, (value, minimum) in counts.items():
        if value < minimum:
            raise ValueError(f"{label} must be >= {minimum}, got {value}")


def benchmark_model(
    model: nn.Module,
    batch_size: int = 8,
    img_size: int = 224,
    in_chans: int = 3,
    device: str = "cpu",
    dtype: str = "fp32",
    mode: str = "infer",
    channels_last: bool = False,
    compile: bool = False,
    warmup: int = 3,
    reps: int = 10,
    threads: int | None = None,
    fused_optimizer: bool = True,
    cuda_graphs: bool = False,
    reference: nn.Module | None = None,
    reference_images: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Measure any classifier ``nn.Module`` (ours or an official one, side by side) as :func:`run_benchmark` does.

    For ``infer`` a copy of the model prepared by :func:`visionmlp.optimize_for_inference` is timed (cast to
    ``dtype``, channels-last, compiled); for ``train`` the model itself, moved to ``device``. Training steps use
    AdamW's fused kernel, as ``visionmlp train`` does; ``fused_optimizer=False`` runs its per-parameter loop,
    as the official training scripts do. Given an fp32 ``reference`` (inference only), the timed module's
    top-1 agreement with it on ``reference_images`` (fp32, NCHW) is added (:func:`fp32_agreement`).
    ``cuda_graphs`` replays the compiled inference graph as CUDA graphs.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    check_cuda_graphs(cuda_graphs, compile, mode, device)
    if reference is not None and (mode != "infer" or reference_images is None):
        raise ValueError("a reference model compares inference outputs: it needs mode='infer' and reference_images")
    check_counts(batch_size, img_size, warmup, reps, threads)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # inference runs in the dtype itself; training keeps fp32 weights and inputs and autocasts
    compute_dtype = torch_dtype if mode == "infer" else torch.float32

    with num_threads(threads):
        if mode == "infer":
            model = optimize_for_inference(model, dtype=compute_dtype, channels_last=channels_last, fold=False,
                                           device=torch_device)
        else:
            model.train().to(device=torch_device, memory_format=memory_format)
        inputs = torch.randn(batch_size, in_chans, img_size, img_size, device=torch_device, dtype=compute_dtype)
        steps = BenchmarkSteps(model, inputs.contiguous(memory_format=memory_format), mode, torch_dtype, torch_device,
                       fused_optimizer)
        memory = PeakMemory(torch_device, compile)
        memory.start_before_first_step()
        steps.run_counted()
        # counted before compiling: FlopCounterMode dispatches per operator, which a compiled graph hides
        timed_model = model
        if compile:
            timed_model = torch.compile(model) if mode == "train" else optimize_for_inference(
                model, fold=False, compile=True, cuda_graphs=cuda_graphs, inplace=True)
        for _ in range(warmup):
            steps.run(timed_model)
        synchronize(torch_device)
        memory.start_before_timing()
        step_seconds = []
        for _ in range(reps):
            start = time.perf_counter()
            steps.run(timed_model)
            synchronize(torch_device)
            step_seconds.append(time.perf_counter() - start)
        peak_memory_mib = memory.peak_mib()
        used_threads = torch.get_num_threads()
        peak_gflops = matmul_peak_gflops(torch_device, torch_dtype, used_threads)
        agreement = {}
        if reference is not None:
            reference = reference.eval().to(device=torch_device, dtype=torch.float32)
            agreement = fp32_agreement(timed_model, reference, reference_images, batch_size, torch_dtype,
                                       memory_format)

    forward_flops = steps.forward_counter.get_total_flops()
    step_flops = forward_flops + steps.backward_counter.get_total_flops()
    latencies_ms = sorted(1000 * s for s in step_seconds)
    median_ms = statistics.median(latencies_ms)
    images_per_s = batch_size / (median_ms / 1000)
    achieved_gflops = step_flops / batch_size * images_per_s / 1e9
    if mode == "infer":
        precision = f"{dtype} weights and activations"
    else:
        precision = "fp32" if torch_dtype == torch.float32 else f"{dtype} autocast, fp32 master weights"
    return {
        "mode": mode,
        "device": str(torch_device),
        "device_name": torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else cpu_name(),
        "dtype": dtype,
        "precision": precision,
        "batch_size": batch_size,
        "img_size": img_size,
        "channels_last": channels_last,
        "compile": compile,
        "cuda_graphs": cuda_graphs,
        "threads": used_threads,
        "warmup": warmup,
        "reps": reps,
        "params": sum(p.numel() for p in model.parameters()),
        "gmacs": forward_flops / 2 / batch_size / 1e9,
        "step_gflop_per_image": step_flops / batch_size / 1e9,
        "images_per_s": images_per_s,
        "latency_ms_median": median_ms,
        "latency_ms_p10": _percentile(latencies_ms, 10),
        "latency_ms_p90": _percentile(latencies_ms, 90),
        "peak_memory_mib": peak_memory_mib,
        "memory_method": memory.method,
        "matmul_peak_gflops": peak_gflops,
        "achieved_gflops": achieved_gflops,
        "roofline_fraction": achieved_gflops / peak_gflops,
        "torch_version": torch.__version__,
        **{f"fp32_{key}": value for key, value in agreement.items()},
    }


def run_benchmark(
    model_name: str | None,
    batch_size: int = 8,
    img_size: int | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    mode: str = "infer",
    channels_last: bool = False,
    compile: bool = False,
    deploy: bool = False,
    warmup: int = 3,
    reps: int = 10,
    threads: int | None = None,
    quantize: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    val_data: str | os.PathLike | None = None,
    val_images: int = 100,
    cuda_graphs: bool = False,
) -> dict[str, Any]:
    """Time ``reps`` steps of ``model_name`` after ``warmup`` steps; return throughput, latency, memory, roofline.

    ``infer`` runs the model with weights and inputs in ``dtype`` under ``torch.inference_mode``; ``train`` times
    forward, backward and a fused AdamW step under autocast to ``dtype`` with fp32 master weights (and a gradient
    scaler for fp16). FLOPs are counted with ``FlopCounterMode`` on one extra, untimed eager step before the warm-up.
    ``img_size`` defaults to the variant's own resolution. ``quantize="int8"`` times the folded model with its
    linear layers int8-quantized (dynamic, CPU). ``cuda_graphs`` (with ``compile``, inference on a GPU) replays
    the compiled graph as CUDA graphs.

    A ``checkpoint`` of ``visionmlp train`` records its model: ``model_name`` may then be ``None``, and the model
    is built as the run built it (architecture, classes, input size).

    Any inference path other than plain fp32 eager (another dtype, channels-last, compiled, folded or quantized)
    also reports its top-1 agreement with the plain fp32 model of the same weights (``checkpoint``, else random):
    on ``val_images`` images from the folder ``val_data``, else from the validation set of the run that wrote
    ``checkpoint`` where that is on this machine, else on one batch of random images.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    if deploy and mode == "train":
        raise ValueError("--deploy folds branches for inference; it cannot be combined with --mode train")
    check_cuda_graphs(cuda_graphs, compile, mode, device)
    stored = read_checkpoint(checkpoint) if checkpoint is not None else None
    model_name, model_kwargs, run_config = checkpoint_variant(stored, str(checkpoint), model_name)
    native_size = model_kwargs.get("img_size") or default_img_size(model_name)
    if not isinstance(native_size, int) and img_size is None:
        raise ValueError(f"{checkpoint} holds a model built for {native_size[0]}x{native_size[1]} images; the "
                         "benchmark times square ones: pass --img-size")
    img_size = native_size if img_size is None else img_size
    check_counts(batch_size, img_size, warmup, reps, threads)
    resolve_dtype(dtype, resolve_device(device))
    if quantize is not None and (mode != "infer" or dtype != "fp32" or resolve_device(device).type != "cpu"):
        raise ValueError("--quantize int8 is dynamic quantization for CPU inference: use --mode infer --dtype fp32 "
                         "--device cpu")
    checked = mode == "infer" and (dtype != "fp32" or channels_last or compile or deploy or quantize is not None)
    if val_data is not None and not checked:
        raise ValueError("--val-data checks an inference path against plain fp32 eager: use it with --mode infer and "
                         "at least one of --dtype bf16|fp16, --deploy, --channels-last, --compile, --quantize")
    in_chans = get_pretrained_cfg_value(model_name, "input_size")[0]
    # torch's dynamic quantization takes plain nn.Linear layers only: the reference form
    kernel_choice = {"fast_kernels": False} if quantize is not None else {}
    model = create_model(model_name, **{**model_kwargs, "img_size": img_size, **kernel_choice})
    if stored is not None:  # read once above; loaded as create_model(checkpoint_path=...) would
        load_checkpoint_state(model, unwrap_state_dict(stored), family_module(model_name).checkpoint_filter_fn)
    reference = images = None
    if checked:
        reference = copy.deepcopy(model)
        if val_data is not None:
            images, image_source = validation_batch(val_data, val_images, model, img_size), f"images from {val_data}"
        elif run_config is not None:
            images = run_validation_batch(run_config, val_images, model, img_size)
            image_source = f"images of the run's {run_config['data']['dataset']} validation set"
        if images is None:
            images, image_source = torch.randn(batch_size, in_chans, img_size, img_size), "random images"
    deploy_form = fold_for_deploy(model) if deploy or quantize is not None else "not requested"
    quantization: dict[str, Any] = {}
    if quantize is not None:
        # quantize the folded model, as the RepMLP authors recommend
        model, layers = quantize_dynamic_int8(model, images[:1])
        quantization = {"quantized_linear_layers": len(layers)}
    try:
        measured = benchmark_model(
            model, batch_size, img_size, in_chans, device, dtype, mode, channels_last, compile, warmup, reps, threads,
            reference=reference, reference_images=images, cuda_graphs=cuda_graphs,
        )
    except RuntimeError as error:
        if img_size == native_size:
            raise
        raise ValueError(f"{model_name} does not run at img_size {img_size}: {error}") from error
    if reference is not None:
        measured["agreement_images"] = f"{len(images)} {image_source}"
    return {"model": model_name, "family": family_name(model_name), **measured, "deploy": deploy,
            "deploy_form": deploy_form, "quantize": quantize, **quantization,
            "weights": str(checkpoint) if checkpoint is not None else "random init"}


def check_cuda_graphs(cuda_graphs: bool, compile: bool, mode: str, device: str) -> None:
    """Refuse ``cuda_graphs`` anywhere but on a compiled inference graph on a GPU, naming what to change."""
    if not cuda_graphs:
        return
    if not compile or mode != "infer":
        raise ValueError("--cuda-graphs replays a compiled inference graph: add --compile and keep --mode infer")
    if resolve_device(device).type != "cuda":
        raise ValueError(f"--cuda-graphs needs a GPU: add --device cuda (got {device!r})")


def _percentile(sorted_values: list[float], percent: float) -> float:
    """Linear-interpolated percentile; ``statistics.quantiles`` needs two values and excludes the ends."""
    position = (len(sorted_values) - 1) * percent / 100
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def results_markdown(results: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`run_benchmark` results, one row per run."""
    lines = [
        "| model | mode | dtype | batch | img | params (M) | GMACs | img/s | latency ms: median (p10-p90) "
        "| peak MiB | roofline |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        options = [name for name in ("channels_last", "compile", "cuda_graphs") if r[name]]
        options += ["deploy"] if r["deploy_form"].startswith("folded") else []
        options += [f"{r['quantize']}-linear"] if r.get("quantize") else []
        lines.append(
            f"| {r['model']} | {r['mode']} | {'+'.join([r['dtype'], *options])} | {r['batch_size']} | {r['img_size']} "
            f"| {r['params'] / 1e6:.2f} | {r['gmacs']:.3f} | {r['images_per_s']:.1f} "
            f"| {r['latency_ms_median']:.1f} ({r['latency_ms_p10']:.1f}-{r['latency_ms_p90']:.1f}) "
            f"| {r['peak_memory_mib']:.0f} | {100 * r['roofline_fraction']:.1f} % |"
        )
    return "\n".join(lines)


def results_notes(results: list[dict[str, Any]]) -> str:
    """The facts behind a results table: device, threads, precision, memory method, matmul peak, deploy notes."""
    first = results[0]
    peaks = {r["dtype"]: r["matmul_peak_gflops"] for r in results}
    notes = [
        f"device: {first['device_name']} ({first['device']}), {first['threads']} threads, "
        f"torch {first['torch_version']}",
        f"precision: {'; '.join(dict.fromkeys(r['precision'] for r in results))}",
        f"steps: 1 counted (FlopCounterMode), {first['warmup']} warm-up, {first['reps']} timed",
        f"peak memory: {first['memory_method']}",
        "roofline: achieved GFLOP/s (FlopCounterMode FLOPs of the timed step x img/s) over the measured matmul peak: "
        + ", ".join(f"{dtype} {gflops:.1f} GFLOP/s" for dtype, gflops in peaks.items()),
    ]
    if any(r["roofline_fraction"] > 1 for r in results):
        notes.append("a roofline above 100 % means the machine was busier while its peak was measured: rerun idle")
    notes += [f"{r['model']}: deploy form {r['deploy_form']}" for r in results if r["deploy_form"].startswith("none")]
    notes += [
        f"{r['model']}: int8 dynamic quantization of {r['quantized_linear_layers']} linear layers; params and GMACs "
        "count the fp32 layers only"
        for r in results if r.get("quantize")
    ]
    notes += [
        f"{r['model']} ({r['weights']} weights): same top-1 as the plain fp32 model for "
        f"{r['fp32_top1_agreement']:.1f} % of {r['agreement_images']}; largest logit difference "
        f"{r['fp32_max_rel_logit_diff']:.1e} of the largest logit"
        for r in results if "fp32_top1_agreement" in r
    ]
    return "\n".join(f"- {note}" for note in notes)


def parse_model_names(text: str) -> list[str]:
    """``all``, one name or a comma-separated list, checked against the known variants."""
    names = list(MODEL_NAMES) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        family_module(name)
    if not names:
        raise ValueError(f"no model given; choose 'all' or any of: {', '.join(MODEL_NAMES)}")
    return names


def add_benchmark_options(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``visionmlp benchmark`` and ``visionmlp models --benchmark``."""
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="compute dtype (default: fp32)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    parser.add_argument("--compile", action="store_true", help="time the torch.compile'd model")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="with --compile on a GPU: replay the compiled graph as CUDA graphs (infer only)")
    parser.add_argument("--deploy", action="store_true", help="fold re-parameterizable branches first (infer only)")
    parser.add_argument("--quantize", choices=list(QUANTIZATION_DTYPES),
                        help="int8: dynamic quantization of the folded model's linear layers (CPU, infer); "
                             "also reports top-1 agreement with fp32")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default: 3)")
    parser.add_argument("--reps", type=int, default=10, help="timed steps (default: 10)")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's setting)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``visionmlp benchmark``."""
    parser.add_argument("--model", default=None,
                        help="a variant, a comma-separated list, or 'all' (default: the variant a --checkpoint of "
                             "visionmlp train records, else all)")
    parser.add_argument("--img-size", type=int, default=None, help="input resolution (default: each model's own)")
    parser.add_argument("--mode", choices=MODES, default="infer", help="infer, or train: forward+backward+AdamW")
    add_benchmark_options(parser)
    parser.add_argument("--checkpoint", default=None, metavar="FILE",
                        help="official or visionmlp weights for the fp32 agreement check (default: random init); "
                             "a checkpoint of visionmlp train also gives the model, its classes and input size")
    parser.add_argument("--val-data", default=None, metavar="DIR",
                        help="a folder of validation images (e.g. ImageNet's val/) for the fp32 agreement check of "
                             "any path other than plain fp32 eager (default: one batch of random images)")
    parser.add_argument("--val-images", type=int, default=100, metavar="N",
                        help="images taken evenly from --val-data (default: 100)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    data = parser.add_argument_group("input pipeline", "with --data: a data-loading worker's images/s, ours against "
                                     "the official scripts' (ImageFolder + PIL + timm), for --model's recipe")
    data.add_argument("--data", metavar="DIR", help="an ImageNet-layout folder: train/ and val/ of class folders")
    data.add_argument("--zip", action="store_true", help="read DIR's train.zip, val.zip and map files instead")
    data.add_argument("--cfg", metavar="FILE", help="the recipe (default: the model's family recipe)")
    data.add_argument("--opts", nargs="+", metavar="KEY VALUE",
                      help="override recipe keys, e.g. --opts data.normalize_on worker data.batch_size 256")
    data.add_argument("--images", type=int, default=200, metavar="N", help="images per round (default: 200)")
    data.add_argument("--rounds", type=int, default=3, metavar="N", help="rounds, the best counts (default: 3)")
    data.add_argument("--generate", type=int, metavar="N",
                      help="first write an ImageNet-like JPEG set into DIR: N training images, N/5 validation")


def benchmark_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`run_benchmark` keyword arguments given by the shared command-line options."""
    return {
        "batch_size": args.batch_size,
        "device": args.device,
        "dtype": args.dtype,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
        "deploy": args.deploy,
        "quantize": args.quantize,
        "warmup": args.warmup,
        "reps": args.reps,
        "threads": args.threads,
    }


def run_all(
    names: list[str | None], progress: Callable[[str], None] | None = None, **kwargs: Any
) -> list[dict[str, Any]]:
    """:func:`run_benchmark` for each name in turn, reporting each finished model through ``progress``: the loop of
    the benchmark commands, which own their process. With ``compile`` it drops dynamo's compilations between models,
    each of which would count against its recompilation limit (past it dynamo runs eagerly, silently)."""
    results = []
    for name in names:
        if kwargs.get("compile"):
            torch._dynamo.reset()
        results.append(run_benchmark(name, **kwargs))
        if progress is not None:
            progress(f"{results[-1]['model']}: {results[-1]['images_per_s']:.1f} img/s")
    return results


def run(args: argparse.Namespace) -> int:
    """Run ``visionmlp benchmark``."""
    if args.data:
        return run_input_benchmark(args)
    names = [None] if args.model is None and args.checkpoint else parse_model_names(args.model or "all")
    results = run_all(
        names,
        progress=None if len(names) == 1 else lambda line: print(line, file=sys.stderr),
        img_size=args.img_size,
        mode=args.mode,
        checkpoint=args.checkpoint,
        val_data=args.val_data,
        val_images=args.val_images,
        **benchmark_kwargs(args),
    )
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    else:
        print(results_markdown(results))
        print()
        print(results_notes(results))
    return 0


def run_input_benchmark(args: argparse.Namespace) -> int:
    """``visionmlp benchmark --data DIR``: the input pipeline (:mod:`visionmlp.engine.input_benchmark`)."""
    from ..data.imagenet_like import write_imagenet_like
    from .input_benchmark import benchmark_config, measure, report

    if args.generate:
        write_imagenet_like(args.data, args.generate, max(1, args.generate // 5), zipped=args.zip)
    result = measure(benchmark_config(args), args.images, args.rounds)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0
