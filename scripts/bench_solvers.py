"""Benchmark the solvers: MGH problems 1-19 against scipy's MINPACK ``lm`` and ``trf``, and one large
synthetic problem (smooth image warp, n = 10^4 parameters, m = 10^6 residuals) for time per LM
iteration, the cost of one J^T J v product relative to one residual evaluation, and peak memory.

    python scripts/bench_solvers.py                 # full run (large problem: several minutes on 2 cores)
    python scripts/bench_solvers.py --quick         # large problem shrunk to n = 1250, m = 62500
    python scripts/bench_solvers.py --json rows.jsonl

MGH runs use MINPACK's default tolerances as scipy sets them (ftol = xtol = 1e-8) for every solver, and
one intra-op thread (tiny problems only pay thread overhead).  ``solved``: the final sum of squares has
>= 4 correct digits against a minimum MGH list (``global``, or a listed ``local`` one), f <= 1e-10 for a
zero minimum.  ``nfev``: residual evaluations at trial points (scipy: ``nfev`` with an analytic Jacobian,
whose evaluations are ``njev``); our Jacobian work is counted as JVPs/VJPs, one linearization per
accepted point.  Timings are medians of ``--repeats`` runs; the machine may be shared, so treat them as
noisy.  Peak memory: CPU = the process's peak RSS above the RSS before the measured call (Linux
``/proc/self/clear_refs`` resets the high-water mark); CUDA = ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchutil import median_ms, peak_mb  # noqa: E402
from mgh_problems import PROBLEMS, best_lre, classify  # noqa: E402

from diffrender.problem import Problem  # noqa: E402
from diffrender.solvers import Dogleg, GaussNewton, LevenbergMarquardt, NewtonCG  # noqa: E402

TOL = dict(function_tolerance=1e-8, parameter_tolerance=1e-8)


# ----------------------------------------------------------------------------------------------------------
# MGH
# ----------------------------------------------------------------------------------------------------------
def _ours(p, make):
    problem = Problem(lambda x, ctx: p.residual(x["x"]))
    t = time.perf_counter()
    res = make(p).solve(problem, {"x": p.start()})
    dt = time.perf_counter() - t
    c = res.counters
    return dict(f=2 * res.cost, iterations=res.iterations, nfev=c.residual_evals, jvps=c.jvps, vjps=c.vjps,
                njev=c.linearizations, seconds=dt, termination=res.termination)


def _scipy(p, method):
    from scipy.optimize import least_squares

    f = lambda x: p.residual(torch.from_numpy(x)).numpy()  # noqa: E731
    jac = lambda x: torch.func.jacfwd(p.residual)(torch.from_numpy(x)).numpy()  # noqa: E731
    t = time.perf_counter()
    r = least_squares(f, np.array(p.x0), jac=jac, method=method)
    dt = time.perf_counter() - t
    return dict(f=2 * r.cost, iterations=r.njev, nfev=r.nfev, jvps=0, vjps=0, njev=r.njev, seconds=dt,
                termination=str(r.status))


def _lm(linear_solver):
    return lambda q: LevenbergMarquardt(linear_solver=linear_solver, max_iterations=100 * (q.n + 1), **TOL)


def _budget(cls, **options):
    return lambda q: cls(max_iterations=100 * (q.n + 1), **TOL, **options)


SOLVERS = {
    "LM dense": lambda p: _ours(p, _lm("dense")),
    "LM cg": lambda p: _ours(p, _lm("cg")),
    "LM geodesic": lambda p: _ours(p, _budget(LevenbergMarquardt, linear_solver="dense", geodesic_acceleration=0.75)),
    "GN": lambda p: _ours(p, _budget(GaussNewton)),
    "Dogleg": lambda p: _ours(p, _budget(Dogleg)),
    "Newton-CG": lambda p: _ours(p, _budget(NewtonCG)),
    "scipy lm": lambda p: _scipy(p, "lm"),
    "scipy trf": lambda p: _scipy(p, "trf"),
}


def bench_mgh(repeats: int) -> list[dict]:
    rows = []
    print(f"\nMGH 1-19 (float64, {torch.get_num_threads()} thread(s), median of {repeats} run(s))")
    head = f"{'#':>2} {'problem':20s} {'solver':10s} {'solved':>6s} {'lre':>5s} {'iter':>5s} {'nfev':>5s} " \
           f"{'njev':>5s} {'jvps':>5s} {'vjps':>5s} {'ms':>8s}"
    print(head)
    for p in PROBLEMS:
        for name, run in SOLVERS.items():
            runs = [run(p) for _ in range(repeats)]
            r = runs[0]
            r["seconds"] = statistics.median(x["seconds"] for x in runs)
            row = dict(problem=f"{p.number} {p.name}", solver=name, solved=classify(p, r["f"]),
                       lre=round(best_lre(p, r["f"]), 2), f=r["f"], **{k: r[k] for k in
                       ("iterations", "nfev", "njev", "jvps", "vjps", "seconds", "termination")})
            rows.append(row)
            print(f"{p.number:>2} {p.name:20s} {name:10s} {row['solved']:>6s} {row['lre']:>5.1f} "
                  f"{row['iterations']:>5d} {row['nfev']:>5d} {row['njev']:>5d} {row['jvps']:>5d} "
                  f"{row['vjps']:>5d} {1e3 * row['seconds']:>8.1f}")
    print(f"\n{'solver':12s} {'solved':>6s} {'global':>6s} {'median nfev':>11s} {'median njev':>11s}")
    for name in SOLVERS:
        sel = [r for r in rows if r["solver"] == name]
        print(f"{name:12s} {sum(r['solved'] != 'no' for r in sel):>6d} {sum(r['solved'] == 'global' for r in sel):>6d} "
              f"{statistics.median(r['nfev'] for r in sel):>11.1f} {statistics.median(r['njev'] for r in sel):>11.1f}")
    return rows


# ----------------------------------------------------------------------------------------------------------
# Large synthetic problem: smooth image warp
# ----------------------------------------------------------------------------------------------------------
def _image(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An analytic smooth image (so warping needs no grid_sample, which has no forward-mode AD)."""
    return torch.sin(9.0 * u) * torch.cos(7.0 * v) + 0.5 * torch.sin(5.0 * (u + v)) + 0.3 * torch.cos(13.0 * u * v)


