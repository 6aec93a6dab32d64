"""End to end: sampling time on the demo model with and without a 1.2 M-reference shield (issue 4).

    .venv/bin/python -m benchmarks.shield_e2e [--n 1200000] [--repeats 5] [--reuse 0.25 0.5 1.0] [--no-cold]

References: 1.2 M augmentations of the demo's 1 437 training digits (random rotation ±12°, scale ±10 %, shift
±1.2 px, contrast 0.85-1.15, pixel noise 0.03), encoded by the demo VAE to its [4, 8, 8] latents: real digit
structure, near-duplicates included, as a training set shield would hold. They are streamed into an index folder
under ComfyUI's models/spell_sets with ``spell_core.build`` (resumable; reused by later runs) and loaded through
SPELL Protected Set Loader, as an artist would. Sampling: ComfyUI's KSampler path (euler, normal, 20 steps,
CFG 4, "any digit", batch 8), configurations interleaved per repeat with the same seeds:
  unpatched | SPELL, no references (in_batch off: the wrapper's own cost) | SPELL + 1.2 M shield (in_batch off),
  searched at every model call | the same with step reuse (``spell_core.shield.StepReuse``: one search at
  r·(1 + f) reused until an image's x̂0 has moved r·f, exact) for each --reuse fraction f
r is the 8th percentile of the unpatched outputs' RMS distance to their nearest reference (as in
spell_bench's shield test). Outputs inside the shield are counted by an exact brute force over all N,
independent of the index.
Cold start (unless --no-cold): fresh Python processes, as after a ComfyUI restart, each started after the index
folder's files (shards and index.safetensors) were evicted from the OS page cache (POSIX_FADV_DONTNEED; the
resident share is measured with mincore before and after), open the set through SPELL Protected Set Loader, sample
one shielded batch at once (seed of the first timed repeat), compute what SPELL Report shows next (each output's
nearest reference, searched out to NEAREST_CAP·r: many more shard rows), then sample the batch again: with the
loader's background read-ahead (the default) and with it switched off (``pagecache.WARM_SHARE = 0``); a third
fresh process samples unpatched, for the model's own first-call cost. Writes docs/shield_e2e.md and .json.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH, STEPS, CFG = 8, 20, 4.0


def augmented_digits(n: int, seed: int = 0, block: int = 16384):
    """source(start) for build_shards: deterministic per block, so a resumed build writes the same rows."""
    from benchmarks.demo_digits import DemoDigits

    return DemoDigits(n, seed).source(block)


def nearest_brute(x: torch.Tensor, index, chunk: int = 65536) -> torch.Tensor:
    """RMS distance of each x to its nearest reference, by a scan over every stored latent (no index)."""
    from spell_core.repellency import flat32, rms_cdist

    xf = flat32(x)
    best = torch.full((len(xf),), math.inf)
    for a in range(0, len(index), chunk):
        z = index.get(torch.arange(a, min(a + chunk, len(index))))
        best = torch.minimum(best, rms_cdist(xf, flat32(z)).min(1).values)
    return best


def machine_facts() -> dict:
    """Load average now, torch threads and the machine, for a report's first line."""
    return {"loadavg": Path("/proc/loadavg").read_text().split()[:3], "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"}


def save(res: dict, out: str, text: str) -> None:
    """Writes the raw numbers beside the report (out with .json) and the report, and prints it."""
    Path(out).with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    Path(out).write_text(text)
    print(text)


def rss_mb() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, *v = line.split()
        if k in ("VmRSS:", "RssAnon:", "RssFile:", "VmHWM:"):
            out[k.rstrip(":")] = int(v[0]) // 1024
    return out


def folder_files(folder: Path) -> dict:
    """The index folder's safetensors files: {"shards": [...], "index": [index.safetensors]}."""
    return {"shards": sorted(folder.glob("shard-*.safetensors")), "index": [folder / "index.safetensors"]}


