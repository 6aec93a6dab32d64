"""The static references of one run (protected set and batch memory) behind one range-search interface, in
the sampler's own space (SPELL, arXiv 2410.06025: the push needs every reference within r of x̂0).

Small sets are tensors searched by brute force; large ones are ``index.ReferenceIndex`` objects over
VAE-space latents, reached through the latent format's scalar affine map (model = scale · vae + shift, as
for SD1.x, SDXL, SD3 and Flux), so a million references are never converted or held in RAM.
"""
from __future__ import annotations

import math

import torch

from .index.engine import CandidateLimitError
from .repellency import escape_direction, flat32, guard_fraction, ray_exit, rms_cdist

Pairs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class TensorPart:
    """References [N, ...] already in model space, brute force."""

    def __init__(self, z: torch.Tensor):
        self.z = z.float()
        self._on = {}

    def __len__(self):
        return self.z.shape[0]

    def on(self, device):
        if device not in self._on:
            self._on[device] = flat32(self.z).to(device)
        return self._on[device]

    def range_search(self, x: torch.Tensor, r: float) -> Pairs:
        d = rms_cdist(flat32(x), self.on(x.device))
        i, k = torch.nonzero(d < r, as_tuple=True)
        return i, k, d[i, k]

    def get(self, k: torch.Tensor, device) -> torch.Tensor:
        return self.on(device)[k.to(device)]


class IndexPart:
    """A ReferenceIndex over VAE-space latents, seen in model space through model = scale · vae + shift."""

    def __init__(self, index, scale: float, shift: float):
        if not scale > 0:
            raise ValueError(f"latent format scale must be > 0, got {scale}")
        self.index, self.scale, self.shift = index, float(scale), float(shift)

    def __len__(self):
        return len(self.index)

    def range_search(self, x: torch.Tensor, r: float) -> Pairs:
        i, k, d = self.index.range_search(((x.float() - self.shift) / self.scale).cpu(), r / self.scale)
        return i.to(x.device), k.to(x.device), (d * self.scale).to(x.device)

    def get(self, k: torch.Tensor, device) -> torch.Tensor:
        return (flat32(self.index.get(k.cpu())) * self.scale + self.shift).to(device)


NEAREST_STEPS = (0.25, 0.375, 0.5, 0.75, 1.0)  # radii of Shield.nearest's searches, as fractions of its cap


