"""Concurrency and kill tests of the batch memory and the fairness running count with real processes
(``spell_core`` alone, no ComfyUI). ``tests/core/test_concurrency.py`` runs short versions; this command runs
the soak and writes ``docs/reliability_soak.md``:

    python -m tools.soak_memory [--rounds 5] [--kills 50] [--seed 0]

- two writers: two Python processes started with ``subprocess`` append 10 batches each to one memory file (and
  add 10 runs each to one running count) at the same moment; every round must end with 20 entries (20 runs);
- kills: a writer appends to a growing memory and is SIGKILLed at a random moment (seeded); after each kill the
  committed file must load, hold a prefix of what was appended (0, 1, 2, ... in order) and at least every entry
  the writer had reported committed; then the next load or write (alternately) must leave no temporary file;
- lock timeout: a process holds the file's lock; a writer with a short timeout gets LockTimeout naming the file
  and the file is unchanged; once the holder is killed the next write goes through.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One worker program for every role; argv: role, path, then role arguments. It imports spell_core (torch: ~2 s),
# prints "ready", waits for a line on stdin (so that two workers start their writes together), then works.
WORKER = r"""
import sys, time
import torch
role, path = sys.argv[1], sys.argv[2]
from spell_core.memory import open_memory, file_lock
from spell_core.fairness import open_count
print("ready", flush=True)
sys.stdin.readline()
if role == "append":            # tag, batches: values tag*1000 + i, one entry per batch
    tag, n = int(sys.argv[3]), int(sys.argv[4])
    mem = open_memory(path, capacity=100000)
    for i in range(n):
        mem.append(torch.full((1, 4, 16, 16), float(tag * 1000 + i)))
elif role == "count":           # class, runs
    c, n = int(sys.argv[3]), int(sys.argv[4])
    count = open_count(path)
    for i in range(n):
        count.add(["a", "b"], [c])
elif role == "grow":            # appends entry len(memory) forever, printing the size after each commit
    shape = tuple(int(s) for s in sys.argv[3].split("x"))
    mem = open_memory(path, capacity=100000)
    while True:
        n = len(mem)
        mem.append(torch.full((1, *shape), float(n)))
        print(n + 1, flush=True)
elif role == "spawner":         # forks one "grow" writer per line read; prints its pid (children auto-reaped)
    import os, signal
    torch.set_num_threads(1)  # no thread pool before fork
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    shape = tuple(int(s) for s in sys.argv[3].split("x"))
    while True:
        report = sys.stdin.readline().strip()
        if not report:
            break
        pid = os.fork()
        if pid == 0:  # the writer: appends entry len(memory) forever, noting each committed size in report
            try:
                from spell_core.memory import BatchMemory
                mem = BatchMemory(path, capacity=100000)
                with open(report, "a") as out:
                    while True:
                        n = len(mem)
                        mem.append(torch.full((1, *shape), float(n)))
                        out.write(f"{n + 1}\n")
                        out.flush()
            finally:
                os._exit(1)
        print(pid, flush=True)
elif role == "hold":            # holds the file's lock until killed
    with file_lock(path, "test holder"):
        print("locked", flush=True)
        time.sleep(600)
