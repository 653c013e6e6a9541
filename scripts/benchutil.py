"""Timing and memory helpers and the shape scenes' set-up, shared by the benchmark scripts (not part of the
library)."""

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


# the shape scenes as bench_fit.py fits them: 48², 12 views, one σ, silhouettes only
SHAPE = ["renderer.image_size=48", "scene.views=12", "scene.coarse_to_fine=false", "scene.sigma=3e-4",
         "scene.color_stage=false"]
SHAPE_SCENES = ("cow_shape", "bunny_silhouette")


def shape_problem(scene: str, solvers: dict[str, list[str]]) -> tuple:
    """``(problem, x0, {name: solver config node})``: a shape scene's first stage at its start point, and one
    solver config per entry of ``solvers`` (its fit.py overrides, e.g. ``["solver=adam", "solver.lr=0.05"]``)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import diffrender.config  # noqa: F401  (registers the config schemas)
    from diffrender.scenes.base import BuildContext

    root = Path(__file__).resolve().parents[1]
    nodes = {}
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        for name, overrides in solvers.items():
            cfg = compose("config", overrides=[f"scene={scene}", *SHAPE, *overrides])
            nodes[name] = cfg.solver
    ctx = BuildContext(dtype=torch.float32, renderer=OmegaConf.to_container(cfg.renderer, resolve=True), root=root)
    built = instantiate(cfg.scene, _partial_=True)(ctx=ctx)
    st = built.stages[0]
    x = {k: v.detach().clone() for k, v in built.x0.items() if k in st.keys}
    return st.make_problem(dict(built.x0)), x, nodes
