"""Triangle meshes: the `Mesh` dataclass, OBJ input/output, icospheres, normals, edges and Laplacians.

Everything here is a pure function over tensors that follows the inputs' device and dtype. Vertex
identity is preserved everywhere: a vertex is one position, UVs carry their own face indices
(`uv_faces`) so seams never split vertices (shape fitting needs one unknown per position).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "Mesh",
    "load_obj",
    "save_obj",
    "icosphere",
    "normalize",
    "face_normals",
    "vertex_normals",
    "edges",
    "is_closed_and_consistently_wound",
    "laplacian",
]


def _is_transformed(t: Tensor) -> bool:
    """True when `t` is traced or wrapped by a transform (torch.func vmap/grad/jvp, the make_fx
    tracing inside torch.func.linearize, fake tensors, torch.compile). Value checks there are
    data-dependent control flow, impossible or meaningless, so they are skipped; shape checks run."""
    functorch = getattr(torch._C, "_functorch", None)
    wrapped = getattr(functorch, "is_functorch_wrapped_tensor", None)
    if wrapped is not None and wrapped(t):
        return True
    compiling = getattr(torch.compiler, "is_compiling", None)
    if compiling is not None and compiling():
        return True
    from torch.utils import _python_dispatch

    in_mode = getattr(_python_dispatch, "is_in_torch_dispatch_mode", None)
    return bool(in_mode is not None and in_mode())


@dataclass
class Mesh:
    """A triangle mesh with optional per-vertex colors and an optional UV-textured appearance.

    verts: (V, 3) floating positions.
    faces: (F, 3) long vertex indices, counter-clockwise seen from outside.
    colors: (V, 3) per-vertex RGB in [0, 1], or None.
    uvs: (T, 2) texture coordinates (v up, OBJ convention), or None.
    uv_faces: (F, 3) long indices into `uvs` (one UV triangle per face), or None.
    texture: (Ht, Wt, C) float image, or None.

    Construction validates shapes, dtypes, finiteness and index ranges (`ValueError` naming the
    field); integer face tensors are converted to long. Tensors are stored as given otherwise, so
    autograd through `verts`, `colors` or `texture` is untouched.
    """

    verts: Tensor
    faces: Tensor
    colors: Tensor | None = None
    uvs: Tensor | None = None
    uv_faces: Tensor | None = None
    texture: Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("faces", "uv_faces"):
            value = getattr(self, name)
            if isinstance(value, Tensor) and _is_int(value) and value.dtype != torch.long:
                setattr(self, name, value.long())
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is malformed."""
        v, f = self.verts, self.faces
        _check_tensor("verts", v)
        if v.ndim != 2 or v.shape[1] != 3:
            raise ValueError(f"Mesh.verts must have shape (V, 3), got {tuple(v.shape)}")
        if not v.is_floating_point():
            raise ValueError(f"Mesh.verts must be floating point, got {v.dtype}")
        _check_tensor("faces", f)
        if f.ndim != 2 or f.shape[1] != 3:
            raise ValueError(f"Mesh.faces must have shape (F, 3), got {tuple(f.shape)}")
        if not _is_int(f):
            raise ValueError(f"Mesh.faces must be an integer tensor, got {f.dtype}")
        if v.shape[0] == 0 or f.shape[0] == 0:
            raise ValueError(f"empty mesh: Mesh.verts has {v.shape[0]} rows and Mesh.faces {f.shape[0]}")
        if not _is_transformed(v) and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).any(dim=1).nonzero()[0, 0])
            raise ValueError(f"Mesh.verts must be finite; row {bad} is {v[bad].tolist()}")
        _check_range("faces", f, v.shape[0])
        if self.colors is not None:
            c = self.colors
            _check_tensor("colors", c)
            if c.shape != (v.shape[0], 3):
                raise ValueError(
                    f"Mesh.colors must have shape (V, 3) = ({v.shape[0]}, 3), got {tuple(c.shape)}"
                )
            if not c.is_floating_point():
                raise ValueError(f"Mesh.colors must be floating point, got {c.dtype}")
        if (self.uvs is None) != (self.uv_faces is None):
            raise ValueError("Mesh.uvs and Mesh.uv_faces must be given together")
        if self.uvs is not None and self.uv_faces is not None:
            t, tf = self.uvs, self.uv_faces
            _check_tensor("uvs", t)
            if t.ndim != 2 or t.shape[1] != 2 or t.shape[0] == 0:
                raise ValueError(f"Mesh.uvs must have shape (T, 2) with T > 0, got {tuple(t.shape)}")
            if not t.is_floating_point():
                raise ValueError(f"Mesh.uvs must be floating point, got {t.dtype}")
            _check_tensor("uv_faces", tf)
            if tf.shape != f.shape:
                raise ValueError(
                    f"Mesh.uv_faces must have shape (F, 3) = {tuple(f.shape)}, got {tuple(tf.shape)}"
                )
            if not _is_int(tf):
                raise ValueError(f"Mesh.uv_faces must be an integer tensor, got {tf.dtype}")
            _check_range("uv_faces", tf, t.shape[0])
        if self.texture is not None:
            tex = self.texture
            _check_tensor("texture", tex)
            if tex.ndim != 3 or tex.shape[0] == 0 or tex.shape[1] == 0 or tex.shape[2] == 0:
                raise ValueError(f"Mesh.texture must have shape (H, W, C), got {tuple(tex.shape)}")
            if not tex.is_floating_point():
                raise ValueError(f"Mesh.texture must be floating point, got {tex.dtype}")

    @property
    def num_verts(self) -> int:
        return int(self.verts.shape[0])

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Mesh:
        """A new Mesh on `device` with floating fields cast to `dtype`; index tensors stay long."""

        def conv(x: Tensor | None, floating: bool) -> Tensor | None:
            if x is None:
                return None
            return x.to(device=device, dtype=dtype if floating else torch.long)

        return Mesh(
            verts=conv(self.verts, True),
            faces=conv(self.faces, False),
            colors=conv(self.colors, True),
            uvs=conv(self.uvs, True),
            uv_faces=conv(self.uv_faces, False),
            texture=conv(self.texture, True),
        )

    def with_verts(self, verts: Tensor) -> Mesh:
        """The same mesh with new vertex positions `verts: (V, 3)` (e.g. the solver's current x)."""
        return dataclasses.replace(self, verts=verts)


