"""What a fit shows while it runs: TensorBoard scalars and images, a terminal progress bar (tqdm), image
strips (render | target | |difference|) and a GIF of the progress.

Tag names are part of the interface (README, "Fitting"): ``convergence/log10_cost`` (sorts first, so the
first screen of TensorBoard shows the convergence on a log scale), ``loss/total``, ``loss/<block>``,
``solver/{lambda,rho,cg_iters,step_norm,grad_norm,jvps,vjps}``, ``time/iter_s``, ``metric/<name>``,
``images/strip``, ``config`` (text), ``mesh/fitted`` and the HParams plugin (no scalar cards of its own).
"""

from __future__ import annotations

import math
import os
import sys
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
# the cost spans many decades (1e2 .. 1e-15 on the default fit): on a linear axis it is a flat line
LOG_COST_TAG = "convergence/log10_cost"


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
    """A tqdm bar on stderr over the fit's iterations (``total``: the whole fit's max_iterations, ``None``
    when unknown). While it is open, log records that go to the terminal are printed above it
    (``tqdm.contrib.logging.logging_redirect_tqdm``), so no line is glued onto the bar. No-op when disabled."""

    def __init__(self, total: int | None, enabled: bool, initial: int = 0, stream: Any = None) -> None:
        self.bar, self._redirect = None, None
        if not enabled:
            return
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.bar = tqdm(total=total, initial=initial, file=stream or sys.stderr, unit="it", dynamic_ncols=True,
                        leave=True)
        self._redirect = logging_redirect_tqdm(tqdm_class=tqdm)
        self._redirect.__enter__()

    def update(self, done: int, text: str = "") -> None:
        if self.bar is None:
            return
        self.bar.set_postfix_str(text, refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self._redirect.__exit__(None, None, None)
            self.bar = None


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


def write_gif(path: str | os.PathLike, frames: list[np.ndarray], fps: float = 8) -> None:
    """Frames (uint8 (H, W, 3), same size) as a looping GIF at ``fps`` frames per second."""
    import imageio.v2 as imageio

    if frames:
        # imageio's Pillow GIF writer takes the frame duration in milliseconds (GIF stores 1/100 s units)
        imageio.mimsave(Path(path), frames, duration=1000.0 / max(fps, 1e-3), loop=0)


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
    """TensorBoard writer for one fit (no-op when disabled) plus the GIF frames.

    The event file is opened at the first write, so a run that fails before its first iteration leaves
    no event file that TensorBoard would show as an empty run; ``config_text`` is written then."""

    def __init__(self, log_dir: str | os.PathLike, enabled: bool = True, purge_step: int | None = None,
                 max_views: int = 4, config_text: str | None = None) -> None:
        self.log_dir, self.enabled, self.max_views = Path(log_dir), enabled, max_views
        self.purge_step, self.config_text = purge_step, config_text
        self.frames: list[np.ndarray] = []
        self._writer = None

    @property
    def writer(self) -> Any:
        if self._writer is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.purge_step)
            if self.config_text is not None:
                # TensorBoard renders markdown: indent four spaces to keep YAML as a code block
                self._writer.add_text("config", "\n".join("    " + ln for ln in self.config_text.splitlines()), 0)
        return self._writer

    def iteration(self, step: int, record: Any, metrics: Mapping[str, float] | None = None) -> None:
        """Scalars of one solver iteration (an IterationRecord or anything with the same attributes)."""
        if not self.enabled:
            return
        w = self.writer
        cost = _finite(getattr(record, "cost", None))
        if cost is not None:
            w.add_scalar("loss/total", cost, step)
            if cost > 0:
                w.add_scalar(LOG_COST_TAG, math.log10(cost), step)
        for block, c in (getattr(record, "block_costs", None) or {}).items():
            if (c := _finite(c)) is not None:
                w.add_scalar(f"loss/{block}", c, step)
        for field, tag in SOLVER_TAGS.items():
            v = _finite(getattr(record, field, None))
            if v is not None:
                w.add_scalar(tag, v, step)
        for name, v in (metrics or {}).items():
            if (v := _finite(v)) is not None:
                w.add_scalar(f"metric/{name}", v, step)

    def images(self, step: int, render: Tensor, target: Tensor, keep_frame: bool = True) -> np.ndarray:
        """Log the render | target | diff strip; keep it as a GIF frame. Returns the uint8 strip."""
        strip = to_uint8(image_strip(render, target, self.max_views))
        if self.enabled:
            self.writer.add_image("images/strip", strip, step, dataformats="HWC")
        if keep_frame:
            self.frames.append(strip)
        return strip

    def mesh(self, step: int, verts: Tensor, faces: Tensor, colors: Tensor | None = None) -> None:
        if not self.enabled:
            return
        kw = {}
        if colors is not None:
            kw["colors"] = (colors.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8)[None]
        self.writer.add_mesh("mesh/fitted", vertices=verts.detach().cpu().float()[None],
                             faces=faces.detach().cpu().int()[None], global_step=step, **kw)

    def hparams(self, config: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Flattened config -> final metrics in the HParams tab only. The metrics point at this run's own
        ``metric/<name>`` scalars (whose last value is the final one), so no extra ``hparam/*`` cards
        crowd the Time Series tab. Only for runs that logged something."""
        if self._writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        names = {f"metric/{k}": v for k, v in metrics.items() if _finite(v) is not None}
        for summary in hparams(flatten(config), names):
            self._writer.file_writer.add_summary(summary)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
