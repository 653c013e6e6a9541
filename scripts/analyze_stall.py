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
Newton-CG, all from that same point. With ``--profile N`` it evaluates the cost (per block, pairs searched
afresh) at N points of the straight segment from LM's stop to Adam's end: a rise along it says that Adam
left LM's basin rather than went further down in it. Scenes are set up as ``bench_fit.py`` sets them (48²,
12 views, σ = 3e-4, silhouettes only).

    python scripts/analyze_stall.py --scene bunny_silhouette
    python scripts/analyze_stall.py --scene cow_shape --seconds 10
    python scripts/analyze_stall.py --override scene.normal_softening=0   # fit.py overrides of the set-up
    python scripts/analyze_stall.py --profile 101                          # the segment to Adam's end
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
    ap.add_argument("--profile", type=int, default=0,
                    help="also evaluate the cost at this many points of the segment from LM's stop to Adam's end")
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
    ends = {}
    for label, node, extra in continuations:
        r = instantiate(node, max_seconds=args.seconds, max_iterations=100000, **extra).solve(problem, x)
        ends[label] = r.x
        rows.append((f"{label}, {args.seconds:g} s from there",
                     f"cost {r.cost:.4g} after {len(r.records) - 1} iterations ({r.termination})"))
    if args.profile > 1:
        rows += segment_profile(problem, x, ends[f"Adam, lr {args.adam_lr}"], args.profile)
    print(f"# {args.scene}: 48², 12 views, σ = 3e-4, silhouettes; one thread, float32"
          f"{''.join(' ' + o for o in ov)}\n")
    print("| quantity | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


def segment_profile(problem, x: dict, y: dict, points: int) -> list[tuple[str, str]]:
    """The cost on the straight segment from ``x`` (LM's stop) to ``y`` (Adam's end), per block, with the
    pairs searched afresh at every point: whether a barrier lies between the two, and in which block.
    A local minimum of the profile is a point lower than both neighbours."""
    layout = problem.layout(x)
    d = layout.flatten(y) - layout.flatten(x)
    at = problem.tangent_point(x)
    ts = torch.linspace(0, 1, points, dtype=torch.float64)
    points_x = [at(float(t) * d) for t in ts]
    evals = [problem.evaluate(p, problem.prepare_context(p)) for p in points_x]
    total = torch.tensor([e.cost for e in evals], dtype=torch.float64)
    minima = int(((total[1:-1] < total[:-2]) & (total[1:-1] < total[2:])).sum())
    # the barrier: the largest rise of the cost above its running minimum from x on
    barrier = float((total - total.cummin(0).values).max())
    blocks = {}
    for b in evals[0].block_costs:
        vals = torch.tensor([e.block_costs[b] for e in evals], dtype=torch.float64)
        blocks[b] = (float(vals[0]), float(vals[-1]), float((vals - vals.cummin(0).values).max()))
    move = d.reshape(-1, 3).norm(dim=1)  # the shape scenes' unknowns: one offset per vertex
    return [
        (f"segment LM's stop → Adam's end, {points} points: cost at 0, min, at 1",
         f"{float(total[0]):.4g}, {float(total.min()):.4g} at t = {float(ts[total.argmin()]):.3f}, "
         f"{float(total[-1]):.4g}"),
        ("its local minima, largest rise above the running minimum", f"{minima}, {barrier:.3g}"),
        ("cost at t = 0, 0.1, ..., 1", ", ".join(f"{float(total[int(i)]):.4g}"
                                                for i in torch.linspace(0, points - 1, 11).round())),
        ("per block: at 0, at 1, largest rise", "; ".join(f"{b} {v0:.4g} → {v1:.4g} (rise {r:.3g})"
                                                           for b, (v0, v1, r) in blocks.items())),
        ("the move: largest, median per-vertex length (tangent units)",
         f"{float(move.max()):.3g}, {float(move.median()):.3g}"),
    ]


if __name__ == "__main__":
    main()