class WarpProblem:
    """r_p = I(p + d(p)) - T(p) over an S x S pixel grid; d is the bilinear interpolation of a
    (Gh, Gw, 2) control grid of displacements (n = 2 Gh Gw), T = I warped by a known smooth field."""

    def __init__(self, size: int, gh: int, gw: int, dtype=torch.float32, device="cpu"):
        kw = dict(dtype=dtype, device=device)
        ys, xs = torch.meshgrid(torch.linspace(0, 1, size, **kw), torch.linspace(0, 1, size, **kw), indexing="ij")
        self.u, self.v = xs.reshape(-1), ys.reshape(-1)
        gy, gx = self.v * (gh - 1), self.u * (gw - 1)
        y0 = gy.floor().clamp(max=gh - 2).long()
        x0 = gx.floor().clamp(max=gw - 2).long()
        fy, fx = gy - y0, gx - x0
        self.idx = torch.stack([y0 * gw + x0, y0 * gw + x0 + 1, (y0 + 1) * gw + x0, (y0 + 1) * gw + x0 + 1], 1)
        self.w = torch.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], 1)
        self.shape = (gh, gw, 2)
        gyy, gxx = torch.meshgrid(torch.linspace(0, 1, gh, **kw), torch.linspace(0, 1, gw, **kw), indexing="ij")
        self.true = 0.03 * torch.stack([torch.sin(3 * gxx + 1) * torch.cos(2 * gyy), torch.cos(2 * gxx - 3 * gyy)], -1)
        with torch.no_grad():
            self.target = self.warped(self.true)

    def warped(self, grid: torch.Tensor) -> torch.Tensor:
        flat = grid.reshape(-1, 2)
        d = (flat[self.idx] * self.w[..., None]).sum(1)  # (m, 2) gather-based bilinear interpolation
        return _image(self.u + d[:, 0], self.v + d[:, 1])

    def residuals(self, x, ctx):
        return self.warped(x["grid"]) - self.target

    def x0(self):
        return {"grid": torch.zeros(self.shape, dtype=self.u.dtype, device=self.u.device)}


def _sizes(quick: bool) -> tuple[int, int, int]:
    return (250, 25, 25) if quick else (1000, 50, 100)


