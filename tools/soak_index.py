"""Kill and concurrency tests of index builds and of the encoding cache with real processes (``spell_core``
alone, no ComfyUI). ``tests/core/test_concurrency.py`` runs short versions; this command runs the soak and
writes ``docs/reliability_soak_index.md``:

    python -m tools.soak_index [--kills 30] [--rounds 5] [--seed 0]

- kills: an index build (``build.build_index_folder`` over latent files, the command line's path) is SIGKILLed
  at a random moment of its run (seeded, uniform over the measured length of an uninterrupted build); after each
  kill every file the folder holds must be whole (each shard, the manifest and the index open and hold the
  source's rows), and the next build, killed in turn or finishing, resumes; the last one finishes, its index
  holds exactly the source's latents and the folder holds no temporary;
- two builders: two processes build one folder at the same moment; both succeed, one builds and the other opens
  the finished index ("already built"), nothing is left but the build's files and its lock;
- encoding cache: two processes encode one folder of images through one cache at the same moment; both get the
  same latents, every entry opens, and no temporary is left.

Every worker is a fork of one spawner process that imports torch once (forking is what makes many kills cheap).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# argv: shard size. Reads one job per line: "<role> <out> <report>"; forks a child per job and prints its pid.
# Roles: build (build_index_folder over the latent files in <out>/../latents), encode (encode_folder over the
# images in <out>/../images through the cache <out>, with a deterministic stand-in encoder). A child writes
# "start" to its report when its work begins and a JSON result line when it has finished.
SPAWNER = r"""
import json, os, signal, sys
import torch
torch.set_num_threads(1)  # no thread pool before fork
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the OS
from pathlib import Path
from spell_core.build import build_index_folder, describe_source
from spell_core.index import folder_source, latent_files
from spell_core.references import EncodingCache, encode_folder
shard_size = int(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    role, out, report = line.split()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            out = Path(out)
            with open(report, "a") as r:
                r.write("start\n")
                r.flush()
                if role == "build":
                    files = latent_files([str(out.parent / "latents")])
                    source, total = folder_source(files)
                    record = describe_source(files, {"kind": "latent files"})
                    index, what = build_index_folder(source, total, out, record, shard_size=shard_size)
                    r.write(json.dumps({"what": what, "rows": len(index)}) + "\n")
                else:
                    encode = lambda px: px.permute(0, 3, 1, 2)[:, :, ::8, ::8].repeat(1, 2, 1, 1)[:, :4] * 2 - 1
                    x, encoded = encode_folder(out.parent / "images", 64, 64, "stretch", "stand-in", encode,
                                               EncodingCache(out))
                    r.write(json.dumps({"encoded": encoded, "sum": float(x.double().sum()), "n": len(x)}) + "\n")
                r.flush()
            code = 0
        except BaseException as e:
            with open(report, "a") as r:
                r.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        finally:
            os._exit(code)
    print(pid, flush=True)
"""


class Spawner:
    def __init__(self, shard_size: int):
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.p = subprocess.Popen([sys.executable, "-c", SPAWNER, str(shard_size)], cwd=ROOT, env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.p.stdout.readline().strip()
        if line != "ready":
            self.p.kill()
            raise RuntimeError(f"spawner did not start: {line!r} {self.p.stderr.read()[-3000:]}")

    def fork(self, role: str, out: Path, report: Path) -> int:
        self.p.stdin.write(f"{role} {out} {report}\n")
        self.p.stdin.flush()
        return int(self.p.stdout.readline())

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=30)


def gone(pid: int, timeout: float = 300) -> bool:
    """Waits until process pid has ended (the spawner's children are reaped by the OS); False on timeout."""
    t = time.perf_counter()
    while time.perf_counter() - t < timeout:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.005)
    return False


def wait_started(report: Path, timeout: float = 60) -> None:
    t = time.perf_counter()
    while not (report.exists() and report.read_text().startswith("start")):
        if time.perf_counter() - t > timeout:
            raise RuntimeError(f"worker did not start ({report})")
        time.sleep(0.002)


def result(report: Path) -> dict | None:
    lines = report.read_text().split("\n")[1:] if report.exists() else []
    return json.loads(lines[0]) if lines and lines[0] else None


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) if folder.is_dir() else []


def make_latents(folder: Path, rows: int, shape=(4, 8, 8), files: int = 4, seed: int = 0):
    """rows latents in `files` files under folder/latents; returns them [rows, *shape]."""
    import torch

    from spell_core.storage import save_latents

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, *shape, generator=g)
    (folder / "latents").mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(x.chunk(files)):
        save_latents(folder / "latents" / f"part-{i}.safetensors", part)
    return x