"""


def start(role: str, path: Path, *args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-c", WORKER, role, str(path), *map(str, args)], cwd=ROOT, env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p


def wait_ready(p: subprocess.Popen, word: str = "ready") -> None:
    line = p.stdout.readline().strip()
    if line != word:
        p.kill()
        raise RuntimeError(f"worker did not start: {line!r} {p.stderr.read()[-3000:]}")


def go(*ps: subprocess.Popen) -> None:
    for p in ps:
        p.stdin.write("go\n")
        p.stdin.flush()


def finish(p: subprocess.Popen, timeout: float = 120) -> None:
    _, err = p.communicate(timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"worker failed ({p.returncode}): {err[-3000:]}")


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def two_writers_memory(folder: Path, batches: int = 10) -> dict:
    """Two processes append `batches` each to one memory at once; an in-process reader opened before them."""
    from spell_core.memory import open_memory

    path = folder / "shared.safetensors"
    reader = open_memory(path, capacity=100000)
    before = len(reader)
    ps = [start("append", path, tag, batches) for tag in (1, 2)]
    for p in ps:
        wait_ready(p)
    t = time.perf_counter()
    go(*ps)
    for p in ps:
        finish(p)
    values = [int(v) for v in reader.latents()[:, 0, 0, 0].tolist()]  # the registry copy, re-read
    per_writer = {tag: [v - tag * 1000 for v in values if v // 1000 == tag] for tag in (1, 2)}
    return {"entries": len(values), "before": before, "seconds": time.perf_counter() - t,
            "in_order": all(per_writer[tag] == list(range(batches)) for tag in (1, 2)),
            "files": sorted(p.name for p in folder.iterdir())}


def two_writers_count(folder: Path, runs: int = 10) -> dict:
    from spell_core.fairness import open_count

    path = folder / "shared.json"
    reader = open_count(path)
    reader.runs()
    ps = [start("count", path, c, runs) for c in (0, 1)]
    for p in ps:
        wait_ready(p)
    go(*ps)
    for p in ps:
        finish(p)
    return {"runs": reader.runs(), "counts": [int(c) for c in reader.counts(["a", "b"])],
            "files": sorted(p.name for p in folder.iterdir())}


def kill_writes(folder: Path, tries: int = 10, seed: int = 0, shape: str = "4x64x64",
                delay: tuple[float, float] = (0.05, 0.5)) -> list[dict]:
    """SIGKILLs a growing writer (a process forked from a spawner process) at random moments; after each kill
    checks the committed file, then a load (even tries) or a write (odd tries) of it and that no temporary remains. Returns one record per try; a
    record's "error" says what failed (None when everything held)."""
    import torch

    from spell_core.memory import BatchMemory

    rng = random.Random(seed)
    path = folder / "killed.safetensors"
    records = []
    known = 0  # entries known to be committed: the file after the last check, or what the writer reported
    spawner = start("spawner", path, shape)  # imports torch once; each writer is a fork of it (a real process)
    wait_ready(spawner)
    go(spawner)
    for k in range(tries):
        report = folder / f"report-{k}.txt"
        spawner.stdin.write(f"{report}\n")
        spawner.stdin.flush()
        pid = int(spawner.stdout.readline())
        time.sleep(rng.uniform(*delay))
        os.kill(pid, signal.SIGKILL)
        while True:  # until the spawner has reaped it
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.005)
        reported = [int(s) for s in report.read_text().split()] if report.exists() else []
        report.unlink(missing_ok=True)
        committed = max([known, *reported])
        left = temporaries(folder)
        rec = {"try": k, "committed": committed, "temporaries_left_by_kill": len(left), "error": None}
        try:
            mem = BatchMemory(path, capacity=100000)  # a fresh reader, as after a restart
            x = mem.latents()
            n = 0 if x is None else x.shape[0]
            rec["entries"] = n
            if x is not None and [int(v) for v in x[:, 0, 0, 0].tolist()] != list(range(n)):
                rec["error"] = "entries are not a prefix 0..n-1"
            elif not committed <= n <= committed + 1:
                rec["error"] = f"{n} entries, the writer had reported {committed} committed"
            known = n
            if k % 2:
                known = mem.append(torch.full((1, *map(int, shape.split("x"))), float(n)))
                rec["next"] = "write"
            else:
                rec["next"] = "load"
            after = temporaries(folder)
            if after:
                rec["error"] = rec["error"] or f"temporaries left after the next {rec['next']}: {after}"
        except Exception as e:  # the committed file must always load
            rec["error"] = f"{type(e).__name__}: {e}"
        records.append(rec)
    spawner.stdin.close()
    spawner.wait(timeout=30)
    return records


