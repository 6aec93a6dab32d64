"""Exact range search over large reference sets for SPELL (Kirchhof et al., ICML 2025, arXiv 2410.06025).

SPELL's push needs, for each x̂0 of the batch, every reference z_k with RMS distance ||x̂0 − z_k|| / sqrt(D) < r.
The paper uses approximate nearest neighbours; this module is exact (no false negatives, no false positives):

1. A contractive feature map y(x) = [W(x − μ), ||(I − WᵀW)(x − μ)||] with W an orthonormal PCA basis [m, D]
   (or an average-pooling basis). For an orthogonal projector Q = WᵀW,
   ||x − z||² = ||Q(x − z)||² + ||(I − Q)(x − z)||² ≥ ||W(x − z)||² + (ρ(x) − ρ(z))², so ||y(x) − y(z)|| ≤ ||x − z||.
2. A range search in feature space with radius r·sqrt(D) plus a float slack (computed in float64 for the
   projection; slack covers float32 storage and scan error) gives a superset of the true neighbours.
3. Candidates are checked with exact float32 distances on the full latents (``repellency.rms_cdist``).

Backends for step 2: "cascade" (default; ``SubspaceCells``: k-means cells whose centres lie in the top-256
PCA subspace, so that distances to them are exact full-space distances; the triangle inequality in the full
space cuts every cell to an annulus and drops most cells, then the 33-dim feature bound runs on the survivors
only — cost grows with the number of cells and the rows near the query, not with N·33), "torch" (brute
force over all features, chunked, CPU or CUDA), "faiss" (faiss-cpu IndexFlatL2 range search over the
features) and "clusters" (k-means cells on the features, pruned exactly with the triangle inequality in
feature space, members sorted by distance to their centroid so each cell is cut to an annulus).
Full latents live in memory or in memory-mapped safetensors shards; files are safetensors, never pickles.
"""
from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import struct
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .repellency import flat32, rms_cdist
from .storage import (StorageError, atomic_save, atomic_write_json, check_finite, remove_stale_temporaries,
                      remove_stale_temporaries_in, save_latents)

try:  # optional
    import faiss
except ImportError:  # pragma: no cover - exercised only where faiss is absent
    faiss = None

BACKENDS = ("auto", "torch", "faiss", "clusters", "cascade")
PROJECTIONS = ("pca", "pool")
INDEX_FORMAT = "spell-index/1"
INDEX_FILE = "index.safetensors"
MANIFEST = "manifest.json"
# Relative slack on lower bounds, in units of the norms involved: float32 storage/scan error is ~1e-6 of them.
SLACK = 1e-4
# "auto" is the cascade: full-space annulus pruning of subspace-centred cells, then the PCA-32 bound, then
# the exact recheck. Measured (docs/index_benchmark.md, CPU time, 1 thread): 2.4–4.8× less than the flat
# scans ("torch", "faiss") at 10k–100k, on par with the torch flat scan at 1.2M. "clusters" prunes in the 33-dim feature space, where its cell
# bounds were too loose on the benchmark latents to pay off.
AUTO_BACKEND = "cascade"
# References per k-means cell of the "clusters" backend (measured in docs/index_benchmark.md).
CELL_SIZE = 32
# "cascade": dimension m of the subspace holding the cell centres, references per k-means cell before
# impure cells are split, and the split rule (cells with a radius above CASCADE_SPLIT × the median
# reference-to-centre distance are re-clustered, up to CASCADE_ROUNDS times).
CELL_DIM = 256
CASCADE_CELL = 64
CASCADE_SPLIT = 2.0
CASCADE_ROUNDS = 6
# The cascade checks the first PRE_DIM feature coordinates (the top principal directions) on the annulus
# survivors before all of them: a partial sum of squares is a lower bound too, and reading 8 floats a row
# instead of 33 is what costs there (measured on 1.2 M demo latents: 4.2 -> 2.1 ms per search of 8 queries).
PRE_DIM = 8

ProgressFn = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------------
# Memory-mapped safetensors shards
# --------------------------------------------------------------------------------------------------

