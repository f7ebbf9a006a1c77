"""CPU throughput of the visionmlp variants: fp32 eager against the fastest inference path, as a Markdown table.

Each model runs twice at its native resolution: as built (fp32, contiguous, eager) and folded for
deployment in a low-precision dtype with channels-last memory (optionally compiled). Both runs report the
achieved fraction of this machine's matmul peak measured in that dtype.

    python benchmarks/bench_cpu.py                          # all 19, 2 threads, batch 8
    python benchmarks/bench_cpu.py --models vip_s7,raft_mlp_s --compile
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from visionmlp.engine.benchmark import DTYPES, parse_model_names, run_benchmark


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of this script."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="all", help="'all' (default) or a comma-separated list of variants")
    parser.add_argument("--threads", type=int, default=2, help="CPU intra-op threads (default: 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--best-dtype", choices=list(DTYPES), default="bf16", help="dtype of the fast path")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the fast path")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default: 3)")
    parser.add_argument("--reps", type=int, default=10, help="timed steps (default: 10)")
    return parser.parse_args(argv)


def compare(name: str, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fp32 eager run and the fast-path run of one variant."""
    common = {"batch_size": args.batch_size, "warmup": args.warmup, "reps": args.reps, "threads": args.threads}
    eager = run_benchmark(name, **common)
    best = run_benchmark(
        name, dtype=args.best_dtype, channels_last=True, deploy=True, compile=args.compile, **common
    )
    return eager, best


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the table."""
    args = parse_args(argv)
    names = parse_model_names(args.models)
    fast_path = f"{args.best_dtype}, deploy, channels-last" + (", compiled" if args.compile else "")
    rows = []
    for name in names:
        eager, best = compare(name, args)
        print(f"{name}: {eager['images_per_s']:.1f} -> {best['images_per_s']:.1f} img/s", file=sys.stderr)
        rows.append(
            f"| {name} | {eager['img_size']} | {eager['gmacs']:.3f} | {eager['images_per_s']:.1f} "
            f"| {100 * eager['roofline_fraction']:.1f} % | {best['images_per_s']:.1f} "
            f"| {100 * best['roofline_fraction']:.1f} % | {best['images_per_s'] / eager['images_per_s']:.2f}x "
            f"| {'yes' if best['deploy_form'].startswith('folded') else 'no'} |"
        )
    print(f"CPU: {eager['device_name']}, {eager['threads']} threads, batch {args.batch_size}, torch "
          f"{eager['torch_version']}; matmul peak fp32 {eager['matmul_peak_gflops']:.1f} GFLOP/s, "
          f"{args.best_dtype} {best['matmul_peak_gflops']:.1f} GFLOP/s\n")
    print(f"| model | img | GMACs | fp32 img/s | fp32 roofline | fast img/s ({fast_path}) | fast roofline "
          "| speed-up | folded |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|:-:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
