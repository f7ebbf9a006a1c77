"""What this machine is and can do: devices and dtypes, CPU threads, the matmul peak, peak memory."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from ..kernels import linear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The matmul peak grows square sizes from the minimum until one matmul is slow enough to saturate the device
# (a quarter of the time allowed per size) or the maximum is reached, so slow dtypes stay quick to measure.
PEAK_MATMUL_MIN_SIZE = 256
PEAK_MATMUL_MAX_SIZE = {"cpu": 1024, "cuda": 8192}
PEAK_MATMUL_REPS = 10
PEAK_SECONDS_PER_SIZE = 0.5
PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


@functools.cache  # loaded once; every peak-memory measurement and mallopt call asks for it
def linux_libc() -> ctypes.CDLL | None:
    """The C library on Linux (for glibc's ``malloc_trim`` and ``mallopt``), else None."""
    return ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform == "linux" else None


def proc_status_mib(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in MiB; None where there is none."""
    if not PROC_STATUS.exists():
        return None
    match = re.search(rf"{field}:\s+(\d+) kB", PROC_STATUS.read_text())
    return int(match.group(1)) / 1024 if match else None


def resolve_device(device: str) -> torch.device:
    """Check that ``device`` names a CPU or an available CUDA device."""
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available on this machine; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return resolved


def resolve_amp(amp: str, device: torch.device) -> str:
    """``train.amp`` made concrete: ``auto`` autocasts to bf16 on a GPU that has it (else fp16, with loss scaling),
    as the official scripts train with apex's mixed precision on GPUs, and not at all on a CPU."""
    if amp != "auto":
        return amp
    if device.type != "cuda":
        return "none"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Check that ``dtype`` is one of fp32/bf16/fp16 and that ``device`` can compute in it."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    if device.type == "cuda" and torch_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"bf16 is not supported by {torch.cuda.get_device_name(device)}")
    if device.type == "cpu" and torch_dtype != torch.float32:
        try:
            probe = torch.ones(2, 4, 4, 4, dtype=torch_dtype)
            F.layer_norm(F.conv2d(probe, probe) @ probe[0, 0, :1, :1], (1,))
        except RuntimeError as error:
            raise ValueError(f"{dtype} is not supported on this CPU by this PyTorch build: {error}") from None
    return torch_dtype


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op CPU threads (``None``: leave the setting alone)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@functools.cache
def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, threads: int) -> float:
    """This machine's matmul peak in GFLOP/s with ``threads`` CPU threads: the fastest square matmul (cached)."""
    best = 0.0
    # F.linear has its own kernels on some CPUs (bf16 through oneDNN, far faster than mm), and the fast kernels'
    # linear takes oneDNN's fp32 matmul on CPU: the peak is the fastest of the three
    for matmul in (torch.mm, F.linear, linear):
        size = PEAK_MATMUL_MIN_SIZE
        while True:
            a = torch.randn(size, size, device=device).to(dtype)
            b = torch.randn(size, size, device=device).to(dtype)
            with num_threads(threads):
                matmul(a, b)
                synchronize(device)
                deadline = time.perf_counter() + PEAK_SECONDS_PER_SIZE
                fastest = float("inf")
                for _ in range(PEAK_MATMUL_REPS):
                    start = time.perf_counter()
                    matmul(a, b)
                    synchronize(device)
                    fastest = min(fastest, time.perf_counter() - start)
                    if time.perf_counter() > deadline:
                        break
            best = max(best, 2 * size**3 / fastest / 1e9)
            if size >= PEAK_MATMUL_MAX_SIZE[device.type] or fastest > PEAK_SECONDS_PER_SIZE / 4:
                break
            size *= 2
    return best


class PeakMemory:
    """Peak memory of the benchmarked steps: CUDA ``max_memory_allocated``, or on CPU the growth of peak RSS."""

    def __init__(self, device: torch.device, compiled: bool) -> None:
        self.device = device
        self.libc = linux_libc()
        if device.type == "cuda":
            self.method = "CUDA max_memory_allocated during the timed steps (weights, optimizer state, activations)"
        elif PROC_CLEAR_REFS.exists():
            self.method = (
                "CPU peak RSS over the counted, warm-up and timed steps (VmHWM, reset through /proc/self/clear_refs)"
                " minus RSS before them, after returning freed heap memory with malloc_trim: activations,"
                " workspaces and optimizer state, not weights"
                + (", and torch.compile's own memory" if compiled else "")
            )
        else:
            self.method = "CPU growth of the process's lifetime peak RSS (getrusage ru_maxrss): a lower bound"
        self.baseline = 0.0

    def start_before_first_step(self) -> None:
        """Take the CPU baseline before any step, since the allocator keeps and reuses memory after warm-up."""
        if self.device.type == "cpu":
            gc.collect()
            if self.libc is not None and hasattr(self.libc, "malloc_trim"):
                self.libc.malloc_trim(0)  # otherwise activations fit in pages freed earlier and RSS does not grow
            if PROC_CLEAR_REFS.exists():
                PROC_CLEAR_REFS.write_text("5")
            self.baseline = self._cpu_peak_mib()

    def start_before_timing(self) -> None:
        """Reset the CUDA peak, which counts live tensors only and so is unaffected by warm-up."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float:
        """Peak memory in MiB as described by ``method``."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return max(0.0, self._cpu_peak_mib() - self.baseline)

    @staticmethod
    def _cpu_peak_mib() -> float:
        peak = proc_status_mib("VmHWM")
        if peak is not None:
            return peak
        import resource  # not available on Windows, hence only here

        # ru_maxrss is in kilobytes on Linux, in bytes on macOS
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name, from /proc/cpuinfo or else the platform module."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        if match:
            return match.group(1).strip()
    import platform

    return platform.processor() or platform.machine()
