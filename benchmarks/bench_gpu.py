"""GPU speed of our fastest inference path against a baseline run under autocast, with model FLOPs utilization.

For each variant at its native resolution, batch 64: ours in the deploy form with bf16 weights and
activations, channels-last, eager and (``--compile``) compiled with frozen weights, optionally replayed as
CUDA graphs (``--cuda-graphs``); with ``--baseline FILE.py``, the model that ``build(name)`` in that file
returns, kept in fp32 and run under ``torch.autocast`` to bf16, as the official scripts run mixed precision.
The paths are timed in turn and the faster of ours counts; the project's target is at least 2x the
baseline. MFU is the achieved FLOP/s (our FLOP count, the same for all) over this GPU's bf16 matmul peak,
measured in the same run, or over ``--peak-tflops`` (the datasheet's dense figure).

With ``--train``, the training step instead, at each family's recipe batch per GPU (``--batch-size`` to change it):
the baseline as the official scripts train (fp32 weights, fp16 autocast with a gradient scaler for apex's O1,
AdamW's per-parameter loop) against ours as ``visionmlp train --amp bf16 --channels-last [--compile]`` runs on a GPU
(bf16 autocast, channels-last, fused AdamW, and with ``--compile`` ``torch.compile``). Reported: images/s, MFU
(forward and backward FLOPs), peak memory, and the losses of the first ``--loss-steps`` steps of both from the same
weights on the same batches (the learning rate warming up to 1e-3 over them), with the baseline's own run-to-run gap
for scale (a second run, another seed for drop path and dropout; the builder should make the baseline at its
recipe's drop-path rate, as ours is).

    python benchmarks/bench_gpu.py --baseline ~/official_builders.py --compile --cuda-graphs --json gpu.json
    python benchmarks/bench_gpu.py --baseline ~/official_builders.py --models ms_mlp_tiny,vip_s7
    python benchmarks/bench_gpu.py --baseline ~/official_builders.py --train --compile --json gpu_train.json
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torch.nn.functional as F

from visionmlp import create_model
from visionmlp.config import family_recipe, load_recipe
from visionmlp.engine.benchmark import BenchmarkSteps, check_counts, default_img_size, parse_model_names
from visionmlp.engine.comparison import fast_path_copy, load_builder, seconds_in_turn
from visionmlp.engine.machine import matmul_peak_gflops, resolve_device, resolve_dtype, synchronize
from visionmlp.engine.quantize import fp32_agreement

TARGET_SPEEDUP = 2.0
BASELINE, EAGER, COMPILED = "baseline", "ours", "ours compiled"
LOW_PRECISION = ("bf16", "fp16")
PEAK_LR = 1e-3  # the loss comparison warms up to it linearly, as every recipe starts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of this script."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="all", help="'all' (default) or a comma-separated list of variants")
    parser.add_argument("--baseline", type=Path, help="Python file whose build(name) returns the baseline model")
    parser.add_argument("--device", default="cuda", help="cuda[:N] (default: cuda); cpu only to try the script")
    parser.add_argument("--dtype", choices=LOW_PRECISION, default="bf16",
                        help="our weights and activations, and the baseline's autocast dtype (default: bf16)")
    parser.add_argument("--batch-size", type=int, help="images per step (default: 64; --train: the recipe's per GPU)")
    parser.add_argument("--train", action="store_true", help="time the training step instead of inference")
    parser.add_argument("--loss-steps", type=int, default=50,
                        help="--train: steps whose losses are compared, from the same weights (default: 50)")
    parser.add_argument("--img-size", type=int,
                        help="input resolution (default: each model's own; the baseline file must build for it)")
    parser.add_argument("--compile", action="store_true",
                        help="also time our fast path compiled (weights frozen); the faster of the two counts")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="with --compile: replay the compiled graphs as CUDA graphs (mode reduce-overhead)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds before timing (default: 5)")
    parser.add_argument("--reps", type=int, default=20, help="timed rounds, each model once per round (default: 20)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the GPU's dense matmul peak in the dtype, for MFU (default: measured in this run)")
    args = parser.parse_args(argv)
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"--peak-tflops must be positive, got {args.peak_tflops}")
    if args.cuda_graphs and not args.compile:
        parser.error("--cuda-graphs replays compiled graphs: add --compile")
    return args


def inference_step(model: nn.Module, images: torch.Tensor, autocast_dtype: torch.dtype | None) -> Callable[[], Any]:
    """One inference of ``model`` on ``images``, under autocast to ``autocast_dtype`` if one is given."""
    autocast = torch.autocast(images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    def step() -> torch.Tensor:
        with torch.inference_mode(), autocast:
            return model(images)

    return step


def measure(
    name: str,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    build_baseline: Callable[[str], nn.Module] | None,
) -> dict[str, Any]:
    """Images/s of our fast path (eager, and compiled if asked) and of the baseline under autocast, timed in turn.

    Also the FLOPs, the seconds the first compiled call took, and each of our paths' top-1 agreement with fp32.
    """
    size = args.img_size or default_img_size(name)
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    plain = create_model(name, img_size=size).eval().to(device)
    counted = BenchmarkSteps(plain, images, "infer", torch.float32, device)
    counted.run_counted()
    flops = counted.forward_counter.get_total_flops()
    fast = fast_path_copy(plain, dtype)
    ours = {EAGER: fast}
    compile_seconds = None
    if args.compile:
        # compilations of earlier models would count against dynamo's recompilation limit
        torch._dynamo.reset()
        ours[COMPILED] = fast_path_copy(plain, dtype, compile=True, cuda_graphs=args.cuda_graphs)
        start = time.perf_counter()
        inference_step(ours[COMPILED], images, None)()
        synchronize(device)
        compile_seconds = time.perf_counter() - start
    steps = {label: inference_step(model, images, None) for label, model in ours.items()}
    if build_baseline is not None:
        steps[BASELINE] = inference_step(build_baseline(name).eval().to(device), images, dtype)
    seconds = seconds_in_turn(steps, args.warmup, args.reps, device)
    agreement = {label: fp32_agreement(model, plain, images, args.batch_size, torch.float32)["top1_agreement"]
                 for label, model in ours.items()}
    return {"gmacs": flops / 2 / args.batch_size / 1e9, "gflop_per_image": flops / args.batch_size / 1e9,
            "images_per_s": {label: args.batch_size / statistics.median(t) for label, t in seconds.items()},
            "compile_seconds": compile_seconds, "top1_agreement": agreement}


def mfu(result: dict[str, Any], images_per_s: float, peak_gflops: float) -> float:
    """Model FLOPs utilization at ``images_per_s``: achieved GFLOP/s over ``peak_gflops``."""
    return result["gflop_per_image"] * images_per_s / peak_gflops


def best_of_ours(result: dict[str, Any]) -> str:
    """The label of our faster path (compiling helps some models and slows others)."""
    return max((label for label in result["images_per_s"] if label != BASELINE), key=result["images_per_s"].get)


def result_row(name: str, result: dict[str, Any], peak_gflops: float) -> str:
    """One row: the baseline (if any), our paths, the best one's MFU, speed-up and verdict, the top-1 agreement."""
    rates = result["images_per_s"]
    best = best_of_ours(result)
    cells = [name, f"{result['gmacs']:.2f}"]
    if BASELINE in rates:
        cells += [f"{rates[BASELINE]:.0f}", f"{100 * mfu(result, rates[BASELINE], peak_gflops):.1f} %"]
    cells.append(f"{rates[EAGER]:.0f}")
    if COMPILED in rates:
        cells.append(f"{rates[COMPILED]:.0f} ({result['compile_seconds']:.0f} s)")
    cells.append(f"{100 * mfu(result, rates[best], peak_gflops):.1f} %")
    if BASELINE in rates:
        speedup = rates[best] / rates[BASELINE]
        cells += [f"{speedup:.2f}x" + (" compiled" if best == COMPILED else ""),
                  "met" if speedup >= TARGET_SPEEDUP else "not met"]
    cells.append(f"{min(result['top1_agreement'].values()):.1f} %")
    return "| " + " | ".join(cells) + " |"


