"""CPU speed of the visionmlp variants against a baseline implementation, as Markdown tables.

For each variant at its native resolution this prints fp32 eager inference (images/s and the fraction of
this machine's fp32 matmul peak), the fastest inference path (deploy form, low-precision dtype,
channels-last, optionally compiled) and, with ``--train``, the fp32 training step with its peak memory.

With ``--baseline FILE.py`` every figure is also taken for a baseline model built by ``build(name)`` in
that file, for instance the official implementation from a clone of its repository, and the speed
targets of the project are checked (see benchmarks/README.md). visionmlp ships no official code; the
file is yours to write.

    python benchmarks/bench_cpu.py                                   # all 26, 2 threads, batch 8
    python benchmarks/bench_cpu.py --models vip_s7,raft_mlp_s --baseline ~/official_builders.py --train
"""

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionmlp import create_model
from visionmlp.config import family_recipe, load_recipe
from visionmlp.engine.benchmark import BenchmarkSteps, default_img_size, parse_model_names, run_benchmark
from visionmlp.engine.comparison import fast_path_copy, interleaved_step_seconds, load_builder
from visionmlp.engine.machine import DTYPES, PROC_CLEAR_REFS, linux_libc, matmul_peak_gflops, proc_status_mib
from visionmlp.engine.quantize import fp32_agreement

# Speed targets for fp32 eager inference against the baseline: 1.5x, or 85 % of the matmul roofline
# where 1.5x would pass it; never slower.
TARGET_SPEEDUP = 1.5
TARGET_ROOFLINE = 0.85
TARGET_TRAIN_SPEEDUP = 1.3
# Repeated measurements of one model's training-step memory spread by about 0.03 % (0.2 MiB of 650); peaks
# closer than this count as equal.
MEMORY_SPREAD = 0.0005
TARGET_BEST_PATH_SPEEDUP = 4.0
# labels of our fast path among the models timed in turn
COMPILED = "fast path, compiled"
FAST_PATHS = ("fast path", COMPILED)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of this script."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="all", help="'all' (default) or a comma-separated list of variants")
    parser.add_argument("--baseline", type=Path, help="Python file whose build(name) returns the baseline model")
    parser.add_argument("--train", action="store_true",
                        help="also time the fp32 training step (AdamW); ours at its recipe's drop-path rate")
    parser.add_argument("--threads", type=int, default=2, help="CPU intra-op threads (default: 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--best-dtype", choices=["auto", *DTYPES], default="auto",
                        help="dtype of the fast path; auto (default): the one with this machine's highest matmul peak")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the fast path")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (default: 2)")
    parser.add_argument("--reps", type=int, default=6, help="timed steps (default: 6)")
    parser.add_argument("--paired-reps", type=int, default=8,
                        help="steps of ours and the baseline timed in turn for the speed-ups (default: 8)")
    parser.add_argument("--train-memory-of", choices=["ours", "baseline"],
                        help="(run by --train in a process of its own) print the training-step memory of one model")
    parser.add_argument("--warm-heap", action="store_true",
                        help="glibc keeps freed memory for reuse, as a long-running process or jemalloc would "
                             "(default: glibc's own settings, which hand large blocks back after each step)")
    parser.add_argument("--processes", type=int, default=1,
                        help="measure each variant in this many fresh processes and report the medians (default: 1, "
                             "in this process)")
    parser.add_argument("--emit-runs", action="store_true",
                        help="(run by --processes in a process of its own) print one variant's measurements as JSON")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes must be 1 or more, got {args.processes}")
    if args.emit_runs and ("," in args.models or args.models == "all"):
        parser.error("--emit-runs measures one variant; name it with --models NAME")
    return args


def recipe_model(name: str) -> nn.Module:
    """Our variant with the stochastic-depth rate its family's recipe trains it with, as the baseline should be.

    Drop path changes no inference, but in training ours computes a residual branch only for the samples
    its drop path keeps, so both sides of a training comparison need the rate the official scripts use.
    """
    recipe = family_recipe(name)
    rates = load_recipe(recipe).get("model", {}).get("drop_path_by_variant", {}) if recipe else {}
    return create_model(name, drop_path_rate=float(rates[name])) if name in rates else create_model(name)


