"""Check the renderer on a GPU against the CPU: the same renders, JVPs and VJPs on both devices.

    python scripts/check_cuda.py                 # CUDA (PyTorch path) against the CPU's compiled kernels
    python scripts/check_cuda.py --device cpu    # a dry run: the CPU's PyTorch path against its kernels

For spot at --size px from 3 views, with and without back-face culling, in float64: alpha and shaded rgb,
one JVP and one VJP (tangents in the vertices and the per-vertex colors) must agree with the CPU's to a
relative 1e-9; on the checked device the adjoint identity <Ju, w> = <u, J^T w> must hold to 1e-10 and the
JVP must match central differences. Then float32 on the device, and a degenerate face plus a vertex behind
the camera, must give finite values and gradients. Prints one line per check and exits 1 if any fails
(2 if the device is missing). The CUDA path is not the CPU's code: the kernels in raster/kernels.c serve
CPU tensors only, so this is what tells that the two agree where the tests (CPU only) cannot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffrender.camera import camera_from_look_at, orbit_eyes  # noqa: E402
from diffrender.mesh import load_obj, normalize  # noqa: E402
from diffrender.raster.shading import Lights, Material  # noqa: E402
from diffrender.render import RenderSettings, prepare, render  # noqa: E402

Outputs = dict[str, torch.Tensor]


def _scene(device: str, dtype: torch.dtype, size: int, views: int):
    mesh = normalize(load_obj(ROOT / "assets" / "spot.obj", dtype=dtype, device=device))
    cam = camera_from_look_at(orbit_eyes(views, 2.7, 20.0, dtype=dtype, device=device), fov_deg=50,
                              height=size, width=size)
    colors = torch.rand(mesh.verts.shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    lights = Lights.create(ambient=(0.3,) * 3, directional_dirs=[(0, -1, -1)], directional_colors=[(0.7,) * 3],
                           dtype=dtype, device=device)
    return mesh, cam, colors, lights


def _derivatives(device: str, backend: str, cull: bool | str, size: int,
                 checks: bool = True) -> tuple[Outputs, list[str]]:
    """Values, a JVP and a VJP of (alpha, rgb) in float64 on ``device``; with ``checks``, the checks of that
    device alone (the adjoint identity, central differences: two more renders)."""
    mesh, cam, colors, lights = _scene(device, torch.float64, size, 3)
    settings = RenderSettings(sigma=1e-4, gamma=1e-4, cull_backfaces=cull, backend=backend)
    pairs = prepare(mesh.verts, mesh.faces, cam, settings)

    def f(v: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = render(v, mesh.faces, cam, pairs, settings, colors=c, lights=lights,
                     material=Material(specular=0.2), outputs=("alpha", "rgb"))
        return out["alpha"], out["rgb"]

    g = torch.Generator().manual_seed(2)  # the same tangents and cotangents on every device
    dv = (torch.randn(mesh.verts.shape, generator=g, dtype=torch.float64) * 1e-2).to(device)
    dc = torch.randn(colors.shape, generator=g, dtype=torch.float64).to(device)
    (alpha, rgb), (j_alpha, j_rgb) = torch.func.jvp(f, (mesh.verts, colors), (dv, dc))
    _, vjp = torch.func.vjp(f, mesh.verts, colors)
    w_alpha = torch.randn(alpha.shape, generator=g, dtype=torch.float64).to(device)
    w_rgb = torch.randn(rgb.shape, generator=g, dtype=torch.float64).to(device)
    g_verts, g_colors = vjp((w_alpha, w_rgb))

    lines = []
    out = dict(alpha=alpha, rgb=rgb, jvp_alpha=j_alpha, jvp_rgb=j_rgb, vjp_verts=g_verts, vjp_colors=g_colors)
    out = {k: v.cpu() for k, v in out.items()}
    if not checks:
        return out, lines
    lhs = float((j_alpha * w_alpha).sum() + (j_rgb * w_rgb).sum())
    rhs = float((g_verts * dv).sum() + (g_colors * dc).sum())
    rel = abs(lhs - rhs) / abs(lhs)
    lines.append(_line(rel <= 1e-10, f"cull={cull} {device} adjoint: <Ju,w> {lhs:.12e}, <u,J^T w> {rhs:.12e}, "
                                     f"relative {rel:.1e}"))
    h = 1e-6
    fd = (f(mesh.verts + h * dv, colors + h * dc)[0] - f(mesh.verts - h * dv, colors - h * dc)[0]) / (2 * h)
    err = float((j_alpha - fd).abs().max() / j_alpha.abs().max())
    lines.append(_line(err <= 1e-5, f"cull={cull} {device} JVP of alpha against central differences: "
                                    f"relative {err:.1e}"))
    return out, lines


def _line(ok: bool, text: str) -> str:
    return f"{'ok ' if ok else 'BAD'} {text}"


def check(device: str, size: int = 64) -> list[str]:
    """All checks' lines ("ok ..." or "BAD ...") for ``device`` against the CPU's compiled kernels."""
    lines = []
    for cull in (False, "auto"):
        ref, _ = _derivatives("cpu", "auto", cull, size, checks=False)
        got, own = _derivatives(device, "torch", cull, size)
        lines += own
        for key, value in ref.items():
            err = float((got[key] - value).abs().max() / value.abs().max())
            lines.append(_line(err <= 1e-9, f"cull={cull} {key}: {device} against cpu, relative {err:.1e}"))

    mesh, cam, _, _ = _scene(device, torch.float32, size, 3)
    settings = RenderSettings()
    pairs = prepare(mesh.verts, mesh.faces, cam, settings)
    verts = mesh.verts.clone().requires_grad_(True)
    alpha = render(verts, mesh.faces, cam, pairs, settings, outputs=("alpha",))["alpha"]
    alpha.square().sum().backward()
    finite = bool(torch.isfinite(alpha).all() and torch.isfinite(verts.grad).all())
    lines.append(_line(finite and alpha.dtype == torch.float32 and alpha.device == verts.device,
                       f"float32 on {device}: finite, {alpha.dtype} on {alpha.device}"))

    # one face behind the camera (z < near), one of zero area
    faces = torch.tensor([[0, 1, 2], [0, 0, 1]], device=device)
    verts = torch.tensor([[0.0, 0, -1], [0.5, 0, 1], [0, 0.5, 1]], device=device, dtype=torch.float64,
                         requires_grad=True)
    cam = camera_from_look_at(torch.tensor([[0.0, 0, -3]], dtype=torch.float64, device=device), height=16, width=16)
    settings = RenderSettings(cull_backfaces=False)
    out = render(verts, faces, cam, prepare(verts.detach(), faces, cam, settings), settings,
                 outputs=("alpha", "depth"))
    (out["alpha"].sum() + out["depth"].sum()).backward()
    finite = bool(torch.isfinite(out["alpha"]).all() and torch.isfinite(verts.grad).all())
    lines.append(_line(finite, f"degenerate and behind-camera faces on {device}: finite values and gradients"))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="device to check against the CPU (default cuda)")
    p.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device} asked for, but CUDA is not available", file=sys.stderr)
        return 2
    lines = check(args.device, args.size)
    print("\n".join(lines))
    bad = sum(line.startswith("BAD") for line in lines)
    print(f"{len(lines) - bad} of {len(lines)} checks passed on {args.device}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
