"""What one request to a Milvus server costs, and what the engine's settings do to it (issue 13).

    .venv/bin/python -m benchmarks.engine_server --uri http://127.0.0.1:19530 [--sizes 200000 1200000]

A server, unlike milvus-lite, is not in requirements-dev.txt: ``pip install milvus==2.3.5`` into a venv of its own
brings Milvus 2.3.5's server binary packaged to run standalone, with embedded etcd and local storage
(``milvus-server --data DIR`` serves 19530; it reports its version as v2.3.5-lite). For each N, N random 33-dim features (the
engine's lower-bound features have 33 floats) go into a fresh FLAT collection with an INT64 ``cell`` field (55
consecutive rows a cell, STL_SORT-indexed, as a cascade's cells of about that size would lie), and B = 8 queries
near 8 of the rows are timed, side by side in one process (median of 5 after a first call):
A. the search as soon as the upload is flushed and loaded, and after the engine's wait (``_wait_for_index``: the
   FLAT index built and every row in a sealed segment of the query nodes);
B. consistency: Strong (the client's default) against Bounded (what the engine sends) and Eventually;
C. the limit (hits asked for per query): 16 (milvus-lite's page), 1,024 (a server's), 16,384 (the cap); with
   short answers (the radius of the first query's 16th nearest row: about 16 hits a query) and long ones (its
   4,001st: full at 16 and 1,024);
D. 1 query against 8;
E. a scalar filter on ``cell`` keeping L random cells of N / 55 (what routing by live cells would send), not built in
   the engine: measured to decide whether it should be.
The collections are dropped at the end. Writes docs/engine_server.md and .json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.shield_e2e import machine_facts, save  # noqa: E402

DIM, B, CELL, UPLOAD = 33, 8, 55, 20000
REPEATS = 5


def timed(f, repeats=REPEATS) -> float:
    f()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(1000 * (time.perf_counter() - t))
    return round(statistics.median(ts), 1)


def measure(client, uri: str, n: int, log) -> dict:
    from pymilvus import DataType

    name = f"spell_bench_server_{n}"
    if client.has_collection(name):
        client.drop_collection(name)
    rng = np.random.default_rng(0)
    y = rng.standard_normal((n, DIM)).astype(np.float32)
    cells = np.arange(n) // CELL
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("y", DataType.FLOAT_VECTOR, dim=DIM)
    schema.add_field("cell", DataType.INT64)
    params = client.prepare_index_params()
    params.add_index("y", index_type="FLAT", metric_type="L2")
    params.add_index("cell", index_type="STL_SORT")
    client.create_collection(name, schema=schema, index_params=params)
    t0 = time.time()
    for a in range(0, n, UPLOAD):
        b = min(n, a + UPLOAD)
        client.insert(name, [{"id": k, "y": y[k], "cell": int(cells[k])} for k in range(a, b)])
        log(f"N {n:,}: uploaded {b:,}")
    client.flush(name)
    client.load_collection(name)
    res = {"n": n, "upload_s": round(time.time() - t0, 1)}
    q = [row for row in y[rng.choice(n, B, replace=False)] + 0.01]
    # squared radii: 16 hits or fewer per query (short answers), and about 4,000 (full at 1,024)
    d2 = np.sort(((y[None, :, :] - np.stack(q)[:1, None, :]) ** 2).sum(-1)[0])
    short, full = float(d2[15]), float(d2[4000])

    def search(qs=q, radius=short, limit=1024, level="Bounded", filt=""):
        return client.search(name, data=qs, anns_field="y", limit=limit, filter=filt, consistency_level=level,
                             search_params={"metric_type": "L2", "params": {"radius": radius}})

    res["before_index_ms"] = timed(search, repeats=3)
    t0 = time.time()
    from spell_core.index.engine import _wait_for_index

    _wait_for_index(client, name, n, uri)  # what the engine's upload does: index built, segments sealed
    res["index_wait_s"] = round(time.time() - t0, 1)
    res["after_index_ms"] = timed(search)
    log(f"N {n:,}: A done")
    res["consistency_ms"] = {lv: timed(lambda lv=lv: search(level=lv)) for lv in ("Strong", "Bounded", "Eventually")}
    res["limit_ms"] = {f"{kind}, limit {lim}": timed(lambda lim=lim, rad=rad: search(limit=lim, radius=rad))
                       for kind, rad in (("short answers", short), ("long answers", full))
                       for lim in (16, 1024, 16384)}
    res["queries_ms"] = {"1 query": timed(lambda: search(qs=q[:1])), "8 queries": timed(search)}
    log(f"N {n:,}: B-D done")
    ncell = int(cells[-1]) + 1
    res["cells"] = ncell
    res["filter_ms"] = {"no filter": res["after_index_ms"]}
    for share in (64, 8, 3):
        live = ncell // share
        keep = sorted(rng.choice(ncell, live, replace=False).tolist())
        filt = "cell in [" + ",".join(map(str, keep)) + "]"
        res["filter_ms"][f"1/{share} of the cells"] = timed(lambda f=filt: search(filt=f))
    log(f"N {n:,}: E done")
    client.drop_collection(name)
    return res


def report(res: dict, argv: list) -> str:
    cmd = "python -m benchmarks.engine_server" + ("" if not argv else " " + " ".join(argv))
    L = ["# One request to a Milvus server (issue 13)\n",
         f"Made by `{cmd}` on {res['machine']}, load average at the end {' '.join(res['loadavg'])}; server "
         f"{res['server']}; raw numbers in `engine_server.json`. What is measured: the module docstring of "
         f"`benchmarks/engine_server.py`. Every figure: milliseconds for one request of 8 queries (median of 5 after "
         f"a first one), unless the row says otherwise.\n"]
    rows = [("upload (s)", lambda r: f"{r['upload_s']}"),
            ("A: at once after the load (median of 3)", lambda r: f"{r['before_index_ms']}"),
            ("A: the engine's wait for the index and sealed segments (s)", lambda r: f"{r['index_wait_s']}"),
            ("A: after the wait", lambda r: f"{r['after_index_ms']}")]
    first = res["sizes"][0]
    rows += [(f"B: consistency {k}", lambda r, k=k: f"{r['consistency_ms'][k]}") for k in first["consistency_ms"]]
    rows += [(f"C: {k}", lambda r, k=k: f"{r['limit_ms'][k]}") for k in first["limit_ms"]]
    rows += [(f"D: {k}", lambda r, k=k: f"{r['queries_ms'][k]}") for k in first["queries_ms"]]
    rows += [(f"E: filter, {'none' if k == 'no filter' else k + ' live (random)'}", lambda r, k=k: f"{r['filter_ms'][k]}")
             for k in first["filter_ms"]]
    L.append("| | " + " | ".join(f"N = {r['n']:,}" for r in res["sizes"]) + " |")
    L.append("|---|" + "---|" * len(res["sizes"]))
    for label, f in rows:
        L.append(f"| {label} | " + " | ".join(f(r) for r in res["sizes"]) + " |")
    L.append(f"\nWhole benchmark {res['total_s']} s.\n")
    return "\n".join(L)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser()
    ap.add_argument("--uri", required=True, help="the Milvus server, e.g. http://127.0.0.1:19530")
    ap.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_200_000])
    ap.add_argument("--out", default=str(ROOT / "docs" / "engine_server.md"))
    args = ap.parse_args(argv)
    from pymilvus import MilvusClient

    t_all = time.time()
    client = MilvusClient(uri=args.uri)
    last = [0.0]

    def log(msg):
        if time.time() - last[0] > 5 or "done" in msg:
            print(f"[engine_server] {msg}", flush=True)
            last[0] = time.time()

    sizes = [measure(client, args.uri, n, log) for n in args.sizes]
    try:
        server = client.get_server_version()
    except Exception as e:  # older servers
        server = f"version not reported ({type(e).__name__})"
    res = {"uri": args.uri, "server": server, "sizes": sizes, **machine_facts(), "total_s": round(time.time() - t_all, 1)}
    save(res, args.out, report(res, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