def load_baseline(path: Path) -> Callable[[str], nn.Module]:
    """The ``build(name) -> nn.Module`` function of the file at ``path``; exits with the reason if there is none."""
    try:
        return load_builder(path)
    except ValueError as error:
        raise SystemExit(str(error)) from None


# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4


def glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or None on other C libraries and systems."""
    return getattr(linux_libc(), "mallopt", None)


def keep_freed_memory_in_heap() -> None:
    """Make glibc serve every allocation from its heap and never shrink it.

    By default glibc maps each block above a threshold (at most 32 MiB) afresh and unmaps it on free, so
    every step pays page faults for its large temporaries; an implementation that allocates more pays more.
    With the heap kept, allocations reuse memory already touched, as with jemalloc or tcmalloc.
    """
    mallopt = glibc_mallopt()
    if mallopt is None or mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        raise SystemExit("--warm-heap needs glibc's mallopt (Linux); leave it out on this system")


def exact_memory_supported() -> bool:
    """Whether :func:`train_step_memory_mib` can measure here (glibc and a resettable peak resident set)."""
    return glibc_mallopt() is not None and PROC_CLEAR_REFS.exists() and proc_status_mib("VmHWM") is not None


def train_step_memory_mib(model: nn.Module, batch_size: int, img_size: int, fused_optimizer: bool) -> float:
    """Peak memory of one fp32 training step beyond what the model and its optimizer state hold.

    glibc is set to map every block of 64 KiB or more on its own and to unmap it on free, so the resident
    set follows the live tensors (activations, gradients, workspaces) and not what the heap kept from
    earlier work. The setting lasts for the process, so ``--train`` runs this in a process of its own.
    """
    mallopt = glibc_mallopt()
    if not exact_memory_supported() or mallopt(M_MMAP_THRESHOLD, 2**16) != 1 or mallopt(M_TRIM_THRESHOLD, 0) != 1:
        raise SystemExit("measuring the training memory needs Linux with glibc")
    model.train()
    inputs = torch.randn(batch_size, 3, img_size, img_size)
    steps = BenchmarkSteps(model, inputs, "train", torch.float32, torch.device("cpu"), fused_optimizer)
    steps.run(model)  # creates the optimizer state, which both implementations hold alike
    before = proc_status_mib("VmRSS")
    PROC_CLEAR_REFS.write_text("5")  # VmHWM restarts from the current resident set
    steps.run(model)
    return proc_status_mib("VmHWM") - before


def isolated_train_memory_mib(name: str, which: str, args: argparse.Namespace) -> float | None:
    """:func:`train_step_memory_mib` of our model or the baseline's, in a fresh process; None where unsupported."""
    if not exact_memory_supported():
        return None
    options = ["--train-memory-of", which, "--models", name, "--threads", str(args.threads),
               "--batch-size", str(args.batch_size)]
    options += ["--baseline", str(args.baseline)] if which == "baseline" else []
    return json_of_fresh_process(options, f"measuring the training memory of {which} {name}")