def lock_timeout(folder: Path, timeout: float = 0.5) -> dict:
    """A process holds the memory's (then the count's) lock; writers with a short timeout must get LockTimeout
    naming the file, the files unchanged; after the holder is killed, writes go through."""
    import torch

    from spell_core.fairness import FairnessCount
    from spell_core.memory import BatchMemory, LockTimeout

    mem_path, count_path = folder / "held.safetensors", folder / "held.json"
    mem, count = BatchMemory(mem_path, 10), FairnessCount(count_path)
    mem.append(torch.zeros(1, 4, 8, 8))
    count.add(["a", "b"], [0])
    result = {}
    for name, path, write in (("memory", mem_path, lambda: mem.append(torch.ones(1, 4, 8, 8), timeout=timeout)),
                              ("count", count_path, lambda: count.add(["a", "b"], [1], timeout=timeout))):
        before = path.read_bytes()
        holder = start("hold", path)
        wait_ready(holder)
        go(holder)
        wait_ready(holder, "locked")
        t = time.perf_counter()
        try:
            write()
            message, waited = None, None
        except LockTimeout as e:
            message, waited = str(e), time.perf_counter() - t
        unchanged = path.read_bytes() == before
        holder.kill()
        holder.communicate()
        write()  # the OS released the dead holder's lock
        result[name] = {"message": message, "waited": waited, "unchanged": unchanged,
                        "after_kill": len(mem) if name == "memory" else count.runs()}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "reliability_soak.md"))
    a = ap.parse_args()
    t0 = time.perf_counter()
    lines = ["# Reliability soak: concurrent writers and killed writes", "",
             f"Command: `python -m tools.soak_memory --rounds {a.rounds} --kills {a.kills} --seed {a.seed}` "
             f"(`spell_core` alone, real processes started with `subprocess`; {platform.python_version()}, "
             f"{os.cpu_count()} CPU cores).", ""]
    ok = True
    lines += ["## Two writers, 10 appends each, one memory file (and one running count)", "",
              "| round | memory entries (of 20) | each writer's entries in order | count runs (of 20) | counts | files |",
              "|---|---|---|---|---|---|"]
    for r in range(a.rounds):
        with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
            m = two_writers_memory(Path(d1))
            c = two_writers_count(Path(d2))
        ok &= m["entries"] == 20 and m["in_order"] and c["runs"] == 20 and c["counts"] == [10, 10]
        lines.append(f"| {r + 1} | {m['entries']} | {m['in_order']} | {c['runs']} | {c['counts']} | "
                     f"{', '.join(m['files'] + c['files'])} |")
        print(lines[-1], flush=True)
    with tempfile.TemporaryDirectory() as d:
        recs = kill_writes(Path(d), a.kills, a.seed)
    bad = [r for r in recs if r["error"]]
    ok &= not bad
    mid = sum(r["temporaries_left_by_kill"] > 0 for r in recs)
    lines += ["", f"## SIGKILL during memory writes ({a.kills} kills, seed {a.seed}, entries of 4x64x64 float32)", "",
              f"- kills that left a temporary file: {mid} of {len(recs)} (killed mid-write); temporaries left "
              f"after the next load or write: {sum('temporaries left' in (r['error'] or '') for r in recs)}",
              f"- committed file unreadable, not a prefix, or missing a reported entry: "
              f"{sum(r['error'] is not None for r in recs)} of {len(recs)}",
              f"- entries at the end: {recs[-1].get('entries')} (memory file "
              f"{recs[-1].get('entries', 0) * 64 * 1024 / 1e6:.1f} MB)"]
    lines += [f"- try {r['try']}: {r['error']}" for r in bad]
    with tempfile.TemporaryDirectory() as d:
        lt = lock_timeout(Path(d))
    ok &= all(v["message"] and v["unchanged"] for v in lt.values())
    lines += ["", "## A lock held by another process beyond the timeout (0.5 s)", ""]
    for name, v in lt.items():
        lines.append(f"- {name}: file unchanged: {v['unchanged']}; waited {v['waited'] or 0:.2f} s; message: "
                     f"`{(v['message'] or 'NONE').replace(d, '<tmp>')}`")
    lines += ["", f"Result: {'all held' if ok else 'FAILURES above'}; {time.perf_counter() - t0:.0f} s in all.", ""]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
