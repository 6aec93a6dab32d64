"""What a Milvus request costs, and whether routing a shield's queries to partitions could cut it (issue 13).

    .venv/bin/python -m benchmarks.engine_partitions [--sizes 200000 1200000] [--partitions 256]

The engine (``spell_core/index/engine.py``) sends every request to one milvus-lite FLAT collection of the 33
lower-bound features per reference; docs/engine_e2e.md measured 263x the local index's per-image cost on the
demo's 1.2 M shield. Two measurements decide whether partitions (the way Milvus prunes a search) could close that:

A. milvus-lite's cost per request, side by side in one process: a range search of B = 8 queries (limit 16, the
   engine's first page) over N random 33-dim features in one collection; one query; and the same N split into
   --partitions explicit partitions, searched through 1, 5, 20 and 50 of them (``partition_names``).
B. How many partitions a shield's requests would touch: queries recorded from the demo model's sampling with SPELL
   and the 1.2 M shield of ``benchmarks.shield_e2e`` (2 seeds x 20 model calls, batch 8, r as there: 0.1648), the
   cascade's exact stage-1 liveness (a cell is live when ||q − c|| − its radius ≤ r·sqrt(D)), and the live cells
   grouped into --geometry-partitions partitions: k-means of the cell centres (near cells together), or ranges of cell ids.
   Skipped when the shield's index folder has not been built (run benchmarks.shield_e2e first).
Writes docs/engine_partitions.md and .json.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.shield_e2e import BATCH, CFG, STEPS, machine_facts  # noqa: E402

DIM = 33
PAGE = 16
SHIELD_R = 0.1648  # docs/shield_e2e.md's r for the demo's 1.2 M shield
REPEATS = 5


def timed(f, repeats=REPEATS) -> dict:
    f()  # the first call pays one-off costs
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(1000 * (time.perf_counter() - t))
    return {"median_ms": round(statistics.median(ts), 1), "min_ms": round(min(ts), 1)}


def request_costs(n: int, partitions: int, work: Path) -> dict:
    from pymilvus import DataType, MilvusClient

    rng = np.random.default_rng(0)
    y = rng.standard_normal((n, DIM)).astype(np.float32)
    q = list(y[:BATCH] + 0.01)
    sp = {"metric_type": "L2", "params": {"radius": 1.0}}
    out = {"n": n, "partitions": partitions}

    def collection(uri, parts):
        client = MilvusClient(uri=str(uri))
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("y", DataType.FLOAT_VECTOR, dim=DIM)
        params = client.prepare_index_params()
        params.add_index("y", index_type="FLAT", metric_type="L2")
        client.create_collection("t", schema=schema, index_params=params)
        t = time.perf_counter()
        groups = np.arange(n) % max(parts, 1)
        for p in range(max(parts, 1)):
            name = f"p{p}" if parts else None
            if name:
                client.create_partition("t", name)
            rows = np.nonzero(groups == p)[0]
            for a in range(0, len(rows), 20000):
                client.insert("t", [{"id": int(k), "y": y[k]} for k in rows[a:a + 20000]], partition_name=name or "")
        client.flush("t")
        client.load_collection("t")
        return client, time.perf_counter() - t

    client, up = collection(work / f"plain_{n}.db", 0)
    out["upload_s"] = round(up, 1)
    out["one_collection_8_queries"] = timed(lambda: client.search("t", data=q, anns_field="y", limit=PAGE,
                                                                 search_params=sp, output_fields=["id"]))
    out["one_collection_1_query"] = timed(lambda: client.search("t", data=q[:1], anns_field="y", limit=PAGE,
                                                               search_params=sp, output_fields=["id"]))
    client.close()
    print(f"  N={n:,}: one collection {out['one_collection_8_queries']['median_ms']} ms", file=sys.stderr, flush=True)
    client, up = collection(work / f"parts_{n}.db", partitions)
    out["upload_partitioned_s"] = round(up, 1)
    out["through_partitions"] = {}
    for k in [k for k in (1, 5, 20, 50) if k <= partitions]:
        names = [f"p{p}" for p in range(k)]
        out["through_partitions"][k] = timed(lambda: client.search(
            "t", data=q, anns_field="y", limit=PAGE, search_params=sp, output_fields=["id"], partition_names=names))
        print(f"  N={n:,}: {k} of {partitions} partitions {out['through_partitions'][k]['median_ms']} ms",
              file=sys.stderr, flush=True)
    client.close()
    return out


def recorded_queries(base: Path, folder: str):
    """x̂0 of every model call of 2 seeds of the demo's shielded sampling (batch 8, 20 steps), as the index sees
    them."""
    from tools import comfy_host

    comfy = comfy_host.start(str(base))
    nodes = comfy.NODE_CLASS_MAPPINGS
    model, _, prompts = nodes["SpellDemoModelLoader"]().load()
    encode = nodes["SpellDemoClassPrompt"]().encode
    pos, neg = encode(prompts, "any digit")[0], encode(prompts, "(empty)")[0]
    refs, _ = nodes["SpellProtectedSetLoader"]().load("(none)", folder, 64, 64, "center crop")
    index, qs = refs.index, []
    search = index.range_search

    def record(x, r, *a, **k):
        qs.append(x.detach().clone())
        return search(x, r, *a, **k)

    index.range_search = record
    patched = nodes["SpellRepellency"]().patch(model, SHIELD_R, 1.6, "off", 0.0, 1.0, True, references=refs)[0]
    for seed in (1, 2):
        comfy.common_ksampler(patched, seed, STEPS, CFG, "euler", "normal", pos, neg,
                              {"samples": torch.zeros(BATCH, 4, 8, 8)})
    index.range_search = search
    return index, qs


def partitions_touched(index, qs, counts: list) -> dict:
    from spell_core.index.cells import kmeans

    sc = index.subcells
    sizes = (sc.off[1:] - sc.off[:-1]).double()
    n, cells = float(sizes.sum()), len(sc.cp)
    live = []
    for x in qs:
        xf = x.reshape(len(x), -1).double()
        pq, rq2 = sc.project(xf)
        d = (torch.cdist(pq, sc.cp.double()).pow(2) + rq2[:, None]).sqrt()
        t = SHIELD_R * math.sqrt(xf.shape[1]) * (1 + 1e-6)
        live.append(((d - sc.radius[None]) <= t).any(0))
    out = {"calls": len(qs), "cells": cells, "rows": int(n),
           "live_cells_per_call": round(float(torch.stack([l.sum() for l in live]).double().mean()), 1),
           "rows_in_live_cells_per_call": round(float(torch.stack([sizes[l].sum() for l in live]).mean()), 1)}
    out["groupings"] = []
    for partitions in counts:
        near = kmeans(sc.cp.float(), partitions, 0)[1]
        ranges = torch.arange(cells) * partitions // cells
        for name, group in (("k-means of the centres", near), ("ranges of cell ids", ranges)):
            rows = torch.zeros(partitions, dtype=torch.float64).index_add_(0, group, sizes)
            touched = [torch.unique(group[l]) for l in live]
            out["groupings"].append({"partitions": partitions, "grouping": name,
                                     "per_call": round(statistics.mean(len(g) for g in touched), 1),
                                     "max": max(len(g) for g in touched),
                                     "share_of_rows": round(statistics.mean(float(rows[g].sum()) / n for g in touched), 3)})
    return out


def report(res: dict, argv: list) -> str:
    L = [f"# Milvus requests and partitions (issue 13)\n",
         f"Made by `{' '.join(['python -m benchmarks.engine_partitions', *argv])}` on {res['machine']['machine']}, torch threads "
         f"{res['machine']['threads']}, load average at the end {' '.join(res['machine']['loadavg'])}; raw numbers in "
         f"`engine_partitions.json`. What is measured: the module docstring of `benchmarks/engine_partitions.py`.\n",
         "## A. milvus-lite's cost per request (random 33-dim features, range search, limit 16)\n",
         "| N | upload s | 8 queries, one collection ms | 1 query ms | " +
         " | ".join(f"8 queries through {k} of {res['partitions']} partitions ms" for k in res["requests"][0]["through_partitions"])
         + " |", "|" + "---|" * (4 + len(res["requests"][0]["through_partitions"]))]
    for r in res["requests"]:
        L.append(f"| {r['n']:,} | {r['upload_s']} | {r['one_collection_8_queries']['median_ms']} | "
                 f"{r['one_collection_1_query']['median_ms']} | "
                 + " | ".join(str(v["median_ms"]) for v in r["through_partitions"].values()) + " |")
    L.append(f"\nMedians of {REPEATS} requests after a first one.\n")
    g = res.get("geometry")
    if g is None:
        L.append("## B. skipped: the demo's 1.2 M shield index folder was not found (run benchmarks.shield_e2e).")
    else:
        L += ["## B. Partitions the demo shield's requests would touch\n",
              f"{g['calls']} range searches recorded (batch 8; the model calls and each run's final enforcement), "
              f"{g['cells']:,} cascade cells over {g['rows']:,} references, r = {SHIELD_R}: "
              f"{g['live_cells_per_call']:.0f} live cells per call, holding {g['rows_in_live_cells_per_call']:,.0f} "
              f"rows ({100 * g['rows_in_live_cells_per_call'] / g['rows']:.1f} %).\n",
              "| partitions | grouping of the cells | partitions touched per call (max) | share of all rows in them |",
              "|---|---|---|---|"]
        for row in g["groupings"]:
            L.append(f"| {row['partitions']} | {row['grouping']} | {row['per_call']} ({row['max']}) | "
                     f"{100 * row['share_of_rows']:.1f} % |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_200_000])
    ap.add_argument("--partitions", type=int, default=256)
    ap.add_argument("--geometry-partitions", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--base", default=str(ROOT / "scratch" / "shield_e2e"), help="benchmarks.shield_e2e's base dir")
    ap.add_argument("--out", default=str(ROOT / "docs" / "engine_partitions.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    res = {"partitions": args.partitions, "requests": []}
    with tempfile.TemporaryDirectory(prefix="spell-milvus-") as work:
        for n in args.sizes:
            res["requests"].append(request_costs(n, args.partitions, Path(work)))
    folder = "demo_digits_1200000"
    if (Path(args.base) / "models" / "spell_sets" / folder / "index.safetensors").is_file():
        index, qs = recorded_queries(Path(args.base), folder + "/")
        res["geometry"] = partitions_touched(index, qs, args.geometry_partitions)
    res["machine"] = machine_facts()
    out = Path(args.out)
    out.write_text(report(res, argv))
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
