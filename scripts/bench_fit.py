#!/usr/bin/env python
"""Benchmark the solvers on every synthetic scene at two accuracies: seconds to the scene's target and to a
tight one, with Adam's learning rate tuned by a sweep and the second-order solvers at their defaults.

    python scripts/bench_fit.py                              # every scene, lm gn dogleg newton_cg + adam sweep
    python scripts/bench_fit.py --scene cow_shape --json rows.jsonl --plot bench_fit.png
    python scripts/bench_fit.py --budget-scale 0.5           # shorter runs (the tight target may be missed)
    python scripts/bench_fit.py --scene bunny_silhouette --solver lm \
        --variant "cg3=lm solver.max_cg_iterations=3"        # a lever side by side with the defaults
    python scripts/bench_fit.py --scene cow_shape --repeats 3  # median seconds of 3 runs of every fit

Each (scene, solver, lr) runs ``scripts/fit.py`` in its own process (``logging=minimal``, one thread) for
the scene's budget of solver seconds (``solver.max_seconds``; 4x the seconds the scene's target normally
takes, so that every solver gets 4x the time); times are the solver's own per-iteration seconds summed
(metrics and logging excluded). Targets, checked on the history every iteration:

* teapot_pose: camera direction error < 0.1° and distance error < 0.1 % (tight: 0.001° and 0.001 %);
* cow_shape, bunny_silhouette: silhouette IoU >= 0.98 (tight: a cost within 1e-3, relative, of the lowest
  cost any run of the scene reached in its budget);
* lights_albedo: light direction error < 1° and PSNR >= 40 dB (tight: < 0.01° and 60 dB);
* texture: PSNR of the rendered views >= 40 dB (tight: 50 dB).

Adam gets the best of a sweep of learning rates, chosen per accuracy: for the target the first to reach
it (then the first to the tight one, then the lowest final cost), for the tight target the first to reach
that (the Adam lr column shows "target / tight" where they differ); the whole sweep's solver seconds are
reported as ``adam_tuning_s``.
LM, GN, Dogleg and Newton-CG run at their defaults (``conf/solver/*.yaml``), one configuration for all
scenes; ``--solver lm_adam`` adds the chain of LM and then Adam (lr 1e-2) from where LM stalls. Shape
scenes run a single σ (no coarse-to-fine, no color stage) so costs compare across solvers.
``--variant NAME=SOLVER OVERRIDE...`` adds a run of SOLVER with those fit.py overrides (row ``SOLVER[NAME]``),
so that a lever is measured in the same run as the defaults; in a staged variant (a σ schedule) only its
last stage's costs count for the tight target and the lowest cost. A variant with ``scene.*`` overrides
minimizes another cost: its tight target is the lowest cost of the runs with the same scene overrides.
Each row also gives the cost when it first reached the target (and, in ``--json``, the metrics then); for
the shape scenes the summary lines give the chamfer distance to the true mesh there, since an IoU says
nothing of the shape away from the outline, and every summary line gives where the solver is (cost; IoU and
chamfer) at the second the best Adam reaches the target: a solver can be later to a target of one metric and
far ahead on the objective both minimize.
Timings on a shared machine are noisy (±30 % from one run to the next here): ``--repeats N`` runs every fit N
times, interleaved, and reports the median seconds (``--json`` keeps each repeat's); iterations are the
same in every repeat.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIT = ROOT / "scripts" / "fit.py"

SHAPE = ["renderer.image_size=48", "scene.views=12", "scene.coarse_to_fine=false", "scene.sigma=3e-4"]
# per scene: fit.py overrides (all solvers), Adam-only overrides, budget of solver seconds, Adam's lr sweep
SCENES = {
    # Adam as in PyTorch3D's tutorial: one σ = 1e-4, no schedule (better for Adam than the σ schedule)
    "teapot_pose": dict(overrides=[], adam_overrides=["scene.coarse_to_fine=false"], budget=16.0,
                        lrs=[0.02, 0.05, 0.1, 0.2]),
    "cow_shape": dict(overrides=SHAPE + ["scene.color_stage=false"], budget=60.0, lrs=[0.003, 0.01, 0.02, 0.05]),
    "bunny_silhouette": dict(overrides=SHAPE, budget=60.0, lrs=[0.003, 0.01, 0.02, 0.05]),
    "lights_albedo": dict(overrides=["renderer.image_size=48", "scene.views=4"], budget=40.0,
                          lrs=[0.01, 0.03, 0.1, 0.3]),
    "texture": dict(overrides=[], budget=120.0, lrs=[0.01, 0.03, 0.1, 0.3]),
}
SECOND_ORDER = ("lm", "gn", "dogleg", "newton_cg")
# run when asked (--solver lm_adam): LM, then Adam from where LM stalls (conf/solver/lm_adam.yaml)
CHAINS = ("lm_adam",)


def targets(scene: str, lowest_cost: float | None):
    """(target, tight) predicates on one history entry, and the value shown beside a missed target."""
    def m(h: dict, key: str, default: float) -> float:
        v = (h.get("metrics") or {}).get(key)
        return default if v is None else float(v)

    if scene == "teapot_pose":
        return (lambda h: m(h, "pose_err_deg", 1e9) < 0.1 and m(h, "dist_err_pct", 1e9) < 0.1,
                lambda h: m(h, "pose_err_deg", 1e9) < 1e-3 and m(h, "dist_err_pct", 1e9) < 1e-3, "pose_err_deg")
    if scene == "lights_albedo":
        return (lambda h: m(h, "light_dir_err_deg", 1e9) < 1.0 and m(h, "psnr", 0.0) >= 40.0,
                lambda h: m(h, "light_dir_err_deg", 1e9) < 0.01 and m(h, "psnr", 0.0) >= 60.0, "light_dir_err_deg")
    if scene == "texture":
        return (lambda h: m(h, "psnr", 0.0) >= 40.0, lambda h: m(h, "psnr", 0.0) >= 50.0, "psnr")
    tight_cost = None if lowest_cost is None else lowest_cost * (1 + 1e-3)
    return (lambda h: m(h, "iou", 0.0) >= 0.98,
            lambda h: tight_cost is not None and isinstance(h.get("cost"), float) and h["cost"] <= tight_cost
            and h.get("last_stage", True),
            "cost")


THREADS = "1"


def run_fit(scene: str, solver: str, overrides: list[str], work: Path, device: str, tag: str) -> dict:
    out = work / f"{scene}_{solver}_{tag}"
    cmd = [sys.executable, str(FIT), f"scene={scene}", f"solver={solver}", "logging=minimal", f"device={device}",
           f"hydra.run.dir={out}", f"cache_dir={work / 'cache'}", "logging.metrics_every=1", *overrides]
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"bench_fit: {' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    last = max((h.get("stage", 0) for h in summary["history"]), default=0)
    for h in summary["history"]:  # a σ schedule's earlier stages minimize other (blurred) costs
        h["last_stage"] = h.get("stage", 0) == last
    return summary


def first(summary: dict, pred) -> tuple[float | None, int | None]:
    for h in summary["history"]:
        if pred(h):
            return h["t"], h["step"]
    return None, None


def final_value(summary: dict, key: str) -> float | None:
    if key == "cost":
        return summary.get("final_cost")
    v = summary["final_metrics"].get(key)
    return None if v is None else float(v)


def row(scene: str, solver: str, summary: dict, lowest: float | None, lr: float | None = None) -> dict:
    target, tight, key = targets(scene, lowest)
    s_t, i_t = first(summary, target)
    s_tt, i_tt = first(summary, tight)
    at = next((h for h in summary["history"] if target(h)), {})
    peak = summary.get("cuda_peak_mb") or summary.get("peak_rss_mb")
    return {"scene": scene, "solver": solver, "lr": lr, "seconds_to_target": s_t, "iterations_to_target": i_t,
            "cost_at_target": at.get("cost"), "metrics_at_target": at.get("metrics"),
            "seconds_to_tight": s_tt, "iterations_to_tight": i_tt, "final_key": key,
            "final_value": final_value(summary, key), "iterations": summary["iterations"],
            "seconds": summary["timings"]["solver_s"], "final_cost": summary.get("final_cost"),
            "final_metrics": summary["final_metrics"], "peak_mb": peak,
            # (seconds, cost, metrics) of every recorded point: the plot, and where a fit stood at a given second
            "curve": [(h["t"], h["cost"], h.get("metrics") or {}) for h in summary["history"]
                      if isinstance(h.get("cost"), float)]}


def state_at(r: dict, seconds: float) -> tuple[float | None, dict]:
    """A row's cost and metrics at ``seconds`` into its fit: its last recorded point not after it (its first
    repeat's path; ``(None, {})`` before its first point)."""
    return next(((c, m) for t, c, m in reversed(r["curve"]) if t <= seconds), (None, {}))