def check_folder(out: Path, x) -> str | None:
    """What is wrong with the files an index build left in out (None: every file whole and true to x)."""
    import torch

    from spell_core.index import INDEX_FILE, MANIFEST, ReferenceIndex
    from spell_core.storage import StorageError, load_latents

    row = 0
    shards = sorted(out.glob("shard-*.safetensors"))
    for s in shards:
        try:
            block = load_latents(s)[0]
        except StorageError as e:
            return f"{s.name} does not open: {e}"
        if not torch.equal(block.reshape(len(block), -1), x[row:row + len(block)].reshape(len(block), -1)):
            return f"{s.name} does not hold rows {row}..{row + len(block)} of the source"
        row += len(block)
    if (out / MANIFEST).exists():
        try:
            info = json.loads((out / MANIFEST).read_text())
        except ValueError as e:
            return f"{MANIFEST} is not whole: {e}"
        if info["rows"] != len(x):
            return f"{MANIFEST} lists {info['rows']} rows of {len(x)}"
    if (out / INDEX_FILE).exists():
        try:
            index = ReferenceIndex.load(out, within=out)
        except StorageError as e:
            return f"{INDEX_FILE} does not open: {e}"
        if len(index) != len(x):
            return f"the index holds {len(index)} rows of {len(x)}"
    return None


def kill_builds(folder: Path, tries: int = 6, seed: int = 0, rows: int = 16000, shard_size: int = 500,
                shape=(4, 16, 16)) -> dict:
    """Index builds SIGKILLed at random moments, each resuming what the last one left (a build that finished
    before its kill is removed, so the next starts from nothing); then one that finishes. Returns
    {"records": [...], "final": {...}}; a record's "error" says what failed (None when everything held)."""
    import torch

    from spell_core.index import ReferenceIndex

    rng = random.Random(seed)
    x = make_latents(folder, rows, shape)
    spawner = Spawner(shard_size)
    try:
        # the length of an uninterrupted build, for the kill moments
        (folder / "timing").mkdir()
        (folder / "timing" / "latents").symlink_to(folder / "latents")
        t = time.perf_counter()
        report = folder / "timing.txt"
        pid = spawner.fork("build", folder / "timing" / "out", report)
        shards_s = None
        while not gone(pid, timeout=0.002):
            if shards_s is None and (folder / "timing" / "out" / "manifest.json").exists():
                shards_s = time.perf_counter() - t
        length = time.perf_counter() - t
        shards_s = shards_s or length
        if (result(report) or {}).get("rows") != rows:
            raise RuntimeError(f"the timing build failed: {report.read_text()}")
        out = folder / "out"
        records = []
        for k in range(tries + 1):
            report = folder / f"report-{k}.txt"
            pid = spawner.fork("build", out, report)
            last = k == tries
            wait_started(report)
            delay = None
            if not last:
                # a fresh build (even tries) is killed during its shard writes, a resumed one anywhere
                delay = rng.uniform(0, shards_s if k % 2 == 0 else length)
                time.sleep(delay)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # it finished first
                    pass
            if not gone(pid):
                raise RuntimeError(f"build {k} did not end")
            done = result(report)
            rec = {"try": k, "delay_s": delay, "finished": bool(done and "rows" in done),
                   "what": (done or {}).get("what"),
                   "temporaries_left": len(temporaries(out)),
                   "shards": len(list(out.glob("shard-*.safetensors"))) if out.is_dir() else 0,
                   "stage": ("index" if (out / "manifest.json").exists() else "shards") if not last else None,
                   "error": (done or {}).get("error") or (check_folder(out, x) if out.is_dir() else None)}
            if last:
                index = ReferenceIndex.load(out, within=out)
                got = index.store.get_sorted(torch.arange(len(index)).numpy(), torch.empty(len(index), index.store.dim))
                rec["exact"] = bool(torch.equal(got, x.reshape(rows, -1)))
                rec["files"] = sorted(p.name for p in out.iterdir() if not p.name.startswith("shard-"))
                if not rec["finished"] or not rec["exact"] or rec["temporaries_left"]:
                    rec["error"] = rec["error"] or "the last build did not finish with exactly the source's rows"
            records.append(rec)
            report.unlink()
            if (rec["finished"] or k % 2) and k < tries - 1:  # every other try (and after a build that ended before
                shutil.rmtree(out)                        # its kill) starts from nothing: kills land in every stage
    finally:
        spawner.close()
    return {"records": records, "uninterrupted_s": length, "shards_s": shards_s, "rows": rows, "shard_size": shard_size,
            "shape": "x".join(map(str, shape))}


