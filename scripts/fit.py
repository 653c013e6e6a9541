#!/usr/bin/env python
"""Fit a scene's parameters to images with a configurable solver; log to TensorBoard.

    python scripts/fit.py                                   # teapot_pose with LM on the CPU
    python scripts/fit.py scene=cow_shape solver=adam renderer.image_size=96
    python scripts/fit.py -m solver=lm,gn,adam              # sweep: side-by-side TensorBoard runs
    python scripts/fit.py resume=outputs/<run dir>          # continue a run from its checkpoint
    python scripts/fit.py --help                            # groups and their options
    torchrun --nproc_per_node=2 scripts/fit.py scene=cow_shape   # views sharded over 2 processes

Everything is written into a run directory of its own (README, "Fitting"). Bad input (unknown scene,
missing asset, unreadable image, size mismatch, out-of-range option, degenerate camera, empty target or
start, device=cuda without CUDA, a fit too large for the machine's memory) prints one ``error:`` line and
exits with code 2; a run that fails before its first iteration leaves nothing behind. torch is imported
only once the config is valid, so ``--help`` and config errors answer at once. Under ``torchrun`` the
processes join one group (``diffrender.distributed``), share rank 0's run directory, and each evaluates
its share of the views; rank 0 alone logs and writes. A process that fails, or a collective that times out,
ends each process with one ``error:`` line (exit 1 where it failed, 3 in the others).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from diffrender import distributed  # noqa: E402
from diffrender.config import created_run_dirs, register_configs, validate_config  # noqa: E402
from diffrender.errors import UserError  # noqa: E402
from diffrender.jsonable import jsonable  # noqa: E402

log = logging.getLogger("fit")
GROUPS = ("scene", "solver", "device", "renderer", "logging", "inspect")
CONF = ROOT / "conf"
CHECKPOINT_NAME = "checkpoint.pt"  # diffrender.checkpoint's name, without importing torch to know it
# what `resume=` may change: the budget and what is logged; anything else would make a different fit
RESUME_SAFE = ("solver.max_iterations", "solver.max_seconds", "stop_after", "logging", "cache_dir")


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


def check_solver_overrides(argv: list[str]) -> None:
    """``solver.<option>=<value>`` for one of our solvers: an unknown option or a value of the wrong type
    fails here with one line naming it and exit code 2 (Hydra would reject it against the solver's schema
    with a multi-line message and exit 1)."""
    import dataclasses
    import typing

    import yaml

    from diffrender.solvers.options import SOLVER_OPTIONS

    chosen = "lm"  # conf/config.yaml's default
    for arg in argv:
        if arg.startswith("solver="):
            chosen = arg.split("=", 1)[1]
    if chosen not in SOLVER_OPTIONS or "," in chosen:
        return
    options = SOLVER_OPTIONS[chosen][1]
    hints = typing.get_type_hints(options)
    names = {f.name for f in dataclasses.fields(options)}
    words = {int: "an integer", float: "a number", bool: "true or false"}
    for arg in argv:
        if not arg.startswith("solver.") or "=" not in arg:
            continue
        key, text = arg[len("solver."):].split("=", 1)
        if key == "_target_":
            return  # a class of the user's: its own options
        if key not in names:
            print(f"error: solver.{key}: not an option of solver={chosen} (see `python scripts/fit.py "
                  f"solver={chosen} --cfg job`)", file=sys.stderr)
            sys.exit(2)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if isinstance(value, str):  # YAML 1.1 reads 1e-12 (no dot) as a string; Hydra's parser reads a float
            try:
                value = float(value)
            except ValueError:
                pass
        if not _type_ok(value, hints[key]):
            want = words.get(hints[key], f"a value of type {hints[key]}")
            print(f"error: solver.{key}: expected {want}, got {value!r}", file=sys.stderr)
            sys.exit(2)


def override_key(override: str) -> str:
    """``+solver.x=1`` / ``~scene.y`` / ``logging=minimal`` -> the dotted key it sets."""
    return override.lstrip("+~").split("=", 1)[0]


def resume_config(cfg: DictConfig, saved: dict[str, Any], overrides: list[str]) -> tuple[DictConfig, dict]:
    """The saved run's config with the safe overrides of this invocation applied (RESUME_SAFE); any other
    override is refused with one line, since silently dropping it would leave a wrong record."""
    out = OmegaConf.create(saved)
    applied: dict[str, Any] = {}
    for ov in overrides:
        key = override_key(ov)
        if key == "resume":
            continue
        if not any(key == s or key.startswith(s + ".") for s in RESUME_SAFE):
            raise UserError(f"resume= continues the saved run with its saved config and cannot change {key} "
                            f"(a resume may change {', '.join(RESUME_SAFE)}.*); start a new run instead")
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value, enum_to_str=True) if isinstance(value, DictConfig) else value
        if OmegaConf.select(out, key, default=None) != value:  # record what changes, not what is repeated
            OmegaConf.update(out, key, value, force_add=True)
            applied[key] = value
    if "stop_after" not in applied:
        out.stop_after = None  # a stop_after of the first run has done its job
    out.resume = str(cfg.resume)
    return out, applied


def resolve_device(cfg: DictConfig) -> tuple[Any, Any]:
    import torch

    name = str(getattr(cfg.device.name, "value", cfg.device.name))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but CUDA is not available in this torch build/machine; "
                        "use device=cpu or device=auto")
    if name == "cuda" and distributed.is_initialized():  # one GPU per process of a machine
        name = f"cuda:{distributed.env_local_rank()}"
    threads = cfg.device.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    dtype = {"float32": torch.float32, "float64": torch.float64}[str(getattr(cfg.device.dtype, "value",
                                                                          cfg.device.dtype))]
    return torch.device(name), dtype


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a config value fits an Options field's type (int, float, bool, str, X | None, Literal)."""
    import types
    import typing

    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return not isinstance(hint, type) or isinstance(value, hint)