def json_of_fresh_process(options: list[str], task: str) -> Any:
    """The JSON that this script prints last when run with ``options`` in a fresh process; exits if it fails."""
    result = subprocess.run([sys.executable, __file__, *options], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{task} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def fastest_dtype(threads: int) -> str:
    """The dtype with this CPU's highest matmul peak (bf16 only pays where the CPU computes in it natively)."""
    cpu = torch.device("cpu")
    return max(DTYPES, key=lambda dtype: matmul_peak_gflops(cpu, DTYPES[dtype], threads))


def measure(
    name: str, args: argparse.Namespace, best_dtype: str, build_baseline: Callable[[str], nn.Module] | None
) -> dict[str, Any]:
    """Every run of one variant: ours fp32 eager, our fast path, the training step, and the baseline pairings.

    Speed-ups come from steps of ours, the baseline and our fast path (eager, and with ``--compile`` also
    compiled) timed in turn (``interleaved_step_seconds``), so that a passing load on the machine slows all
    alike. FLOPs and roofline fractions use our FLOP count.
    """
    common = {"batch_size": args.batch_size, "warmup": args.warmup, "reps": args.reps, "threads": args.threads}
    modes = ["infer", "train"] if args.train else ["infer"]
    runs: dict[str, Any] = {"eager": run_benchmark(name, **common)}
    if build_baseline is None:
        runs["best"] = run_benchmark(name, dtype=best_dtype, channels_last=True, deploy=True, compile=args.compile,
                                     **common)
    if args.train:
        labels = ["ours", "baseline"] if build_baseline is not None else ["ours"]
        runs["train_memory_mib"] = {label: isolated_train_memory_mib(name, label, args) for label in labels}
    if build_baseline is None:
        if args.train:  # with a baseline, the paired steps below give the training speed
            runs["train"] = run_benchmark(name, mode="train", **common)
        return runs
    size = default_img_size(name)
    for mode in modes:
        models = {"ours": recipe_model(name), "baseline": build_baseline(name)}
        if mode == "infer":
            models["fast path"] = fast_path_copy(models["ours"], DTYPES[best_dtype])
            if args.compile:
                # compilations of earlier models would count against dynamo's recompilation limit
                torch._dynamo.reset()
                models[COMPILED] = fast_path_copy(models["ours"], DTYPES[best_dtype], compile=True)
            images = torch.randn(args.batch_size, 3, size, size)
            runs["fast_path_top1_agreement"] = {
                label: fp32_agreement(models[label], models["ours"].eval(), images, args.batch_size,
                                      torch.float32)["top1_agreement"]
                for label in FAST_PATHS if label in models}
        # the baseline trains with AdamW's per-parameter loop, as the official scripts do; ours fused, as
        # `visionmlp train` does
        seconds = interleaved_step_seconds(models, args.batch_size, size, mode=mode, warmup=args.warmup,
                                           reps=args.paired_reps, threads=args.threads, unfused_optimizer=["baseline"])
        runs[f"paired_{mode}"] = {label: args.batch_size / statistics.median(t) for label, t in seconds.items()}
    return runs


def isolated_measurement(name: str, args: argparse.Namespace, best_dtype: str) -> dict[str, Any]:
    """:func:`measure` of one variant in a fresh process, whose heap starts empty."""
    options = ["--emit-runs", "--models", name, "--threads", str(args.threads), "--batch-size", str(args.batch_size),
               "--best-dtype", best_dtype, "--warmup", str(args.warmup), "--reps", str(args.reps),
               "--paired-reps", str(args.paired_reps)]
    options += ["--baseline", str(args.baseline)] if args.baseline else []
    options += [flag for flag, on in (("--train", args.train), ("--compile", args.compile),
                                      ("--warm-heap", args.warm_heap)) if on]
    return json_of_fresh_process(options, f"measuring {name} in a process of its own")


def median_of_runs(runs: list[Any]) -> Any:
    """The measurements of several processes merged: the median of every figure, the first of anything else."""
    first = runs[0]
    if isinstance(first, dict):
        return {key: median_of_runs([run[key] for run in runs]) for key in first}
    if isinstance(first, float):
        return statistics.median(runs)
    return first


def summary_line(name: str, runs: dict[str, Any]) -> str:
    """One line of progress: our fp32 speed and the paired figures."""
    paired = runs.get("paired_infer")
    base = "; paired: " + ", ".join(f"{label} {ips:.2f}" for label, ips in paired.items()) if paired else ""
    fp32 = runs["eager"]
    return f"{name} ({fp32['img_size']} px): {fp32['images_per_s']:.2f} img/s fp32{base}"


def roofline(result: dict[str, Any], images_per_s: float) -> float:
    """Fraction of the matmul peak at ``images_per_s`` with the FLOPs per image of ``result``'s step."""
    return result["step_gflop_per_image"] * images_per_s / result["matmul_peak_gflops"]


def inference_row(name: str, runs: dict[str, Any]) -> str:
    """One row of the inference table."""
    eager = runs["eager"]
    cells = [name, f"{eager['gmacs']:.2f}"]
    ours_ips = eager["images_per_s"]
    if "paired_infer" in runs:
        ours_ips, base_ips = runs["paired_infer"]["ours"], runs["paired_infer"]["baseline"]
        speedup = ours_ips / base_ips
        roofline_bound = roofline(eager, base_ips) * TARGET_SPEEDUP > TARGET_ROOFLINE
        met = speedup >= 1.0 and (
            speedup >= TARGET_SPEEDUP or (roofline_bound and roofline(eager, ours_ips) >= TARGET_ROOFLINE))
        cells += [f"{base_ips:.2f}", f"{100 * roofline(eager, base_ips):.0f} %"]
    cells += [f"{ours_ips:.2f}", f"{100 * roofline(eager, ours_ips):.0f} %"]
    if "paired_infer" in runs:
        target = f"{100 * TARGET_ROOFLINE:.0f} % roofline" if roofline_bound else f"{TARGET_SPEEDUP}x"
        cells += [f"{speedup:.2f}x", f"{target}: {'met' if met else 'not met'}"]
    if "paired_infer" in runs:  # compiled where that is faster
        fastest = max((label for label in FAST_PATHS if label in runs["paired_infer"]), key=runs["paired_infer"].get)
        fast_ips, agreement = runs["paired_infer"][fastest], runs["fast_path_top1_agreement"][fastest]
        best_speedup = fast_ips / base_ips
        fast_cell = f"{fast_ips:.2f}" + (" (compiled)" if fastest == COMPILED else "")
    else:
        fast_ips, agreement, best_speedup = runs["best"]["images_per_s"], runs["best"]["fp32_top1_agreement"], None
        fast_cell = f"{fast_ips:.2f}"
    cells += [fast_cell, f"{agreement:.1f} %"]
    if best_speedup is not None:
        cells += [f"{best_speedup:.2f}x ({'met' if best_speedup >= TARGET_BEST_PATH_SPEEDUP else 'not met'})"]
    return "| " + " | ".join(cells) + " |"


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def train_row(name: str, runs: dict[str, Any]) -> str:
    """One row of the training table."""
    memory = runs["train_memory_mib"]
    cells = [name]
    if "paired_train" in runs:
        ours_ips, base_ips = runs["paired_train"]["ours"], runs["paired_train"]["baseline"]
        cells += [f"{base_ips:.2f}", _mib(memory["baseline"])]
    else:
        ours_ips = runs["train"]["images_per_s"]
    cells += [f"{ours_ips:.2f}", _mib(memory["ours"])]
    if "paired_train" in runs:
        speedup = ours_ips / base_ips
        if memory["ours"] is None:
            verdict = "memory not measured here"
        else:
            met = speedup >= TARGET_TRAIN_SPEEDUP and memory["ours"] <= memory["baseline"] * (1 + MEMORY_SPREAD)
            verdict = "met" if met else "not met"
        cells += [f"{speedup:.2f}x", verdict]
    return "| " + " | ".join(cells) + " |"


def buildable_by(build_baseline: Callable[[str], nn.Module], names: list[str]) -> list[str]:
    """The variants the baseline file builds; the others are named on stderr and left out (all of them: an error)."""
    kept = []
    for name in names:
        try:
            build_baseline(name)
        except Exception as error:  # a builder file of the user's: any failure means it cannot make this variant
            print(f"skipping {name}: the baseline file cannot build it ({type(error).__name__}: {error})",
                  file=sys.stderr)
        else:
            kept.append(name)
    if not kept:
        raise SystemExit(f"the baseline file builds none of {', '.join(names)}")
    return kept


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print the tables."""
    args = parse_args(argv)
    names = parse_model_names(args.models)
    if args.train_memory_of == "baseline" and args.baseline is None:
        raise SystemExit("--train-memory-of baseline needs --baseline FILE, the file whose build(name) makes it")
    if args.train_memory_of:
        model = load_baseline(args.baseline)(names[0]) if args.train_memory_of == "baseline" else recipe_model(names[0])
        torch.set_num_threads(args.threads)
        print(json.dumps(train_step_memory_mib(model, args.batch_size, default_img_size(names[0]),
                                               fused_optimizer=args.train_memory_of == "ours")))
        return 0
    if args.warm_heap:
        keep_freed_memory_in_heap()
    build_baseline = load_baseline(args.baseline) if args.baseline else None
    best_dtype = fastest_dtype(args.threads) if args.best_dtype == "auto" else args.best_dtype
    if args.emit_runs:
        print(json.dumps(measure(names[0], args, best_dtype, build_baseline)))
        return 0
    if build_baseline is not None:
        names = buildable_by(build_baseline, names)
    results = {}
    for name in names:
        if args.processes == 1:
            results[name] = runs = measure(name, args, best_dtype, build_baseline)
        else:
            # The heap a process starts a model with decides how many page faults each step pays (up to a
            # fifth of a step): one process is one draw.
            per_process = []
            for index in range(args.processes):
                per_process.append(isolated_measurement(name, args, best_dtype))
                print(f"process {index + 1}/{args.processes}: {summary_line(name, per_process[-1])}", file=sys.stderr)
            results[name] = runs = median_of_runs(per_process)
        print(summary_line(name, runs), file=sys.stderr)
    first = next(iter(results.values()))
    eager = first["eager"]
    fast_path = f"{best_dtype}, deploy, channels-last"
    if build_baseline is not None:
        fast_path += (", eager or compiled, whichever is faster" if args.compile else "")
        fast_path += "; timed in turn with ours and the baseline"
    elif args.compile:
        fast_path += ", compiled"
    cpu = torch.device("cpu")
    peaks = ", ".join(f"{d} {matmul_peak_gflops(cpu, DTYPES[d], eager['threads']):.1f}" for d in DTYPES)
    print(f"CPU: {eager['device_name']}, {eager['threads']} threads, batch {args.batch_size}, torch "
          f"{eager['torch_version']}; matmul peak (GFLOP/s) {peaks}; median of {args.reps} steps"
          f"{f', then of {args.processes} processes' if args.processes > 1 else ''}; heap "
          f"{'kept (--warm-heap)' if args.warm_heap else 'glibc defaults'}\n")
    with_base = build_baseline is not None
    header = ["model", "GMACs"] + (["baseline img/s", "baseline roofline"] if with_base else [])
    header += ["fp32 img/s", "fp32 roofline"] + (["speed-up", "target"] if with_base else [])
    header += [f"fast path img/s ({fast_path})", "fast path: same top-1 as fp32 eager (one random batch)"]
    header += [f"fast path vs baseline fp32 (target {TARGET_BEST_PATH_SPEEDUP:g}x)"] if with_base else []
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    print("\n".join(inference_row(name, runs) for name, runs in results.items()))
    if args.train:
        header = ["model"] + (["baseline img/s", "baseline peak MiB"] if with_base else [])
        header += ["train img/s", "train peak MiB"]
        header += ["speed-up", f"target ({TARGET_TRAIN_SPEEDUP}x, no more memory)"] if with_base else []
        optimizers = "; AdamW fused for ours, per-parameter loop for the baseline" if with_base else ", fused AdamW"
        print(f"\nTraining step (fp32, forward + backward + optimizer{optimizers}; peak MiB: the live tensors of "
              "one step, in a process of its own with every block of 64 KiB or more mapped on its own):\n")
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        print("\n".join(train_row(name, runs) for name, runs in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