def together(spawner: Spawner, role: str, out: Path, reports: list[Path]) -> list[dict]:
    """Forks one `role` worker per report at the same moment, waits for all; their results ({} if none)."""
    pids = [spawner.fork(role, out, r) for r in reports]
    for pid in pids:
        gone(pid)
    return [result(r) or {} for r in reports]


def two_builders(folder: Path, rows: int = 12000, shard_size: int = 1000) -> dict:
    """Two processes build one folder at the same moment."""
    from spell_core.index import ReferenceIndex

    make_latents(folder, rows)
    spawner = Spawner(shard_size)
    out = folder / "out"
    try:
        results = together(spawner, "build", out, [folder / "a.txt", folder / "b.txt"])
    finally:
        spawner.close()
    return {"whats": sorted(r.get("what", r.get("error", "?")) for r in results),
            "rows": len(ReferenceIndex.load(out, within=out)),
            "files": sorted(p.name for p in out.iterdir() if not p.name.startswith("shard-"))}


def two_encoders(folder: Path, images: int = 40) -> dict:
    """Two processes encode one image folder through one encoding cache at the same moment."""
    import numpy as np
    from PIL import Image

    from spell_core.storage import load_latents

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "images" / f"{i:03d}.png")
    spawner = Spawner(1)
    cache = folder / "cache"
    try:
        results = together(spawner, "encode", cache, [folder / "a.txt", folder / "b.txt"])
        results += together(spawner, "encode", cache, [folder / "c.txt"])  # a third: everything from the cache
    finally:
        spawner.close()
    entries = sorted(cache.glob("*.safetensors"))
    whole = sum(1 for e in entries if load_latents(e)[0].shape == (1, 4, 8, 8))
    return {"results": results, "entries": len(entries), "whole": whole, "temporaries": temporaries(cache)}


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "reliability_soak_index.md"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        print(f"kills: {args.kills} SIGKILLs during index builds", file=sys.stderr, flush=True)
        kills = kill_builds(Path(d) / "kills", tries=args.kills, seed=args.seed)
        builders, encoders = [], []
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}: two builders, two encoders", file=sys.stderr, flush=True)
            builders.append(two_builders(Path(d) / f"builders-{r}"))
            encoders.append(two_encoders(Path(d) / f"encoders-{r}"))
    recs = kills["records"]
    failed = [r for r in recs if r["error"]]
    lines = [
        "# Soak: index builds and the encoding cache (kills and concurrent processes)",
        "",
        f"Command: `python -m tools.soak_index --kills {args.kills} --rounds {args.rounds} --seed {args.seed}` "
        f"({time.perf_counter() - t0:.0f} s on {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}).",
        "",
        f"## SIGKILL during index builds ({kills['rows']} latents {kills['shape']}, shards of {kills['shard_size']}; an "
        f"uninterrupted build took {kills['uninterrupted_s']:.2f} s, {kills['shards_s']:.2f} s of it to the last shard; "
        "fresh builds killed at a moment uniform over the shard writes, resumed ones over the whole)",
        "",
        f"- kills: {len(recs) - 1}; the build had already finished before its kill in "
        f"{sum(r['finished'] for r in recs[:-1])}; temporaries left by a kill: "
        f"{sum(r['temporaries_left'] > 0 for r in recs[:-1])} kills left one or more; builds that resumed what a "
        f"kill left: {sum(r['what'] == 'resumed an interrupted build' for r in recs)}",
        f"- kills during the shard writes: {sum(r['stage'] == 'shards' and not r['finished'] for r in recs)}, "
        f"during the indexing: {sum(r['stage'] == 'index' and not r['finished'] for r in recs)}",
        f"- files not whole or not true to the source after a kill: {len(failed)}"
        + (f" ({failed[0]['error']})" if failed else ""),
        f"- the last build: finished {recs[-1]['finished']}, holds exactly the source's latents "
        f"{recs[-1].get('exact')}, temporaries left {recs[-1]['temporaries_left']}, files besides the shards "
        f"{recs[-1].get('files')}",
        "",
        "## Two builders of one folder at the same moment",
        "",
        *[f"- round {i + 1}: {b['whats']}, index of {b['rows']} rows, files {b['files']}"
          for i, b in enumerate(builders)],
        "",
        "## Two encoders through one encoding cache at the same moment (then a third, from the cache)",
        "",
        *[f"- round {i + 1}: encoded {[r.get('encoded', r.get('error')) for r in e['results']]}, same latents "
          f"{len({r.get('sum') for r in e['results']}) == 1}, {e['whole']} of {e['entries']} entries whole, "
          f"temporaries {e['temporaries']}" for i, e in enumerate(encoders)],
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
