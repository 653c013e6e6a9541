"""JacobianOperator and Problem.linearize against explicit Jacobians (torch.func.jacfwd) and autograd."""

import math

import pytest
import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix

from diffrender.linalg import Counters, JacobianOperator
from diffrender.problem import AxisAngleSO3, Cauchy, Huber, Problem, RobustLoss

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _fn(a: torch.Tensor, b: torch.Tensor):
    def fn(x):
        return torch.tanh(a @ x) * (b @ (x * x)) + torch.sin(x).sum()

    return fn


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    n, m = 5, 7
    a = torch.randn(m, n, generator=g, dtype=D)
    b = torch.randn(m, n, generator=g, dtype=D)
    x0 = torch.randn(n, generator=g, dtype=D)
    fn = _fn(a, b)
    return fn, x0, torch.func.jacfwd(fn)(x0), g


@pytest.mark.parametrize("mode", ["transpose", "linearize", "jvp"])
def test_products_match_explicit_jacobian(setup, mode):
    fn, x0, J, g = setup
    op = JacobianOperator(fn, x0, mode=mode, check=False)
    u = torch.randn(x0.numel(), generator=g, dtype=D)
    w = torch.randn(J.shape[0], generator=g, dtype=D)
    torch.testing.assert_close(op.value, fn(x0))
    torch.testing.assert_close(op.jvp(u), J @ u)
    torch.testing.assert_close(op.vjp(w), J.T @ w)
    torch.testing.assert_close(op.jtj(u), J.T @ (J @ u))
    # adjoint identity <J u, w> = <u, J^T w>
    assert math.isclose(float(op.jvp(u) @ w), float(u @ op.vjp(w)), rel_tol=1e-12)
    assert (op.counters.jvps, op.counters.vjps) == (3, 3)


def test_row_scale_and_dense_assembly(setup):
    fn, x0, J, g = setup
    s = torch.rand(J.shape[0], generator=g, dtype=D) + 0.5
    op = JacobianOperator(fn, x0, row_scale=s)
    Js = s[:, None] * J
    torch.testing.assert_close(op.dense_jtj(), Js.T @ Js)
    torch.testing.assert_close(op.diag_exact(), (Js * Js).sum(0))
    v = torch.randn(x0.numel(), generator=g, dtype=D)
    torch.testing.assert_close(op.jtj(v), Js.T @ (Js @ v))
    # the dense path's gradient: J~^T w from the columns, without going back through the function
    w = torch.randn(J.shape[0], generator=g, dtype=D)
    op._vjp_fn = None  # noqa: SLF001
    torch.testing.assert_close(op.columns_vjp(w), Js.T @ w)


def test_hutchinson_converges_to_exact_diag(setup):
    fn, x0, J, _ = setup
    op = JacobianOperator(fn, x0)
    exact = (J * J).sum(0)
    est = op.diag_hutchinson(4000, torch.Generator().manual_seed(1))
    # per-probe std <= sqrt(2) * diag, so 4000 probes give <= 2.3 % std; 10 % is > 4 sigma
    assert torch.all((est - exact).abs() <= 0.1 * exact)
    few = op.diag_hutchinson(4, torch.Generator().manual_seed(1))
    assert torch.all(few >= 0)
    # seeded => reproducible
    torch.testing.assert_close(few, op.diag_hutchinson(4, torch.Generator().manual_seed(1)), rtol=0, atol=0)
    err_few = float(((op.diag_hutchinson(4, torch.Generator().manual_seed(2)) - exact) / exact).abs().mean())
    err_many = float(((est - exact) / exact).abs().mean())
    assert err_many < err_few


