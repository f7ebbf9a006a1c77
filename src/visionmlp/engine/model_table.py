"""``visionmlp models``: the variants with resolution, parameters and GMACs, optionally with measured speed or with
where their official weights are and the top-1 reported for them."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg_value
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..models import MODEL_NAMES, create_model, list_models
from ..models.weights import cached_weights, weights_info
from .benchmark import (
    add_benchmark_options,
    benchmark_kwargs,
    family_name,
    has_deploy_form,
    results_notes,
    run_all,
)

FAMILY_TITLES = {
    "ms_mlp": "MS-MLP",
    "vip": "ViP",
    "strip_mlp": "Strip-MLP",
    "raft_mlp": "RaftMLP",
    "repmlpnet": "RepMLPNet",
}
README_START = "<!-- models:start -->"
README_END = "<!-- models:end -->"


def describe_model(name: str) -> dict[str, Any]:
    """Family, default resolution, parameters (also of the folded deploy form) and GMACs of one variant.

    The model is built on the meta device (shapes only, no weights, so all of them take seconds) unless it cannot
    run there. GMACs are ``FlopCounterMode`` FLOPs / 2 of one fp32 forward at batch 1 and the default resolution.
    """
    return dict(_describe_model(name))


@functools.cache
def _describe_model(name: str) -> dict[str, Any]:
    family = FAMILY_TITLES[family_name(name)]
    input_size = get_pretrained_cfg_value(name, "input_size")
    try:
        model, deploy_model, gmacs = _build_and_count(name, input_size, torch.device("meta"))
    except (NotImplementedError, RuntimeError):  # an operator without a meta kernel, or a data-dependent one
        model, deploy_model, gmacs = _build_and_count(name, input_size, torch.device("cpu"))
    return {
        "model": name,
        "family": family,
        "img_size": input_size[-1],
        "params": sum(p.numel() for p in model.parameters()),
        "params_deploy": None if deploy_model is None else sum(p.numel() for p in deploy_model.parameters()),
        "gmacs": gmacs,
    }


def _build_and_count(
    name: str, input_size: tuple[int, ...], device: torch.device
) -> tuple[nn.Module, nn.Module | None, float]:
    with device:
        model = create_model(name).eval()
        inputs = torch.zeros(1, *input_size)
        deploy_model = timm.create_model(name, deploy=True) if has_deploy_form(model) else None
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(inputs)
    return model, deploy_model, counter.get_total_flops() / 2 / 1e9


def describe_weights(name: str) -> dict[str, Any]:
    """Where variant ``name``'s official weights are (a URL, the pages to download them from by hand, or not
    released), the file ``pretrained=True`` reads from the cache and whether it is there, and the ImageNet-1K top-1
    reported for them with its source (``top1`` None: not reported)."""
    info = weights_info(name)
    cached = cached_weights(name)
    return {
        "weights": info["where"],
        "weights_file": info["file_name"],
        "cached": None if cached is None else str(cached),
        "top1": info["top1"],
        "top1_source": info["top1_source"],
    }


def model_table_markdown(names: Sequence[str] = MODEL_NAMES, weights: bool = False) -> str:
    """The Markdown table of ``names`` (default: all variants) that the README shows; ``weights``: with the
    columns of :func:`describe_weights` and the sources of the top-1 figures below the table."""
    lines = [
        "| model | family | resolution | params | params (deploy) | GMACs |",
        "|---|---|--:|--:|--:|--:|",
    ]
    if weights:
        lines = [lines[0] + " weights | cached | top-1 |", lines[1] + "---|---|--:|"]
    sources: dict[str, list[str]] = {}
    for row in map(describe_model, names):
        deploy = "-" if row["params_deploy"] is None else f"{row['params_deploy']:,}"
        line = (f"| {row['model']} | {row['family']} | {row['img_size']} | {row['params']:,} | {deploy} "
                f"| {row['gmacs']:.3f} |")
        if weights:
            found = describe_weights(row["model"])
            top1 = "not reported" if found["top1"] is None else f"{found['top1']}"
            line += f" {found['weights']} | {found['cached'] or '-'} | {top1} |"
            sources.setdefault(found["top1_source"], []).append(row["model"])
        lines.append(line)
    if sources:
        lines.append("")
        lines += [f"top-1 of {', '.join(models)}: {source}" for source, models in sources.items()]
    return "\n".join(lines)


def benchmark_table_markdown(results: list[dict[str, Any]]) -> str:
    """A Markdown table of measured speed beside parameters and GMACs, one row per variant."""
    lines = [
        "| model | family | img | params (M) | GMACs | img/s | latency ms: median (p10-p90) | peak MiB | roofline |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {FAMILY_TITLES[r['family']]} | {r['img_size']} | {r['params'] / 1e6:.2f} "
            f"| {r['gmacs']:.3f} | {r['images_per_s']:.1f} "
            f"| {r['latency_ms_median']:.1f} ({r['latency_ms_p10']:.1f}-{r['latency_ms_p90']:.1f}) "
            f"| {r['peak_memory_mib']:.0f} | {100 * r['roofline_fraction']:.1f} % |"
        )
    return "\n".join(lines)


def plot_throughput(results: list[dict[str, Any]], path: str | Path) -> None:
    """Save a PNG of throughput against GMACs, one colour per family, each point named."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    first = results[0]
    options = "".join(f", {o}" for o in ("channels_last", "compile", "cuda_graphs", "deploy") if first[o])
    figure, axes = plt.subplots(figsize=(8, 5.5), layout="constrained")
    for family, title in FAMILY_TITLES.items():
        rows = [r for r in results if r["family"] == family]
        if rows:
            axes.scatter([r["gmacs"] for r in rows], [r["images_per_s"] for r in rows], label=title, s=36)
            for r in rows:
                axes.annotate(r["model"], (r["gmacs"], r["images_per_s"]), fontsize=7, xytext=(4, 3),
                              textcoords="offset points")
    axes.set_xlabel("GMACs per image")
    axes.set_ylabel("images / s")
    axes.set_title(
        f"{first['mode']} throughput, {first['device_name']} ({first['device']}, {first['threads']} threads), "
        f"{first['dtype']}{options}, batch {first['batch_size']}",
        fontsize=9,
    )
    axes.set_ylim(bottom=0)
    axes.margins(x=0.15)  # room for the names of the outermost points
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=150)
    plt.close(figure)


