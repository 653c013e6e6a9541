"""Helpers for the sharding tests: a small multi-term least-squares problem, the solver runs compared
between one process and several, the worker run by each spawned gloo process, and a solver whose process
of one rank raises (for fits launched by torchrun)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import torch

from diffrender.problem import Problem
from diffrender.solvers import Adam, Dogleg, LevenbergMarquardt, NewtonCG

TERMS = [f"t{k}" for k in range(6)]
N_A, N_B = 6, 4  # two parameter tensors: n = 10 (dense threshold 64: the dense path unless told otherwise)


def _data(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    a = torch.randn(9, N_A, generator=g, dtype=torch.float64)
    b = torch.randn(9, N_B, generator=g, dtype=torch.float64)
    y = torch.randn(9, generator=g, dtype=torch.float64)
    return a, b, y


def owners(world: int) -> dict[str, int]:
    """Contiguous blocks of terms per rank; the prior lives in rank 0."""
    out = {t: i * world // len(TERMS) for i, t in enumerate(TERMS)}
    out["prior"] = 0
    return out


def make_problem(rank: int = 0, world: int = 1, reduction=None, keep_graphs: bool = True) -> Problem:
    """Terms ``t_k(x) = tanh(A_k a) + (B_k b)^2 / 4 - y_k`` (9 residuals each) and a prior on ``a``,
    this rank's share of them (all of them in one process)."""
    own = owners(world)
    terms = {}
    for k, name in enumerate(TERMS):
        if own[name] != rank:
            continue
        a, b, y = _data(k)
        terms[name] = lambda x, ctx, a=a, b=b, y=y: torch.tanh(a @ x["a"]) + (b @ x["b"]) ** 2 / 4 - y
    if rank == 0:
        terms["prior"] = lambda x, ctx: 0.3 * (x["a"] - 0.5)
    remote = [t for t, r in own.items() if r != rank]
    return Problem(terms, keep_graphs=keep_graphs, reduction=reduction, remote_terms=remote,
                   sampled_terms=TERMS)


def x0() -> dict[str, torch.Tensor]:
    return {"a": torch.full((N_A,), 0.1, dtype=torch.float64), "b": torch.linspace(-0.5, 0.5, N_B, dtype=torch.float64)}


# name -> (solver, keep_graphs); five iterations each, every step accepted in one process
VARIANTS = {
    "lm_dense": (lambda: LevenbergMarquardt(max_iterations=5, linear_solver="dense"), True),
    "lm_cg": (lambda: LevenbergMarquardt(max_iterations=5, linear_solver="cg", dense_threshold=4), True),
    "lm_cg_recomputed": (lambda: LevenbergMarquardt(max_iterations=5, linear_solver="cg", dense_threshold=4), False),
    "lm_cg_subsampled": (lambda: LevenbergMarquardt(max_iterations=5, linear_solver="cg", dense_threshold=4,
                                                    curvature_subsample=0.5, initial_damping=1.0), True),
    "dogleg_cg": (lambda: Dogleg(max_iterations=5, linear_solver="cg", dense_threshold=4), True),
    "newton_cg": (lambda: NewtonCG(max_iterations=5, initial_radius=1.0), True),
    "adam": (lambda: Adam(max_iterations=5, lr=0.05), True),
}


def probe() -> torch.Tensor:
    return torch.linspace(-1.0, 2.0, N_A + N_B, dtype=torch.float64)


def solve_all(rank: int = 0, world: int = 1, reduction=None) -> dict[str, torch.Tensor]:
    """Every variant's parameters after five iterations (flattened), and ``J^T J v`` at x0."""
    out = {}
    for name, (make, keep) in VARIANTS.items():
        problem = make_problem(rank, world, reduction, keep_graphs=keep)
        res = make().solve(problem, x0())
        out[name] = torch.cat([res.x["a"], res.x["b"]])
    problem = make_problem(rank, world, reduction)
    lin = problem.linearize(x0(), problem.prepare_context(x0()))
    out["jtj_v"] = lin.op.jtj(probe())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, out_dir: str, scene_kw: dict) -> None:
    """One spawned process: join the gloo group, run every variant and a sharded scene fit, save the
    results, then check that a collective nobody answers times out as a ReductionError."""
    import torch.distributed as dist

    from diffrender.distributed import fit_group
    from diffrender.linalg.reduction import AllReduce, ReductionError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    red = AllReduce()
    results = solve_all(rank, world, red)
    results["scene"] = scene_fit(rank, world, red, **scene_kw)
    results["bytes"] = torch.tensor(float(red.bytes))
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    short = AllReduce(fit_group(timeout_s=0.5))
    if rank == 0:  # rank 1 never joins this sum
        t = time.perf_counter()
        try:
            short.sum(torch.ones(3))
            outcome = "no error"
        except ReductionError as err:
            outcome = f"ReductionError after {time.perf_counter() - t:.1f} s: {err}"
        (Path(out_dir) / "timeout.txt").write_text(outcome)
    else:
        time.sleep(1.5)
    os._exit(0)  # the timed-out group cannot be torn down cleanly; the results are on disk


def scene_fit(rank: int, world: int, reduction, **kw) -> torch.Tensor:
    """Three LM iterations (dense path) of cow_shape's first stage, this rank's share (float64)."""
    from diffrender.scenes import cow_shape
    from diffrender.scenes.base import BuildContext

    ctx = BuildContext(dtype=torch.float64, root=Path(__file__).resolve().parents[1], rank=rank, world_size=world,
                       reduction=reduction, memory_budget=kw.pop("memory_budget", None))
    scene = cow_shape.build(**kw, ctx=ctx)
    st = scene.stages[0]
    x = {k: scene.x0[k] for k in st.keys}
    res = LevenbergMarquardt(max_iterations=3, linear_solver="dense").solve(st.make_problem(scene.x0), x)
    return res.x["offsets"].reshape(-1)


SCENE = dict(name="cow_shape", mesh="assets/spot.obj", image_size=16, sigma=1e-3, sigma_schedule=[],
             coarse_to_fine=False, gamma=1e-4, fov_deg=60.0, sphere_level=1, sphere_radius=0.6, views=4,
             distance=2.5, elevations_deg=[-20.0, 25.0], color_stage=False, w_silhouette=1.0, w_color=1.0,
             w_laplacian=1.0, w_edge=0.3, w_normal=0.1, preconditioner_lambda=10.0, view_chunks=2, coarse_scale=1.0)


class FailingLM(LevenbergMarquardt):
    """Levenberg-Marquardt whose process of rank ``fail_rank`` raises at iteration ``fail_at``: a process
    that dies in the middle of a sharded fit."""

    def __init__(self, fail_rank: int = 1, fail_at: int = 3, **options) -> None:
        super().__init__(**options)
        self.fail_rank, self.fail_at = fail_rank, fail_at

    def iterate(self, problem, state, ws):
        if int(os.environ.get("RANK", "0")) == self.fail_rank and state.iteration + 1 == self.fail_at:
            raise RuntimeError(f"injected failure at iteration {self.fail_at}")
        return super().iterate(problem, state, ws)
