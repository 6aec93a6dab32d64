"""The exact index at real latent resolutions (issue 13, item 3): SD1.5-shaped [4, 64, 64], SDXL-shaped [4, 128, 128]
and the lower-bound feature stage alone at millions of references.

    .venv/bin/python -m benchmarks.index_realres [--sd15 25000 50000 100000] [--sdxl 6250 12500 25000]
        [--features 1200000 10000000] [--work ../spell-scratch/realres] [--dry-run]

References (``ImageLike``): per channel, a band-limited field in the orthonormal 2-D DCT basis (frequencies u, v below
half the latent's Nyquist, H/2 x W/2 coefficients) with a natural-image amplitude spectrum 1 / (1 + sqrt(u² + v²)),
so most energy is spatially smooth, mixed across the 4 channels by a fixed matrix (correlated channels, SD-like
channel means); "topics" (N / 100, lognormal sizes) share the coarse H/8 x W/8 coefficients, each image adds its own
coarse variation (spread 0.35 x lognormal(0, 0.4) per topic) and its own detail at every finer frequency; 30 % of the
images are near-duplicates of another image of their block (a copy plus an envelope-shaped perturbation of RMS
0.08 x lognormal(0, 0.5)); then white noise 0.05 on every element. Written as float16 shards (``build_shards(dtype=
"float16")``, deterministic per shard, so an interrupted build resumes with the same rows).

Queries: a simulated 20-step trajectory of a batch of 8 x̂0: x̂0_t = c + e_t · ξ_t with e_t = (1 − t / 19)² (RMS 1 at
the first step, 0 at the last) and ξ_t a unit-RMS mix of white and smooth noise that turns from one draw to another
over the steps; 6 of the 8 targets c are a reference plus a perturbation of RMS 0.3-0.9 r (late steps have true
neighbours: that reference and its near-duplicates), 2 are new images of the same distribution. Each search is timed
(``ReferenceIndex.range_search``, the default "cascade" backend); pairs are checked against an exact brute force
(streamed over the shards in chunks, float32 matmul with a margin above the worst-case rounding, every pair under the
margin recomputed with ``rms_cdist``) on every step (``--brute-steps ends``: first, middle and last).

Features only: the 33 lower-bound features y = [W(x − μ), ‖(I − WᵀW)(x − μ)‖] of SD1.5-shaped ``ImageLike`` latents
(W: top-32 PCA directions of 4,096 of them), computed without writing the latents: the white noise n enters y only
through W n (32 normals), its component along the smooth residual (1 normal) and the norm of the rest (a χ² with
D − 33 degrees of freedom), so y has exactly the distribution of the features of the materialised latents (checked
against them on every run). This is the candidate stage an external engine would hold (``spell_core.index.engine``):
timed for the exact flat scans "torch" (``cells.flat_torch``) and "faiss" (IndexFlatL2), with the radius and slack
``ReferenceIndex.candidates`` uses, against a float64 brute force over the same stored features.

Each stage runs in a fresh subprocess (its memory is its own). Builds are kept under --work (outside the repository)
and reused; --resume also reuses finished measurements. Writes --out (docs/index_realres.md) and its .json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT.parent / "spell-scratch" / "realres"  # beside the pack's folder: gigabytes, never in the repository
sys.path.insert(0, str(ROOT))

from benchmarks.index_bench import pair_dist, rss  # noqa: E402
from spell_core.index import ReferenceIndex, build_shards
from spell_core.index.cells import faiss, flat_torch
from spell_core.index.features import SLACK, Features, pca_basis
from spell_core.repellency import rms_cdist
from spell_core.storage import atomic_save

SHAPES = {"sd15": (4, 64, 64), "sdxl": (4, 128, 128)}
SHARD_BYTES = 64 << 20  # float16 shard size target: 2,048 SD1.5 latents, 512 SDXL latents
FEATURE_BLOCK = 8192  # features generated a block at a time (deterministic per block)
PART_BLOCKS = 128  # blocks per features part file (1,048,576 rows; the unit of resumed generation)
CLUSTER = 100  # mean images per topic
P_DUP, DUP_RMS, DUP_SPREAD, WHITE = 0.30, 0.08, 0.5, 0.05
CHANNEL_MEAN = torch.tensor([0.6, -0.2, 0.3, -0.4])
# fixed channel mixing (correlated channels): rows of a rotation scaled by 1.0, 0.8, 0.6, 0.5
MIX = torch.tensor([[0.62, 0.48, -0.45, 0.42], [-0.30, 0.55, 0.52, 0.22], [0.25, -0.20, 0.25, 0.45],
                    [0.20, 0.15, 0.18, -0.10]])
FRESH = 1 << 40  # block ids of new images (queries), disjoint from every reference block
INDEX_BYTES_PER_ROW = 700  # index.safetensors per reference (cascade: y 132 B, float16 256-dim coordinates 512 B, ...)
# rough rates on this 2-core machine (smoke runs at N = 8,192 / 2,048 / 300,000; printed as an estimate, not a promise):
# shard writing per KiB of float16, index build per KiB plus a PCA fit per 64k dimensions, brute force per GB read
# plus per GB and query, search per step, features generated per row and scanned per million rows and step
RATE = {"gen_us_per_kib": 21.0, "build_us_per_kib": 15.0, "build_fit_s_per_64k_dims": 30.0, "brute_s_per_gb": 3.0,
        "brute_s_per_gb_query": 0.05, "search_ms": 8.0, "search_ms_per_64k_dims": 22.0, "search_ms_per_gb": 10.0,
        "feat_gen_us": 70.0, "feat_step_ms_per_m": 45.0}


# ---------------------------------------------------------------------------------------------------- generator
def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II [n, n] (row k = frequency k): x = Mᵀ C M per channel, ‖x‖ = ‖C‖."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    m = torch.cos(math.pi * (torch.arange(n, dtype=torch.float64)[None] + 0.5) * k / n) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m


class ImageLike:
    """The synthetic references and new images of one (shape, N) (module docstring). Deterministic: block b of
    ``block`` rows depends only on (seed, shape, N, b)."""

    def __init__(self, shape: tuple, n: int, seed: int = 0, block: int = 2048):
        self.shape, self.n, self.seed, self.block = tuple(shape), n, seed, block
        c, h, w = self.shape
        self.k, self.kc = (h // 2, w // 2), (max(1, h // 8), max(1, w // 8))
        u = torch.arange(self.k[0], dtype=torch.float64)[:, None]
        v = torch.arange(self.k[1], dtype=torch.float64)[None]
        env = 1 / (1 + torch.sqrt(u * u + v * v))
        self.env = (env * math.sqrt(h * w / float((env * env).sum()))).float()  # per-element variance 1
        self.mh64, self.mw64 = dct_matrix(h)[:self.k[0]], dct_matrix(w)[:self.k[1]]
        self.mh, self.mw = self.mh64.float(), self.mw64.float()
        g = np.random.default_rng([seed, h, w, n])
        topics = max(1, n // CLUSTER)
        wt = g.lognormal(0, 1, topics)
        self.weights = wt / wt.sum()
        self.assign = torch.from_numpy(g.choice(topics, n, p=self.weights).astype(np.int64))
        self.spread = torch.from_numpy((0.35 * g.lognormal(0, 0.4, topics)).astype(np.float32))
        kc = self.kc
        self.topic = torch.from_numpy(g.standard_normal((topics, c, *kc), dtype=np.float32)) * self.env[:kc[0], :kc[1]]
        self.mix = MIX / MIX.norm(dim=1, keepdim=True) * torch.tensor([1.0, 0.8, 0.6, 0.5])[:, None]

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def _gen(self, b: int, salt: int = 0) -> torch.Generator:
        key = hashlib.sha256(f"{self.seed}/{self.shape}/{self.n}/{b}/{salt}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)

    def coefficients(self, b: int, topics: torch.Tensor | None = None) -> torch.Tensor:
        """DCT coefficients [n, C, H/2, W/2] of block b (rows b·block ...) or, for b ≥ FRESH, of new images of the
        given topics (no near-duplicates)."""
        g = self._gen(b)
        if topics is None:
            topics = self.assign[b * self.block:min((b + 1) * self.block, self.n)]
        n, (kh, kw), (ch, cw) = len(topics), self.k, self.kc
        co = torch.randn(n, self.shape[0], kh, kw, generator=g).mul_(self.env)
        co[:, :, :ch, :cw] *= self.spread[topics].view(n, 1, 1, 1)
        co[:, :, :ch, :cw] += self.topic[topics]
        dup = torch.rand(n, generator=g) < P_DUP
        if b < FRESH and 0 < int(dup.sum()) < n:
            keep = torch.nonzero(~dup).flatten()
            idx = torch.nonzero(dup).flatten()
            parent = keep[torch.randint(len(keep), (len(idx),), generator=g)]
            amp = DUP_RMS * torch.exp(DUP_SPREAD * torch.randn(len(idx), generator=g))
            e = torch.randn(len(idx), *co.shape[1:], generator=g).mul_(self.env).mul_(amp.view(-1, 1, 1, 1))
            co[idx] = e.add_(co[parent])
        return torch.einsum("ij,njuv->niuv", self.mix, co)

    def smooth(self, co: torch.Tensor) -> torch.Tensor:
        """Coefficients [n, C, h', w'] -> fields [n, C, H, W] (inverse DCT of the low block)."""
        return self.mh.T @ co @ self.mw

    def latents(self, b: int, topics: torch.Tensor | None = None) -> torch.Tensor:
        x = self.smooth(self.coefficients(b, topics))
        x += WHITE * torch.randn(x.shape, generator=self._gen(b, 1))
        return x + CHANNEL_MEAN.view(1, -1, 1, 1)

    def source(self):
        """source(start) for build_shards (start is a multiple of the block: the shard size)."""
        def gen(start: int):
            assert start % self.block == 0, "resume at a block boundary (shard size = block)"
            for b in range(start // self.block, -(-self.n // self.block)):
                yield self.latents(b)
        return gen

    def fresh(self, m: int, seed: int) -> torch.Tensor:
        """m new images of topics drawn by weight (not in the set)."""
        g = np.random.default_rng([seed, 99])
        topics = torch.from_numpy(g.choice(len(self.weights), m, p=self.weights))
        return self.latents(FRESH + seed, topics)

    def unit_noise(self, m: int, g: torch.Generator) -> torch.Tensor:
        """m unit-RMS perturbations: 0.6 smooth (the generator's envelope) + 0.8 white."""
        co = torch.randn(m, self.shape[0], *self.k, generator=g) * self.env
        e = 0.6 * self.smooth(co) + 0.8 * torch.randn(m, *self.shape, generator=g)
        return e / e.reshape(m, -1).pow(2).mean(1).sqrt().view(m, 1, 1, 1)


def trajectory(synth: ImageLike, refs, steps: int, batch: int, near: int, r: float, seed: int):
    """x̂0 [steps, batch, C, H, W] of one simulated trajectory and its targets (reference id, or −1 for a new image).
    refs(k) -> latents of references k."""
    g = torch.Generator().manual_seed(7_919 * seed + 1)
    k = torch.randint(0, synth.n, (near,), generator=g)
    u = 0.3 + 0.6 * torch.rand(near, generator=g)
    c = torch.cat([refs(k) + (u * r).view(-1, 1, 1, 1) * synth.unit_noise(near, g), synth.fresh(batch - near, seed)])
    xa, xb = synth.unit_noise(batch, g), synth.unit_noise(batch, g)
    out = []
    for t in range(steps):
        e = (1 - t / max(steps - 1, 1)) ** 2
        th = 0.5 * math.pi * t / max(steps - 1, 1)
        out.append(c + e * (math.cos(th) * xa + math.sin(th) * xb))
    return torch.stack(out), torch.cat([k, torch.full((batch - near,), -1)])


# ---------------------------------------------------------------------------------------------------- helpers
def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


class Progress:
    """Progress lines on stderr for long stages: at most every `every` seconds, with rate and time left."""

    def __init__(self, label: str, total: int, unit: str = "rows", every: float = 20.0):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, total: int | None = None):
        now = time.perf_counter()
        total = total or self.total
        if now - self.last < self.every and done < total:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        left = (total - done) / rate if rate > 0 else float("nan")
        print(f"  [{self.label}] {done:,}/{total:,} {self.unit} ({100 * done / max(total, 1):.0f} %), "
              f"{now - self.t0:.0f} s, ~{left:.0f} s left", file=sys.stderr, flush=True)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0


