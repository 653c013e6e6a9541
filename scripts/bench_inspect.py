"""Benchmark the inspection tools on fitted scenes: Lanczos conditioning of ``JᵀJ`` (plain, Jacobi and the
problem's own preconditioner) against the exact spectrum of the dense ``J``, and the covariance (dense, and
Hutchinson + PCG) -- what ``inspect=enabled`` costs a fit.

    python scripts/bench_inspect.py                       # teapot_pose and a small cow_shape, one thread
    python scripts/bench_inspect.py --scene cow_shape --steps 60 --json rows.jsonl

Each scene is first fitted with Levenberg-Marquardt (targets with Gaussian image noise, so the residual
is not zero); the inspection runs at the fitted point.  Times are medians of ``--repeats`` runs (noisy on
a shared machine); ``products`` counts JVPs + VJPs; ``exact`` columns come from ``eigvalsh`` of the dense
``JᵀJ`` (built from ``n`` JVPs, float64), ``rel_err`` is the Lanczos value's relative error against them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffrender.inspection import Jacobian, conditioning, covariance, solver_preconditioner  # noqa: E402
from diffrender.scenes import cow_shape, teapot_pose  # noqa: E402
from diffrender.scenes.base import BuildContext  # noqa: E402
from diffrender.solvers import LevenbergMarquardt  # noqa: E402

NOISE = 0.02


def build(scene: str, dtype: torch.dtype):
    """(scene, problem of its last stage, fitted parameters, description)."""
    if scene == "teapot_pose":
        ctx = BuildContext(dtype=dtype, renderer={"coarse_to_fine": False}, root=ROOT)
        sc = teapot_pose.build(name=scene, mesh="assets/teapot.obj", image_size=48, sigma=1e-4, sigma_schedule=[],
                               coarse_to_fine=False, gamma=1e-4, fov_deg=60.0, target_distance=3.0,
                               target_elevation_deg=50.0, target_azimuth_deg=0.0, start_eye=[0.0, 2.3, 1.9],
                               coarse_scale=1.0, ctx=ctx, image_noise=NOISE)
        desc = "48 px, 1 view, sigma 1e-4"
        iters = 20
    else:
        ctx = BuildContext(dtype=dtype, renderer={}, root=ROOT)
        sc = cow_shape.build(name=scene, mesh="assets/spot.obj", image_size=48, sigma=3e-4, sigma_schedule=[],
                             coarse_to_fine=False, gamma=1e-4, fov_deg=60.0, sphere_level=2, sphere_radius=0.6,
                             views=8, distance=2.5, elevations_deg=[-20.0, 25.0], color_stage=False,
                             w_silhouette=1.0, w_color=1.0, w_laplacian=1.0, w_edge=0.3, w_normal=0.1,
                             preconditioner_lambda=10.0, coarse_scale=1.0, view_chunks=1, ctx=ctx,
                             image_noise=NOISE)
        desc = "ico2 (162 verts), 8 views at 48 px, sigma 3e-4, silhouettes + regularizers"
        iters = 15
    x = {k: v.clone() for k, v in sc.x0.items()}
    stage = sc.stages[-1]
    problem = stage.make_problem(x)
    xs = {k: x[k] for k in stage.keys}
    res = LevenbergMarquardt(max_iterations=iters, linear_solver="auto").solve(problem, xs)
    return sc, problem, res.x, f"{desc}; LM {len(res.records) - 1} its, cost {res.cost:.4g}"


def median_run(fn, repeats: int):
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def bench(scene: str, steps: int, repeats: int, dtype: torch.dtype, probes: int) -> list[dict]:
    sc, problem, x, desc = build(scene, dtype)
    jac = Jacobian(problem, x)
    op = jac.op
    counters = op.counters
    t = time.perf_counter()
    j = jac.dense("forward").matrix.double()
    dense_s = time.perf_counter() - t
    a = j.T @ j
    exact = torch.linalg.eigvalsh(a)
    rows = []
    pres = {"none": None}
    jac_pre, kind = solver_preconditioner(problem, jac.x, jac.ctx, op)
    pres[kind] = jac_pre
    if kind == "problem":
        d = a.diagonal().to(op.x0.dtype)
        inv = 1 / d.clamp_min(float(d.max()) * torch.finfo(d.dtype).eps)
        pres["jacobi"] = lambda v: inv * v
    for name, pre in pres.items():
        if pre is None:
            ex = exact
        else:  # exact spectrum of M^-1 A from the dense M^-1 (n applications) and the pencil
            eye = torch.eye(op.n, dtype=op.x0.dtype)
            m_inv = torch.stack([pre(eye[i]) for i in range(op.n)], 1).double()
            m_inv = 0.5 * (m_inv + m_inv.T)
            ev, evec = torch.linalg.eigh(m_inv)
            half = evec @ torch.diag(ev.clamp_min(0).sqrt()) @ evec.T
            ex = torch.linalg.eigvalsh(half @ a @ half)
        c0 = counters.jvps + counters.vjps
        c, sec = median_run(lambda pre=pre, name=name: conditioning(op, precond=pre, preconditioner=name,
                                                                    steps=steps), repeats)
        products = (counters.jvps + counters.vjps - c0) // repeats
        rows.append(dict(scene=scene, setup=desc, n=op.n, m=op.m, dtype=str(dtype).replace("torch.", ""),
                         operator={"none": "JᵀJ", "jacobi": "Jacobi⁻¹ JᵀJ", "problem": "M⁻¹ JᵀJ (scene's)"}[name],
                         steps=c.steps, products=products, lanczos_s=sec, eig_min=c.eig_min, eig_max=c.eig_max,
                         cond=c.cond, converged=c.converged, eig_min_exact=float(ex[0]), eig_max_exact=float(ex[-1]),
                         cond_exact=float(ex[-1] / ex[0]) if ex[0] > 0 else float("inf"),
                         cond_rel_err=c.cond / float(ex[-1] / ex[0]) - 1 if ex[0] > 0 else float("nan"),
                         dense_j_s=dense_s))
    unc, sec = median_run(lambda: covariance(problem, x, dense_max=10**6), 1)
    dense_var = unc.variance
    rows[0]["covariance_dense_s"] = sec
    if op.n > 10 and probes > 0:
        h, sec_h = median_run(lambda: covariance(problem, x, dense_max=0, probes=probes, seed=0), 1)
        rows[0]["covariance_hutchinson_s"] = sec_h
        rows[0]["hutchinson_products"] = h.products
        if h.variance is not None:
            rows[0]["hutchinson_median_rel_err"] = float((h.variance / dense_var - 1).abs().median())
        rows[0]["hutchinson_message"] = h.message
    rows[0]["covariance_blocks"] = "all (prior from the regularizers)"
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scene", choices=["teapot_pose", "cow_shape", "all"], default="all")
    ap.add_argument("--steps", type=int, default=30, help="Lanczos steps (as inspect.lanczos_steps)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--probes", type=int, default=32, help="Hutchinson probes of the covariance (0: skip it)")
    ap.add_argument("--json", type=Path, help="append rows as JSON lines")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    scenes = ["teapot_pose", "cow_shape"] if args.scene == "all" else [args.scene]
    rows = [r for s in scenes for r in bench(s, args.steps, args.repeats, dtype, args.probes)]
    print(f"device cpu, {args.threads} thread(s), {args.dtype}, Lanczos steps <= {args.steps}, "
          f"median of {args.repeats}")
    for s in scenes:
        r0 = next(r for r in rows if r["scene"] == s)
        print(f"\n{s}: {r0['setup']}; n = {r0['n']}, m = {r0['m']}")
        print(f"{'operator':>20} {'steps':>5} {'products':>8} {'lanczos_s':>9} {'eig_min':>10} {'eig_max':>10} "
              f"{'cond':>10} {'cond_exact':>10} {'rel_err':>8} {'conv':>5}")
        for r in rows:
            if r["scene"] == s:
                print(f"{r['operator']:>20} {r['steps']:>5} {r['products']:>8} {r['lanczos_s']:>9.3f} "
                      f"{r['eig_min']:>10.4g} {r['eig_max']:>10.4g} {r['cond']:>10.4g} {r['cond_exact']:>10.4g} "
                      f"{r['cond_rel_err']:>8.1e} {str(r['converged']):>5}")
        extra = [f"dense J ({r0['n']} JVPs) {r0['dense_j_s']:.2f} s",
                 f"dense covariance {r0['covariance_dense_s']:.2f} s"]
        if "covariance_hutchinson_s" in r0:
            extra.append(f"Hutchinson covariance ({args.probes} probes) {r0['covariance_hutchinson_s']:.2f} s, "
                         f"{r0['hutchinson_products']} products, median rel. err. of the variances "
                         f"{r0.get('hutchinson_median_rel_err', float('nan')):.3f}")
        print("  " + "; ".join(extra))
    if args.json:
        with args.json.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
