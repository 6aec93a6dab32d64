"""Benchmark of spell_core.index: exact range search for SPELL at shield sizes up to ImageNet's 1.2 M.

    python -m benchmarks.index_bench --sizes 10000 100000 1200000

Synthetic SD-shaped latents [4, 32, 32] with structure like real latents (see ``Synth``), written as
float32 safetensors shards under --scratch (resumable), indexed, then queried with B = 8 per step by
the default exact backend ("cascade"), the exact flat scans ("torch", "faiss"), brute force over the full
latents, and an approximate faiss IVF index. Misses are
counted against an exact brute force over all N. Each size runs its build and its queries in fresh
subprocesses so resident memory is the index's own. Results go to a table on stdout and --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spell_core.index import ReferenceIndex, build_shards
from spell_core.repellency import rms_cdist

B = 8
SHAPE = (4, 32, 32)
CHANNEL_MEAN = torch.tensor([0.6, -0.2, 0.3, -0.4])  # SD-like per-channel offsets (PCA centres them)


class Synth:
    shape = SHAPE

    """Clustered smooth fields: N / 100 clusters ("scenes"), sizes ∝ lognormal(0, 1) weights.

    A cluster is a 4×8×8 N(0, 1) centre; a member is up(centre + s·ε₈) + up(0.5·s·ε₁₆) + 0.08·ε₃₂ + channel
    mean, with ε_h ~ N(0, 1) at h×h, bilinear upsampling to 32×32 and a per-cluster spread s = 0.35·lognormal(0, 0.4).
    So most energy is spatially smooth (as in VAE latents) with a small high-frequency residue.
    """

    def __init__(self, n: int, seed: int = 0, cluster_size: int = 100):
        g = np.random.default_rng(seed)
        self.n, self.seed = n, seed
        c = max(1, n // cluster_size)
        w = g.lognormal(0, 1, c)
        self.weights = w / w.sum()
        self.centres = torch.from_numpy(g.standard_normal((c, 4, 8, 8)).astype(np.float32))
        self.spread = torch.from_numpy((0.35 * g.lognormal(0, 0.4, c)).astype(np.float32))
        self.assign = torch.from_numpy(g.choice(c, n, p=self.weights))

    def members(self, cells: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = len(cells)
        s = self.spread[cells].view(n, 1, 1, 1)
        low = self.centres[cells] + s * torch.randn(n, 4, 8, 8, generator=gen)
        mid = 0.5 * s * torch.randn(n, 4, 16, 16, generator=gen)
        up = lambda t: F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False)
        return up(low) + up(mid) + 0.08 * torch.randn(n, *SHAPE, generator=gen) + CHANNEL_MEAN.view(1, 4, 1, 1)

    def source(self, block: int):
        """source(start) for build_shards: deterministic blocks, so an interrupted write resumes identically."""
        def gen(start: int):
            for a in range(start, self.n, block):
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + a // block)
                yield self.members(self.assign[a:a + block], g)
        return gen

    def queries(self, m: int, seed: int) -> torch.Tensor:
        """m fresh members of clusters drawn by weight: "new images of the same distribution"."""
        g = np.random.default_rng(seed)
        cells = torch.from_numpy(g.choice(len(self.weights), m, p=self.weights))
        return self.members(cells, torch.Generator().manual_seed(seed))


def dataset(kind: str, n: int, seed: int):
    """The references and fresh queries of a benchmark run: synthetic SD-shaped latents or demo digits."""
    if kind == "demo":
        from benchmarks.demo_digits import DemoDigits

        return DemoDigits(n, seed)
    return Synth(n, seed)


def calibrate_r(seed: int = 7, m: int = 400, quantile: float = 0.03) -> float:
    """r such that ~quantile of fresh queries have a neighbour in their own cluster (N-independent: cluster
    sizes do not grow with N). Simulated with a 100k-structure Synth and each query's cluster regenerated."""
    s = Synth(100_000, seed=seed)
    g = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    nn = []
    for c in g.choice(len(s.weights), m, p=s.weights):
        size = max(1, g.poisson(s.n * s.weights[c]))
        z = s.members(torch.full((size + 1,), int(c)), gen).reshape(size + 1, -1)
        nn.append(float(rms_cdist(z[:1], z[1:]).min()))
    return float(np.quantile(nn, quantile))


