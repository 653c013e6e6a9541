"""The ``inspect`` group of ``scripts/fit.py``: what the Jacobian says about a fit, in TensorBoard and files.

App side (it may use the scene and the renderer; the generic tools are in :mod:`diffrender.inspection`).
:class:`FitInspector` is a solver callback: every ``every`` iterations it logs

* images ``sensitivity/<param>``: Jacobian columns reshaped as the image residual blocks (d image / d
  theta_j, one row per coordinate, views side by side, signed colormap: blue < 0 < red, each row scaled to
  its own max |value|); for a large parameter (a mesh's per-vertex offsets) the row shows J v along the
  least-constrained eigen-direction v instead, plus v itself drawn on the mesh as a normal displacement;
* scalars ``inspect/eig_min``, ``inspect/eig_max``, ``inspect/cond`` of ``J~^T J~`` and the same with
  ``_precond`` for the operator PCG sees (``inspect/rank_deficient`` = 1 instead of an infinite ``cond``),
  ``inspect/products`` and optionally ``inspect/gn_gap``;

and :meth:`FitInspector.finish` writes ``uncertainty.json`` (std per scalar parameter, per vertex for
meshes) and, for shape scenes, the mesh colored by per-vertex std (TensorBoard ``mesh/uncertainty`` and
``uncertainty_mesh.png``).  Its products are not counted in the solver's counters.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffrender.inspection import Jacobian, conditioning, covariance, gauss_newton_gap, solver_preconditioner
from diffrender.io import to_uint8, write_png
from diffrender.jsonable import jsonable

log = logging.getLogger("fit.inspect")

__all__ = ["FitInspector", "make_inspector", "signed_colormap", "sequential_colormap", "image_blocks",
           "per_vertex_std", "uncertainty_report"]


# ------------------------------------------------------------------------------------------ pictures
def signed_colormap(v: Tensor, scale: float | None = None) -> Tensor:
    """Values ``(...)`` -> colors ``(..., 3)`` in [0, 1]: white at 0, red for positive, blue for negative,
    saturated at ``±scale`` (default: the max |value|; all white when everything is 0)."""
    v = v.detach().to("cpu", torch.float32)
    s = float(v.abs().max()) if scale is None else float(scale)
    t = (v / s).clamp(-1, 1) if s > 0 else torch.zeros_like(v)
    pos, neg = t.clamp_min(0), (-t).clamp_min(0)
    # red (0.8, 0.1, 0.1) <- white -> blue (0.1, 0.2, 0.8)
    r = 1 - pos * 0.2 - neg * 0.9
    g = 1 - pos * 0.9 - neg * 0.8
    b = 1 - pos * 0.9 - neg * 0.2
    return torch.stack([r, g, b], dim=-1)


# a perceptually ordered dark-to-bright ramp (stops of matplotlib's "viridis")
_SEQ = torch.tensor([[0.267, 0.005, 0.329], [0.231, 0.322, 0.546], [0.128, 0.567, 0.551],
                     [0.369, 0.789, 0.383], [0.993, 0.906, 0.144]])


def sequential_colormap(t: Tensor) -> Tensor:
    """``t (...)`` in [0, 1] -> colors ``(..., 3)`` on a dark-purple-to-yellow ramp (linear between stops)."""
    t = t.detach().to("cpu", torch.float32).clamp(0, 1) * (len(_SEQ) - 1)
    i = t.floor().long().clamp(max=len(_SEQ) - 2)
    f = (t - i)[..., None]
    return _SEQ[i] * (1 - f) + _SEQ[i + 1] * f


def image_blocks(shapes: dict[str, torch.Size]) -> list[str]:
    """Names of residual blocks shaped like images: ``(N, H, W)`` or ``(N, H, W, C)``."""
    return [k for k, s in shapes.items() if len(s) == 3 or (len(s) == 4 and s[-1] in (1, 3))]


def _views(block: Tensor, max_views: int) -> Tensor:
    """An image block ``(N, H, W[, C])`` -> ``(min(N, max_views), H, W)``, colors averaged over channels."""
    b = block.detach()
    if b.dim() == 4:
        b = b.mean(-1)
    return b[:max_views]


def _row(images: Tensor) -> Tensor:
    """``(K, H, W)`` signed values -> one colored row ``(H, K W + K - 1, 3)`` with 1-px gray separators."""
    colored = signed_colormap(images)
    sep = torch.full((images.shape[1], 1, 3), 0.5)
    parts = []
    for i in range(colored.shape[0]):
        parts += [colored[i], sep]
    return torch.cat(parts[:-1], dim=1)


def _grid(rows: list[Tensor]) -> Tensor:
    """Rows ``(H_i, W_i, 3)`` stacked with 1-px separators, padded with white to the widest."""
    width = max(r.shape[1] for r in rows)
    out = []
    for r in rows:
        if r.shape[1] < width:
            r = torch.cat([r, torch.ones(r.shape[0], width - r.shape[1], 3)], dim=1)
        out += [r, torch.full((1, width, 3), 0.5)]
    return torch.cat(out[:-1], dim=0)


def _upscale(img: Tensor, min_px: int) -> Tensor:
    """Nearest-neighbour enlargement by the integer factor that makes the shorter side of a small image at
    least ``min_px`` (TensorBoard shows images at their own size)."""
    f = max(1, math.ceil(min_px / max(min(img.shape[0], img.shape[1]), 1)))
    return img.repeat_interleave(f, 0).repeat_interleave(f, 1) if f > 1 else img


def per_vertex_std(variance: Tensor) -> Tensor:
    """Per-vertex positional standard deviation ``sqrt(var_x + var_y + var_z)`` from ``(V, 3)`` variances."""
    return variance.reshape(-1, 3).clamp_min(0).sum(1).sqrt()


def render_vertex_colors(verts: Tensor, faces: Tensor, colors: Tensor, *, size: int = 256,
                         views: int = 4) -> Tensor:
    """The mesh with per-vertex ``colors (V, 3)``, lit, on white, from ``views`` azimuths around it, side by
    side: ``(size, views * size, 3)`` in [0, 1]."""
    from diffrender.camera import camera_from_look_at, orbit_eyes
    from diffrender.raster.shading import Lights
    from diffrender.render import RenderSettings, prepare, render

    verts = verts.detach()
    center = (verts.max(0).values + verts.min(0).values) / 2
    v = verts - center
    radius = float(v.norm(dim=1).max()) or 1.0
    eyes = orbit_eyes(views, 2.6 * radius, 20.0, azimuth_start_deg=30.0, dtype=v.dtype, device=v.device)
    cam = camera_from_look_at(eyes, fov_deg=50.0, height=size, width=size)
    settings = RenderSettings(sigma=1e-7, gamma=1e-4, background=(1.0, 1.0, 1.0), cull_backfaces=True)
    lights = Lights.create(ambient=(0.55,) * 3, directional_dirs=[(-0.3, -0.6, -0.7)],
                           directional_colors=[(0.5,) * 3], dtype=v.dtype, device=v.device)
    with torch.no_grad():
        pairs = prepare(v, faces, cam, settings)
        out = render(v, faces, cam, pairs, settings, colors=colors.to(v), lights=lights, outputs=("alpha", "rgb"))
    # crisp picture: undo the soft composite over white inside the silhouette (where two faces meet at an
    # edge, α = 1 - 0.5^2 would let the background through)
    a = out["alpha"][..., None]
    fg = (out["rgb"] - (1 - a)) / a.clamp_min(1e-6)
    rgb = torch.where(a > 0.5, fg, torch.ones_like(fg)).clamp(0, 1)
    return torch.cat(list(rgb.cpu()), dim=1)


# ------------------------------------------------------------------------------------------ the callback
@contextmanager
def _uncounted(problem: Any):
    """Leave the problem's product counters (which the solver reports) as they were."""
    saved = dataclasses.replace(problem.counters)
    try:
        yield
    finally:
        for f in dataclasses.fields(saved):
            setattr(problem.counters, f.name, getattr(saved, f.name))


