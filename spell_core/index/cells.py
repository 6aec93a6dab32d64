"""Range search in feature and subspace coordinates (step 2 of the method in ``spell_core.index.search``):
supersets of the true neighbours. ``flat_torch`` is the chunked scan of the "torch" backend, ``ClusterCells``
the k-means cells of "clusters", ``SubspaceCells`` the subspace-centred cells of "cascade"; ``kmeans``,
``nearest_centroid`` and ``two_level_kmeans`` build the cells, ``annulus_rows`` cuts them to annuli.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .features import CASCADE_ROUNDS, CASCADE_SPLIT, SLACK

# The cascade's scan of all cell centres (stage 1) as a bfloat16 product where that is faster: "auto" probes it
# once per index on its own centres (bfloat16 used when at least BF16_GAIN x faster than float32 and its observed
# error within the bound of ``SubspaceCells.bf16_dot_bound``); "float32" / "bfloat16" force one (tests, benchmarks).
CENTRE_PRODUCT = "auto"
BF16_GAIN = 1.3
BF16_MIN_CELLS = 4096  # below this the scan is cheap either way

try:  # optional
    import faiss
except ImportError:  # pragma: no cover - exercised only where faiss is absent
    faiss = None


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
                 lo_s: torch.Tensor, hi_s: torch.Tensor, max_rows: int | None = None):
    """Rows of cell ``cell[j]`` whose distance s to the cell's centre lies in [lo_s[j], hi_s[j]], for each pair j
    -> (query ids qi[j] repeated [P], row positions [P]), or (None, None) when P would exceed max_rows (counted
    before any row is listed). Rows are stored cell by cell, sorted by the key cell + s / scale, so each annulus
    is one contiguous slice found by two binary searches."""
    base = cell.double()
    eps = 1e-9  # key rounding: |cell + s/scale| < 2^20 keeps absolute key error far below this
    lo = torch.searchsorted(key, base + lo_s / scale - eps)
    hi = torch.searchsorted(key, torch.minimum(base + hi_s / scale + eps, base + 1 - eps / 2))
    hi = torch.minimum(hi, off[cell + 1])
    lo = torch.maximum(lo, off[cell])
    n = (hi - lo).clamp_min(0)
    total = int(n.sum())
    if max_rows is not None and total > max_rows:
        return None, None
    # row p of the output, in pair j's slice: position p − (rows before pair j) + lo[j]
    shift = torch.repeat_interleave(lo - (n.cumsum(0) - n), n, output_size=total)
    return torch.repeat_interleave(qi, n, output_size=total), torch.arange(total).add_(shift)


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
        self.cnorm = (self.c2.sqrt() * (1 + 1e-6)).float()  # ‖c_p‖, rounded up
        self._bf16 = None  # the centres in bfloat16 once the product is chosen to be bfloat16
        self.product = None  # "float32" or "bfloat16", decided at the first search (``centre_product``)
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

    def bf16_dot_bound(self) -> float:
        """β with |computed − exact| ≤ β·‖p‖·‖c‖ for the bfloat16 product p·c of m = CELL_DIM coordinates.

        Both operands are rounded to bfloat16 (unit roundoff u = 2⁻⁸: each term p̃c̃ is within (2u + u²)|pc| of
        pc), the m products are summed in float32 (within γ_m = m·2⁻²⁴/(1 − m·2⁻²⁴) of their absolute sum) and the
        sum is rounded to bfloat16 (u of it), so the error is at most (3u + 3u² + u³ + γ_m(1 + 4u))·Σ|p_k c_k| and
        Σ|p_k c_k| ≤ ‖p‖·‖c‖. The float32 accumulation is what torch's CPU kernels do for bfloat16 (oneDNN's
        bf16 dot instructions and ``cpublas``' float opmath); ``centre_product`` checks it on the index's own
        centres before choosing bfloat16. 5 % margin."""
        u, m = 2.0 ** -8, self.cp.shape[1]
        gamma = m * 2.0 ** -24 / (1 - m * 2.0 ** -24)
        return 1.05 * (3 * u + 3 * u * u + u ** 3 + gamma * (1 + 4 * u))

    def centre_product(self) -> str:
        """"float32" or "bfloat16" for stage 1's product with every centre (CENTRE_PRODUCT; "auto" decides once:
        bfloat16 where this CPU computes it at least BF16_GAIN x faster, as with AVX512-BF16, and its error on
        the index's own centres is within ``bf16_dot_bound``: a kernel that summed in bfloat16 would exceed it)."""
        if self.product is None:
            choice = CENTRE_PRODUCT
            if choice == "auto":
                choice = "float32"
                if len(self.cp) >= BF16_MIN_CELLS:
                    choice = self._probe_bf16()
            if choice not in ("float32", "bfloat16"):
                raise ValueError(f"CENTRE_PRODUCT must be auto, float32 or bfloat16, got {choice!r}")
            self.product = choice
            if choice == "bfloat16":
                self._bf16 = self.cp.to(torch.bfloat16)
        return self.product

    def _probe_bf16(self) -> str:
        import time

        q = self.cp[torch.linspace(0, len(self.cp) - 1, 8).long()].clone()  # 8 queries, as a sampling step
        cb, qb = self.cp.to(torch.bfloat16), q.to(torch.bfloat16)
        exact = self.cp.double() @ q.double().T
        got = torch.mm(cb, qb.T).double()
        worst = float(((got - exact).abs() / (self.cnorm.double()[:, None] * q.double().norm(dim=1)[None]
                                               ).clamp_min(1e-30)).max())
        if not worst <= self.bf16_dot_bound():
            return "float32"

        def best(f):
            f()
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t)
            return min(ts)

        t32 = best(lambda: torch.addmm(self.c2f[None], q, self.cp.T, alpha=-2))  # the two products as annulus()
        t16 = best(lambda: torch.mm(cb, qb.T).T.float())
        return "bfloat16" if t32 >= BF16_GAIN * t16 else "float32"

    def annulus(self, x: torch.Tensor, t: torch.Tensor, sig: torch.Tensor, max_rows: int | None = None):
        """Stage 1: rows inside the full-space annulus of a live cell -> (i, row position, p_q, ρ_q²); i and row
        position are None when there would be more than max_rows of them (the caller scans every row instead)."""
        pq, rq2 = self.project(x)
        pq2 = (pq * pq).sum(1)
        # expanded squared distances to all centres in one float32 addmm; its error is below
        # 2e-5·(‖p‖² + ‖c_p‖²) for m ≤ 256 (dot products of m terms plus rounding p to float32), and the few
        # float32 additions and squarings below add ~1e-6 of the same magnitudes: e = SLACK·(...) covers both.
        # Everything over all C centres stays float32 and in place (this pass is linear in C: at 1.2 M
        # references, 107k cells, it was 36 ms of float64 temporaries); float64 only for the live pairs.
        e = SLACK * (pq2 + rq2 + self.c2max)
        if self.centre_product() == "bfloat16":
            # ‖q − c‖² from a bfloat16 product: within e + eb of exact, eb = 2β‖p_q‖‖c_p‖ (the product counts
            # twice); d2 holds the lower end, and each live pair's interval is widened by eb below
            eb = (2 * self.bf16_dot_bound() * (pq2.sqrt() * (1 + 1e-6)).float())[:, None] * self.cnorm[None]
            d2 = torch.mm(self._bf16, pq.float().to(torch.bfloat16).T).T.float()
            d2 = d2.mul_(-2).add_(self.c2f[None]).add_((pq2 + rq2 - e).float()[:, None]).sub_(eb)
        else:
            eb = None
            d2 = torch.addmm(self.c2f[None], pq.float(), self.cp.T, alpha=-2).add_((pq2 + rq2 - e).float()[:, None])
        tt = (t + sig).double()
        # live: ‖q − c‖ − t ≤ radius, i.e. (‖q − c‖² − e) ≤ (radius + t)²  (d2 now holds ‖q − c‖² − e)
        reach = self.radius_f[None] + tt.float()[:, None]
        qi, cell = torch.nonzero(d2 <= reach.mul_(reach).mul_(1 + 1e-6), as_tuple=True)
        if len(qi) == 0:
            self.scanned = 0
            z = torch.zeros(0, dtype=torch.long)
            return z, z, pq, rq2
        eq = e[qi] if eb is None else e[qi] + eb[qi, cell].double()
        d2q = d2[qi, cell].double() + eq  # ‖q − c‖² as computed, for the live pairs only
        lo_c = (d2q - eq).clamp_min_(0).sqrt_()
        hi_c = (d2q + eq).sqrt_()
        tq = tt[qi]
        lo_s = (lo_c - tq).clamp_min(0)
        hi_s = hi_c + tq
        i, pos = annulus_rows(self.key, self.scale, self.off, qi, cell, lo_s, hi_s, max_rows)
        self.scanned = len(self.s) if pos is None else len(pos)  # rows left by the annulus (for benchmarks)
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

