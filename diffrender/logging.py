"""What a fit shows while it runs: TensorBoard scalars and images, a terminal progress bar, image strips
(render | target | |difference|) and a GIF of the progress.

Tag names are part of the interface (README, "Fitting"): ``loss/total``, ``loss/<block>``,
``solver/{lambda,rho,cg_iters,step_norm,grad_norm,jvps,vjps}``, ``time/iter_s``, ``metric/<name>``,
``images/strip``, ``config`` (text), ``mesh/fitted`` and the hparams plugin.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffrender.io import to_uint8

# IterationRecord field -> TensorBoard tag
SOLVER_TAGS = {
    "damping": "solver/lambda",
    "rho": "solver/rho",
    "cg_iterations": "solver/cg_iters",
    "step_norm": "solver/step_norm",
    "gradient_norm": "solver/grad_norm",
    "jvps": "solver/jvps",
    "vjps": "solver/vjps",
    "seconds": "time/iter_s",
}


def progress_enabled(mode: str, stream: Any = None) -> bool:
    """``auto``: a bar only on a terminal and not under CI (``CI`` set to anything but 0/false)."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    stream = stream or sys.stderr
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return bool(getattr(stream, "isatty", lambda: False)()) and not ci


class ProgressBar:
    """A one-line bar redrawn with ``\\r`` on stderr; does nothing when disabled."""

    def __init__(self, total: int, enabled: bool, width: int = 30, stream: Any = None) -> None:
        self.total, self.enabled, self.width = max(int(total), 1), enabled, width
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()

    def update(self, done: int, text: str = "") -> None:
        if not self.enabled:
            return
        frac = min(done / self.total, 1.0)
        fill = int(round(frac * self.width))
        el = time.perf_counter() - self.start
        bar = "#" * fill + "." * (self.width - fill)
        self.stream.write(f"\r[{bar}] {done}/{self.total} {el:6.1f}s {text}\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _rgb(img: Tensor) -> Tensor:
    """(H, W) or (H, W, C) -> (H, W, 3) float on CPU."""
    img = img.detach().to("cpu", torch.float32)
    if img.dim() == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = img.expand(*img.shape[:2], 3)
    return img[..., :3]


def image_strip(render: Tensor, target: Tensor, max_views: int = 4) -> Tensor:
    """Rows of render | target | |render - target|, one row per view (at most ``max_views``).

    render, target: (N, H, W) silhouettes or (N, H, W, 3) colors in [0, 1]. Returns (rows·H, 3·W, 3).
    """
    n = min(render.shape[0], max(1, max_views))
    rows = []
    for i in range(n):
        r, t = _rgb(render[i]), _rgb(target[i])
        sep = torch.ones(r.shape[0], 1, 3)
        rows.append(torch.cat([r, sep, t, sep, (r - t).abs()], dim=1))
    sep = torch.ones(1, rows[0].shape[1], 3)
    out = [rows[0]]
    for r in rows[1:]:
        out += [sep, r]
    return torch.cat(out, dim=0).clamp(0, 1)


def write_gif(path: str | os.PathLike, frames: list[np.ndarray], fps: int = 8) -> None:
    """Frames (uint8 (H, W, 3), same size) as a looping GIF."""
    import imageio.v2 as imageio

    if frames:
        imageio.mimsave(Path(path), frames, duration=1.0 / max(fps, 1), loop=0)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"a.b.c": scalar}; lists become strings (TensorBoard hparams take scalars)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, bool | int | float | str):
            out[key] = v
        elif v is None:
            out[key] = "null"
        else:
            out[key] = str(v)
    return out


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class FitLogger:
    """TensorBoard writer for one fit (no-op when disabled) plus the GIF frames."""

    def __init__(self, log_dir: str | os.PathLike, enabled: bool = True, purge_step: int | None = None,
                 max_views: int = 4) -> None:
        self.enabled, self.max_views = enabled, max_views
        self.frames: list[np.ndarray] = []
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def iteration(self, step: int, record: Any, metrics: Mapping[str, float] | None = None) -> None:
        """Scalars of one solver iteration (an IterationRecord or anything with the same attributes)."""
        if self.writer is None:
            return
        cost = _finite(getattr(record, "cost", None))
        if cost is not None:
            self.writer.add_scalar("loss/total", cost, step)
        for block, c in (getattr(record, "block_costs", None) or {}).items():
            if (c := _finite(c)) is not None:
                self.writer.add_scalar(f"loss/{block}", c, step)
        for field, tag in SOLVER_TAGS.items():
            v = _finite(getattr(record, field, None))
            if v is not None:
                self.writer.add_scalar(tag, v, step)
        for name, v in (metrics or {}).items():
            if (v := _finite(v)) is not None:
                self.writer.add_scalar(f"metric/{name}", v, step)

    def images(self, step: int, render: Tensor, target: Tensor, keep_frame: bool = True) -> np.ndarray:
        """Log the render | target | diff strip; keep it as a GIF frame. Returns the uint8 strip."""
        strip = to_uint8(image_strip(render, target, self.max_views))
        if self.writer is not None:
            self.writer.add_image("images/strip", strip, step, dataformats="HWC")
        if keep_frame:
            self.frames.append(strip)
        return strip

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            # TensorBoard renders markdown: indent four spaces to keep YAML as a code block
            self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), 0)

    def mesh(self, step: int, verts: Tensor, faces: Tensor, colors: Tensor | None = None) -> None:
        if self.writer is None:
            return
        kw = {}
        if colors is not None:
            kw["colors"] = (colors.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8)[None]
        self.writer.add_mesh("mesh/fitted", vertices=verts.detach().cpu().float()[None],
                             faces=faces.detach().cpu().int()[None], global_step=step, **kw)

    def hparams(self, config: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Flattened config -> final metrics, written into this run's own directory."""
        if self.writer is None:
            return
        hp = flatten(config)
        mets = {f"hparam/{k}": v for k, v in metrics.items() if _finite(v) is not None}
        self.writer.add_hparams(hp, mets, run_name=".")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
