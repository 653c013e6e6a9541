"""Structured-config schemas for ``scripts/fit.py`` and their ConfigStore registration.

Every YAML option under ``conf/`` names one of these dataclasses in its defaults list, so a typo'd key
or a value of the wrong type fails when Hydra composes the config, before anything runs. Our solvers'
schemas are their options dataclasses (:mod:`diffrender.solvers.options`) plus ``_target_``, so their
YAMLs list only what differs from the class defaults; ``conf/solver/custom.yaml`` has no schema on
purpose: a researcher's own solver class plugs in with options of its own
(``solver=custom solver._target_=mypkg.MySolver``), and a wrong option fails at instantiation with the
class's own ``TypeError``, which the CLI reports in one line.
Besides the schemas: ``validate_config`` (value ranges that types cannot express, one UserError naming the
option) and the resolvers behind ``hydra.run.dir`` (run directories created atomically, never shared).
This module imports no torch, so ``fit.py --help`` and config errors answer at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from diffrender.errors import UserError
from diffrender.solvers.options import SOLVER_OPTIONS

__all__ = ["UserError", "FitConfig", "register_configs", "validate_config", "created_run_dirs"]


class DeviceName(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


class DType(str, Enum):
    float32 = "float32"
    float64 = "float64"


@dataclass
class DeviceConfig:
    """Where the fit runs: ``name`` cpu | cuda | auto (cuda when available), ``dtype`` float32 | float64."""

    name: DeviceName = DeviceName.cpu
    dtype: DType = DType.float32
    threads: int | None = None  # torch CPU threads (null: torch's default)
    memory_check: bool = True  # refuse at start a fit whose estimated peak memory exceeds what is available
    # peak memory a multi-view fit aims for, per process: when keeping every view's graph would exceed it,
    # graphs are rebuilt per product in chunks of views (slower, memory bounded); null: no limit
    memory_budget_gb: float | None = 2.0


@dataclass
class DistributedConfig:
    """Sharded fits (``torchrun --nproc_per_node=N scripts/fit.py ...``)."""

    timeout_s: float = 600.0  # a collective waiting longer (a process died or hangs) ends the fit with an error


@dataclass
class RendererConfig:
    """Renderer overrides. ``None`` keeps the scene's own default (scenes pick sizes that fit fast)."""

    image_size: int | None = None
    sigma: float | None = None  # SoftRas blur in NDC² units (PyTorch3D's convention)
    gamma: float | None = None  # SoftRas depth temperature
    coarse_to_fine: bool | None = None  # run the scene's σ schedule (True) or only its final σ (False)
    # null: auto (cull exactly for closed, consistently and outward wound meshes seen from outside, where it
    # cannot change the hard silhouette); true / false: always / never (SoftRas and PyTorch3D never cull)
    cull_backfaces: bool | None = None
    eps: float | None = None  # coverage cutoff (null: the renderer's default)
    margin_px: float | None = None  # extra pixels of pairs beyond the cutoff (null: the renderer's default)


@dataclass
class LoggingConfig:
    """What the fit writes besides its results."""

    tensorboard: bool = True
    image_every: int = 5  # image strip render|target|diff (and a GIF frame) every N iterations; 0: never
    max_views: int = 4  # views shown in the image strip
    metrics_every: int = 1  # render + metrics every N iterations (0: only at the end)
    checkpoint_every: int = 5  # atomic checkpoint every N iterations; 0: never
    gif: bool = True
    gif_fps: int = 8
    mesh: bool = True  # add_mesh of the fitted mesh for shape scenes
    progress: str = "auto"  # auto (terminal and not CI) | always | never
    history: bool = True  # per-iteration history in summary.json (bench_fit.py reads it)


@dataclass
class SceneConfig:
    """Fields every scene has. ``_target_`` is the builder function in ``diffrender.scenes``."""

    _target_: str = MISSING
    name: str = MISSING
    image_size: int = 128
    sigma: float = 1e-4
    sigma_schedule: list[float] = field(default_factory=list)  # coarse-to-fine σ stages (empty: [sigma])
    coarse_to_fine: bool = True
    gamma: float = 1e-4
    fov_deg: float = 60.0


@dataclass
class PyramidConfig(SceneConfig):
    """Scenes whose coarse σ stages run on an image pyramid."""

    coarse_scale: float = 1.0  # image size of the coarse σ stages relative to image_size (image pyramid)