class Shield:
    """Union of reference parts; reference ids run over the parts in order."""

    def __init__(self, parts: list):
        self.parts = [p for p in parts if len(p)]
        self.offsets = [0]
        for p in self.parts:
            self.offsets.append(self.offsets[-1] + len(p))

    def __len__(self):
        return self.offsets[-1]

    def range_search(self, x: torch.Tensor, r: float) -> Pairs:
        """Every (image i, reference k, RMS distance d) with d < r."""
        found = [(i, k + off, d) for p, off in zip(self.parts, self.offsets) for i, k, d in [p.range_search(x, r)]]
        if not found:
            e = torch.zeros(0, dtype=torch.long, device=x.device)
            return e, e, torch.zeros(0, device=x.device)
        return tuple(torch.cat(t) for t in zip(*found))

    def get(self, k: torch.Tensor, device) -> torch.Tensor:
        """References k [P] -> [P, D] float32 in model space."""
        out = torch.empty(len(k), 0, device=device)
        for p, lo, hi in zip(self.parts, self.offsets, self.offsets[1:]):
            sel = (k >= lo) & (k < hi)
            if bool(sel.any()):
                rows = p.get(k[sel] - lo, device)
                if out.shape[1] == 0:
                    out = torch.empty(len(k), rows.shape[1], device=device)
                out[sel] = rows
        return out

    def nearest(self, x: torch.Tensor, cap: float) -> torch.Tensor:
        """RMS distance to the nearest reference when below cap, else inf -> [B].

        Range searches of growing radius (NEAREST_STEPS of cap), each only for the rows not yet resolved: a row
        with any reference within ρ has its nearest among them. On a dense million-reference index a search at
        the full cap can return most of the set, so the radius only grows as far as a row needs."""
        out = torch.full((x.shape[0],), math.inf, device=x.device)
        todo = torch.arange(x.shape[0], device=x.device)
        for f in NEAREST_STEPS if len(self) else ():
            i, _, d = self.range_search(x[todo], cap * f)
            found = torch.full((len(todo),), math.inf, device=x.device).scatter_reduce_(0, i, d, reduce="amin")
            out[todo] = found
            todo = todo[torch.isinf(found)]
            if len(todo) == 0:
                break
        return out

    def project_out(self, x: torch.Tensor, r: float, margin: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of x within r of a reference moved the shortest way along SPELL's escape direction to RMS
        distance ≥ r·(1 + margin) from every reference; returns (x, moved [B]). Exact: the ray's exit is
        re-checked with a range search, and references found there join the computation until none remain.

        Which rows move is decided in float64 on x itself, with a guard: a row closer than r·(1 + margin/10)
        moves. The search in float32 (at r·(1 + margin)) only gives the candidates; a row parked exactly on the
        border by the push (λ = 1) reads as outside in float32 and as inside in float64, and the rounding of the
        output to float32 and through the latent format (~1e-7 relative) must not bring a kept row inside r."""
        i, k, _ = self.range_search(x, r * (1 + margin))
        if len(i):
            d64 = (x.reshape(x.shape[0], -1)[i].double() - self.get(k, x.device).double()).pow(2).mean(1).sqrt()
            close = d64 < r * (1 + guard_fraction(margin))
            i, k = i[close], k[close]
        moved = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        moved[i] = True
        if not bool(moved.any()):
            return x, moved
        xf = x.reshape(x.shape[0], -1).double()
        out = xf.clone()
        R = r * (1 + margin) * math.sqrt(xf.shape[1])
        for row in torch.nonzero(moved).flatten().tolist():
            known = k[i == row]
            z = self.get(known, x.device).double()
            u = escape_direction(xf[row], z, r)
            while True:
                y = xf[row] + ray_exit(xf[row], u, z, R) * u
                _, k_new, _ = self.range_search(y[None].to(x.dtype), r * (1 + margin))
                k_new = k_new[~torch.isin(k_new, known)]
                if len(k_new) == 0:
                    break
                known = torch.cat([known, k_new])
                z = torch.cat([z, self.get(k_new, x.device).double()])
            out[row] = y
        return out.reshape(x.shape).to(x.dtype), moved


class StepReuse:
    """Range searches at r that reuse one search at r + δ across model calls, exactly.

    Between consecutive model calls an image's x̂0 moves a little. One search at r + δ from an anchor x_a finds
    every reference that can come within r of any x with ||x − x_a|| ≤ δ (RMS; triangle inequality:
    d(x_a, z) ≤ d(x, z) + ||x − x_a|| < r + δ), so until the image has moved δ from its anchor its candidates
    are rechecked exactly and the (large) shield is not searched again. Rows with more than ``max_candidates``
    candidates are not kept (searched at every call) so the cache stays small; so are rows whose widened search
    a Milvus engine cannot answer whole (``CandidateLimitError``): they are searched at r itself.
    """

    def __init__(self, shield: "Shield", delta: float, max_candidates: int = 4096):
        if not (delta > 0 and math.isfinite(delta)):
            raise ValueError(f"reuse distance δ must be a finite number > 0, got {delta}")
        self.shield, self.delta, self.max_candidates = shield, float(delta), max_candidates
        self.anchor: torch.Tensor | None = None
        self.r = None
        self.kept: list = []  # per row: (k [P], z [P, D]) or None (not kept)
        self.searched_rows = 0
        self.reused_rows = 0
        self.narrowed_rows = 0  # rows searched at r because the engine could not return the widened answer

    def pairs(self, x: torch.Tensor, r: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every (image i, reference k, RMS distance d < r, reference row z [P, D]) for x [B, ...]."""
        xf = flat32(x)
        b = xf.shape[0]
        if self.anchor is None or self.anchor.shape != xf.shape or self.r != r:
            self.anchor, self.r, self.kept = xf.clone(), r, [None] * b
            stale = torch.ones(b, dtype=torch.bool, device=x.device)
        else:
            moved = (xf - self.anchor).pow(2).mean(1).sqrt()
            stale = (moved > self.delta) | torch.tensor([c is None for c in self.kept], device=x.device)
        rows = torch.nonzero(stale).flatten()
        self.searched_rows += len(rows)
        self.reused_rows += b - len(rows)
        current = list(self.kept)  # per row: the candidates this call checks
        if len(rows):
            try:
                # (1 + 1e-5): float32 distances are rounded (~1e-7 relative); the bound must hold for the true ones
                i, k, _ = self.shield.range_search(x[rows], (r + self.delta) * (1 + 1e-5))
                wide = True
            except CandidateLimitError:  # an engine cannot return the widened answer whole: these rows at r
                i, k, _ = self.shield.range_search(x[rows], r)
                wide = False
                self.narrowed_rows += len(rows)
            z = self.shield.get(k, x.device)
            for j, row in enumerate(rows.tolist()):
                sel = i == j
                current[row] = (k[sel], z[sel])
                self.kept[row] = current[row] if wide and int(sel.sum()) <= self.max_candidates else None
                self.anchor[row] = xf[row]
        out_i, out_k, out_d, out_z = [], [], [], []
        for row, (k, z) in enumerate(current):
            if len(k):
                d = rms_cdist(xf[row:row + 1], z)[0]
                keep = d < r
                out_i.append(torch.full((int(keep.sum()),), row, dtype=torch.long, device=x.device))
                out_k.append(k[keep])
                out_d.append(d[keep])
                out_z.append(z[keep])
        if not out_i:
            e = torch.zeros(0, dtype=torch.long, device=x.device)
            return e, e, torch.zeros(0, device=x.device), torch.zeros(0, xf.shape[1], device=x.device)
        return torch.cat(out_i), torch.cat(out_k), torch.cat(out_d), torch.cat(out_z)


def scalar_affine(fn, item_shape: tuple) -> tuple[float, float] | None:
    """(scale, shift) when fn(v) == scale · v + shift elementwise with scalars (probed on 0 and 1), else None."""
    zero = torch.zeros((1,) + tuple(item_shape))
    p0 = fn(zero.clone()).float()
    p1 = fn(zero + 1).float() - p0
    scale, shift = float(p1.flatten()[0]), float(p0.flatten()[0])
    if torch.allclose(p1, torch.full_like(p1, scale), rtol=1e-6, atol=0) and torch.allclose(p0, torch.full_like(p0, shift), rtol=1e-6, atol=1e-7):
        return scale, shift
    return None
