"""Matrix-free Jacobian operator: ``J u``, ``J^T w`` and ``J^T J v`` from JVPs and VJPs only.

For ``fn: (n,) -> (m,)`` at a point ``x0``, ``torch.func.vjp`` is built once and gives a reusable
``w -> J^T w``.  ``u -> J u`` comes, per ``mode``, from

* ``"linearize"``: ``torch.func.linearize`` traced once (lazily, at the first JVP): about one forward
  pass per product, but the traced graph keeps every intermediate it needs as a constant (13x the
  memory of a forward+backward on the 10^6-residual benchmark) and torch 2.13 sometimes miscompiles it,
  so each build is checked against ``torch.func.jvp`` once;
* ``"transpose"``: the VJP of the linear map ``w -> J^T w`` is ``u -> J u`` (the transpose trick), built
  once on the already-saved VJP graph: as fast as ``linearize`` there, at about the memory of one
  forward+backward; needs double-backward support (checked once per owner);
* ``"jvp"``: plain ``torch.func.jvp`` per product (re-runs the forward with dual numbers).

``J^T J v = J^T (J v)``: the Jacobian is never stored, except by :meth:`JacobianOperator.columns` for
small ``n`` (dense path, ``m x n`` memory).  If the chosen mode fails, products fall back to ``"jvp"``.

Several residual terms stack into a :class:`StackedOperator`; a term whose graph is not kept (bounded
memory) is a :class:`RecomputedJacobian`, rebuilt for each product and freed after it; a
:class:`~diffrender.linalg.reduction.Reduction` sums the stacked products over processes (sharded fits).
"""

from __future__ import annotations

import dataclasses
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffrender.linalg.reduction import IDENTITY, Reduction

__all__ = ["Counters", "JacobianOperator", "RecomputedJacobian", "StackedOperator"]


@dataclass
class Counters:
    """Running counts of the expensive calls (one instance per problem, shared with its operators).

    ``residual_evals``: residual-function calls for cost evaluation; ``linearizations``: operator builds
    (each traces the residual function: one forward for the VJP, one more for ``linearize`` on first use);
    ``jvps`` / ``vjps``: Jacobian products; ``hvps``: Hessian-vector products of the cost; ``rebuilds``:
    forwards recomputed by terms whose graphs are not kept (:class:`RecomputedJacobian`).
    """

    residual_evals: int = 0
    linearizations: int = 0
    jvps: int = 0
    vjps: int = 0
    hvps: int = 0
    rebuilds: int = 0

    def snapshot(self) -> Counters:
        return dataclasses.replace(self)

    def __sub__(self, other: Counters) -> Counters:
        return Counters(**{f.name: getattr(self, f.name) - getattr(other, f.name)
                           for f in dataclasses.fields(self)})


# Below this many columns, a loop of products is as fast as one vmapped pass, and it avoids vmap's
# one-time cost: the first vmap over some functions (a custom autograd.Function's generated rule)
# imports torch._dynamo, about a second per process. Operators can lower it (``vmap_min_columns``) where a
# batched product is cheaper than a loop however few the columns (the compiled sweeps' batched rules).
VMAP_MIN_COLUMNS = 8