def replace_readme_block(path: str | Path, block: str, start: str = README_START, end: str = README_END) -> None:
    """Replace what lies between the ``start`` and ``end`` marker lines of ``path`` with ``block``."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    begin = text.find(start)
    finish = text.find(end, begin + len(start)) if begin >= 0 else -1
    if begin < 0 or finish < 0:
        raise ValueError(f"{path} has no {start} ... {end} block to replace")
    path.write_text(f"{text[:begin + len(start)]}\n{block.strip()}\n{text[finish:]}", encoding="utf-8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``visionmlp models``."""
    parser.add_argument("--family", choices=list(FAMILY_TITLES), default=None, help="only this family's variants")
    parser.add_argument("--format", choices=("markdown", "json"), default="markdown", help="output format")
    parser.add_argument("--json", dest="format", action="store_const", const="json", help="same as --format json")
    parser.add_argument(
        "--weights", action="store_true",
        help="also where the official weights are (URL, download page or not released), whether pretrained=True "
             "finds them in the cache, and the ImageNet top-1 reported for them",
    )
    parser.add_argument(
        "--write-readme", metavar="FILE", default=None,
        help=f"also write the table into FILE between the {README_START} and {README_END} lines",
    )
    bench = parser.add_argument_group("measured speed (--benchmark)")
    bench.add_argument("--benchmark", action="store_true", help="also measure throughput of every listed variant")
    bench.add_argument("--plot", metavar="FILE", default=None, help="with --benchmark: PNG of img/s against GMACs")
    add_benchmark_options(bench)


def run(args: argparse.Namespace) -> int:
    """Run ``visionmlp models``."""
    names = list_models(args.family)
    if args.plot and not args.benchmark:
        raise ValueError("--plot needs --benchmark")
    if args.weights and args.benchmark:
        raise ValueError("--weights and --benchmark print different tables: give one of them")
    if args.benchmark:
        results = run_all(names, progress=lambda line: print(line, file=sys.stderr), **benchmark_kwargs(args))
        rows: list[dict[str, Any]] = results
        markdown = f"{benchmark_table_markdown(results)}\n\n{results_notes(results)}"
        if args.plot:
            plot_throughput(results, args.plot)
    else:
        rows = [describe_model(name) | (describe_weights(name) if args.weights else {}) for name in names]
        markdown = model_table_markdown(names, weights=args.weights)
    if args.write_readme:
        replace_readme_block(args.write_readme, markdown)
    print(json.dumps(rows, indent=2) if args.format == "json" else markdown)
    return 0
