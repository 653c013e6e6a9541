"""The problems of the solver regression record (tests/regression/solver_runs.json).

Shared by the recorder (``python tests/regression/record_solver_runs.py``) and the test that replays
them (tests/test_solver_regression.py), so both build exactly the same problems. Each case names a
problem, a solver class and the solver's options spelled out in full as they were when recorded.
Problems: MGH 1-19 (float64, standard starts), an extended Rosenbrock with n = 80 (matrix-free CG with
Hutchinson diagonals), a rotation fit with a robust loss on the axis-angle manifold, and the
teapot_pose scene (float64, 24 px, one σ) through the renderer.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # mgh_problems
from mgh_problems import PROBLEMS  # noqa: E402

D = torch.float64

# Costs of converged problems sit at rounding level (1e-20 .. 1e-30) and differ between CPUs with other
# vector units (AVX-512 here vs AVX2) or MKL code paths. The record is made, and replayed, in one
# portable floating-point environment: torch's baseline (non-vectorized) kernels, MKL's conditional
# numerical reproducibility in COMPATIBLE mode, one thread. Both must be set before torch starts.
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1"}


def pinned() -> bool:
    import os

    return all(os.environ.get(k) == v for k, v in PINNED_ENV.items())

# Options of the code the record was made from (commit in solver_runs.json), every one spelled out.
COMMON = dict(function_tolerance=1e-8, gradient_tolerance=1e-10, parameter_tolerance=1e-8, max_seconds=None,
              verbose=False)
SECOND_ORDER = dict(**COMMON, dense_threshold=64, max_cg_iterations=100, cg_rtol=1e-10, eta=0.1,
                    hutchinson_probes=16, seed=0, jvp_mode="auto")
LM = dict(**SECOND_ORDER, initial_damping=1e-4, min_damping=1e-16, max_damping=1e32, min_relative_decrease=1e-3,
          min_diagonal=1e-6, max_diagonal=1e32, monotone_diagonal=True)
GN = dict(**SECOND_ORDER, armijo=1e-4, backtrack=0.5, max_line_search_steps=30)
ADAM = dict(max_iterations=150, function_tolerance=0.0, gradient_tolerance=1e-10, parameter_tolerance=0.0,
            max_seconds=None, verbose=False, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)


def mgh(number: int):
    from diffrender.problem import Problem

    p = PROBLEMS[number - 1]
    return Problem(lambda x, ctx, p=p: p.residual(x["x"])), {"x": p.start()}


def rosenbrock_80():
    from diffrender.problem import Problem

    def residuals(x, ctx):
        z = x["z"]
        return {"a": 10 * (z[1::2] - z[0::2] ** 2), "b": 1 - z[0::2]}

    return Problem(residuals), {"z": torch.tensor([-1.2, 1.0] * 40, dtype=D)}


def robust_rotation():
    from kornia.geometry.conversions import axis_angle_to_rotation_matrix

    from diffrender.problem import AxisAngleSO3, Huber, Problem

    g = torch.Generator().manual_seed(11)
    pts = torch.randn(30, 3, generator=g, dtype=D)
    true = torch.tensor([0.4, -1.1, 0.7], dtype=D)
    obs = pts @ axis_angle_to_rotation_matrix(true[None])[0].T + torch.tensor([0.3, -0.2, 0.1], dtype=D)
    obs[::7] += 2.0  # outliers

    def residuals(x, ctx):
        r = axis_angle_to_rotation_matrix(x["rot"][None])[0]
        return {"points": pts @ r.T + x["t"] - obs, "prior": 0.1 * x["t"]}

    problem = Problem(residuals, manifolds={"rot": AxisAngleSO3()}, losses={"points": Huber(0.5)},
                      weights={"prior": 2.0})
    return problem, {"rot": torch.zeros(3, dtype=D), "t": torch.zeros(3, dtype=D)}


def teapot():
    from diffrender.scenes.base import BuildContext
    from diffrender.scenes.teapot_pose import build

    root = HERE.parents[1]
    scene = build(name="teapot_pose", mesh="assets/teapot.obj", image_size=24, sigma=1e-3, sigma_schedule=[],
                  coarse_to_fine=False, gamma=1e-4, fov_deg=60.0, target_distance=3.0, target_elevation_deg=50.0,
                  target_azimuth_deg=0.0, start_eye=[2.0, 3.5, 2.6], coarse_scale=1.0,
                  ctx=BuildContext(dtype=D, root=root, renderer={"cull_backfaces": False}))
    stage = scene.stages[0]
    return stage.make_problem(scene.x0), {k: scene.x0[k] for k in stage.keys}


def cases() -> list[dict]:
    """Every recorded run: ``id``, ``problem`` (a function name above, with ``arg``), ``solver``, ``options``."""
    out = []
    for p in PROBLEMS:
        its = 100 * (p.n + 1)
        for ls in ("dense", "cg"):
            out.append(dict(id=f"mgh{p.number}_lm_{ls}", problem="mgh", arg=p.number, solver="LevenbergMarquardt",
                            options=dict(LM, max_iterations=its, linear_solver=ls)))
        out.append(dict(id=f"mgh{p.number}_gn", problem="mgh", arg=p.number, solver="GaussNewton",
                        options=dict(GN, max_iterations=min(its, 200), linear_solver="dense")))
        out.append(dict(id=f"mgh{p.number}_adam", problem="mgh", arg=p.number, solver="Adam", options=dict(ADAM)))
    out += [
        dict(id="rosenbrock80_lm_cg", problem="rosenbrock_80", solver="LevenbergMarquardt",
             options=dict(LM, max_iterations=60, linear_solver="cg", function_tolerance=1e-10)),
        dict(id="rosenbrock80_gn_cg", problem="rosenbrock_80", solver="GaussNewton",
             options=dict(GN, max_iterations=30, linear_solver="cg")),
        dict(id="rotation_lm", problem="robust_rotation", solver="LevenbergMarquardt",
             options=dict(LM, max_iterations=50, linear_solver="dense")),
        dict(id="rotation_lm_cg", problem="robust_rotation", solver="LevenbergMarquardt",
             options=dict(LM, max_iterations=50, linear_solver="cg")),
        dict(id="rotation_gn", problem="robust_rotation", solver="GaussNewton",
             options=dict(GN, max_iterations=50, linear_solver="dense")),
        dict(id="teapot_lm", problem="teapot", solver="LevenbergMarquardt",
             options=dict(LM, max_iterations=12, linear_solver="auto", initial_damping=1.0)),
        dict(id="teapot_gn", problem="teapot", solver="GaussNewton",
             options=dict(GN, max_iterations=8, linear_solver="auto")),
        dict(id="teapot_adam", problem="teapot", solver="Adam", options=dict(ADAM, max_iterations=25, lr=0.05)),
    ]
    return out


def build_problem(case: dict):
    fn = globals()[case["problem"]]
    return fn(case["arg"]) if "arg" in case else fn()


def trace(result) -> dict:
    """What is compared: per-record cost and accept flag, termination, final point and cost."""
    return {
        "costs": [r.cost for r in result.records],
        "accepted": [bool(r.accepted) for r in result.records],
        "termination": result.termination,
        "cost": result.cost,
        "x": {k: v.detach().reshape(-1).tolist() for k, v in result.x.items()},
    }


def compare(case: dict, got: dict) -> list[str]:
    """What differs between a replay and its record (empty when they agree)."""
    out = []
    if got["accepted"] != case["accepted"]:
        out.append(f"accept/reject sequence {got['accepted']} != recorded {case['accepted']}")
    if got["termination"] != case["termination"]:
        out.append(f"termination {got['termination']} != recorded {case['termination']}")
    pairs = zip(got["costs"], case["costs"], strict=False)  # lengths are compared by the accept flags
    bad = [(i, a, b) for i, (a, b) in enumerate(pairs) if not close(a, b)]
    if bad:
        out.append(f"costs differ at (iteration, replay, record) {bad[:3]}")
    if not close(got["cost"], case["cost"]):
        out.append(f"final cost {got['cost']!r} != recorded {case['cost']!r}")
    return out


def close(a: float, b: float, rel: float = 1e-12, abs_: float = 1e-25) -> bool:
    """The issue's tolerance: costs within 1e-12 relative or 1e-25 absolute (float64)."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= max(rel * max(abs(a), abs(b)), abs_)