@dataclass
class TeapotPoseConfig(PyramidConfig):
    _target_: str = "diffrender.scenes.teapot_pose.build"
    name: str = "teapot_pose"
    mesh: str = "assets/teapot.obj"
    target_distance: float = 3.0
    target_elevation_deg: float = 50.0
    target_azimuth_deg: float = 0.0
    start_eye: list[float] = field(default_factory=lambda: [3.0, 6.9, 2.5])
    image_noise: float = 0.0  # std of Gaussian noise added to the targets (seeded), e.g. for uncertainty.json


@dataclass
class ShapeConfig(PyramidConfig):
    """Multi-view silhouette (and color) shape fits from an icosphere."""

    _target_: str = "diffrender.scenes.cow_shape.build"
    name: str = "cow_shape"
    mesh: str = "assets/spot.obj"
    sphere_level: int = 3
    sphere_radius: float = 0.6
    views: int = 20
    distance: float = 2.5
    elevations_deg: list[float] = field(default_factory=lambda: [-20.0, 25.0])
    color_stage: bool = True  # a second stage fitting per-vertex colors (and shape) to shaded images
    w_silhouette: float = 1.0
    w_color: float = 1.0
    w_laplacian: float = 1.0
    w_edge: float = 0.3
    w_normal: float = 0.1
    # the normal term's ε as a share of the start mesh's median face (2 x area): unit normals for faces well
    # above it, a bounded derivative at slivers (regularizers.normal_residual); 0: plain unit normals
    normal_softening: float = 0.1
    # coarser copies of the silhouette residual, each averaged over 2x2 more pixels (scenes/multiscale.py): a
    # Gauss-Newton model that sees further than the blur radius; 0: the full-resolution residual only
    silhouette_levels: int = 5
    # continuation of the normal term: stages at the final σ with w_normal scaled by these factors, each
    # for normal_continuation_iterations iterations, before the stage at the full weight (README, "A
    # regularizer that starts soft"); []: none
    normal_continuation: list[float] = field(default_factory=list)
    normal_continuation_iterations: int = 100
    preconditioner_lambda: float = 10.0  # (I + λL)^-1 for the CG solve (Nicolet et al. 2021); 0: off
    view_chunks: int = 1  # residual terms the views are split into (a solver may subsample their curvature)
    image_noise: float = 0.0  # std of Gaussian noise added to the targets (seeded), e.g. for uncertainty.json


@dataclass
class LightsAlbedoConfig(SceneConfig):
    """A directional light, ambient level and smooth albedo from shaded views of a known mesh."""

    _target_: str = "diffrender.scenes.lights_albedo.build"
    name: str = "lights_albedo"
    mesh: str = "assets/spot.obj"
    views: int = 6
    distance: float = 2.5
    elevation_deg: float = 20.0
    light_dir: list[float] = field(default_factory=lambda: [-0.4, -0.7, -0.6])  # direction light travels
    light_intensity: float = 0.8
    ambient: float = 0.3
    start_light_dir: list[float] = field(default_factory=lambda: [0.0, 0.0, -1.0])
    start_intensity: float = 0.5
    start_ambient: float = 0.5
    start_albedo: float = 0.5
    albedo_degree: int = 2  # albedo: a polynomial of the vertex position up to this degree (pins the light)
    specular: float = 0.0  # known Blinn-Phong k_s; > 0 also fixes the albedo/light scale (else a gauge, pinned)
    shininess: float = 16.0


@dataclass
class TextureConfig(SceneConfig):
    """A UV texture from shaded views of a known mesh under known lights. Geometry is fixed, so one σ (no
    coarse-to-fine) and a small one: silhouettes crisp, the color at each pixel from the faces it shows."""

    _target_: str = "diffrender.scenes.texture.build"
    name: str = "texture"
    mesh: str = "assets/spot.obj"  # needs UVs and <name>_texture.png (the ground truth) next to it
    sigma: float = 1e-5
    coarse_to_fine: bool = False
    texture_size: int = 256  # T: the fitted texture is (T, T, 3); ground truth = the PNG area-averaged to T²
    views: int = 8
    distance: float = 2.5
    elevations_deg: list[float] = field(default_factory=lambda: [-20.0, 25.0])
    start_value: float = 0.5  # flat gray start
    w_smooth: float = 1e-3  # weight of the texel finite-difference block (0: off)
    seen_threshold: float = 0.01  # a texel is "seen" when it gives at least this many pixels' worth of color


