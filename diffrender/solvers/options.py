"""Every solver's options as plain dataclasses (flat keyword arguments), importable without torch.

The solver classes read them (``Solver.Options``); ``diffrender.config`` turns them into Hydra schemas,
so ``solver.<option>=...`` works for every option and a typo fails when the config is composed.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SolverOptions", "SecondOrderOptions", "LevenbergMarquardtOptions", "GaussNewtonOptions",
           "RadiusOptions", "DoglegOptions", "NewtonCGOptions", "AdamOptions", "ChainOptions", "SOLVER_OPTIONS"]


@dataclass
class SolverOptions:
    """Options shared by all solvers (Ceres defaults for the tolerances)."""

    max_iterations: int = 50
    function_tolerance: float = 1e-6  # stop when |cost_change| / cost <= this
    gradient_tolerance: float = 1e-10  # stop when max|gradient| <= this
    parameter_tolerance: float = 1e-8  # stop when |step| <= this * (|x| + this)
    max_seconds: float | None = None  # limit on one solve() call's own seconds (time in callbacks excluded)
    verbose: bool = False  # print each iteration record


@dataclass
class SecondOrderOptions(SolverOptions):
    """Options of the linearize-then-step solvers (searches and descents read theirs from here too)."""

    gradient_tolerance: float = 1e-12  # see gradient_test: relative to max|g(x0)| by default
    linear_solver: str = "auto"  # "dense" (Cholesky on the assembled J^T J), "cg" (matrix-free PCG), "auto"
    dense_threshold: int = 64  # "auto" picks dense when n <= this; exact diag(J^T J) from columns too
    max_cg_iterations: int = 100
    cg_rtol: float = 1e-10  # CG residual tolerance relative to ||J^T r||
    eta: float = 0.1  # Nash-Sofer forcing; <= 0 disables it
    hutchinson_probes: int = 16  # VJPs per diag(J^T J) estimate when n > dense_threshold
    seed: int = 0  # seeds the Hutchinson probes (with the iteration number)
    # "transpose" (VJP of the reused VJP), "linearize", "jvp" (plain torch.func.jvp per product),
    # "auto" = "transpose": measured on teapot_pose (n = 3) too, it beats plain jvp (0.08 vs 0.12 s per
    # iteration) and skips forward-mode AD's one-time set-up
    jvp_mode: str = "auto"
    # "relative" (default): max|g| <= gradient_tolerance * max|g(x0)|, which does not depend on the scale of
    # the residuals (an absolute test stops a problem whose optimum sits at a tiny cost while the cost
    # still falls 14 % per iteration) and does no worse than "max_norm" on MGH 1-19 (same problems solved,
    # median residual evaluations 19 / 22 with the dense / CG path against 19 / 22 at tolerance 1e-12; at
    # 1e-10 it stopped Brown badly scaled at f = 2e-10 on one path);
    # "max_norm": max|g| <= gradient_tolerance (Ceres); "cosine": MINPACK's scale-invariant test, the
    # largest |cos| of the angle between the residual and a Jacobian column, max_j |g_j| / (||J_j|| ||r||),
    # which never fires on zero-residual problems (median 25 / 26 evaluations on MGH)
    gradient_test: str = "relative"
    # "minpack" (default): |cost_change| / cost <= function_tolerance and the predicted relative decrease
    # that small too (MINPACK's ftol test), so a rejected step whose model still promises a large decrease
    # does not end the solve (in float32 Ceres' rule stopped an LM run on extended Rosenbrock at cost 11 on a
    # rejected step whose gain ratio was 2e-7); "ceres": the actual change alone, on any finite trial
    function_test: str = "minpack"
    # the Gauss-Newton model decrease of a CG step from one extra JVP (True) or from CG's own recurrences,
    # -Q(delta) + 1/2 delta^T (lambda D^2) delta, at no cost (False)
    exact_model_decrease: bool = False
    # CG's J^T J products over this fraction of the problem's sampled terms (e.g. one term per view), a
    # different subset at each linearization, scaled to stay unbiased; the gradient and the cost always use
    # every term (Byrd, Chin, Neveitt & Nocedal 2011). 1: exact curvature. No effect on single-term problems.
    curvature_subsample: float = 1.0
    # Hutchinson's diag(J^T J) afresh every this many linearizations, reused in between (the damping's scaling
    # and the Jacobi preconditioner change slowly; the probes are most of an iteration when CG is short)
    diagonal_every: int = 1
    # build the linearization at each trial point (one forward with a graph instead of a plain evaluation):
    # an accepted step then needs no second forward at its new point; a rejected one wasted a graph
    linearize_trials: bool = False
    # on the dense path (n <= dense_threshold), the gradient J~^T r~ from the n assembled columns instead of one
    # more VJP (a render-sized sweep back for a matrix-vector product; equal up to rounding)
    gradient_from_columns: bool = True
    # the dense Jacobian's columns in one vmapped pass (when the residual function supports vmap) however few
    # they are; the compiled sweeps then share each pair's geometry over the columns (teapot_pose's 3: 15 ->
    # 9 ms, scripts/bench_dense.py). False: one JVP per column below 8 columns. Equal up to rounding.
    batched_columns: bool = True
    # after an accepted step that CG cut short (max_cg_iterations reached) whose gain ratio rho exceeds this,
    # try the step doubled, and doubled again up to max_extensions times while the cost keeps falling, keeping
    # the lowest (a truncated Newton step along which the cost falls twice as fast as the Gauss-Newton model
    # says is short of the model's reach, not beyond it). 0: off.
    extend_truncated: float = 0.0
    max_extensions: int = 1
    # extend (as above) also a step that CG did not cut short (a dense one, or CG converged) when the damping
    # adds less than this share to the model's curvature along it, lambda ||D delta||^2 < share ||J~ delta||^2:
    # the step is then the Gauss-Newton model's own minimizer, and rho > extend_truncated says the cost keeps
    # falling beyond it. A step the damping shortened is never extended. 0: only CG-truncated steps.
    extend_damping_share: float = 0.0
    # how the next extension's length is chosen: "doubling" (2t after t), or "quadratic": the minimizer of
    # the quadratic through the cost and its slope at 0 and the cost at t, kept within [1.5t, 2t], and no
    # further trial where that minimizer lies short of 1.25t (the trial that would fail is not paid for)
    extension_rule: str = "doubling"
    # when above max_cg_iterations: after an accepted step that CG cut short, whose gain ratio says the model
    # held (0.75 <= rho, and below extend_truncated where that is on), the next step's CG cap doubles, up to
    # this; rho >= extend_truncated, rho < 1/4 or a rejection set it back to max_cg_iterations (1/4 <= rho <
    # 3/4 keeps it). More CG products are paid only where the Gauss-Newton model has just proved accurate (a
    # fit's tail), not where it under-predicts (forward tracking's job) or fails. 0: the cap stays fixed.
    max_cg_iterations_grown: int = 0


@dataclass
class LevenbergMarquardtOptions(SecondOrderOptions):
    """Ceres' defaults: initial trust radius 1e4 (``lambda = 1e-4``), radius in [1e-32, 1e16]."""

    initial_damping: float = 1e-4
    min_damping: float = 1e-16  # = 1 / max_trust_region_radius
    max_damping: float = 1e32  # = 1 / min_trust_region_radius; exceeding it stops the solve
    min_relative_decrease: float = 1e-3
    min_diagonal: float = 1e-6
    max_diagonal: float = 1e32
    monotone_diagonal: bool = True  # D^2 = running max of diag(J^T J) over the accepted points (MINPACK)
    # "jacobi": damping lambda D^2 with Marquardt's D^2 = diag(J^T J) (scale-free, needs the diagonal at every
    # point); "identity": Levenberg's lambda s I with s = max diag(J^T J) at the start, Nielsen's (1999)
    # tau * max diag initial damping (initial_damping is tau): the diagonal is needed once, and directions
    # no residual sees stay damped
    damping_scaling: str = "jacobi"
    # geodesic acceleration (Transtrum & Sethna 2012): add half the second-order correction of the step from
    # one more residual evaluation at x + h v and one more linear solve, used when it is less than this
    # fraction of the step (2 |D a| / |D v| <= alpha; Transtrum & Sethna's 0.75). 0: off
    geodesic_acceleration: float = 0.0
    # on a rejected step, raise lambda to at least the model's curvature along it, ||J~ delta||^2 / ||D delta||^2,
    # which halves the next step along that direction; Nielsen's doubling alone needs ~10 rejections to climb
    # from a lambda of 1e-16 (where a run of accepted steps leaves it) to where the step changes
    rejection_curvature_floor: bool = True