def residency(pc, files: dict) -> dict:
    """Resident share (0-1) of each kind of file in the page cache (mincore), None where it cannot be measured."""
    return {k: pc.resident_fraction(v) for k, v in files.items()}


def cold_child(spec: dict) -> dict:
    """One fresh process of the cold start (see the module docstring); runs in ``--cold-child`` mode."""
    t0 = time.perf_counter()
    from tools import comfy_host

    comfy = comfy_host.start(spec["base"])
    pack = comfy_host.pack_module()
    pc = importlib.import_module(f"{pack.__name__}.spell_core.index.pagecache")
    if spec["mode"] == "read-ahead off":
        pc.WARM_SHARE = 0.0  # the loader's warm-up then reads nothing ("read-ahead switched off")
    nodes = comfy.NODE_CLASS_MAPPINGS
    model, _, prompts = nodes["SpellDemoModelLoader"]().load()
    pos = nodes["SpellDemoClassPrompt"]().encode(prompts, "any digit")[0]
    neg = nodes["SpellDemoClassPrompt"]().encode(prompts, "(empty)")[0]
    files = folder_files(Path(spec["folder"]))
    out = {"mode": spec["mode"], "setup_s": time.perf_counter() - t0, "resident_at_start": residency(pc, files)}
    searched = [0.0]
    m = model
    if spec["mode"] != "unpatched":
        t = time.perf_counter()
        refs, summary = nodes["SpellProtectedSetLoader"]().load("(none)", f"{spec['name']}/", 64, 64, "center crop")
        out["load_s"] = time.perf_counter() - t
        out["summary"] = summary
        out["resident_after_load"] = residency(pc, files)
        index = refs.index
        search = index.range_search

        def timed(*a, **k):  # time spent in the index's searches (the rest is the model and SPELL's own work)
            t = time.perf_counter()
            try:
                return search(*a, **k)
            finally:
                searched[0] += time.perf_counter() - t

        index.range_search = timed
        m = nodes["SpellRepellency"]().patch(model, spec["r"], 1.6, "off", 0.0, 1.0, True, references=refs,
                                             shield_reuse=spec["reuse"])[0]
    for key, seed in (("first", spec["seed"]), ("second", spec["seed"])):
        searched[0] = 0.0
        t = time.perf_counter()
        comfy.common_ksampler(m, seed, STEPS, CFG, "euler", "normal", pos, neg,
                              {"samples": torch.zeros(BATCH, 4, 8, 8)})
        out[f"{key}_s"] = time.perf_counter() - t
        if m is not model:
            out[f"{key}_search_s"] = searched[0]
            out[f"resident_after_{key}"] = residency(pc, files)
            w = getattr(index, "warmup", None)
            out[f"readahead_done_after_{key}"] = None if w is None else w.done
        if m is not model and key == "first":  # what SPELL Report asks next: nearest references out to 4 r
            t = time.perf_counter()
            _ = m.model_options["transformer_options"]["spell_history"][-1].latest().nearest_static
            out["report_s"] = time.perf_counter() - t
            out["resident_after_report"] = residency(pc, files)
    if m is not model and getattr(index, "warmup", None) is not None:
        out["readahead_s"] = index.warmup.seconds
        out["readahead_started"] = index.warmup.started
    out["rss_mb"] = rss_mb()
    out["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    return out


def cold_start(args, name: str, folder: Path, r: float, reuse: float, seed: int, pc) -> dict:
    """The cold-start processes: evicts the folder's files before each shielded one, runs it, collects its JSON."""
    files = folder_files(folder)
    runs = []
    for rnd, mode in ((k, m) for k in range(args.cold_repeats) for m in ("read-ahead on", "read-ahead off", "unpatched")):
        before = residency(pc, files)
        if mode != "unpatched":
            pc.evict([f for v in files.values() for f in v])
        evicted = residency(pc, files)
        spec = {"mode": mode, "base": args.base, "name": name, "folder": str(folder), "r": r, "reuse": reuse,
                "seed": seed}
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "benchmarks.shield_e2e", "--cold-child", json.dumps(spec)],
                              cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False)
        line = next((ln for ln in reversed(done.stdout.splitlines()) if ln.startswith("COLD_RESULT ")), None)
        if done.returncode != 0 or line is None:
            raise RuntimeError(f"cold-start process ({mode}) failed (exit {done.returncode}):\n"
                               f"{(done.stdout + done.stderr)[-4000:]}")
        run = json.loads(line[len("COLD_RESULT "):])
        run.update(resident_before_eviction=before, resident_after_eviction=evicted,
                   process_s=time.perf_counter() - t, round=rnd + 1)
        runs.append(run)
        print(f"cold start {rnd + 1}/{args.cold_repeats}, {mode}: " + ", ".join(f"{k} {v:.3f} s" for k, v in run.items()
                                                  if k.endswith("_s") and isinstance(v, float)), flush=True)
    sizes = {k: sum(f.stat().st_size for f in v) for k, v in files.items()}
    return {"runs": runs, "bytes": sizes, "mem_available": pc.mem_available()}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv  # the report names the command as it was run
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_200_000)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (interleaved)")
    ap.add_argument("--base", default=str(ROOT / "scratch" / "shield_e2e"), help="ComfyUI base dir (git-ignored)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "shield_e2e.md"))
    ap.add_argument("--reuse", type=float, nargs="*", default=[0.25, 0.5],
                    help="step-reuse distances (fractions of r) to run beside a search at every call")
    ap.add_argument("--no-cold", dest="cold", action="store_false",
                    help="skip the cold start (fresh processes after the index folder is evicted from the page cache)")
    ap.add_argument("--cold-repeats", type=int, default=3, help="rounds of the cold-start processes")
    ap.add_argument("--cold-child", help=argparse.SUPPRESS)  # internal: one cold-start process (JSON spec)
    args = ap.parse_args(argv)
    if args.cold_child:
        print("COLD_RESULT " + json.dumps(cold_child(json.loads(args.cold_child))), flush=True)
        return 0
    t_all = time.time()
    from tools import comfy_host

    comfy = comfy_host.start(args.base)
    pack = comfy_host.pack_module()
    import folder_paths
    from tqdm import tqdm

    nodes = comfy.NODE_CLASS_MAPPINGS
    name = f"demo_digits_{args.n}"
    out_dir = Path(folder_paths.get_folder_paths("spell_sets")[0]) / name
    bars = {}

    def progress(stage, done, total):
        bar = bars.setdefault(stage, tqdm(total=total, desc=stage, unit="latent", dynamic_ncols=True))
        bar.update(done - bar.n)

    t0 = time.time()
    record = {"files": 0, "digest": "augmented demo digits", "settings": {"n": args.n, "seed": 0}}
    built, what = pack.spell_core.build.build_index_folder(augmented_digits(args.n), args.n, out_dir, record,
                                                           shard_size=65536, progress=progress)
    del built  # an index opened as is maps index.safetensors: dropped, so the cold start can evict it
    gc.collect()
    for b in bars.values():
        b.close()
    build_s = time.time() - t0
    build_rss = rss_mb()  # VmHWM here is the build's peak when it was built in this run
    print(f"index: {what} in {build_s:.0f} s", flush=True)

    model, vae, prompts = nodes["SpellDemoModelLoader"]().load()
    pos = nodes["SpellDemoClassPrompt"]().encode(prompts, "any digit")[0]
    neg = nodes["SpellDemoClassPrompt"]().encode(prompts, "(empty)")[0]

    def sample(m, seed):
        return comfy.common_ksampler(m, seed, STEPS, CFG, "euler", "normal", pos, neg,
                                     {"samples": torch.zeros(BATCH, 4, 8, 8)})[0]["samples"]

    seeds = [100 + k for k in range(args.repeats)]
    base_out = torch.cat([sample(model, s) for s in seeds])
    # r by brute force over the shards (positioned reads: nothing of the folder stays mapped in this process)
    shards = pack.spell_core.index.LatentStore.from_files(folder_files(out_dir)["shards"])
    d0 = nearest_brute(base_out, shards)
    del shards
    r = round(float(d0.quantile(0.08)), 4)
    print(f"r = {r} (8th percentile of {len(d0)} unpatched outputs' nearest-reference distance)", flush=True)
    default_reuse = pack.nodes.repellency.SHIELD_REUSE
    cold = None
    if args.cold:
        pc = importlib.import_module(f"{pack.__name__}.spell_core.index.pagecache")
        cold = cold_start(args, name, out_dir, r, default_reuse if default_reuse in args.reuse else 0.0, seeds[0], pc)

    t0 = time.time()
    refs = nodes["SpellProtectedSetLoader"]().load("(none)", f"{name}/", 64, 64, "center crop")[0]
    load_s = time.time() - t0
    index = refs.index

    spell = nodes["SpellRepellency"]()
    shield_name = f"SPELL + {args.n:,} shield"
    configs = {
        "unpatched": model,
        "SPELL, no references": spell.patch(model, r, 1.6, "off", 0.0, 1.0, True)[0],
        f"{shield_name}, searched at every call": spell.patch(model, r, 1.6, "off", 0.0, 1.0, True, references=refs,
                                                              shield_reuse=0.0)[0],
    }
    for f in args.reuse:
        configs[f"{shield_name}, step reuse {f:g}" + (" (default)" if f == default_reuse else "")] = spell.patch(
            model, r, 1.6, "off", 0.0, 1.0, True, references=refs, shield_reuse=f)[0]
    shield_default = next(k for k in configs if "(default)" in k) if default_reuse in args.reuse else list(configs)[2]
    t = time.perf_counter()
    sample(configs[shield_default], 99)  # the first shielded run after opening the set (pages the index in)
    first_run_s = time.perf_counter() - t
    times = {k: [] for k in configs}
    cpu = {k: [] for k in configs}
    outs = {k: [] for k in configs}
    for rep, seed in enumerate(seeds):
        for k, m in configs.items():
            t, c = time.perf_counter(), time.process_time()
            outs[k].append(sample(m, seed))
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
        print(f"repeat {rep + 1}/{len(seeds)}: " + ", ".join(f"{k} {times[k][-1]:.3f} s" for k in configs), flush=True)
    shielded = configs[shield_default]
    log = shielded.model_options["transformer_options"]["spell_history"][-1].latest()
    t = time.perf_counter()
    _ = log.nearest_static  # SPELL Report's nearest-reference searches, page cache warm (the cold start's report_s)
    report_s = time.perf_counter() - t
    reuse_share = {k: (lambda lg: lg.shield_reused_rows / max(lg.shield_reused_rows + lg.shield_searched_rows, 1))(
        m.model_options["transformer_options"]["spell_history"][-1].latest()) for k, m in configs.items() if "reuse" in k}
    inside = {k: int((nearest_brute(torch.cat(v), index) < r).sum()) for k, v in outs.items()}
    base_t = statistics.median(times["unpatched"])
    rows = []
    for k in configs:
        med = statistics.median(times[k])
        rows.append({"config": k, "median_s": med, "min_s": min(times[k]), "max_s": max(times[k]),
                     "cpu_s": statistics.median(cpu[k]), "ratio_to_unpatched": med / base_t,
                     "inside": inside[k], "images": BATCH * len(seeds), "reused_share": reuse_share.get(k)})
    shield_row, plain_row = next(row for row in rows if row["config"] == shield_default), rows[1]
    if cold is not None:
        for run in cold["runs"]:
            warm = times["unpatched"] if run["mode"] == "unpatched" else times[shield_default]
            run["warm_median_s"] = statistics.median(warm)
            run["warm_same_seed_s"] = warm[0]
            run["first_to_warm"] = run["first_s"] / run["warm_median_s"]
    res = {
        "n": args.n, "build": what, "build_s": round(build_s, 1), "load_s": round(load_s, 2), "r": r,
        "backend": index.backend, "rows": rows, "rss_mb": rss_mb(), "rss_after_build_mb": build_rss, "enforced_last_run": log.enforced,
        "per_step_shield_ms": 1000 * (shield_row["median_s"] - plain_row["median_s"]) / STEPS,
        "per_step_no_reuse_ms": 1000 * (rows[2]["median_s"] - plain_row["median_s"]) / STEPS,
        "default": shield_default, "first_run_s": round(first_run_s, 3),
        "first_to_warm": first_run_s / shield_row["median_s"], "report_s": round(report_s, 3), "cold": cold,
        **machine_facts(),
        "total_s": round(time.time() - t_all, 1),
    }
    save(res, args.out, report(res, argv))
    return 0


def report(res, argv) -> str:
    cmd = "python -m benchmarks.shield_e2e" + ("" if not argv else " " + " ".join(argv))
    L = ["# End to end: sampling with a million-reference shield on the demo model\n",
         f"Made by `{cmd}` on {res['machine']}, torch threads {res['threads']}, load average at the end "
         f"{' '.join(res['loadavg'])}; raw numbers in `shield_e2e.json`.\n",
         __doc__.split("\n\n", 2)[2].split("Writes docs")[0].strip() + "\n",
         f"Shield: {res['n']:,} references, index backend `{res['backend']}` ({res['build']}: {res['build_s']} s, "
         f"augmentation and encoding included; peak memory by then {res['rss_after_build_mb'].get('VmHWM', '?')} MB; "
         f"opening it through the loader {res['load_s']} s). r = {res['r']}. Process memory at the end: "
         f"{res['rss_mb'].get('RssAnon', '?')} MB anonymous + {res['rss_mb'].get('RssFile', '?')} MB file-backed "
         f"(peak {res['rss_mb'].get('VmHWM', '?')} MB).\n",
         "| configuration | median s per batch of 8 (min-max) | CPU s | ratio to unpatched | outputs inside the shield "
         "| (call, image) pairs answered from an earlier search |",
         "|---|---|---|---|---|---|"]
    for row in res["rows"]:
        share = "" if row.get("reused_share") is None else f"{100 * row['reused_share']:.0f} %"
        L.append(f"| {row['config']} | {row['median_s']:.3f} ({row['min_s']:.3f}-{row['max_s']:.3f}) | "
                 f"{row['cpu_s']:.2f} | {row['ratio_to_unpatched']:.2f}x | {row['inside']} of {row['images']} | {share} |")
    L.append("")
    also = ("" if "every call" in res["default"] else
            f" and {res['per_step_no_reuse_ms']:.1f} ms when searched at every call")
    L.append(f"The shield adds {res['per_step_shield_ms']:.1f} ms per sampling step with `{res['default']}` (the "
             f"node's default){also} (median difference to SPELL without references, over {STEPS} steps). The first shielded run of "
             f"this process after opening the set (before the timed repeats; the page cache is warm from the build and the "
             f"cold-start processes: see below for a cold one) took "
             f"{res['first_run_s']:.3f} s, {res['first_to_warm']:.2f}x the warm median. Last shielded run: {res['enforced_last_run']} outputs "
             f"needed the final enforcement. Whole benchmark {res['total_s']} s. For comparison, the paper's "
             "approximate search over ImageNet's 1.2 M on a CPU cost 5.6x (13.54 s against 2.43 s per image) and still "
             "left 0.16 % inside.\n")
    if res.get("cold"):
        L += cold_report(res["cold"], res["report_s"])
    return "\n".join(L)


def cold_report(cold, report_warm_s: float) -> list[str]:
    def pct(d, key):
        v = (d or {}).get(key)
        return "?" if v is None else f"{100 * v:.0f} %"

    mb = {k: v / 2 ** 20 for k, v in cold["bytes"].items()}
    avail = cold.get("mem_available")
    L = ["## Cold start\n",
         f"Fresh processes, as after a ComfyUI restart, each after the index folder's files ({mb['shards']:.0f} MB of "
         f"shards, {mb['index']:.0f} MB index.safetensors) were evicted from the OS page cache"
         + (f" ({avail / 2 ** 30:.1f} GiB of memory available)" if avail else "") + ". Resident share (mincore) as "
         "shards / index.safetensors. The first batch starts as soon as the loader returns; the second is the same "
         "batch again in the same process.\n",
         "| round | process | resident before / after eviction | start-up s (ComfyUI, demo model) | opening the set s | resident "
         "after opening | first batch s (in the index's searches) | ratio to the warm median | resident after the first "
         "batch | SPELL Report's nearest searches s | resident after them | second batch s |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in cold["runs"]:
        shielded = run["mode"] != "unpatched"
        both = (lambda d: f"{pct(d, 'shards')} / {pct(d, 'index')}")
        L.append(
            f"| {run['round']} | {run['mode'] if shielded else 'unpatched (no set)'} | "
            + (f"{both(run['resident_before_eviction'])} -> {both(run['resident_after_eviction'])}" if shielded else "")
            + f" | {run['setup_s']:.2f} | " + (f"{run['load_s']:.2f}" if shielded else "") + " | "
            + (both(run.get("resident_after_load")) if shielded else "") + f" | {run['first_s']:.3f}"
            + (f" ({run['first_search_s']:.3f})" if shielded else "") + f" | {run['first_to_warm']:.2f}x | "
            + (both(run.get("resident_after_first")) if shielded else "") + " | "
            + (f"{run['report_s']:.3f} | {both(run.get('resident_after_report'))}" if shielded else " ")
            + f" | {run['second_s']:.3f} |")
    def med(mode, key):
        vals = [r[key] for r in cold["runs"] if r["mode"] == mode and r.get(key) is not None]
        return statistics.median(vals) if vals else math.nan

    def spread(mode, key):
        vals = [r[key] for r in cold["runs"] if r["mode"] == mode]
        return f"{statistics.median(vals):.3f} s ({min(vals):.3f}-{max(vals):.3f})"

    on = next(r for r in cold["runs"] if r["mode"] == "read-ahead on")
    done = [r.get("readahead_done_after_first") for r in cold["runs"] if r["mode"] == "read-ahead on"]
    took = [r["readahead_s"] for r in cold["runs"] if r["mode"] == "read-ahead on" and r.get("readahead_s") is not None]
    rounds = len(done)
    L.append("")
    L.append(f"Medians (min-max) over {rounds} round{'s' if rounds > 1 else ''}. Cold first shielded run with the "
             f"loader's read-ahead: opening the set {med('read-ahead on', 'load_s'):.2f} s, first batch "
             f"{spread('read-ahead on', 'first_s')}, {med('read-ahead on', 'first_to_warm'):.2f}x the warm median "
             f"{on['warm_median_s']:.3f} s (target <= 2x); without it: opening {med('read-ahead off', 'load_s'):.2f} s, "
             f"first batch {spread('read-ahead off', 'first_s')}, {med('read-ahead off', 'first_to_warm'):.2f}x. The "
             f"read-ahead had finished when the first batch ended in {sum(bool(d) for d in done)} of {rounds} rounds"
             + (f" (it took {statistics.median(took):.2f} s)" if took else "")
             + f". SPELL Report's nearest-reference searches after that first batch: "
             f"{med('read-ahead on', 'report_s'):.3f} s with the read-ahead, {med('read-ahead off', 'report_s'):.3f} s "
             f"without, {report_warm_s:.3f} s warm (after the timed repeats). A fresh process's first unpatched batch: "
             f"{spread('unpatched', 'first_s')}, {med('unpatched', 'first_to_warm'):.2f}x the unpatched warm median: the "
             f"model's and torch's own first-call cost, paid with or without a shield. The loader's summary: "
             f"\"{on.get('summary', '')}\".\n")
    return L


if __name__ == "__main__":
    sys.exit(main())
