"""Mesh regularizers written as residual vectors (so Gauss-Newton/LM see them as least-squares blocks),
and the mesh-Laplacian preconditioner for the CG solve.

All residuals are plain gathers and ``index_add`` over precomputed integer topology, so they trace under
``torch.func.linearize`` and have exact forward- and reverse-mode derivatives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Topology:
    """Integer connectivity of a fixed triangle mesh.

    edges: (E, 2) unique undirected edges; degree: (V,) vertex degrees; face_pairs: (P, 2) faces sharing
    an edge (interior edges of a manifold mesh); faces: (F, 3).
    """

    edges: Tensor
    degree: Tensor
    face_pairs: Tensor
    faces: Tensor
    @staticmethod
    def of(faces: Tensor, num_verts: int) -> Topology:
        from diffrender.mesh import edges as mesh_edges

        faces = faces.long()
        e = mesh_edges(faces)
        deg = torch.zeros(num_verts, dtype=torch.long, device=faces.device)
        deg = deg.index_add(0, e.reshape(-1), torch.ones(e.numel(), dtype=torch.long, device=faces.device))
        # each face contributes its three edges; an edge seen exactly twice joins two faces
        fe = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(dim=1).values
        face_id = torch.arange(faces.shape[0], device=faces.device).repeat(3)
        _, inv, counts = torch.unique(fe, dim=0, return_inverse=True, return_counts=True)
        order = torch.argsort(inv, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        two = (counts == 2).nonzero().squeeze(1)
        pairs = torch.stack([face_id[order[starts[two]]], face_id[order[starts[two] + 1]]], dim=1)
        return Topology(edges=e, degree=deg, face_pairs=pairs, faces=faces)


def laplacian_residual(verts: Tensor, topo: Topology) -> Tensor:
    """Uniform Laplacian ``v_i - mean_{j ~ i} v_j`` per vertex, (V, 3): zero for a locally flat, evenly
    spaced mesh; penalizes spikes (the smoothness term of SoftRas / PyTorch3D's mesh fitting)."""
    i, j = topo.edges[:, 0], topo.edges[:, 1]
    nb = torch.zeros_like(verts).index_add(0, i, verts.index_select(0, j)).index_add(0, j, verts.index_select(0, i))
    return verts - nb / topo.degree.clamp_min(1).unsqueeze(1).to(verts.dtype)


def edge_residual(verts: Tensor, topo: Topology) -> Tensor:
    """Edge length minus the mean edge length, (E,): evens out triangle sizes without shrinking the mesh
    (a residual form of PyTorch3D's edge loss, which targets a fixed length)."""
    d = verts.index_select(0, topo.edges[:, 0]) - verts.index_select(0, topo.edges[:, 1])
    length = torch.sqrt((d * d).sum(-1) + 1e-12)
    return length - length.mean()


def normal_residual(verts: Tensor, faces: Tensor, topo: Topology, softening: float = 0.0) -> Tensor:
    """Difference of the unit normals of adjacent faces, (P, 3): ``|n_a - n_b|^2 = 2 (1 - cos)``, so its
    squared norm is twice PyTorch3D's normal-consistency loss.

    ``softening`` (ε, in the units of ``ñ = (v1 - v0) x (v2 - v0)``, twice a face's area) normalizes as
    ``n = ñ / sqrt(|ñ|² + ε²)``: a unit normal's derivative grows as ``1/|ñ|``, so a face collapsing to a
    sliver gives the term unbounded curvature, and a trust-region solver's steps shrink to what that one face
    allows (LM stalled on bunny_silhouette with ``|∂r/∂v|`` in the thousands at two slivers). Softened, the
    derivative stays below ``1/ε``, faces well above ε keep their unit normals (``1 - |n| ≈ ε²/2|ñ|²``), and
    a sliver's normal shrinks toward 0, which the term still penalizes (``|n_b|² = 1`` against a neighbour).
    """
    from diffrender.mesh import face_normals

    if softening > 0:
        a = face_normals(verts, faces)
        n = a * torch.rsqrt((a * a).sum(-1, keepdim=True) + softening * softening)
    else:
        n = face_normals(verts, faces, unit=True)
    return n.index_select(0, topo.face_pairs[:, 0]) - n.index_select(0, topo.face_pairs[:, 1])


def softening_length(verts: Tensor, faces: Tensor, share: float) -> float:
    """ε for :func:`normal_residual`: ``share`` times the median ``|ñ|`` (twice the area) of the faces of
    ``verts: (V, 3)``, ``faces: (F, 3)`` (the start mesh), fixed for a whole fit; 0 where ``share`` is 0."""
    from diffrender.mesh import face_normals

    if share <= 0:
        return 0.0
    return share * float(face_normals(verts.detach(), faces).norm(dim=-1).median())


def laplacian_preconditioner(topo: Topology, num_verts: int, lam: float, key: str,
                             dtype: torch.dtype, device: torch.device) -> Callable:
    """Preconditioner factory for the Problem: ``(I + λL)^{-1}`` on the vertex block ``key`` (Nicolet et
    al. 2021, "Large Steps in Inverse Rendering": sparse silhouette gradients get spread smoothly), scaled
    by the block's mean curvature ``mean(diag(JᵀJ) + damping)``; Jacobi on every other block.

    L = D - A is the combinatorial Laplacian (symmetric PSD), so I + λL is SPD; its inverse is formed once
    in float64 (dense, by Cholesky: meshes here have a few thousand vertices at most), so that each of the
    many applications (every CG iteration) is one matrix product instead of two triangular solves.
    """
    from diffrender.mesh import laplacian

    lap = laplacian(torch.zeros(num_verts, 3, dtype=torch.float64, device=device), topo.faces).to_dense()
    chol = torch.linalg.cholesky(torch.eye(num_verts, dtype=torch.float64, device=device) + lam * lap)
    inverse = torch.cholesky_inverse(chol).to(dtype)

    def factory(info):
        parts_d = info.layout.split(info.jtj_diag + info.damping)

        def apply(v: Tensor) -> Tensor:
            parts = info.layout.split(v)
            out = []
            for name in info.layout.names:
                d = parts_d[name].reshape(-1)
                p = parts[name].reshape(-1)
                if name == key:
                    s = d.mean().clamp_min(torch.finfo(v.dtype).tiny)
                    z = inverse @ p.reshape(num_verts, -1) / s
                    out.append(z.reshape(-1))
                else:
                    out.append(p / d.clamp_min(torch.finfo(v.dtype).tiny))
            return torch.cat(out)

        return apply

    return factory
