"""Explicit access to the Jacobian of a Problem's whitened residuals: entries, rows, columns, the block of
one parameter, the dense matrix of a small problem, and the Gauss-Newton/Newton gap.

Everything comes from the products of the problem's :class:`~diffrender.linalg.operator.JacobianOperator`
(``J~``: weights and robust-loss corrections included, the matrix the solvers use), so a column is one JVP
(forward mode) and a row one VJP (reverse mode).  Row ``i`` is residual ``i`` of the blocks concatenated in
dict order (:class:`ResidualLayout` names them); column ``j`` is tangent coordinate ``j`` of the parameters
in dict order (``problem.layout(x)``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from diffrender.linalg.operator import Counters
from diffrender.problem import Linearization, ParamLayout, Problem

__all__ = ["ResidualLayout", "ProductOperator", "RowMaskedOperator", "DenseJacobian", "Jacobian", "GaussNewtonGap",
           "gauss_newton_gap"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResidualLayout:
    """Where each named residual block lives in the flat residual ``r: (m,)`` (blocks in dict order)."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, blocks: dict[str, Tensor]) -> ResidualLayout:
        return cls(tuple(blocks), tuple(b.shape for b in blocks.values()))

    @property
    def m(self) -> int:
        """Total number of scalar residuals."""
        return sum(math.prod(s) for s in self.shapes)

    def slices(self) -> dict[str, slice]:
        """Block name -> slice of the flat residual."""
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = math.prod(shape)
            out[name] = slice(start, start + size)
            start += size
        return out

    def split(self, r: Tensor) -> dict[str, Tensor]:
        """Flat ``r: (m,)`` -> dict of blocks in their own shapes (e.g. a silhouette block ``(N, H, W)``)."""
        return {name: r[sl].reshape(shape)
                for (name, sl), shape in zip(self.slices().items(), self.shapes, strict=True)}

    def mask(self, blocks: Sequence[str], like: Tensor) -> Tensor:
        """``(m,)`` of ones on the rows of ``blocks`` and zeros elsewhere (``like``'s dtype and device)."""
        check_names(blocks, self.names, "residual block")
        out = torch.zeros(self.m, dtype=like.dtype, device=like.device)
        for name, sl in self.slices().items():
            if name in blocks:
                out[sl] = 1
        return out


def check_names(given: Sequence[str], known: Sequence[str], what: str) -> None:
    """ValueError naming the unknown entries of ``given`` and the known ones."""
    unknown = [g for g in given if g not in known]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; this problem has {list(known)}")


def unit_products(apply: Callable[[Tensor], Tensor], dim: int, indices: Sequence[int], like: Tensor,
                  chunk: int) -> Tensor:
    """``apply(e_i)`` for each ``i`` in ``indices`` (unit vectors of length ``dim``), stacked as columns
    ``(out, len(indices))``.  Batched by ``torch.func.vmap`` in chunks of ``chunk`` when ``apply`` supports it
    (one pass per chunk; memory grows with the chunk), else one product at a time."""
    idx = torch.as_tensor(list(indices), dtype=torch.long, device=like.device)
    if idx.numel() == 0:
        raise ValueError("unit_products: no indices")
    outs: list[Tensor] = []
    batched = chunk > 1 and idx.numel() > 1
    if batched:  # one plain product first: what an operator sets up on first use must not be built under vmap
        e0 = torch.zeros(dim, dtype=like.dtype, device=like.device)
        e0[idx[0]] = 1
        outs.append(apply(e0)[:, None])
        idx = idx[1:]
    for start in range(0, idx.numel(), max(chunk, 1)):
        part = idx[start:start + max(chunk, 1)]
        eye = torch.zeros(part.numel(), dim, dtype=like.dtype, device=like.device)
        eye[torch.arange(part.numel(), device=like.device), part] = 1
        if batched:
            try:
                outs.append(torch.func.vmap(apply)(eye).T)
                continue
            except Exception:  # noqa: BLE001 - not vmappable (e.g. a custom autograd.Function): loop
                batched = False
        outs.append(torch.stack([apply(e) for e in eye], dim=1))
    return torch.cat(outs, dim=1)


class ProductOperator(Protocol):
    """What this package needs of a Jacobian operator: ``J~`` applied by products (``JacobianOperator``,
    a stack of them, or :class:`RowMaskedOperator`)."""

    n: int
    m: int
    x0: Tensor
    counters: Counters

    def jvp(self, u: Tensor) -> Tensor: ...

    def vjp(self, w: Tensor) -> Tensor: ...

    def jtj(self, v: Tensor) -> Tensor: ...

    def diag_exact(self) -> Tensor: ...

    def diag_hutchinson(self, probes: int, generator: torch.Generator | None = None) -> Tensor: ...