@dataclass
class GaussNewtonOptions(SecondOrderOptions):
    armijo: float = 1e-4  # sufficient-decrease constant c
    backtrack: float = 0.5  # step-length factor per rejected trial
    max_line_search_steps: int = 30


@dataclass
class RadiusOptions(SecondOrderOptions):
    """A radius-sized trust region (Ceres' defaults) and the scaling of its norm ``||D delta||``."""

    initial_radius: float = 1e4
    min_radius: float = 1e-32
    max_radius: float = 1e16
    min_relative_decrease: float = 1e-3
    jacobi_scaling: bool = True  # D^2 = clamp(diag J^T J) as LM's (running max); False: D = I
    min_diagonal: float = 1e-6
    max_diagonal: float = 1e32
    monotone_diagonal: bool = True


@dataclass
class DoglegOptions(RadiusOptions):
    pass


@dataclass
class NewtonCGOptions(RadiusOptions):
    pass


@dataclass
class AdamOptions(SolverOptions):
    """Adam's options; ``function_tolerance`` and ``parameter_tolerance`` default to off (0)."""

    max_iterations: int = 1000
    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    function_tolerance: float = 0.0
    parameter_tolerance: float = 0.0


@dataclass
class ChainOptions:
    """A chain's budgets, shared by its solvers (each gets what is left; their own limits are overridden)."""

    max_iterations: int = 500
    max_seconds: float | None = None
    # a later solver stops when its best cost has not fallen by more than patience_tolerance x the chain's
    # initial cost in this many iterations (0: never). Off by default: Adam's best cost on the shape scenes
    # stalls for hundreds of iterations before it falls again (bench_fit side by side, 60 s: patience 200
    # stopped bunny_silhouette at 13.04 after 19 s, where the chain without it reaches 11.16; README, Solvers)
    patience: int = 0
    patience_tolerance: float = 1e-6


# Hydra schema name -> (solver class path, its options)
SOLVER_OPTIONS: dict[str, tuple[str, type]] = {
    "lm": ("diffrender.solvers.LevenbergMarquardt", LevenbergMarquardtOptions),
    "gn": ("diffrender.solvers.GaussNewton", GaussNewtonOptions),
    "dogleg": ("diffrender.solvers.Dogleg", DoglegOptions),
    "newton_cg": ("diffrender.solvers.NewtonCG", NewtonCGOptions),
    "adam": ("diffrender.solvers.Adam", AdamOptions),
}
