"""Differentiable soft rasterization over run-length pairs with the compiled kernels (raster/native.py).

One sweep computes each pixel's silhouette α and, when asked, its SoftRas blend of [depth, attributes]
directly from the projected vertices and per-vertex attributes: no per-pair tensor is ever formed, so
memory follows pixels and vertices, not pairs. The math is that of raster/geometry.py and
raster/soft.py (which stay the reference and the fallback), including the cutoff: a pair whose pixel
lies outside its triangle and farther than the cutoff radius contributes exactly nothing.

Derivatives are three autograd Functions. ``_Sweep``'s backward is ``_SweepVJP`` and its forward-mode
rule is ``_SweepJVP``; these two are linear maps (J and Jᵀ at the sweep's point), each the other's
transpose, so each one's backward is the other. That gives ``backward``, ``torch.func.vjp``/``jvp``/
``linearize`` and the "transpose" JVP (the VJP of a VJP) with one pair of kernels. With blending they
recompute the per-pair quantities at every product; a silhouette sweep's first product at a point keeps
them as explicit per-pair coefficients instead (raster/native.py's ``_LinearCache``), and every later
product there is one gather-scatter pass. ``vmap`` (a dense Jacobian's columns) comes from the custom ops'
rules. Not provided: second derivatives with respect to the geometry (the linear maps treat the point they
were built at as constant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import native  # noqa: F401  (registers the torch.ops.diffrender custom ops)


@dataclass(frozen=True)
class SweepSpec:
    """The non-differentiable arguments of a sweep: faces, pairs (runs), sizes and constants."""

    faces: Tensor       # (F, 3) int64
    runs: Tensor        # (R, 3) int64: view_face, first pixel, length
    band_off: Tensor    # (NB + 1,) int64: runs per band
    band_pairs: Tensor  # (NB + 1,) int64: cumulative pairs per band (splits the work over threads)
    dims: tuple[int, int, int, int, int, int, int]  # N*H*W, F, H, W, blend (0/1), band_rows, cull (0/1)
    consts: tuple[float, float, float]  # ndc_per_px²/σ, squared cutoff radius (px²), 1/((far - near) γ)

    def args(self) -> tuple:
        return self.faces, self.runs, self.band_off, self.band_pairs, list(self.dims), list(self.consts)


def _or_zeros(t: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if t is None else t


class _Sweep(torch.autograd.Function):
    @staticmethod
    def forward(xy: Tensor, z: Tensor, attrs: Tensor, spec: SweepSpec):
        return torch.ops.diffrender.sweep_forward(xy, z, attrs, *spec.args())

    @staticmethod
    def setup_context(ctx, inputs, output):
        xy, z, attrs, spec = inputs
        _, out, state = output
        ctx.mark_non_differentiable(state)
        ctx.spec = spec
        ctx.save_for_backward(xy, z, attrs, out, state)
        ctx.save_for_forward(xy, z, attrs, out, state)

    @staticmethod
    def backward(ctx, g_alpha, g_out, _):
        point = tuple(t.detach() for t in ctx.saved_tensors)
        return *_SweepVJP.apply(g_alpha, g_out, *point, ctx.spec), None

    @staticmethod
    def jvp(ctx, t_xy, t_z, t_attrs, _):
        point = (*(t.detach() for t in ctx.saved_tensors), ctx.spec)
        return *_jvp_at(point, t_xy, t_z, t_attrs), None


class _SweepJVP(torch.autograd.Function):
    """J at the point (xy, z, attrs, out, state): linear in (t_xy, t_z, t_attrs)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(t_xy, t_z, t_attrs, xy, z, attrs, out, state, spec):
        return torch.ops.diffrender.sweep_jvp(t_xy, t_z, t_attrs, xy, z, attrs, out, state, *spec.args())

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.point = inputs[3:]  # xy, z, attrs, out, state, spec

    @staticmethod
    def backward(ctx, g_alpha, g_out):
        return *_SweepVJP.apply(g_alpha, g_out, *ctx.point), None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, tt_xy, tt_z, tt_attrs, *_):
        return _jvp_at(ctx.point, tt_xy, tt_z, tt_attrs)


class _SweepVJP(torch.autograd.Function):
    """Jᵀ at the same point: linear in (g_alpha, g_out)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g_alpha, g_out, xy, z, attrs, out, state, spec):
        return torch.ops.diffrender.sweep_vjp(g_alpha, g_out, xy, z, attrs, out, state, *spec.args())

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.point = inputs[2:]  # xy, z, attrs, out, state, spec

    @staticmethod
    def backward(ctx, gg_xy, gg_z, gg_attrs):
        return *_jvp_at(ctx.point, gg_xy, gg_z, gg_attrs), None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, tg_alpha, tg_out, *_):
        out, state = ctx.point[3], ctx.point[4]
        tg_alpha = out.new_zeros(state.shape[1]) if tg_alpha is None else tg_alpha
        return _SweepVJP.apply(tg_alpha, _or_zeros(tg_out, out), *ctx.point)


def sweep(xy: Tensor, z: Tensor, attrs: Tensor, spec: SweepSpec) -> tuple[Tensor, Tensor]:
    """α (N*H*W,) and blended [depth, attributes] (N*H*W, 1 + C) (empty without blending).

    xy: (N, V, 2) pixel coordinates and z: (N, V) camera depths of the vertices; attrs: (V, C) per-vertex
    attributes (C may be 0). All three are differentiable.
    """
    alpha, out, _ = _Sweep.apply(xy, z, attrs, spec)
    return alpha, out


def _jvp_at(point: tuple, t_xy: Tensor | None, t_z: Tensor | None, t_attrs: Tensor | None) -> tuple[Tensor, Tensor]:
    """J (t_xy, t_z, t_attrs) at ``point = (xy, z, attrs, out, state, spec)``; a missing tangent is zero."""
    xy, z, attrs = point[:3]
    return _SweepJVP.apply(_or_zeros(t_xy, xy), _or_zeros(t_z, z), _or_zeros(t_attrs, attrs), *point)
