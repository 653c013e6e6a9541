"""Nonlinear least-squares problems over a dict of named parameter tensors.

``cost(x) = 1/2 * sum_b w_b * sum_i rho_b(r_{b,i}(x)^2)`` (Ceres convention), where ``r_b`` is the
residual block ``b`` returned by the user's residual function, ``w_b`` its weight and ``rho_b`` its robust
loss (identity when none), applied to each scalar residual.  The solvers see the problem only through

* ``prepare_context(x)``: the no-grad, data-dependent step (e.g. a renderer's pixel-face pairs);
* ``evaluate(x, ctx)``: cost and per-block costs, no gradients;
* ``linearize(x, ctx)``: a :class:`~diffrender.linalg.operator.JacobianOperator` of the whitened residual
  ``r~`` whose ``J~^T r~`` is the exact gradient of the robust cost (Triggs' correction, as in Ceres);
* ``cost(x, ctx)``: the differentiable scalar cost (for first-order solvers).

Two options serve large problems split into terms: ``keep_graphs=False`` rebuilds a term's graph for each
product instead of keeping every term's (memory follows the largest term, not their number), and a
sharding ``reduction`` (:mod:`diffrender.linalg.reduction`) sums every quantity over the processes that
each hold some of the terms (the solvers see one problem).

The solving wing never imports the renderer: a problem is any Python function of tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffrender.linalg.hessian import HessianOperator
from diffrender.linalg.operator import Counters, JacobianOperator, RecomputedJacobian, StackedOperator
from diffrender.linalg.reduction import IDENTITY, Reduction
from diffrender.manifolds import AxisAngleSO3, Euclidean, Manifold

__all__ = [
    "Problem",
    "TermContexts",
    "ParamLayout",
    "Evaluation",
    "Linearization",
    "PreconditionerInfo",
    "PreconditionerFactory",
    "RobustLoss",
    "TrivialLoss",
    "Huber",
    "Cauchy",
    "Manifold",
    "Euclidean",
    "AxisAngleSO3",
]

ResidualFn = Callable[[dict[str, Tensor], Any], "Tensor | dict[str, Tensor]"]
SINGLE_TERM = "residuals"  # the one term of a problem built from a single residual function


# ----------------------------------------------------------------------------------------------------------
# Robust losses
# ----------------------------------------------------------------------------------------------------------
class RobustLoss:
    """A robust loss ``rho(s)`` of the squared residual ``s = r^2`` (Ceres' LossFunction convention).

    Subclasses implement :meth:`evaluate`, returning ``rho(s), rho'(s), rho''(s)`` elementwise.
    ``rho(s) ~ s`` for small ``s`` so that the loss only changes the treatment of outliers.
    """

    def evaluate(self, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError


class TrivialLoss(RobustLoss):
    """``rho(s) = s``: plain least squares."""

    def evaluate(self, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return s, torch.ones_like(s), torch.zeros_like(s)

    def __repr__(self) -> str:
        return "TrivialLoss()"


class Huber(RobustLoss):
    """Huber: ``rho(s) = s`` for ``s <= delta^2``, else ``2 delta sqrt(s) - delta^2``."""

    def __init__(self, delta: float = 1.0) -> None:
        if not delta > 0:
            raise ValueError(f"Huber delta must be > 0, got {delta}")
        self.delta = float(delta)

    def evaluate(self, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b = self.delta**2
        outlier = s > b
        root = torch.sqrt(torch.where(outlier, s, torch.ones_like(s)))  # safe sqrt: only used where s > b
        rho = torch.where(outlier, 2 * self.delta * root - b, s)
        rho1 = torch.where(outlier, self.delta / root, torch.ones_like(s))
        safe_s = torch.where(outlier, s, torch.ones_like(s))
        rho2 = torch.where(outlier, -rho1 / (2 * safe_s), torch.zeros_like(s))
        return rho, rho1, rho2

    def __repr__(self) -> str:
        return f"Huber(delta={self.delta})"


class Cauchy(RobustLoss):
    """Cauchy: ``rho(s) = delta^2 log(1 + s / delta^2)``."""

    def __init__(self, delta: float = 1.0) -> None:
        if not delta > 0:
            raise ValueError(f"Cauchy delta must be > 0, got {delta}")
        self.delta = float(delta)

    def evaluate(self, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b = self.delta**2
        t = 1 + s / b
        return b * torch.log1p(s / b), 1 / t, -1 / (b * t * t)

    def __repr__(self) -> str:
        return f"Cauchy(delta={self.delta})"


def triggs_scales(r: Tensor, loss: RobustLoss) -> tuple[Tensor, Tensor, Tensor]:
    """Per-residual scalings of Triggs' correction (Triggs et al. 2000, sec. 4.3; Ceres ``Corrector``).

    For a scalar residual ``r`` with ``s = r^2``: ``alpha = 1 - sqrt(1 + 2 s rho''/rho')`` when ``rho'' > 0``,
    else 0; ``r~ = sqrt(rho') / (1 - alpha) r`` and ``J~ = sqrt(rho') (1 - alpha) J``.  Hence
    ``J~^T r~ = rho' J^T r``, the exact gradient of ``1/2 rho(r^2)``, and ``J~^T J~`` is the robust GN Hessian
    (IRLS weights ``rho'`` when ``rho'' <= 0``, the case of Huber and Cauchy).
    Returns ``(rho(s), residual_scale, jacobian_scale)``, all shaped like ``r``.
    """
    s = r * r
    rho, rho1, rho2 = loss.evaluate(s)
    rho1 = rho1.clamp_min(torch.finfo(r.dtype).tiny)
    sqrt_rho1 = torch.sqrt(rho1)
    use = (rho2 > 0) & (s > 0)
    d = 1 + 2 * s * torch.where(use, rho2, torch.zeros_like(rho2)) / rho1
    alpha = torch.where(use, 1 - torch.sqrt(d), torch.zeros_like(d))
    return rho, sqrt_rho1 / (1 - alpha), sqrt_rho1 * (1 - alpha)


# ----------------------------------------------------------------------------------------------------------
# Parameter layout
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamLayout:
    """Where each named parameter lives in the flat tangent vector ``delta: (n,)``."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    sizes: tuple[int, ...]  # tangent sizes
    manifolds: tuple[Manifold, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def n(self) -> int:
        """Total tangent dimension."""
        return sum(self.sizes)

    def slices(self) -> dict[str, slice]:
        """Name -> slice of the flat tangent vector."""
        out, start = {}, 0
        for name, size in zip(self.names, self.sizes, strict=True):
            out[name] = slice(start, start + size)
            start += size
        return out

    def split(self, v: Tensor) -> dict[str, Tensor]:
        """Flat tangent ``(n,)`` -> dict of per-parameter tangent pieces, shaped like the parameter when
        the tangent and the parameter have the same number of elements."""
        out = {}
        for (name, sl), shape in zip(self.slices().items(), self.shapes, strict=True):
            piece = v[sl]
            out[name] = piece.reshape(shape) if piece.numel() == math.prod(shape) else piece
        return out

    def join(self, parts: dict[str, Tensor]) -> Tensor:
        """Dict of per-parameter tangent pieces -> flat ``(n,)`` vector (inverse of :meth:`split`)."""
        return torch.cat([parts[name].reshape(-1) for name in self.names])

    def zeros(self) -> Tensor:
        """The zero tangent ``(n,)``."""
        return torch.zeros(self.n, dtype=self.dtype, device=self.device)

    def retract(self, x: dict[str, Tensor], delta: Tensor) -> dict[str, Tensor]:
        """``x (+) delta`` parameter by parameter through each manifold."""
        out = dict(x)
        for (name, sl), man in zip(self.slices().items(), self.manifolds, strict=True):
            out[name] = man.retract(x[name], delta[sl])
        return out

    def flatten(self, x: dict[str, Tensor]) -> Tensor:
        """Concatenate the parameter values (not tangents) into one vector, e.g. for ``||x||``."""
        return torch.cat([x[name].reshape(-1) for name in self.names])


# ----------------------------------------------------------------------------------------------------------
# Results of evaluation / linearization
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """Cost at a point: ``cost = sum(block_costs.values())`` (a Python float; may be nan/inf)."""

    cost: float
    block_costs: dict[str, float]


@dataclass(eq=False)
class Linearization:
    """Everything a second-order step needs at one point ``x``: a typed record, built once per point.

    ``op`` applies ``J~`` (whitened, robust-corrected Jacobian w.r.t. the tangent) by products only;
    ``residual: (m,)`` is ``r~``, so the Gauss-Newton model is ``1/2 ||r~ + J~ delta||^2``. The gradient
    ``J~^T r~`` (one VJP), the dense ``J~^T J~`` (``n`` JVPs, small ``n`` only) and the cost's exact
    Hessian operator are computed on first use and kept; ``diagonal`` holds an estimate of
    ``diag(J~^T J~)`` once a solver has made one (exact or Hutchinson, see the solvers).
    """

    op: JacobianOperator | StackedOperator
    residual: Tensor  # this process's rows when the problem is sharded
    evaluation: Evaluation
    x: dict[str, Tensor] = field(default_factory=dict)
    ctx: Any = None
    problem: Problem | None = None
    diagonal: Tensor | None = None
    _gradient: Tensor | None = field(default=None, repr=False)
    _dense: Tensor | None = field(default=None, repr=False)
    _hessian: HessianOperator | None = field(default=None, repr=False)
    _gradient_norm: float | None = field(default=None, repr=False)

    @property
    def cost(self) -> float:
        return self.evaluation.cost

    @property
    def gradient_ready(self) -> bool:
        """Whether the gradient has been computed (a trial point's linearization has none yet)."""
        return self._gradient is not None

    @property
    def gradient(self) -> Tensor:
        """``g = J~^T r~: (n,)``, the exact gradient of the (robust) cost."""
        if self._gradient is None:
            self._gradient = self.op.vjp(self.residual)
        return self._gradient

    @property
    def gradient_norm(self) -> float:
        """``max_j |g_j|`` (what the solvers' gradient test and reports use), computed once per point."""
        if self._gradient_norm is None:
            g = self.gradient
            self._gradient_norm = float(g.abs().max()) if g.numel() else 0.0
        return self._gradient_norm

    def gradient_from_columns(self) -> Tensor:
        """The gradient as ``J~^T r~`` with the explicit columns (small ``n``: no VJP once they exist)."""
        if self._gradient is None:
            self._gradient = self.op.columns_vjp(self.residual)
        return self._gradient

    def model_decrease(self, delta: Tensor, j_delta: Tensor | None = None) -> float:
        """``m(0) - m(delta)`` of the Gauss-Newton model ``m(d) = 1/2 ||r~ + J~ d||^2``, i.e.
        ``-(g.d + 1/2 ||J~ d||^2)``: from ``j_delta = J~ delta`` when given, else from the dense ``J~^T J~``."""
        g = self.gradient
        if j_delta is None:
            return -float(g @ delta + 0.5 * delta @ (self.dense_jtj() @ delta))
        return -float(g @ delta + 0.5 * self.op.dot(j_delta, j_delta))

    def dense_jtj(self) -> Tensor:
        """``J~^T J~: (n, n)`` assembled from ``n`` JVPs (cached)."""
        if self._dense is None:
            self._dense = self.op.dense_jtj()
        return self._dense

    def hessian(self) -> HessianOperator:
        """The exact Hessian of the cost at ``x`` as an operator (forward-over-reverse products)."""
        if self._hessian is None:
            if self.problem is None:
                raise ValueError("Linearization.hessian: this record was built without its problem")
            self._hessian = self.problem.hessian(self.x, self.ctx)
        return self._hessian


@dataclass
class PreconditionerInfo:
    """What a preconditioner factory gets at each linearization point.

    ``jtj_diag: (n,)`` estimate of ``diag(J~^T J~)`` (exact or Hutchinson); ``damping: (n,)`` the diagonal
    the solver adds to ``J~^T J~`` (``lambda D^2`` for LM, zeros for GN).  ``layout.split`` gives per-
    parameter views of a tangent vector.
    """

    x: dict[str, Tensor]
    ctx: Any
    layout: ParamLayout
    jtj_diag: Tensor
    damping: Tensor


PreconditionerFactory = Callable[[PreconditionerInfo], "Callable[[Tensor], Tensor] | None"]
"""``factory(info) -> apply`` where ``apply(v: (n,)) -> M^-1 v`` approximates ``(J~^T J~ + damping)^-1 v``;
returning ``None`` falls back to the Jacobi preconditioner."""


# ----------------------------------------------------------------------------------------------------------
# Problem
# ----------------------------------------------------------------------------------------------------------
class TermContexts(dict):
    """Per-term prepared contexts (``term name -> ctx``), what :meth:`Problem.prepare_context` returns when
    ``prepare`` is a mapping; with a single ``prepare`` every term gets the same context."""


class Problem:
    """A least-squares problem: residual terms, manifolds, block weights, robust losses, hooks.

    ``residuals(x, ctx)`` takes the parameter dict and the result of ``prepare(x)`` (``None`` when no
    ``prepare`` hook) and returns a tensor (one block named ``"residual"``) or a dict of named blocks of
    any shapes.  It must be traceable by ``torch.func`` in the parameters: anything data-dependent
    (integer index lists, sizes) belongs in ``prepare``, which runs under ``torch.no_grad`` once per
    linearization point and once per trial point.

    ``residuals`` may also be a mapping of named *terms*, ``{name: fn(x, ctx)}``, whose blocks together
    make the problem (block names unique across terms; a term returning a tensor names its block after
    itself), with ``prepare`` one callable (its context shared by every term) or a mapping of per-term
    hooks. Terms are evaluated and linearized separately, so that a solver can use a subset of them for
    curvature (``sampled_terms``: those it may subsample; default all) and a scene can split work that is
    large (views) into pieces.

    ``keep_graphs=False``: each term's graph is built when needed and freed after each product
    (:class:`~diffrender.linalg.operator.RecomputedJacobian`), so memory holds one term's graph at a time,
    for one more forward per product; the results are those of kept graphs. ``reduction``: this process
    holds a share of the terms of a problem sharded over processes (others named in ``remote_terms``, so
    that ``sampled_terms`` can list every term): costs, gradients and curvature products are summed over
    the processes, and ``cost()``'s backward sums the parameters' gradients.
    """

    def __init__(
        self,
        residuals: ResidualFn | Mapping[str, ResidualFn],
        *,
        prepare: Callable[[dict[str, Tensor]], Any] | Mapping[str, Callable[[dict[str, Tensor]], Any]] | None = None,
        manifolds: dict[str, Manifold] | None = None,
        weights: dict[str, float] | None = None,
        losses: dict[str, RobustLoss] | None = None,
        preconditioner: PreconditionerFactory | None = None,
        sampled_terms: Sequence[str] | None = None,
        keep_graphs: bool = True,
        reduction: Reduction | None = None,
        remote_terms: Sequence[str] = (),
    ) -> None:
        if callable(residuals):
            self.terms: dict[str, ResidualFn] = {SINGLE_TERM: residuals}
        elif isinstance(residuals, Mapping) and residuals and all(callable(f) for f in residuals.values()):
            self.terms = dict(residuals)
        else:
            raise TypeError("Problem: residuals must be callable or a non-empty mapping of callables")
        if isinstance(prepare, Mapping):
            unknown = set(prepare) - set(self.terms)
            if unknown:
                raise ValueError(f"Problem: prepare given for unknown terms {sorted(unknown)}")
        elif prepare is not None and not callable(prepare):
            raise TypeError("Problem: prepare must be callable, a mapping of callables, or None")
        self.prepare = prepare
        self.reduction = reduction if reduction is not None else IDENTITY
        self.remote_terms = list(remote_terms)
        if self.remote_terms and not self.reduction.sharded:
            raise ValueError("Problem: remote_terms are the terms of other processes; they need a sharding reduction")
        clash = set(self.remote_terms) & set(self.terms)
        if clash:
            raise ValueError(f"Problem: terms {sorted(clash)} are both local and remote")
        self.keep_graphs = bool(keep_graphs)
        self.sampled_terms = list(self.terms) if sampled_terms is None else list(sampled_terms)
        unknown = set(self.sampled_terms) - set(self.terms) - set(self.remote_terms)
        if unknown:
            raise ValueError(f"Problem: sampled_terms names unknown terms {sorted(unknown)}")
        self.manifolds = dict(manifolds or {})
        self.weights = {k: float(v) for k, v in (weights or {}).items()}
        for k, w in self.weights.items():
            if not (w >= 0 and math.isfinite(w)):
                raise ValueError(f"Problem: weight of block '{k}' must be finite and >= 0, got {w}")
        self.losses = dict(losses or {})
        self.preconditioner = preconditioner
        self.counters = Counters()
        self._failed_modes: set[str] = set()  # JVP modes that failed here: not tried again
        self._checked_modes: set[str] = set()  # "transpose" is checked (adjoint identity) once per problem
        self._vmap_columns = True  # False once a dense Jacobian's vmap-ed columns failed here (not tried again)
        self.linearize_error: str | None = None

    @property
    def residuals(self) -> ResidualFn:
        """The residual function: the single term's, or one that returns every term's blocks."""
        if list(self.terms) == [SINGLE_TERM]:
            return self.terms[SINGLE_TERM]
        return self.residual_blocks

    @residuals.setter
    def residuals(self, fn: ResidualFn) -> None:
        self.terms = {SINGLE_TERM: fn}
        self.sampled_terms = [SINGLE_TERM]

    # ------------------------------------------------------------------ layout
    def layout(self, x: dict[str, Tensor]) -> ParamLayout:
        """Tangent layout of ``x`` (parameters in the dict's order); checks one dtype and device."""
        if not isinstance(x, dict) or not x:
            raise ValueError("Problem: parameters must be a non-empty dict of tensors")
        unknown = set(self.manifolds) - set(x)
        if unknown:
            raise ValueError(f"Problem: manifolds given for unknown parameters {sorted(unknown)}")
        first = next(iter(x.values()))
        names, shapes, sizes, mans = [], [], [], []
        for name, t in x.items():
            if not isinstance(t, Tensor):
                raise ValueError(f"Problem: parameter '{name}' is not a tensor")
            if not t.is_floating_point():
                raise ValueError(f"Problem: parameter '{name}' must be floating point, got {t.dtype}")
            if t.dtype != first.dtype or t.device != first.device:
                raise ValueError(
                    f"Problem: parameter '{name}' has {t.dtype} on {t.device}; all parameters must share "
                    f"{first.dtype} on {first.device}"
                )
            man = self.manifolds.get(name, Euclidean())
            names.append(name)
            shapes.append(t.shape)
            sizes.append(man.tangent_numel(t))
            mans.append(man)
        return ParamLayout(tuple(names), tuple(shapes), tuple(sizes), tuple(mans), first.dtype, first.device)

    # ------------------------------------------------------------------ evaluation
    def _select(self, terms: Sequence[str] | None) -> list[str]:
        if terms is None:
            return list(self.terms)
        unknown = [t for t in terms if t not in self.terms]
        if unknown:
            raise ValueError(f"Problem: unknown terms {unknown}")
        return list(terms)

    def prepare_context(self, x: dict[str, Tensor], terms: Sequence[str] | None = None) -> Any:
        """Run the ``prepare`` hook(s) without gradients (``None`` when there is none); per-term hooks
        give a :class:`TermContexts`, of the selected ``terms`` only."""
        if self.prepare is None:
            return None
        xd = {k: v.detach() for k, v in x.items()}
        with torch.no_grad():
            if isinstance(self.prepare, Mapping):
                return TermContexts({t: self.prepare[t](xd) for t in self._select(terms) if t in self.prepare})
            return self.prepare(xd)

    def term_blocks(self, term: str, x: dict[str, Tensor], ctx: Any = None) -> dict[str, Tensor]:
        """One term's residual blocks (its own context when ``ctx`` is per term)."""
        out = self.terms[term](x, ctx.get(term) if isinstance(ctx, TermContexts) else ctx)
        if isinstance(out, Tensor):
            out = {"residual" if term == SINGLE_TERM else term: out}
        if not isinstance(out, dict) or not out:
            raise ValueError(f"Problem: term '{term}' must return a tensor or a non-empty dict of tensors")
        return out

    def residual_blocks(self, x: dict[str, Tensor], ctx: Any = None,
                        terms: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Call the residual function(s) of the selected terms (default all); always returns a dict of blocks."""
        names = self._select(terms)
        out: dict[str, Tensor] = {}
        for term in names:
            blocks = self.term_blocks(term, x, ctx)
            clash = set(blocks) & set(out)
            if clash:
                raise ValueError(f"Problem: residual block names {sorted(clash)} appear in more than one term")
            out.update(blocks)
        if len(names) == len(self.terms):
            for name in self.weights:
                if name not in out:
                    raise ValueError(f"Problem: weight given for unknown residual block '{name}'")
            for name in self.losses:
                if name not in out:
                    raise ValueError(f"Problem: loss given for unknown residual block '{name}'")
        return out

    def _flat(self, blocks: dict[str, Tensor]) -> Tensor:
        return torch.cat([b.reshape(-1) for b in blocks.values()])

    def _block_vectors(self, blocks: dict[str, Tensor]) -> list[tuple[str, int]]:
        return [(name, b.numel()) for name, b in blocks.items()]

    def _cost_terms(self, blocks: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-block ``1/2 w_b sum rho_b(r^2)`` as differentiable 0-d tensors."""
        out = {}
        for name, r in blocks.items():
            w = self.weights.get(name, 1.0)
            loss = self.losses.get(name)
            s = r.reshape(-1) * r.reshape(-1)
            rho = s if loss is None else loss.evaluate(s)[0]
            out[name] = 0.5 * w * rho.sum()
        return out

    def evaluate(self, x: dict[str, Tensor], ctx: Any = None, terms: Sequence[str] | None = None) -> Evaluation:
        """Cost and per-block costs at ``x`` without gradients (counts one residual evaluation)."""
        with torch.no_grad():
            blocks = self.residual_blocks(x, ctx, terms)
            self.counters.residual_evals += 1
            costs = self.reduction.sum_floats({k: float(v) for k, v in self._cost_terms(blocks).items()})
        return Evaluation(sum(costs.values()), costs)

    def cost(self, x: dict[str, Tensor], ctx: Any = None,
             terms: Sequence[str] | None = None) -> tuple[Tensor, dict[str, float]]:
        """Differentiable scalar cost at ``x`` and its per-block values (for first-order solvers). Sharded,
        the value is the sum over the processes, and so are the gradients its backward leaves in ``x``."""
        if self.reduction.sharded:
            x = dict(zip(x, _SumGradients.apply(self.reduction, *x.values()), strict=True))
        blocks = self.residual_blocks(x, ctx, terms)
        self.counters.residual_evals += 1
        parts = self._cost_terms(blocks)
        total = sum(parts.values())
        costs = {k: float(v.detach()) for k, v in parts.items()}
        if self.reduction.sharded:
            costs = self.reduction.sum_floats(costs)
            first = next(iter(x.values()))
            total = _GlobalValue.apply(total, torch.tensor(sum(costs.values()), dtype=first.dtype, device=first.device))
        return total, costs

    # ------------------------------------------------------------------ functions of the tangent
    def tangent_point(self, x: dict[str, Tensor]) -> Callable[[Tensor], dict[str, Tensor]]:
        """``delta: (n,) -> x (+) delta`` as a parameter dict, traceable by ``torch.func``."""
        layout = self.layout(x)
        x = {k: v.detach() for k, v in x.items()}
        if not all(isinstance(m, Euclidean) for m in layout.manifolds):
            return lambda delta: layout.retract(x, delta)

        def at(delta: Tensor) -> dict[str, Tensor]:  # cheap path: no per-parameter manifold dispatch
            xd, start = {}, 0
            for name, size in zip(layout.names, layout.sizes, strict=True):
                xd[name] = x[name] + delta[start : start + size].reshape(x[name].shape)
                start += size
            return xd

        return at

    def tangent_cost(self, x: dict[str, Tensor], ctx: Any = None) -> Callable[[Tensor], Tensor]:
        """``delta: (n,) -> cost(x (+) delta)`` as a 0-d tensor with the weights and robust losses, traceable
        by ``torch.func`` (``ctx`` fixed): the function whose Hessian Newton-type methods use."""
        at = self.tangent_point(x)

        def f(delta: Tensor) -> Tensor:
            terms = self._cost_terms(self.residual_blocks(at(delta), ctx))
            return torch.stack(list(terms.values())).sum()

        return f

    def hessian(self, x: dict[str, Tensor], ctx: Any = None) -> HessianOperator:
        """The Hessian of the cost in the tangent space at ``x``, applied by products only."""
        return HessianOperator(self.tangent_cost(x, ctx), self.layout(x).zeros(), counters=self.counters,
                               reduction=self.reduction)

    # ------------------------------------------------------------------ linearization
    def linearize(self, x: dict[str, Tensor], ctx: Any = None, *, jvp_mode: str = "transpose",
                  terms: Sequence[str] | None = None, batched_columns: bool = False) -> Linearization:
        """Build the Jacobian operator of the whitened residuals at ``x`` (tangent ``delta = 0``).

        ``fn(delta) = r(x (+) delta, ctx)`` is differentiated once by ``torch.func.vjp`` (reused for every
        VJP, and transposed for JVPs in the default mode); the per-residual weights and Triggs scalings
        are constants at ``x``. With several terms, each gets its own operator and the result stacks them
        (:class:`~diffrender.linalg.operator.StackedOperator`; also for one term when the graphs are not kept
        or the problem is sharded). Without ``keep_graphs`` each term's gradient share is taken while its
        graph exists, and the graph is dropped.
        ``jvp_mode`` picks how JVPs are made (see :mod:`diffrender.linalg.operator`): ``"transpose"``
        (default: fast, memory ~ one forward+backward), ``"linearize"``, or ``"jvp"`` (plain
        ``torch.func.jvp``, best for a handful of products).  A mode that failed once is not retried.
        ``batched_columns``: a dense Jacobian's columns in one vmapped pass however few they are (else a loop
        below ``VMAP_MIN_COLUMNS``); the same values up to rounding.
        """
        layout = self.layout(x)
        at = self.tangent_point(x)
        names = self._select(terms)
        single = len(names) == 1 and self.keep_graphs and not self.reduction.sharded
        ops: dict[str, JacobianOperator | RecomputedJacobian] = {}
        residuals, costs, gradient = [], {}, None
        for term in names:
            counters = self.counters if single else Counters()
            op, residual, term_costs, rebuild = self._linearize_term(term, at, layout, ctx, jvp_mode, counters,
                                                                     batched_columns)
            if not self.keep_graphs:
                g = op.vjp(residual)  # this term's share of the gradient, while its graph exists
                gradient = g if gradient is None else gradient + g
                op = RecomputedJacobian(rebuild, op, counters=counters, rebuilds=self.counters)
            ops[term] = op
            residuals.append(residual)
            costs.update(term_costs)
        costs = self.reduction.sum_floats(costs)
        if single:
            op_all: JacobianOperator | StackedOperator = ops[names[0]]
            residual = residuals[0]
        else:
            residual = torch.cat(residuals)
            op_all = StackedOperator(ops, counters=self.counters, reduction=self.reduction,
                                     known_vjp=None if gradient is None else (residual, gradient))
        return Linearization(op_all, residual, Evaluation(sum(costs.values()), costs), x=x, ctx=ctx, problem=self)

    def _linearize_term(
        self, term: str, at: Callable[[Tensor], dict[str, Tensor]], layout: ParamLayout, ctx: Any, jvp_mode: str,
        counters: Counters, batched_columns: bool = False,
    ) -> tuple[JacobianOperator, Tensor, dict[str, float], Callable[[], JacobianOperator]]:
        """The term's operator at ``x``, its whitened residual, block costs, and a function that builds the
        operator again (same forward; for terms whose graphs are not kept)."""
        names: list[tuple[str, int]] = []

        def fn(delta: Tensor) -> Tensor:
            blocks = self.term_blocks(term, at(delta), ctx)
            if not names:
                names.extend(self._block_vectors(blocks))
            return self._flat(blocks)

        mode = "jvp" if jvp_mode in self._failed_modes else jvp_mode
        check = [mode not in self._checked_modes]
        op = JacobianOperator(fn, layout.zeros(), counters=counters, mode=mode, check=check[0])
        self._vmap_settings(op, batched_columns)
        if mode == "transpose":
            self._checked_modes.add(mode)

        def rebuild() -> JacobianOperator:
            now = "jvp" if jvp_mode in self._failed_modes else jvp_mode
            again = JacobianOperator(fn, layout.zeros(), counters=Counters(), mode=now, check=check[0])
            check[0] = False  # the first product of a rebuilt operator checks what the first build would have
            again.on_linearize_failure = lambda err, now=now: self._remember_linearize_failure(now, err)
            self._vmap_settings(again, batched_columns)
            return again

        raw = op.value
        res_scale, jac_scale, costs = [], [], {}
        start = 0
        for name, size in names:
            r = raw[start : start + size]
            start += size
            w = self.weights.get(name, 1.0)
            sw = math.sqrt(w)
            loss = self.losses.get(name)
            if loss is None:
                rho = r * r
                rs = js = torch.full_like(r, sw)
            else:
                rho, rs, js = triggs_scales(r, loss)
                rs, js = rs * sw, js * sw
            costs[name] = float(0.5 * w * rho.sum())
            res_scale.append(rs)
            jac_scale.append(js)
        all_unit = all(self.weights.get(n, 1.0) == 1.0 and n not in self.losses for n, _ in names)
        if not all_unit:
            op.row_scale = torch.cat(jac_scale)
            residual = torch.cat(res_scale) * raw
        else:
            residual = raw
        op.on_linearize_failure = lambda err, mode=mode: self._remember_linearize_failure(mode, err)
        return op, residual, costs, rebuild

    def _vmap_settings(self, op: JacobianOperator, batched_columns: bool = False) -> None:
        """How ``op`` makes dense columns: vmapped unless a vmap failed here before (remembered through
        ``on_vmap_failure``), however few they are with ``batched_columns``."""
        op.vmap_columns = self._vmap_columns
        if batched_columns:
            op.vmap_min_columns = 1
        op.on_vmap_failure = lambda: setattr(self, "_vmap_columns", False)

    def _remember_linearize_failure(self, mode: str, err: BaseException) -> None:
        self._failed_modes.add(mode)
        self._checked_modes.discard(mode)
        self.linearize_error = f"{mode}: {type(err).__name__}: {err}"

    def make_preconditioner(self, info: PreconditionerInfo) -> Callable[[Tensor], Tensor] | None:
        """Call the user's preconditioner factory, if any."""
        return None if self.preconditioner is None else self.preconditioner(info)



class _SumGradients(torch.autograd.Function):
    """Identity on the parameters whose backward sums their gradients over the processes, in one collective
    (a sharded ``Problem.cost``: each process differentiates its own terms)."""

    @staticmethod
    def forward(ctx: Any, reduction: Reduction, *xs: Tensor) -> tuple[Tensor, ...]:
        ctx.reduction = reduction
        return tuple(x.clone() for x in xs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        total = ctx.reduction.sum(torch.cat([g.reshape(-1) for g in grads]))
        parts = torch.split(total, [g.numel() for g in grads])
        return (None, *(p.view_as(g) for p, g in zip(parts, grads, strict=True)))


class _GlobalValue(torch.autograd.Function):
    """``value`` (the cost summed over processes) in the forward; the gradient flows to this process's
    ``local`` cost, whose graph holds its own terms."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, value: Tensor) -> Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None