@dataclass
class ImagesConfig(SceneConfig):
    """Your own data: images (+ masks) and cameras in any supported format (README, "Your data")."""

    _target_: str = "diffrender.scenes.images.build"
    name: str = "images"
    folder: str = "assets/example_images"  # the dataset folder
    cameras: str | None = None  # camera file or COLMAP model folder (default: found in folder)
    format: str = "auto"  # auto | cameras.json | transforms.json | colmap
    images: str | None = None  # COLMAP: the image folder (default: an images/ folder beside the model)
    masks: str | None = None  # mask files by pattern, relative to the dataset root, e.g. masks/{stem}.png
    mesh: str | None = None  # starting mesh (world units); "sphere": an icosphere; default: named by the camera file
    sphere_level: int = 3
    sphere_radius: float = 1.0
    sphere_center: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    subdivide: int = 0  # with offsets free: subdivide the mesh this many times for a last stage
    # unknowns, any of: pose offsets colors background camera_eye camera_pose view_poses
    free: list[str] = field(default_factory=lambda: ["pose"])
    target: str = "auto"  # silhouette | rgb | both | auto (silhouettes when there are masks; rgb when colors free)
    background: str = "fixed"  # fixed (background_color) | free | alpha (compare colors premultiplied by alpha)
    background_color: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    sigma: float | None = None  # final σ (NDC²); null: auto, the coverage cutoff 2 px from an edge at the images' size
    sigma_schedule: list[float] = field(default_factory=lambda: [1e-3, 1e-4])
    final_passes: int = 2  # solves at the final σ, each against targets re-calibrated where the last ended
    coarse_blur_px: float = 3.0  # coarse σ stages run downscaled until their blur radius spans this many px
    init_axis_angle: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # pose start: world = R v + t,
    init_translation: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # R about the world origin
    look_at: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # camera_eye: the point view 0 looks at
    up: list[float] = field(default_factory=lambda: [0.0, 1.0, 0.0])  # camera_eye: world up
    search: str = "auto"  # viewpoint search: on | off | auto (when the start's hard IoU < search_below_iou)
    search_below_iou: float = 0.5
    search_directions: int = 300  # candidate directions of view 0 around the object
    search_rolls: int = 1  # rolls about the viewing axis per direction (1: keep the up direction)
    search_size: int = 32  # image size (shorter side) of the search renders
    w_silhouette: float = 1.0
    w_color: float = 1.0
    w_laplacian: float = 1.0  # offsets regularizers (as in cow_shape)
    w_edge: float = 0.3
    w_normal: float = 0.1
    # as in cow_shape (regularizers.normal_residual): bench_captures' shape goal, hard IoU 0.9898 with it
    # against 0.9873 with unit normals (0)
    normal_softening: float = 0.1
    silhouette_levels: int = 0  # coarser copies of the silhouette residual, as in cow_shape (multiscale.py)
    w_color_smooth: float = 0.01  # Laplacian of the per-vertex colors
    preconditioner_lambda: float = 10.0  # (I + λL)^-1 on the offsets (Nicolet et al. 2021); 0: Jacobi


@dataclass
class FitConfig:
    """Top-level config of ``scripts/fit.py``."""

    scene: Any = MISSING
    solver: Any = MISSING  # _target_ + flat options, deliberately schema-free (see module docstring)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    renderer: RendererConfig = field(default_factory=RendererConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 0
    resume: str | None = None  # a previous run directory: continue it from its checkpoint, in place
    stop_after: int | None = None  # stop (as if interrupted) after this many iterations in total
    cache_dir: str = ".cache/diffrender"  # synthetic targets, keyed by a hash of the scene config
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    inspect: Any = MISSING  # conf/inspect/*.yaml, schema InspectConfig (end of this file)


def solver_schema(target: str, options: type) -> type:
    """A schema for one of our solvers: its options dataclass plus ``_target_`` (the class to build), so that
    ``solver.<option>=...`` works for every option while the YAML lists only what differs from the class."""
    return dataclasses.make_dataclass(f"{options.__name__}Config", [("_target_", str, field(default=target))],
                                      bases=(options,))