def planted(index: ReferenceIndex, m: int, r: float, seed: int) -> torch.Tensor:
    """m queries inside the shield: a random reference plus a smooth-plus-white perturbation of RMS u·r, u ∈ [0.3, 0.95]."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, len(index), (m,), generator=g)
    z = index.get(k)
    shape = tuple(z.shape[1:])
    low = torch.randn(m, shape[0], max(1, shape[1] // 4), max(1, shape[2] // 4), generator=g)
    e = F.interpolate(low, size=shape[1:], mode="bilinear") + 0.3 * torch.randn(m, *shape, generator=g)
    e = e / e.reshape(m, -1).pow(2).mean(1).sqrt().view(m, 1, 1, 1)
    u = 0.3 + 0.65 * torch.rand(m, generator=g)
    return z + u.view(m, 1, 1, 1) * r * e


def rss() -> dict:
    """Resident memory in MB from /proc/self/status (anonymous and file-backed, e.g. mapped shards)."""
    out = {}
    for line in open("/proc/self/status"):
        key, *v = line.split()
        if key in ("VmRSS:", "RssAnon:", "RssFile:", "VmHWM:"):
            out[key[:-1]] = int(v[0]) / 1024
    return out


def pair_dist(xf: torch.Tensor, i: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """rms_cdist(xf[i_p], z_p) for each pair p, one rms_cdist call per distinct query."""
    d = torch.empty(len(i))
    for q in torch.unique(i).tolist():
        sel = torch.nonzero(i == q).flatten()
        d[sel] = rms_cdist(xf[q:q + 1], z[sel])[0]
    return d


def brute_force(index: ReferenceIndex, x: torch.Tensor, r: float, chunk: int = 32768):
    """Exact pairs with RMS distance < r over all N full latents, streamed: float32 matmul distances with a
    margin of 1e-3·(|x|² + |z|²) (10× the worst-case float32 error bound for D = 4096), then every pair under
    the margin recomputed with rms_cdist. Returns a set of (i, k)."""
    xf = x.reshape(len(x), -1).float()
    x2 = (xf * xf).sum(1, keepdim=True)
    big = r * r * xf.shape[1]
    pairs = set()
    for a, z in index.store.chunks(chunk):
        z2 = (z * z).sum(1)[None]
        d2 = torch.addmm(x2 + z2, xf, z.T, alpha=-2)
        i, k = torch.nonzero(d2 < big + 1e-3 * (x2 + z2), as_tuple=True)
        if len(i):
            d = pair_dist(xf, i, z[k])
            for ii, kk in zip(i[d < r].tolist(), k[d < r].tolist()):
                pairs.add((ii, kk + a))
    return pairs


CPU_MS: list = []  # thread CPU seconds per step of the last timed_steps call


def timed_steps(fn, x: torch.Tensor) -> tuple[list[float], set]:
    """Runs fn on consecutive batches of B queries -> (wall seconds per step, set of (query, k)); the calling
    thread's CPU seconds per step go to CPU_MS (all the work with --threads 1: immune to other jobs' load)."""
    times, cpu, pairs = timed_pair({"fn": fn}, x)
    CPU_MS[:] = cpu["fn"]
    return times["fn"], pairs["fn"]


def faiss_ivf(index: ReferenceIndex, nprobe: int):
    """Approximate baseline: faiss IndexIVFFlat on the same features, nprobe lists, exact recheck of hits."""
    import faiss

    y = index.y if index.order is None else index.y[torch.argsort(index.order)]
    y = np.ascontiguousarray(y.numpy())
    nlist = int(4 * math.sqrt(len(y)))
    t = time.perf_counter()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(y.shape[1]), y.shape[1], nlist)
    g = np.random.default_rng(0)
    ivf.train(y[g.choice(len(y), min(len(y), 64 * nlist), replace=False)])
    ivf.add(y)
    ivf.nprobe = nprobe
    build = time.perf_counter() - t

    def search(xb, r):
        xf = xb.reshape(len(xb), -1).float()
        q, xn = index.features(xf)
        tt = r * math.sqrt(xf.shape[1]) + 1e-4 * (float(xn.max()) + index.znorm_max + float(q.norm(dim=1).max()) + index.ynorm_max)
        lims, _, k = ivf.range_search(np.ascontiguousarray(q.float().numpy()), tt * tt)
        i = torch.repeat_interleave(torch.arange(len(xb)), torch.from_numpy(np.diff(lims).astype(np.int64)))
        k = torch.from_numpy(k.astype(np.int64))
        if len(k) == 0:
            return i, k
        z = index.store.get(k)
        d = pair_dist(xf, i, z)
        return i[d < r], k[d < r]

    return search, build, nlist


def loadavg() -> str:
    """1-minute load average (the machine is shared: other jobs' CPU use shows up here)."""
    return open("/proc/loadavg").read().split()[0]


def ms(v) -> str:
    return f"{1000 * float(np.mean(v)):.1f}"


def worker_build(args) -> dict:
    files = json.loads(Path(args.data, "manifest.json").read_text())["shards"]
    t = time.perf_counter()
    index = ReferenceIndex.build([Path(args.data) / f for f in files], backend="cascade", dim=args.dim)
    build = time.perf_counter() - t
    index.save(args.data)
    return {"build_s": build, "peak_rss_mb": rss()["VmHWM"], "cells": len(index.subcells.cp)}


def timed_pair(fns: dict, x: torch.Tensor) -> tuple[dict, dict, dict]:
    """The functions in fns run on the same consecutive batches, alternating at every step (so the machine's state
    and the page cache favour neither) -> per name: wall seconds per step, thread CPU seconds per step, pairs."""
    times, cpu, pairs = {k: [] for k in fns}, {k: [] for k in fns}, {k: set() for k in fns}
    for a in range(0, len(x), B):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.thread_time()
            i, kk = fn(x[a:a + B])
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.thread_time() - c)
            pairs[k] |= {(ii + a, j) for ii, j in zip(i.tolist(), kk.tolist())}
    return times, cpu, pairs


