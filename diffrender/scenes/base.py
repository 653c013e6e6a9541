"""What every scene builder returns, and the helpers they share (metrics, target cache, settings).

A scene is where the two wings meet: it closes the renderer over the fixed data (mesh, cameras,
targets) to give the solver a residual function of named parameter tensors, and it knows the ground
truth and how to show and save a result. Builders take their config fields as keywords plus a
``ctx: BuildContext`` (device, dtype, renderer overrides, cache directory).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffrender.errors import UserError

Params = dict[str, Tensor]


@dataclass
class BuildContext:
    """What a builder needs besides its own config: where and how to put tensors, renderer
    overrides (``None`` fields keep the scene's defaults), the target cache and the project root
    against which relative asset paths are resolved. Multi-view scenes also read the peak memory to aim
    for (``memory_budget`` bytes, None: no limit) and, in a sharded fit, this process's ``rank`` among
    ``world_size`` and the ``reduction`` their problems sum with (:mod:`diffrender.scenes.views`)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    renderer: dict[str, Any] = field(default_factory=dict)
    cache_dir: Path | None = None
    root: Path = field(default_factory=Path.cwd)
    memory_budget: float | None = None
    rank: int = 0
    world_size: int = 1
    reduction: Any = None

    def path(self, p: str | Path) -> Path:
        """Relative paths: the current directory first (the user's own data), then the project root
        (the shipped assets)."""
        p = Path(p)
        if p.is_absolute() or (Path.cwd() / p).exists():
            return p.resolve() if not p.is_absolute() else p
        return self.root / p

    def asset(self, p: str | Path) -> Path:
        """A required input file; UserError naming it when it is missing."""
        q = self.path(p)
        if not q.is_file():
            raise UserError(f"asset not found: {q}")
        return q

    def opt(self, key: str, default: Any) -> Any:
        v = self.renderer.get(key)
        return default if v is None else v


@dataclass
class Stage:
    """One solve of a (possibly staged) fit: a Problem over the parameters ``keys``, the others held at
    their current values. ``make_problem(x)`` receives the full current parameters. ``max_iterations``
    caps this stage's iterations within the fit's budget (a continuation stage that hands on to the next
    one after so many iterations rather than at convergence); None: the stage runs to its solver's stop."""

    name: str
    keys: list[str]
    make_problem: Callable[[Params], Any]
    max_iterations: int | None = None


@dataclass
class Scene:
    """A fit ready to run.

    x0: all parameters (stages free subsets of them); stages: solved in order, each from where the
    previous stopped; target: {"alpha": (N, H, W)} and/or {"rgb": (N, H, W, 3)}; render_fn(x): images
    of the same kinds for visualization at the final settings; metrics_fn(x, images): floats (``iou``,
    ``psnr`` and ground-truth errors when known); save_fn(x, out_dir): writes fitted parameters (OBJ /
    JSON) and returns the file names; mesh_fn(x): (verts, faces, colors or None) for shape scenes.
    In a sharded fit, ``target``, ``render_fn`` and ``metrics_fn`` cover every view in rank 0 (which alone
    shows and saves results); other ranks hold the targets of their own views only.
    """

    name: str
    x0: Params
    stages: list[Stage]
    target: dict[str, Tensor]
    render_fn: Callable[[Params], dict[str, Tensor]]
    metrics_fn: Callable[[Params, dict[str, Tensor]], dict[str, float]]
    save_fn: Callable[[Params, Path], list[str]]
    mesh_fn: Callable[[Params], tuple[Tensor, Tensor, Tensor | None]] | None = None
    ground_truth: dict[str, Any] | None = None
    views: Any = None  # a ViewPlan when the scene chunks (and shards) its views; None: one term, every process

    def display(self, images: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(render, target) pair to show: color when the scene has color targets, else silhouettes."""
        if "rgb" in self.target and "rgb" in images:
            return images["rgb"], self.target["rgb"]
        return images["alpha"], self.target["alpha"]


def sigma_stages(sigma: float, schedule: list[float], coarse_to_fine: bool, ctx: BuildContext) -> list[float]:
    """The σ values to solve with in order: the coarse-to-fine schedule (ending at the final σ), or the
    final σ alone. A renderer.sigma override replaces the final σ."""
    final = float(ctx.opt("sigma", sigma))
    c2f = bool(ctx.opt("coarse_to_fine", coarse_to_fine))
    sched = [float(s) for s in schedule if float(s) > final] if c2f else []
    return sched + [final]


def stage_size(size: int, scale: float, min_size: int = 16) -> int:
    """Image size of a coarse (blurred) stage: ``scale · size``, at least ``min_size`` (or ``size`` if smaller).
    A wide blur carries no fine detail, and fewer pixels mean far fewer pixel-face pairs."""
    return max(min(size, min_size), min(size, round(size * scale)))


def render_settings(sigma: float, gamma: float, ctx: BuildContext, fixed_geometry: bool = False, **kw: Any) -> Any:
    """The renderer's settings for one stage. ``renderer.cull_backfaces: null`` leaves culling to the scene:
    the renderer's "auto" where nothing moves relative to the cameras (``fixed_geometry``: lights, colors,
    textures), off where the fit moves the mesh or the cameras. There, a face that turns from front to back
    drops its halo at once: the cost jumps where the Gauss-Newton model sees nothing, and on cow_shape LM
    needed 2-4x the iterations with culling (cost 97 against 26 after 25 iterations) while each was 1.7x
    cheaper."""
    from diffrender.render import RenderSettings

    extra = {k: float(ctx.renderer[k]) for k in ("eps", "margin_px") if ctx.renderer.get(k) is not None}
    cull = ctx.renderer.get("cull_backfaces")
    if cull is None:
        cull = "auto" if fixed_geometry else False
    return RenderSettings(sigma=sigma, gamma=float(ctx.opt("gamma", gamma)),
                          cull_backfaces=cull if cull == "auto" else bool(cull), **extra, **kw)


def iou(alpha: Tensor, target: Tensor, threshold: float = 0.5) -> float:
    """Silhouette intersection over union after thresholding both images (1.0 when both are empty)."""
    a, b = alpha > threshold, target > threshold
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def psnr(img: Tensor, target: Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1]."""
    mse = ((img.detach() - target) ** 2).mean().item()
    return float("inf") if mse == 0 else -10.0 * math.log10(mse)


def chamfer(a: Tensor, b: Tensor, chunk: int = 4096) -> float:
    """Symmetric Chamfer distance between point sets a (P, 3) and b (Q, 3): mean squared distance to the
    nearest neighbour, summed over both directions (PyTorch3D's convention)."""

    def one_way(p: Tensor, q: Tensor) -> Tensor:
        return torch.cat([torch.cdist(p[i:i + chunk], q).min(dim=1).values ** 2
                          for i in range(0, p.shape[0], chunk)]).mean()

    a, b = a.detach(), b.detach()
    return float(one_way(a, b) + one_way(b, a))


def image_metrics(images: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, float]:
    """IoU of silhouettes and PSNR of colors (or of silhouettes when there is no color)."""
    out = {}
    if "alpha" in images and "alpha" in target:
        out["iou"] = iou(images["alpha"], target["alpha"])
    if "rgb" in images and "rgb" in target:
        out["psnr"] = psnr(images["rgb"], target["rgb"])
    elif "alpha" in images and "alpha" in target:
        out["psnr"] = psnr(images["alpha"], target["alpha"])
    return out


def cached(ctx: BuildContext, key: dict[str, Any],
           make: Callable[[], dict[str, Tensor]], store: bool = True) -> dict[str, Tensor]:
    """Synthetic targets rendered once: ``torch.save`` under the cache directory, keyed by a hash of
    ``key`` (scene config, dtype, renderer settings, the asset files' size and mtime), rendered without
    gradients. ``store=False``:
    use the cache but do not write it (``make`` renders only part of the targets, e.g. one process's views)."""
    if ctx.cache_dir is None:
        with torch.no_grad():  # targets never keep a graph, whatever ``make`` does
            return make()
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    path = Path(ctx.cache_dir) / f"{key.get('scene', 'scene')}_{hashlib.sha256(blob).hexdigest()[:16]}.pt"
    if path.is_file():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return {k: v.to(ctx.device) for k, v in data.items()}
        except Exception:
            pass  # a stale or partial cache file: render again
    with torch.no_grad():
        data = make()
    if not store:
        return data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes of a sharded fit may write at once
    torch.save({k: v.detach().cpu() for k, v in data.items()}, tmp)
    tmp.replace(path)
    return data


def add_image_noise(images: dict[str, Tensor], std: float, seed: int = 0) -> dict[str, Tensor]:
    """Targets plus i.i.d. Gaussian noise of standard deviation ``std`` (seeded; none when ``std`` is 0), so
    that a synthetic fit keeps a residual and its estimated noise level and uncertainty mean something."""
    if not std > 0:
        return images
    gen = torch.Generator().manual_seed(seed)
    return {k: v + std * torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device) for k, v in images.items()}