def shard_rows(shape: tuple) -> int:
    return max(1, SHARD_BYTES // (2 * math.prod(shape)))


def case_dir(work: Path, kind: str, n: int, seed: int) -> Path:
    return work / (f"{kind}_n{n}" + (f"_s{seed}" if seed else ""))


def brute_force(index: ReferenceIndex, x: torch.Tensor, r: float, chunk_bytes: int = 128 << 20) -> set:
    """Exact pairs (query, k) with RMS distance < r over every stored latent, streamed over the shards in chunks of
    chunk_bytes (float32): float32 matmul distances with a margin of max(1e-3, 4·D·2⁻²⁴)·(|x|² + |z|²) (above the
    worst-case float32 rounding of a D-term dot product), then every pair under the margin recomputed with rms_cdist."""
    xf = x.reshape(len(x), -1).float()
    d = xf.shape[1]
    x2 = (xf * xf).sum(1, keepdim=True)
    big, tol = r * r * d, max(1e-3, 4 * d * 2.0 ** -24)
    rows = max(64, chunk_bytes // (4 * d))
    pairs, prog = set(), Progress("brute force", len(index), "references")
    for a, z in index.store.chunks(rows):
        z2 = (z * z).sum(1)[None]
        d2 = torch.addmm(x2 + z2, xf, z.T, alpha=-2)
        i, k = torch.nonzero(d2 < big + tol * (x2 + z2), as_tuple=True)
        if len(i):
            dd = pair_dist(xf, i, z[k])
            pairs |= {(ii, kk + a) for ii, kk in zip(i[dd < r].tolist(), k[dd < r].tolist())}
        prog(a + len(z))
    return pairs


def stats_ms(times: list[float]) -> dict:
    t = np.asarray(times) * 1000
    return {"mean": round(float(t.mean()), 2), "p95": round(float(np.quantile(t, 0.95)), 2),
            "median": round(float(np.median(t)), 2), "max": round(float(t.max()), 2)}


# ---------------------------------------------------------------------------------------------------- workers
def worker_shards(args) -> dict:
    """Writes (or resumes) the float16 shards of one latent case."""
    torch.set_num_threads(os.cpu_count() or 1)
    shape = SHAPES[args.kind]
    rows = shard_rows(shape)
    synth = ImageLike(shape, args.n, args.seed, block=rows)
    data = Path(args.data)
    before = len(list(data.glob("shard-*.safetensors"))) if data.is_dir() else 0
    t = time.perf_counter()
    build_shards(synth.source(), data, shard_size=rows, total=args.n, dtype="float16",
                 progress=Progress(f"{args.kind} N={args.n:,} shards", args.n, "latents"))
    return {"gen_s": time.perf_counter() - t, "shard_rows": rows, "resumed_from_shards": before,
            "shard_bytes": sum(p.stat().st_size for p in data.glob("shard-*.safetensors")),
            "peak_rss_mb": rss()["VmHWM"]}


def worker_build(args) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    data = Path(args.data)
    files = json.loads((data / "manifest.json").read_text())["shards"]
    print(f"  [{args.kind} N={args.n:,} index] fitting the PCA bases on 2,048 sampled rows, one projection pass, then "
          "k-means cells", file=sys.stderr, flush=True)
    t = time.perf_counter()
    index = ReferenceIndex.build([data / f for f in files], dim=32,
                                 progress=Progress(f"{args.kind} N={args.n:,} index (projection pass)", args.n))
    build = time.perf_counter() - t
    index.save(data)
    return {"build_s": build, "peak_rss_mb": rss()["VmHWM"], "cells": len(index.subcells.cp),
            "backend": index.backend, "index_bytes": (data / "index.safetensors").stat().st_size}


def energy_captured(index: ReferenceIndex, m: int = 1024) -> dict:
    """Share of the variance of m sampled references in the top-32 feature directions and the cascade's 256."""
    z = index.store.sample(m, seed=5).double()
    zc = z - index.features.mu
    tot = float((zc * zc).sum())
    out = {"pca32": float(((zc @ index.features.w.T) ** 2).sum()) / tot}
    if index.subcells is not None:
        out["pca256"] = float(((zc @ index.subcells.w.T) ** 2).sum()) / tot
    return out


def worker_query(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = SHAPES[args.kind]
    synth = ImageLike(shape, args.n, args.seed, block=shard_rows(shape))
    res = {"load_before": loadavg(), "threads": torch.get_num_threads()}
    t = time.perf_counter()
    index = ReferenceIndex.load(args.data)
    res["load_s"] = time.perf_counter() - t
    res["rss_after_load"] = rss()
    refs = index.get
    trajs = [trajectory(synth, refs, args.steps, args.batch, args.near, args.r, args.seed * 1000 + j)
             for j in range(args.trajectories)]
    warm = trajectory(synth, refs, 2, args.batch, args.near, args.r, args.seed * 1000 + 999)[0]
    t = time.perf_counter()
    index.range_search(warm[-1], args.r)  # first search after opening (pages in the index): reported, not averaged
    res["first_search_ms"] = 1000 * (time.perf_counter() - t)
    times, found, cand, annulus = [], {}, [], []
    for j, (x, _) in enumerate(trajs):
        for s in range(args.steps):
            t = time.perf_counter()
            i, k, _ = index.range_search(x[s], args.r)
            times.append(time.perf_counter() - t)
            found[(j, s)] = set(zip(i.tolist(), k.tolist()))
            cand.append(len(index.candidates(x[s].reshape(args.batch, -1), args.r)[0]))
            annulus.append(index.subcells.scanned if index.subcells is not None else 0)
        print(f"  [{args.kind} N={args.n:,}] trajectory {j + 1}/{args.trajectories}: "
              f"{1000 * np.mean(times[-args.steps:]):.1f} ms per step", file=sys.stderr, flush=True)
    res["rss_after_search"] = rss()
    # side by side, alternating at every step over the same queries: the default cascade against listing every
    # annulus row (search.ANNULUS_FLAT off: no prefix scan of all rows however many rows the annulus keeps)
    from spell_core.index import search as search_mod

    default_flat = search_mod.ANNULUS_FLAT
    alt = {"default": [], "listing": []}
    same = True
    if index.subcells is not None:
        for x, _ in trajs:
            for s in range(args.steps):
                got = {}
                for name, share in (("default", default_flat), ("listing", math.inf)):
                    search_mod.ANNULUS_FLAT = share
                    t = time.perf_counter()
                    got[name] = index.range_search(x[s], args.r)
                    alt[name].append(time.perf_counter() - t)
                same = same and all(torch.equal(a, b) for a, b in zip(got["default"], got["listing"]))
        search_mod.ANNULUS_FLAT = default_flat
        res["side_by_side"] = {"annulus_flat": default_flat, "same_answers": same,
                               **{k: stats_ms(v) for k, v in alt.items()}}
    res["load_after"] = loadavg()
    per_step = np.asarray(times).reshape(args.trajectories, args.steps)
    res.update(step_ms=stats_ms(times), step_ms_by_step=[round(1000 * float(v), 2) for v in per_step.mean(0)],
               candidates_per_step=float(np.mean(cand)),
               # rows listed by the annulus, over the steps that listed them; on the others (scanned == N) the
               # cascade checked the feature prefix of every row instead (search.ANNULUS_FLAT)
               annulus_rows_per_step=float(np.mean([a for a in annulus if a < args.n] or [0])),
               prefix_scan_steps=sum(a >= args.n for a in annulus) if index.subcells is not None else 0,
               searched_steps=len(annulus),
               pairs=sum(len(v) for v in found.values()),
               pairs_by_step=[sum(len(found[(j, s)]) for j in range(args.trajectories)) for s in range(args.steps)],
               energy=energy_captured(index))
    # exact brute force over every stored latent, all checked steps of all trajectories in one streamed pass
    torch.set_num_threads(os.cpu_count() or 1)
    steps = list(range(args.steps)) if args.brute_steps == "all" else sorted({0, args.steps // 2, args.steps - 1})
    xs = torch.cat([x[s] for x, _ in trajs for s in steps])
    t = time.perf_counter()
    truth = brute_force(index, xs, args.r)
    res["brute_s"] = time.perf_counter() - t
    misses = extras = 0
    q = 0
    for j in range(args.trajectories):
        for s in steps:
            want = {(i - q, k) for i, k in truth if q <= i < q + args.batch}
            misses += len(want - found[(j, s)])
            extras += len(found[(j, s)] - want)
            q += args.batch
    res.update(brute_steps=steps, checked_searches=len(steps) * args.trajectories, true_pairs=len(truth),
               misses=misses, extras=extras, peak_rss_mb=rss()["VmHWM"])
    return res


# ---- features only
class AnalyticFeatures:
    """The 33 features of ImageLike latents without the latents (module docstring): y = [p, ρ] with
    p = W_c·C + σ g and ρ² = (‖v‖ + σ h)² + σ² χ²_{D−33}, where C are the DCT coefficients (the smooth part,
    μ = the channel means), W_c the PCA basis in coefficient space, v the smooth part's residual off W."""

    def __init__(self, synth: ImageLike, m: int = 32, fit: int = 4096, wc: torch.Tensor | None = None):
        """wc: the coefficient-space basis of an earlier run (the basis must not change between the run that
        generates features and the one that queries them: a refit on another thread count differs in rounding)."""
        self.synth, self.m = synth, m
        if wc is None:
            blocks = sorted({int(b) for b in np.random.default_rng(3).integers(0, -(-synth.n // synth.block), 2)})
            co = torch.cat([synth.coefficients(b) for b in blocks])
            co = co[torch.randperm(len(co), generator=torch.Generator().manual_seed(4))[:fit]]
            _, wc = pca_basis(co.reshape(len(co), -1), m)  # [m, C·h'·w'] float64, orthonormal
        self.wc = wc.double()
        c, h, w = synth.shape
        kh, kw = synth.k
        wpix = synth.mh64.T @ self.wc.reshape(m, c, kh, kw) @ synth.mw64
        self.w = wpix.reshape(m, -1).contiguous()  # the same basis in pixel space [m, D]
        self.mu = CHANNEL_MEAN.double().view(-1, 1, 1).expand(c, h, w).reshape(-1).contiguous()
        self.features = Features(self.mu, self.w)
        self.dof = synth.dim - m - 1

    def noise(self, b: int, n: int):
        """(g [n, m], h [n], χ² [n]) of block b: the white noise's parts that reach the features."""
        rng = np.random.default_rng([self.synth.seed, b, 17])
        g = torch.from_numpy(rng.standard_normal((n, self.m)))
        h = torch.from_numpy(rng.standard_normal(n))
        return g, h, torch.from_numpy(rng.chisquare(self.dof, n))

    def smooth_parts(self, co: torch.Tensor):
        """(W_c·C [n, m] float64 from a float32 product, ‖v‖ = sqrt(‖C‖² − ‖W_c·C‖²) [n] float64)."""
        cf = co.reshape(len(co), -1)
        if not hasattr(self, "_wc32"):
            self._wc32 = self.wc.float().T.contiguous()
        ps = (cf @ self._wc32).double()
        n2 = torch.linalg.vector_norm(cf, dim=1, dtype=torch.float64) ** 2
        return ps, (n2 - (ps * ps).sum(1)).clamp_min(0).sqrt()

    def assemble(self, ps, vn, g, h, chi2) -> torch.Tensor:
        p = ps + WHITE * g
        rho = ((vn + WHITE * h) ** 2 + WHITE ** 2 * chi2).sqrt()
        return torch.cat([p, rho[:, None]], 1).float()

    def block(self, b: int) -> torch.Tensor:
        co = self.synth.coefficients(b)
        ps, vn = self.smooth_parts(co)
        return self.assemble(ps, vn, *self.noise(b, len(co)))

    def materialise(self, k: torch.Tensor) -> torch.Tensor:
        """Latents [len(k), C, H, W] of references k whose exact features are their stored ones: the white noise
        n = Wᵀg + h·v̂ + (a random direction off W and v̂ with squared norm χ²)."""
        out = []
        gen = torch.Generator().manual_seed(11)
        for kk in k.tolist():
            b, row = divmod(kk, self.synth.block)
            co = self.synth.coefficients(b)[row:row + 1]
            g, h, chi2 = (t[row:row + 1] for t in self.noise(b, len(self.synth.assign[b * self.synth.block:
                                                                                      (b + 1) * self.synth.block])))
            s = self.synth.smooth(co).reshape(1, -1).double()
            ps = s @ self.w.T
            v = s - ps @ self.w
            vh = v / v.norm()
            z = torch.randn(1, self.synth.dim, generator=gen, dtype=torch.float64)
            z = z - (z @ self.w.T) @ self.w
            z = z - (z @ vh.T) * vh
            n = g @ self.w + h[:, None] * vh + z / z.norm() * chi2.sqrt()[:, None]
            out.append((s + WHITE * n).float().reshape(1, *self.synth.shape) + CHANNEL_MEAN.view(1, -1, 1, 1))
        return torch.cat(out)

    def check(self, rows: int = 64) -> float:
        """Max |analytic − exact| / max‖y‖ over rows latents materialised with explicit white noise."""
        co = self.synth.coefficients(0)[:rows]
        s = self.synth.smooth(co).reshape(len(co), -1).double()
        n = torch.randn(s.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        x = s + WHITE * n + self.mu
        y_exact, _ = self.features(x)
        ps, vn = self.smooth_parts(co)
        g = n @ self.w.T
        v = s - (s @ self.w.T) @ self.w
        h = (v * n).sum(1) / v.norm(dim=1)
        chi2 = (n * n).sum(1) - (g * g).sum(1) - h * h
        y = self.assemble(ps, vn, g, h, chi2).double()
        return float((y - y_exact).abs().max() / y_exact.norm(dim=1).max())


def analytic(synth: ImageLike, data: Path) -> AnalyticFeatures:
    """The features' basis of the folder data (fitted and saved there first, before any features are written)."""
    from safetensors.torch import load_file

    path = data / "basis.safetensors"
    if path.is_file():
        return AnalyticFeatures(synth, wc=load_file(str(path))["wc"])
    af = AnalyticFeatures(synth)
    atomic_save({"wc": af.wc, "w": af.w, "mu": af.mu}, path, {"kind": "realres features basis"})
    return af


def worker_features(args) -> dict:
    """Generates (or resumes) the features parts of one features-only case."""
    torch.set_num_threads(os.cpu_count() or 1)
    synth = ImageLike(SHAPES[args.feature_shape], args.n, args.seed, block=FEATURE_BLOCK)
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if not (data / "basis.safetensors").is_file():
        for old in data.glob("features-*.safetensors"):  # of an unknown basis: regenerated
            old.unlink()
    af = analytic(synth, data)
    err = af.check()
    if not err < 1e-5:
        raise SystemExit(f"analytic features differ from the materialised latents' by {err:.2e} (relative)")
    prog = Progress(f"features N={args.n:,}", args.n)
    per_part = PART_BLOCKS
    nblocks = -(-args.n // synth.block)
    reused = 0
    for j, b0 in enumerate(range(0, nblocks, per_part)):
        path = data / f"features-{j:05d}.safetensors"
        if path.is_file():
            reused += 1
            prog(min((b0 + per_part) * synth.block, args.n))
            continue
        ys = []
        for b in range(b0, min(b0 + per_part, nblocks)):
            ys.append(af.block(b))
            prog(min((b + 1) * synth.block, args.n))
        atomic_save({"y": torch.cat(ys).contiguous()}, path, {"kind": "realres features", "n": str(args.n)})
    return {"gen_s": time.perf_counter() - t, "check_rel_err": err, "parts_reused": reused,
            "feature_bytes": sum(p.stat().st_size for p in data.glob("features-*.safetensors")),
            "peak_rss_mb": rss()["VmHWM"], "dim": af.w.shape[0] + 1, "latent_dim": synth.dim}


def worker_features_query(args) -> dict:
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    synth = ImageLike(SHAPES[args.feature_shape], args.n, args.seed, block=FEATURE_BLOCK)
    data = Path(args.data)
    af = analytic(synth, data)
    res = {"load_before": loadavg(), "threads": torch.get_num_threads()}
    t = time.perf_counter()
    y = torch.cat([load_file(str(p))["y"] for p in sorted(data.glob("features-*.safetensors"))])
    if len(y) != args.n:
        raise SystemExit(f"{data} holds {len(y)} features, not {args.n}: delete it and run again")
    yn = y.norm(dim=1)
    ynorm_max = float(yn.max())
    znorm_max = ynorm_max  # ‖z − μ‖² = ‖p‖² + ρ² = ‖y‖²
    res["load_s"] = time.perf_counter() - t
    res["rss_after_load"] = rss()
    dmodel = synth.dim
    trajs = [trajectory(synth, af.materialise, args.steps, args.batch, args.near, args.r, args.seed * 1000 + j)
             for j in range(args.trajectories)]
    # the materialised targets' exact features are their stored ones (to float32 rounding)
    k0 = trajs[0][1][:args.near]
    y0, _ = af.features(af.materialise(k0).reshape(len(k0), -1))
    res["materialise_rel_err"] = float((y0.float() - y[k0]).abs().max() / yn[k0].max())

    def radius(x):
        q, xn = af.features(x.reshape(len(x), -1))
        t_ = args.r * math.sqrt(dmodel) + SLACK * (xn + znorm_max) + SLACK * (q.norm(dim=1) + ynorm_max)
        return q.float(), t_ * t_ + SLACK * (q.norm(dim=1) + ynorm_max) ** 2, (args.r * math.sqrt(dmodel)) ** 2

    queries = [[radius(x[s]) for s in range(args.steps)] for x, _ in trajs]
    found, timing = {}, {}
    backends = [b for b in args.feature_backends if b != "faiss" or faiss is not None]
    for be in backends:
        t = time.perf_counter()
        if be == "torch":
            y2 = (y * y).sum(1)

            def search(q, t2, y2=y2):
                return flat_torch(y, y2, q, t2)
        else:
            fi = faiss.IndexFlatL2(y.shape[1])
            fi.add(np.ascontiguousarray(y.numpy()))

            def search(q, t2, fi=fi):
                lims, _, kk = fi.range_search(np.ascontiguousarray(q.numpy()), float(t2.max()))
                lims = torch.from_numpy(lims.astype(np.int64))
                ii = torch.repeat_interleave(torch.arange(len(q)), lims[1:] - lims[:-1])
                kk = torch.from_numpy(kk.astype(np.int64))
                d2 = (y[kk] - q[ii]).pow(2).sum(1)  # per-query radius, as ReferenceIndex.candidates
                keep = d2 <= t2[ii].float()
                return ii[keep], kk[keep]
        prep = time.perf_counter() - t
        search(*queries[0][-1][:2])  # first call: reported apart
        times = []
        for j in range(args.trajectories):
            for s in range(args.steps):
                q, t2, _ = queries[j][s]
                t = time.perf_counter()
                i, k = search(q, t2)
                times.append(time.perf_counter() - t)
                found[(be, j, s)] = set(zip(i.tolist(), k.tolist()))
        timing[be] = {"prep_s": prep, "step_ms": stats_ms(times), "rss": rss()}
        print(f"  [features N={args.n:,}] {be}: {timing[be]['step_ms']['mean']:.1f} ms per step",
              file=sys.stderr, flush=True)
        if be == "faiss":
            del fi
    res["rss_after_search"] = rss()
    res["load_after"] = loadavg()
    # float64 brute force over the stored features: pairs with ‖q − y‖² ≤ t² (the radius the engine is asked for)
    torch.set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    truth, strict = {}, 0
    qs = torch.cat([q for traj in queries for q, _, _ in traj]).double()
    t2s = torch.cat([t2 for traj in queries for _, t2, _ in traj]).double()
    lb2 = queries[0][0][2]
    q2 = (qs * qs).sum(1, keepdim=True)
    prog = Progress(f"features N={args.n:,} brute force", args.n, "features")
    allp = []
    for a in range(0, args.n, 1 << 15):
        yy = y[a:a + (1 << 15)].double()
        d2 = torch.addmm(q2 + (yy * yy).sum(1)[None], qs, yy.T, alpha=-2)
        i, k = torch.nonzero(d2 <= t2s[:, None], as_tuple=True)
        strict += int((d2 < lb2).sum())
        allp.append((i, k + a))
        prog(min(a + (1 << 15), args.n))
    i = torch.cat([p[0] for p in allp])
    k = torch.cat([p[1] for p in allp])
    for ii, kk in zip(i.tolist(), k.tolist()):
        j, rest = divmod(ii, args.steps * args.batch)
        s, b = divmod(rest, args.batch)
        truth.setdefault((j, s), set()).add((b, kk))
    res["brute_s"] = time.perf_counter() - t
    for be in backends:
        mi = sum(len(truth.get((j, s), set()) - found[(be, j, s)]) for j in range(args.trajectories)
                 for s in range(args.steps))
        ex = sum(len(found[(be, j, s)] - truth.get((j, s), set())) for j in range(args.trajectories)
                 for s in range(args.steps))
        timing[be].update(misses=mi, extras=ex)
    npairs = sum(len(v) for v in truth.values())
    res.update(backends=timing, candidates=npairs, candidates_per_step=npairs / (args.trajectories * args.steps),
               candidates_by_step=[sum(len(truth.get((j, s), set())) for j in range(args.trajectories))
                                   for s in range(args.steps)],
               lower_bound_pairs=strict, peak_rss_mb=rss()["VmHWM"])
    return res


# ---------------------------------------------------------------------------------------------------- driver
def run_worker(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.index_realres", *cmd], check=True, cwd=ROOT,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def plan(args) -> list[dict]:
    cases = [{"kind": k, "n": n} for k in ("sd15", "sdxl") for n in getattr(args, k)]
    cases += [{"kind": "features", "n": n} for n in args.features]
    work = Path(args.work)
    for c in cases:
        c["dir"] = case_dir(work, c["kind"] if c["kind"] != "features" else f"features_{args.feature_shape}",
                            c["n"], args.seed)
        if c["kind"] == "features":
            c["dim"] = math.prod(SHAPES[args.feature_shape])
            c["bytes"] = 33 * 4 * c["n"]
            part = PART_BLOCKS * FEATURE_BLOCK
            done = len(list(c["dir"].glob("features-*.safetensors"))) * part if c["dir"].is_dir() else 0
            c["todo_rows"] = max(0, c["n"] - done)
            c["todo_bytes"] = 33 * 4 * c["todo_rows"]
        else:
            c["dim"] = math.prod(SHAPES[c["kind"]])
            c["bytes"] = (2 * c["dim"] + INDEX_BYTES_PER_ROW) * c["n"]
            m = c["dir"] / "manifest.json"
            if m.is_file() and json.loads(m.read_text()).get("dtype") == "float16" and (c["dir"] / "index.safetensors").is_file():
                c["todo_rows"] = 0
            else:
                have = len(list(c["dir"].glob("shard-*.safetensors"))) * shard_rows(SHAPES[c["kind"]])
                c["todo_rows"] = max(0, c["n"] - have)
            c["todo_bytes"] = (2 * c["dim"] + INDEX_BYTES_PER_ROW) * c["todo_rows"]
    return cases


def estimate(c: dict, args) -> float:
    """Rough seconds for one case from RATE."""
    searches = args.trajectories * args.steps
    checked = (args.steps if args.brute_steps == "all" else 3) * args.trajectories * args.batch
    if c["kind"] == "features":
        gen = c["todo_rows"] * RATE["feat_gen_us"] * 1e-6
        steps = (len(args.feature_backends) + 1) * searches * c["n"] / 1e6 * RATE["feat_step_ms_per_m"] * 1e-3
        return gen + steps + 20
    kib = 2 * c["dim"] / 1024
    gb = c["n"] * 2 * c["dim"] / 1e9
    gen = c["todo_rows"] * kib * RATE["gen_us_per_kib"] * 1e-6
    built = not c["todo_rows"] and (c["dir"] / "build.json").is_file()
    build = 0 if built else (c["n"] * kib * RATE["build_us_per_kib"] * 1e-6
                             + c["dim"] / 65536 * RATE["build_fit_s_per_64k_dims"])
    brute = gb * (RATE["brute_s_per_gb"] + RATE["brute_s_per_gb_query"] * checked)
    step = RATE["search_ms"] + c["dim"] / 65536 * RATE["search_ms_per_64k_dims"] + gb * RATE["search_ms_per_gb"]
    return gen + build + brute + 2 * searches * step * 1e-3 + 15  # searches timed, then their candidates counted


def describe_plan(cases, args) -> str:
    free = shutil.disk_usage(Path(args.work) if Path(args.work).exists() else Path(args.work).parent).free
    lines = [f"free disk under the --work folder: {free / 1e9:.1f} GB"]
    for name, shape in SHAPES.items():
        per = 2 * math.prod(shape) + INDEX_BYTES_PER_ROW
        lines.append(f"  {name} {shape}: float16 {2 * math.prod(shape) / 1024:.0f} KiB per latent + ~{INDEX_BYTES_PER_ROW} B "
                     f"of index -> the free disk holds N ≤ {int(free / per):,} (nothing else built)")
    lines.append(f"  features only: 132 B per reference -> N ≤ {int(free / 132):,}")
    need = sum(c["todo_bytes"] for c in cases)
    lines.append(f"plan ({len(cases)} cases, {args.trajectories} trajectories x {args.steps} steps x batch {args.batch} "
                 f"per case, r = {args.r}, brute force on {args.brute_steps} steps):")
    total = 0.0
    for c in cases:
        est = estimate(c, args)
        total += est
        what = ("features" if c["kind"] == "features" else "latents")
        lines.append(f"  {c['kind']:8s} N={c['n']:>11,}: {c['bytes'] / 1e9:6.2f} GB on disk, {c['todo_rows']:,} {what} "
                     f"to generate ({c['todo_bytes'] / 1e9:.2f} GB), ~{est / 60:.0f} min")
    lines.append(f"  to write: {need / 1e9:.2f} GB; rough total {total / 60:.0f} min on this machine "
                 f"(rates measured in smoke runs; builds already under --work are reused)")
    if need > free - (2 << 30):
        lines.append(f"  NOT ENOUGH DISK: {need / 1e9:.1f} GB to write, {free / 1e9:.1f} GB free (2 GB kept): pass "
                     f"smaller --sd15/--sdxl/--features sizes or another --work")
    return "\n".join(lines)


def params(args, c) -> dict:
    return {"r": args.r, "steps": args.steps, "batch": args.batch, "near": args.near, "trajectories": args.trajectories,
            "threads": args.threads, "seed": args.seed, "brute_steps": args.brute_steps,
            "feature_backends": args.feature_backends if c["kind"] == "features" else None,
            "feature_shape": args.feature_shape if c["kind"] == "features" else None}


def run_case(c: dict, args) -> dict:
    d = c["dir"]
    common = ["--kind", c["kind"], "--n", str(c["n"]), "--data", str(d), "--seed", str(args.seed),
              "--feature-shape", args.feature_shape]
    qargs = ["--r", str(args.r), "--steps", str(args.steps), "--batch", str(args.batch), "--near", str(args.near),
             "--trajectories", str(args.trajectories), "--threads", str(args.threads), "--brute-steps", args.brute_steps,
             "--feature-backends", *args.feature_backends]
    t0 = time.time()
    result = d / "result.json"
    if args.resume and result.is_file():
        old = json.loads(result.read_text())
        if old.get("params") == params(args, c):
            print(f"[{c['kind']} N={c['n']:,}] reusing the measurement in {result} (--resume)", file=sys.stderr)
            return old
    row = {"kind": c["kind"], "n": c["n"], "dim": c["dim"], "params": params(args, c)}
    bfile = d / "build.json"
    if c["kind"] == "features":
        print(f"[features N={c['n']:,}] generating features (analytic, {args.feature_shape}-shaped)", file=sys.stderr,
              flush=True)
        b = run_worker(["--worker", "features", *common])
        parts = -(-c["n"] // (PART_BLOCKS * FEATURE_BLOCK))
        if b["parts_reused"] == parts and bfile.is_file():  # generated by an earlier run: its numbers
            b = {**json.loads(bfile.read_text()), "parts_reused": b["parts_reused"]}
        else:
            bfile.write_text(json.dumps(b))
        row["build"] = b
        print(f"[features N={c['n']:,}] searching", file=sys.stderr, flush=True)
        row["query"] = run_worker(["--worker", "features-query", *common, *qargs])
    else:
        built = bfile.is_file() and (d / "index.safetensors").is_file() and (d / "manifest.json").is_file()
        if built:
            b = json.loads(bfile.read_text())
            print(f"[{c['kind']} N={c['n']:,}] reusing the build in {d}", file=sys.stderr, flush=True)
        else:
            print(f"[{c['kind']} N={c['n']:,}] writing float16 shards", file=sys.stderr, flush=True)
            s = run_worker(["--worker", "shards", *common])
            print(f"[{c['kind']} N={c['n']:,}] shards in {s['gen_s']:.0f} s; building the index", file=sys.stderr,
                  flush=True)
            b = {"shards": s, "index": run_worker(["--worker", "build", *common])}
            bfile.write_text(json.dumps(b))
        row["build"] = b
        row["disk_bytes"] = folder_bytes(d)
        print(f"[{c['kind']} N={c['n']:,}] searching", file=sys.stderr, flush=True)
        row["query"] = run_worker(["--worker", "query", *common, *qargs])
    row["case_s"] = round(time.time() - t0, 1)
    result.write_text(json.dumps(row, indent=1))
    return row


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "faiss": getattr(faiss, "__version__", None), "python": platform.python_version(),
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.index_realres", description=__doc__.split("\n")[0])
    ap.add_argument("--sd15", type=int, nargs="*", default=[25_000, 50_000, 100_000], help="N for [4, 64, 64]")
    ap.add_argument("--sdxl", type=int, nargs="*", default=[6_250, 12_500, 25_000], help="N for [4, 128, 128]")
    ap.add_argument("--features", type=int, nargs="*", default=[1_200_000, 10_000_000],
                    help="N for the feature stage alone")
    ap.add_argument("--feature-shape", choices=sorted(SHAPES), default="sd15", help="latents the features stand for")
    ap.add_argument("--feature-backends", nargs="+", default=["torch", "faiss"], choices=["torch", "faiss"])
    ap.add_argument("--work", default=str(WORK), help="build folder, outside the repository; reused")
    ap.add_argument("--out", default=str(ROOT / "docs" / "index_realres.md"))
    ap.add_argument("--r", type=float, default=0.15, help="shield radius (RMS)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--near", type=int, default=6, help="queries of the batch heading to a reference")
    ap.add_argument("--trajectories", type=int, default=3, help="simulated trajectories per case (timed steps: x steps)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the searches (brute force: all cores)")
    ap.add_argument("--brute-steps", choices=["all", "ends"], default="all",
                    help="steps checked by brute force: all, or the first, middle and last")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="reuse finished measurements of the same parameters")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the disk it needs, then stop")
    ap.add_argument("--worker", choices=["shards", "build", "query", "features", "features-query"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        fn = {"shards": worker_shards, "build": worker_build, "query": worker_query, "features": worker_features,
              "features-query": worker_features_query}[args.worker]
        print(json.dumps(fn(args)))
        return 0
    work = Path(args.work).resolve()
    if work == ROOT or ROOT in work.parents:
        ap.error(f"--work {work} is inside the repository: give a folder outside it (default {WORK})")
    if not 0 < args.near <= args.batch:
        ap.error("--near must be in 1..--batch")
    work.mkdir(parents=True, exist_ok=True)
    cases = plan(args)
    t_all = time.time()
    mach = machine()
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, {mach['mem_gb']} GiB, torch {mach['torch']}, "
          f"load average {' '.join(loadavg())}", file=sys.stderr)
    text = describe_plan(cases, args)
    print(text, file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    if "NOT ENOUGH DISK" in text:
        raise SystemExit("not enough disk for this plan (see above)")
    cmd = "python -m benchmarks.index_realres" + ("" if not (argv if argv is not None else sys.argv[1:])
                                                   else " " + " ".join(argv if argv is not None else sys.argv[1:]))
    rows = []
    for c in cases:
        t = time.time()
        rows.append(run_case(c, args))
        rows[-1].setdefault("case_s", round(time.time() - t, 1))  # a reused measurement keeps its own
        print(table_row(rows[-1]), file=sys.stderr, flush=True)
    res = {"command": cmd, "machine": mach, "load_end": loadavg(), "total_s": round(time.time() - t_all, 1),
           "free_disk_gb": round(shutil.disk_usage(work).free / 1e9, 1), "plan": text, "rows": rows,
           "generator": {"cluster": CLUSTER, "p_dup": P_DUP, "dup_rms": DUP_RMS, "dup_spread": DUP_SPREAD,
                         "white": WHITE}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.write_text(report(res, args))
    print(report(res, args))
    return 0


# ---------------------------------------------------------------------------------------------------- report
def mb(v) -> str:
    return f"{v:,.0f}"


def table_row(row: dict) -> str:
    q, b = row["query"], row["build"]
    if row["kind"] == "features":
        be = " | ".join(f"{k} {v['step_ms']['mean']:.1f} / {v['step_ms']['p95']:.1f} ms, {v['misses']}/{v['extras']}"
                        for k, v in q["backends"].items())
        return f"features N={row['n']:,}: gen {b['gen_s']:.0f} s; {be}; {q['candidates_per_step']:.0f} candidates per step"
    return (f"{row['kind']} N={row['n']:,}: shards {b['shards']['gen_s']:.0f} s, index {b['index']['build_s']:.0f} s, "
            f"{row['disk_bytes'] / 1e9:.2f} GB; step {q['step_ms']['mean']:.1f} ms (p95 {q['step_ms']['p95']:.1f}); "
            f"pairs {q['pairs']}; misses {q['misses']}, extras {q['extras']}")


def report(res: dict, args) -> str:
    m = res["machine"]
    rows = res["rows"]
    lat = [r for r in rows if r["kind"] != "features"]
    fea = [r for r in rows if r["kind"] == "features"]
    loads = sorted({x for r in rows for x in (r["query"]["load_before"][0], r["query"]["load_after"][0])}, key=float)
    L = ["# The exact index at real latent resolutions\n",
         f"Made by `{res['command']}` on {m['cpu']}, {m['cores']} CPU cores, {m['mem_gb']} GiB, torch {m['torch']}, "
         f"faiss {m['faiss']}; torch threads for the searches: {args.threads} (brute force: all cores); load average "
         f"(1 min) before/after each query run {loads[0] if loads else '?'}-{loads[-1] if loads else '?'}, at the end "
         f"{' '.join(res['load_end'])}. Whole run {res['total_s'] / 60:.1f} min (the cases' own times, reused builds "
         f"and measurements counted as they were: {sum(r['case_s'] for r in rows) / 60:.1f} min); raw numbers in "
         f"`{Path(args.out).with_suffix('.json').name}`.\n",
         __doc__.split("\n\n", 2)[2].split("Each stage runs")[0].strip() + "\n",
         f"r = {args.r} (RMS). Free disk after the run: {res['free_disk_gb']} GB; the plan printed at the start (free "
         "disk, the largest N it allows, expected work):\n", "```", res["plan"], "```\n"]
    if lat:
        L += ["## Full latents (float16 shards, default cascade backend)\n",
              "| shape | N | shards s | index build s | disk GB (shards + index) | build peak RSS MB | RSS after load MB "
              "(anon+file) | RSS after searches / peak MB | first search ms | ms per step mean (median, p95) | "
              "candidates / annulus rows per step (on the steps that listed them; steps that scanned every row's "
              "prefix instead) | pairs found | checked searches: true pairs, misses / extras | "
              "brute force s | variance in PCA-32 / 256 |",
              "|" + "---|" * 15]
        for r in lat:
            q, b = r["query"], r["build"]
            sh = SHAPES[r["kind"]]
            la, ls = q["rss_after_load"], q["rss_after_search"]
            e = q["energy"]
            resumed = " (resumed)" if b["shards"].get("resumed_from_shards") else ""
            L.append(f"| {r['kind']} {list(sh)} | {r['n']:,} | {b['shards']['gen_s']:.0f}{resumed} | {b['index']['build_s']:.0f} | "
                     f"{r['disk_bytes'] / 1e9:.2f} | {mb(max(b['shards']['peak_rss_mb'], b['index']['peak_rss_mb']))} | "
                     f"{mb(la['RssAnon'])}+{mb(la['RssFile'])} | {mb(ls['VmRSS'])} / {mb(ls['VmHWM'])} | "
                     f"{q['first_search_ms']:.0f} | {q['step_ms']['mean']:.1f} ({q['step_ms']['median']:.1f}, "
                     f"{q['step_ms']['p95']:.1f}) | {q['candidates_per_step']:.0f} / {q['annulus_rows_per_step']:.0f}"
                     + (f" ({q['prefix_scan_steps']} of {q['searched_steps']} steps scanned every prefix)"
                        if "prefix_scan_steps" in q else "") + " | "
                     f"{q['pairs']} | {q['checked_searches']}: {q['true_pairs']}, {q['misses']} / {q['extras']} | "
                     f"{q['brute_s']:.0f} | {100 * e['pca32']:.0f} % / {100 * e.get('pca256', float('nan')):.0f} % |")
        L.append("\nMean search ms by step (step 0: x̂0 is noise; last: at its target), and pairs found by step "
                 "(all trajectories):\n")
        for r in lat:
            q = r["query"]
            L.append(f"- {r['kind']} N={r['n']:,}: ms " + ", ".join(f"{v:.0f}" for v in q["step_ms_by_step"]) +
                     "; pairs " + ", ".join(str(v) for v in q["pairs_by_step"]))
        L.append("")
        sbs = [r for r in lat if "side_by_side" in r["query"]]
        if sbs:
            L.append("Side by side, alternating at every step over the same trajectories, after the timed pass: the "
                     "default cascade (past `search.ANNULUS_FLAT` of all rows left by the annulus it checks the "
                     "8-coordinate feature prefix of every row by one chunked matmul) against listing every annulus "
                     "row (the cascade before that switch), mean (median, p95) ms per step:\n")
            for r in sbs:
                v = r["query"]["side_by_side"]
                d, li = v["default"], v["listing"]
                L.append(f"- {r['kind']} N={r['n']:,}: default (ANNULUS_FLAT = {v['annulus_flat']}) {d['mean']:.1f} "
                         f"({d['median']:.1f}, {d['p95']:.1f}), annulus rows listed {li['mean']:.1f} ({li['median']:.1f}, "
                         f"{li['p95']:.1f}): {li['mean'] / d['mean']:.2f}x; the same answers at every step: "
                         f"{'yes' if v['same_answers'] else 'NO'}")
            L.append("")
        growth = growth_lines(lat)
        if growth:
            L += ["Growth with N (mean ms per step):", *growth, ""]
        L.append("\"RSS after searches / peak\" is the query process before its brute force (whose chunks are not the "
                 "index's); the build peak is the larger of the shard writer's and the index builder's.\n")
    if fea:
        L += [f"## Feature stage alone ({args.feature_shape}-shaped latents' 33 features, float32 in memory)\n",
              "| N | features GB | generation s | check: analytic vs materialised (rel.) | RSS after load MB | backend: "
              "prep s, ms per step mean (median, p95), RSS MB after, misses / extras | candidates per step | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|"]
        for r in fea:
            q, b = r["query"], r["build"]
            be = "; ".join(f"{k}: {v['prep_s']:.1f}, {v['step_ms']['mean']:.1f} ({v['step_ms']['median']:.1f}, "
                           f"{v['step_ms']['p95']:.1f}), {mb(v['rss']['VmRSS'])}, {v['misses']} / {v['extras']}"
                           for k, v in q["backends"].items())
            L.append(f"| {r['n']:,} | {b['feature_bytes'] / 1e9:.2f} | {b['gen_s']:.0f} | {b['check_rel_err']:.1e}, "
                     f"targets {q['materialise_rel_err']:.1e} | {mb(q['rss_after_load']['VmRSS'])} | {be} | "
                     f"{q['candidates_per_step']:.0f} | {mb(q['peak_rss_mb'])} |")
        L.append("\nMisses / extras are against a float64 scan of the same stored features at the squared radius the "
                 "engine is asked for (r·sqrt(D) plus the slack of `ReferenceIndex.candidates`); a scan in float32 may "
                 "disagree only on pairs within rounding of that radius, which the slack keeps far from r itself.\n")
    return "\n".join(L)


def growth_lines(lat: list[dict]) -> list[str]:
    out = []
    for kind in SHAPES:
        rs = sorted((r for r in lat if r["kind"] == kind), key=lambda r: r["n"])
        if len(rs) >= 2:
            a, b = rs[0], rs[-1]
            ta, tb = a["query"]["step_ms"]["mean"], b["query"]["step_ms"]["mean"]
            ex = math.log(tb / ta) / math.log(b["n"] / a["n"]) if ta > 0 and tb > 0 else float("nan")
            out.append(f"- {kind}: {ta:.1f} ms at {a['n']:,} -> {tb:.1f} ms at {b['n']:,} ({b['n'] / a['n']:.0f}x N, "
                       f"{tb / ta:.1f}x time, ~N^{ex:.2f})")
    return out


if __name__ == "__main__":
    sys.exit(main())