def build_solver(node: DictConfig, **budget: Any) -> Any:
    """``hydra.utils.instantiate(cfg.solver)`` with this stage's share of the fit's budget. Options of a
    class with an ``Options`` dataclass (ours) are type-checked first, so ``solver.max_iterations=abc``
    names the option; import and argument errors become one-line UserErrors."""
    import typing

    from hydra.errors import InstantiationException
    from hydra.utils import get_class, instantiate

    target = node.get("_target_")
    try:
        options = getattr(get_class(target), "Options", None)
    except Exception:  # noqa: BLE001 - reported by instantiate below, with Hydra's message
        options = None
    if options is not None:
        hints = typing.get_type_hints(options)
        for key, value in node.items():
            if key in hints and not _type_ok(value, hints[key]):
                raise UserError(f"solver.{key}: {value!r} is not a valid value (expected {hints[key]})")
    kw = {k: v for k, v in budget.items() if k in node and v is not None}
    try:
        return instantiate(node, **kw)
    except InstantiationException as e:
        msg = " ".join(str(e).split())
        raise UserError(f"cannot build the solver from _target_={target!r}: {msg}") from None


def dtype_bytes(cfg: DictConfig) -> int:
    return 8 if str(getattr(cfg.device.dtype, "value", cfg.device.dtype)) == "float64" else 4


def memory_budget(cfg: DictConfig) -> float | None:
    """``device.memory_budget_gb`` in bytes (None: no limit)."""
    gb = cfg.device.get("memory_budget_gb")
    return None if gb is None else float(gb) * 1e9


def check_memory(cfg: DictConfig, scene: str, views: int, height: int, width: int,
                 chunk_views: int | None = None) -> None:
    """Refuse a fit whose estimated peak memory (diffrender.memory) exceeds what the machine has; ``views``
    are this process's, ``chunk_views`` the chunk size when graphs are rebuilt chunk by chunk."""
    from diffrender import memory

    if not cfg.device.get("memory_check", True):
        return
    need = memory.estimate_peak_bytes(scene, views, height, width, dtype_bytes=dtype_bytes(cfg),
                                      chunk_views=chunk_views)
    have = memory.available_bytes()
    if have is not None:  # the processes of a sharded fit on one machine share its memory
        have /= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if have is not None and need > have:
        raise UserError(f"this fit would need about {memory.gigabytes(need)} of memory at its peak ({scene}, "
                        f"{views} view(s) of {height}x{width} px), but {memory.gigabytes(have)} are available; "
                        "reduce scene.views or renderer.image_size, or lower device.memory_budget_gb "
                        "(device.memory_check=false skips this check)")


def start_renders_something(scene: Any, x: dict[str, Any]) -> bool:
    """Whether any view shows the mesh at the start (warns about the views that do not)."""
    alpha = scene.render_fn(x).get("alpha")
    if alpha is None:
        return True
    eps = 1e-4  # the renderer's coverage cutoff: below it no face counts as covering a pixel
    empty = alpha.detach().flatten(1).amax(dim=1) < eps
    if bool(empty.any()) and not bool(empty.all()):
        log.warning(f"views {empty.nonzero().flatten().tolist()} render nothing at the start; "
                    "they constrain the fit only once the mesh enters them")
    return not bool(empty.all())


def check_targets(scene: Any) -> None:
    """A target silhouette that is all zero leaves nothing to fit (e.g. an alpha channel that is all 0).
    Rank 0 (which has every view's target) decides for all processes."""

    def problem() -> str | None:
        alpha = scene.target.get("alpha")
        if alpha is None:
            return None
        empty = (alpha.detach().flatten(1).amax(dim=1) <= 0).nonzero().flatten().tolist()
        if empty:
            return (f"the target silhouette (alpha) of view {empty[0]} is all zero: nothing to fit "
                    f"({len(empty)} of {alpha.shape[0]} views empty); check the images' alpha channel")
        return None

    message = distributed.agree(problem)
    if message:
        raise UserError(message)