class JacobianOperator:
    """The Jacobian ``J = d fn / d x`` at ``x0: (n,)``, applied only through products.

    ``row_scale: (m,) | None`` multiplies the rows (``J~ = diag(row_scale) J``), used for residual weights
    and robust-loss corrections.  ``value: (m,)`` is ``fn(x0)`` (unscaled).  If ``torch.func.linearize``
    fails to trace ``fn``, JVPs fall back to ``torch.func.jvp`` (one forward per product) and
    ``on_linearize_failure(err)`` is called once so the owner can skip that mode next time.
    ``mode="jvp"`` is cheapest when only a few products are needed (tracing costs tens of milliseconds of
    Python overhead); ``check=False`` skips the one-product check of the ``"transpose"`` mode.
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        x0: Tensor,
        *,
        row_scale: Tensor | None = None,
        counters: Counters | None = None,
        mode: str = "transpose",
        check: bool = True,
    ) -> None:
        if mode not in ("linearize", "transpose", "jvp"):
            raise ValueError(f"JacobianOperator: mode must be 'linearize', 'transpose' or 'jvp', got {mode!r}")
        if x0.dim() != 1:
            raise ValueError(f"JacobianOperator: x0 must be a flat (n,) vector, got shape {tuple(x0.shape)}")
        self.fn = fn
        self.x0 = x0.detach()
        self.n = x0.numel()
        self.counters = counters if counters is not None else Counters()
        self.counters.linearizations += 1
        value, self._vjp_fn = torch.func.vjp(fn, self.x0)
        if value.dim() != 1:
            raise ValueError(f"JacobianOperator: fn must return a flat (m,) vector, got {tuple(value.shape)}")
        self.value = value.detach()
        self.m = value.numel()
        self.row_scale = row_scale
        self.mode = mode
        self.check = check
        self.on_linearize_failure: Callable[[BaseException], None] | None = None
        # columns() tries one vmap-ed pass; a function without a vmap rule (e.g. a custom op) makes it fall back
        # to a loop, and the owner can set this False so that later operators skip the failing attempt
        self.vmap_columns = True
        self.vmap_min_columns = VMAP_MIN_COLUMNS
        self.on_vmap_failure: Callable[[], None] | None = None
        self._jvp_fn: Callable[[Tensor], Tensor] | None = None
        self._columns: Tensor | None = None

    # ------------------------------------------------------------------ raw products
    def _build_transpose(self) -> Callable[[Tensor], Tensor]:
        # w -> J^T w is linear, so its VJP is u -> (J^T)^T u = J u, evaluated on the saved VJP graph.
        w0 = torch.zeros_like(self.value)
        _, tr = torch.func.vjp(lambda w: self._vjp_fn(w)[0], w0)
        return lambda u: tr(u)[0]

    def _raw_jvp(self, u: Tensor) -> Tensor:
        self._prepare_jvp()
        if self._jvp_fn is not None:
            return self._jvp_fn(u)
        return torch.func.jvp(self.fn, (self.x0,), (u,))[1]

    def _prepare_jvp(self) -> None:
        """Build (and check) the prebuilt JVP map once, outside any vmap: a failure under vmap would be the
        vmap's, not the mode's."""
        if self._jvp_fn is None and self.mode != "jvp":
            try:
                if self.mode == "transpose":
                    jvp_fn = self._build_transpose()
                    if self.check:
                        self._check_linearized(jvp_fn)
                else:
                    with warnings.catch_warnings():  # torch.fx const-folding chatter; checked below instead
                        warnings.simplefilter("ignore", UserWarning)
                        _, jvp_fn = torch.func.linearize(self.fn, self.x0)
                    self._check_linearized(jvp_fn)
                self._jvp_fn = jvp_fn
            except Exception as err:  # noqa: BLE001 - any tracing failure: fall back to plain jvp
                self.mode = "jvp"
                if self.on_linearize_failure is not None:
                    self.on_linearize_failure(err)

    def _check_linearized(self, jvp_fn: Callable[[Tensor], Tensor]) -> None:
        """Check one prebuilt product on a fixed pseudo-random direction.

        torch 2.13's ``linearize`` can return silently wrong products: its constant folding mixes up
        constants (e.g. axis-angle -> So3 -> log -> ``axis_angle_to_rotation_matrix`` chains, the
        ``AxisAngleSO3`` manifold feeding a camera pose), so it is compared with ``torch.func.jvp``.
        The transpose map is checked against the reused VJP by the adjoint identity <J u, w> = <u, Jᵀw>
        instead: reverse mode only, because the first forward-mode product in a process costs about a
        second of one-time set-up in torch.
        """
        gen = torch.Generator().manual_seed(12345)
        u = torch.randn(self.n, generator=gen).to(device=self.x0.device, dtype=self.x0.dtype)
        a = jvp_fn(u)
        tol = torch.finfo(self.x0.dtype).eps ** 0.5
        if self.mode == "transpose":
            w = torch.randn(self.m, generator=gen).to(device=self.x0.device, dtype=self.x0.dtype)
            jtw = self._vjp_fn(w)[0]
            scale = float(torch.linalg.vector_norm(a)) * float(torch.linalg.vector_norm(w)) + \
                float(torch.linalg.vector_norm(u)) * float(torch.linalg.vector_norm(jtw))
            err = abs(float(a @ w) - float(u @ jtw)) / max(scale, 1e-300)
        else:
            b = torch.func.jvp(self.fn, (self.x0,), (u,))[1]
            err = float(torch.linalg.vector_norm(a - b)) / max(float(torch.linalg.vector_norm(b)), 1e-300)
        if not err <= tol:
            what = ("fails the adjoint identity <J u, w> = <u, J^T w>" if self.mode == "transpose"
                    else "disagrees with torch.func.jvp")
            raise RuntimeError(f"JVP mode {self.mode!r} {what} (relative error {err:.2e})")

    def jvp(self, u: Tensor) -> Tensor:
        """``J~ u``: ``u: (n,) -> (m,)``."""
        self.counters.jvps += 1
        out = self._raw_jvp(u)
        return out if self.row_scale is None else out * self.row_scale

    def vjp(self, w: Tensor) -> Tensor:
        """``J~^T w``: ``w: (m,) -> (n,)``."""
        self.counters.vjps += 1
        if self.row_scale is not None:
            w = w * self.row_scale
        return self._vjp_fn(w)[0]

    def jtj(self, v: Tensor) -> Tensor:
        """``J~^T J~ v``: ``(n,) -> (n,)``, one JVP and one VJP."""
        return self.vjp(self.jvp(v))

    def dot(self, a: Tensor, b: Tensor) -> Tensor:
        """``<a, b>`` of two residual-space vectors ``(m,)`` (e.g. ``||J~ u||^2``), a 0-d tensor."""
        return a @ b

    def norm(self, w: Tensor) -> float:
        """``||w||`` of a residual-space vector ``(m,)``."""
        return float(torch.linalg.vector_norm(w))

    # ------------------------------------------------------------------ small-n helpers
    def columns(self) -> Tensor:
        """The explicit ``J~: (m, n)`` from ``n`` JVPs (cached).  Only for small ``n``: ``m n`` memory."""
        if self._columns is None:
            eye = torch.eye(self.n, dtype=self.x0.dtype, device=self.x0.device)
            cols = None
            self._prepare_jvp()
            if self.n > self.vmap_min_columns and self.vmap_columns:
                try:  # one batched pass when the residual function supports vmap
                    cols = torch.func.vmap(self._raw_jvp)(eye).T
                except Exception:  # noqa: BLE001 - not vmappable: one product per column
                    self.vmap_columns = False
                    if self.on_vmap_failure is not None:
                        self.on_vmap_failure()
            if cols is None:
                cols = torch.stack([self._raw_jvp(eye[i]) for i in range(self.n)], dim=1)
            self.counters.jvps += self.n
            self._columns = cols if self.row_scale is None else cols * self.row_scale[:, None]
        return self._columns

    def columns_vjp(self, w: Tensor) -> Tensor:
        """``J~^T w`` as a product with the explicit columns (assembled first if need be; small ``n`` only)."""
        self.counters.vjps += 1
        return self.columns().T @ w

    def dense_jtj(self) -> Tensor:
        """``J~^T J~: (n, n)`` assembled exactly from the ``n`` columns."""
        c = self.columns()
        h = c.T @ c
        return 0.5 * (h + h.T)

    def diag_exact(self) -> Tensor:
        """``diag(J~^T J~): (n,)`` exactly, as squared column norms (``n`` JVPs)."""
        c = self.columns()
        return (c * c).sum(0)

    def diag_hutchinson(self, probes: int, generator: torch.Generator | None = None) -> Tensor:
        """Unbiased estimate of ``diag(J~^T J~)`` by Hutchinson probes: ``mean_k (J~^T s_k)^2``.

        ``s_k: (m,)`` random +-1 residual signs, so ``E[(J^T s)_j^2] = sum_i J_ij^2``; one VJP per probe,
        always non-negative.  ``generator`` (a CPU ``torch.Generator``) makes the estimate reproducible.
        """
        if probes < 1:
            raise ValueError(f"diag_hutchinson: probes must be >= 1, got {probes}")
        acc = torch.zeros(self.n, dtype=self.x0.dtype, device=self.x0.device)
        for _ in range(probes):
            s = torch.randint(0, 2, (self.m,), generator=generator)
            s = s.to(device=self.x0.device, dtype=self.x0.dtype)
            g = self.vjp(2 * s - 1)
            acc += g * g
        return acc / probes


class RecomputedJacobian:
    """The Jacobian of one residual term whose graph is not kept (bounded memory).

    ``build()`` returns a fresh :class:`JacobianOperator` of the term at the same point (one forward
    with its VJP graph); every product builds one, applies it and lets it go, so at most one term's graph
    is alive and the peak memory of many terms follows the largest term, not their number. Each product
    costs one more forward than with a kept graph; the products are the same (the forward is the same
    computation). ``first`` is the operator built at linearization, whose value and row scale are kept.
    ``rebuilds`` counts the forwards in the owner's counters.
    """

    def __init__(self, build: Callable[[], JacobianOperator], first: JacobianOperator, *,
                 counters: Counters | None = None, rebuilds: Counters | None = None) -> None:
        self.build = build
        self.n, self.m, self.x0 = first.n, first.m, first.x0
        self.value = first.value
        self.row_scale = first.row_scale
        self.counters = counters if counters is not None else Counters()
        self.rebuilds = rebuilds if rebuilds is not None else self.counters

    def _op(self) -> JacobianOperator:
        self.rebuilds.rebuilds += 1
        op = self.build()
        op.row_scale = self.row_scale
        return op

    def jvp(self, u: Tensor) -> Tensor:
        """``J~ u``: ``(n,) -> (m,)``."""
        self.counters.jvps += 1
        return self._op().jvp(u)

    def vjp(self, w: Tensor) -> Tensor:
        """``J~^T w``: ``(m,) -> (n,)``."""
        self.counters.vjps += 1
        return self._op().vjp(w)

    def jtj(self, v: Tensor) -> Tensor:
        """``J~^T J~ v`` on one rebuilt graph."""
        self.counters.jvps += 1
        self.counters.vjps += 1
        return self._op().jtj(v)

    def columns(self) -> Tensor:
        """The explicit ``J~: (m, n)`` (not cached: ``m n`` memory is what this class avoids keeping)."""
        self.counters.jvps += self.n
        return self._op().columns()

    def dense_jtj(self) -> Tensor:
        self.counters.jvps += self.n
        return self._op().dense_jtj()

    def diag_exact(self) -> Tensor:
        self.counters.jvps += self.n
        return self._op().diag_exact()

    def diag_hutchinson(self, probes: int, generator: torch.Generator | None = None) -> Tensor:
        """Hutchinson's estimate on one rebuilt graph (all probes share it)."""
        self.counters.vjps += probes
        return self._op().diag_hutchinson(probes, generator)


