"""Structured-config schemas for ``scripts/fit.py`` and their ConfigStore registration.

Every YAML option under ``conf/`` names one of these dataclasses in its defaults list, so a typo'd key
or a value of the wrong type fails when Hydra composes the config, before anything runs. Our solvers'
schemas are their options dataclasses (:mod:`diffrender.solvers.options`) plus ``_target_``, so their
YAMLs list only what differs from the class defaults; ``conf/solver/custom.yaml`` has no schema on
purpose: a researcher's own solver class plugs in with options of its own
(``solver=custom solver._target_=mypkg.MySolver``), and a wrong option fails at instantiation with the
class's own ``TypeError``, which the CLI reports in one line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from diffrender.solvers.options import SOLVER_OPTIONS


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
    cull_backfaces: bool = False  # SoftRas counts back faces; true: faster, for closed consistently wound meshes
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


def solver_schema(target: str, options: type) -> type:
    """A schema for one of our solvers: its options dataclass plus ``_target_`` (the class to build), so that
    ``solver.<option>=...`` works for every option while the YAML lists only what differs from the class."""
    return dataclasses.make_dataclass(f"{options.__name__}Config", [("_target_", str, field(default=target))],
                                      bases=(options,))


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
    cs.store(group="schema/scene", name="texture", node=TextureConfig)
    cs.store(group="schema/scene", name="images", node=ImagesConfig)
    for name, (target, options) in SOLVER_OPTIONS.items():
        cs.store(group="schema/solver", name=name, node=solver_schema(target, options))
    if not OmegaConf.has_resolver("if_null"):
        OmegaConf.register_new_resolver("if_null", _if_null)


register_configs()