def check_start(scene: Any, x: dict[str, Any]) -> None:
    """A start where nothing is visible (mesh behind the camera, off-screen, camera inside it) gives a zero
    gradient: the solver would stop at once and call it converged. Say so and stop. The final-σ render
    (rank 0's, which has every view) decides "empty"; the first stage's gradient (every process: its cost
    is summed over them) decides whether a blurrier stage still sees something."""
    if distributed.agree(lambda: start_renders_something(scene, x)):
        return
    import torch

    st = scene.stages[0]
    problem = st.make_problem(x)
    xs = {k: x[k].detach().clone().requires_grad_(True) for k in st.keys}
    cost, _ = problem.cost(xs, problem.prepare_context(xs))
    grads = torch.autograd.grad(cost, list(xs.values()), allow_unused=True)
    if all(g is None or not bool((g != 0).any()) for g in grads):
        raise UserError("the render at the start is empty in every view (the mesh is behind the camera, "
                        "off-screen or around it), so no gradient can move it; choose another start "
                        "(e.g. scene.start_eye / scene.init_translation)")


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


def write_json_atomic(path: Path, data: Any) -> None:
    """Temporary file + os.replace, with SIGINT/SIGTERM held off for the few milliseconds it takes, so a
    second Ctrl-C never leaves a truncated summary."""
    in_main = hasattr(signal, "pthread_sigmask") and _is_main_thread()
    if in_main:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(jsonable(data), indent=1))
        os.replace(tmp, path)
    finally:
        if in_main:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------------------------ callbacks
@dataclass
class FitProgress:
    """What the callbacks of one fit share: the global step (iterations over all stages), the stage, the
    full current parameters, this iteration's metrics/images, and per-stage iteration counts."""

    step: int = 0
    stage: int = 0
    stage_name: str = ""
    stage_iterations: list[int] = field(default_factory=list)
    x: dict[str, Any] = field(default_factory=dict)
    start_point: bool = False
    started: bool = False  # a callback ran: the fit has logged its first iteration
    metrics: dict[str, float] = field(default_factory=dict)
    images: dict[str, Any] | None = None
    state: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)
    solver_seconds: float = 0.0
    stop_requested: bool = False
    time_up: bool = False  # sharded fits: the processes agreed that the fit's time budget is spent
    signalled: bool = False  # sharded fits: a process got Ctrl-C / SIGTERM; all stop after this iteration
    last_iteration: int = -1  # the stage's last iteration the callbacks saw

    def due(self, every: int) -> bool:
        """Every ``every`` steps (0: never); the start point of a later stage repeats the step before it."""
        return every > 0 and self.step % every == 0 and not (self.start_point and self.step > 0)


class Track:
    """Bookkeeping: step counts (global and per stage), the current full parameters, the solver state."""

    def __init__(self, p: FitProgress, x_full: dict[str, Any]) -> None:
        self.p, self.x_full = p, x_full

    def __call__(self, record: Any, x: dict[str, Any], state: Any = None) -> bool:
        p = self.p
        p.start_point = getattr(record, "iteration", None) == 0  # the solver reports x0 as iteration 0
        p.last_iteration = getattr(record, "iteration", p.last_iteration)
        if not p.start_point:
            p.step += 1
            p.stage_iterations[p.stage] += 1
        p.started = True
        p.state = state
        sec = getattr(record, "seconds", None)
        p.solver_seconds += float(sec) if isinstance(sec, float | int) else 0.0
        p.x = {**self.x_full, **{k: v.detach() for k, v in x.items()}}
        p.metrics, p.images = {}, None
        return False


class Metrics:
    """Render and compute the scene's metrics every ``metrics_every`` steps (and when images are due)."""

    def __init__(self, p: FitProgress, scene: Any, metrics_every: int, image_every: int) -> None:
        self.p, self.scene, self.every, self.image_every = p, scene, metrics_every, image_every

    def __call__(self, record: Any, x: dict[str, Any], state: Any = None) -> bool:
        p = self.p
        if p.due(self.every) or p.due(self.image_every):
            p.images = self.scene.render_fn(p.x)
            p.metrics = self.scene.metrics_fn(p.x, p.images)
        return False


class Log:
    """TensorBoard scalars and image strips, one fit.log line, the history and the progress bar."""

    def __init__(self, p: FitProgress, scene: Any, logger: Any, bar: Any, lcfg: DictConfig,
                 reduction: Any = None) -> None:
        self.p, self.scene, self.logger, self.bar, self.lcfg = p, scene, logger, bar, lcfg
        self.reduction = reduction  # sharded fits: the history records the bytes all-reduced so far

    def __call__(self, record: Any, x: dict[str, Any], state: Any = None) -> bool:
        p = self.p
        if p.images is not None and p.due(int(self.lcfg.image_every)):
            render, target = self.scene.display(p.images)
            self.logger.images(p.step, render, target, keep_frame=bool(self.lcfg.gif))
        self.logger.iteration(p.step, record, p.metrics)
        rec = record_dict(record)
        if self.lcfg.history:
            p.history.append({"step": p.step, "stage": p.stage, "t": p.solver_seconds, **rec,
                              "metrics": p.metrics, "cpu_s": time.process_time()})
            if self.reduction is not None:  # collectives and bytes all-reduced so far
                p.history[-1]["reduced"] = [self.reduction.calls, self.reduction.bytes]
        mtxt = " ".join(f"{k} {v:.4g}" for k, v in p.metrics.items())
        it = rec["iteration"] if rec["iteration"] is not None else p.step
        log.info(f"[{p.stage_name}] it {it:>4} "
                 f"cost {fmt(rec['cost'])} |g| {fmt(rec['gradient_norm'], '.2e')} "
                 f"|step| {fmt(rec['step_norm'], '.2e')} rho {fmt(rec['rho'], '.2f')} "
                 f"lambda {fmt(rec['damping'], '.2e')} cg {rec['cg_iterations']} jvps {rec['jvps']} "
                 f"vjps {rec['vjps']} {fmt(rec['seconds'], '.3f')}s {mtxt}")
        self.bar.update(p.step, f"cost {fmt(rec['cost'], '.3e')} {mtxt}")
        return False


