"""Fused signed squared distance from pixel centers to their triangles, with hand-written derivatives.

This is the hot loop of every silhouette render. Written with plain tensor ops, autograd records
some twenty (3, P)-sized intermediates and replays twice as many in the backward pass. The
derivative of d² = min_k min_{t∈[0,1]} |d_k - t e_k|² only needs the winning edge k* and its
residual r = d_k* - t* e_k* (Danskin's theorem: the inner minimizers are held fixed), so forward
saves three (P,) vectors and both backward and JVP are a handful of (P,)-sized ops:

    ∂d²/∂s_k* = -2 r,    ∂d²/∂e_k* = -2 t* r    (s: edge start, e: edge vector, d = p - s).

A new-style ``torch.autograd.Function`` (``setup_context``, ``jvp``, generated vmap rule) so it works
with ``backward``, ``torch.func.vjp/jvp/linearize`` and ``vmap``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class _SignedDistance(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(geo: Tensor, index: Tensor, px: Tensor, py: Tensor, inv_len2: Tensor, inv_area: Tensor,
                scale: float, r2: float):
        sx, sy, ex, ey = geo.index_select(1, index).split(3)
        dx = px - sx
        dy = py - sy
        s = (ex * dy - ey * dx) * inv_area  # barycentrics: all >= 0 inside (rows spelled out: reductions
        inside = (s[0] >= 0) & (s[1] >= 0) & (s[2] >= 0)  # over a size-3 axis are slow on CPU)
        t = ((ex * dx + ey * dy) * inv_len2).clamp_(0, 1)
        rx = dx - t * ex
        ry = dy - t * ey
        d2 = rx * rx + ry * ry
        d01 = torch.minimum(d2[0], d2[1])
        dmin = torch.minimum(d01, d2[2])
        k = torch.where(d2[2] < d01, 2, (d2[1] < d2[0]).long()).unsqueeze(0)
        # (python scalars in torch.where would make a default-dtype tensor: float32 rounding of the scale)
        signed = torch.where(inside, geo.new_tensor(scale), geo.new_tensor(-scale))
        # Position of (row k*, column index) of geo viewed flat; rows 3, 6, 9 further are sy, ex, ey.
        flat = k.squeeze(0) * geo.shape[1] + index
        return (dmin * signed, rx.gather(0, k).squeeze(0), ry.gather(0, k).squeeze(0),
                t.gather(0, k).squeeze(0), signed, flat, inside | (dmin <= r2))

    @staticmethod
    def setup_context(ctx, inputs, output):
        geo = inputs[0]
        _, rx, ry, t, signed, flat, keep = output
        ctx.mark_non_differentiable(rx, ry, t, signed, flat, keep)
        ctx.geo_shape = geo.shape
        ctx.save_for_backward(rx, ry, t, signed, flat)
        ctx.save_for_forward(rx, ry, t, signed, flat)

    @staticmethod
    def backward(ctx, grad, *_):
        rx, ry, t, signed, flat = ctx.saved_tensors
        stride = 3 * ctx.geo_shape[1]
        c = -2 * grad * signed
        gsx, gsy = c * rx, c * ry
        values = torch.cat([gsx, gsy, gsx * t, gsy * t])
        positions = torch.cat([flat, flat + stride, flat + 2 * stride, flat + 3 * stride])
        n = ctx.geo_shape[0] * ctx.geo_shape[1]
        grad_geo = torch.zeros(n, dtype=grad.dtype, device=grad.device).index_add(0, positions, values)
        return grad_geo.view(ctx.geo_shape), None, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, geo_t, *_):
        rx, ry, t, signed, flat = ctx.saved_tensors
        stride = 3 * ctx.geo_shape[1]
        tg = geo_t.reshape(-1)
        tsx, tsy = tg.index_select(0, flat), tg.index_select(0, flat + stride)
        tex, tey = tg.index_select(0, flat + 2 * stride), tg.index_select(0, flat + 3 * stride)
        d2_t = -2 * (rx * (tsx + t * tex) + ry * (tsy + t * tey))
        return d2_t * signed, None, None, None, None, None, None


def signed_distance2(geo: Tensor, index: Tensor, px: Tensor, py: Tensor, inv_len2: Tensor, inv_area: Tensor,
                     scale: float, r2: float = math.inf) -> tuple[Tensor, Tensor]:
    """δ · scale · d² (P,) for pixel centers (px, py) and the triangles ``geo[:, index]``, and whether
    each pixel is inside or within ``sqrt(r2)`` of its triangle (P,) bool.

    geo: (12, N*F) edge starts and edge vectors (differentiable); index: (P,) columns; inv_len2: (3, P)
    1/|e_k|²; inv_area: (1, P) 1/(2·area), used for its sign only; δ = +1 inside, -1 outside.
    """
    out = _SignedDistance.apply(geo, index, px, py, inv_len2, inv_area, scale, r2)
    return out[0], out[-1]