def device_name(device: torch.device) -> str:
    """The GPU's name, or 'CPU'."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def recipe_settings(name: str) -> tuple[int, float]:
    """The batch per GPU and the stochastic-depth rate of the variant's family recipe."""
    recipe = family_recipe(name)
    settings = load_recipe(recipe) if recipe else {}
    batch_size = settings.get("data", {}).get("batch_size", 64)
    rate = (settings.get("model", {}).get("drop_path_by_variant") or {}).get(name, 0.0)
    return int(batch_size), float(rate)


class TrainStep:
    """One optimizer step on a batch: the forward pass under autocast to ``dtype``, the backward pass (through a
    gradient scaler for fp16, as apex's O1 scales the loss), then AdamW, fused or in its per-parameter loop."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, fused: bool, device: torch.device) -> None:
        self.model = model.train()
        self.autocast = torch.autocast(device.type, dtype=dtype)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        options = {"fused": True} if fused else {"foreach": False}
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.05, **options)

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            loss = F.cross_entropy(self.model(images), targets)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def baseline_side(name: str, device: torch.device, build_baseline: Callable[[str], nn.Module],
                  weights: Path | None = None) -> TrainStep:
    """The official model's training step: fp32 weights, fp16 autocast and loss scaling, AdamW's loop."""
    model = build_baseline(name).to(device)
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location=device))
    return TrainStep(model, torch.float16, False, device)


def our_side(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
             weights: Path | None = None) -> TrainStep:
    """Our training step: channels-last, autocast to ``dtype``, fused AdamW, compiled with ``--compile``; at the
    recipe's drop-path rate, from the official ``weights`` (converted on load) when given."""
    size = args.img_size or default_img_size(name)
    model = create_model(name, img_size=size, checkpoint_path=weights, drop_path_rate=recipe_settings(name)[1])
    model = model.to(device, memory_format=torch.channels_last)
    return TrainStep(torch.compile(model) if args.compile else model, dtype, True, device)