class Stop:
    """``stop_after``: stop (as Ctrl-C would, with a checkpoint) after this many iterations in total.

    In a sharded fit (``agree``: the fit's reduction) the processes also agree here, every iteration, on
    the stops that clocks and signals decide (the fit's time budget, ``time_up()``; Ctrl-C / SIGTERM,
    ``SIGNALS``), so that they all stop after the same iteration."""

    def __init__(self, p: FitProgress, stop_after: int | None, agree: Any = None,
                 time_up: Callable[[], bool] | None = None) -> None:
        self.p, self.stop_after, self.agree, self.time_up = p, stop_after, agree, time_up

    def __call__(self, record: Any, x: dict[str, Any], state: Any = None) -> bool:
        p = self.p
        if self.stop_after is not None and not p.start_point and p.step >= self.stop_after:
            p.stop_requested = True
        if self.agree is not None:
            time_up, signalled = self.agree.any([self.time_up is not None and self.time_up(), SIGNALS["count"] > 0])
            p.time_up, p.signalled = p.time_up or time_up, p.signalled or signalled
        return p.stop_requested or p.time_up or p.signalled


class Checkpoint:
    """Every ``checkpoint_every`` steps, and when the fit is asked to stop, save what a resume needs."""

    def __init__(self, p: FitProgress, every: int, save: Callable[[], None]) -> None:
        self.p, self.every, self.save = p, every, save

    def __call__(self, record: Any, x: dict[str, Any], state: Any = None) -> bool:
        p = self.p
        if state is not None and not p.start_point and (p.due(self.every) or p.stop_requested or p.signalled):
            self.save()
        return False