def memory_worker(what: str, quick: bool, iterations: int, device: torch.device, mode: str) -> None:
    """Run in a fresh process: peak memory of one fwd+bwd, or of an LM solve, above the set-up state.
    A tiny warm-up solve first loads the lazily imported tracing machinery (fixed cost, not O(m + n))."""
    tiny = WarpProblem(16, 4, 4, device=device)
    warm = LevenbergMarquardt(max_iterations=2, linear_solver="cg", dense_threshold=4, jvp_mode=mode)
    warm.solve(Problem(tiny.residuals), tiny.x0())
    wp = WarpProblem(*_sizes(quick), device=device)
    problem = Problem(wp.residuals)
    x0 = wp.x0()

    def fwd_bwd():
        x = {"grid": x0["grid"].clone().requires_grad_(True)}
        cost, _ = problem.cost(x, None)
        cost.backward()

    def lm():
        LevenbergMarquardt(max_iterations=iterations, linear_solver="cg", max_cg_iterations=50,
                           jvp_mode=mode).solve(problem, x0)

    print(json.dumps({"peak_mb": peak_mb(fwd_bwd if what == "fwd_bwd" else lm, device)}))


def _measure_in_subprocess(what: str, quick: bool, iterations: int, device: torch.device, mode: str) -> float:
    import subprocess

    cmd = [sys.executable, __file__, "--memory-worker", what, "--iterations", str(iterations),
           "--device", str(device), "--threads", str(torch.get_num_threads()), "--jvp-modes", mode]
    cmd += ["--quick"] if quick else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_mb"])


def bench_large(quick: bool, repeats: int, iterations: int, device: torch.device, modes: list[str]) -> list[dict]:
    size, gh, gw = _sizes(quick)
    wp = WarpProblem(size, gh, gw, device=device)
    x0 = wp.x0()
    n, m = x0["grid"].numel(), wp.u.numel()
    print(f"\nLarge problem: smooth image warp, n = {n}, m = {m}, float32, device {device}, "
          f"{torch.get_num_threads()} thread(s)")
    problem = Problem(wp.residuals)

    def residual_eval():
        with torch.no_grad():
            wp.residuals(x0, None)

    def fwd_bwd():
        x = {"grid": x0["grid"].clone().requires_grad_(True)}
        cost, _ = problem.cost(x, None)
        cost.backward()

    res_ms = median_ms(residual_eval, device, repeats)
    fb_ms = median_ms(fwd_bwd, device, repeats)
    fb_mb = _measure_in_subprocess("fwd_bwd", quick, iterations, device, "transpose")
    mem_method = ("cuda max_memory_allocated" if device.type == "cuda"
                  else "peak RSS above the set-up RSS, fresh process per measurement")
    print(f"  residual eval {res_ms:.1f} ms, forward+backward {fb_ms:.1f} ms, peak {fb_mb:.1f} MB ({mem_method})")
    print(f"  {'jvp_mode':10s} {'JVP ms':>8s} {'VJP ms':>8s} {'JtJv ms':>8s} {'JtJv/res':>8s} {'s/iter':>7s} "
          f"{'cg/iter':>7s} {'LM MB':>8s} {'MB/fb':>6s} {'cost after':>11s}")
    rows, reports = [], []
    for mode in modes:
        problem = Problem(wp.residuals)
        lin = problem.linearize(x0, None, jvp_mode=mode)
        v = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)
        lin.op.jtj(v)  # builds the JVP map outside the timed region
        jvp_ms = median_ms(lambda lin=lin, v=v: lin.op.jvp(v), device, repeats)
        vjp_ms = median_ms(lambda lin=lin: lin.op.vjp(lin.residual), device, repeats)
        jtj_ms = median_ms(lambda lin=lin, v=v: lin.op.jtj(v), device, repeats)
        lin = None  # free the graphs
        lm_mb = _measure_in_subprocess("lm", quick, iterations, device, mode)
        solver = LevenbergMarquardt(max_iterations=iterations, linear_solver="cg", max_cg_iterations=50,
                                    jvp_mode=mode)
        res = solver.solve(problem, x0)
        steps = [r for r in res.records if r.iteration > 0]
        it_s = statistics.median(r.seconds for r in steps[1:] or steps)  # the first one includes start-up
        row = dict(problem=f"warp n={n} m={m}", solver=f"LM cg ({mode})", jvp_mode=mode, n=n, m=m,
                   device=str(device), residual_ms=res_ms, fwd_bwd_ms=fb_ms, jvp_ms=jvp_ms, vjp_ms=vjp_ms,
                   jtjv_ms=jtj_ms, jtjv_over_residual=jtj_ms / res_ms, seconds_per_iteration=it_s,
                   cg_per_iteration=statistics.median(r.cg_iterations for r in steps),
                   jvps=res.counters.jvps, vjps=res.counters.vjps, nfev=res.counters.residual_evals,
                   iterations=len(steps), seconds=res.seconds, solved=None, lre=None,
                   initial_cost=res.initial_cost, final_cost=res.cost,
                   fwd_bwd_peak_mb=fb_mb, lm_peak_mb=lm_mb, peak_mb_over_fwd_bwd=lm_mb / fb_mb,
                   memory_method=mem_method, linearize_error=problem.linearize_error)
        rows.append(row)
        reports.append((mode, res.report()))
        print(f"  {mode:10s} {jvp_ms:>8.1f} {vjp_ms:>8.1f} {jtj_ms:>8.1f} {row['jtjv_over_residual']:>8.2f} "
              f"{it_s:>7.2f} {row['cg_per_iteration']:>7} {lm_mb:>8.1f} {row['peak_mb_over_fwd_bwd']:>6.2f} "
              f"{res.cost:>11.4e}")
    print("  goals: JtJv/res <= 3, MB/fb <= 4 (LM solve peak over one forward+backward peak)")
    rows += bench_large_solvers(wp, x0, iterations, device, repeats)
    for mode, rep in reports[:1]:
        print(f"\nLM report (jvp_mode={mode}):\n{rep}")
    return rows