def _is_int(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _check_tensor(name: str, x: object) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"Mesh.{name} must be a torch.Tensor, got {type(x).__name__}")


def _check_range(name: str, idx: Tensor, n: int) -> None:
    if _is_transformed(idx) or idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise ValueError(f"Mesh.{name} index {bad} out of range [0, {n})")


# --------------------------------------------------------------------------------------------------
# OBJ input / output

# Statements of the OBJ format that carry nothing a Mesh stores (groups, smoothing, materials,
# lines, free-form geometry); they are skipped. Any other statement is an error.
_IGNORED = frozenset(
    "o g s usemtl mtllib l p vp cstype deg bmat step curv curv2 surf parm trim hole scrv sp end con "
    "mg bevel c_interp d_interp lod maplib usemap shadow_obj trace_obj ctech stech".split()
)


def load_obj(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Mesh:
    """Read a Wavefront OBJ file into a Mesh.

    Understands `v x y z [w]` and `v x y z r g b` (per-vertex colors), `vt u v [w]`, `vn`
    (parsed and checked, not stored), and `f` with the forms `a`, `a/b`, `a//c`, `a/b/c`,
    1-based or negative (relative) indices. Polygons are fan-triangulated (a, b, c), (a, c, d), ...
    Faces index positions, texture indices go to `uv_faces`: vertices are never split at seams.
    If a `mtllib` next to the file defines `map_Kd` for the material used, that image is loaded
    as `texture` (H, W, C) in [0, 1].

    Raises FileNotFoundError naming the path, and ValueError "path:lineno: what: 'line'" for a
    malformed line (bad number, index 0 or out of range, face with fewer than 3 vertices).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OBJ file not found: {path}")
    dtype = dtype or torch.get_default_dtype()

    positions: list[list[float]] = []
    colors: list[list[float]] = []
    texcoords: list[list[float]] = []
    n_normals = 0
    tris: list[tuple[int, int, int]] = []
    uv_tris: list[tuple[int, int, int]] = []
    # Positive indices are checked at the end (some exporters write faces before all vertices);
    # remember where the largest one came from to report it.
    max_v = (0, 0, "")
    max_t = (0, 0, "")
    max_n = (0, 0, "")
    faces_with_uv = faces_without_uv = 0
    mtllibs: list[str] = []
    materials_used: list[str] = []

    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line or line[0] == "#":
                continue
            parts = line.split()
            key = parts[0]

            def fail(what: str, lineno: int = lineno, line: str = line) -> ValueError:
                return ValueError(f"{path}:{lineno}: {what}: '{line}'")

            if key == "v":
                try:
                    nums = [float(x) for x in parts[1:]]
                except ValueError:
                    raise fail("bad number in vertex") from None
                if len(nums) not in (3, 4, 6):
                    raise fail(f"vertex needs 3, 4 (x y z w) or 6 (x y z r g b) numbers, got {len(nums)}")
                if not all(math.isfinite(x) for x in nums):
                    raise fail("non-finite number in vertex")
                positions.append(nums[:3])
                if len(nums) == 6:
                    colors.append(nums[3:])
            elif key == "vt":
                try:
                    nums = [float(x) for x in parts[1:]]
                except ValueError:
                    raise fail("bad number in texture coordinate") from None
                if len(nums) not in (2, 3) or not all(math.isfinite(x) for x in nums):
                    raise fail("texture coordinate needs 2 or 3 finite numbers")
                texcoords.append(nums[:2])
            elif key == "vn":
                try:
                    nums = [float(x) for x in parts[1:]]
                except ValueError:
                    raise fail("bad number in normal") from None
                if len(nums) != 3:
                    raise fail(f"normal needs 3 numbers, got {len(nums)}")
                n_normals += 1
            elif key == "f":
                corners = parts[1:]
                if len(corners) < 3:
                    raise fail(f"face needs at least 3 vertices, got {len(corners)}")
                vi: list[int] = []
                ti: list[int] = []
                has_t = None
                for c in corners:
                    fields = c.split("/")
                    if len(fields) > 3 or fields[0] == "":
                        raise fail(f"bad face vertex {c!r}")
                    try:
                        idx = [int(x) if x else None for x in fields]
                    except ValueError:
                        raise fail(f"bad index in face vertex {c!r}") from None
                    this_has_t = len(idx) > 1 and idx[1] is not None
                    if has_t is None:
                        has_t = this_has_t
                    elif has_t != this_has_t:
                        raise fail("face mixes corners with and without texture indices")
                    resolved = []
                    for k, (i, count) in enumerate(
                        zip(idx, (len(positions), len(texcoords), n_normals), strict=False)
                    ):
                        if i is None:
                            continue
                        if i == 0:
                            raise fail("index 0 (OBJ indices start at 1)")
                        if i < 0:
                            j = count + i
                            if j < 0:
                                raise fail(f"relative index {i} out of range (only {count} defined so far)")
                        else:
                            j = i - 1
                            best = (max_v, max_t, max_n)[k]
                            if i > best[0]:
                                rec = (i, lineno, line)
                                if k == 0:
                                    max_v = rec
                                elif k == 1:
                                    max_t = rec
                                else:
                                    max_n = rec
                        resolved.append(j)
                    vi.append(resolved[0])
                    if this_has_t:
                        ti.append(resolved[1])
                if has_t:
                    faces_with_uv += 1
                else:
                    faces_without_uv += 1
                # Fan triangulation keeps the polygon's winding.
                for k in range(1, len(vi) - 1):
                    tris.append((vi[0], vi[k], vi[k + 1]))
                    if has_t:
                        uv_tris.append((ti[0], ti[k], ti[k + 1]))
            elif key == "mtllib":
                mtllibs.extend(parts[1:])
            elif key == "usemtl":
                if len(parts) > 1:
                    materials_used.append(parts[1])
            elif key in _IGNORED:
                continue
            else:
                raise fail(f"unknown statement {key!r}")

    for (i, ln, ln_text), count, what in (
        (max_v, len(positions), "vertex"),
        (max_t, len(texcoords), "texture coordinate"),
        (max_n, n_normals, "normal"),
    ):
        if i > count:
            raise ValueError(f"{path}:{ln}: {what} index {i} out of range (file has {count}): '{ln_text}'")
    if not positions or not tris:
        raise ValueError(f"{path}: empty mesh ({len(positions)} vertices, {len(tris)} faces)")
    if colors and len(colors) != len(positions):
        raise ValueError(f"{path}: only {len(colors)} of {len(positions)} vertices have colors")
    if faces_with_uv and faces_without_uv:
        raise ValueError(
            f"{path}: {faces_without_uv} faces lack texture indices while {faces_with_uv} have them"
        )

    verts = torch.tensor(positions, dtype=dtype, device=device)
    faces = torch.tensor(tris, dtype=torch.long, device=device)
    mesh_colors = torch.tensor(colors, dtype=dtype, device=device) if colors else None
    uvs = uv_faces = texture = None
    if faces_with_uv:
        uvs = torch.tensor(texcoords, dtype=dtype, device=device)
        uv_faces = torch.tensor(uv_tris, dtype=torch.long, device=device)
        texture = _load_texture(path, mtllibs, materials_used, dtype, device)
    return Mesh(verts, faces, mesh_colors, uvs, uv_faces, texture)


def _load_texture(
    obj_path: Path,
    mtllibs: list[str],
    materials_used: list[str],
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> Tensor | None:
    """The map_Kd image of the first used material (or the first with one), if it exists; else None."""
    maps: dict[str, str] = {}
    for lib in mtllibs:
        mtl = obj_path.parent / lib
        if not mtl.is_file():
            continue
        current = None
        for raw in mtl.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = raw.strip().split()
            if not parts:
                continue
            if parts[0] == "newmtl" and len(parts) > 1:
                current = parts[1]
            elif parts[0] == "map_Kd" and len(parts) > 1 and current is not None:
                maps.setdefault(current, parts[-1])  # options (-s, -o ...) come before the file name
    names = [m for m in materials_used if m in maps] or list(maps)
    if not names:
        return None
    image_path = obj_path.parent / maps[names[0]]
    if not image_path.is_file():
        return None
    import imageio.v3 as iio
    import numpy as np

    image = np.asarray(iio.imread(image_path))
    if image.ndim == 2:
        image = image[:, :, None]
    scale = float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) else 1.0
    return torch.tensor(image.astype(np.float64) / scale, dtype=dtype, device=device)


def save_obj(path: str | os.PathLike, mesh: Mesh) -> None:
    """Write `mesh` as an OBJ file: `v x y z [r g b]`, `vt u v`, and `f a/at b/bt c/ct` (or `f a b c`).

    Numbers are written with enough digits to read back exactly in the mesh's dtype. The file is
    written to a temporary file in the same directory and moved into place (atomic replace).
    The texture image is not written.
    """
    path = Path(path)
    mesh.validate()
    digits = 17 if mesh.verts.dtype == torch.float64 else 9
    fmt = f"%.{digits}g"
    lines = ["# written by diffrender"]
    verts = mesh.verts.detach().cpu().double().tolist()
    if mesh.colors is not None:
        cols = mesh.colors.detach().cpu().double().tolist()
        lines += ["v " + " ".join(fmt % x for x in p + c) for p, c in zip(verts, cols, strict=True)]
    else:
        lines += ["v " + " ".join(fmt % x for x in p) for p in verts]
    faces = (mesh.faces.detach().cpu() + 1).tolist()
    if mesh.uvs is not None and mesh.uv_faces is not None:
        lines += ["vt " + " ".join(fmt % x for x in t) for t in mesh.uvs.detach().cpu().double().tolist()]
        uv_faces = (mesh.uv_faces.detach().cpu() + 1).tolist()
        lines += [
            f"f {a}/{ta} {b}/{tb} {c}/{tc}"
            for (a, b, c), (ta, tb, tc) in zip(faces, uv_faces, strict=True)
        ]
    else:
        lines += [f"f {a} {b} {c}" for a, b, c in faces]
    text = "\n".join(lines) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------------
# Construction and normalization


def icosphere(
    level: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Mesh:
    """Unit sphere by `level` rounds of 4-to-1 subdivision of the icosahedron.

    Level 0 has 12 vertices and 20 faces; level k has 20 * 4**k faces and 10 * 4**k + 2 vertices.
    Edge midpoints are projected onto the unit sphere. Faces are counter-clockwise seen from outside.
    """
    if not isinstance(level, int) or level < 0:
        raise ValueError(f"icosphere level must be a non-negative int, got {level!r}")
    t = (1.0 + 5.0**0.5) / 2.0
    verts = torch.tensor(
        [
            [-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0],
            [0, -1, t], [0, 1, t], [0, -1, -t], [0, 1, -t],
            [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1],
        ],
        dtype=torch.float64,
    )  # fmt: skip
    faces = torch.tensor(
        [
            [0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11],
            [1, 5, 9], [5, 11, 4], [11, 10, 2], [10, 7, 6], [7, 1, 8],
            [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9],
            [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1],
        ],
        dtype=torch.long,
    )  # fmt: skip
    verts = verts / verts.norm(dim=1, keepdim=True)
    for _ in range(level):
        faces, verts = _split_faces(verts, faces)
        verts = verts / verts.norm(dim=1, keepdim=True)
    return Mesh(verts.to(device=device, dtype=dtype), faces.to(device))


def _split_faces(verts: Tensor, faces: Tensor, *attrs: Tensor) -> tuple[Tensor, ...]:
    """4-to-1 midpoint split: new vertices (V + E, 3) (and per-vertex attrs) appended, faces (4F, 3).

    One midpoint per undirected edge (unique sorted edges; ``inverse`` maps each face edge to it), so
    neighbouring faces share their new vertices and the mesh stays watertight.
    """
    e = torch.stack([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], dim=1)  # (F, 3, 2)
    uniq, inverse = torch.unique(e.sort(dim=-1).values.reshape(-1, 2), dim=0, return_inverse=True)
    m = inverse.reshape(-1, 3) + verts.shape[0]  # m[:, 0] on edge ab, m[:, 1] on bc, m[:, 2] on ca
    a, b, c = faces.unbind(1)
    m01, m12, m20 = m.unbind(1)
    new_faces = torch.cat([
        torch.stack([a, m01, m20], 1),
        torch.stack([b, m12, m01], 1),
        torch.stack([c, m20, m12], 1),
        torch.stack([m01, m12, m20], 1),
    ])
    return (new_faces, *(torch.cat([x, x[uniq].mean(dim=1)]) for x in (verts, *attrs)))


def subdivide(mesh: Mesh) -> Mesh:
    """Midpoint 4-to-1 subdivision (same surface, 4x the faces); per-vertex colors are interpolated.

    UV coordinates and the texture are not carried over.
    """
    extra = (mesh.colors,) if mesh.colors is not None else ()
    faces, verts, *colors = _split_faces(mesh.verts, mesh.faces, *extra)
    return Mesh(verts, faces, colors=colors[0] if colors else None)


def normalize(mesh: Mesh) -> Mesh:
    """A copy of `mesh` centered at its bounding-box center and scaled to unit bounding-sphere radius
    (the farthest vertex from the center is at distance 1). Differentiable in `mesh.verts`."""
    v = mesh.verts
    center = (v.amin(dim=0) + v.amax(dim=0)) / 2
    radius = (v - center).norm(dim=1).amax()
    if not _is_transformed(radius) and float(radius) == 0.0:
        raise ValueError("normalize: all vertices coincide (zero radius), cannot scale")
    return mesh.with_verts((v - center) / radius)


# --------------------------------------------------------------------------------------------------
# Differential quantities


def face_normals(verts: Tensor, faces: Tensor, *, unit: bool = False) -> Tensor:
    """Face normals (F, 3) from `verts: (V, 3)` and `faces: (F, 3)`.

    By default the area-weighted normal (v1 - v0) x (v2 - v0), whose length is twice the
    triangle's area and whose direction follows counter-clockwise winding (right-hand rule).
    With `unit=True` it is normalized safely: zero-area faces give 0, with finite derivatives.
    """
    v0, v1, v2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    n = torch.linalg.cross(v1 - v0, v2 - v0, dim=-1)
    return _safe_normalize(n) if unit else n


def vertex_normals(verts: Tensor, faces: Tensor) -> Tensor:
    """Unit vertex normals (V, 3): the area-weighted sum of incident face normals, normalized.

    A vertex without faces, or whose faces all have zero area, gets the zero vector; values and
    derivatives (reverse and forward mode) stay finite there.
    """
    fn = face_normals(verts, faces)  # (F, 3), length = 2 * area: area weighting for free
    n = torch.zeros_like(verts)
    for k in range(3):
        n = n.index_add(0, faces[:, k], fn)
    return _safe_normalize(n)


def _safe_normalize(x: Tensor) -> Tensor:
    """x / |x| along the last dim, 0 where |x|^2 <= sqrt(tiny) ("where" double guard: the masked
    branch never sees a zero denominator, so neither values nor derivatives become NaN/inf)."""
    sq = (x * x).sum(dim=-1, keepdim=True)
    ok = sq > torch.finfo(x.dtype).tiny ** 0.5
    safe = torch.where(ok, sq, torch.ones_like(sq))
    return torch.where(ok, x * torch.rsqrt(safe), torch.zeros_like(x))


def edges(faces: Tensor) -> Tensor:
    """Unique undirected edges (E, 2) long of `faces: (F, 3)`, each row (i, j) with i < j, rows
    sorted lexicographically. A closed genus-0 mesh has E = V + F - 2."""
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).long()
    return torch.unique(e.sort(dim=1).values, dim=0)


def is_closed_and_consistently_wound(faces: Tensor) -> bool:
    """Whether every edge of `faces: (F, 3)` is shared by exactly two faces that traverse it in opposite
    directions: the mesh is closed (watertight, no boundary) and its winding is consistent, so seen from
    outside no back face is ever visible (what back-face culling needs). Faces with a repeated vertex
    make it False."""
    f = faces.long()
    if f.numel() == 0 or bool((f[:, 0] == f[:, 1]).any() | (f[:, 1] == f[:, 2]).any() | (f[:, 2] == f[:, 0]).any()):
        return False
    a, b = f.reshape(-1), f.roll(-1, dims=1).reshape(-1)  # directed edges a -> b of every face
    n = int(f.max()) + 1
    code, reverse = a * n + b, b * n + a
    code_sorted = code.sort().values
    if bool((code_sorted[1:] == code_sorted[:-1]).any()):
        return False  # a directed edge used twice: inconsistent winding or a non-manifold edge
    return bool(torch.isin(reverse, code_sorted).all())  # every edge is met again the other way round


def laplacian(verts: Tensor, faces: Tensor, kind: str = "uniform") -> Tensor:
    """Mesh Laplacian L = D - A as a sparse COO (V, V) tensor in `verts`' dtype and device.

    L is symmetric positive semi-definite with zero row sums (L @ 1 = 0), so x^T L x penalizes
    non-smooth vertex functions x: (V,) or (V, k).
      uniform:   A_ij = 1 for every mesh edge, D_ii = degree of i.
      cotangent: A_ij = (cot a_ij + cot b_ij) / 2, a/b the angles opposite edge ij (Pinkall &
                 Polthier 1993; Meyer et al. 2003), D_ii = sum_j A_ij. Cotangents are computed as
                 dot / |cross| with the denominator bounded below relative to the edge lengths, so
                 degenerate triangles give large but finite weights, never inf/NaN. Without area
                 normalization (no mass matrix), as a stiffness matrix.
    """
    V = verts.shape[0]
    faces = faces.long()
    if kind == "uniform":
        e = edges(faces)
        w = torch.ones(e.shape[0], dtype=verts.dtype, device=verts.device)
    elif kind == "cotangent":
        # Corner k of each face has opposite edge (k+1, k+2); its cotangent weights that edge.
        i0, i1, i2 = faces[:, 0], faces[:, 1], faces[:, 2]
        idx = [(i0, i1, i2), (i1, i2, i0), (i2, i0, i1)]
        e_list, w_list = [], []
        eps = torch.finfo(verts.dtype).eps
        tiny = torch.finfo(verts.dtype).tiny
        for a, b, c in idx:
            u = verts[b] - verts[a]
            v = verts[c] - verts[a]
            dot = (u * v).sum(-1)
            cross = torch.linalg.cross(u, v, dim=-1).norm(dim=-1)
            denom = torch.maximum(cross, eps * ((u * u).sum(-1) + (v * v).sum(-1)) + tiny)
            e_list.append(torch.stack([b, c], 1))
            w_list.append(dot / denom / 2)
        e = torch.cat(e_list)
        w = torch.cat(w_list)
    else:
        raise ValueError(f"laplacian kind must be 'uniform' or 'cotangent', got {kind!r}")
    rows = torch.cat([e[:, 0], e[:, 1], e[:, 0], e[:, 1]])
    cols = torch.cat([e[:, 1], e[:, 0], e[:, 0], e[:, 1]])
    vals = torch.cat([-w, -w, w, w])
    L = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (V, V), check_invariants=False)
    return L.coalesce()