def median_row(rows: list[dict]) -> dict:
    """One row from the repeats of one fit: the median of each seconds figure (a repeat that never got there
    counts as slower than any that did, so the median is None when most never did); iterations, costs and
    metrics are those of the first repeat (the path is the same, only its timing varies)."""
    out = dict(rows[0])
    for key in ("seconds_to_target", "seconds_to_tight"):
        values = sorted((r[key] for r in rows), key=lambda v: math.inf if v is None else v)
        out[key] = values[(len(values) - 1) // 2]
        if len(rows) > 1:
            out[key + "_repeats"] = [r[key] for r in rows]
    out["seconds"] = statistics.median(r["seconds"] for r in rows)
    out["repeats"] = len(rows)
    return out


def bench_scene(scene: str, spec: dict, scale: float, work: Path, device: str, solvers: list[str],
                jobs: int, variants: list[tuple[str, str, list[str]]] = (), repeats: int = 1) -> list[dict]:
    budget = spec["budget"] * scale
    common = spec["overrides"] + [f"solver.max_seconds={budget}", "solver.max_iterations=100000"]
    # (row label, solver, lr, overrides, what it minimizes: the scene's objective () unless a variant changes it)
    runs = [("adam", "adam", lr, common + spec.get("adam_overrides", []) + [f"solver.lr={lr}"], ())
            for lr in spec["lrs"]]
    runs += [(s, s, None, common, ()) for s in solvers]
    runs += [(f"{s}[{name}]", s, None, common + ov, objective(ov)) for name, s, ov in variants]
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # repeats interleaved, so that drift hits every fit
        futures = [(label, lr, obj, pool.submit(run_fit, scene, s, ov, work, device, f"{i}_{k}"))
                   for k in range(repeats) for i, (label, s, lr, ov, obj) in enumerate(runs)]
        done = [(s, lr, obj, f.result()) for s, lr, obj, f in futures]
    for s, lr, _, summary in done:
        print(f"  {scene} {s}{f' lr={lr}' if lr else ''}: final cost {summary.get('final_cost')}", file=sys.stderr,
              flush=True)
    # the tight target's lowest cost, per objective: a variant that changes the scene minimizes another cost
    lowest: dict[tuple, float | None] = {}
    for obj in {o for _, _, o, _ in done}:
        costs = [h["cost"] for _, _, o, sm in done if o == obj for h in sm["history"]
                 if h["last_stage"] and isinstance(h.get("cost"), float) and math.isfinite(h["cost"])]
        lowest[obj] = min(costs) if costs else None

    def rows_of(label: str, lr: float | None) -> dict:
        return median_row([row(scene, label, sm, lowest[o], lr) for s, r, o, sm in done if s == label and r == lr])

    adams = [rows_of("adam", lr) for lr in spec["lrs"]]
    best = min(adams, key=lambda r: (r["seconds_to_target"] is None, r["seconds_to_target"] or 0.0,
                                     r["seconds_to_tight"] is None, r["seconds_to_tight"] or 0.0,
                                     r["final_cost"] if r["final_cost"] is not None else math.inf))
    # the tight target gets its own best rate: the rate first to the target can stall short of the tight one
    tight = min(adams, key=lambda r: (r["seconds_to_tight"] is None, r["seconds_to_tight"] or 0.0))
    sweep = {str(r["lr"]): (r["seconds_to_target"], r["seconds_to_tight"]) for r in adams}  # before best changes
    best["lr_tight"], best["seconds_to_tight"], best["iterations_to_tight"] = (
        tight["lr"], tight["seconds_to_tight"], tight["iterations_to_tight"])
    best["adam_tuning_s"] = sum(r["seconds"] for r in adams)
    best["lr_sweep"] = sweep
    return [best] + [rows_of(label, None) for label, _, _, _, _ in runs if label != "adam"]


# scene options that change only the stages before the last (whose costs do not count), not what is minimized
STAGES_ONLY = ("scene.normal_continuation",)


def objective(overrides: list[str]) -> tuple[str, ...]:
    """What a run minimizes, as far as its own overrides change it: its ``scene.*`` overrides (a variant's
    solver options change how, not what; so do the options of earlier stages, ``STAGES_ONLY``)."""
    return tuple(sorted(o for o in overrides if o.startswith("scene.") and not o.startswith(STAGES_ONLY)))


def fmt(v, spec=".3g") -> str:
    if v is None:
        return "—"
    return format(v, spec) if isinstance(v, float) else str(v)


def table(rows: list[dict]) -> str:
    head = ("| scene | solver | Adam lr | s to target | its | cost at target | s to tight | its | final (key) "
            "| solver s | adam_tuning_s | peak MB |")
    lines = [head, "|---" * 12 + "|"]
    for r in rows:
        final = f"{fmt(r['final_value'], '.4g')} ({r['final_key']})"
        lr = fmt(r["lr"]) if r.get("lr_tight") in (None, r["lr"]) else f"{fmt(r['lr'])} / {fmt(r['lr_tight'])}"
        lines.append(f"| {r['scene']} | {r['solver']} | {lr} | {fmt(r['seconds_to_target'])} | "
                     f"{fmt(r['iterations_to_target'])} | {fmt(r['cost_at_target'], '.4g')} | "
                     f"{fmt(r['seconds_to_tight'])} | {fmt(r['iterations_to_tight'])} | {final} | "
                     f"{fmt(r['seconds'])} | {fmt(r.get('adam_tuning_s'))} | {fmt(r['peak_mb'], '.0f')} |")
    return "\n".join(lines)


def speedups(rows: list[dict]) -> list[str]:
    """Best Adam's seconds over each second-order solver's, at both accuracies (> 1: the solver is faster;
    an Adam that never gets there counts as never)."""
    out = []
    for r in rows:
        if r["solver"] == "adam":
            continue
        adam = next(a for a in rows if a["scene"] == r["scene"] and a["solver"] == "adam")
        parts = []
        for key, name in (("seconds_to_target", "target"), ("seconds_to_tight", "tight")):
            a, s = adam[key], r[key]
            if s is None:
                parts.append(f"{name}: {r['solver']} never" + ("" if a is None else f" (Adam {a:.3g} s)"))
            elif a is None:
                parts.append(f"{name}: {r['solver']} {s:.3g} s, Adam never")
            else:
                parts.append(f"{name}: {a / s:.2f}x")
        # the shape scenes' target is the silhouette's IoU; how close the mesh is in 3D when it gets there
        chamfer = [(q.get("metrics_at_target") or {}).get("chamfer") for q in (r, adam)]
        if None not in chamfer:
            parts.append(f"chamfer at the target: {r['solver']} {chamfer[0]:.3g}, Adam {chamfer[1]:.3g}")
        # where the solver is when the best Adam reaches the target: the objective both minimize, and (shape
        # scenes) the mesh, which an IoU target does not see
        if adam["seconds_to_target"] is not None and adam["cost_at_target"] is not None:
            cost, metrics = state_at(r, adam["seconds_to_target"])
            if cost is not None:
                at = f"at Adam's target second ({adam['seconds_to_target']:.3g} s): cost {cost:.4g} " \
                     f"(Adam {adam['cost_at_target']:.4g})"
                ch, ch_a = metrics.get("chamfer"), (adam.get("metrics_at_target") or {}).get("chamfer")
                if ch is not None and ch_a is not None:
                    at += f", IoU {metrics.get('iou', math.nan):.4f}, chamfer {ch:.3g} (Adam {ch_a:.3g})"
                parts.append(at)
        lrs = f"{adam['lr']:g}" + (f" / {adam['lr_tight']:g}" if adam.get("lr_tight") not in (None, adam["lr"]) else "")
        out.append(f"{r['scene']:16s} {r['solver']:9s} vs best Adam (lr {lrs}): " + "; ".join(parts))
    return out


# ---------------------------------------------------------------------------------- plot (PIL, no matplotlib)
COLORS = {"lm": (214, 39, 40), "gn": (31, 119, 180), "adam": (44, 160, 44), "dogleg": (148, 103, 189),
          "newton_cg": (255, 127, 14)}


def plot(rows: list[dict], path: Path, panel=(420, 300)) -> None:
    """One panel per scene: log10(cost) against solver seconds, one polyline per solver."""
    from PIL import Image, ImageDraw

    scenes = list(dict.fromkeys(r["scene"] for r in rows))
    W, H = panel
    img = Image.new("RGB", (W * len(scenes), H), "white")
    d = ImageDraw.Draw(img)
    for k, scene in enumerate(scenes):
        ox = k * W
        rs = [r for r in rows if r["scene"] == scene and r["curve"]]
        pts = [(t, c) for r in rs for t, c, _ in r["curve"] if c > 0 and math.isfinite(c)]
        if not pts:
            continue
        tmax = max(t for t, _ in pts) or 1.0
        lo, hi = math.log10(min(c for _, c in pts)), math.log10(max(c for _, c in pts))
        hi = hi if hi > lo else lo + 1
        left, top, right, bottom = ox + 50, 25, ox + W - 10, H - 35

        def xy(t, c, left=left, top=top, right=right, bottom=bottom, tmax=tmax, lo=lo, hi=hi):
            return (left + (right - left) * t / tmax, bottom - (bottom - top) * (math.log10(c) - lo) / (hi - lo))

        d.rectangle([left, top, right, bottom], outline="black")
        d.text((left, 5), f"{scene}: log10 cost vs solver seconds", fill="black")
        d.text((left, bottom + 5), "0", fill="black")
        d.text((right - 40, bottom + 5), f"{tmax:.1f}s", fill="black")
        d.text((ox + 5, top), f"{hi:.1f}", fill="black")
        d.text((ox + 5, bottom - 10), f"{lo:.1f}", fill="black")
        for j, r in enumerate(rs):
            line = [xy(t, c) for t, c, _ in r["curve"] if c > 0 and math.isfinite(c)]
            col = COLORS.get(r["solver"].split("[")[0], (0, 0, 0))
            if len(line) > 1:
                d.line(line, fill=col, width=2)
            label = r["solver"] + (f" (lr {r['lr']:g})" if r["lr"] else "")
            d.text((right - 120, top + 5 + 12 * j), label, fill=col)
    img.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scene", choices=list(SCENES), action="append", help="run only this scene (repeatable)")
    ap.add_argument("--solver", choices=SECOND_ORDER + CHAINS, action="append",
                    help=f"second-order solvers to run (repeatable; default {' '.join(SECOND_ORDER)})")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON lines here")
    ap.add_argument("--plot", type=Path, default=Path("bench_fit.png"), help="convergence plot (PNG)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="scale every scene's budget of seconds")
    ap.add_argument("--jobs", type=int, default=1, help="fits run at once (each on one thread)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every fit this many times; the seconds columns are the medians")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per fit (1: steadier timings)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=SOLVER OVERRIDE...",
                    help="also run SOLVER with these fit.py overrides, row SOLVER[NAME] (repeatable)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    variants = []
    for v in args.variant:
        name, _, rest = v.partition("=")
        words = rest.split()
        if not name or not words or words[0] not in ("adam", *SECOND_ORDER, *CHAINS):
            ap.error(f"--variant {v!r}: expected NAME=SOLVER OVERRIDE..., SOLVER one of adam, "
                     f"{', '.join(SECOND_ORDER + CHAINS)}")
        variants.append((name, words[0], words[1:]))
    global THREADS
    THREADS = str(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_fit_") as tmp:
        for scene in args.scene or list(SCENES):
            rows += bench_scene(scene, SCENES[scene], args.budget_scale, Path(tmp), args.device,
                                args.solver or list(SECOND_ORDER), args.jobs, variants, args.repeats)
    print(table(rows))
    print("\n".join(speedups(rows)))
    plot(rows, args.plot)
    print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps({k: v for k, v in r.items() if k != "curve"}) + "\n")


if __name__ == "__main__":
    main()
