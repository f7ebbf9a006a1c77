"""GPU speed of our fastest inference path against a baseline run under autocast, with model FLOPs utilization.

For each variant at its native resolution, batch 64: ours in the deploy form with bf16 weights and
activations, channels-last, eager and (``--compile``) compiled with frozen weights, optionally replayed as
CUDA graphs (``--cuda-graphs``); with ``--baseline FILE.py``, the model that ``build(name)`` in that file
returns, kept in fp32 and run under ``torch.autocast`` to bf16, as the official scripts run mixed precision.
The paths are timed in turn and the faster of ours counts; the project's target is at least 2x the
baseline. MFU is the achieved FLOP/s (our FLOP count, the same for all) over this GPU's bf16 matmul peak,
measured in the same run, or over ``--peak-tflops`` (the datasheet's dense figure).

    python benchmarks/bench_gpu.py --baseline ~/official_builders.py --compile --cuda-graphs --json gpu.json
    python benchmarks/bench_gpu.py --baseline ~/official_builders.py --models ms_mlp_tiny,vip_s7
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionmlp import create_model
from visionmlp.engine.benchmark import BenchmarkSteps, check_counts, default_img_size, parse_model_names
from visionmlp.engine.comparison import fast_path_copy, load_builder, seconds_in_turn
from visionmlp.engine.machine import matmul_peak_gflops, resolve_device, resolve_dtype, synchronize
from visionmlp.engine.quantize import fp32_agreement

TARGET_SPEEDUP = 2.0
BASELINE, EAGER, COMPILED = "baseline", "ours", "ours compiled"
LOW_PRECISION = ("bf16", "fp16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of this script."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="all", help="'all' (default) or a comma-separated list of variants")
    parser.add_argument("--baseline", type=Path, help="Python file whose build(name) returns the baseline model")
    parser.add_argument("--device", default="cuda", help="cuda[:N] (default: cuda); cpu only to try the script")
    parser.add_argument("--dtype", choices=LOW_PRECISION, default="bf16",
                        help="our weights and activations, and the baseline's autocast dtype (default: bf16)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
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
    size = default_img_size(name)
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    plain = create_model(name).eval().to(device)
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


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print the table."""
    args = parse_args(argv)
    try:
        check_counts(args.batch_size, img_size=1, warmup=args.warmup, reps=args.reps, threads=None)  # own sizes
        names = parse_model_names(args.models)
        device = resolve_device(args.device)
        build_baseline = load_builder(args.baseline) if args.baseline else None
        dtype = resolve_dtype(args.dtype, device)
        if args.cuda_graphs and device.type != "cuda":
            raise ValueError(f"--cuda-graphs needs a GPU: use --device cuda (got {args.device!r})")
    except ValueError as error:
        raise SystemExit(f"bench_gpu: error: {error}") from None
    if args.peak_tflops is not None:
        peak_gflops, peak_source = 1000 * args.peak_tflops, "given"
    else:
        peak_gflops, peak_source = matmul_peak_gflops(device, dtype, torch.get_num_threads()), "measured"
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
    print(f"{device_name(device)}, torch {torch.__version__}, batch {args.batch_size}, native resolutions; median "
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