@contextmanager
def counted(counters: Counters, *, jvps: int = 0, vjps: int = 0) -> Iterator[None]:
    """Count exactly ``jvps`` JVPs and ``vjps`` VJPs for the products made inside (a ``vmap``-ed product
    counts once however many vectors it applies to)."""
    before = counters.snapshot()
    yield
    counters.jvps, counters.vjps = before.jvps + jvps, before.vjps + vjps


class RowMaskedOperator:
    """``diag(mask) J~`` for an operator of ``J~`` (``mask: (m,)``, e.g. ones on the rows of chosen residual
    blocks and zeros elsewhere), applied through its products: the same interface as
    :class:`~diffrender.linalg.operator.JacobianOperator` as far as this package uses it."""

    def __init__(self, op: ProductOperator, mask: Tensor) -> None:
        if mask.shape != (op.m,):
            raise ValueError(f"RowMaskedOperator: mask must be ({op.m},), got {tuple(mask.shape)}")
        self.op, self.mask = op, mask
        self.n, self.m, self.x0, self.counters = op.n, op.m, op.x0, op.counters

    def jvp(self, u: Tensor) -> Tensor:
        return self.op.jvp(u) * self.mask

    def vjp(self, w: Tensor) -> Tensor:
        return self.op.vjp(w * self.mask)

    def jtj(self, v: Tensor) -> Tensor:
        return self.vjp(self.jvp(v))

    def diag_exact(self, chunk: int = 16) -> Tensor:
        """``diag(J~^T M J~): (n,)`` from ``n`` JVPs."""
        with counted(self.counters, jvps=self.n):
            cols = unit_products(self.jvp, self.n, range(self.n), self.x0, chunk)
        return (cols * cols).sum(0)

    def diag_hutchinson(self, probes: int, generator: torch.Generator | None = None) -> Tensor:
        """Hutchinson's ``mean_k (J~^T M s_k)^2`` for random signs ``s_k``, as the plain operator does."""
        acc = torch.zeros(self.n, dtype=self.x0.dtype, device=self.x0.device)
        for _ in range(probes):
            s = torch.randint(0, 2, (self.m,), generator=generator).to(device=self.x0.device, dtype=self.x0.dtype)
            acc += self.vjp(2 * s - 1) ** 2
        return acc / probes


@dataclass
class DenseJacobian:
    """The explicit ``J~: (m, n)``; ``mode`` is ``"forward"`` (n JVPs, one per column) or ``"reverse"``
    (m VJPs, one per row), ``reason`` says why, ``products`` how many were made."""

    matrix: Tensor
    mode: str
    products: int
    reason: str


