"""Lanczos on a symmetric operator given by products: extreme eigenvalues and their eigenvectors.

``k`` steps from a start vector ``q_1`` build an orthonormal basis ``Q = [q_1 .. q_k]`` of the Krylov
space ``span{q_1, A q_1, .., A^{k-1} q_1}`` and the tridiagonal ``T = Q^T A Q``; the eigenpairs
``(theta, s)`` of ``T`` give Ritz pairs ``(theta, Q s)``, and the extreme ones converge first (Kaniel-Paige
theory; Golub & Van Loan, Matrix Computations, 4th ed., sec. 10.1).  The residual of a Ritz pair is known
without another product: ``||A Q s - theta Q s|| = |beta_k s_k|``.  Each new vector is orthogonalized
against all previous ones twice (classical Gram-Schmidt, "twice is enough"), so ``Q`` stays orthonormal in
floating point and no spurious copies of converged eigenvalues appear; the price is ``O(n k)`` memory, so
this is for small ``k`` (tens to a few hundred).

**Preconditioned.**  With ``precond`` applying ``M^-1`` (symmetric positive definite), the eigenvalues of
``M^-1 A`` (those of ``M^-1/2 A M^-1/2``, what decides PCG's convergence) come from Lanczos on ``A M^-1``,
which is self-adjoint in the ``M^-1`` inner product ``<u, v> = u^T M^-1 v``: only products with ``A``
and ``M^-1`` are needed, one of each per step.  The Ritz vectors returned are then eigenvectors of
``M^-1 A`` (``A x = theta M x``), ``M``-orthonormal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LanczosResult", "lanczos"]


@dataclass
class LanczosResult:
    """Ritz pairs after ``steps`` Lanczos steps.

    ``values: (k,)`` ascending Ritz values (float64); ``vectors: (n, k)`` the matching Ritz vectors (unit
    norm, or ``M``-orthonormal when preconditioned); ``residuals: (k,)`` the bounds ``|beta_k s_k|`` on
    ``||A x - theta x||`` (in the ``M^-1`` norm when preconditioned); ``products``: operator products
    (and as many preconditioner applications plus one when preconditioned); ``exhausted``: the Krylov
    space became invariant, so the Ritz values are exact eigenvalues of ``A`` restricted to it (e.g.
    ``steps >= n``); ``converged``: the ``want`` smallest and ``want`` largest Ritz pairs have residuals
    ``<= tol * max|theta|``.
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    steps: int
    products: int
    exhausted: bool
    converged: bool

    def smallest(self, k: int = 1) -> tuple[Tensor, Tensor]:
        """The ``k`` smallest Ritz values ``(k,)`` and vectors ``(n, k)``."""
        return self.values[:k], self.vectors[:, :k]

    def largest(self, k: int = 1) -> tuple[Tensor, Tensor]:
        """The ``k`` largest Ritz values ``(k,)`` and vectors ``(n, k)``, largest first."""
        return self.values.flip(0)[:k], self.vectors.flip(1)[:, :k]


def _ritz(alpha: list[float], beta: list[float]) -> tuple[Tensor, Tensor]:
    """Eigenpairs of the ``j x j`` symmetric tridiagonal matrix ``(alpha, beta[:j-1])`` in float64."""
    j = len(alpha)
    t = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if j > 1:
        off = torch.tensor(beta[: j - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(t)


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    steps: int,
    *,
    precond: Callable[[Tensor], Tensor] | None = None,
    want: int = 1,
    tol: float = 1e-8,
    check_every: int = 5,
) -> LanczosResult:
    """Ritz pairs of the symmetric operator ``matvec: (n,) -> (n,)`` (of ``M^-1 A`` with ``precond``).

    ``start: (n,)`` the first Krylov vector (any nonzero vector; a random one for a generic start; its
    dtype and device are used throughout); at most ``steps`` products (capped at ``n``).  Every
    ``check_every`` steps the ``want`` smallest and ``want`` largest Ritz pairs are tested and the
    iteration stops once all have residual ``<= tol * max|theta|``, or when the Krylov space is invariant.
    """
    if start.dim() != 1:
        raise ValueError(f"lanczos: start must be a flat (n,) vector, got shape {tuple(start.shape)}")
    if steps < 1:
        raise ValueError(f"lanczos: steps must be >= 1, got {steps}")
    n = start.numel()
    steps = min(int(steps), n)
    eps = torch.finfo(start.dtype).eps
    q = start.detach().clone()
    p = precond(q) if precond is not None else q
    norm2 = float(q @ p)
    if not norm2 > 0:
        raise ValueError("lanczos: the start vector is zero (or not positive in the preconditioner's norm)")
    q, p = q / norm2**0.5, p / norm2**0.5
    qs, ps = [q], [p]  # basis (orthonormal in the M^-1 inner product) and its M^-1 images
    alpha: list[float] = []
    beta: list[float] = []
    products, exhausted, converged = 0, False, False
    anorm = 0.0  # running estimate of ||T||, for the breakdown test
    for j in range(steps):
        w = matvec(ps[j])  # (A M^-1) q_j = A p_j
        products += 1
        big_q, big_p = torch.stack(qs, 1), torch.stack(ps, 1)
        c = big_p.T @ w  # <q_i, w> in the M^-1 inner product
        w = w - big_q @ c
        pw = precond(w) if precond is not None else w
        c2 = big_p.T @ w  # second Gram-Schmidt pass ("twice is enough")
        w = w - big_q @ c2
        pw = pw - big_p @ c2 if precond is not None else w
        alpha.append(float(c[j] + c2[j]))
        b = max(float(w @ pw), 0.0) ** 0.5
        anorm = max(anorm, abs(alpha[-1]) + b + (beta[-1] if beta else 0.0))
        beta.append(b)
        # invariant Krylov space (T's eigenpairs are exact): w is rounding noise, of order eps ||A||
        if b <= 10 * eps * max(anorm, 1e-300):
            exhausted = True
            break
        if j + 1 == n:
            exhausted = True
            break
        if (j + 1) % check_every == 0 and j + 1 < steps:
            theta, s = _ritz(alpha, beta)
            res = (b * s[-1]).abs()
            k = min(want, len(alpha))
            wanted = torch.cat([res[:k], res[-k:]])
            if bool((wanted <= tol * theta.abs().max()).all()):
                converged = True
                break
        qs.append(w / b)
        ps.append(pw / b)
    theta, s = _ritz(alpha, beta)
    k = len(alpha)
    res = torch.zeros(k, dtype=torch.float64) if exhausted else (beta[k - 1] * s[-1]).abs()
    if not converged:
        w_ = min(want, k)
        wanted = torch.cat([res[:w_], res[-w_:]])
        converged = bool((wanted <= tol * theta.abs().max().clamp_min(1e-300)).all())
    basis = torch.stack(ps[:k], 1)  # Ritz vectors of M^-1 A are M^-1 (Q s) = P s
    vectors = basis @ s.to(basis.dtype).to(basis.device)
    return LanczosResult(theta, vectors, res, k, products, exhausted, converged)
