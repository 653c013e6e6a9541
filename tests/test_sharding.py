"""Sharded and memory-bounded problems: rebuilt graphs give the products of kept ones, chunked scenes the
images, costs and gradients of unchunked ones, and two gloo processes the iterates of one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
from distutil import SCENE, VARIANTS, free_port, make_problem, probe, scene_fit, solve_all, worker, x0

from diffrender.errors import UserError
from diffrender.linalg.operator import term_generators
from diffrender.linalg.reduction import IDENTITY, Reduction
from diffrender.problem import Problem
from diffrender.scenes import cow_shape
from diffrender.scenes.base import BuildContext
from diffrender.scenes.views import plan_views


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ------------------------------------------------------------------------------------------ one process
def test_rebuilt_graphs_give_the_products_of_kept_graphs():
    x = x0()
    kept, rebuilt = make_problem(keep_graphs=True), make_problem(keep_graphs=False)
    a = kept.linearize(x, None)
    b = rebuilt.linearize(x, None)
    v = probe()
    assert torch.allclose(b.gradient, a.gradient, rtol=1e-12, atol=1e-14)
    assert torch.allclose(b.op.jtj(v), a.op.jtj(v), rtol=1e-12, atol=1e-14)
    assert torch.allclose(b.op.jvp(v), a.op.jvp(v), rtol=1e-12, atol=1e-14)
    assert torch.allclose(b.op.dense_jtj(), a.op.dense_jtj(), rtol=1e-12, atol=1e-14)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.allclose(b.op.diag_hutchinson(4, gen()), a.op.diag_hutchinson(4, gen()), rtol=1e-12)
    # an independent reference: J from torch.autograd.functional.jacobian of the stacked residuals
    flat = lambda d: torch.cat([r.reshape(-1) for r in kept.residual_blocks(  # noqa: E731
        {"a": d[:6], "b": d[6:]}).values()])
    jac = torch.autograd.functional.jacobian(flat, torch.cat([x["a"], x["b"]]))
    assert torch.allclose(b.op.jtj(v), jac.T @ (jac @ v), rtol=1e-10)
    assert rebuilt.counters.rebuilds > 0 and kept.counters.rebuilds == 0


def test_hutchinson_probes_do_not_depend_on_which_terms_a_process_holds():
    """Each term draws its probes from its own generator: a term's share of the diagonal is the same in a
    problem that holds only some of the terms."""
    full = make_problem().linearize(x0(), None)
    half = Problem({"t4": full.problem.terms["t4"], "t5": full.problem.terms["t5"]}).linearize(x0(), None)
    alone = Problem({"t5": full.problem.terms["t5"], "t4": full.problem.terms["t4"]}).linearize(x0(), None)
    d_half = half.op.diag_hutchinson(3, torch.Generator().manual_seed(1))
    d_alone = alone.op.diag_hutchinson(3, torch.Generator().manual_seed(1))
    assert torch.allclose(d_half, d_alone, rtol=1e-12)  # same terms in another order: same probes
    # and the same as t4's and t5's shares of the full problem's estimate (all its terms drawn from one seed)
    names = list(full.op.ops)
    assert len(names) > 2
    gens = term_generators(torch.Generator().manual_seed(1), names)
    shares = {t: full.op.ops[t].diag_hutchinson(3, gens[t]) for t in names}
    assert torch.allclose(d_half, shares["t4"] + shares["t5"], rtol=1e-12)
    d_full = full.op.diag_hutchinson(3, torch.Generator().manual_seed(1))
    assert torch.allclose(d_full, sum(shares.values()), rtol=1e-12)


def test_plan_views_keeps_graphs_when_they_fit_and_chunks_when_not():
    roomy = plan_views("cow_shape", 20, 64, 64, 1, memory_budget=2e9)
    assert roomy.keep_graphs and roomy.single
    tight = plan_views("cow_shape", 100, 96, 96, 1, memory_budget=2e9)
    assert not tight.keep_graphs and len(tight.chunks) > 1
    assert sorted(tight.views) == list(range(100))
    from diffrender import memory

    assert memory.estimate_peak_bytes("cow_shape", 100, 96, 96, chunk_views=tight.chunk_views) <= 2e9
    two = plan_views("cow_shape", 7, 32, 32, 1, rank=1, world_size=2)
    assert two.owners == (0, 1) and two.views_of(0) + two.views_of(1) == list(range(7))
    with pytest.raises(UserError, match="cannot be shared by 3 processes"):
        plan_views("cow_shape", 2, 32, 32, 1, world_size=3)


def small_scene(**kw):
    cfg = {**SCENE, **kw}
    budget = cfg.pop("memory_budget", None)
    ctx = BuildContext(dtype=torch.float64, root=cow_shape_root(), memory_budget=budget)
    return cow_shape.build(**cfg, ctx=ctx)


def cow_shape_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def test_chunked_rendering_gives_the_images_costs_and_gradients_of_unchunked():
    whole = small_scene(view_chunks=1)
    # a budget below the baseline: graphs rebuilt per product, one view per chunk
    chunked = small_scene(view_chunks=1, memory_budget=1.0)
    assert whole.views is None and chunked.views is not None
    assert not chunked.views.keep_graphs and len(chunked.views.chunks) == SCENE["views"]
    x = {"offsets": 0.05 * torch.sin(torch.arange(whole.x0["offsets"].numel(), dtype=torch.float64)).reshape(-1, 3)}
    for key in whole.target:
        assert torch.allclose(chunked.target[key], whole.target[key], rtol=0, atol=1e-12)
    a, b = whole.render_fn(x), chunked.render_fn(x)
    assert torch.allclose(b["alpha"], a["alpha"], rtol=0, atol=1e-12)
    pa, pb = whole.stages[0].make_problem(x), chunked.stages[0].make_problem(x)
    la = pa.linearize(x, pa.prepare_context(x))
    lb = pb.linearize(x, pb.prepare_context(x))
    assert math.isclose(lb.cost, la.cost, rel_tol=1e-12)
    assert torch.allclose(lb.gradient, la.gradient, rtol=1e-10, atol=1e-12)
    v = torch.cos(torch.arange(la.op.n, dtype=torch.float64))
    assert torch.allclose(lb.op.jtj(v), la.op.jtj(v), rtol=1e-10, atol=1e-12)
    # and the first-order path: the autograd gradient of the chunked cost
    xs = {"offsets": x["offsets"].clone().requires_grad_(True)}
    cost, _ = pb.cost(xs, pb.prepare_context(xs))
    cost.backward()
    assert torch.allclose(xs["offsets"].grad.reshape(-1), la.gradient, rtol=1e-10, atol=1e-12)


def test_identity_reduction_and_remote_terms_need_a_sharding():
    assert IDENTITY.sum(t := torch.ones(2)) is t and IDENTITY.sum_floats({"a": 1.0}) == {"a": 1.0}
    with pytest.raises(ValueError, match="need a sharding reduction"):
        Problem({"a": lambda x, c: x["p"]}, remote_terms=["b"])

    class Fake(Reduction):
        world_size = 2

    with pytest.raises(ValueError, match="unknown terms"):
        Problem({"a": lambda x, c: x["p"]}, remote_terms=["b"], reduction=Fake(), sampled_terms=["a", "c"])


# ------------------------------------------------------------------------------------------ two processes
def test_two_gloo_processes_take_the_iterates_of_one(tmp_path):
    """LM (dense, CG, CG with rebuilt graphs, CG with subsampled curvature), dogleg, Newton-CG and Adam on
    a six-term problem, and three LM iterations (dense path) of a sharded cow_shape: the parameters after
    the run match one process's to 1e-6 (float64), and both processes hold the same bits. The all-reduced
    J^T J v equals one process's product. A collective that a process never joins ends as a ReductionError.
    (The scene uses the dense path: on this tiny, ill-conditioned cow_shape, truncated CG turns the
    rounding-level difference of summing in another order (1e-15 in J^T J v) into 1e-3 in its step.)"""
    mp.start_processes(worker, args=(2, free_port(), str(tmp_path), dict(SCENE)), nprocs=2, start_method="spawn")
    one = solve_all()
    one["scene"] = scene_fit(0, 1, None, **dict(SCENE))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in [*VARIANTS, "scene"]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # every process took the same decisions
        assert rel(ranks[0][name], one[name]) <= 1e-6, (name, rel(ranks[0][name], one[name]))
        assert rel(one[name], x0_flat(name, one)) > 1e-3, name  # the solvers moved: the check could fail
    assert rel(ranks[0]["jtj_v"], one["jtj_v"]) <= 1e-12
    assert float(ranks[0]["bytes"]) > 0
    outcome = (tmp_path / "timeout.txt").read_text()
    assert outcome.startswith("ReductionError") and "all_reduce across 2 processes failed" in outcome, outcome


def x0_flat(name: str, one: dict) -> torch.Tensor:
    if name == "scene":
        return torch.zeros_like(one["scene"])
    return torch.cat([x0()["a"], x0()["b"]])