class Jacobian:
    """The Jacobian ``J~`` of a problem's whitened residuals at ``x``, with names for rows and columns.

    ``ctx`` is the result of ``problem.prepare_context(x)`` (computed when not given); ``lin`` an existing
    linearization at ``x`` to reuse.  Building it costs one linearization (one forward pass plus the VJP
    graph) and one more residual evaluation for the block shapes.
    """

    def __init__(self, problem: Problem, x: dict[str, Tensor], ctx: Any = None, *,
                 lin: Linearization | None = None, jvp_mode: str = "transpose") -> None:
        self.problem = problem
        self.x = {k: v.detach() for k, v in x.items()}
        self.ctx = problem.prepare_context(self.x) if ctx is None else ctx
        self.lin = lin if lin is not None else problem.linearize(self.x, self.ctx, jvp_mode=jvp_mode)
        self.op: ProductOperator = self.lin.op
        self.params: ParamLayout = problem.layout(self.x)
        with torch.no_grad():
            blocks = problem.residual_blocks(self.x, self.ctx)
        self.residuals = ResidualLayout.of(blocks)
        if self.residuals.m != self.op.m:
            raise ValueError(f"Jacobian: residual blocks hold {self.residuals.m} values but the operator has "
                             f"{self.op.m} rows")

    @property
    def n(self) -> int:
        """Tangent dimension (columns)."""
        return self.op.n

    @property
    def m(self) -> int:
        """Number of residuals (rows)."""
        return self.op.m

    # -------------------------------------------------------------- indices
    def param_index(self, name: str, index: int | Sequence[int] = 0) -> int:
        """Column of tangent coordinate ``index`` of parameter ``name`` (a flat index, or an index tuple
        into the parameter's shape when its tangent has as many elements as the parameter)."""
        check_names([name], self.params.names, "parameter")
        sl = self.params.slices()[name]
        k = self.params.names.index(name)
        size, shape = self.params.sizes[k], self.params.shapes[k]
        flat = index if isinstance(index, int) else _ravel(index, shape if size == math.prod(shape) else (size,))
        if not 0 <= flat < size:
            raise IndexError(f"parameter '{name}' has {size} tangent coordinates; index {index} is out of range")
        return sl.start + flat

    def residual_index(self, block: str, index: int | Sequence[int] = 0) -> int:
        """Row of element ``index`` (flat, or an index tuple into the block's shape) of residual ``block``."""
        check_names([block], self.residuals.names, "residual block")
        sl = self.residuals.slices()[block]
        shape = self.residuals.shapes[self.residuals.names.index(block)]
        flat = index if isinstance(index, int) else _ravel(index, shape)
        if not 0 <= flat < sl.stop - sl.start:
            raise IndexError(f"residual block '{block}' has shape {tuple(shape)}; index {index} is out of range")
        return sl.start + flat

    # -------------------------------------------------------------- products
    def _unit(self, k: int, size: int) -> Tensor:
        e = torch.zeros(size, dtype=self.op.x0.dtype, device=self.op.x0.device)
        e[k] = 1
        return e

    def column(self, j: int) -> Tensor:
        """Column ``J~[:, j]: (m,)``: one JVP."""
        _check_range(j, self.n, "column")
        return self.op.jvp(self._unit(j, self.n))

    def row(self, i: int) -> Tensor:
        """Row ``J~[i, :]: (n,)``: one VJP."""
        _check_range(i, self.m, "row")
        return self.op.vjp(self._unit(i, self.m))

    def entry(self, i: int, j: int) -> float:
        """``J~[i, j]``: one product, a VJP (the reused reverse-mode graph is the cheaper side)."""
        _check_range(j, self.n, "column")
        return float(self.row(i)[j])

    def apply(self, v: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        """``J~ v`` split into residual blocks in their own shapes: how every residual moves when the
        parameters move along ``v`` (a flat tangent ``(n,)`` or a dict of per-parameter pieces).  For an
        image block this is the sensitivity image ``d image / d v``.  One JVP."""
        if isinstance(v, dict):
            v = self.params.join({name: v.get(name, torch.zeros(s, dtype=self.op.x0.dtype,
                                                                 device=self.op.x0.device))
                                  for name, s in zip(self.params.names, self.params.sizes, strict=True)})
        return self.residuals.split(self.op.jvp(v))

    def columns(self, cols: Sequence[int], *, chunk: int = 16) -> Tensor:
        """``J~[:, cols]: (m, len(cols))``: one JVP per column, batched by ``vmap`` in chunks of ``chunk``."""
        for j in cols:
            _check_range(j, self.n, "column")
        with counted(self.op.counters, jvps=len(cols)):
            return unit_products(self.op.jvp, self.n, cols, self.op.x0, chunk)

    def rows(self, rows: Sequence[int], *, chunk: int = 16) -> Tensor:
        """``J~[rows, :]: (len(rows), n)``: one VJP per row, batched by ``vmap`` in chunks of ``chunk``."""
        for i in rows:
            _check_range(i, self.m, "row")
        with counted(self.op.counters, vjps=len(rows)):
            return unit_products(self.op.vjp, self.m, rows, self.op.x0, chunk).T

    def param_block(self, name: str, *, chunk: int = 16) -> Tensor:
        """``J~[:, cols(name)]: (m, n_name)``, the columns of one parameter: ``n_name`` JVPs (forward
        mode) or, when there are fewer residuals than those columns, ``m`` VJPs (reverse mode)."""
        check_names([name], self.params.names, "parameter")
        sl = self.params.slices()[name]
        if sl.stop - sl.start <= self.m:
            return self.columns(range(sl.start, sl.stop), chunk=chunk)
        return self.rows(range(self.m), chunk=chunk)[:, sl]

    def dense(self, mode: str = "auto", *, chunk: int = 16) -> DenseJacobian:
        """The explicit ``J~: (m, n)`` of a small problem.  ``mode="auto"`` builds it column by column
        (forward mode, ``n`` JVPs) when ``n <= m`` and row by row (reverse mode, ``m`` VJPs) otherwise,
        and logs which; ``"forward"`` / ``"reverse"`` force one.  Memory ``m n``."""
        if mode not in ("auto", "forward", "reverse"):
            raise ValueError(f"Jacobian.dense: mode must be 'auto', 'forward' or 'reverse', got {mode!r}")
        if mode == "auto":
            mode = "forward" if self.n <= self.m else "reverse"
            reason = (f"forward mode: {self.n} JVPs, one per column, since n = {self.n} <= m = {self.m}"
                      if mode == "forward" else
                      f"reverse mode: {self.m} VJPs, one per row, since m = {self.m} < n = {self.n}")
        else:
            reason = f"{mode} mode as asked ({self.n if mode == 'forward' else self.m} products)"
        log.info("Jacobian.dense: %s", reason)
        if mode == "forward":
            return DenseJacobian(self.columns(range(self.n), chunk=chunk), mode, self.n, reason)
        return DenseJacobian(self.rows(range(self.m), chunk=chunk), mode, self.m, reason)


    def gram(self, rows: Sequence[int] | None = None, *, max_elements: int = 2**25,
             chunk: int = 16) -> tuple[Tensor, str]:
        """``J~^T J~: (n, n)`` in float64 (over ``rows`` only, when given: the others must be zero rows) and
        how it was built: from the explicit ``J~`` (``n`` JVPs, or ``m`` VJPs when there are fewer rows)
        when it has at most ``max_elements`` entries, else column by column as ``J~^T (J~ e_j)`` (``n`` JVPs
        and ``n`` VJPs, but only ``n^2`` memory)."""
        rows = range(self.m) if rows is None else rows
        if len(rows) * self.n <= max_elements:
            if self.n <= len(rows):
                j, how = self.columns(range(self.n), chunk=chunk), f"{self.n} JVPs (columns of J)"
            else:
                j, how = self.rows(rows, chunk=chunk), f"{len(rows)} VJPs (rows of J)"
            j = j.to(torch.float64)
            return j.T @ j, how
        with counted(self.op.counters, jvps=self.n, vjps=self.n):
            a = unit_products(self.op.jtj, self.n, range(self.n), self.op.x0, chunk).to(torch.float64)
        return 0.5 * (a + a.T), (f"{self.n} JVPs + {self.n} VJPs (columns of JᵀJ; J would hold "
                                 f"{len(rows) * self.n} entries)")


def _ravel(index: Sequence[int], shape: Sequence[int]) -> int:
    if len(index) != len(shape):
        raise IndexError(f"index {tuple(index)} does not match shape {tuple(shape)}")
    flat = 0
    for i, s in zip(index, shape, strict=True):
        if not -s <= i < s:
            raise IndexError(f"index {tuple(index)} is out of range for shape {tuple(shape)}")
        flat = flat * s + (i % s)
    return flat


def _check_range(k: int, size: int, what: str) -> None:
    if not 0 <= k < size:
        raise IndexError(f"{what} {k} is out of range (0..{size - 1})")


@dataclass
class GaussNewtonGap:
    """``gap = ||(H - J~^T J~) v||`` with ``H`` the exact Hessian of the cost; ``relative = gap / ||H v||``.

    Small relative gaps mean Gauss-Newton's model is nearly Newton's along ``v``; large ones come from
    large residuals times residual curvature (``sum_i r_i grad^2 r_i``) or from robust losses.
    """

    gap: float
    relative: float
    hv_norm: float
    jtjv_norm: float


def gauss_newton_gap(problem: Problem, x: dict[str, Tensor], v: Tensor, ctx: Any = None, *,
                     lin: Linearization | None = None) -> GaussNewtonGap:
    """The part of Newton's Hessian that the Gauss-Newton model drops, applied to ``v: (n,)``: one
    Hessian-vector product (forward over reverse) and one ``J~^T J~`` product.  ``ctx`` as in ``problem``."""
    lin = lin if lin is not None else problem.linearize(x, ctx)
    hv = lin.hessian().hvp(v)  # at lin's point and prepared context
    gv = lin.op.jtj(v)
    gap = float(torch.linalg.vector_norm(hv - gv))
    hn = float(torch.linalg.vector_norm(hv))
    return GaussNewtonGap(gap, gap / hn if hn > 0 else (0.0 if gap == 0 else math.inf), hn,
                          float(torch.linalg.vector_norm(gv)))