def _finite(v: float) -> bool:
    return isinstance(v, float | int) and math.isfinite(v)


class FitInspector:
    """Solver callback of one stage: ``inspector(record, x, state)`` every iteration (work every
    ``cfg.every``-th iteration of the stage), ``finish(x_full)`` at the end.  TensorBoard steps are
    ``step_fn()`` when given (the fit's global step), else ``step_offset + record.iteration``.

    ``cfg``: the ``inspect`` config (``diffrender.config.InspectConfig`` fields); ``scene``: the Scene (for
    its mesh); ``problem``: this stage's Problem; ``writer``: a TensorBoard ``SummaryWriter`` or ``None``;
    ``out``: the run directory; ``x_full``: all current parameters (the stage's own are updated from the
    callback).  Never stops the solve, and a failed inspection only logs a warning.
    """

    def __init__(self, cfg: Any, scene: Any, problem: Any, writer: Any, out: str | Path, *,
                 x_full: dict[str, Tensor] | None = None, step_offset: int = 0,
                 step_fn: Callable[[], int] | None = None) -> None:
        self.cfg, self.scene, self.problem, self.writer = cfg, scene, problem, writer
        self.out = Path(out)
        self.x_full = dict(x_full or {})
        self.step_offset = int(step_offset)
        self.step_fn = step_fn
        self.x: dict[str, Tensor] | None = None
        self.step = self.step_offset
        self.last: dict[str, float] = {}
        self._warned = False

    # -------------------------------------------------------------- during the fit
    def __call__(self, record: Any, x: dict[str, Tensor], state: Any = None) -> bool:
        self.x = {k: v.detach() for k, v in x.items()}
        it = int(getattr(record, "iteration", 0) or 0)
        self.step = int(self.step_fn()) if self.step_fn is not None else self.step_offset + it
        every = int(self.cfg.every)
        if every > 0 and it % every == 0:
            try:
                with _uncounted(self.problem):
                    self.last = self.inspect(self.x, self.step)
            except Exception as err:  # noqa: BLE001 - inspection must never break a fit
                if not self._warned:
                    log.warning(f"inspect: skipped at iteration {it}: {type(err).__name__}: {err}")
                    self._warned = True
        return False

    def inspect(self, x: dict[str, Tensor], step: int) -> dict[str, float]:
        """Conditioning scalars and sensitivity images at ``x`` (logged at ``step``); returns the scalars."""
        cfg, t0 = self.cfg, time.perf_counter()
        jac = Jacobian(self.problem, x)
        products0 = jac.op.counters.jvps + jac.op.counters.vjps
        scalars: dict[str, float] = {}
        plain = None
        if cfg.conditioning:
            plain = conditioning(jac.op, steps=int(cfg.lanczos_steps), tol=float(cfg.lanczos_tol), seed=int(cfg.seed))
            scalars.update(_cond_scalars(plain, ""))
            if cfg.preconditioned:
                pre, kind = solver_preconditioner(self.problem, jac.x, jac.ctx, jac.op, seed=int(cfg.seed))
                c = conditioning(jac.op, precond=pre, preconditioner=kind, steps=int(cfg.lanczos_steps),
                                 tol=float(cfg.lanczos_tol), seed=int(cfg.seed))
                scalars.update(_cond_scalars(c, "_precond"))
            if cfg.gn_gap:
                gap = gauss_newton_gap(self.problem, jac.x, plain.smallest_vectors[:, 0], jac.ctx, lin=jac.lin)
                scalars["gn_gap"] = gap.relative
        if cfg.sensitivity:
            for tag, img in self.sensitivity_images(jac, plain).items():
                if self.writer is not None:
                    self.writer.add_image(tag, to_uint8(img), step, dataformats="HWC")
        scalars["products"] = float(jac.op.counters.jvps + jac.op.counters.vjps - products0)
        scalars["seconds"] = time.perf_counter() - t0
        if self.writer is not None:
            for k, v in scalars.items():
                if _finite(v):
                    self.writer.add_scalar(f"inspect/{k}", v, step)
        log.info("inspect: step %d %s", step, " ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
        return scalars

    def sensitivity_images(self, jac: Jacobian, plain: Any = None) -> dict[str, Tensor]:
        """``{"sensitivity/<param>": (H', W', 3) image}``; ``plain``: a Conditioning of ``J~^T J~`` whose
        least-constrained direction is shown for parameters with more than ``max_columns`` coordinates."""
        shapes = dict(zip(jac.residuals.names, jac.residuals.shapes, strict=True))
        blocks = image_blocks(shapes)
        if not blocks:
            return {}
        mv = int(self.cfg.max_views)
        out = {}
        slices = jac.params.slices()
        for name in jac.params.names:
            sl = slices[name]
            size = sl.stop - sl.start
            rows = []
            if size <= int(self.cfg.max_columns):
                cols = jac.columns(range(sl.start, sl.stop))
                for j in range(size):
                    parts = jac.residuals.split(cols[:, j])
                    rows += [_row(_views(parts[b], mv)) for b in blocks]
            elif plain is not None:
                v = torch.zeros_like(jac.op.x0)
                v[sl] = plain.smallest_vectors[sl, 0]
                parts = jac.apply(v)
                rows += [_row(_views(parts[b], mv)) for b in blocks]
                disp = self.displacement_image(name, plain.smallest_vectors[sl, 0])
                if disp is not None:
                    rows.append(disp)
            if rows:
                out[f"sensitivity/{name}"] = _upscale(_grid(rows), min_px=96)
        return out

    def _mesh(self, x: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor] | None:
        if getattr(self.scene, "mesh_fn", None) is None:
            return None
        full = {**self.x_full, **(x if x is not None else (self.x or {}))}
        try:
            verts, faces, _ = self.scene.mesh_fn(full)
        except KeyError:
            return None
        return verts.detach(), faces

    def displacement_image(self, name: str, direction: Tensor) -> Tensor | None:
        """A per-vertex direction ``(V * 3,)`` drawn on the mesh: color = its normal component (signed)."""
        mesh = self._mesh()
        if mesh is None or direction.numel() != mesh[0].numel():
            return None
        from diffrender.mesh import vertex_normals

        verts, faces = mesh
        normal = (direction.reshape(-1, 3).to(verts) * vertex_normals(verts, faces)).sum(1)
        size = max(self.problem_image_size(), default=128)
        return render_vertex_colors(verts, faces, signed_colormap(normal).to(verts), size=size,
                                    views=int(self.cfg.max_views))

    def problem_image_size(self) -> list[int]:
        target = getattr(self.scene, "target", {}) or {}
        return [int(t.shape[1]) for t in target.values() if t.dim() >= 3]

    # -------------------------------------------------------------- at the end
    def finish(self, x_full: dict[str, Tensor]) -> list[str]:
        """``uncertainty.json`` (and the std-colored mesh for shape scenes) at the fitted ``x_full``; returns
        the files written.  Does nothing when ``uncertainty`` is off or no iteration was seen."""
        if not self.cfg.uncertainty or self.x is None:
            return []
        try:
            with _uncounted(self.problem):
                return self._finish(x_full)
        except Exception as err:  # noqa: BLE001 - the fit's own outputs matter more
            log.warning(f"inspect: uncertainty not computed: {type(err).__name__}: {err}")
            return []

    def _finish(self, x_full: dict[str, Tensor]) -> list[str]:
        cfg, t0 = self.cfg, time.perf_counter()
        xs = {k: x_full[k].detach() for k in self.x}
        ctx = self.problem.prepare_context(xs)
        with torch.no_grad():
            sizes = {k: v.numel() for k, v in self.problem.residual_blocks(xs, ctx).items()}
        if cfg.blocks is not None:
            blocks = [str(b) for b in cfg.blocks]
        else:
            blocks = [b for b in sizes if b not in set(cfg.regularizers)] or list(sizes)
        scaled = bool(cfg.residual_variance)
        m, n = sum(sizes.get(b, 0) for b in blocks), self.problem.layout(xs).n
        if scaled and m <= n:
            log.warning(f"inspect: {m} residuals in {blocks} for {n} parameters: no residual variance "
                        "2 cost / (m - n); the covariance assumes unit residual noise")
            scaled = False
        unc = covariance(self.problem, xs, ctx, blocks=blocks, residual_variance=scaled,
                         dense_max=int(cfg.dense_max), probes=int(cfg.probes),
                         max_cg_iterations=int(cfg.max_cg_iterations), seed=int(cfg.seed))
        if unc.rank_deficient or "stopped" in unc.message:
            log.warning(f"inspect: {unc.message}")
        mesh = self._mesh(xs)
        data, vertex_std, unobservable = uncertainty_report(unc, mesh[0].shape[0] if mesh is not None else -1)
        files = ["uncertainty.json"]
        if vertex_std is not None and mesh is not None:
            verts, faces = mesh
            top = float(vertex_std.quantile(0.98))  # a few extreme vertices would make the rest one color
            colors = sequential_colormap(vertex_std / top if top > 0 else vertex_std)
            colors[unobservable] = torch.tensor([0.85, 0.1, 0.1])  # in the null space: no finite std
            data["mesh_colors"] = {"colormap": "viridis-like from 0 (dark) to bright_at (yellow)", "bright_at": top,
                                   "red": "vertices mostly in the null space (unobservable)"}
            if self.writer is not None:
                self.writer.add_mesh("mesh/uncertainty", vertices=verts.cpu().float()[None],
                                     faces=faces.cpu().int()[None],
                                     colors=(colors * 255).round().to(torch.uint8)[None], global_step=self.step)
            img = render_vertex_colors(verts, faces, colors.to(verts))
            bar = sequential_colormap(torch.linspace(0, 1, img.shape[1]))[None].expand(12, -1, -1)
            write_png(self.out / "uncertainty_mesh.png", torch.cat([img, torch.ones(4, img.shape[1], 3), bar]))
            files.append("uncertainty_mesh.png")
        data.update(seconds=time.perf_counter() - t0, products=unc.products)
        (self.out / "uncertainty.json").write_text(json.dumps(jsonable(data, digits=7), indent=1))
        log.info(f"inspect: uncertainty ({unc.method}, blocks {', '.join(unc.blocks)}, sigma2 {unc.sigma2:.3g}) "
                 f"in {time.perf_counter() - t0:.1f} s -> {', '.join(files)}")
        return files


MAX_NULL_DIRECTIONS = 10  # listed in uncertainty.json (all are counted)


def uncertainty_report(unc: Any, n_verts: int = -1) -> tuple[dict[str, Any], Tensor | None, Tensor | None]:
    """The contents of ``uncertainty.json`` for an :class:`~diffrender.inspection.Uncertainty`, plus, for
    the first ``(n_verts, 3)`` parameter, its per-vertex std ``(V,)`` and a mask ``(V,)`` of vertices whose
    coordinates lie mostly (> 50 %) in the null space (``None`` when there is no such parameter)."""
    std = unc.std()
    null_frac = unc.layout.split(unc.null_fraction) if unc.null_fraction is not None else None
    params: dict[str, Any] = {}
    vertex_std = unobservable = None
    for name, shape in zip(unc.layout.names, unc.layout.shapes, strict=True):
        entry: dict[str, Any] = {"shape": list(shape)}
        per_vertex = len(shape) == 2 and shape[1] == 3 and shape[0] == n_verts
        nf = null_frac[name].reshape(-1, 3).max(1).values if null_frac is not None and per_vertex else None
        if std is not None and per_vertex:
            pv = per_vertex_std(std[name] ** 2)
            entry.update(per_vertex_std=pv.tolist(), max=float(pv.max()), median=float(pv.median()))
            if vertex_std is None:
                vertex_std = pv.cpu()
                unobservable = (nf > 0.5).cpu() if nf is not None else torch.zeros(pv.numel(), dtype=torch.bool)
        elif std is not None:
            entry["std"] = std[name].tolist()
        if null_frac is not None and unc.rank_deficient:
            entry["null_fraction"] = (nf if nf is not None else null_frac[name]).tolist()
        params[name] = entry
    d = unc.null_space.shape[1]
    null = [{k: v.tolist() for k, v in unc.layout.split(unc.null_space[:, i]).items()}
            for i in range(min(d, MAX_NULL_DIRECTIONS))]
    data = {
        "method": unc.method, "blocks": list(unc.blocks), "scale": unc.scale, "sigma2": unc.sigma2,
        "m": unc.m, "n": unc.n, "rank": unc.rank, "rank_deficient": unc.rank_deficient, "cond": unc.cond,
        "message": unc.message, "parameters": params, "null_directions": d, "null_space": null,
        "per_vertex_std": "sqrt(var_x + var_y + var_z) of each vertex's 3 coordinates",
        "null_fraction": "per coordinate (per vertex: the max over its 3) squared norm in the null space, "
                         "1 = unobservable; its std is then not meaningful",
    }
    if unc.std_error is not None and unc.variance is not None:
        data["relative_std_error_of_variance_median"] = float(
            (unc.std_error / unc.variance.abs().clamp_min(1e-300)).median())
    return data, vertex_std, unobservable


def _cond_scalars(c: Any, suffix: str) -> dict[str, float]:
    out = {f"eig_min{suffix}": c.eig_min, f"eig_max{suffix}": c.eig_max}
    if c.rank_deficient:
        out[f"rank_deficient{suffix}"] = 1.0
    else:
        out[f"cond{suffix}"] = c.cond
    return out


def make_inspector(cfg: Any, scene: Any, problem: Any, writer: Any, out: str | Path, **kw: Any) -> FitInspector | None:
    """A :class:`FitInspector` when ``cfg`` (the ``inspect`` config, may be ``None``) is enabled, else ``None``."""
    if cfg is None or not getattr(cfg, "enabled", False):
        return None
    return FitInspector(cfg, scene, problem, writer, out, **kw)