def _number(cfg: DictConfig, key: str, *, integer: bool = False) -> float | None:
    """The value at ``key`` (None when absent or null); UserError when it is not a number."""
    v = OmegaConf.select(cfg, key, default=None)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, int | float)
    if isinstance(v, bool) or not ok:
        raise UserError(f"{key}: expected {'an integer' if integer else 'a number'}, got {v!r}")
    return v


def validate_config(cfg: DictConfig) -> None:
    """Value checks the schemas' types cannot express; one UserError naming the first bad option.

    Runs on the composed config before anything heavy is imported (the solver's own option types are
    checked against its ``Options`` when it is built)."""
    for key in ("renderer.sigma", "renderer.gamma", "scene.sigma", "scene.gamma", "scene.distance",
                "solver.max_seconds", "logging.gif_fps", "device.memory_budget_gb", "distributed.timeout_s"):
        v = _number(cfg, key)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise UserError(f"{key} must be a positive number, got {v}")
    for key in ("renderer.image_size", "scene.image_size", "scene.views", "logging.max_views", "stop_after",
                "scene.view_chunks", "scene.normal_continuation_iterations"):
        v = _number(cfg, key, integer=True)
        if v is not None and v < 1:
            raise UserError(f"{key} must be at least 1, got {v}")
    for key in ("solver.max_iterations", "logging.image_every", "logging.metrics_every",
                "logging.checkpoint_every", "scene.sphere_level", "scene.silhouette_levels"):
        v = _number(cfg, key, integer=True)
        if v is not None and v < 0:
            raise UserError(f"{key} must be a non-negative integer, got {v}")
    eps = _number(cfg, "renderer.eps")
    if eps is not None and not 0 < eps < 0.5:
        raise UserError(f"renderer.eps must lie in (0, 0.5) (the coverage cutoff), got {eps}")
    margin = _number(cfg, "renderer.margin_px")
    if margin is not None and not (math.isfinite(margin) and margin >= 0):
        raise UserError(f"renderer.margin_px must be >= 0, got {margin}")
    fov = _number(cfg, "scene.fov_deg")
    if fov is not None and not 0 < fov < 180:
        raise UserError(f"scene.fov_deg must lie in (0, 180), got {fov}")
    for s in OmegaConf.select(cfg, "scene.sigma_schedule", default=None) or []:
        if isinstance(s, bool) or not isinstance(s, int | float) or not (math.isfinite(s) and s > 0):
            raise UserError(f"scene.sigma_schedule: every σ must be a positive number, got {s!r}")
    for f in OmegaConf.select(cfg, "scene.normal_continuation", default=None) or []:
        if isinstance(f, bool) or not isinstance(f, int | float) or not (math.isfinite(f) and f >= 0):
            raise UserError(f"scene.normal_continuation: every factor must be a number >= 0, got {f!r}")
    solver = cfg.get("solver")
    if isinstance(solver, DictConfig) and OmegaConf.is_missing(solver, "_target_"):
        raise UserError("solver=custom needs your solver class: solver._target_=mypkg.MySolver")


# ------------------------------------------------------------------------------ run directories
_RUN_DIRS: dict[str, str] = {}  # requested name -> directory made for it (Hydra may resolve twice)
_CREATED: set[Path] = set()
_AGREED = "<the directory rank 0 made>"


def _unique_dir(base: str) -> str:
    """Create ``base`` (or ``base-2``, ``base-3``, ... when taken) atomically and return it: two fits
    started in the same second never share a directory, because ``mkdir`` fails when the name exists.
    The processes of a sharded fit share rank 0's directory."""
    if base in _RUN_DIRS:
        return _RUN_DIRS[base]
    from diffrender import distributed

    if distributed.is_initialized():  # once per process: `base` holds each process's own ${now:...}
        if _AGREED not in _RUN_DIRS:
            _RUN_DIRS[_AGREED] = distributed.agree(lambda: _make_unique_dir(base))
        return _RUN_DIRS[_AGREED]
    return _make_unique_dir(base)


