"""Differentiable soft rasterization over pixel-major pairs with the compiled kernels (raster/native.py).

One sweep computes a pixel's silhouette α and, when asked, its SoftRas blend of [depth, attributes]
directly from the per-(view, face) table and per-vertex attributes: no per-pair tensor is ever
formed, so memory follows pixels and faces, not pairs. The math is that of raster/soft.py and
raster/geometry.py (which stay the reference and the fallback), including the cutoff: a pair whose
pixel lies outside its triangle and farther than the cutoff radius contributes exactly nothing.

Derivatives are three autograd Functions. ``_Sweep``'s backward is ``_SweepVJP`` and its forward-mode
rule is ``_SweepJVP``; these two are linear maps (J and Jᵀ at the sweep's point), each the other's
transpose, so each one's backward is the other. That gives ``backward``, ``torch.func.vjp``/``jvp``/
``linearize`` and the "transpose" JVP (the VJP of a VJP) with one pair of kernels. Both recompute the
per-pair quantities from the inputs instead of saving them. Second derivatives with respect to the
geometry are not provided: the linear maps treat the point they were built at as constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import native


@dataclass(frozen=True)
class SweepSpec:
    """The non-differentiable arguments of a sweep: pairs (pixel-major), sizes and constants."""

    faces: Tensor       # (F, 3) int64
    runs: Tensor        # (R, 3) int64: view_face, first pixel, length
    band_off: Tensor    # (NB + 1,) int64: runs per band
    band_pairs: Tensor  # (NB + 1,) int64: cumulative pairs per band (splits the work over threads)
    dims: tuple[int, int, int, int, int, int]  # N*H*W, F, H, W, blend (0/1), band_rows
    consts: tuple[float, float, float]  # scale = ndc_per_px²/σ, squared cutoff radius (px²), 1/((far - near) γ)

    def args(self) -> tuple:
        return self.faces, self.runs, self.band_off, self.band_pairs, list(self.dims), list(self.consts)


def _zeros_if_none(t: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if t is None else t


class _Sweep(torch.autograd.Function):
    @staticmethod
    def forward(table: Tensor, attrs: Tensor, spec: SweepSpec):
        return torch.ops.diffrender.sweep_forward(table, attrs, *spec.args())

    @staticmethod
    def setup_context(ctx, inputs, output):
        table, attrs, spec = inputs
        _, out, state = output
        ctx.mark_non_differentiable(state)
        ctx.spec = spec
        ctx.save_for_backward(table, attrs, out, state)
        ctx.save_for_forward(table, attrs, out, state)

    @staticmethod
    def backward(ctx, g_alpha, g_out, _):
        table, attrs, out, state = (t.detach() for t in ctx.saved_tensors)
        g_table, g_attrs = _SweepVJP.apply(g_alpha, g_out, table, attrs, out, state, ctx.spec)
        return g_table, g_attrs, None

    @staticmethod
    def jvp(ctx, t_table, t_attrs, _):
        table, attrs, out, state = (t.detach() for t in ctx.saved_tensors)
        t_alpha, t_out = _SweepJVP.apply(_zeros_if_none(t_table, table), _zeros_if_none(t_attrs, attrs), table, attrs,
                                         out, state, ctx.spec)
        return t_alpha, t_out, None


class _Linear(torch.autograd.Function):
    """Shared plumbing of J and Jᵀ: linear in the first two inputs, the rest is the point (constants)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.point = inputs[2:]  # table, attrs, out, state, spec


class _SweepJVP(_Linear):
    @staticmethod
    def forward(t_table, t_attrs, table, attrs, out, state, spec):
        return torch.ops.diffrender.sweep_jvp(t_table, t_attrs, table, attrs, out, state, *spec.args())

    @staticmethod
    def backward(ctx, g_alpha, g_out):
        return *_SweepVJP.apply(g_alpha, g_out, *ctx.point), None, None, None, None, None

    @staticmethod
    def jvp(ctx, tt_table, tt_attrs, *_):
        table, attrs = ctx.point[0], ctx.point[1]
        return _SweepJVP.apply(_zeros_if_none(tt_table, table), _zeros_if_none(tt_attrs, attrs), *ctx.point)


class _SweepVJP(_Linear):
    @staticmethod
    def forward(g_alpha, g_out, table, attrs, out, state, spec):
        return torch.ops.diffrender.sweep_vjp(g_alpha, g_out, table, attrs, out, state, *spec.args())

    @staticmethod
    def backward(ctx, gg_table, gg_attrs):
        table, attrs = ctx.point[0], ctx.point[1]
        return *_SweepJVP.apply(_zeros_if_none(gg_table, table), _zeros_if_none(gg_attrs, attrs), *ctx.point), \
            None, None, None, None, None

    @staticmethod
    def jvp(ctx, tg_alpha, tg_out, *_):
        out, state = ctx.point[2], ctx.point[3]
        if tg_alpha is None:
            tg_alpha = out.new_zeros(state.shape[1])
        return _SweepVJP.apply(tg_alpha, _zeros_if_none(tg_out, out), *ctx.point)


def sweep(table: Tensor, attrs: Tensor, spec: SweepSpec) -> tuple[Tensor, Tensor]:
    """α (N*H*W,) and blended [depth, attributes] (N*H*W, 1 + C) (empty without blending).

    table: (N*F, 19) row-major per-(view, face) table (differentiable); attrs: (V, C) per-vertex
    attributes (differentiable; C may be 0).
    """
    alpha, out, _ = _Sweep.apply(table, attrs, spec)
    return alpha, out
