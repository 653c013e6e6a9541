#!/usr/bin/env python
"""Where Levenberg-Marquardt stops on a shape scene, and why (issue 7).

The script runs the app's LM from the start point until it stops (its own tolerances) or ``--lm-seconds``
pass. At that point it measures:

* the cost and the gradient;
* the curvature along -g, from the Gauss-Newton model (``||J u||²``) and from the Hessian (one HVP), and
  each residual block's share of the Gauss-Newton one (``w_b ||J_b u||²``: which term makes the wall);
* the cost decrease that the model allows along -g;
* the extreme eigenvalues of ``JᵀJ`` and of the Hessian (Lanczos).

It then gives ``--seconds`` more to LM with its tolerances off, to Adam at the benchmark's best rate and to
Newton-CG, all from that same point. Scenes are set up as ``bench_fit.py`` sets them (48², 12 views,
σ = 3e-4, silhouettes only).

    python scripts/analyze_stall.py --scene bunny_silhouette
    python scripts/analyze_stall.py --scene cow_shape --seconds 10
    python scripts/analyze_stall.py --override scene.normal_softening=0   # fit.py overrides of the set-up
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchutil import SHAPE_SCENES, shape_problem  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scene", choices=SHAPE_SCENES, default="bunny_silhouette")
    ap.add_argument("--lm-seconds", type=float, default=60.0, help="LM's budget to its stop")
    ap.add_argument("--seconds", type=float, default=15.0, help="each continuation's budget")
    ap.add_argument("--adam-lr", type=float, default=0.01, help="Adam's rate for the continuation")
    ap.add_argument("--lanczos-steps", type=int, default=60)
    ap.add_argument("--override", action="append", default=[], help="a fit.py override of the set-up (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from hydra.utils import instantiate

    from diffrender.inspection import conditioning
    from diffrender.linalg.lanczos import lanczos

    ov = args.override
    problem, x0, nodes = shape_problem(args.scene, {"lm": ["solver=lm", *ov], "newton_cg": ["solver=newton_cg", *ov],
                                                    "adam": ["solver=adam", f"solver.lr={args.adam_lr}", *ov]})
    lm = instantiate(nodes["lm"], max_seconds=args.lm_seconds, max_iterations=100000).solve(problem, x0)
    x = lm.x
    ctx = problem.prepare_context(x)
    lin = problem.linearize(x, ctx)
    g = lin.gradient
    u = -g / g.norm()
    gn = float(lin.op.jvp(u).square().sum())  # u^T JᵀJ u
    hess = problem.hessian(x, ctx)
    true = float(u @ hess.hvp(u))
    at = problem.tangent_point(x)
    _, j_blocks = torch.func.jvp(lambda d: problem.residual_blocks(at(d), ctx), (torch.zeros_like(u),), (u,))
    shares = {b: problem.weights.get(b, 1.0) * float(jb.square().sum()) for b, jb in j_blocks.items()}
    jtj = conditioning(lin.op, steps=args.lanczos_steps, want=1)
    start = torch.randn(g.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(g)
    h = lanczos(hess.hvp, start, args.lanczos_steps)  # the Hessian's spectrum (inspection has JᵀJ's only)
    g2 = float(g @ g)
    rows = [
        ("LM's stop", f"{lm.termination} after {len(lm.records) - 1} iterations, {lm.seconds:.1f} s: {lm.message}"),
        ("cost there", f"{lm.cost:.4g}"),
        ("‖g‖, max|gᵢ|", f"{g2 ** 0.5:.3g}, {float(g.abs().max()):.3g}"),
        ("curvature along -g: Gauss-Newton, Hessian", f"{gn:.3g}, {true:.3g}"),
        ("its blocks, w_b ‖J_b u‖²", ", ".join(f"{b} {v:.3g}" for b, v in shares.items())),
        ("the model's decrease along -g, ‖g‖⁴ / (2 gᵀJᵀJg) (relative to the cost)",
         f"{g2 / (2 * gn):.3g} ({g2 / (2 * gn) / lm.cost:.2g})"),
        ("JᵀJ: smallest, largest Ritz value (converged)", f"{jtj.eig_min:.3g}, {jtj.eig_max:.3g} ({jtj.converged})"),
        ("Hessian: smallest, largest Ritz value (converged)",
         f"{float(h.values[0]):.3g}, {float(h.values[-1]):.3g} ({h.converged})"),
    ]
    off = dict(function_tolerance=0.0, parameter_tolerance=0.0, gradient_tolerance=0.0)
    continuations = (("LM, tolerances off", nodes["lm"], off), (f"Adam, lr {args.adam_lr}", nodes["adam"], {}),
                     ("Newton-CG", nodes["newton_cg"], {}))
    for label, node, extra in continuations:
        r = instantiate(node, max_seconds=args.seconds, max_iterations=100000, **extra).solve(problem, x)
        rows.append((f"{label}, {args.seconds:g} s from there",
                     f"cost {r.cost:.4g} after {len(r.records) - 1} iterations ({r.termination})"))
    print(f"# {args.scene}: 48², 12 views, σ = 3e-4, silhouettes; one thread, float32"
          f"{''.join(' ' + o for o in ov)}\n")
    print("| quantity | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
