"""GPU speed of our fastest inference path against a baseline run under autocast, with model FLOPs utilization.

For each variant at its native resolution, batch 64: ours in the deploy form with bf16 weights and
activations, channels-last (``--compile`` compiles it), and, with ``--baseline FILE.py``, the model that
``build(name)`` in that file returns, kept in fp32 and run under ``torch.autocast`` to bf16, as the
official scripts run mixed precision. Steps of the two are timed in turn; the project's target is at
least 2x the baseline. MFU is the achieved FLOP/s (our FLOP count, the same for both) over this GPU's
bf16 matmul peak, measured in the same run, or over ``--peak-tflops`` (the datasheet's dense figure).

    python benchmarks/bench_gpu.py --baseline ~/official_builders.py
    python benchmarks/bench_gpu.py --baseline ~/official_builders.py --compile --models ms_mlp_tiny,vip_s7
"""

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionmlp import create_model
from visionmlp.engine.benchmark import BenchmarkSteps, check_counts, default_img_size, parse_model_names
from visionmlp.engine.comparison import fast_path_copy, load_builder, seconds_in_turn
from visionmlp.engine.machine import matmul_peak_gflops, resolve_device, resolve_dtype
from visionmlp.engine.quantize import fp32_agreement

TARGET_SPEEDUP = 2.0
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
    parser.add_argument("--compile", action="store_true", help="torch.compile our fast path")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds before timing (default: 5)")
    parser.add_argument("--reps", type=int, default=20, help="timed rounds, each model once per round (default: 20)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the GPU's dense matmul peak in the dtype, for MFU (default: measured in this run)")
    args = parser.parse_args(argv)
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"--peak-tflops must be positive, got {args.peak_tflops}")
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
    """Images/s of our fast path and of the baseline under autocast (timed in turn), FLOPs and top-1 agreement."""
    size = default_img_size(name)
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    plain = create_model(name).eval().to(device)
    counted = BenchmarkSteps(plain, images, "infer", torch.float32, device)
    counted.run_counted()
    flops = counted.forward_counter.get_total_flops()
    fast = fast_path_copy(plain, dtype).eval()
    timed = torch.compile(fast) if args.compile else fast
    steps = {"ours": inference_step(timed, images, None)}
    if build_baseline is not None:
        steps["baseline"] = inference_step(build_baseline(name).eval().to(device), images, dtype)
    seconds = seconds_in_turn(steps, args.warmup, args.reps, device)
    agreement = fp32_agreement(timed, plain, images, args.batch_size, torch.float32)
    return {"gmacs": flops / 2 / args.batch_size / 1e9, "gflop_per_image": flops / args.batch_size / 1e9,
            "images_per_s": {label: args.batch_size / statistics.median(t) for label, t in seconds.items()},
            "top1_agreement": agreement["top1_agreement"]}


def mfu(result: dict[str, Any], images_per_s: float, peak_gflops: float) -> float:
    """Model FLOPs utilization at ``images_per_s``: achieved GFLOP/s over ``peak_gflops``."""
    return result["gflop_per_image"] * images_per_s / peak_gflops


def result_row(name: str, result: dict[str, Any], peak_gflops: float) -> str:
    """One row of the table: the baseline (if any), ours, the speed-up and its verdict, the top-1 agreement."""
    rates = result["images_per_s"]
    cells = [name, f"{result['gmacs']:.2f}"]
    if "baseline" in rates:
        cells += [f"{rates['baseline']:.1f}", f"{100 * mfu(result, rates['baseline'], peak_gflops):.1f} %"]
    cells += [f"{rates['ours']:.1f}", f"{100 * mfu(result, rates['ours'], peak_gflops):.1f} %"]
    if "baseline" in rates:
        speedup = rates["ours"] / rates["baseline"]
        cells += [f"{speedup:.2f}x", "met" if speedup >= TARGET_SPEEDUP else "not met"]
    cells.append(f"{result['top1_agreement']:.1f} %")
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print the table."""
    args = parse_args(argv)
    try:
        check_counts(args.batch_size, img_size=1, warmup=args.warmup, reps=args.reps, threads=None)  # own sizes
        names = parse_model_names(args.models)
        device = resolve_device(args.device)
        build_baseline = load_builder(args.baseline) if args.baseline else None
        dtype = resolve_dtype(args.dtype, device)
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
        print(f"{name}: {rates} img/s", file=sys.stderr)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    ours = f"ours ({args.dtype}, deploy, channels-last{', compiled' if args.compile else ''})"
    print(f"{device_name}, torch {torch.__version__}, batch {args.batch_size}, native resolutions; median of "
          f"{args.reps} rounds timed in turn; MFU over a {args.dtype} matmul peak of {peak_gflops:.0f} GFLOP/s "
          f"({peak_source})\n")
    header = ["model", "GMACs"]
    if build_baseline is not None:
        header += [f"baseline img/s (fp32 weights, {args.dtype} autocast)", "baseline MFU"]
    header += [f"{ours} img/s", "ours MFU"]
    if build_baseline is not None:
        header += ["speed-up", f"target {TARGET_SPEEDUP:g}x"]
    header.append(f"ours: same top-1 as fp32 ({args.batch_size} random images)")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    print("\n".join(result_row(name, result, peak_gflops) for name, result in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