def _make_unique_dir(base: str) -> str:
    root = Path(base)
    root.parent.mkdir(parents=True, exist_ok=True)
    for k in itertools.count(1):
        path = root if k == 1 else root.with_name(f"{root.name}-{k}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        _CREATED.add(path.resolve())
        _RUN_DIRS[base] = str(path)
        return str(path)
    raise AssertionError("unreachable")


def _run_dir(resume: str | None, base: str) -> str:
    """``hydra.run.dir``: the resumed run's directory, else a fresh unique one. A resume directory that
    does not exist is remembered, so that the failed run removes what Hydra creates there (its log)."""
    if resume is None:
        return _unique_dir(base)
    if not Path(resume).exists():
        _CREATED.add(Path(resume).resolve())
    return str(resume)


def _output_subdir(resume: str | None) -> str | None:
    """Hydra's ``.hydra/`` record of the composed config: written for fresh runs (by rank 0 alone in a
    sharded fit); a resume keeps the original one (what a resume changes is recorded in summary.json)."""
    from diffrender import distributed

    return ".hydra" if resume is None and distributed.env_rank() == 0 else None


def created_run_dirs() -> set[Path]:
    """Directories this process created for its runs (a run failing before its first iteration removes
    its own, and only its own)."""
    return set(_CREATED)


def _if_null(value: Any, default: Any) -> Any:
    return default if value is None else value


def register_configs() -> None:
    """Register the schemas (idempotent) and the resolvers used by ``conf/config.yaml``'s hydra section."""
    cs = ConfigStore.instance()
    cs.store(name="fit_schema", node=FitConfig)
    # group options name their schema as /schema/<group>/<name>@_here_ in their defaults list
    cs.store(group="schema/device", name="device", node=DeviceConfig)
    cs.store(group="schema/renderer", name="renderer", node=RendererConfig)
    cs.store(group="schema/logging", name="logging", node=LoggingConfig)
    cs.store(group="schema/scene", name="teapot_pose", node=TeapotPoseConfig)
    cs.store(group="schema/scene", name="shape", node=ShapeConfig)
    cs.store(group="schema/scene", name="lights_albedo", node=LightsAlbedoConfig)
    cs.store(group="schema/scene", name="texture", node=TextureConfig)
    cs.store(group="schema/scene", name="images", node=ImagesConfig)
    for name, (target, options) in SOLVER_OPTIONS.items():
        cs.store(group="schema/solver", name=name, node=solver_schema(target, options))
    for name, fn in (("if_null", _if_null), ("fit_run_dir", _run_dir), ("fit_unique_dir", _unique_dir),
                     ("fit_output_subdir", _output_subdir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_configs()


# ---------------------------------------------------------------------------------------- the inspect group
@dataclass
class InspectConfig:
    """``inspect``: look inside the fit (README, "Looking inside a fit"): sensitivity images and
    conditioning every ``every`` iterations, parameter uncertainty at the end (``uncertainty.json``)."""

    enabled: bool = False
    every: int = 5  # sensitivity images + conditioning every N iterations of each stage; 0: only at the end
    sensitivity: bool = True  # TensorBoard images sensitivity/<param>
    max_columns: int = 12  # parameters with at most this many coordinates: one image row per coordinate
    max_views: int = 4  # views per sensitivity image
    conditioning: bool = True  # scalars inspect/eig_min, eig_max, cond (and *_precond)
    preconditioned: bool = True  # also the operator PCG sees (the problem's preconditioner or Jacobi)
    lanczos_steps: int = 30  # Lanczos steps (2 products each) per conditioning estimate
    lanczos_tol: float = 1e-6  # stop early when the extreme Ritz pairs reach this relative residual
    gn_gap: bool = False  # scalar inspect/gn_gap: ||(H - JᵀJ) v|| / ||H v|| along the least-constrained v
    uncertainty: bool = True  # uncertainty.json (+ mesh colored by per-vertex std for shape scenes)
    blocks: list[str] | None = None  # residual blocks counted; null: all but the regularizers below
    regularizers: list[str] = field(
        default_factory=lambda: ["laplacian", "edge", "normal", "albedo_smooth", "gauge"])
    residual_variance: bool = True  # scale (JᵀJ)⁻¹ by σ̂² = 2 cost / (m - n); false: unit residual noise
    dense_max: int = 2000  # dense covariance up to this many parameters; Hutchinson + PCG above
    probes: int = 32  # Hutchinson probes (one PCG solve each)
    max_cg_iterations: int = 200
    seed: int = 0


def register_inspect_config() -> None:
    ConfigStore.instance().store(group="schema/inspect", name="inspect", node=InspectConfig)


register_inspect_config()
