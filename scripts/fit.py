#!/usr/bin/env python
"""Fit a scene's parameters to images with a configurable solver; log to TensorBoard.

    python scripts/fit.py                                   # teapot_pose with LM on the CPU
    python scripts/fit.py scene=cow_shape solver=adam renderer.image_size=96
    python scripts/fit.py -m solver=lm,gn,adam              # sweep: side-by-side TensorBoard runs
    python scripts/fit.py resume=outputs/<run dir>          # continue a run from its checkpoint
    python scripts/fit.py --help                            # groups and their options

Everything is written into Hydra's run directory (README, "Fitting"). Bad input (unknown scene,
missing asset, unreadable image, size mismatch, device=cuda without CUDA) prints one ``error:`` line
and exits with code 2.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
import torch  # noqa: E402

# torch.func's VJP products touch torch._dynamo, whose first import costs about a second: import it here
# with the other libraries, so that it is not counted in the solver's time (Adam, via .backward(), never
# imports it).
import torch._dynamo  # noqa: E402, F401
from hydra.core.config_store import ConfigStore  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import InstantiationException  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from diffrender.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint  # noqa: E402
from diffrender.config import UserError, register_configs  # noqa: E402
from diffrender.fit_inspector import make_inspector  # noqa: E402
from diffrender.io import write_png  # noqa: E402
from diffrender.logging import FitLogger, ProgressBar, image_strip, progress_enabled, write_gif  # noqa: E402
from diffrender.scenes.base import BuildContext, Scene  # noqa: E402

log = logging.getLogger("fit")
GROUPS = ("scene", "solver", "device", "renderer", "logging", "inspect")
CONF = ROOT / "conf"


# ------------------------------------------------------------------------------------------ input checks
def check_group_choices(argv: list[str]) -> None:
    """Unknown group options (``scene=nope``) fail here with one line and exit code 2; Hydra would
    exit 1 with a multi-line message. Skipped when the user adds config directories of their own."""
    if any(a.startswith(("--config-dir", "-cd", "hydra.searchpath", "--config-path", "-cp")) for a in argv):
        return
    cs = ConfigStore.instance()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if key not in GROUPS or "(" in value or value in ("", "null"):
            continue
        stored = {n.rsplit(".", 1)[0] for n in cs.list(key)} if key in cs.repo else set()
        options = sorted({p.stem for p in (CONF / key).glob("*.yaml")})
        for choice in value.split(","):
            if choice not in options and choice not in stored:
                print(f"error: unknown {key} '{choice}' (available: {', '.join(options)})", file=sys.stderr)
                sys.exit(2)


def resolve_device(cfg: DictConfig) -> tuple[torch.device, torch.dtype]:
    name = str(getattr(cfg.device.name, "value", cfg.device.name))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but CUDA is not available in this torch build/machine; "
                        "use device=cpu or device=auto")
    threads = cfg.device.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    dtype = {"float32": torch.float32, "float64": torch.float64}[str(getattr(cfg.device.dtype, "value",
                                                                          cfg.device.dtype))]
    return torch.device(name), dtype


def instantiate_or_fail(node: DictConfig, what: str, **kw: Any) -> Any:
    """``hydra.utils.instantiate`` with import/argument errors turned into one-line UserErrors."""
    try:
        return instantiate(node, **kw)
    except InstantiationException as e:
        msg = " ".join(str(e).split())
        raise UserError(f"cannot build {what} from _target_={node.get('_target_')!r}: {msg}") from None


# ------------------------------------------------------------------------------------------ helpers
def config_container(cfg: DictConfig) -> dict[str, Any]:
    c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    c.pop("hydra", None)
    return c


def fmt(v: Any, spec: str = ".3e") -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "-"
    return format(f, spec) if math.isfinite(f) else str(f)


def record_dict(record: Any) -> dict[str, Any]:
    keys = ("iteration", "cost", "cost_change", "gradient_norm", "step_norm", "rho", "damping",
            "cg_iterations", "jvps", "vjps", "residual_evals", "seconds", "accepted")
    out = {k: getattr(record, k, None) for k in keys}
    out = {k: (float(v) if isinstance(v, float) else v) for k, v in out.items()}
    out["block_costs"] = {k: float(v) for k, v in (getattr(record, "block_costs", None) or {}).items()}
    return out


def jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): jsonable(w) for k, w in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(w) for w in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, torch.Tensor):
        return jsonable(v.detach().cpu().tolist())
    return v


def cpu_params(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in x.items()}


# ------------------------------------------------------------------------------------------ the fit
class Fit:
    """One run: builds the scene and solver, runs the stages, logs, checkpoints and writes outputs."""

    def __init__(self, cfg: DictConfig, out: Path, ckpt: dict[str, Any] | None) -> None:
        self.cfg, self.out, self.ckpt = cfg, out, ckpt
        self.device, self.dtype = resolve_device(cfg)
        torch.manual_seed(int(cfg.seed))
        t0 = time.perf_counter()
        cache = Path(cfg.cache_dir)
        ctx = BuildContext(device=self.device, dtype=self.dtype,
                           renderer=OmegaConf.to_container(cfg.renderer, resolve=True),
                           cache_dir=cache if cache.is_absolute() else ROOT / cache, root=ROOT)
        builder = instantiate_or_fail(cfg.scene, "the scene", _partial_=True)
        self.scene: Scene = builder(ctx=ctx)
        self.solver_cfg = cfg.solver
        self.build_s = time.perf_counter() - t0
        lcfg = cfg.logging
        self.lcfg = lcfg
        self.step = int(ckpt["step"]) if ckpt else 0
        self.history: list[dict[str, Any]] = list(ckpt.get("history", [])) if ckpt else []
        self.solver_seconds = float(ckpt.get("solver_seconds", 0.0)) if ckpt else 0.0
        self.logger = FitLogger(out, enabled=bool(lcfg.tensorboard),
                                purge_step=self.step + 1 if ckpt else None,
                                max_views=int(lcfg.max_views))
        self.stop_requested = False
        self.last_state: Any = None
        self.stage_index = 0

    # -------------------------------------------------------------- per iteration
    def evaluate(self, x: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        images = self.scene.render_fn(x)
        return images, self.scene.metrics_fn(x, images)

    def callback(self, stage_name: str, x_full: dict[str, torch.Tensor], bar: ProgressBar):
        def cb(record: Any, x: dict[str, torch.Tensor], state: Any = None) -> bool:
            start_point = getattr(record, "iteration", None) == 0  # the solver reports x0 as iteration 0
            if not start_point:
                self.step += 1
            self.last_state = state
            sec = getattr(record, "seconds", None)
            self.solver_seconds += float(sec) if isinstance(sec, float | int) else 0.0
            cur = {**x_full, **{k: v.detach() for k, v in x.items()}}
            self.current = cur
            every, img_every = int(self.lcfg.metrics_every), int(self.lcfg.image_every)
            want_img = img_every > 0 and self.step % img_every == 0 and not (start_point and self.step > 0)
            metrics: dict[str, float] = {}
            if (every > 0 and self.step % every == 0 and not (start_point and self.step > 0)) or want_img:
                images, metrics = self.evaluate(cur)
                if want_img:
                    render, target = self.scene.display(images)
                    self.logger.images(self.step, render, target, keep_frame=bool(self.lcfg.gif))
            self.logger.iteration(self.step, record, metrics)
            rec = record_dict(record)
            if self.lcfg.history:
                self.history.append({"step": self.step, "stage": self.stage_index, "t": self.solver_seconds,
                                     **rec, "metrics": metrics})
            mtxt = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            it = rec["iteration"] if rec["iteration"] is not None else self.step
            log.info(f"[{stage_name}] it {it:>4} "
                     f"cost {fmt(rec['cost'])} |g| {fmt(rec['gradient_norm'], '.2e')} "
                     f"|step| {fmt(rec['step_norm'], '.2e')} rho {fmt(rec['rho'], '.2f')} "
                     f"lambda {fmt(rec['damping'], '.2e')} cg {rec['cg_iterations']} jvps {rec['jvps']} "
                     f"vjps {rec['vjps']} {fmt(rec['seconds'], '.3f')}s {mtxt}")
            bar.update(self.step, f"cost {fmt(rec['cost'], '.3e')} {mtxt}")
            ck = int(self.lcfg.checkpoint_every)
            stop_after = self.cfg.stop_after
            stop = not start_point and stop_after is not None and self.step >= int(stop_after)
            if state is not None and not start_point and ((ck > 0 and self.step % ck == 0) or stop):
                self.save_checkpoint(cur, state)
            if stop:
                self.stop_requested = True
                return True
            return False

        return cb

    def save_checkpoint(self, x: dict[str, torch.Tensor], state: Any, stage: int | None = None) -> None:
        save_checkpoint(self.out / CHECKPOINT_NAME, {
            "config": config_container(self.cfg), "stage": self.stage_index if stage is None else stage,
            "x": cpu_params(x), "state": state, "step": self.step, "history": self.history,
            "solver_seconds": self.solver_seconds, "stage_results": self.stage_results})

    # -------------------------------------------------------------- the run
    def run(self) -> dict[str, Any]:
        scene, ckpt = self.scene, self.ckpt
        x = {k: v.clone() for k, v in scene.x0.items()}
        start_stage, state = 0, None
        self.stage_results: list[dict[str, Any]] = []
        if ckpt:
            start_stage, state = int(ckpt["stage"]), ckpt["state"]
            x.update({k: v.to(self.device, self.dtype) for k, v in ckpt["x"].items()})
            self.stage_results = list(ckpt.get("stage_results", []))
            log.info(f"resuming at stage {start_stage}, iteration {self.step} "
                     f"from {self.out / CHECKPOINT_NAME}")
        self.current = x
        self.logger.text("config", OmegaConf.to_yaml(OmegaConf.create(config_container(self.cfg))))
        probe = instantiate_or_fail(self.solver_cfg, "the solver")
        per_stage = getattr(probe, "max_iterations", None) or self.solver_cfg.get("max_iterations") or 100
        bar = ProgressBar(int(per_stage) * len(scene.stages), progress_enabled(str(self.lcfg.progress)))
        bar.update(self.step)
        interrupted, t_solve, inspector = False, time.perf_counter(), None
        try:
            for i in range(start_stage, len(scene.stages)):
                st = scene.stages[i]
                self.stage_index = i
                solver = probe if i == start_stage else instantiate_or_fail(self.solver_cfg, "the solver")
                problem = st.make_problem(x)
                xs = {k: x[k] for k in st.keys}
                log.info(f"stage {i + 1}/{len(scene.stages)} '{st.name}': free {', '.join(st.keys)} "
                         f"({sum(v.numel() for v in xs.values())} unknowns), solver {type(solver).__name__}")
                resumed = getattr(state, "iteration", 0) if state is not None and i == start_stage else 0
                inspector = make_inspector(self.cfg.get("inspect"), scene, problem, self.logger.writer, self.out,
                                           x_full=x, step_offset=self.step - resumed)
                callbacks = self.callback(st.name, x, bar)
                callbacks = callbacks if inspector is None else [callbacks, inspector]
                if state is not None and i == start_stage:
                    xs = {k: v.to(self.device, self.dtype) for k, v in state.x.items()}
                    result = solver.solve(problem, xs, callback=callbacks, state=state)
                else:
                    result = solver.solve(problem, xs, callback=callbacks)
                state = None
                x.update({k: v.detach() for k, v in result.x.items()})
                term = str(getattr(result, "termination", "unknown"))
                report = result.report() if hasattr(result, "report") else ""
                recs = getattr(result, "records", []) or []
                self.stage_results.append({"stage": st.name, "termination": term, "report": report,
                                           "final_cost": getattr(result, "cost", None),
                                           "iterations": len(recs)})
                log.info(f"stage '{st.name}' finished: {term}")
                if report:
                    log.info(report)
                cost = getattr(result, "cost", None)
                if "nan" in term.lower() or (isinstance(cost, float) and not math.isfinite(cost)):
                    log.warning(f"the solver met non-finite values ({term}); "
                                "outputs hold its best finite point")
                if term == "interrupted" or self.stop_requested:
                    interrupted = term == "interrupted"
                    if interrupted and self.last_state is not None:
                        self.save_checkpoint(x, self.last_state)
                    break
        except KeyboardInterrupt:
            interrupted = True
            x = self.current
        bar.close()
        solve_s = time.perf_counter() - t_solve
        if inspector is not None and not interrupted:
            inspector.finish(x)
        return self.finish(x, interrupted, solve_s)

    # -------------------------------------------------------------- outputs
    def finish(self, x: dict[str, torch.Tensor], interrupted: bool, solve_s: float) -> dict[str, Any]:
        scene, out = self.scene, self.out
        images, metrics = self.evaluate(x)
        render, target = scene.display(images)
        files = []
        strip = image_strip(render, target, max_views=int(self.lcfg.max_views) or 4)
        write_png(out / "final_strip.png", strip)
        files.append("final_strip.png")
        for i in range(render.shape[0]):
            write_png(out / f"render_{i:03d}.png", render[i])
            write_png(out / f"target_{i:03d}.png", target[i])
        files += ["render_XXX.png", "target_XXX.png"]
        files += scene.save_fn(x, out)
        if self.lcfg.gif and self.logger.frames:
            self.logger.frames.append(image_strip_uint8(render, target, int(self.lcfg.max_views)))
            write_gif(out / "progress.gif", self.logger.frames, fps=int(self.lcfg.gif_fps))
            files.append("progress.gif")
        if scene.mesh_fn is not None and self.lcfg.mesh:
            v, f, c = scene.mesh_fn(x)
            self.logger.mesh(self.step, v, f, c)
        self.logger.iteration(self.step, object(), metrics)
        self.logger.hparams(config_container(self.cfg), metrics)
        self.logger.close()
        last = self.stage_results[-1] if self.stage_results else {}
        term = "interrupted" if interrupted else ("stopped (stop_after)" if self.stop_requested
                                                  else last.get("termination", "unknown"))
        summary = {
            "scene": scene.name, "solver": str(self.solver_cfg.get("_target_")),
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "termination": term, "interrupted": interrupted, "stopped": self.stop_requested,
            "iterations": self.step, "final_cost": last.get("final_cost"),
            "final_metrics": metrics, "stages": self.stage_results,
            "timings": {"build_s": self.build_s, "solve_wall_s": solve_s, "solver_s": self.solver_seconds},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else None,
            "outputs": files, "history": self.history,
        }
        (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=1))
        mtxt = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        log.info(f"final: {term}; {self.step} iterations; {mtxt}")
        if interrupted:
            print("interrupted: outputs written for the best state so far", file=sys.stderr)
        print(f"{scene.name}: {term} after {self.step} iterations "
              f"({self.solver_seconds:.1f} s in the solver); {mtxt}")
        print(f"results in {out}")
        return summary


def image_strip_uint8(render: torch.Tensor, target: torch.Tensor, max_views: int):
    from diffrender.io import to_uint8

    return to_uint8(image_strip(render, target, max_views))


def run(cfg: DictConfig) -> dict[str, Any]:
    out = Path(HydraConfig.get().runtime.output_dir)
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        saved = OmegaConf.create(ckpt["config"])
        saved.resume, saved.stop_after = str(cfg.resume), None
        cfg = saved
        out = Path(cfg.resume)
    return Fit(cfg, out, ckpt).run()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    register_configs()
    check_group_choices(sys.argv[1:])
    main()
