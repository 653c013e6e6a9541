"""Hessian-vector products of a scalar function, never forming the Hessian.

For ``f: (n,) -> ()`` at ``x0``, ``H v = d/dt grad f(x0 + t v)`` at ``t = 0``: forward mode over reverse
mode (``torch.func.jvp`` of ``torch.func.grad``), one gradient-sized pass with dual numbers per product
(Pearlmutter 1994). For a least-squares cost ``1/2 ||r||^2`` this is the exact Hessian
``J^T J + sum_i r_i grad^2 r_i``, the matrix the Gauss-Newton model drops the second term of.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffrender.linalg.operator import Counters
from diffrender.linalg.reduction import IDENTITY, Reduction

__all__ = ["HessianOperator"]


class HessianOperator:
    """``v -> grad^2 f(x0) v`` for ``f: (n,) -> ()``; also ``gradient`` (``grad f(x0): (n,)``) and ``value``."""

    def __init__(self, fn: Callable[[Tensor], Tensor], x0: Tensor, *, counters: Counters | None = None,
                 reduction: Reduction = IDENTITY) -> None:
        if x0.dim() != 1:
            raise ValueError(f"HessianOperator: x0 must be a flat (n,) vector, got shape {tuple(x0.shape)}")
        self.fn = fn
        self.x0 = x0.detach()
        self.n = x0.numel()
        self.counters = counters if counters is not None else Counters()
        self._grad = torch.func.grad_and_value(fn)
        self.reduction = reduction  # fn is this process's share of a sharded cost: sum over processes
        gradient, value = self._grad(self.x0)
        self.gradient = reduction.sum(gradient.detach())
        self.value = reduction.sum(value.detach().reshape(1))[0]

    def hvp(self, v: Tensor) -> Tensor:
        """``H v``: ``v: (n,) -> (n,)``."""
        self.counters.hvps += 1
        return self.reduction.sum(torch.func.jvp(lambda x: self._grad(x)[0], (self.x0,), (v,))[1])

    def dense(self) -> Tensor:
        """The explicit symmetric ``H: (n, n)`` from ``n`` products (small ``n`` only)."""
        eye = torch.eye(self.n, dtype=self.x0.dtype, device=self.x0.device)
        h = torch.stack([self.hvp(eye[i]) for i in range(self.n)], dim=1)
        return 0.5 * (h + h.T)