# ------------------------------------------------------------------------------------------ the fit
class Fit:
    """One run: builds the scene, runs its stages within one shared budget, logs, checkpoints, writes outputs.

    ``solver.max_iterations`` and ``solver.max_seconds`` bound the whole fit: each stage gets what the
    stages before it left (README, "Fitting"). Seconds are the solver's own (its iterations), not the time
    spent logging or computing metrics in the callbacks."""

    def __init__(self, cfg: DictConfig, out: Path, ckpt: dict[str, Any] | None = None,
                 applied: dict[str, Any] | None = None) -> None:
        import torch

        # torch.func's VJP products touch torch._dynamo, whose first import costs about a second: import it
        # here, before the clock starts, so that it is not counted in the solver's time (Adam, via
        # .backward(), never imports it)
        import torch._dynamo  # noqa: F401

        from diffrender.logging import FitLogger
        from diffrender.scenes.base import BuildContext

        self.cfg, self.out, self.ckpt = cfg, out, ckpt
        self.device, self.dtype = resolve_device(cfg)
        torch.manual_seed(int(cfg.seed))
        self.scene_name = str(cfg.scene.name)
        self.rank, self.world_size, self.reduction = 0, 1, None
        if distributed.is_initialized():
            from diffrender.linalg.reduction import AllReduce

            self.reduction = AllReduce(distributed.fit_group(float(cfg.distributed.timeout_s)))
            self.rank, self.world_size = self.reduction.rank, self.reduction.world_size
        size = cfg.renderer.image_size or cfg.scene.get("image_size")
        if cfg.scene.get("folder") is None and size:  # synthetic scenes: the size is known before the build
            views, chunk = int(cfg.scene.get("views", 1)), None
            if "view_chunks" in cfg.scene:  # a scene that chunks and shards its views (scenes/views.py)
                from diffrender.scenes.views import plan_views

                plan = plan_views(self.scene_name, views, int(size), int(size), int(cfg.scene.view_chunks),
                                  rank=self.rank, world_size=self.world_size, memory_budget=memory_budget(cfg),
                                  dtype_bytes=dtype_bytes(cfg))
                views, chunk = len(plan.views_of(self.rank)), None if plan.keep_graphs else plan.chunk_views
            check_memory(cfg, self.scene_name, views, int(size), int(size), chunk)
        t0 = time.perf_counter()
        cache = Path(cfg.cache_dir)
        ctx = BuildContext(device=self.device, dtype=self.dtype,
                           renderer=OmegaConf.to_container(cfg.renderer, resolve=True),
                           cache_dir=cache if cache.is_absolute() else ROOT / cache, root=ROOT,
                           memory_budget=memory_budget(cfg), rank=self.rank, world_size=self.world_size,
                           reduction=self.reduction)
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate

        try:
            builder = instantiate(cfg.scene, _partial_=True)
        except InstantiationException as e:
            raise UserError(f"cannot build the scene: {' '.join(str(e).split())}") from None
        self.scene = builder(ctx=ctx)
        inspect = cfg.get("inspect")
        if self.world_size > 1 and inspect is not None and inspect.get("enabled", False):
            raise UserError("inspect=enabled needs every residual in one process: it is not available in a fit "
                            "launched by torchrun (inspect the run afterwards in one process)")
        if self.world_size > 1 and self.scene.views is None:
            log.warning(f"scene {self.scene_name} does not shard its views: each of the {self.world_size} processes "
                        "evaluates all of them (same result, no speed-up)")
        if cfg.scene.get("folder") is not None:  # user data: the size is known once the images are read
            t = next(iter(self.scene.target.values()))
            check_memory(cfg, self.scene_name, t.shape[0], t.shape[1], t.shape[2])
        self.build_s = time.perf_counter() - t0
        self.lcfg = cfg.logging
        self.p = FitProgress(stage_iterations=[0] * len(self.scene.stages))
        self.solve_seconds = 0.0  # wall time inside solve() calls, over the whole fit (resumes included)
        self.resumes: list[dict[str, Any]] = []
        if ckpt:
            self.p.step = int(ckpt["step"])
            self.p.history = list(ckpt.get("history", []))
            self.p.solver_seconds = float(ckpt.get("solver_seconds", 0.0))
            self.p.stage_iterations = list(ckpt.get("stage_iterations", self.p.stage_iterations))
            self.solve_seconds = float(ckpt.get("solve_seconds", 0.0))
            self.resumes = list(ckpt.get("resumes", [])) + [{"at_iteration": self.p.step, "applied": applied or {}}]
        self.logger = FitLogger(out, enabled=bool(self.lcfg.tensorboard) and self.rank == 0,
                                purge_step=self.p.step + 1 if ckpt else None, max_views=int(self.lcfg.max_views),
                                config_text=OmegaConf.to_yaml(OmegaConf.create(config_container(cfg))))
        self.stage_results: list[dict[str, Any]] = list(ckpt.get("stage_results", [])) if ckpt else []
        self._stage_t0: float | None = None
        self.stage_start_x: dict[str, Any] = {}  # the parameters where the current stage began (checkpointed)

    # -------------------------------------------------------------- checkpoint
    def save_checkpoint(self) -> None:
        from diffrender.checkpoint import save_checkpoint

        p = self.p
        if p.state is None or self.rank != 0:
            return
        solve_s = self.solve_seconds + (time.perf_counter() - self._stage_t0 if self._stage_t0 else 0.0)
        save_checkpoint(self.out / CHECKPOINT_NAME, {
            "config": config_container(self.cfg), "stage": p.stage,
            "x": {k: v.detach().cpu().clone() for k, v in p.x.items()}, "state": p.state, "step": p.step,
            "history": p.history, "solver_seconds": p.solver_seconds, "solve_seconds": solve_s,
            "stage_iterations": p.stage_iterations, "stage_results": self.stage_results,
            "stage_start_x": self.stage_start_x, "resumes": self.resumes, "world_size": self.world_size})

    def callbacks(self, x_full: dict[str, Any], bar: Any) -> list[Callable[..., bool]]:
        """Bookkeeping, metrics, logging, stopping and checkpointing, as separate callbacks (in this order:
        a stop is checkpointed, and the logger still sees the iteration a stop ends). In a sharded fit the
        other ranks only keep count and take part in the stop; rank 0 shows and saves."""
        p, lc = self.p, self.lcfg
        stop = Stop(p, None if self.cfg.stop_after is None else int(self.cfg.stop_after), self.reduction,
                    self.time_up if self.reduction is not None else None)
        if self.rank != 0:
            return [Track(p, x_full), stop]
        return [Track(p, x_full), Metrics(p, self.scene, int(lc.metrics_every), int(lc.image_every)),
                Log(p, self.scene, self.logger, bar, lc, self.reduction), stop,
                Checkpoint(p, int(lc.checkpoint_every), self.save_checkpoint)]

    def time_up(self) -> bool:
        """Whether the fit's ``solver.max_seconds`` (the solvers' own time) is spent; sharded fits check it in
        :class:`Stop`, where the processes agree, instead of each solver on its own clock."""
        max_s = self.cfg.solver.get("max_seconds")
        return max_s is not None and self.p.solver_seconds >= float(max_s)

    def report_unseen(self, result: Any, cbs: list[Callable[..., bool]]) -> None:
        """Records a solver did not pass to the callbacks (ours pass every one; a researcher's own may stop
        without calling back for its last iteration) go through bookkeeping, metrics and logging, so that
        counts, history and TensorBoard hold every iteration."""
        st = getattr(result, "state", None)
        x = getattr(st, "x", None) or result.x
        for rec in getattr(result, "records", None) or []:
            # (not a start point the solver did not report: a start without a finite cost is a failure)
            if getattr(rec, "iteration", -1) > max(self.p.last_iteration, 0):
                for cb in cbs:
                    cb(rec, x, st)

    # -------------------------------------------------------------- the run
    def run(self) -> dict[str, Any]:
        from diffrender.fit_inspector import make_inspector
        from diffrender.logging import ProgressBar, progress_enabled
        from diffrender.solvers import CallbackList, Solver

        scene, ckpt, p = self.scene, self.ckpt, self.p
        x = {k: v.clone() for k, v in scene.x0.items()}
        start_stage, state = 0, None
        saved_world = int(ckpt.get("world_size", 1)) if ckpt else self.world_size
        if saved_world != self.world_size:
            raise UserError(f"{self.out} was fitted by {saved_world} process(es) and is resumed by {self.world_size}: "
                            f"resume it with the same number (torchrun --nproc_per_node={saved_world} ...)")
        if ckpt:
            start_stage, state = int(ckpt["stage"]), ckpt["state"]
            x.update({k: v.to(self.device, self.dtype) for k, v in ckpt["x"].items()})
            applied = self.resumes[-1]["applied"]
            log.info(f"resuming at stage {start_stage}, iteration {p.step} from {self.out / CHECKPOINT_NAME}"
                     + (f"; applied {', '.join(f'{k}={v}' for k, v in applied.items())}" if applied else ""))
        else:
            check_targets(scene)
            check_start(scene, x)
        p.x = x
        max_it = self.cfg.solver.get("max_iterations")
        max_s = self.cfg.solver.get("max_seconds")
        bar = ProgressBar(int(max_it) if max_it is not None else None,
                          progress_enabled(str(self.lcfg.progress)) and self.rank == 0, initial=p.step)
        interrupted, termination, message, t_solve = False, None, "", time.perf_counter()
        inspector = None
        try:
            for i in range(start_stage, len(scene.stages)):
                st = scene.stages[i]
                p.stage, p.stage_name = i, st.name
                done_before = sum(p.stage_iterations[:i])
                budget = {"max_iterations": None if max_it is None else int(max_it) - done_before,
                          "max_seconds": None if max_s is None else float(max_s) - p.solver_seconds}
                # a continuation stage stops after its own iterations and hands on to the next stage
                capped = st.max_iterations is not None and (budget["max_iterations"] is None
                                                            or st.max_iterations < budget["max_iterations"])
                if capped:
                    budget["max_iterations"] = st.max_iterations
                if budget["max_iterations"] is not None and budget["max_iterations"] <= 0:
                    termination, message = "max_iterations", f"reached max_iterations = {max_it} (whole fit)"
                    break
                if budget["max_seconds"] is not None and budget["max_seconds"] <= 0:
                    termination, message = "time_limit", f"reached max_seconds = {max_s} (whole fit)"
                    break
                if self.reduction is not None:  # the processes agree on the time budget in Stop
                    budget["max_seconds"] = None
                solver = build_solver(self.cfg.solver, **budget)
                # a stage's problem may depend on where the stage began (targets calibrated on the mesh there):
                # a resumed stage is rebuilt from its saved start, so that it continues the same problem
                resuming = state is not None and i == start_stage and ckpt and ckpt.get("stage_start_x")
                if resuming:
                    start_x = {**x, **{k: v.to(self.device, self.dtype) for k, v in ckpt["stage_start_x"].items()}}
                else:
                    start_x = x
                self.stage_start_x = {k: v.detach().cpu().clone() for k, v in start_x.items()}
                problem = st.make_problem(start_x)
                xs = {k: x[k] for k in st.keys}
                log.info(f"stage {i + 1}/{len(scene.stages)} '{st.name}': free {', '.join(st.keys)} "
                         f"({sum(v.numel() for v in xs.values())} unknowns), solver {type(solver).__name__}")
                cbs = self.callbacks(x, bar)
                inspector = make_inspector(self.cfg.get("inspect"), scene, problem, self.logger.writer, self.out,
                                           x_full=x, step_fn=lambda: p.step)
                cbs += [inspector] if inspector is not None else []
                # a researcher's own solver may take one callable only: CallbackList is one
                cb = cbs if isinstance(solver, Solver) else CallbackList(cbs)
                kw = {}
                if state is not None and i == start_stage:
                    xs = {k: v.to(self.device, self.dtype) for k, v in state.x.items()}
                    kw["state"] = state
                p.last_iteration = getattr(kw.get("state"), "iteration", -1)
                self._stage_t0 = time.perf_counter()
                try:
                    result = solver.solve(problem, xs, callback=cb, **kw)
                finally:
                    self.solve_seconds += time.perf_counter() - self._stage_t0
                    self._stage_t0 = None
                self.report_unseen(result, [c for c in cbs if isinstance(c, Track | Metrics | Log)])
                state = None
                x.update({k: v.detach() for k, v in result.x.items()})
                p.x = x
                termination = str(getattr(result, "termination", "unknown"))
                message = str(getattr(result, "message", "") or "")
                report = result.report() if hasattr(result, "report") else ""
                cost = getattr(result, "cost", None)
                self.stage_results.append({"stage": st.name, "termination": termination, "message": message,
                                           "report": report, "final_cost": cost,
                                           "iterations": p.stage_iterations[i]})
                log.info(f"stage '{st.name}' finished: {termination}" + (f" ({message})" if message else ""))
                if report:
                    log.info(report)
                if termination == "failure" and not p.started:
                    raise UserError(f"the solver failed at the start of stage '{st.name}': "
                                    f"{message or 'no finite cost'}")
                if isinstance(cost, float) and not math.isfinite(cost):
                    log.warning(f"stage '{st.name}' ended with a non-finite cost ({cost})")
                if termination == "interrupted":
                    interrupted = True
                    if p.state is not None:
                        self.save_checkpoint()
                if p.signalled:
                    interrupted = True
                if p.time_up:
                    termination, message = "time_limit", f"reached max_seconds = {max_s} (whole fit)"
                if termination == "max_iterations" and capped and i + 1 < len(scene.stages) \
                        and not (p.stop_requested or p.signalled):
                    continue  # the stage's own cap, not the fit's budget
                if termination in ("interrupted", "failure", "max_iterations", "time_limit") or p.stop_requested \
                        or p.signalled:
                    break  # with a shared budget, a stage that used it up leaves none for the next
        except KeyboardInterrupt:
            interrupted = True
            x = p.x
        finally:
            bar.close()
        if inspector is not None and not interrupted:
            inspector.finish(x)
        if interrupted:
            termination = "interrupted"
        elif p.stop_requested:
            termination = "stopped (stop_after)"
        return self.finish(x, termination or "unknown", message, time.perf_counter() - t_solve)

    # -------------------------------------------------------------- outputs
    def summary(self, termination: str, message: str, metrics: dict[str, float], files: list[str],
                solve_s: float) -> dict[str, Any]:
        import torch

        last = self.stage_results[-1] if self.stage_results else {}
        return {
            "scene": self.scene.name, "solver": str(self.cfg.solver.get("_target_")),
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "termination": termination, "message": message, "interrupted": termination == "interrupted",
            "stopped": self.p.stop_requested, "iterations": self.p.step,
            "budget": {"max_iterations": self.cfg.solver.get("max_iterations"),
                       "max_seconds": self.cfg.solver.get("max_seconds")},
            "final_cost": last.get("final_cost"), "final_metrics": metrics, "stages": self.stage_results,
            "resumes": self.resumes, "world_size": self.world_size,
            "views": self.scene.views.describe() if self.scene.views is not None else None,
            "memory_budget_gb": self.cfg.device.get("memory_budget_gb"),
            "timings": {"build_s": self.build_s, "solve_wall_s": solve_s, "solver_s": self.p.solver_seconds},
            "peak_rss_mb": peak_rss_mb(),
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else None,
            "outputs": files, "run_dir": str(self.out), "history": self.p.history,
        }

    def write_outputs(self, x: dict[str, Any], images: dict[str, Any]) -> list[str]:
        from diffrender.io import to_uint8, write_png
        from diffrender.logging import image_strip, write_gif

        scene, out, lc = self.scene, self.out, self.lcfg
        render, target = scene.display(images)
        write_png(out / "final_strip.png", image_strip(render, target, max_views=int(lc.max_views) or 4))
        for i in range(render.shape[0]):
            write_png(out / f"render_{i:03d}.png", render[i])
            write_png(out / f"target_{i:03d}.png", target[i])
        files = ["final_strip.png", "render_XXX.png", "target_XXX.png"] + list(scene.save_fn(x, out))
        if lc.gif and self.logger.frames:
            self.logger.frames.append(to_uint8(image_strip(render, target, int(lc.max_views))))
            write_gif(out / "progress.gif", self.logger.frames, fps=float(lc.gif_fps))
            files.append("progress.gif")
        if scene.mesh_fn is not None and lc.mesh:
            self.logger.mesh(self.p.step, *scene.mesh_fn(x))
        return files

    def finish(self, x: dict[str, Any], termination: str, message: str, solve_s: float) -> dict[str, Any]:
        """Final metrics, outputs and summary.json. A second Ctrl-C (or SIGTERM) while they are written still
        leaves a summary.json, marked interrupted. Rank 0 alone writes (the others return what ended the fit)."""
        peaks = {f"rank{self.rank}": peak_rss_mb()}
        if self.reduction is not None:  # every process's peak memory, for rank 0's summary
            peaks = self.reduction.sum_floats(peaks)
        if self.rank != 0:
            self.logger.close()
            return {"termination": termination, "message": message, "run_dir": str(self.out)}
        metrics: dict[str, float] = {}
        files: list[str] = []
        summary = self.summary(termination, message, metrics, files, solve_s)
        if self.reduction is not None:
            summary.update(peak_rss_mb_per_rank=[peaks[f"rank{r}"] for r in range(self.world_size)],
                           reduced={"collectives": self.reduction.calls, "bytes": self.reduction.bytes})
        try:
            images = self.scene.render_fn(x)
            metrics.update(self.scene.metrics_fn(x, images))
            write_json_atomic(self.out / "summary.json", summary)  # from here on a summary exists
            files += self.write_outputs(x, images)
            self.logger.iteration(self.p.step, object(), metrics)
            self.logger.hparams(config_container(self.cfg), metrics)
        except KeyboardInterrupt:
            summary.update(termination="interrupted", interrupted=True, outputs_complete=False)
            log.warning("interrupted while writing outputs: summary.json is written, other outputs may be missing")
        finally:
            self.logger.close()
        summary["peak_rss_mb"] = peak_rss_mb()
        write_json_atomic(self.out / "summary.json", summary)
        term = summary["termination"]
        mtxt = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        log.info(f"final: {term}; {self.p.step} iterations; {mtxt}")
        if term == "interrupted":
            print("interrupted: outputs written for the best state so far", file=sys.stderr)
        print(f"{self.scene.name}: {term} after {self.p.step} iterations "
              f"({self.p.solver_seconds:.1f} s in the solver); {mtxt}")
        print(f"results in {self.out}")
        return summary