def test_linearize_failure_falls_back_to_jvp():
    def fn(x):  # data-dependent size: linearize's tracing cannot read a tensor value into Python
        k = int((x.detach() > 0).sum())
        return torch.cat([x[:k] ** 2, torch.exp(x)])

    x0 = torch.tensor([0.5, 2.0, -1.0], dtype=D)
    J = torch.func.jacfwd(lambda x: torch.cat([x[:2] ** 2, torch.exp(x)]))(x0)
    failures = []
    op = JacobianOperator(fn, x0, mode="linearize")
    op.on_linearize_failure = failures.append
    u = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    torch.testing.assert_close(op.jvp(u), J @ u)
    torch.testing.assert_close(op.jvp(u), J @ u)
    assert len(failures) == 1 and op.mode == "jvp"


class _NoDoubleBackward(torch.autograd.Function):
    """exp with a backward that is not differentiable (detached): the transpose trick cannot use it."""

    @staticmethod
    def forward(x):
        return torch.exp(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g.detach() * y.detach()

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t * y

    generate_vmap_rule = True


def test_transpose_mode_checks_itself_and_falls_back():
    x0 = torch.tensor([0.1, -0.3], dtype=D)
    fn = lambda x: _NoDoubleBackward.apply(x) * 2.0 + x  # noqa: E731
    J = torch.diag(2 * torch.exp(x0) + 1)
    failures = []
    op = JacobianOperator(fn, x0, mode="transpose")
    op.on_linearize_failure = failures.append
    u = torch.tensor([1.0, -2.0], dtype=D)
    torch.testing.assert_close(op.vjp(u), J.T @ u)
    # the one-product check catches the wrong (or failing) double backward; plain jvp takes over
    out = op.jvp(u)
    assert len(failures) == 1 and op.mode == "jvp"
    torch.testing.assert_close(out, J @ u)


def test_wrong_linearize_is_detected_and_replaced():
    """torch.func.linearize miscompiles So3 log -> rotation-matrix chains; the operator must notice."""
    from kornia.geometry.liegroup import So3

    r0 = torch.tensor([0.2, -0.4, 0.9], dtype=D)
    z0 = torch.tensor([0.3, 0.1, -0.5], dtype=D)

    def fn(v):
        rr = (So3.exp(v[3:][None]) * So3.exp(r0[None])).log()
        return axis_angle_to_rotation_matrix(rr)[0] @ (z0 + v[:3])

    x0 = torch.zeros(6, dtype=D)
    J = torch.func.jacfwd(fn)(x0)
    _, raw = torch.func.linearize(fn, x0)  # is this torch's linearize wrong here? (it is in 2.13)
    wrong = not all(torch.allclose(raw(e), J @ e, rtol=1e-8, atol=1e-10) for e in torch.eye(6, dtype=D))
    failures = []
    op = JacobianOperator(fn, x0, mode="linearize")
    op.on_linearize_failure = failures.append
    for e in torch.eye(6, dtype=D):
        torch.testing.assert_close(op.jvp(e), J @ e)
    assert len(failures) == int(wrong) and op.mode == ("jvp" if wrong else "linearize")


class _Convex(RobustLoss):
    """rho'' > 0 exercises the non-trivial branch of Triggs' correction."""

    def evaluate(self, s):
        return s + 0.3 * s * s, 1 + 0.6 * s, torch.full_like(s, 0.6)


def _robust_problem():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 4, generator=g, dtype=D)
    t = torch.randn(9, generator=g, dtype=D)

    def residuals(x, ctx):
        assert ctx == "prepared"
        z = x["p"]
        rot = axis_angle_to_rotation_matrix(x["rot"][None])[0]
        return {
            "data": torch.sin(a @ z) * 3 + (rot @ z[:3]).sum(),
            "prior": z - 0.3,
            "outl": 4 * torch.cos(t * z.sum()) + t,
        }

    problem = Problem(
        residuals,
        prepare=lambda x: "prepared",
        manifolds={"rot": AxisAngleSO3()},
        weights={"data": 2.0, "prior": 0.5, "outl": 1.5},
        losses={"data": Huber(0.7), "outl": Cauchy(1.3), "prior": _Convex()},
    )
    x = {"p": torch.randn(4, generator=g, dtype=D), "rot": torch.tensor([0.2, -0.4, 0.9], dtype=D)}
    return problem, x


