"""Sparse repellency: SPELL, Kirchhof et al., ICML 2025 (arXiv 2410.06025).

Tensors are [B, ...] batches; distances are RMS over the elements of one item
(``||a - b|| / sqrt(D)``), so a radius means the same at every resolution. ``relu(r/d - 1)`` is
unchanged by that scaling, so the push is exactly the paper's.
"""
from __future__ import annotations

import math

import torch

IN_BATCH_MODES = ("off", "mutual", "ordered")


def flat32(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, D] in float32 (distances and norms are always taken in float32)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:])).float()


def rms_cdist(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Exact RMS distances between rows of x [B, D] and z [N, D] -> [B, N] (no matmul expansion)."""
    return torch.cdist(x, z, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(x.shape[1])


def in_batch_mask(batch: int, mode: str, device=None) -> torch.Tensor | None:
    """[B, B] bool: True where image i is repelled by image j (mutual: j != i, ordered: j < i)."""
    if mode == "off":
        return None
    if mode == "mutual":
        return ~torch.eye(batch, dtype=torch.bool, device=device)
    if mode == "ordered":
        return torch.ones(batch, batch, dtype=torch.bool, device=device).tril(-1)
    raise ValueError(f"in-batch mode must be one of {IN_BATCH_MODES}, got {mode!r}")


def repellency_weights(d: torch.Tensor, r: float) -> torch.Tensor:
    """relu(r / d - 1) for RMS distances d; 0 where d == 0 (no direction to push along)."""
    w = torch.relu(r / d.clamp_min(torch.finfo(d.dtype).tiny) - 1)
    return torch.where(d > 0, w, torch.zeros_like(w))


def sparse_push(x: torch.Tensor, z: torch.Tensor, i: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_k w_ik (x_i − z_k) over the listed pairs only: x [B, D], z [N, D], i/k/w [P] -> [B, D]."""
    out = torch.zeros_like(x)
    if i.numel():
        out.index_add_(0, i, w[:, None] * (x[i] - z[k]))
    return out


def repellency(x0: torch.Tensor, z: torch.Tensor, r: float, lam: float = 1.6, mask: torch.Tensor | None = None,
               d: torch.Tensor | None = None):
    """SPELL's push Δ_i = λ Σ_k relu(r/||x̂0_i − z_k|| − 1)(x̂0_i − z_k), eq. (5) of the paper.

    x0 [B, ...] expected final images, z [N, ...] references of the same shape, mask [B, N] bool
    (False: pair ignored), d [B, N]: their RMS distances when the caller has them already.
    Returns (Δ [B, ...] in x0's dtype, number of active pairs per image [B]).
    """
    xf, zf = flat32(x0), flat32(z)
    if zf.shape[0] == 0:
        return torch.zeros_like(x0), x0.new_zeros(x0.shape[0], dtype=torch.long)
    w = repellency_weights(rms_cdist(xf, zf) if d is None else d, r)
    if mask is not None:
        w = torch.where(mask, w, torch.zeros_like(w))
    i, k = torch.nonzero(w, as_tuple=True)
    delta = sparse_push(xf, zf, i, k, w[i, k]) * lam
    return delta.reshape(x0.shape).to(x0.dtype), torch.bincount(i, minlength=x0.shape[0])


def ray_exit(x: torch.Tensor, u: torch.Tensor, z: torch.Tensor, R: float) -> float:
    """Smallest t ≥ 0 with ||x + t·u − z_k|| ≥ R for every k (x, u [D] with ||u|| = 1, z [N, D], L2 units).

    Each ball cuts the ray in an interval; a sweep over intervals sorted by entry finds the first gap.
    """
    if z.shape[0] == 0:
        return 0.0
    diff = x[None] - z
    b = diff @ u
    c = (diff * diff).sum(1) - R * R
    disc = b * b - c
    hit = disc > 0
    s = (-b - disc.clamp_min(0).sqrt())[hit]
    e = (-b + disc.clamp_min(0).sqrt())[hit]
    t = 0.0
    for si, ei in sorted(zip(s.tolist(), e.tolist())):
        if si > t:
            break
        t = max(t, ei)
    return t


def escape_direction(x: torch.Tensor, z: torch.Tensor, r: float) -> torch.Tensor:
    """Unit direction for leaving the shield: SPELL's summed push, else away from the nearest reference.

    x [D], z [N, D] (the references whose balls contain x). Falls back to the all-ones direction when x
    sits exactly on a reference, so the result is deterministic.
    """
    d = rms_cdist(x[None], z)[0]
    u = (repellency_weights(d, r)[:, None] * (x[None] - z)).sum(0)
    if u.norm() <= 1e-12 * max(1.0, x.norm().item()):
        u = x - z[d.argmin()]
    if u.norm() <= 0:
        u = torch.ones_like(x)
    return u / u.norm()


def guard_fraction(margin: float) -> float:
    """Rows closer than r·(1 + guard_fraction(margin)) are projected out to r·(1 + margin): a tenth of the margin,
    far above float32 rounding (~1e-7 relative), so no output kept in place can read as inside r in float64."""
    return margin / 10


def project_out(x: torch.Tensor, z: torch.Tensor, r: float, margin: float = 1e-4) -> torch.Tensor:
    """Moves each row of x [B, ...] the shortest way along its escape direction to RMS distance
    ≥ r·(1 + margin) from every row of z [N, ...]; rows already at r·(1 + margin/10) or more from every row
    are returned unchanged.

    Exact: a single ball gives the radial projection onto its border; overlapping balls cannot trap a
    point (the ray leaves their union). Computed in float64, returned in x's dtype.
    """
    xf, zf = x.reshape(x.shape[0], -1).double(), z.reshape(z.shape[0], -1).double()
    out = xf.clone()
    if zf.shape[0] == 0:
        return x
    D = xf.shape[1]
    R = r * (1 + margin) * math.sqrt(D)
    d = rms_cdist(xf, zf)
    close = r * (1 + guard_fraction(margin))
    for i in torch.nonzero((d < close).any(1)).flatten().tolist():
        inside = d[i] < close
        u = escape_direction(xf[i], zf[inside], r)
        out[i] = xf[i] + ray_exit(xf[i], u, zf, R) * u
    return out.reshape(x.shape).to(x.dtype)


def nearest(x: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """RMS distance from each row of x [B, ...] to its nearest row of z [N, ...] (inf if none) -> [B]."""
    if z.shape[0] == 0:
        return x.new_full((x.shape[0],), math.inf, dtype=torch.float32)
    d = rms_cdist(flat32(x), flat32(z))
    if mask is not None:
        d = torch.where(mask, d, torch.full_like(d, math.inf))
    return d.min(1).values
