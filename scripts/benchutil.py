"""Timing and memory helpers shared by the benchmark scripts (not part of the library)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so that wall time measures the work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time in ms of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rss_kb(field: str) -> int:
    """A field of /proc/self/status in kB ("VmRSS:", "VmHWM:"), 0 where it is missing."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory (MB) that ``fn()`` adds: CUDA's allocator peak, or on CPU the growth of the peak
    resident set (VmHWM, reset through /proc/self/clear_refs); NaN where /proc is not writable.

    On CPU this is only meaningful in a fresh process whose allocator returns freed blocks to the
    system (e.g. ``MALLOC_MMAP_THRESHOLD_=65536``): otherwise freed memory is reused without growth.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return math.nan
    base = rss_kb("VmRSS:")
    fn()
    return (rss_kb("VmHWM:") - base) / 1024
