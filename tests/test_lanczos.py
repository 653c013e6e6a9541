"""Lanczos with full reorthogonalization: Ritz values against eigvalsh, Ritz vectors, preconditioning, breakdown."""

import pytest
import torch

from diffrender.linalg.lanczos import lanczos

D = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _sym(spectrum: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(spectrum.numel(), spectrum.numel(), generator=g, dtype=D))
    return q @ torch.diag(spectrum) @ q.T


def _start(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=D)


def test_full_krylov_space_gives_every_eigenvalue():
    a = _sym(torch.logspace(-3, 4, 40, dtype=D), 0)
    res = lanczos(lambda v: a @ v, _start(40), 40)
    ref = torch.linalg.eigvalsh(a)
    assert res.exhausted and res.converged and res.products == 40
    torch.testing.assert_close(res.values, ref, rtol=1e-6, atol=1e-9 * float(ref[-1]))
    # the extremes within 1e-6 relative, and Ritz vectors are orthonormal eigenvectors
    assert abs(float(res.values[0] / ref[0]) - 1) < 1e-6 and abs(float(res.values[-1] / ref[-1]) - 1) < 1e-6
    x = res.vectors
    torch.testing.assert_close(x.T @ x, torch.eye(40, dtype=D), atol=1e-10, rtol=0)
    torch.testing.assert_close(a @ x, x * res.values, atol=1e-8 * float(ref[-1]), rtol=0)


def test_separated_extremes_converge_in_few_steps_and_stop_early():
    # extremes 0.01 and 100, the rest clustered in [1, 2]: both ends converge long before n steps
    spectrum = torch.cat([torch.tensor([0.01, 100.0], dtype=D), torch.linspace(1, 2, 198, dtype=D)])
    a = _sym(spectrum, 2)
    res = lanczos(lambda v: a @ v, _start(200), 60, want=1, tol=1e-10)
    assert res.converged and not res.exhausted and res.steps < 60
    assert abs(float(res.values[0]) / 0.01 - 1) < 1e-6
    assert abs(float(res.values[-1]) / 100.0 - 1) < 1e-6
    (lo,), v = res.smallest(1)
    (hi,), _ = res.largest(1)
    assert float(lo) == float(res.values[0]) and float(hi) == float(res.values[-1])
    # the residual bound is an actual bound on ||A v - theta v||
    assert float(torch.linalg.vector_norm(a @ v[:, 0] - lo * v[:, 0])) <= float(res.residuals[0]) * 1.01 + 1e-12


def test_preconditioned_gives_the_pencil_eigenpairs():
    """With M^-1 applied, the Ritz values are eigenvalues of M^-1 A (A x = theta M x), x M-orthonormal."""
    n = 30
    a = _sym(torch.logspace(-2, 3, n, dtype=D), 3)
    g = torch.Generator().manual_seed(4)
    b = torch.randn(n, n, generator=g, dtype=D)
    m = b @ b.T / n + torch.eye(n, dtype=D)  # SPD, not diagonal
    m_inv = torch.linalg.inv(m)
    res = lanczos(lambda v: a @ v, _start(n), n, precond=lambda v: m_inv @ v)
    lc = torch.linalg.cholesky(m)
    li = torch.linalg.inv(lc)
    ref = torch.linalg.eigvalsh(li @ a @ li.T)
    torch.testing.assert_close(res.values, ref, rtol=1e-6, atol=1e-9 * float(ref[-1]))
    x = res.vectors
    torch.testing.assert_close(x.T @ m @ x, torch.eye(n, dtype=D), atol=1e-9, rtol=0)
    torch.testing.assert_close(a @ x, (m @ x) * res.values, atol=1e-7 * float(ref[-1]), rtol=0)


def test_rank_deficient_operator_exhausts_early_and_finds_zero():
    g = torch.Generator().manual_seed(5)
    b = torch.randn(3, 25, generator=g, dtype=D)
    a = b.T @ b  # rank 3: Krylov space of dimension 4 at most
    res = lanczos(lambda v: a @ v, _start(25), 25)
    assert res.exhausted and res.steps <= 6
    ref = torch.linalg.eigvalsh(a)
    assert abs(float(res.values[0])) < 1e-10 * float(ref[-1])
    torch.testing.assert_close(res.values[-3:], ref[-3:], rtol=1e-9, atol=0)
    # the zero Ritz vector is in the null space
    assert float(torch.linalg.vector_norm(a @ res.vectors[:, 0])) < 1e-9 * float(ref[-1])


def test_follows_the_start_vectors_dtype():
    a = _sym(torch.linspace(1, 5, 6, dtype=D), 6).float()
    res = lanczos(lambda v: a @ v, _start(6).float(), 6)
    assert res.vectors.dtype == torch.float32
    torch.testing.assert_close(res.values, torch.linalg.eigvalsh(a.double()), rtol=1e-5, atol=1e-5)


def test_bad_input_raises_clear_errors():
    a = torch.eye(3, dtype=D)
    with pytest.raises(ValueError, match="flat"):
        lanczos(lambda v: a @ v, torch.ones(3, 1, dtype=D), 3)
    with pytest.raises(ValueError, match="zero"):
        lanczos(lambda v: a @ v, torch.zeros(3, dtype=D), 3)
    with pytest.raises(ValueError, match="steps"):
        lanczos(lambda v: a @ v, torch.ones(3, dtype=D), 0)
