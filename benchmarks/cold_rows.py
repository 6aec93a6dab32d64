"""Cold shard reads: candidate rows read one after the other against announced to the OS first, side by side.

A shielded search ends by reading its candidates' rows from the index's shards (``shards.Shard.take``). When the
shards are not in the page cache (a set larger than the memory, or the first run after a restart), each row is a
random read from disk. ``shards.READ_HINTS = "willneed"`` (the default) announces every run of rows with
POSIX_FADV_WILLNEED before the first read, so the disk serves them concurrently; "none" reads them one after the
other. For each number of rows P this picks random rows of an existing index folder and, alternating the two modes
(the order swapped every trial), drops the shards from the page cache (POSIX_FADV_DONTNEED), times the read of
the P rows (``LatentStore.get_sorted``, what ``ReferenceIndex.range_search`` calls), counts the bytes the process
read from storage (/proc/self/io read_bytes), and times the same read again (warm: what the announcement costs
when the rows are already cached). The same rows go to both modes in a trial. Then whole searches: batches of 8
queries, each a reference plus a perturbation of RMS --planted x r (so it has neighbours and candidates to read),
``ReferenceIndex.range_search`` cold and warm in both modes, answers compared.

    python -m benchmarks.cold_rows --index ../spell-scratch/realres/sd15_n1500000/index --out docs/cold_rows.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spell_core.index import ReferenceIndex, pagecache, shards  # noqa: E402

MODES = ("none", "willneed")


def read_bytes() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def timed(fn):
    b0, t = read_bytes(), time.perf_counter()
    out = fn()
    dt, b1 = time.perf_counter() - t, read_bytes()
    return out, dt, (None if b0 is None or b1 is None else b1 - b0)


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:.2f} ({min(xs) * 1e3:.2f}-{max(xs) * 1e3:.2f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cold_rows", description=__doc__.split("\n")[0])
    ap.add_argument("--index", required=True, help="an index folder with shards on disk (not on tmpfs)")
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 64, 176, 512], help="rows read per call")
    ap.add_argument("--trials", type=int, default=10, help="trials per row count and mode")
    ap.add_argument("--searches", type=int, default=10, help="whole searches (batches of 8) per mode")
    ap.add_argument("--r", type=float, default=0.15, help="radius of the whole searches (RMS)")
    ap.add_argument("--planted", type=float, default=0.5, help="perturbation of the planted queries, x r")
    ap.add_argument("--queries", choices=["planted", "synth"], default="planted",
                    help="whole searches' queries: references plus a perturbation, or (an index of "
                         "benchmarks.index_bench's synthetic latents) fresh draws of its generator, its random queries")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "cold_rows.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    folder = Path(args.index)
    index = ReferenceIndex.load(folder, engine=False)
    files = [s.path for s in index.store.shards]
    if not files:
        raise SystemExit(f"{folder}: its latents are held in memory, not in shards: nothing to read cold")
    pagecache.evict(files)
    left = pagecache.resident_fraction(files)
    if left is None or left > 0.05:
        raise SystemExit(f"the shards cannot be dropped from the page cache here ({left} resident after eviction)")
    size = sum(f.stat().st_size for f in files)
    row_kib = index.store.shards[0].stored.itemsize * index.store.dim / 1024
    print(f"{folder}: {len(index):,} rows of {row_kib:.0f} KiB in {len(files)} shards ({size / 1e9:.1f} GB), "
          f"MemAvailable {(pagecache.mem_available() or 0) / 2**30:.1f} GiB", file=sys.stderr, flush=True)
    rng = np.random.default_rng(args.seed)
    buf = torch.empty(max(args.rows), index.store.dim)
    reads = {}
    t_all = time.time()
    for p in args.rows:
        res = {m: {"cold": [], "warm": [], "bytes": []} for m in MODES}
        for trial in range(args.trials):
            kn = np.unique(rng.choice(len(index), p, replace=False))
            ref = None
            for mode in (MODES if trial % 2 == 0 else MODES[::-1]):
                shards.READ_HINTS = mode
                pagecache.evict(files)
                out, dt, nb = timed(lambda: index.store.get_sorted(kn, buf).clone())
                res[mode]["cold"].append(dt)
                res[mode]["bytes"].append(nb)
                _, dw, _ = timed(lambda: index.store.get_sorted(kn, buf))
                res[mode]["warm"].append(dw)
                if ref is None:
                    ref = out
                elif not torch.equal(ref, out):
                    raise SystemExit(f"modes read different values for the same rows (P={p})")
        reads[p] = res
        print(f"  P={p}: cold ms " + ", ".join(f"{m} {summary(res[m]['cold'])}" for m in MODES)
              + "; warm ms " + ", ".join(f"{m} {summary(res[m]['warm'])}" for m in MODES), file=sys.stderr, flush=True)
    # whole searches, cold then warm, the modes alternating
    g = torch.Generator().manual_seed(args.seed)
    search = {m: {"cold": [], "warm": [], "pairs": 0, "candidates": 0} for m in MODES}
    if args.queries == "synth":
        from benchmarks.index_bench import dataset

        fresh = dataset("synth", len(index), args.seed).queries(8 * args.searches, seed=args.seed + 1)
        if tuple(fresh.shape[1:]) != tuple(index.item_shape):
            raise SystemExit(f"--queries synth makes {tuple(fresh.shape[1:])} latents; the index holds {index.item_shape}")
    for j in range(args.searches):
        if args.queries == "synth":
            x = fresh[8 * j:8 * j + 8]
        else:
            k = torch.randint(0, len(index), (8,), generator=g)
            z = index.get(k).reshape(8, -1)
            e = torch.randn(z.shape, generator=g)
            x = (z + e / e.pow(2).mean(1, keepdim=True).sqrt() * args.planted * args.r).reshape(8, *index.item_shape)
        ncand = len(index.candidates(x.reshape(8, -1), args.r)[0])
        ref = None
        for mode in (MODES if j % 2 == 0 else MODES[::-1]):
            shards.READ_HINTS = mode
            pagecache.evict(files)
            out, dt, _ = timed(lambda: index.range_search(x, args.r))
            _, dw, _ = timed(lambda: index.range_search(x, args.r))
            search[mode]["cold"].append(dt)
            search[mode]["warm"].append(dw)
            search[mode]["pairs"] += len(out[0])
            search[mode]["candidates"] += ncand
            if ref is None:
                ref = out
            elif not all(torch.equal(a, b) for a, b in zip(ref, out)):
                raise SystemExit("modes gave different answers for the same search")
    shards.READ_HINTS = "willneed"
    cmd = "python -m benchmarks.cold_rows " + " ".join(argv if argv is not None else sys.argv[1:])
    res = {"command": cmd, "index": str(folder), "rows": len(index), "row_kib": row_kib, "shards": len(files),
           "shard_gb": round(size / 1e9, 2), "machine": {"cpu": platform.processor() or platform.machine(),
                                                        "cores": os.cpu_count(), "torch": torch.__version__},
           "load_end": Path("/proc/loadavg").read_text().split()[:3], "total_s": round(time.time() - t_all, 1),
           "reads": {str(p): v for p, v in reads.items()}, "searches": search}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.write_text(report(res, args))
    print(report(res, args))
    return 0


def report(res: dict, args) -> str:
    m = res["machine"]
    lines = [
        "# Cold shard reads: one after the other against announced first (POSIX_FADV_WILLNEED)", "",
        f"Made by `{res['command']}` on {m['cpu']}, {m['cores']} CPU cores, torch {m['torch']}, torch threads 1, "
        f"load average at the end {' '.join(res['load_end'])}; {res['total_s']:.0f} s; raw numbers in "
        f"`{Path(args.out).with_suffix('.json').name}`.", "",
        f"Index: {res['rows']:,} references of {res['row_kib']:.0f} KiB ({res['shards']} shards, {res['shard_gb']} GB), "
        "the shards dropped from the page cache (POSIX_FADV_DONTNEED) before every cold call. Per row count, random rows "
        "(the same for both modes in a trial, the order of the modes swapped every trial) read by "
        "``LatentStore.get_sorted`` as ``ReferenceIndex.range_search`` reads its candidates; warm: the same call "
        "again at once. none: one positioned read per run of rows, one after the other; willneed (the default): every "
        "run announced with POSIX_FADV_WILLNEED first.",
        "", "| rows read | cold ms, none: median (min-max) | cold ms, willneed | cold ratio none / willneed | "
            "MB read from storage, none / willneed | warm ms, none | warm ms, willneed | warm ratio |",
        "|---|---|---|---|---|---|---|---|"]
    for p, r in res["reads"].items():
        cn, cw = statistics.median(r["none"]["cold"]), statistics.median(r["willneed"]["cold"])
        wn, ww = statistics.median(r["none"]["warm"]), statistics.median(r["willneed"]["warm"])
        mb = [statistics.median(b for b in r[mo]["bytes"] if b is not None) / 1e6 if any(
            b is not None for b in r[mo]["bytes"]) else float("nan") for mo in MODES]
        lines.append(f"| {p} | {summary(r['none']['cold'])} | {summary(r['willneed']['cold'])} | {cn / cw:.2f}x | "
                     f"{mb[0]:.2f} / {mb[1]:.2f} | {summary(r['none']['warm'])} | {summary(r['willneed']['warm'])} | "
                     f"{wn / ww:.2f}x |")
    s = res["searches"]
    what = ("planted queries (a reference plus a perturbation of RMS "
            f"{args.planted} r)" if args.queries == "planted" else
            "fresh queries (new draws of benchmarks.index_bench's generator, as its random queries)")
    ns = len(s['none']['cold'])
    lines += ["", f"Whole searches (``ReferenceIndex.range_search``, batches of 8 {what}, r = {args.r}, "
                  f"{ns} per mode, {s['none']['candidates'] / max(ns, 1):.0f} candidate rows per search, "
                  f"pairs found {s['none']['pairs']} / {s['willneed']['pairs']}, "
                  "the same answers in both modes): cold ms none "
                  f"{summary(s['none']['cold'])}, willneed {summary(s['willneed']['cold'])} "
                  f"({statistics.median(s['none']['cold']) / statistics.median(s['willneed']['cold']):.2f}x); warm ms "
                  f"none {summary(s['none']['warm'])}, willneed {summary(s['willneed']['warm'])}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
