#!/usr/bin/env python
"""Benchmark the dense path of the second-order solvers (n <= dense_threshold unknowns) side by side: the
pieces of one linearization with the Jacobian's columns made one JVP at a time or in one batched (vmapped)
pass (the compiled sweeps' vmap rules, and the solver option ``batched_columns``), and the gradient by a
VJP or from those columns (option ``gradient_from_columns``), on the scenes whose unknowns are few, as
``bench_fit.py`` sets them up. ``before_ms``: linearization + looped columns + VJP gradient; ``after_ms``:
linearization + batched columns + gradient from the columns (both measured here, same point).

    python scripts/bench_dense.py                  # teapot_pose (first stage, 3 unknowns), lights_albedo (35)
    python scripts/bench_dense.py --repeats 9

One thread; medians of ``--repeats`` runs after a warm-up, at the scene's start point.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchutil import median_ms  # noqa: E402

# the scene set-ups of bench_fit.py, and the stage whose dense linearizations dominate the LM fit
SCENES = {"teapot_pose": ([], 0), "lights_albedo": (["renderer.image_size=48", "scene.views=4"], -1)}


def problem_at_start(scene: str):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import diffrender.config  # noqa: F401  (registers the config schemas)
    from diffrender.scenes.base import BuildContext

    overrides, stage = SCENES[scene]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"scene={scene}", *overrides])
    ctx = BuildContext(dtype=torch.float32, renderer=OmegaConf.to_container(cfg.renderer, resolve=True), root=ROOT)
    built = instantiate(cfg.scene, _partial_=True)(ctx=ctx)
    st = built.stages[stage]
    x = {k: v.detach().clone() for k, v in built.x0.items() if k in st.keys}
    problem = st.make_problem(dict(built.x0))
    return problem, x


def measure(scene: str, repeats: int) -> dict:
    problem, x = problem_at_start(scene)
    ctx = problem.prepare_context(x)
    lin = problem.linearize(x, ctx)

    def columns(batched: bool):
        op = problem.linearize(x, ctx, batched_columns=batched).op
        op.vmap_columns = batched  # False: one JVP per column, as before the sweeps had vmap rules

        def run():
            op._columns = None  # noqa: SLF001 - the columns again, on the same linearization
            return op.columns()
        return run

    ms = lambda f: median_ms(f, torch.device("cpu"), repeats)  # noqa: E731
    lin.op.columns()
    row = {"scene": scene, "n": lin.op.n, "m": lin.op.m}
    row["linearize_ms"] = ms(lambda: problem.linearize(x, ctx))
    row["columns_loop_ms"] = ms(columns(False))
    row["columns_batched_ms"] = ms(columns(True))
    row["gradient_vjp_ms"] = ms(lambda: lin.op.vjp(lin.residual))
    row["gradient_columns_ms"] = ms(lambda: lin.op.columns_vjp(lin.residual))
    row["before_ms"] = row["linearize_ms"] + row["columns_loop_ms"] + row["gradient_vjp_ms"]
    row["after_ms"] = row["linearize_ms"] + row["columns_batched_ms"] + row["gradient_columns_ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scene", choices=list(SCENES), action="append", help="only this scene (repeatable)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from diffrender.raster import native

    print(f"# device: cpu, torch {torch.__version__}, threads 1, float32, median of {args.repeats}; "
          f"rasterizer: {native.status()}")
    keys = ["scene", "n", "m", "linearize_ms", "columns_loop_ms", "columns_batched_ms", "gradient_vjp_ms",
            "gradient_columns_ms", "before_ms", "after_ms"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for scene in args.scene or list(SCENES):
        row = measure(scene, args.repeats)
        print("| " + " | ".join(f"{row[k]:.1f}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
