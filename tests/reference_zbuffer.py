"""An independent hard z-buffer rasterizer in numpy: reference data for tests and scripts/bench_captures.py.

It shares no code with ``diffrender.raster``: every pixel center (or every sub-sample, ``ss`` per pixel side)
is tested against every projected triangle's bounding box and edge functions, and the nearest surface wins
by a per-sample depth test (``1/z`` interpolated linearly on screen, i.e. perspective-correct). Colors are
per-vertex colors or a UV texture sampled bilinearly at the perspective-correct UV, never blurred: these are
the hard masks and crisp RGB that a photograph's segmentation gives, not our soft renders.

Conventions are the package's (OpenCV): ``x_cam = R x_world + t``, +z forward, pixel (i, j) centered at
``(j + 0.5, i + 0.5)``. Reference code for data generation, not the product: plain and slow (a Python loop
over faces).
"""

from __future__ import annotations

import math

import numpy as np


def look_at(eye, at=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)):
    """OpenCV world->camera (R, t) of a camera at ``eye`` looking at ``at``, ``up`` upward in the image."""
    eye, at, up = (np.asarray(a, np.float64) for a in (eye, at, up))
    z = (at - eye) / np.linalg.norm(at - eye)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])
    return R, -R @ eye


def rodrigues(w):
    """Rotation matrix of an axis-angle vector (Rodrigues' formula)."""
    w = np.asarray(w, np.float64)
    th = np.linalg.norm(w)
    if th < 1e-15:
        return np.eye(3)
    k = w / th
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(th) * K + (1 - math.cos(th)) * K @ K


def read_obj(path):
    """(verts (V, 3), faces (F, 3), uvs (T, 2) or None, uv_faces (F, 3) or None) of a triangle OBJ."""
    v, vt, f, ft = [], [], [], []
    for line in open(path):
        p = line.split()
        if not p:
            continue
        if p[0] == "v":
            v.append([float(a) for a in p[1:4]])
        elif p[0] == "vt":
            vt.append([float(a) for a in p[1:3]])
        elif p[0] == "f":
            corners = [c.split("/") for c in p[1:]]
            for k in range(1, len(corners) - 1):  # fan-triangulate polygons
                tri = [corners[0], corners[k], corners[k + 1]]
                f.append([int(c[0]) - 1 for c in tri])
                if all(len(c) > 1 and c[1] for c in tri):
                    ft.append([int(c[1]) - 1 for c in tri])
    uvs = np.array(vt) if vt and len(ft) == len(f) else None
    return np.array(v), np.array(f), uvs, (np.array(ft) if uvs is not None else None)


def _bilinear(tex, uv):
    """Texture (Ht, Wt, C) at OBJ uvs (P, 2) (v up), bilinear, clamped at the borders."""
    ht, wt = tex.shape[:2]
    x = np.clip(uv[:, 0] * wt - 0.5, 0, wt - 1)
    y = np.clip((1 - uv[:, 1]) * ht - 0.5, 0, ht - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, wt - 1), np.minimum(y0 + 1, ht - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    return ((tex[y0, x0] * (1 - fx) + tex[y0, x1] * fx) * (1 - fy)
            + (tex[y1, x0] * (1 - fx) + tex[y1, x1] * fx) * fy)


def rasterize(verts, faces, R, t, fx, fy, cx, cy, height, width, *, colors=None, uvs=None, uv_faces=None,
              texture=None, background=(0.0, 0.0, 0.0), ss=1, near=1e-3):
    """Hard render of one view: (alpha (H, W), rgb (H, W, 3) or None, depth (H, W), 0 where empty).

    With ``ss > 1`` every pixel averages ``ss x ss`` samples (alpha = covered fraction, an anti-aliased
    mask); with ``ss = 1`` alpha is exactly 0 or 1 (pixel centers). Both windings are drawn (no culling).
    """
    pc = np.asarray(verts, np.float64) @ np.asarray(R, np.float64).T + np.asarray(t, np.float64)
    z = pc[:, 2]
    u = fx * pc[:, 0] / np.maximum(z, near) + cx
    v = fy * pc[:, 1] / np.maximum(z, near) + cy
    H, W = height * ss, width * ss
    zbuf = np.full((H, W), np.inf)
    fid = np.full((H, W), -1)
    b1 = np.zeros((H, W))
    b2 = np.zeros((H, W))
    for k, (a, b, c) in enumerate(np.asarray(faces)):
        if min(z[a], z[b], z[c]) <= near:
            continue
        xs, ys = np.array([u[a], u[b], u[c]]) * ss, np.array([v[a], v[b], v[c]]) * ss
        area = (xs[1] - xs[0]) * (ys[2] - ys[0]) - (xs[2] - xs[0]) * (ys[1] - ys[0])
        if abs(area) < 1e-12:
            continue
        j0, j1 = max(0, math.ceil(xs.min() - 0.5)), min(W - 1, math.floor(xs.max() - 0.5))
        i0, i1 = max(0, math.ceil(ys.min() - 0.5)), min(H - 1, math.floor(ys.max() - 0.5))
        if j1 < j0 or i1 < i0:
            continue
        px, py = np.meshgrid(np.arange(j0, j1 + 1) + 0.5, np.arange(i0, i1 + 1) + 0.5)
        # barycentric coordinates of b and c from the edge functions (screen space)
        l1 = ((px - xs[0]) * (ys[2] - ys[0]) - (xs[2] - xs[0]) * (py - ys[0])) / area
        l2 = ((xs[1] - xs[0]) * (py - ys[0]) - (px - xs[0]) * (ys[1] - ys[0])) / area
        l0 = 1 - l1 - l2
        inside = (l0 >= 0) & (l1 >= 0) & (l2 >= 0)
        if not inside.any():
            continue
        inv_z = l0 / z[a] + l1 / z[b] + l2 / z[c]
        depth = 1.0 / np.where(inside, inv_z, 1.0)
        blk = (slice(i0, i1 + 1), slice(j0, j1 + 1))
        win = inside & (depth < zbuf[blk])
        zbuf[blk] = np.where(win, depth, zbuf[blk])
        fid[blk] = np.where(win, k, fid[blk])
        # perspective-correct barycentrics of corners b and c
        b1[blk] = np.where(win, l1 / z[b] * depth, b1[blk])
        b2[blk] = np.where(win, l2 / z[c] * depth, b2[blk])
    cov = fid >= 0
    rgb = None
    if colors is not None or texture is not None:
        f = np.asarray(faces)[fid[cov]]
        w1, w2 = b1[cov][:, None], b2[cov][:, None]
        w0 = 1 - w1 - w2
        if texture is not None:
            ft = np.asarray(uv_faces)[fid[cov]]
            uv = w0 * uvs[ft[:, 0]] + w1 * uvs[ft[:, 1]] + w2 * uvs[ft[:, 2]]
            col = _bilinear(np.asarray(texture, np.float64)[..., :3], uv)
        else:
            col = w0 * colors[f[:, 0]] + w1 * colors[f[:, 1]] + w2 * colors[f[:, 2]]
        img = np.tile(np.asarray(background, np.float64), (H, W, 1))
        img[cov] = col
        rgb = img.reshape(height, ss, width, ss, 3).mean(axis=(1, 3))
    alpha = cov.astype(np.float64).reshape(height, ss, width, ss).mean(axis=(1, 3))
    depth = np.where(cov, zbuf, 0.0)[::ss, ::ss] if ss > 1 else np.where(cov, zbuf, 0.0)
    return alpha, rgb, depth