def read_header(path: Path) -> tuple[dict, int]:
    """Parses a safetensors header -> (header dict, byte offset of the data); raises StorageError if broken."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise StorageError(f"{path} is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100_000_000):
                raise StorageError(f"{path} is truncated or corrupt (header length {n} for a {size}-byte file)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StorageError(f"{path} is not a readable safetensors file ({e})") from e
    if not isinstance(header, dict):
        raise StorageError(f"{path} has a corrupt safetensors header")
    return header, 8 + n


class Shard:
    """One safetensors file holding {"latents": float32 [n, ...]}; rows are fetched with positioned reads
    (``take``), so only the page cache holds them and the process' resident memory does not grow with the
    rows touched (a memory map, ``rows``, is still available)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise StorageError(f"shard {self.path} does not exist")
        header, start = read_header(self.path)
        info = header.get("latents")
        if not isinstance(info, dict) or info.get("dtype") != "F32":
            raise StorageError(f"shard {self.path} holds no float32 'latents' tensor")
        self.shape = tuple(int(s) for s in info["shape"])
        begin, end = info["data_offsets"]
        expected = 4 * math.prod(self.shape)
        if end - begin != expected or self.path.stat().st_size < start + end:
            raise StorageError(f"shard {self.path} is truncated: expected {start + end} bytes for shape "
                               f"{self.shape}, found {self.path.stat().st_size}")
        self.offset = start + begin
        self._mm = None
        self._fd = None

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def rows(self) -> np.ndarray:
        """[n, D] float32 memory map."""
        if self._mm is None:
            d = math.prod(self.shape[1:])
            self._mm = np.memmap(self.path, np.float32, "r", self.offset, (self.shape[0], d))
            if hasattr(mmap, "MADV_RANDOM"):  # candidate rows are scattered: no readahead around them
                self._mm._mmap.madvise(mmap.MADV_RANDOM)
        return self._mm

    def take(self, local: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows local [P] (sorted ascending for sequential access) -> [P, D] float32 (into out, a C-contiguous
        [P, D] float32 array, if given), one positioned read per run of consecutive rows."""
        d = math.prod(self.shape[1:])
        rb = 4 * d
        out = np.empty((len(local), d), np.float32) if out is None else out
        if len(local) == 0:
            return out
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        cut = np.flatnonzero(np.diff(local) != 1) + 1
        starts, ends = np.concatenate([[0], cut]), np.concatenate([cut, [len(local)]])
        buf = memoryview(out).cast("B")
        for a, b in zip(starts.tolist(), ends.tolist()):
            at, want = self.offset + int(local[a]) * rb, (b - a) * rb
            if hasattr(os, "preadv"):
                got = os.preadv(self._fd, [buf[a * rb:b * rb]], at)
            else:  # pragma: no cover - platforms without preadv
                data = os.pread(self._fd, want, at)
                got = len(data)
                buf[a * rb:a * rb + got] = data
            if got != want:
                raise StorageError(f"shard {self.path} is truncated: short read at row {int(local[a])}")
        return out

    def read(self, a: int, b: int) -> torch.Tensor:
        """Rows a..b as a float32 [b − a, D] tensor, read (not mapped: streaming leaves no resident pages)."""
        d = math.prod(self.shape[1:])
        x = np.fromfile(self.path, np.float32, (b - a) * d, offset=self.offset + 4 * a * d)
        return torch.from_numpy(x.reshape(b - a, d))


class LatentStore:
    """Reference latents [N, D] float32, either in memory or spread over memory-mapped shards."""

    def __init__(self, item_shape: tuple, tensor: torch.Tensor | None = None, shards: Sequence[Shard] = ()):
        self.item_shape = tuple(item_shape)
        self.tensor = tensor
        self.shards = list(shards)
        sizes = [len(s) for s in self.shards]
        self.starts = np.cumsum([0] + sizes)
        self.n = tensor.shape[0] if tensor is not None else int(self.starts[-1])

    @classmethod
    def from_files(cls, files: Sequence[str | os.PathLike]) -> "LatentStore":
        shards = [Shard(f) for f in files]
        if not shards:
            raise ValueError("no shard files given")
        shapes = {s.shape[1:] for s in shards}
        if len(shapes) != 1:
            raise StorageError(f"shards hold different item shapes: {sorted(shapes)}")
        return cls(shapes.pop(), shards=shards)

    def __len__(self) -> int:
        return self.n

    @property
    def dim(self) -> int:
        return math.prod(self.item_shape)

    def chunks(self, size: int = 16384) -> Iterable[tuple[int, torch.Tensor]]:
        """Yields (start, rows [n, D] float32) over all references in order."""
        if self.tensor is not None:
            for a in range(0, self.n, size):
                yield a, self.tensor[a:a + size]
            return
        for s, base in zip(self.shards, self.starts):
            for a in range(0, len(s), size):
                yield int(base) + a, s.read(a, min(a + size, len(s)))

    def get(self, k: torch.Tensor) -> torch.Tensor:
        """Rows k [P] -> [P, D] float32."""
        k = k.to("cpu", torch.long)
        if self.tensor is not None:
            return self.tensor[k]
        out = torch.empty(len(k), self.dim)
        if len(k) == 0:
            return out
        kn = k.numpy()
        if len(kn) < 2 or bool((kn[1:] >= kn[:-1]).all()):  # sorted: read straight into the output
            return self.get_sorted(kn, out)
        which = np.searchsorted(self.starts, kn, side="right") - 1
        for s in np.unique(which):
            sel = np.nonzero(which == s)[0]
            local = kn[sel] - self.starts[s]
            order = np.argsort(local, kind="stable")  # sorted, so consecutive rows are read in one call
            out[torch.from_numpy(sel[order])] = torch.from_numpy(self.shards[s].take(local[order]))
        return out

    def get_sorted(self, kn: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """Rows kn [P] (ascending) of the shards read into out [≥ P, D] float32 (contiguous) -> out[:P]."""
        o = out.numpy()
        bounds = np.searchsorted(kn, self.starts)
        for s, shard in enumerate(self.shards):
            a, b = int(bounds[s]), int(bounds[s + 1])
            if b > a:
                shard.take(kn[a:b] - self.starts[s], o[a:b])
        return out[:len(kn)]

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """n rows spread over the set (for fitting the projection)."""
        n = min(n, self.n)
        g = np.random.default_rng(seed)
        k = np.sort(g.choice(self.n, n, replace=False))
        return self.get(torch.from_numpy(k))


# --------------------------------------------------------------------------------------------------
# Contractive features
# --------------------------------------------------------------------------------------------------

def pca_basis(sample: torch.Tensor, m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and orthonormal top-m principal directions W [m, D] (float64) of sample [n, D].

    Randomised SVD (Halko et al. 2011): the directions need not be optimal, only orthonormal, which the
    final float64 QR guarantees whatever the data."""
    mu = sample.double().mean(0)
    xc = (sample.double() - mu).float()
    state = torch.random.get_rng_state()  # svd_lowrank draws its test matrix from the global generator
    torch.manual_seed(seed)
    try:
        _, _, v = torch.svd_lowrank(xc, q=min(m + 8, *xc.shape), niter=4)
    finally:
        torch.random.set_rng_state(state)
    q, _ = torch.linalg.qr(v[:, :m].double())
    return mu, q.T.contiguous()


def pool_basis(item_shape: tuple, pool: int) -> torch.Tensor:
    """Orthonormal rows [C·(h/pool)·(w/pool), D]: average pooling over pool×pool blocks times pool."""
    if len(item_shape) != 3 or item_shape[1] % pool or item_shape[2] % pool:
        raise ValueError(f"pool projection needs [C, h, w] latents divisible by pool={pool}, got {item_shape}")
    c, h, w = item_shape
    eye = torch.eye(c * (h // pool) * (w // pool), dtype=torch.float64).reshape(-1, c, h // pool, w // pool)
    up = eye.repeat_interleave(pool, 2).repeat_interleave(pool, 3) / pool
    return up.reshape(eye.shape[0], -1).contiguous()


class Features:
    """y(x) = [W(x − μ), ρ(x)], ρ(x) = ||(I − WᵀW)(x − μ)||: 1-Lipschitz, computed in float64."""

    def __init__(self, mu: torch.Tensor, w: torch.Tensor):
        self.mu, self.w = mu.double(), w.double()

    @property
    def dim(self) -> int:
        return self.w.shape[0] + 1

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, D] -> (y [n, m + 1] float64, ||x − μ|| [n] float64)."""
        xc = x.to("cpu", torch.float64) - self.mu
        p = xc @ self.w.T
        n2 = (xc * xc).sum(1)
        rho = (n2 - (p * p).sum(1)).clamp_min(0).sqrt()  # float64: cancellation error ≤ 1e-8·||x − μ||
        return torch.cat([p, rho[:, None]], 1), n2.sqrt()


# --------------------------------------------------------------------------------------------------
# Feature-space range search (supersets of the true neighbours)
# --------------------------------------------------------------------------------------------------

def flat_torch(y: torch.Tensor, y2: torch.Tensor, q: torch.Tensor, t2: torch.Tensor, chunk: int = 262144):
    """Pairs (i, k) with ||q_i − y_k||² ≤ t2_i by chunked matmul; y [N, d], y2 = ||y||² [N], q [B, d]."""
    q = q.to(y.device, y.dtype)
    q2, t2 = (q * q).sum(1, keepdim=True), t2.to(y.device, y.dtype)[:, None]
    out_i, out_k = [], []
    for a in range(0, y.shape[0], chunk):
        d2 = torch.addmm(q2 + y2[a:a + chunk][None], q, y[a:a + chunk].T, beta=1, alpha=-2)
        i, k = torch.nonzero(d2 <= t2, as_tuple=True)
        out_i.append(i)
        out_k.append(k + a)
    if not out_i:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(out_i).cpu(), torch.cat(out_k).cpu()


class ClusterCells:
    """Exact pruning with k-means cells: cell c holds rows order[off[c]:off[c+1]] sorted by distance s to its
    centroid; by the triangle inequality a row within t of q has |s − ||q − c||| ≤ t, so only that annulus
    of each cell is scanned, and cells with ||q − c|| − max s > t are skipped."""

    def __init__(self, centroids, off, s):
        self.centroids, self.off, self.s = centroids, off, s
        self.radius = torch.zeros(len(centroids))
        sizes = off[1:] - off[:-1]
        nz = sizes > 0
        self.radius[nz] = s[off[1:][nz] - 1]
        self.cell_of = torch.repeat_interleave(torch.arange(len(centroids)), sizes)
        # float64 keys cell + s / scale keep the global order, so one searchsorted cuts every annulus
        self.scale = float(s.max().item() if len(s) else 0.0) * 2 + 1
        self.key = self.cell_of.double() + s.double() / self.scale

    @classmethod
    def fit(cls, y: torch.Tensor, cells: int, seed: int = 0):
        """Two-level k-means on y [N, d]: ~sqrt(cells) coarse cells, each split in proportion to its size, so
        the build costs O(N·sqrt(cells)) -> (cells, order [N] of rows sorted by cell and s). Any assignment
        is exact; a good one only makes the pruning tighter."""
        labels, cent = two_level_kmeans(y, cells, seed)
        s = (y - cent[labels]).double().pow(2).sum(1).sqrt().float()
        order = torch.from_numpy(np.lexsort((s.numpy(), labels.numpy())))
        off = torch.zeros(len(cent) + 1, dtype=torch.long)
        off[1:] = torch.bincount(labels, minlength=len(cent)).cumsum(0)
        return cls(cent, off, s[order]), order

    def search(self, y: torch.Tensor, q: torch.Tensor, t: torch.Tensor):
        """Pairs (i, row position) with ||q_i − y_pos||² ≤ t_i², y [N, d] in cell order, q [B, d], t [B]."""
        dc = torch.cdist(q.double(), self.centroids.double())  # [B, C]
        t64 = t.double()[:, None]
        live = dc - self.radius.double()[None] <= t64
        qi, cell = torch.nonzero(live, as_tuple=True)
        if len(qi) == 0:
            self.scanned = 0
            z = torch.zeros(0, dtype=torch.long)
            return z, z
        lo_s = (dc[qi, cell] - t64[qi, 0]).clamp_min(0)
        hi_s = dc[qi, cell] + t64[qi, 0]
        i, pos = annulus_rows(self.key, self.scale, self.off, qi, cell, lo_s, hi_s)
        self.scanned = len(pos)  # feature rows read by the last search (for benchmarks)
        d2 = (y[pos] - q[i].to(y.dtype)).pow(2).sum(1)
        keep = d2 <= (t[i] * t[i]).to(d2.dtype)
        return i[keep], pos[keep]

    def tensors(self) -> dict:
        return {"centroids": self.centroids, "cell_off": self.off, "cell_s": self.s}


def annulus_rows(key: torch.Tensor, scale: float, off: torch.Tensor, qi: torch.Tensor, cell: torch.Tensor,
                 lo_s: torch.Tensor, hi_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of cell ``cell[j]`` whose distance s to the cell's centre lies in [lo_s[j], hi_s[j]], for each pair j
    -> (query ids qi[j] repeated [P], row positions [P]). Rows are stored cell by cell, sorted by the key
    cell + s / scale, so each annulus is one contiguous slice found by two binary searches."""
    base = cell.double()
    eps = 1e-9  # key rounding: |cell + s/scale| < 2^20 keeps absolute key error far below this
    lo = torch.searchsorted(key, base + lo_s / scale - eps)
    hi = torch.searchsorted(key, torch.minimum(base + hi_s / scale + eps, base + 1 - eps / 2))
    hi = torch.minimum(hi, off[cell + 1])
    lo = torch.maximum(lo, off[cell])
    n = (hi - lo).clamp_min(0)
    seg = torch.repeat_interleave(torch.arange(len(n)), n)
    pos = torch.arange(len(seg)) - torch.repeat_interleave(n.cumsum(0) - n, n) + lo[seg]
    return qi[seg], pos


def kmeans(y: torch.Tensor, k: int, seed: int = 0, iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of y [n, d] -> (centroids [k', d], labels [n]); faiss when present, trained on ≤ 64·k rows."""
    n = y.shape[0]
    if n <= k:
        return y.clone(), torch.arange(n)
    if faiss is not None:
        km = faiss.Kmeans(y.shape[1], k, niter=iters, seed=seed, max_points_per_centroid=64,
                          min_points_per_centroid=1, verbose=False)
        km.train(np.ascontiguousarray(y.numpy(), dtype=np.float32))
        cent = torch.from_numpy(km.centroids.copy())
    else:
        g = torch.Generator().manual_seed(seed)
        cent = y[torch.randperm(n, generator=g)[:k]].clone()
        for _ in range(iters):
            a = nearest_centroid(y, cent)
            sums = torch.zeros_like(cent).index_add_(0, a, y)
            cnt = torch.bincount(a, minlength=k)
            cent = torch.where(cnt[:, None] > 0, sums / cnt.clamp_min(1)[:, None], cent)
    return cent, nearest_centroid(y, cent)


def nearest_centroid(y: torch.Tensor, cent: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    c2 = (cent * cent).sum(1)
    return torch.cat([torch.addmm(c2[None], y[a:a + chunk], cent.T, alpha=-2).argmin(1)
                      for a in range(0, y.shape[0], chunk)]) if y.shape[0] else torch.zeros(0, dtype=torch.long)


def two_level_kmeans(y: torch.Tensor, cells: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-level k-means of y [N, d]: ~sqrt(cells) coarse cells, each split in proportion to its size, so the
    build costs O(N·sqrt(cells)) -> (labels [N], centroids [C, d]). Every label has its centroid row."""
    n = y.shape[0]
    cells = max(1, min(cells, n))
    coarse, a1 = kmeans(y, max(1, round(math.sqrt(cells))), seed)
    by = torch.argsort(a1, stable=True)
    sizes = torch.bincount(a1, minlength=len(coarse)).tolist()
    labels = torch.empty(n, dtype=torch.long)
    cents, base, at = [], 0, 0
    for c, size in enumerate(sizes):
        rows = by[at:at + size]
        at += size
        if size == 0:
            continue
        cf, af = kmeans(y[rows], max(1, round(size * cells / n)), seed + c + 1)
        labels[rows] = af + base
        cents.append(cf)
        base += len(cf)
    return labels, torch.cat(cents)


class SubspaceCells:
    """Exact cell pruning with full-space distances, for the "cascade" backend.

    V [m, D] is an orthonormal basis (top-m PCA) and μ a centre. Every cell centre c = μ + Vᵀc_p lies in that
    subspace, so for any latent x with p = V(x − μ) and ρ = ||(I − VᵀV)(x − μ)||, x − c splits into two
    orthogonal parts and ||x − c||² = ||p − c_p||² + ρ² holds exactly (not a bound), for references and
    queries alike. The triangle inequality in the full D-dim space, |‖q − c‖ − ‖z − c‖| ≤ ‖q − z‖, then
    bounds the true distance with no projection loss. Cell rows are sorted by s = ‖z − c‖, so each cell is
    cut to the annulus |s − ‖q − c‖| ≤ t by two binary searches, and cells with ‖q − c‖ − max s > t are
    skipped. Which rows share a cell only affects how much is pruned, never exactness.
    """

    def __init__(self, mu: torch.Tensor, w: torch.Tensor, cp: torch.Tensor, off: torch.Tensor, s: torch.Tensor,
                 p: torch.Tensor | None = None, rho: torch.Tensor | None = None):
        self.mu, self.w = mu.double(), w.double()
        # stage 2: every reference's subspace coordinates p [N, m] (float16 where they fit, else float32) and
        # residual norm ρ [N] float32, in cell order: ‖p_q − p_z‖² + (ρ_q − ρ_z)² ≤ ‖q − z‖² is a lower bound
        # with m = CELL_DIM dimensions, much tighter than the 32 of the features
        self.p, self.rho = p, rho
        self.cp = cp.float().contiguous()  # [C, m] exactly the centres used for s at build time
        self.c2 = self.cp.double().pow(2).sum(1)
        self.c2f = self.c2.float()
        self.c2max = float(self.c2.max()) if len(self.c2) else 0.0
        self.off, self.s = off.long(), s.float()
        sizes = self.off[1:] - self.off[:-1]
        self.radius = torch.zeros(len(self.cp), dtype=torch.float64)
        nz = sizes > 0
        self.radius[nz] = self.s[self.off[1:][nz] - 1].double()
        self.radius_f = (self.radius * (1 + 1e-6)).float()  # rounded up: the float32 liveness test keeps every live cell
        cell_of = torch.repeat_interleave(torch.arange(len(self.cp)), sizes)
        # float64 keys cell + s / scale keep the global order, so one searchsorted cuts every annulus
        self.scale = float(self.s.max()) * 2 + 1 if len(self.s) else 1.0
        self.key = cell_of.double() + self.s.double() / self.scale
        self.scanned = 0
        # ‖p_z‖ ≤ ‖z − μ‖ ≤ this, for the float16 rounding slack of stage 2
        self.znorm_max = 0.0
        if self.p is not None:
            for a in range(0, len(self.p), 65536):
                pn = float(self.p[a:a + 65536].float().pow(2).sum(1).max().sqrt())
                self.znorm_max = max(self.znorm_max, pn * (1 + 1e-3))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, D] -> (p [n, m] float64, ρ² [n] float64) in float64."""
        xc = x.to("cpu", torch.float64) - self.mu
        p = xc @ self.w.T
        return p, ((xc * xc).sum(1) - (p * p).sum(1)).clamp_min(0)

    @classmethod
    def fit(cls, mu: torch.Tensor, w: torch.Tensor, p: torch.Tensor, rho2: torch.Tensor, cells: int, seed: int = 0,
            split: float = CASCADE_SPLIT, rounds: int = CASCADE_ROUNDS):
        """Cells from projections p = V(z − μ) [N, m] (float32) and residual ρ² [N] (float64) -> (cells, order
        [N] of rows sorted by cell and s). k-means on p, then cells whose radius exceeds split × the median
        s (k-means merges many small clusters into one wide cell) are re-clustered into cells of ~8 rows, down to
        pairs: a wide cell of a few far-apart rows is live for almost every query (measured on 1.2 M synthetic
        SD latents: splitting cells of 2-8 rows too cut the rows left by the annulus from 215k to 30k per step
        for 46 % more cells)."""
        n = p.shape[0]
        labels = two_level_kmeans(p, cells, seed)[0]
        for rnd in range(rounds + 1):
            _, labels = torch.unique(labels, return_inverse=True)
            ncell = int(labels.max()) + 1
            cp, s = cls._centres(p, rho2, labels, ncell)
            if rnd == rounds or n < 16:
                break
            sizes = torch.bincount(labels, minlength=ncell)
            rad = torch.zeros(ncell, dtype=torch.float64).scatter_reduce_(0, labels, s, "amax")
            bad = torch.nonzero((rad > split * float(s.median())) & (sizes > 1)).flatten().tolist()
            if not bad:
                break
            by = torch.argsort(labels, stable=True)
            starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
            nxt = ncell
            for c in bad:
                rows = by[starts[c]:starts[c + 1]]
                _, a = kmeans(p[rows], max(2, len(rows) // 8), seed + 7919 * (rnd + 1) + c)
                labels[rows] = torch.where(a == 0, c, nxt + a - 1)
                nxt += int(a.max())
        order = torch.from_numpy(np.lexsort((s.numpy(), labels.numpy())))
        off = torch.zeros(ncell + 1, dtype=torch.long)
        off[1:] = torch.bincount(labels, minlength=ncell).cumsum(0)
        half = n == 0 or float(p.abs().max()) < 6e4  # float16 keeps 11 bits; beyond 65504 it overflows
        ps = torch.empty(n, p.shape[1], dtype=torch.float16 if half else torch.float32)
        for a in range(0, n, 65536):
            ps[a:a + 65536] = p[order[a:a + 65536]]
        return cls(mu, w, cp, off, s[order].float(), ps, rho2[order].sqrt().float()), order

    @staticmethod
    def _centres(p, rho2, labels, ncell, chunk: int = 65536):
        """Centres c_p (float32: the stored values define the centres) and s = ‖z − c‖ [N] float64."""
        acc = torch.zeros(ncell, p.shape[1], dtype=torch.float64)
        for a in range(0, len(p), chunk):
            acc.index_add_(0, labels[a:a + chunk], p[a:a + chunk].double())
        cp = (acc / torch.bincount(labels, minlength=ncell).clamp_min(1)[:, None].double()).float()
        cpd = cp.double()
        s = torch.empty(len(p), dtype=torch.float64)
        for a in range(0, len(p), chunk):
            s[a:a + chunk] = (p[a:a + chunk].double() - cpd[labels[a:a + chunk]]).pow(2).sum(1)
        return cp, (s + rho2).sqrt()

    def search(self, x: torch.Tensor, t: torch.Tensor, sig: torch.Tensor):
        """Rows that neither the full-space annulus bound nor the stage-2 subspace bound can rule out:
        (i, row position) for queries x [B, D], radii t [B] and extra slack sig [B] (float64, L2 units)."""
        i, pos, pq, rq2 = self.annulus(x, t, sig)
        return self.stage2(i, pos, pq, rq2, t, sig)

    def stage2(self, i, pos, pq, rq2, t, sig):
        """Stage 2 on (i, pos) pairs: the CELL_DIM-dim subspace bound -> the pairs it cannot rule out."""
        if len(i) == 0 or self.p is None:
            return i, pos
        # stage 2 on the annulus survivors only; float16 rounding moves p_z by ≤ 2^-11·‖p_z‖ (+ 2^-24·sqrt(m)
        # for subnormals) and ‖p_z‖ ≤ ‖z − μ‖, so the radius grows by that much (sig covers float32 error)
        tt = t + sig
        if self.p.dtype == torch.float16:
            tt = tt + 2.0 ** -11 * self.znorm_max + 2.0 ** -24 * math.sqrt(self.p.shape[1])
        pi = pq.float()[i]
        pi.sub_(self.p[pos].float())
        d2 = pi.mul_(pi).sum(1).double() + (rq2.sqrt()[i] - self.rho[pos].double()) ** 2
        keep = d2 <= tt[i] ** 2
        return i[keep], pos[keep]

    def annulus(self, x: torch.Tensor, t: torch.Tensor, sig: torch.Tensor):
        """Stage 1: rows inside the full-space annulus of a live cell -> (i, row position, p_q, ρ_q²)."""
        pq, rq2 = self.project(x)
        pq2 = (pq * pq).sum(1)
        # expanded squared distances to all centres in one float32 addmm; its error is below
        # 2e-5·(‖p‖² + ‖c_p‖²) for m ≤ 256 (dot products of m terms plus rounding p to float32), and the few
        # float32 additions and squarings below add ~1e-6 of the same magnitudes: e = SLACK·(...) covers both.
        # Everything over all C centres stays float32 and in place (this pass is linear in C: at 1.2 M
        # references, 107k cells, it was 36 ms of float64 temporaries); float64 only for the live pairs.
        e = SLACK * (pq2 + rq2 + self.c2max)
        d2 = torch.addmm(self.c2f[None], pq.float(), self.cp.T, alpha=-2).add_((pq2 + rq2 - e).float()[:, None])
        tt = (t + sig).double()
        # live: ‖q − c‖ − t ≤ radius, i.e. (‖q − c‖² − e) ≤ (radius + t)²  (d2 now holds ‖q − c‖² − e)
        reach = self.radius_f[None] + tt.float()[:, None]
        qi, cell = torch.nonzero(d2 <= reach.mul_(reach).mul_(1 + 1e-6), as_tuple=True)
        if len(qi) == 0:
            self.scanned = 0
            z = torch.zeros(0, dtype=torch.long)
            return z, z, pq, rq2
        d2q = d2[qi, cell].double() + e[qi]  # ‖q − c‖² as computed, for the live pairs only
        eq = e[qi]
        lo_c = (d2q - eq).clamp_min_(0).sqrt_()
        hi_c = (d2q + eq).sqrt_()
        tq = tt[qi]
        lo_s = (lo_c - tq).clamp_min(0)
        hi_s = hi_c + tq
        i, pos = annulus_rows(self.key, self.scale, self.off, qi, cell, lo_s, hi_s)
        self.scanned = len(pos)  # rows left by the annulus in the last search (for benchmarks)
        return i, pos, pq, rq2

    def tensors(self) -> dict:
        out = {"cc_mu": self.mu.clone(), "cc_w": self.w.clone(), "cc_centres": self.cp, "cc_off": self.off,
               "cc_s": self.s}
        if self.p is not None:
            out.update(cc_p=self.p, cc_rho=self.rho)
        return out

    @classmethod
    def from_tensors(cls, t: dict) -> "SubspaceCells":
        return cls(t["cc_mu"], t["cc_w"], t["cc_centres"], t["cc_off"], t["cc_s"], t.get("cc_p"), t.get("cc_rho"))


def project_store(store: "LatentStore", mu: torch.Tensor, basis: torch.Tensor, dim: int,
                  progress: ProgressFn | None = None, check: bool = True):
    """One streamed pass over the references with basis [M, D] (float64; its first dim rows are the feature
    basis) -> (features y [N, dim + 1] float32, p [N, M] float32, ρ_M² [N] float64, max ‖z − μ‖)."""
    n = len(store)
    y = torch.empty(n, dim + 1)
    p_all = torch.empty(n, basis.shape[0])
    rho2 = torch.empty(n, dtype=torch.float64)
    znorm = 0.0
    for a, rows in store.chunks(8192):
        if check and store.tensor is None:
            check_finite(rows, f"reference rows {a}..{a + len(rows)}")
        xc = rows.to(torch.float64) - mu
        p = xc @ basis.T
        n2 = (xc * xc).sum(1)
        head = (p[:, :dim] * p[:, :dim]).sum(1)
        b = a + len(rows)
        y[a:b, :dim] = p[:, :dim].float()
        y[a:b, dim] = (n2 - head).clamp_min(0).sqrt().float()  # = Features(mu, basis[:dim])(rows)
        p_all[a:b] = p.float()
        rho2[a:b] = (n2 - (p * p).sum(1)).clamp_min(0)
        znorm = max(znorm, float(n2.max().sqrt()))
        if progress is not None:
            progress(b, n)
    return y, p_all, rho2, znorm


def cascade_basis(store: "LatentStore", fit_rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, orthonormal basis [M, D]) of the cascade's cell subspace, M = min(CELL_DIM, D, N − 1)."""
    n, dmodel = len(store), store.dim
    mc = max(1, min(CELL_DIM, dmodel, max(n - 1, 1)))
    if n >= 2:
        return pca_basis(store.sample(fit_rows, seed), mc, seed)
    return torch.zeros(dmodel, dtype=torch.float64), torch.eye(mc, dmodel, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------------

def resolve_backend(backend: str, n: int) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "faiss" and faiss is None:
        raise ValueError("backend 'faiss' needs the faiss-cpu package (pip install faiss-cpu)")
    if backend == "auto":
        return AUTO_BACKEND
    return backend


class ReferenceIndex:
    """Exact RMS range search over N reference latents (see the module docstring for the method).

    Build with ``ReferenceIndex.build``; ``range_search(x, r)`` returns every pair (i, k, d) with
    d = ||x_i − z_k|| / sqrt(D) < r, with d as ``repellency.rms_cdist`` computes it.
    """

    def __init__(self, store: LatentStore, features: Features, y: torch.Tensor, znorm_max: float,
                 backend: str, cells: ClusterCells | None = None, order: torch.Tensor | None = None,
                 device: str | torch.device = "cpu", meta: dict | None = None,
                 subcells: SubspaceCells | None = None):
        self.store, self.features, self.znorm_max = store, features, float(znorm_max)
        self.cells, self.order, self.meta = cells, order, dict(meta or {})
        self.subcells = subcells
        self.device = torch.device(device)
        self.y = y  # [N, m + 1] float32, in cell order when cells or subcells is set
        self.backend = resolve_backend(backend, len(store))
        self._prepare()

    # ---- construction ----
    @classmethod
    def build(cls, latents: torch.Tensor | Sequence[str | os.PathLike], backend: str = "auto",
              projection: str = "pca", dim: int = 32, pool: int = 4, cells: int | None = None,
              fit_rows: int = 2048, device: str | torch.device = "cpu", progress: ProgressFn | None = None,
              seed: int = 0) -> "ReferenceIndex":
        """Index latents: a float tensor [N, ...] or a list of shard files (memory-mapped, streamed).

        projection "pca" keeps the top ``dim`` principal directions of ``fit_rows`` sampled rows;
        "pool" averages ``pool``×``pool`` blocks. ``cells`` (k-means cells for the "clusters" backend)
        defaults to N / CELL_SIZE (N / CASCADE_CELL before splits for "cascade", whose cells live in the
        top-CELL_DIM PCA subspace). ``progress(done, total)`` is called as rows are projected.
        """
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if isinstance(latents, torch.Tensor):
            if latents.ndim < 2:
                raise ValueError(f"latents must be [N, ...], got shape {tuple(latents.shape)}")
            check_finite(latents, "reference latents")
            store = LatentStore(latents.shape[1:], tensor=flat32(latents).cpu().contiguous())
        else:
            store = LatentStore.from_files(latents)
        n, dmodel = len(store), store.dim
        backend = resolve_backend(backend, n)
        cascade = backend == "cascade" and n > 0
        sub = None  # (mu, basis [M, D]) of the cascade's cell subspace
        if projection == "pca":
            m = max(1, min(dim, dmodel, max(n - 1, 1)))
            mc = max(m, min(CELL_DIM, dmodel, max(n - 1, 1))) if cascade else m
            if n >= 2:
                mu, basis = pca_basis(store.sample(fit_rows, seed), mc, seed)
            else:
                mu, basis = torch.zeros(dmodel, dtype=torch.float64), torch.eye(mc, dmodel, dtype=torch.float64)
            w = basis[:m].contiguous()
            if cascade:
                sub = (mu, basis)
        else:
            w = pool_basis(store.item_shape, pool)
            mu = store.sample(fit_rows, seed).double().mean(0) if n else torch.zeros(dmodel, dtype=torch.float64)
        feats = Features(mu, w)
        if sub is not None:  # one pass gives the features and the subspace coordinates
            y, p, rho2, znorm = project_store(store, mu, sub[1], w.shape[0], progress)
        else:
            y = torch.empty(n, feats.dim)
            znorm = 0.0
            for a, rows in store.chunks(8192):
                if store.tensor is None:
                    check_finite(rows, f"reference rows {a}..{a + len(rows)}")
                yy, nn = feats(rows)
                y[a:a + len(rows)] = yy.float()
                znorm = max(znorm, float(nn.max()))
                if progress is not None:
                    progress(a + len(rows), n)
        cell_index, order, subcells = None, None, None
        if backend == "clusters" and n:
            cell_index, order = ClusterCells.fit(y, cells or max(1, n // CELL_SIZE), seed=seed)
            y = y[order].contiguous()
        if cascade:
            if sub is None:  # pooled features: the cells still need a PCA subspace (a second pass)
                sub = cascade_basis(store, fit_rows, seed)
                _, p, rho2, _ = project_store(store, sub[0], sub[1], 0, check=False)
            subcells, order = SubspaceCells.fit(sub[0], sub[1], p, rho2, cells or max(1, n // CASCADE_CELL), seed)
            del p, rho2
            y = y[order].contiguous()
        meta = {"projection": projection, "dim": int(w.shape[0]), "pool": pool}
        return cls(store, feats, y, znorm, backend, cell_index, order, device, meta, subcells)

    def _prepare(self):
        self._faiss = None
        self._y2 = None
        if self.backend == "clusters" and self.cells is None and len(self):
            self.cells, self.order = ClusterCells.fit(self.y, max(1, len(self) // CELL_SIZE))
            self.y = self.y[self.order].contiguous()
        if self.backend == "cascade" and self.subcells is None and len(self):
            mu, basis = cascade_basis(self.store, 2048, 0)
            _, p, rho2, _ = project_store(self.store, mu, basis, 0, check=False)
            self.subcells, self.order = SubspaceCells.fit(mu, basis, p, rho2, max(1, len(self) // CASCADE_CELL))
            del p, rho2
            self.y = self.y[self.order].contiguous()
        self._ypre = self.y[:, :PRE_DIM].contiguous() if self.backend == "cascade" else None
        if self.backend == "torch":
            self._yd = self.y.to(self.device)
            self._y2 = (self._yd * self._yd).sum(1)
        if self.backend == "faiss":
            self._faiss = faiss.IndexFlatL2(self.y.shape[1])
            self._faiss.add(np.ascontiguousarray(self.y.numpy()))
        ynorm = self.y.norm(dim=1)
        self.ynorm_max = float(ynorm.max()) if len(ynorm) else 0.0

    def with_backend(self, backend: str, device: str | torch.device | None = None) -> "ReferenceIndex":
        """The same references and features searched by another backend (recomputes cells if needed: for
        "cascade" that is one more pass over all latents)."""
        y = self.y if self.order is None else self.y[torch.argsort(self.order)]
        return ReferenceIndex(self.store, self.features, y, self.znorm_max, backend, device=device or self.device,
                              meta=self.meta)

    # ---- queries ----
    def __len__(self) -> int:
        return len(self.store)

    @property
    def item_shape(self) -> tuple:
        return self.store.item_shape

    def get(self, k: torch.Tensor) -> torch.Tensor:
        """Reference latents k [P] -> [P, ...] float32."""
        k = torch.as_tensor(k, dtype=torch.long)
        if len(k) and (int(k.min()) < 0 or int(k.max()) >= len(self)):
            raise IndexError(f"reference ids must lie in [0, {len(self)}), got {int(k.min())}..{int(k.max())}")
        return self.store.get(k).reshape(len(k), *self.item_shape)

    def candidates(self, x: torch.Tensor, r: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs (i, k) whose feature distance allows RMS distance < r: a superset of the true pairs."""
        xf = flat32(x)
        q, xn = self.features(xf)
        dmodel = xf.shape[1]
        # lower-bound radius in L2 units with slack for float error in features (∝ norms) and in the scan
        t = r * math.sqrt(dmodel) + SLACK * (xn + self.znorm_max)
        t = t + SLACK * (q.norm(dim=1) + self.ynorm_max)
        # matmul-expanded squared distances (torch, faiss) err by ~1e-6·(|q|² + |y|²) even for tiny radii
        t2 = t * t + SLACK * (q.norm(dim=1) + self.ynorm_max) ** 2
        qf = q.float()
        if self.backend == "torch":
            return flat_torch(self._yd, self._y2, qf, t2)
        if self.backend == "faiss":
            lims, _, k = self._faiss.range_search(np.ascontiguousarray(qf.numpy()), float(t2.max()))
            lims = torch.from_numpy(lims.astype(np.int64))
            i = torch.repeat_interleave(torch.arange(len(q)), lims[1:] - lims[:-1])
            k = torch.from_numpy(k.astype(np.int64))
            d2 = (self.y[k] - qf[i]).pow(2).sum(1)  # per-query radius (faiss takes one for the batch)
            keep = d2 <= (t[i] * t[i]).float()  # direct differences: t's slack suffices
            return i[keep], k[keep]
        if self.backend == "cascade":
            # full-space annulus around subspace-centred cells, then the cheap 33-dim feature bound on its
            # survivors (33 floats a row), then the 256-dim subspace bound on what is left
            sig = SLACK * (xn + self.znorm_max)
            i, pos, pq, rq2 = self.subcells.annulus(xf, t, sig)
            t2f = (t * t).float()
            if self.y.shape[1] > PRE_DIM:  # the top PRE_DIM coordinates alone: a partial sum, still a bound
                d2 = self._ypre[pos].sub_(qf[i, :PRE_DIM]).pow_(2).sum(1)
                keep = d2 <= t2f[i]
                i, pos = i[keep], pos[keep]
            d2 = self.y[pos].sub_(qf[i]).pow_(2).sum(1)  # direct differences: t's slack suffices
            keep = d2 <= t2f[i]
            i, pos = self.subcells.stage2(i[keep], pos[keep], pq, rq2, t, sig)
            return i, self.order[pos]
        i, pos = self.cells.search(self.y, qf, t.float())
        return i, self.order[pos]

    def range_search(self, x: torch.Tensor, r: float, chunk: int = 65536):
        """Every (i, k, d) with d = RMS distance(x_i, z_k) < r; x [B, ...] -> i, k [P] long, d [P] float32.

        Pairs are sorted by (i, k). Exact: candidates come from a contractive lower bound with slack,
        distances are recomputed in float32 on the full latents.
        """
        if not r > 0 or not math.isfinite(r):
            raise ValueError(f"range_search radius r must be a finite number > 0, got {r}")
        if tuple(x.shape[1:]) != self.item_shape and not (x.ndim == 2 and x.shape[1] == self.store.dim):
            raise ValueError(f"queries of item shape {tuple(x.shape[1:])} do not match the index's {self.item_shape}")
        empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0))
        if len(self) == 0 or x.shape[0] == 0:
            return empty
        xf = flat32(x).cpu()
        ci, ck = self.candidates(xf, r)
        if len(ci) == 0:
            return empty
        if len(ci) <= chunk:  # common case: sort pairs by (i, k), read each candidate once in row order
            o = torch.argsort(ci * len(self) + ck)
            ci, ck = ci[o], ck[o]
            uk, inv = torch.unique(ck, return_inverse=True)
            z = self._read(uk)
            bounds = torch.searchsorted(ci, torch.arange(xf.shape[0] + 1)).tolist()
            outs = []
            for q in range(xf.shape[0]):
                a, b = bounds[q], bounds[q + 1]
                if b > a:  # one rms_cdist row per query: work ∝ candidate pairs
                    d = rms_cdist(xf[q:q + 1], z[inv[a:b]])[0]  # exact float32, as the brute force computes it
                    keep = d < r
                    outs.append((ci[a:b][keep], ck[a:b][keep], d[keep]))
            i, k, d = (torch.cat(t) for t in zip(*outs))
            return i, k, d
        outs = []
        uk, inv = torch.unique(ck, return_inverse=True)
        for a in range(0, len(uk), chunk):  # each candidate latent is read once, in chunks
            z = self.store.get(uk[a:a + chunk])
            sel = (inv >= a) & (inv < a + chunk)
            ii, kk, uu = ci[sel], ck[sel], inv[sel] - a
            for q in torch.unique(ii).tolist():  # one rms_cdist row per query: work ∝ candidate pairs
                mq = ii == q
                d = rms_cdist(xf[q:q + 1], z[uu[mq]])[0]  # exact float32, as the brute force computes it
                keep = d < r
                outs.append((ii[mq][keep], kk[mq][keep], d[keep]))
        i, k, d = (torch.cat(t) for t in zip(*outs))
        order = torch.argsort(i * len(self) + k)
        return i[order], k[order], d[order]

    def _read(self, uk: torch.Tensor) -> torch.Tensor:
        """Latents of sorted unique ids uk [U] -> [U, D], read into a buffer reused across calls (no fresh
        page faults per step); valid until the next call."""
        if self.store.tensor is not None:
            return self.store.tensor[uk]
        buf = getattr(self, "_buf", None)
        if buf is None or len(buf) < len(uk):
            self._buf = buf = torch.empty(max(len(uk), 2048), self.store.dim)
        return self.store.get_sorted(uk.numpy(), buf)

    # ---- persistence ----
    def save(self, folder: str | os.PathLike) -> None:
        """Writes folder/index.safetensors (features, cells; no pickle); in-memory latents go to shards there."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.store.tensor is not None:
            files, rows = [], []
            for j, a in enumerate(range(0, max(len(self), 1), 65536)):
                block = self.store.tensor[a:a + 65536]
                save_latents(folder / shard_name(j), block.reshape(-1, *self.item_shape))
                files.append(shard_name(j))
                rows.append(len(block))
        else:
            files = [os.path.relpath(s.path.resolve(), folder.resolve()) for s in self.store.shards]
            rows = [len(s) for s in self.store.shards]
        tensors = {"mu": self.features.mu, "w": self.features.w, "y": self.y}
        if self.cells is not None:
            tensors.update(self.cells.tensors(), order=self.order)
        if self.subcells is not None:
            tensors.update(self.subcells.tensors(), order=self.order)
        meta = {"format": INDEX_FORMAT, "backend": self.backend, "item_shape": json.dumps(self.item_shape),
                "shards": json.dumps(files), "rows": json.dumps(rows),
                "znorm_max": repr(self.znorm_max), "meta": json.dumps(self.meta)}
        atomic_save({k: v.contiguous() for k, v in tensors.items()}, folder / INDEX_FILE, meta)

    @classmethod
    def load(cls, folder: str | os.PathLike, backend: str | None = None,
             device: str | torch.device = "cpu", within: str | os.PathLike | None = None) -> "ReferenceIndex":
        """Opens an index written by save; shard rows are read on demand, never whole. within: a folder every
        shard the index lists must resolve inside (``spell_core.paths.contained``; the pack passes the index
        folder itself), else StorageError before any shard is opened; None: shards may lie anywhere (library use,
        shards built elsewhere)."""
        folder = Path(folder)
        path = folder / INDEX_FILE
        if not path.is_file():
            raise StorageError(f"{folder} holds no {INDEX_FILE}")
        remove_stale_temporaries(path)  # of a killed rewrite of the index
        header, _ = read_header(path)
        meta = header.get("__metadata__") or {}
        if meta.get("format") != INDEX_FORMAT:
            raise StorageError(f"{path} is not a SPELL index (format {meta.get('format')!r})")
        try:
            t = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise StorageError(f"{path} is corrupt ({e})") from e
        files = [folder / f for f in json.loads(meta["shards"])]
        if within is not None:
            files = shards_within(files, within, path)
        item_shape = tuple(json.loads(meta["item_shape"]))
        store = LatentStore.from_files(files)
        if store.item_shape != item_shape or [len(s) for s in store.shards] != json.loads(meta["rows"]):
            raise StorageError(f"shards under {folder} do not match the index (rows or item shape changed)")
        saved = meta["backend"]
        cells = order = subcells = None
        if "centroids" in t:
            cells, order = ClusterCells(t["centroids"], t["cell_off"], t["cell_s"]), t["order"]
        if "cc_centres" in t:
            subcells, order = SubspaceCells.from_tensors(t), t["order"]
        y = t["y"]
        backend = resolve_backend(backend or saved, len(store))
        if order is not None and not ((backend == "clusters" and cells is not None)
                                      or (backend == "cascade" and subcells is not None)):
            y, cells, subcells, order = y[torch.argsort(order)], None, None, None
        return cls(store, Features(t["mu"], t["w"]), y, float(meta["znorm_max"]), backend, cells, order, device,
                   json.loads(meta.get("meta", "{}")), subcells)


# --------------------------------------------------------------------------------------------------
# Streaming, resumable shard builder
# --------------------------------------------------------------------------------------------------

def shards_within(files: Sequence[str | os.PathLike], base: str | os.PathLike, listed_in) -> list[Path]:
    """files as Paths, each refused (PathRefused, a StorageError) unless its real path (symlinks followed, '..'
    resolved) is inside base's real path."""
    from .paths import PathRefused, contained

    for f in files:
        try:
            contained(base, os.path.abspath(f), "shard", "rebuild the index: its shards must lie in its own folder")
        except PathRefused as e:
            raise PathRefused(f"{listed_in} lists a {e}") from e
    return [Path(f) for f in files]


def folder_within(folder: str | os.PathLike) -> None:
    """Refuses (PathRefused) an index folder holding an entry that is a symbolic link leading out of it, or
    whose index or manifest lists a shard outside it; reads nothing but their headers. For a build that is
    about to open or resume what the folder holds."""
    from .paths import contained

    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        contained(folder, p.name, "entry", f"remove that link from {folder}")
    if (folder / INDEX_FILE).is_file():
        header, _ = read_header(folder / INDEX_FILE)
        try:
            listed = json.loads((header.get("__metadata__") or {}).get("shards", "[]"))
        except (ValueError, TypeError, AttributeError):
            listed = []  # a damaged index: the build replaces or refuses it as before
        shards_within([folder / f for f in listed], folder, folder / INDEX_FILE)
    if (folder / MANIFEST).is_file():
        try:
            listed = json.loads((folder / MANIFEST).read_text()).get("shards", [])
        except (OSError, ValueError, AttributeError):
            listed = []
        shards_within([folder / f for f in listed if isinstance(f, str)], folder, folder / MANIFEST)


def shard_name(j: int) -> str:
    return f"shard-{j:05d}.safetensors"


def complete_shards(out_dir: Path, shard_size: int) -> int:
    """Number of leading shards that exist, open cleanly and hold exactly shard_size rows."""
    j = 0
    while True:
        try:
            if len(Shard(out_dir / shard_name(j))) != shard_size:
                return j
        except StorageError:
            return j
        j += 1


def build_shards(source: Iterable[torch.Tensor] | Callable[[int], Iterable[torch.Tensor]], out_dir: str | os.PathLike,
                 shard_size: int = 8192, total: int | None = None, progress: ProgressFn | None = None,
                 bar: bool = False) -> list[Path]:
    """Writes latent batches [n, ...] from source into out_dir/shard-XXXXX.safetensors, atomically.

    Resumable: shards already complete are kept and their rows skipped. source is an iterable of batches
    (skipped rows are then read and dropped) or a callable source(start) returning batches from row
    ``start`` on (skips for free). A manifest.json written last marks the set complete; a complete set
    is returned as is. progress(done, total) is called after every batch (total None if unknown);
    bar shows a tqdm progress bar. Returns the shard paths.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be ≥ 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        if info.get("shard_size") == shard_size:
            return shards_within([out / f for f in info["shards"]], out, manifest)
    remove_stale_temporaries_in(out)  # of killed writes; a live writer's are kept
    done_shards = complete_shards(out, shard_size)
    start = done_shards * shard_size
    it = source(start) if callable(source) else source
    skip = 0 if callable(source) else start
    pbar = None
    if bar:
        from tqdm import tqdm

        pbar = tqdm(total=total, initial=start, unit="latent", desc=f"shards -> {out.name}", dynamic_ncols=True)
    buf, nbuf, j, done, item_shape = [], 0, done_shards, start, None

    def flush():
        nonlocal buf, nbuf, j
        block = torch.cat(buf)
        save_latents(out / shard_name(j), block, {"kind": "index_shard", "index": j})
        j += 1
        buf, nbuf = [], 0

    for batch in it:
        batch = batch.detach().to("cpu", torch.float32)
        if item_shape is None:
            item_shape = tuple(batch.shape[1:])
        elif tuple(batch.shape[1:]) != item_shape:
            raise ValueError(f"latent batches must share one item shape: {item_shape} then {tuple(batch.shape[1:])}")
        if skip:
            drop = min(skip, len(batch))
            batch, skip = batch[drop:], skip - drop
            if len(batch) == 0:
                continue
        check_finite(batch, f"latents {done}..{done + len(batch)}")
        while len(batch):
            take = min(shard_size - nbuf, len(batch))
            buf.append(batch[:take])
            nbuf += take
            batch = batch[take:]
            done += take
            if pbar is not None:
                pbar.update(take)
            if nbuf == shard_size:
                flush()
        if progress is not None:
            progress(done, total)
    if nbuf:
        flush()
    if pbar is not None:
        pbar.close()
    files = [shard_name(i) for i in range(j)]
    for extra in range(j, j + 1_000_000):  # a longer earlier run may have left shards past the end
        p = out / shard_name(extra)
        if not p.exists():
            break
        p.unlink()
    atomic_write_json(manifest, {"shards": files, "rows": done, "shard_size": shard_size})
    return [out / f for f in files]


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def latent_files(dirs: Sequence[str]) -> list[Path]:
    files = []
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            raise SystemExit(f"--latents-dir {d} is not a folder")
        files += sorted(p.glob("*.safetensors"))
    if not files:
        raise SystemExit("no .safetensors latent files found in " + ", ".join(dirs))
    return files


def folder_source(files: Sequence[Path]):
    """source(start) over latent files ({"latents": [n, ...]} or a single tensor), skipping whole files."""
    def rows_of(f):
        header, _ = read_header(f)
        names = [k for k in header if k != "__metadata__"]
        if not names:
            raise StorageError(f"{f} holds no tensors")
        name = "latents" if "latents" in header else names[0]
        return name, tuple(header[name]["shape"])

    info = [rows_of(f) for f in files]

    def source(start: int):
        base = 0
        for f, (name, shape) in zip(files, info):
            n = shape[0] if len(shape) >= 4 else 1
            if base + n <= start:
                base += n
                continue
            x = load_file(str(f))[name].float()
            x = x if len(shape) >= 4 else x[None]
            yield x[max(0, start - base):]
            base += n

    total = sum(s[0] if len(s) >= 4 else 1 for _, s in info)
    return source, total


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spell_core.index", description="Build a SPELL reference index.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="shard latent files and index them (resumable)")
    b.add_argument("--latents-dir", nargs="+", required=True, help="folders of latent .safetensors files")
    b.add_argument("--out", required=True, help="output folder (shards + index.safetensors)")
    b.add_argument("--shard-size", type=int, default=8192)
    b.add_argument("--backend", default="auto", choices=BACKENDS)
    b.add_argument("--projection", default="pca", choices=PROJECTIONS)
    b.add_argument("--dim", type=int, default=32, help="PCA dimensions of the lower-bound features")
    b.add_argument("--overwrite", action="store_true", help="replace an index in --out built from other files")
    args = ap.parse_args(argv)
    from .build import build_index_folder, cli_build, describe_source

    files = latent_files(args.latents_dir)
    source, total = folder_source(files)
    record = describe_source(files, {"kind": "latent files", "dim": args.dim, "projection": args.projection})
    return cli_build(lambda progress: build_index_folder(
        source, total, args.out, record, shard_size=args.shard_size, backend=args.backend, overwrite=args.overwrite,
        progress=progress, bar=True, index_options={"projection": args.projection, "dim": args.dim}),
        args.out, quiet_stages=("encode",))  # the shard writer shows its own bar


if __name__ == "__main__":
    sys.exit(main())