def test_robust_gradient_equals_autograd_of_cost():
    problem, x = _robust_problem()
    ctx = problem.prepare_context(x)
    lin = problem.linearize(x, ctx)
    grad = lin.op.vjp(lin.residual)
    layout = problem.layout(x)

    def cost_of_delta(delta):
        return problem.cost(layout.retract(x, delta), ctx)[0]

    ref = torch.func.grad(cost_of_delta)(layout.zeros())
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-10)
    # the cost reported by the linearization is the robust cost itself
    assert math.isclose(lin.evaluation.cost, float(problem.cost(x, ctx)[0]), rel_tol=1e-12)
    ev = problem.evaluate(x, ctx)
    assert math.isclose(ev.cost, sum(ev.block_costs.values()), rel_tol=1e-12)


def test_robust_gn_hessian_is_irls_weighted():
    """For Huber/Cauchy (rho'' <= 0) Ceres' correction reduces to IRLS: J~^T J~ = J^T diag(w rho') J."""
    problem, x = _robust_problem()
    ctx = problem.prepare_context(x)
    lin = problem.linearize(x, ctx)
    layout = problem.layout(x)
    raw = lambda d: problem.residual_blocks(layout.retract(x, d), ctx)["data"]  # noqa: E731
    J = torch.func.jacfwd(raw)(layout.zeros())
    r = raw(layout.zeros())
    _, rho1, _ = Huber(0.7).evaluate(r * r)
    H_data = J.T @ ((2.0 * rho1)[:, None] * J)
    m_data = r.numel()
    cols = lin.op.columns()[:m_data]
    torch.testing.assert_close(cols.T @ cols, H_data)


def test_loss_derivatives_match_autograd():
    s = torch.tensor([0.01, 0.3, 0.49, 0.5, 2.0, 30.0], dtype=D)
    for loss in [Huber(0.7), Cauchy(1.3)]:
        rho, rho1, rho2 = loss.evaluate(s)
        for i in range(s.numel()):
            si = s[i]
            if isinstance(loss, Huber) and abs(float(si) - 0.49) < 1e-12:
                continue  # kink of rho' at s = delta^2
            rho_fn = lambda v, loss=loss: loss.evaluate(v)[0]  # noqa: E731
            d1 = torch.func.grad(rho_fn)(si)
            d2 = torch.func.grad(torch.func.grad(rho_fn))(si)
            torch.testing.assert_close(rho1[i], d1)
            torch.testing.assert_close(rho2[i], d2)
    # small residuals are untouched
    torch.testing.assert_close(Huber(1.0).evaluate(s[:2])[0], s[:2])


def test_axis_angle_retract_left_multiplies_and_wraps():
    x = torch.tensor([[0.3, -0.2, 0.5], [0.0, 0.0, 3.1]], dtype=D)
    delta = torch.tensor([[0.1, 0.05, -0.2], [0.0, 0.0, 0.2]], dtype=D)
    out = AxisAngleSO3().retract(x, delta.reshape(-1))
    R = axis_angle_to_rotation_matrix
    torch.testing.assert_close(R(out), R(delta) @ R(x))
    # 3.1 + 0.2 > pi wraps to the principal angle 2 pi - 3.3 about -z
    assert float(out[1].norm()) <= math.pi
    torch.testing.assert_close(out[1], torch.tensor([0.0, 0.0, 3.3 - 2 * math.pi], dtype=D))
    # derivative of the retraction at delta = 0 in both modes, incl. the identity rotation
    x0 = torch.zeros(1, 3, dtype=D)
    jf = torch.func.jacfwd(lambda d: R(AxisAngleSO3().retract(x0, d)).reshape(-1))(torch.zeros(3, dtype=D))
    jr = torch.func.jacrev(lambda d: R(AxisAngleSO3().retract(x0, d)).reshape(-1))(torch.zeros(3, dtype=D))
    torch.testing.assert_close(jf, jr)
    eps = 1e-6
    fd = torch.stack([(R(AxisAngleSO3().retract(x0, e * eps)) - R(AxisAngleSO3().retract(x0, -e * eps)))
                      .reshape(-1) / (2 * eps) for e in torch.eye(3, dtype=D)], 1)
    torch.testing.assert_close(jf, fd, atol=1e-8, rtol=1e-6)