def worker_query(args) -> dict:
    torch.set_num_threads(getattr(args, "threads", 1) or 1)
    torch.manual_seed(0)
    t = time.perf_counter()
    index = ReferenceIndex.load(args.data)
    load = time.perf_counter() - t
    n, r = len(index), args.r
    synth = dataset(args.kind, n, args.seed)
    sets = {"random": synth.queries(args.queries, seed=args.seed + 1), "planted": planted(index, args.planted, r, args.seed + 2)}
    res = {"n": n, "r": r, "load_s": load, "rss_base": rss(), "load_before": loadavg(),
           "threads": torch.get_num_threads()}
    exact = lambda idx: (lambda xb: idx.range_search(xb, r)[:2])
    if index.subcells is not None:
        index.subcells.centre_product()  # its one-off probe (float32 or bfloat16) outside the timed steps
    found = {}
    for name, x in sets.items():  # the default exact index first, so its memory is measured alone
        times, pairs = timed_steps(exact(index), x)
        cand = annulus = 0
        for a in range(0, len(x), B):
            cand += len(index.candidates(x[a:a + B].reshape(len(x[a:a + B]), -1), r)[0])
            annulus += index.subcells.scanned
        res[f"cascade_{name}"] = {"ms": ms(times), "p95": f"{1000 * np.quantile(times, 0.95):.1f}",
                                  "median": f"{1000 * np.median(times):.1f}", "cpu_ms": ms(CPU_MS),
                                  "cand_per_step": cand / len(times), "annulus_per_step": annulus / len(times),
                                  "pairs": len(pairs), "hit_frac": len({i for i, _ in pairs}) / len(x)}
        found[("cascade", name)] = pairs
    res["rss_cascade"] = rss()
    # stage 1's centre product as chosen (res["centre_product"]) against float32, alternating step by step
    res["centre_product"] = index.subcells.product if index.subcells is not None else None
    if index.subcells is not None:
        chosen, sc = index.subcells.product, index.subcells

        def with_product(product):
            def fn(xb):
                sc.product = product
                if product == "bfloat16" and sc._bf16 is None:
                    sc._bf16 = sc.cp.to(torch.bfloat16)
                return index.range_search(xb, r)[:2]
            return fn

        for name, x in sets.items():
            times, cpu, pairs = timed_pair({"chosen": with_product(chosen), "float32": with_product("float32")}, x)
            res[f"cascadepair_{name}"] = {"ms": ms(times["chosen"]), "cpu_ms": ms(cpu["chosen"])}
            res[f"cascade32_{name}"] = {"ms": ms(times["float32"]), "cpu_ms": ms(cpu["float32"])}
            found[("cascade32", name)] = pairs["float32"]
            found[("cascadepair", name)] = pairs["chosen"]
        sc.product = chosen
    for be in ("torch", "faiss"):
        other = index.with_backend(be)
        for name, x in sets.items():
            times, pairs = timed_steps(exact(other), x)
            res[f"{be}_{name}"] = {"ms": ms(times), "cpu_ms": ms(CPU_MS)}
            found[(be, name)] = pairs
        del other
    search, ivf_build, nlist = faiss_ivf(index, args.nprobe)
    res["ivf_build_s"], res["ivf_nlist"] = ivf_build, nlist
    for name, x in sets.items():
        times, pairs = timed_steps(lambda xb: search(xb, r), x)
        res[f"ivf_{name}"] = {"ms": ms(times), "cpu_ms": ms(CPU_MS)}
        found[("ivf", name)] = pairs
    # brute force: per-step time on a few steps, and the exact truth for every query in one pass
    for name, x in sets.items():
        steps = args.brute_steps
        t, c = time.perf_counter(), time.thread_time()
        for a in range(0, steps * B, B):
            brute_force(index, x[a:a + B], r)
        res[f"brute_{name}"] = {"ms": f"{1000 * (time.perf_counter() - t) / steps:.1f}",
                                "cpu_ms": f"{1000 * (time.thread_time() - c) / steps:.1f}"}
        truth = brute_force(index, x, r)
        res[f"truth_{name}"] = len(truth)
        for be in ("cascade", "cascadepair", "cascade32", "torch", "faiss", "ivf"):
            if (be, name) not in found:
                continue
            got = found[(be, name)]
            res[f"{be}_{name}"]["misses"] = len(truth - got)
            res[f"{be}_{name}"]["false_pos"] = len(got - truth)
    res["load_after"] = loadavg()
    return res