# ------------------------------------------------------------------------------------------ entry points
def prepare(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, dict[str, Any] | None, dict[str, Any]]:
    """The config to run (validated; for ``resume=``, the saved one with the safe overrides applied), the
    checkpoint (or None) and what a resume applied."""
    validate_config(cfg)
    if not cfg.resume:
        return cfg, None, {}
    from diffrender.checkpoint import load_checkpoint

    ckpt = load_checkpoint(cfg.resume)
    cfg, applied = resume_config(cfg, ckpt["config"], overrides)
    validate_config(cfg)
    return cfg, ckpt, applied


def run(cfg: DictConfig, out: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run one fit into ``out`` (in-process entry point; the CLI adds error handling and clean-up)."""
    cfg, ckpt, applied = prepare(cfg, overrides or [])
    if ckpt:
        out = Path(cfg.resume)
    return Fit(cfg, out, ckpt, applied).run()


def remove_fresh_run_dir(out: Path) -> None:
    """A run that fails before its first iteration leaves nothing: its directory goes, if this process made
    it for this run (a directory the user named, or one holding a run's results, is left alone)."""
    out = out.resolve()
    if out not in created_run_dirs() or (out / CHECKPOINT_NAME).exists() or (out / "summary.json").exists():
        return
    for h in list(logging.getLogger().handlers):  # Hydra's fit.log handler
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve().parent == out:
            logging.getLogger().removeHandler(h)
            h.close()
    shutil.rmtree(out, ignore_errors=True)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


SIGNALS = {"count": 0}  # sharded fits: Ctrl-C / SIGTERM seen by this process (Stop makes all processes agree)


def _note_signal(signum: int, frame: Any) -> None:
    """A sharded fit stops after the iteration in which any process got the signal (every process must
    stop at the same point, or the others would wait for it); a second signal interrupts at once."""
    SIGNALS["count"] += 1
    if SIGNALS["count"] > 1:
        raise KeyboardInterrupt(f"signal {signum}")


def _error_line(text: str) -> str:
    """One line, prefixed with the rank in a sharded fit."""
    where = f"rank {distributed.env_rank()} of {distributed.env_world_size()}: " if distributed.is_initialized() else ""
    return f"error: {where}{' '.join(str(text).split())}"


def cli(cfg: DictConfig, out: Path, overrides: list[str]) -> int:
    """A fit as the command line runs it; returns the exit code. 0: done (or stopped, or interrupted with
    outputs written); 2: bad input or a failed solve, with one ``error:`` line on stderr (and, before the
    first iteration, the fresh run directory removed); 130: interrupted before the first iteration."""
    in_main = _is_main_thread()
    sharded = distributed.is_initialized()
    if in_main:  # SIGTERM stops the fit like Ctrl-C: best state, outputs, summary.json marked interrupted
        signal.signal(signal.SIGTERM, _note_signal if sharded else _raise_interrupt)
        if sharded:
            signal.signal(signal.SIGINT, _note_signal)
    try:
        summary = run(cfg, out, overrides)
    except UserError as e:
        print(_error_line(str(e)), file=sys.stderr)
        remove_fresh_run_dir(out)
        return 2
    except KeyboardInterrupt:
        print("interrupted before the first iteration: nothing written", file=sys.stderr)
        remove_fresh_run_dir(out)
        return 130
    except Exception as e:
        if not sharded:
            raise
        from diffrender.linalg.reduction import ReductionError

        if isinstance(e, ReductionError):  # another process died or hangs: this one stops, its checkpoint stays
            print(_error_line(f"{e}; another process of this fit failed or stopped answering (see its own error "
                              f"line); the last checkpoint in {out} is intact"), file=sys.stderr)
            return 3
        print(_error_line(f"{type(e).__name__}: {e} (HYDRA_FULL_ERROR=1 shows the traceback)"), file=sys.stderr)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        return 1
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if sharded:
                signal.signal(signal.SIGINT, signal.default_int_handler)
    distributed.shutdown()
    if distributed.env_rank() != 0:
        return 0
    if summary["termination"] == "failure":
        print(f"error: the solver failed ({summary['message'] or 'no message'}); outputs of the best point "
              f"so far are in {summary['run_dir']}", file=sys.stderr)
        return 2
    return 0


def quiet_other_ranks() -> None:
    """Ranks other than 0 write no fit.log and print only warnings and errors (rank 0 logs the fit)."""
    if distributed.env_rank() == 0:
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler):
            root.removeHandler(h)
            h.close()
    root.setLevel(logging.WARNING)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    if distributed.is_initialized():
        quiet_other_ranks()
        if str(hc.mode) == "RunMode.MULTIRUN":
            print(_error_line("a fit launched by torchrun is one job: drop -m (run the sweep's fits one by one)"),
                  file=sys.stderr)
            sys.exit(2)
    code = cli(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    register_configs()
    check_group_choices(sys.argv[1:])
    check_solver_overrides(sys.argv[1:])
    distributed.init_from_env()  # under torchrun: join the other processes (before Hydra makes the run dir)
    main()
