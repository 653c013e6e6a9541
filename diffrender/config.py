"""Structured-config schemas for ``scripts/fit.py`` and their ConfigStore registration.

Every YAML option under ``conf/`` names one of these dataclasses in its defaults list, so a typo'd key
or a value of the wrong type fails when Hydra composes the config, before anything runs. Solvers are
the exception on purpose: ``conf/solver/*.yaml`` carry a ``_target_`` and flat keyword options that
are handed to ``hydra.utils.instantiate`` as they are, so a researcher's own solver class plugs in
without a schema of ours (``solver._target_=mypkg.MySolver``); a wrong option there fails at
instantiation with the class's own ``TypeError``, which the CLI reports in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class UserError(ValueError):
    """Bad user input (unknown scene, missing file, unreadable image, ...): the CLI prints its
    one-line message as ``error: ...`` and exits with code 2, without a traceback."""


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
class TeapotPoseConfig(SceneConfig):
    _target_: str = "diffrender.scenes.teapot_pose.build"
    name: str = "teapot_pose"
    mesh: str = "assets/teapot.obj"
    target_distance: float = 3.0
    target_elevation_deg: float = 50.0
    target_azimuth_deg: float = 0.0
    start_eye: list[float] = field(default_factory=lambda: [3.0, 6.9, 2.5])
    coarse_scale: float = 1.0  # image size of the coarse σ stages relative to image_size (image pyramid)


@dataclass
class ShapeConfig(SceneConfig):
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
    preconditioner_lambda: float = 10.0  # (I + λL)^-1 for the CG solve (Nicolet et al. 2021); 0: off


@dataclass
class LightsAlbedoConfig(SceneConfig):
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
    w_smooth: float = 0.01  # weight of the albedo Laplacian (fills in vertices no view sees)


@dataclass
class ImagesConfig(SceneConfig):
    """Real data: a folder of images + ``cameras.json`` (format in the README)."""

    _target_: str = "diffrender.scenes.images.build"
    name: str = "images"
    folder: str = "assets/example_images"
    cameras: str | None = None  # default: <folder>/cameras.json
    mesh: str | None = None  # default: the "mesh" entry of cameras.json
    free: list[str] = field(default_factory=lambda: ["pose"])  # any of pose, offsets, colors
    target: str = "auto"  # silhouette | rgb | auto (silhouette when the images have alpha)
    init_axis_angle: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    init_translation: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    w_laplacian: float = 1.0  # regularizer weight when offsets are free


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


def _if_null(value: Any, default: Any) -> Any:
    return default if value is None else value


def register_configs() -> None:
    """Register the schemas (idempotent) and the ``if_null`` resolver used by ``hydra.run.dir``."""
    cs = ConfigStore.instance()
    cs.store(name="fit_schema", node=FitConfig)
    # group options name their schema as /schema/<group>/<name>@_here_ in their defaults list
    cs.store(group="schema/device", name="device", node=DeviceConfig)
    cs.store(group="schema/renderer", name="renderer", node=RendererConfig)
    cs.store(group="schema/logging", name="logging", node=LoggingConfig)
    cs.store(group="schema/scene", name="teapot_pose", node=TeapotPoseConfig)
    cs.store(group="schema/scene", name="shape", node=ShapeConfig)
    cs.store(group="schema/scene", name="lights_albedo", node=LightsAlbedoConfig)
    cs.store(group="schema/scene", name="images", node=ImagesConfig)
    if not OmegaConf.has_resolver("if_null"):
        OmegaConf.register_new_resolver("if_null", _if_null)


register_configs()