def run(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.index_bench", *cmd], check=True, stdout=subprocess.PIPE,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(rows: list[dict], r: float) -> str:
    def wc(res, key):  # "wall / CPU" ms
        v = res[key]
        return f"{v['ms']} / {v['cpu_ms']}" if "cpu_ms" in v else v["ms"]

    def ratio(res, key, name):
        v, c = res[key], res[f"cascade_{name}"]
        k = "cpu_ms" if "cpu_ms" in v and "cpu_ms" in c else "ms"
        return float(v[k]) / float(c[k])

    head = ("| N | build s | RSS MB (anon+file) | load avg before/after | queries | exact cascade ms/step wall: mean "
            "(median, p95) | cascade CPU ms/step | stage 1 product | alternating step by step: that product / float32, "
            "ms wall / CPU (misses) | annulus rows / candidates per step | exact torch flat ms wall / CPU | "
            "exact faiss flat ms wall / CPU | brute force ms wall / CPU | faiss IVF approx ms wall / CPU | "
            "cascade speed-up (CPU) vs brute / torch flat / IVF | misses cascade / torch / faiss | "
            "IVF misses (of true pairs) | queries with neighbours |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for res in rows:
        for name in ("random", "planted"):
            c = res[f"cascade_{name}"]
            mem = res["rss_cascade"]
            lines.append(
                f"| {res['n']:,} | {res['build_s']:.0f} | {mem['RssAnon']:.0f}+{mem['RssFile']:.0f} | "
                f"{res.get('load_before', '?')} / {res.get('load_after', '?')} | {name} | "
                f"{c['ms']} ({c['median']}, {c['p95']}) | {c.get('cpu_ms', '?')} | {res.get('centre_product') or 'float32'} | "
                + (f"{wc(res, f'cascadepair_{name}')} ({res[f'cascadepair_{name}']['misses']}) / "
                   f"{wc(res, f'cascade32_{name}')} ({res[f'cascade32_{name}']['misses']}) | " if f"cascade32_{name}" in res
                   else "– | ")
                + f"{c['annulus_per_step']:.0f} / {c['cand_per_step']:.0f} | "
                f"{wc(res, f'torch_{name}')} | {wc(res, f'faiss_{name}')} | {wc(res, f'brute_{name}')} | "
                f"{wc(res, f'ivf_{name}')} | {ratio(res, f'brute_{name}', name):.0f}× / "
                f"{ratio(res, f'torch_{name}', name):.1f}× / {ratio(res, f'ivf_{name}', name):.1f}× | "
                f"{c['misses']} / {res[f'torch_{name}']['misses']} / {res[f'faiss_{name}']['misses']} | "
                f"{res[f'ivf_{name}']['misses']} of {res[f'truth_{name}']} | {100 * c['hit_frac']:.1f} % |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.index_bench")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_200_000])
    ap.add_argument("--scratch", default="scratch/index_bench", help="shard folder (git-ignored), reused across runs")
    ap.add_argument("--out", default="docs/index_benchmark.md")
    ap.add_argument("--queries", type=int, default=256, help="random queries (steps of 8)")
    ap.add_argument("--planted", type=int, default=64, help="queries planted inside the shield")
    ap.add_argument("--dim", type=int, default=32, help="PCA dimensions of the lower-bound features")
    ap.add_argument("--nprobe", type=int, default=8, help="lists probed by the approximate IVF baseline")
    ap.add_argument("--brute-steps", type=int, default=1, help="steps timed for brute force")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kind", choices=["synth", "demo"], default="synth",
                    help="synth: SD-shaped synthetic latents; demo: augmented demo digits (benchmarks/demo_digits.py)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the query worker (1: on a shared machine more threads spin at barriers)")
    ap.add_argument("--reuse-builds", action="store_true",
                    help="reuse an index already saved under --scratch (build numbers from the --out json)")
    ap.add_argument("--merge", action="store_true", help="keep rows of other sizes from the existing --out json")
    ap.add_argument("--r", type=float, default=None, help="radius (default: calibrated, ~3 %% of queries hit)")
    ap.add_argument("--worker", choices=["build", "query"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        fn = worker_build if args.worker == "build" else worker_query
        print(json.dumps(fn(args)))
        return 0
    torch.set_num_threads(os.cpu_count() or 1)
    if args.kind == "demo" and not args.r:
        ap.error("--kind demo needs --r (e.g. the radius docs/shield_e2e.md calibrated on the demo model)")
    r = args.r or calibrate_r()
    print(f"r = {r:.4f} (RMS)", file=sys.stderr)
    rows, prior = [], {}
    jpath = Path(args.out).with_suffix(".json")
    if (args.merge or args.reuse_builds) and jpath.is_file():
        prior = {row["n"]: row for row in json.loads(jpath.read_text())["rows"]}
    for n in args.sizes:
        data = Path(args.scratch) / (f"n{n}" if args.kind == "synth" else f"{args.kind}_n{n}")
        synth = dataset(args.kind, n, args.seed)
        t = time.perf_counter()
        build_shards(synth.source(16384), data, shard_size=16384, total=n, bar=True)
        gen = time.perf_counter() - t
        common = ["--data", str(data), "--dim", str(args.dim), "--seed", str(args.seed), "--kind", args.kind]
        if args.reuse_builds and n in prior and (data / "index.safetensors").is_file():
            b = {k: prior[n][k] for k in ("build_s", "peak_rss_mb", "cells")}
        else:
            print(f"[N={n:,}] building index", file=sys.stderr)
            b = run(["--worker", "build", *common])
        print(f"[N={n:,}] built in {b['build_s']:.1f} s; querying", file=sys.stderr)
        q = run(["--worker", "query", *common, "--r", str(r), "--queries", str(args.queries), "--planted",
                 str(args.planted), "--nprobe", str(args.nprobe), "--brute-steps", str(args.brute_steps),
                 "--threads", str(args.threads)])
        rows.append({**b, **q, "gen_s": gen})
        print(json.dumps(rows[-1]), file=sys.stderr)
        print(table(rows, r))
    cmd = "python -m benchmarks.index_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.merge:
        rows = sorted([row for n, row in prior.items() if n not in args.sizes] + rows, key=lambda row: row["n"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"r": r, "rows": rows}, indent=1))
    Path(args.out).write_text(report(rows, r, cmd, args))
    print(table(rows, r))
    return 0


DATA_TEXT = {
    "synth": f"""Data: synthetic SD-shaped latents {SHAPE} (see `benchmarks/index_bench.py: Synth`): N / 100 clusters with
lognormal sizes; a member is a bilinearly upsampled 8×8 field (cluster centre plus per-cluster spread) plus an
upsampled 16×16 detail field plus 0.08 white noise, so most energy is spatially smooth as in VAE latents.""",
    "demo": """Data: the demo model's training digits, augmented to N (`benchmarks/demo_digits.py`: rotation ±12°, scale
±10 %, shift ±1.2 px, contrast, pixel noise) and encoded by the demo VAE to [4, 8, 8] latents; random queries are
fresh augmentations of the held-out digits.""",
}
R_TEXT = {
    "synth": ", calibrated so about 3 % of fresh queries from the same distribution have a neighbour",
    "demo": ", the shield radius `docs/shield_e2e.md` calibrated on the demo model's own samples",
}


def report(rows, r, cmd, args) -> str:
    import platform

    return f"""# Exact range search for SPELL: index benchmark

Made by `{cmd}` on {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch
{torch.__version__}; raw numbers in `{Path(args.out).with_suffix('.json').name}`.

{DATA_TEXT[args.kind]} Stored
as float32 safetensors shards, read with positioned reads. Queries per step: B = {B}. r = {r:.4f} (RMS){R_TEXT[args.kind]};
"planted" queries are a reference plus a perturbation of RMS 0.3 r to 0.95 r, so every one of them is inside the
shield.

Index (`backend="cascade"`, the default): k-means cells whose centres lie in the top-256 PCA subspace, so
distances to them are exact full-space distances; the triangle inequality cuts each cell to an annulus
(stage 1), the PCA-{args.dim} feature bound (33 floats a row) and the 256-dim PCA bound plus residual norm on
float16 coordinates prune its survivors (stage 2), then an exact float32 recheck of the candidates read from the
shards. Cells: two-level k-means (N / 64 cells) on the 256-dim coordinates, cells wider than 2× the median
reference-to-centre distance re-clustered into ~8-row cells, down to pairs (6 rounds).
Misses are counted against an exact brute force over all N full latents (float32 matmul with a margin 10× the
worst-case float error, every pair under the margin recomputed with `rms_cdist`). "faiss IVF approx" is
IndexIVFFlat on the PCA-{args.dim} features with nprobe = {args.nprobe}, the kind of approximate search the paper used.
Every method runs in the same query process with torch threads = {rows[-1].get("threads", "?") if rows else "?"};
"wall" is elapsed time per step of B = {B} (it includes waiting for the CPU while other jobs run), "CPU" is the
query thread's CPU time per step (`time.thread_time`), the cost of the method itself. Build time is for the
features and cells from the shards (shard writing not included); RSS is the query process after the exact
cascade searches (anonymous + file-backed; shard rows are read with `pread`, so they stay in the page cache,
not in the process). The load average (`/proc/loadavg`, 2 cores) is sampled before and after each query run.

{table(rows, r)}
"""


if __name__ == "__main__":
    sys.exit(main())