def training_batch(index: int, batch_size: int, size: int, device: torch.device, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``index`` of a reproducible stream of random images and labels, made on ``device``."""
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
    return (torch.randn(batch_size, 3, size, size, generator=generator, device=device),
            torch.randint(0, 1000, (batch_size,), generator=generator, device=device))


def allocated_bytes(device: torch.device) -> int | None:
    """The GPU memory allocated now; None on a CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def measure_training(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                     build_baseline: Callable[[str], nn.Module]) -> dict[str, Any]:
    """Images/s, MFU inputs, peak memory and the loss curves of the baseline's and our training steps.

    The baseline runs twice (its run-to-run noise, another seed for drop path and dropout) and ours once, all from
    the baseline's initial weights on the same ``--loss-steps`` batches, the learning rate warming up over them (the
    baseline's loss scaler skips its first updates, which overflow); each side's peak memory is what it adds to
    the GPU over those steps (weights, optimizer state, activations). The baseline's first run and ours are then
    timed in turn, so that ours is compiled once.
    """
    size = args.img_size or default_img_size(name)
    batch_size = args.batch_size or recipe_settings(name)[0]
    counted = BenchmarkSteps(create_model(name, img_size=size).to(device),
                             torch.randn(2, 3, size, size, device=device), "train", torch.float32, device)
    counted.run_counted()
    flops = counted.forward_counter.get_total_flops() + counted.backward_counter.get_total_flops()
    if args.compile:
        torch._dynamo.reset()  # earlier models' graphs would count against dynamo's recompilation limit
    ours = COMPILED if args.compile else EAGER
    curves: dict[str, list[float]] = {}
    memory: dict[str, float | None] = {}
    skipped: dict[str, int] = {}
    timed: dict[str, TrainStep] = {}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "baseline.pth"
        torch.save(build_baseline(name).state_dict(), weights)
        for run, label in enumerate((BASELINE, f"{BASELINE} again", ours)):
            torch.manual_seed(run)
            before = allocated_bytes(device)
            if before is not None:
                torch.cuda.reset_peak_memory_stats(device)
            step = our_side(name, args, device, dtype, weights) if label == ours else \
                baseline_side(name, device, build_baseline, weights)
            curves[label], skipped[label] = [], 0
            for index in range(args.loss_steps):
                images, targets = training_batch(index, batch_size, size, device, seed=1)
                if label == ours:
                    images = images.contiguous(memory_format=torch.channels_last)
                step.set_lr(PEAK_LR * (index + 1) / args.loss_steps)
                scale = step.scaler.get_scale()  # 1.0 without loss scaling
                curves[label].append(step(images, targets).item())
                skipped[label] += step.scaler.get_scale() < scale  # an overflow: the scaler skipped the update
            if before is not None:
                memory[label] = (torch.cuda.max_memory_allocated(device) - before) / 2**30
            if label != f"{BASELINE} again":
                timed[label] = step
            del step  # the second baseline run's model goes before ours is built and measured
    images, targets = training_batch(0, batch_size, size, device)
    inputs = {BASELINE: images, ours: images.contiguous(memory_format=torch.channels_last)}
    seconds = seconds_in_turn({label: lambda step=step, x=inputs[label]: step(x, targets)
                               for label, step in timed.items()}, args.warmup, args.reps, device)
    gap = statistics.fmean(abs(a - b) for a, b in zip(curves[BASELINE], curves[ours]))
    noise = statistics.fmean(abs(a - b) for a, b in zip(curves[BASELINE], curves[f"{BASELINE} again"]))
    return {"batch_size": batch_size, "img_size": size, "gflop_per_image": flops / 2 / 1e9,
            "images_per_s": {label: batch_size / statistics.median(t) for label, t in seconds.items()},
            "peak_memory_gib": {label: memory.get(label) for label in timed}, "losses": curves,
            "skipped_steps": skipped, "loss_gap": gap, "loss_noise": noise}


def training_row(name: str, result: dict[str, Any], peak_gflops: float) -> str:
    """One row of the training table."""
    rates, memory = result["images_per_s"], result["peak_memory_gib"]
    ours = next(label for label in rates if label != BASELINE)
    speedup = rates[ours] / rates[BASELINE]

    def gib(label: str) -> str:
        return "-" if memory[label] is None else f"{memory[label]:.1f}"

    cells = [name, str(result["batch_size"]), f"{rates[BASELINE]:.0f}",
             f"{100 * mfu(result, rates[BASELINE], peak_gflops):.1f} %", gib(BASELINE), f"{rates[ours]:.0f}",
             f"{100 * mfu(result, rates[ours], peak_gflops):.1f} %", gib(ours), f"{speedup:.2f}x",
             "met" if speedup >= TARGET_SPEEDUP else "not met",
             f"{result['loss_gap']:.3f} ({result['loss_noise']:.3f})"]
    return "| " + " | ".join(cells) + " |"


def main_training(names: list[str], args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                  build_baseline: Callable[[str], nn.Module], peak_gflops: float) -> int:
    """``--train``: measure each variant, print the table."""
    results = {}
    for name in names:
        results[name] = measure_training(name, args, device, dtype, build_baseline)
        rates = ", ".join(f"{label} {ips:.1f}" for label, ips in results[name]["images_per_s"].items())
        print(f"{name}: {rates} img/s", file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps({"device": device_name(device), "torch": torch.__version__,
                                             "mode": "train", "peak_gflops": peak_gflops, "results": results}, indent=1))
    ours = f"{args.dtype} autocast, channels-last, fused AdamW" + (", compiled" if args.compile else "")
    batch = "each recipe's batch per GPU" if args.batch_size is None else f"batch {args.batch_size}"
    print(f"{device_name(device)}, torch {torch.__version__}, training step at {batch}, median of "
          f"{args.reps} steps timed in turn; MFU over a {args.dtype} matmul peak of {peak_gflops:.0f} GFLOP/s; "
          f"baseline: fp32 weights, fp16 autocast with a gradient scaler, AdamW per-parameter loop; ours: {ours}\n")
    header = ["model", "batch", "baseline img/s", "baseline MFU", "baseline peak GiB", "ours img/s", "ours MFU",
              "ours peak GiB", "speed-up", f"target {TARGET_SPEEDUP:g}x",
              f"mean loss gap over {args.loss_steps} steps (baseline vs itself)"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    print("\n".join(training_row(name, result, peak_gflops) for name, result in results.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print the table."""
    args = parse_args(argv)
    try:
        if args.batch_size is None and not args.train:
            args.batch_size = 64
        check_counts(args.batch_size or 1, img_size=1 if args.img_size is None else args.img_size, warmup=args.warmup, reps=args.reps,
                     threads=None)
        names = parse_model_names(args.models)
        device = resolve_device(args.device)
        build_baseline = load_builder(args.baseline) if args.baseline else None
        dtype = resolve_dtype(args.dtype, device)
        if args.cuda_graphs and device.type != "cuda":
            raise ValueError(f"--cuda-graphs needs a GPU: use --device cuda (got {args.device!r})")
        if args.train and build_baseline is None:
            raise ValueError("--train compares against the official training step: give --baseline FILE.py")
    except ValueError as error:
        raise SystemExit(f"bench_gpu: error: {error}") from None
    if args.peak_tflops is not None:
        peak_gflops, peak_source = 1000 * args.peak_tflops, "given"
    else:
        peak_gflops, peak_source = matmul_peak_gflops(device, dtype, torch.get_num_threads()), "measured"
    if args.train:
        return main_training(names, args, device, dtype, build_baseline, peak_gflops)
    results = {}
    for name in names:
        results[name] = measure(name, args, device, dtype, build_baseline)
        rates = ", ".join(f"{label} {ips:.1f}" for label, ips in results[name]["images_per_s"].items())
        print(f"{name}: {rates} img/s", file=sys.stderr, flush=True)
        if args.json:  # rewritten after each model, so that a run cut short keeps what it measured
            args.json.write_text(json.dumps({"device": device_name(device), "torch": torch.__version__,
                                             "batch_size": args.batch_size, "peak_gflops": peak_gflops,
                                             "peak_source": peak_source, "results": results}, indent=1))
    compiled_with = ", compiled" + (" with CUDA graphs" if args.cuda_graphs else "") if args.compile else ""
    resolution = "native resolutions" if args.img_size is None else f"{args.img_size} px"
    print(f"{device_name(device)}, torch {torch.__version__}, batch {args.batch_size}, {resolution}; median "
          f"of {args.reps} rounds timed in turn; MFU over a {args.dtype} matmul peak of {peak_gflops:.0f} GFLOP/s "
          f"({peak_source}); ours: {args.dtype}, deploy, channels-last{compiled_with}\n")
    header = ["model", "GMACs"]
    if build_baseline is not None:
        header += [f"baseline img/s (fp32 weights, {args.dtype} autocast)", "baseline MFU"]
    header.append("ours eager img/s")
    if args.compile:
        header.append("ours compiled img/s (compile time)")
    header.append("ours MFU")
    if build_baseline is not None:
        header += ["speed-up", f"target {TARGET_SPEEDUP:g}x"]
    header.append(f"ours: same top-1 as fp32 ({args.batch_size} random images)")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    print("\n".join(result_row(name, result, peak_gflops) for name, result in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
