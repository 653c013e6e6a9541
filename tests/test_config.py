"""Hydra configs of scripts/fit.py: every scene x solver composes and instantiates; schemas reject typos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

import diffrender.config  # noqa: F401  (registers the schemas)
from diffrender.scenes.base import BuildContext
from diffrender.solvers import Adam, Dogleg, GaussNewton, LevenbergMarquardt, NewtonCG

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
SCENES = ["teapot_pose", "cow_shape", "bunny_silhouette", "lights_albedo", "texture", "images"]
SOLVERS = {"lm": LevenbergMarquardt, "gn": GaussNewton, "dogleg": Dogleg, "newton_cg": NewtonCG, "adam": Adam}
# tiny sizes so that building every scene (rendering its targets) stays fast
TINY = {
    "teapot_pose": ["renderer.image_size=16", "renderer.coarse_to_fine=false"],
    "cow_shape": ["renderer.image_size=16", "scene.views=2", "scene.sphere_level=1"],
    "bunny_silhouette": ["renderer.image_size=16", "scene.views=2", "scene.sphere_level=1"],
    "lights_albedo": ["renderer.image_size=16", "scene.views=2"],
    "texture": ["renderer.image_size=16", "scene.views=2", "scene.texture_size=16"],
    "images": [],  # the shipped example: 4 views of 64x64
}


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=overrides)


def test_conf_groups_have_the_expected_options():
    groups = {g: sorted(p.stem for p in (ROOT / "conf" / g).glob("*.yaml"))
              for g in ("scene", "solver", "device", "renderer", "logging")}
    assert groups["scene"] == sorted(SCENES)
    assert set(SOLVERS) <= set(groups["solver"])
    assert groups["device"] == ["auto", "cpu", "cuda"]


def test_default_config_is_teapot_pose_with_lm_on_cpu():
    cfg = _compose([])
    assert cfg.scene.name == "teapot_pose" and cfg.solver._target_.endswith("LevenbergMarquardt")
    assert cfg.device.name.value == "cpu" and cfg.device.dtype.value == "float32"


_built: dict[str, object] = {}


@pytest.mark.parametrize("scene", SCENES)
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_every_scene_and_solver_composes_and_instantiates(scene, solver, tmp_path_factory):
    cfg = _compose([f"scene={scene}", f"solver={solver}", *TINY[scene]])
    s = instantiate(cfg.solver)
    assert type(s) is SOLVERS[solver]
    if scene not in _built:  # the scene does not depend on the solver: build it once
        ctx = BuildContext(renderer=OmegaConf.to_container(cfg.renderer), cache_dir=tmp_path_factory.mktemp("c"),
                           root=ROOT)
        _built[scene] = instantiate(cfg.scene, _partial_=True)(ctx=ctx)
    sc = _built[scene]
    size = cfg.renderer.image_size or 64
    views = cfg.scene.get("views", 1 if scene == "teapot_pose" else 4)
    key = "rgb" if "rgb" in sc.target else "alpha"
    assert tuple(sc.target[key].shape[:3]) == (views, size, size)  # overrides reach the builder
    x = {k: v.clone() for k, v in sc.x0.items()}
    for st in sc.stages:
        problem = st.make_problem(x)
        xs = {k: x[k] for k in st.keys}
        ev = problem.evaluate(xs, problem.prepare_context(xs))
        assert torch.isfinite(torch.tensor(ev.cost)) and ev.cost > 0  # x0 is not the answer


@pytest.mark.parametrize("override, fragment", [
    ("scene.imag_size=3", "imag_size"),  # typo'd key
    ("renderer.image_size=abc", "image_size"),  # wrong type
    ("device.dtype=float16", "dtype"),  # not an allowed value
    ("logging.image_every=often", "image_every"),
    ("scene=cow_shape scene.views=many", "views"),
])
def test_schema_rejects_typos_and_wrong_types(override, fragment):
    with pytest.raises(ConfigCompositionException) as e:
        _compose(override.split())
    assert fragment in str(e.value) + str(e.value.__cause__)


def test_solver_group_is_open_for_custom_targets():
    cfg = _compose(["solver=custom", "solver._target_=mypkg.MySolver", "+solver.my_option=3"])
    assert cfg.solver._target_ == "mypkg.MySolver" and cfg.solver.my_option == 3
    cfg = _compose(["solver._target_=mypkg.Other"])  # retarget the default lm config
    assert cfg.solver._target_ == "mypkg.Other"


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_every_solver_option_is_settable_and_the_yaml_lists_only_real_differing_options(solver):
    """solver.<option>=... works for every constructor option (the schema is the options dataclass), a
    typo'd one fails at compose time, and the YAML itself names only real options set to non-defaults."""
    import dataclasses

    import yaml

    fields = {f.name: f.default for f in dataclasses.fields(SOLVERS[solver].Options)}
    cfg = _compose([f"solver={solver}"])
    assert set(cfg.solver) - {"_target_"} == set(fields)
    assert instantiate(cfg.solver).__class__ is SOLVERS[solver]
    some = sorted(fields)[len(fields) // 2]
    value = fields[some]
    flipped = (not value) if isinstance(value, bool) else value
    assert _compose([f"solver={solver}", f"solver.{some}={flipped}"]).solver[some] == flipped
    with pytest.raises(ConfigCompositionException):
        _compose([f"solver={solver}", "solver.max_iteration=3"])
    own = yaml.safe_load((ROOT / "conf" / "solver" / f"{solver}.yaml").read_text())
    own = {k: v for k, v in own.items() if k != "defaults"}
    assert set(own) <= set(fields), set(own) - set(fields)
    assert all(own[k] != fields[k] for k in own), "the YAML repeats a class default"


# ---------------------------------------------------------------------------------- value checks
@pytest.mark.parametrize("override, message", [
    ("renderer.sigma=0", "renderer.sigma must be a positive number, got 0.0"),
    ("renderer.sigma=-1e-4", "renderer.sigma must be a positive number, got -0.0001"),
    ("renderer.gamma=0", "renderer.gamma must be a positive number, got 0.0"),
    ("renderer.eps=0.5", "renderer.eps must lie in (0, 0.5) (the coverage cutoff), got 0.5"),
    ("renderer.eps=0", "renderer.eps must lie in (0, 0.5) (the coverage cutoff), got 0.0"),
    ("renderer.image_size=0", "renderer.image_size must be at least 1, got 0"),
    ("renderer.image_size=-3", "renderer.image_size must be at least 1, got -3"),
    ("scene=cow_shape scene.views=0", "scene.views must be at least 1, got 0"),
    ("scene=bunny_silhouette scene.silhouette_levels=-1",
     "scene.silhouette_levels must be a non-negative integer, got -1"),
    ("scene.sigma_schedule=[1e-2,0]", "scene.sigma_schedule: every σ must be a positive number, got 0.0"),
    ("scene=cow_shape scene.normal_continuation=[0.1,-1]",
     "scene.normal_continuation: every factor must be a number >= 0, got -1.0"),
    ("scene=cow_shape scene.normal_continuation_iterations=0",
     "scene.normal_continuation_iterations must be at least 1, got 0"),
    ("solver=custom", "solver=custom needs your solver class: solver._target_=mypkg.MySolver"),
    ("solver.max_iterations=-1", "solver.max_iterations must be a non-negative integer, got -1"),
    ("solver.max_seconds=0", "solver.max_seconds must be a positive number, got 0.0"),
    ("logging.gif_fps=0", "logging.gif_fps must be a positive number, got 0"),
    ("stop_after=0", "stop_after must be at least 1, got 0"),
])
def test_validate_config_names_the_bad_option(override, message):
    from diffrender.config import validate_config
    from diffrender.errors import UserError

    with pytest.raises(UserError) as e:
        validate_config(_compose(override.split()))
    assert str(e.value) == message


@pytest.mark.parametrize("scene", SCENES)
def test_every_shipped_config_is_valid(scene):
    from diffrender.config import validate_config

    for solver in SOLVERS:
        validate_config(_compose([f"scene={scene}", f"solver={solver}"]))


def test_solver_options_are_checked_against_the_solver_class():
    """A class given by _target_ carries no schema: the fit checks its options against the class's Options
    before building (our own solvers' YAMLs have schemas: a wrong type fails at composition)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from fitutil import fit_module

    from diffrender.errors import UserError

    build = fit_module().build_solver
    with pytest.raises(UserError) as e:
        build(_compose(["solver=custom", "solver._target_=diffrender.solvers.LevenbergMarquardt",
                        "+solver.initial_damping=abc"]).solver)
    assert str(e.value) == "solver.initial_damping: 'abc' is not a valid value (expected <class 'float'>)"
    s = build(_compose(["solver.max_seconds=2.5"]).solver, max_iterations=7, max_seconds=1.5)
    assert s.max_iterations == 7 and s.max_seconds == 1.5  # the stage's share of the fit's budget
    custom = _compose(["solver=custom", "solver._target_=fitutil.MySolver"]).solver
    assert build(custom, max_iterations=3, max_seconds=1.0).max_iterations == 3  # no max_seconds option: not given


def _make_dir(base, barrier, queue):
    from diffrender.config import _unique_dir

    barrier.wait()
    queue.put(_unique_dir(base))


def test_run_directories_made_at_the_same_moment_are_distinct(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    base = str(tmp_path / "outputs" / "2026-01-01_00-00-00_teapot_pose_lm")
    procs = [ctx.Process(target=_make_dir, args=(base, barrier, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    dirs = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert dirs == sorted([base, base + "-2", base + "-3", base + "-4"])
    assert all(Path(d).is_dir() for d in dirs)
