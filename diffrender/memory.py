"""A fit's peak memory, estimated before it starts, and the memory the machine has.

The estimate is linear in views x pixels, with per-scene slopes measured by ``scripts/bench_memory.py``
(peak resident memory of a Levenberg-Marquardt fit minus the process's baseline, over a grid of views and
image sizes, float32 on the CPU; README, "Fitting"). Cost and memory of the renderer follow the number of
(face, pixel) pairs, which grows with the covered pixels: the slope folds a scene's coverage and depth
complexity into bytes per view-pixel. ``scripts/fit.py`` refuses at start a configuration whose estimate
exceeds what is available, instead of being killed by the kernel halfway.
"""

from __future__ import annotations

from pathlib import Path

# Bytes per view-pixel above the baseline: the largest slope scripts/bench_memory.py measured for each scene
# (LM, float32, CPU; README "Fitting", memory table). teapot_pose's σ = 1e-2 stage blurs each face over
# ~25 px at 256 px, hence the most pairs per pixel.
BYTES_PER_VIEW_PIXEL = {
    "teapot_pose": 44_700.0,
    "cow_shape": 18_200.0,
    "bunny_silhouette": 9_000.0,
    "lights_albedo": 1_150.0,
}
# user data (the images scene): its default σ schedule (1e-3 -> 1e-4) is cow_shape's
DEFAULT_BYTES_PER_VIEW_PIXEL = BYTES_PER_VIEW_PIXEL["cow_shape"]
BASELINE_BYTES = 400e6  # python, torch, hydra and the mesh: the peak of a 1-view 16x16 px fit (355-392 MB)


# Bytes per view-pixel that stay when the views' graphs are not kept (rebuilt per product, chunk by chunk):
# the pair lists of the current and the trial point, residual-sized vectors and targets. About 900 measured
# by scripts/bench_scale.py --part views (cow_shape at 96 px, the σ = 1e-3 stage, 80 and 100 views; README
# "Fitting", Bounded memory), with a margin; scenes without a figure of their own use cow_shape's.
KEPT_BYTES_PER_VIEW_PIXEL = {"cow_shape": 1_200.0, "bunny_silhouette": 1_200.0}


def estimate_peak_bytes(scene: str, views: int, height: int, width: int, *, dtype_bytes: int = 4,
                        chunk_views: int | None = None) -> float:
    """Estimated peak memory (bytes) of a second-order fit of ``views`` images of ``height x width``.
    float64 doubles the per-pixel part (the pair tables' indices do not double, so this overestimates).
    ``chunk_views``: the graphs are rebuilt per product for at most this many views at a time, so only
    the chunk's graph grows with pixels at the graph rate; the rest keeps a smaller per-view share."""
    scale = dtype_bytes / 4
    slope = BYTES_PER_VIEW_PIXEL.get(scene, DEFAULT_BYTES_PER_VIEW_PIXEL) * scale
    px = height * width
    if chunk_views is None:
        return BASELINE_BYTES + slope * views * px
    kept = KEPT_BYTES_PER_VIEW_PIXEL.get(scene, KEPT_BYTES_PER_VIEW_PIXEL["cow_shape"]) * scale
    return BASELINE_BYTES + kept * views * px + slope * min(chunk_views, views) * px


def chunk_views_within(budget: float, scene: str, views: int, height: int, width: int, *,
                       dtype_bytes: int = 4) -> int | None:
    """``None`` when keeping every view's graph fits in ``budget`` bytes; else the most views per chunk
    whose rebuilt graphs keep the estimate within it (at least 1, even when nothing fits)."""
    if estimate_peak_bytes(scene, views, height, width, dtype_bytes=dtype_bytes) <= budget:
        return None
    one = estimate_peak_bytes(scene, views, height, width, dtype_bytes=dtype_bytes, chunk_views=1)
    per_view = estimate_peak_bytes(scene, views, height, width, dtype_bytes=dtype_bytes, chunk_views=2) - one
    return max(1, 1 + int((budget - one) // per_view)) if per_view > 0 else 1


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None


def available_bytes() -> float | None:
    """Memory this process can still use on the host: ``MemAvailable`` of /proc/meminfo, capped by a
    cgroup v2 (or v1) limit minus its current use. ``None`` where neither can be read (not Linux)."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = float(line.split()[1]) * 1024
                break
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(Path(limit_file)), _read_int(Path(usage_file))
        if limit is not None and usage is not None and limit < 1 << 60:
            room = float(max(limit - usage, 0))
            avail = room if avail is None else min(avail, room)
            break
    return avail


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


__all__ = ["BYTES_PER_VIEW_PIXEL", "KEPT_BYTES_PER_VIEW_PIXEL", "estimate_peak_bytes", "chunk_views_within",
           "available_bytes", "gigabytes"]
