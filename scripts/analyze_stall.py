#!/usr/bin/env python
"""Where Levenberg-Marquardt stops on a shape scene, and why (issue 7).

The script runs the app's LM from the start point until it stops (its own tolerances) or ``--lm-seconds``
pass. At that point it measures:

* the cost and the gradient;
* the curvature along -g, from the Gauss-Newton model (``||J u||²``) and from the Hessian (one HVP);
* the cost decrease that the model allows along -g;
* the extreme eigenvalues of ``JᵀJ`` and of the Hessian (Lanczos).

It then gives ``--seconds`` more to LM with its tolerances off, to Adam at the benchmark's best rate and to
Newton-CG, all from that same point. Scenes are set up as ``bench_fit.py`` sets them (48², 12 views,
σ = 3e-4, silhouettes only).

    python scripts/analyze_stall.py --scene bunny_silhouette
    python scripts/analyze_stall.py --scene cow_shape --seconds 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = ["renderer.image_size=48", "scene.views=12", "scene.coarse_to_fine=false", "scene.sigma=3e-4",
         "scene.color_stage=false"]
SCENES = ("cow_shape", "bunny_silhouette")


def setup(scene: str, adam_lr: float):
    """(problem, x0, {solver name: config node}) at the scene's start point."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import diffrender.config  # noqa: F401  (registers the config schemas)
    from diffrender.scenes.base import BuildContext

    nodes = {}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for name, extra in (("lm", []), ("adam", [f"solver.lr={adam_lr}"]), ("newton_cg", [])):
            cfg = compose("config", overrides=[f"scene={scene}", *SHAPE, f"solver={name}", *extra])
            nodes[name] = cfg.solver
    ctx = BuildContext(dtype=torch.float32, renderer=OmegaConf.to_container(cfg.renderer, resolve=True), root=ROOT)
    built = instantiate(cfg.scene, _partial_=True)(ctx=ctx)
    st = built.stages[0]
    x = {k: v.detach().clone() for k, v in built.x0.items() if k in st.keys}
    return st.make_problem(dict(built.x0)), x, nodes


def extremes(matvec, n: int, like: torch.Tensor, steps: int) -> tuple[float, float, bool]:
    """(smallest, largest) Ritz values of a symmetric operator by Lanczos, and whether they converged."""
    from diffrender.linalg.lanczos import lanczos

    start = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(like)
    res = lanczos(matvec, start, steps)
    return float(res.values[0]), float(res.values[-1]), res.converged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scene", choices=SCENES, default="bunny_silhouette")
    ap.add_argument("--lm-seconds", type=float, default=60.0, help="LM's budget to its stop")
    ap.add_argument("--seconds", type=float, default=15.0, help="each continuation's budget")
    ap.add_argument("--adam-lr", type=float, default=0.01, help="Adam's rate for the continuation")
    ap.add_argument("--lanczos-steps", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from hydra.utils import instantiate

    problem, x0, nodes = setup(args.scene, args.adam_lr)
    lm = instantiate(nodes["lm"], max_seconds=args.lm_seconds, max_iterations=100000).solve(problem, x0)
    x = lm.x
    ctx = problem.prepare_context(x)
    lin = problem.linearize(x, ctx)
    g = lin.gradient
    u = -g / g.norm()
    gn = float(lin.op.jvp(u).square().sum())  # u^T JᵀJ u
    hess = problem.hessian(x, ctx)
    true = float(u @ hess.hvp(u))
    jtj = extremes(lin.op.jtj, g.numel(), g, args.lanczos_steps)
    h = extremes(hess.hvp, g.numel(), g, args.lanczos_steps)
    g2 = float(g @ g)
    rows = [
        ("LM's stop", f"{lm.termination} after {len(lm.records) - 1} iterations, {lm.seconds:.1f} s: {lm.message}"),
        ("cost there", f"{lm.cost:.4g}"),
        ("‖g‖, max|gᵢ|", f"{g2 ** 0.5:.3g}, {float(g.abs().max()):.3g}"),
        ("curvature along -g: Gauss-Newton, Hessian", f"{gn:.3g}, {true:.3g}"),
        ("the model's decrease along -g, ‖g‖⁴ / (2 gᵀJᵀJg) (relative to the cost)",
         f"{g2 / (2 * gn):.3g} ({g2 / (2 * gn) / lm.cost:.2g})"),
        ("JᵀJ: smallest, largest Ritz value (converged)", f"{jtj[0]:.3g}, {jtj[1]:.3g} ({jtj[2]})"),
        ("Hessian: smallest, largest Ritz value (converged)", f"{h[0]:.3g}, {h[1]:.3g} ({h[2]})"),
    ]
    off = dict(function_tolerance=0.0, parameter_tolerance=0.0, gradient_tolerance=0.0)
    continuations = (("LM, tolerances off", nodes["lm"], off), (f"Adam, lr {args.adam_lr}", nodes["adam"], {}),
                     ("Newton-CG", nodes["newton_cg"], {}))
    for label, node, extra in continuations:
        r = instantiate(node, max_seconds=args.seconds, max_iterations=100000, **extra).solve(problem, x)
        rows.append((f"{label}, {args.seconds:g} s from there",
                     f"cost {r.cost:.4g} after {len(r.records) - 1} iterations ({r.termination})"))
    print(f"# {args.scene}: 48², 12 views, σ = 3e-4, silhouettes; one thread, float32\n")
    print("| quantity | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