def bench_large_solvers(wp: WarpProblem, x0: dict, iterations: int, device: torch.device, repeats: int) -> list[dict]:
    """Every second-order solver for the same iterations on the large problem (transpose JVPs), and the cost
    of one Hessian-vector product (Newton-CG's product) against one J^T J v."""
    problem = Problem(wp.residuals)
    n = x0["grid"].numel()
    v = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)
    lin = problem.linearize(x0, None)
    lin.op.jtj(v)
    jtj_ms = median_ms(lambda: lin.op.jtj(v), device, repeats)
    hess = problem.hessian(x0, None)
    hess.hvp(v)
    hvp_ms = median_ms(lambda: hess.hvp(v), device, repeats)
    lin = hess = None
    print(f"\n  J^T J v {jtj_ms:.1f} ms, Hessian-vector product {hvp_ms:.1f} ms ({hvp_ms / jtj_ms:.2f}x)")
    print(f"  {'solver':10s} {'s/iter':>7s} {'products/iter':>13s} {'cost after':>11s}  ({iterations} iterations)")
    rows = []
    for name, solver in (("LM", LevenbergMarquardt(max_iterations=iterations, linear_solver="cg",
                                                   max_cg_iterations=50)),
                         ("GN", GaussNewton(max_iterations=iterations, linear_solver="cg", max_cg_iterations=50)),
                         ("Dogleg", Dogleg(max_iterations=iterations, linear_solver="cg", max_cg_iterations=50)),
                         ("Newton-CG", NewtonCG(max_iterations=iterations, max_cg_iterations=50))):
        res = solver.solve(Problem(wp.residuals), x0)
        steps = [r for r in res.records if r.iteration > 0]
        it_s = statistics.median(r.seconds for r in steps[1:] or steps)
        c = res.counters
        products = (c.jvps + c.vjps + c.hvps) / max(1, len(steps))
        rows.append(dict(problem=f"warp n={n}", solver=name, seconds_per_iteration=it_s, iterations=len(steps),
                         jvps=c.jvps, vjps=c.vjps, hvps=c.hvps, final_cost=res.cost, initial_cost=res.initial_cost,
                         jtjv_ms=jtj_ms, hvp_ms=hvp_ms, solved=None, lre=None))
        print(f"  {name:10s} {it_s:>7.2f} {products:>13.1f} {res.cost:>11.4e}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small large-problem (n=1250, m=62500)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON lines to this path")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    ap.add_argument("--iterations", type=int, default=5, help="LM iterations on the large problem")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads for the large problem")
    ap.add_argument("--skip-mgh", action="store_true")
    ap.add_argument("--memory-worker", choices=["fwd_bwd", "lm"], help=argparse.SUPPRESS)
    ap.add_argument("--jvp-modes", default="transpose,linearize,jvp",
                    help="comma-separated JVP modes to compare on the large problem")
    ap.add_argument("--skip-large", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args.memory_worker, args.quick, args.iterations, device, args.jvp_modes.split(",")[0])
        return 0
    print(f"torch {torch.__version__}, device {device}")
    rows = []
    if not args.skip_mgh:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        rows += bench_mgh(args.repeats)
        torch.set_num_threads(threads)
    if not args.skip_large:
        rows += bench_large(args.quick, args.repeats, args.iterations, device, args.jvp_modes.split(","))
    if args.json:
        with args.json.open("w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
        print(f"\nwrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