def file_key(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def load_mesh(ctx: BuildContext, path: str | Path, *, normalize: bool = True) -> Any:
    """An OBJ asset on the context's device/dtype, centred and scaled to unit radius when asked."""
    from diffrender import mesh as meshlib

    p = ctx.asset(path)
    try:
        m = meshlib.load_obj(p, dtype=ctx.dtype, device=ctx.device)
    except ValueError as e:
        raise UserError(f"cannot read mesh {p}: {str(e).splitlines()[0]}") from None
    if not bool((meshlib.face_normals(m.verts, m.faces).norm(dim=-1) > 0).any()):
        raise UserError(f"mesh {p}: all {m.faces.shape[0]} faces have zero area, nothing can be rendered")
    tex = p.with_name(p.stem + "_texture.png")  # e.g. spot.obj + spot_texture.png (no .mtl shipped)
    if m.uvs is not None and m.texture is None and tex.is_file():
        from dataclasses import replace

        from diffrender.io import read_image

        m = replace(m, texture=torch.as_tensor(read_image(tex)[..., :3], dtype=ctx.dtype, device=ctx.device))
    return meshlib.normalize(m) if normalize else m


def write_json(path: Path, data: dict[str, Any]) -> None:
    from diffrender.jsonable import jsonable

    path.write_text(json.dumps(jsonable(data), indent=2))