Term = JacobianOperator | RecomputedJacobian


def term_generators(generator: torch.Generator | None, names: list[str]) -> dict[str, torch.Generator | None]:
    """One CPU generator per term, seeded from one draw of ``generator`` and the term's name: a term's
    random probes do not depend on which other terms this process holds (sharded fits draw the same probes
    as one process)."""
    if generator is None:
        return dict.fromkeys(names)
    base = int(torch.randint(0, 2**62, (1,), generator=generator))
    return {name: torch.Generator().manual_seed((base ^ zlib.crc32(name.encode())) % 2**63) for name in names}


class StackedOperator:
    """``J = [J_1; J_2; ...]``: the Jacobians of several residual terms at one ``x0``, each its own
    operator (its own graph, or a graph rebuilt per product), applied together or over a subset of terms.

    ``J^T J v = sum_t J_t^T J_t v`` needs no concatenation, and a subset of terms gives a cheaper,
    subsampled curvature product (:meth:`jtj` with ``terms``; names this process does not hold are
    skipped). Products count once in ``counters``. With a sharding ``reduction`` the terms are this
    process's share: every sum over residuals (``vjp``, ``jtj``, ``dense_jtj``, the diagonals, ``dot``,
    ``norm``) is summed over the processes, one collective per product, while ``jvp``, ``value`` and
    ``columns`` give this process's rows (``m_local`` of them); ``m`` counts the residuals of all processes.
    ``known_vjp = (w, J~^T w)``: a product already computed (the gradient, when the terms were built
    one at a time), returned when :meth:`vjp` is asked for that same tensor ``w``.
    """

    def __init__(self, ops: dict[str, Term], *, counters: Counters | None = None,
                 reduction: Reduction = IDENTITY, known_vjp: tuple[Tensor, Tensor] | None = None) -> None:
        if not ops:
            raise ValueError("StackedOperator: needs at least one term")
        self.ops = dict(ops)
        first = next(iter(self.ops.values()))
        self.n = first.n
        self.x0 = first.x0
        self.sizes = {name: op.m for name, op in self.ops.items()}
        self.m_local = sum(self.sizes.values())
        self.reduction = reduction
        self.m = self.m_local
        if reduction.sharded:  # one small collective per linearization
            total = torch.tensor([self.m_local], dtype=torch.int64, device=self.x0.device)
            self.m = int(reduction.sum(total).item())
        self.counters = counters if counters is not None else Counters()
        self.counters.linearizations += 1
        self._known_vjp = known_vjp

    @property
    def value(self) -> Tensor:
        return torch.cat([op.value for op in self.ops.values()])

    def _split(self, w: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.ops, torch.split(w, list(self.sizes.values())), strict=True))

    def jvp(self, u: Tensor) -> Tensor:
        """``J~ u``: ``(n,) -> (m_local,)``, the terms' products stacked."""
        self.counters.jvps += 1
        return torch.cat([op.jvp(u) for op in self.ops.values()])

    def vjp(self, w: Tensor) -> Tensor:
        """``J~^T w``: ``(m_local,) -> (n,)``, summed over the terms (and processes)."""
        self.counters.vjps += 1
        if self._known_vjp is not None and w is self._known_vjp[0]:
            return self.reduction.sum(self._known_vjp[1])
        parts = self._split(w)
        return self.reduction.sum(sum(op.vjp(parts[name]) for name, op in self.ops.items()))

    def jtj(self, v: Tensor, terms: list[str] | None = None) -> Tensor:
        """``sum_t J~_t^T J~_t v`` over ``terms`` (default all): one JVP and one VJP per term."""
        self.counters.jvps += 1
        self.counters.vjps += 1
        names = list(self.ops) if terms is None else [t for t in terms if t in self.ops]
        out = torch.zeros_like(v)
        for name in names:
            out = out + self.ops[name].jtj(v)
        return self.reduction.sum(out)

    def dot(self, a: Tensor, b: Tensor) -> Tensor:
        """``<a, b>`` of two residual-space vectors ``(m_local,)``, summed over processes: a 0-d tensor."""
        return self.reduction.sum((a @ b).reshape(1))[0] if self.reduction.sharded else a @ b

    def norm(self, w: Tensor) -> float:
        """``||w||`` of a residual-space vector over all processes."""
        if not self.reduction.sharded:
            return float(torch.linalg.vector_norm(w))
        return float(self.dot(w, w).clamp_min(0).sqrt())

    def columns(self) -> Tensor:
        """The explicit ``J~: (m_local, n)``, this process's terms' columns stacked (small ``n`` only)."""
        self.counters.jvps += self.n
        return torch.cat([op.columns() for op in self.ops.values()])

    def columns_vjp(self, w: Tensor) -> Tensor:
        """``J~^T w`` from the explicit columns, summed over the terms (and processes)."""
        if self._known_vjp is not None and w is self._known_vjp[0]:
            return self.vjp(w)
        self.counters.vjps += 1
        parts = self._split(w)  # a term whose graph is not kept keeps no columns either: its plain VJP
        return self.reduction.sum(sum(op.columns().T @ parts[name] if isinstance(op, JacobianOperator)
                                      else op.vjp(parts[name]) for name, op in self.ops.items()))

    def dense_jtj(self) -> Tensor:
        self.counters.jvps += self.n
        return self.reduction.sum(sum(op.dense_jtj() for op in self.ops.values()))

    def diag_exact(self) -> Tensor:
        self.counters.jvps += self.n
        return self.reduction.sum(sum(op.diag_exact() for op in self.ops.values()))

    def diag_hutchinson(self, probes: int, generator: torch.Generator | None = None) -> Tensor:
        """Hutchinson's estimate term by term, ``sum_t mean_k (J~_t^T s_k)^2``: the same expectation as on
        the stacked ``J~`` without the cross-term noise between terms. Each term draws its probes from
        its own generator (:func:`term_generators`), so the estimate does not depend on the sharding."""
        self.counters.vjps += probes
        gens = term_generators(generator, list(self.ops))
        return self.reduction.sum(sum(op.diag_hutchinson(probes, gens[name]) for name, op in self.ops.items()))