def test_problem_rejects_bad_input():
    p = Problem(lambda x, ctx: x["a"])
    with pytest.raises(ValueError, match="'b'"):
        p.layout({"a": torch.zeros(2), "b": torch.zeros(2, dtype=D)})
    with pytest.raises(ValueError, match="weight"):
        Problem(lambda x, ctx: x["a"], weights={"a": -1.0})
    with pytest.raises(ValueError, match="unknown residual block 'nope'"):
        Problem(lambda x, ctx: x["a"], weights={"nope": 1.0}).evaluate({"a": torch.zeros(2)})


def test_float32_operator_follows_dtype():
    x0 = torch.tensor([0.1, 0.2], dtype=torch.float32)
    op = JacobianOperator(lambda x: torch.stack([x[0] * x[1], torch.exp(x[0])]), x0, counters=Counters())
    assert op.jtj(torch.ones(2)).dtype == torch.float32
    assert op.diag_hutchinson(2, torch.Generator().manual_seed(0)).dtype == torch.float32


class _Scale(torch.autograd.Function):
    """g * s, linear in g (symmetric: its backward is itself), with no vmap rule."""

    @staticmethod
    def forward(g, s):
        return g * s

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, h):
        (s,) = ctx.saved_tensors
        return _Scale.apply(h, s), None  # its own transpose, applied again: no vmap under the transposed map


class _Cube(torch.autograd.Function):
    """x**3 elementwise whose backward is itself a custom op without a vmap rule (like the compiled sweep's
    hand-written J^T), so the transposed map u -> J u cannot be vmap-ed."""

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _Scale.apply(g, 3 * x * x)

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 3 * x * x * t


def test_dense_jacobian_of_a_function_without_vmap_keeps_the_transpose_mode():
    # n > VMAP_MIN_COLUMNS: columns() tries one vmap-ed pass, which fails here. The JVP map must be built
    # outside that vmap, so the failure is not blamed on the transpose mode (a forward per product since).
    d = torch.float64
    a = torch.randn(30, 12, dtype=d, generator=torch.Generator().manual_seed(3))
    x0 = torch.linspace(-1, 1, 12, dtype=d)
    problem = Problem(lambda p, ctx: {"r": _Cube.apply(a @ p["x"])})
    lin = problem.linearize({"x": x0})
    jtj = lin.op.dense_jtj()
    j = torch.autograd.functional.jacobian(lambda x: (a @ x) ** 3, x0)
    torch.testing.assert_close(jtj, j.T @ j, rtol=1e-10, atol=1e-10)
    assert lin.op.mode == "transpose" and problem.linearize_error is None
    again = problem.linearize({"x": x0 + 0.1})
    assert again.op.vmap_columns is False  # the problem remembers: no second failing attempt
    jv = torch.autograd.functional.jacobian(lambda x: (a @ x) ** 3, x0 + 0.1)
    torch.testing.assert_close(again.op.dense_jtj(), jv.T @ jv, rtol=1e-10, atol=1e-10)
    # the inspection's batched columns go the same way: first product outside vmap, the mode kept
    from diffrender.inspection import Jacobian
    fresh = Problem(lambda p, ctx: {"r": _Cube.apply(a @ p["x"])})
    jac = Jacobian(fresh, {"x": x0})
    torch.testing.assert_close(jac.columns(range(12)), j, rtol=1e-10, atol=1e-10)
    assert jac.op.mode == "transpose" and fresh.linearize_error is None
