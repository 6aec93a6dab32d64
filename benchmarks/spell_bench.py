"""SPELL benchmark on the embedded demo model, through ComfyUI's real sampler (``nodes.common_ksampler``).

    python -m benchmarks.spell_bench            # full run (~15-25 min on 2 shared CPU cores)
    python -m benchmarks.spell_bench --quick    # smoke version (~3 min)

Measures in one run, side by side:
1. Diversity (the paper's Table 1 analogue): baseline, SPELL in-batch (mutual, ordered) over a radius sweep,
   SPELL with a batch memory over consecutive batches, and the peers of ``benchmarks/peers.py`` (CADS,
   Particle Guidance, guidance in a limited interval) over their knobs; metrics against held-out real digits
   on the demo evaluator's features (Vendi, precision/recall/density/coverage k=5, Fréchet distance, classes).
2. Radius guidance and the in_batch default (mutual vs ordered).
3. Shield (Table 2 analogue): the whole demo training set as protected set, every ComfyUI sampler.
4. Sparsity of the push per step, from SpellRepellency's run logs.
5. Cost: sampling time with and without SPELL at batch 16, interleaved repeats.

Writes docs/spell_benchmark.md, docs/spell_bench/results.json and PNG plots (drawn with Pillow).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from demo import DEFAULT_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
OUT = DOCS / "spell_bench"

CFG = 4.0
STEPS = 20
BATCH = 8
LAM = 1.6


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ settings
def plan(quick: bool) -> dict:
    if quick:
        return dict(prompts=["any digit", "3"], seeds=[100], spell_r=[0.45], ordered_r=[0.45], default_r=0.45,
                    memory_batches=2, cads=[1.0], pg=[4.0], interval=[1.0], shield_samplers=["euler", "heun"],
                    shield_seeds=[200], shield_batch=8, push_check=["euler"], cost_batch=16, cost_repeats=1)
    return dict(prompts=["any digit", "3", "8"], seeds=[100, 101, 102, 103, 104, 105],
                spell_r=[0.25, 0.35, 0.45, 0.55, 0.7, 0.9], ordered_r=[0.35, 0.45, 0.55, 0.7], default_r=0.45,
                memory_batches=6, cads=[0.1, 0.25, 0.5, 1.0], pg=[1.0, 2.0, 4.0, 8.0], interval=[5.42, 2.0, 1.0, 0.5],
                shield_samplers=None, shield_seeds=[200, 201], shield_batch=16, push_check=None, cost_batch=16,
                cost_repeats=6)


# ------------------------------------------------------------------------------------------------ harness
class Bench:
    def __init__(self, nodes, weights: str | None = None):
        """``weights``: a demo model file in demo/weights (SPELL Demo Model Loader's choice); None: the shipped one."""
        from demo.data import digits_split, images16_to_latents
        from demo.evaluator import load_evaluator

        self.nodes = nodes
        M = nodes.NODE_CLASS_MAPPINGS
        self.M = M
        loader = M["SpellDemoModelLoader"]()
        self.model, self.vae, self.prompts = loader.load() if weights is None else loader.load(weights)
        enc = M["SpellDemoClassPrompt"]()
        self.cond = {p: enc.encode(self.prompts, p)[0] for p in ["any digit", "(empty)"] + [str(d) for d in range(10)]}
        self.evaluator = load_evaluator()
        split = digits_split()
        self.test_images, self.test_labels = split["test"]
        self.train_latents = images16_to_latents(split["train"][0])
        with torch.no_grad():
            self.test_feats = self.evaluator.features(self.test_images)
        self.sampling = self.model.get_model_object("model_sampling")

    def sample(self, model, prompt, seed, batch=BATCH, sampler="euler", steps=STEPS, scheduler="normal"):
        latent = {"samples": torch.zeros(batch, 4, 8, 8)}
        out = self.nodes.common_ksampler(model, seed, steps, CFG, sampler, scheduler, self.cond[prompt],
                                         self.cond["(empty)"], latent)[0]["samples"]
        return out.float()

    def spell(self, r, in_batch="mutual", enforce=True, references=None, memory=None, model=None):
        return self.M["SpellRepellency"]().patch(model or self.model, r, LAM, in_batch, 0.0, 1.0, enforce,
                                                references=references, memory=memory, batch_radius_scale=0.0,
                                                batch_end_percent=1.0)[0]

    def t_of(self, sigma: float) -> float:
        from benchmarks.peers import normalised_time
        return normalised_time(self.sampling, sigma)

    def features(self, latents):
        from demo.data import latents_to_images16
        with torch.no_grad():
            imgs = latents_to_images16(latents.float())
            return self.evaluator.features(imgs), self.evaluator.predict(imgs)

    def real_feats(self, prompt):
        if prompt == "any digit":
            return self.test_feats
        return self.test_feats[self.test_labels == int(prompt)]


def latest_log(model):
    return model.model_options["transformer_options"]["spell_history"][-1].latest()


def prompt_metrics(bench: Bench, prompt: str, batches: list[torch.Tensor]) -> dict:
    from spell_core import nearest
    from spell_core.metrics import frechet_distance, prdc, vendi_score

    allx = torch.cat(batches)
    feats, probs = bench.features(allx)
    real = bench.real_feats(prompt)
    pr = prdc(real, feats, k=5)
    pred = probs.argmax(1)
    vb, nnb, cls_b = [], [], []
    for i, b in enumerate(batches):
        f = feats[i * len(b):(i + 1) * len(b)]
        vb.append(vendi_score(f))
        n = len(b)
        nnb.append(float(nearest(b, b, ~torch.eye(n, dtype=torch.bool)).mean()))
        cls_b.append(int(pred[i * len(b):(i + 1) * len(b)].unique().numel()))
    m = dict(vendi_batch=statistics.mean(vb), vendi_pooled=vendi_score(feats), **pr,
             fd=frechet_distance(real, feats), nn_rms=statistics.mean(nnb),
             classes_batch=statistics.mean(cls_b), classes_pooled=int(pred.unique().numel()))
    if prompt != "any digit":
        m["class_acc"] = float((pred == int(prompt)).double().mean())
    return m


def mean_over_prompts(per_prompt: dict) -> dict:
    keys = ["vendi_batch", "vendi_pooled", "precision", "recall", "density", "coverage", "fd", "nn_rms"]
    out = {k: statistics.mean(v[k] for v in per_prompt.values()) for k in keys}
    accs = [v["class_acc"] for v in per_prompt.values() if "class_acc" in v]
    out["class_acc"] = statistics.mean(accs) if accs else float("nan")
    if "any digit" in per_prompt:
        out["any_classes_batch"] = per_prompt["any digit"]["classes_batch"]
        out["any_classes_pooled"] = per_prompt["any digit"]["classes_pooled"]
    return out


# ------------------------------------------------------------------------------------------- 1. diversity
def run_diversity(bench: Bench, P: dict) -> dict:
    from benchmarks.peers import patch_cads, patch_interval_guidance, patch_particle_guidance

    settings = [("baseline", None, lambda: bench.model)]
    for r in P["spell_r"]:
        settings.append(("SPELL mutual", r, lambda r=r: bench.spell(r, "mutual")))
    for r in P["ordered_r"]:
        settings.append(("SPELL ordered", r, lambda r=r: bench.spell(r, "ordered")))
    settings.append(("SPELL memory", P["default_r"], None))  # built per prompt (memory cleared first)
    for s in P["cads"]:
        settings.append(("CADS", s, lambda s=s: patch_cads(bench.model, s, seed=7)))
    for w in P["pg"]:
        settings.append(("Particle Guidance", w, lambda w=w: patch_particle_guidance(bench.model, w)))
    for hi in P["interval"]:
        settings.append(("Interval guidance", hi, lambda hi=hi: patch_interval_guidance(bench.model, 0.28, hi)))

    seeds = P["seeds"]
    results, sparsity_logs, baseline_batches = [], {}, {}
    total = len(settings) * len(P["prompts"])
    done, t0 = 0, time.perf_counter()
    for method, knob, make in settings:
        per_prompt, secs = {}, 0.0
        for prompt in P["prompts"]:
            batches = []
            if method == "SPELL memory":
                mem = bench.M["SpellBatchMemory"]().open(f"bench_{prompt.replace(' ', '_')}", 1024)[0]
                mem = bench.M["SpellBatchMemoryClear"]().clear(mem)[0]
                model = bench.spell(knob, "mutual", memory=mem)
                run_seeds = [seeds[0] + i for i in range(P["memory_batches"])] if len(seeds) < P["memory_batches"] else seeds
            else:
                model, run_seeds = make(), seeds
            for seed in run_seeds:
                t = time.perf_counter()
                x = bench.sample(model, prompt, seed)
                secs += time.perf_counter() - t
                batches.append(x)
                if method == "SPELL mutual":
                    lg = latest_log(model)
                    sparsity_logs.setdefault(knob, []).append([(s.sigma, list(s.active_pairs), list(s.push_ratio)) for s in lg.steps])
            if method == "baseline":
                baseline_batches[prompt] = batches
            per_prompt[prompt] = prompt_metrics(bench, prompt, batches)
            done += 1
        el = time.perf_counter() - t0
        agg = mean_over_prompts(per_prompt)
        results.append(dict(method=method, knob=knob, per_prompt=per_prompt, mean=agg, seconds=secs))
        log(f"T1 {method:18s} {'' if knob is None else knob:>5} vendi_b {agg['vendi_batch']:.3f} "
            f"vendi_p {agg['vendi_pooled']:.3f} prec {agg['precision']:.3f} rec {agg['recall']:.3f} "
            f"cov {agg['coverage']:.3f} fd {agg['fd']:.1f} acc {agg['class_acc']:.3f}  "
            f"[{done}/{total}, {el:.0f}s, eta {el / done * (total - done):.0f}s]")
    return dict(results=results, sparsity_logs=sparsity_logs, baseline_batches=baseline_batches)


def radius_guidance(bench: Bench, baseline_batches: dict) -> dict:
    """Distances between generated latents (RMS, model space) of the baseline, per prompt."""
    from spell_core import nearest
    from spell_core.repellency import flat32, rms_cdist

    out = {}
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    for prompt, batches in baseline_batches.items():
        nn, pair = [], []
        for b in batches:
            n = len(b)
            nn.append(nearest(b, b, ~torch.eye(n, dtype=torch.bool)))
            d = rms_cdist(flat32(b), flat32(b))
            pair.append(d[~torch.eye(n, dtype=torch.bool)])
        nn, pair = torch.cat(nn), torch.cat(pair)
        to_train = nearest(torch.cat(batches), bench.train_latents)
        out[prompt] = dict(nn_in_batch=[round(float(v), 3) for v in nn.quantile(q)],
                           pairwise=[round(float(v), 3) for v in pair.quantile(q)],
                           nearest_train=[round(float(v), 3) for v in to_train.quantile(q)])
    return out


# ------------------------------------------------------------------------------------------- 3. shield
def run_shield(bench: Bench, P: dict, r: float, r_stress: float | None = None) -> dict:
    import comfy.samplers
    from spell_core import nearest
    from spell_core.metrics import prdc

    refs = bench.M["SpellProtectedSetLoader"]().load("(none)", "(none)", 64, 64, "center crop",
                                                    latent={"samples": bench.train_latents})[0]
    z = bench.model.model.process_latent_in(bench.train_latents)
    samplers = P["shield_samplers"] or list(comfy.samplers.KSampler.SAMPLERS)
    push_only = bench.spell(r, "off", enforce=False, references=refs)  # run on P["push_check"] samplers only
    enforced = bench.spell(r, "off", enforce=True, references=refs)
    if r_stress is not None:
        stress_models = (("push", bench.spell(r_stress, "off", enforce=False, references=refs)),
                         ("enforce", bench.spell(r_stress, "off", enforce=True, references=refs)))
    rows, t0 = [], time.perf_counter()
    checks = []
    for n, name in enumerate(samplers):
        seed = 200
        row = dict(sampler=name)
        labels = [("none", bench.model), ("enforce", enforced)]
        if P["push_check"] is None or name in P["push_check"]:
            labels.append(("push", push_only))
        for label, model in labels:
            acc = dict(inside=0, n=0, min_dist=math.inf, secs=0.0, moved=0, feats=[])
            try:
                for seed in P["shield_seeds"]:
                    t = time.perf_counter()
                    x = bench.sample(model, "any digit", seed, batch=P["shield_batch"], sampler=name, steps=STEPS)
                    acc["secs"] += time.perf_counter() - t
                    d = nearest(bench.model.model.process_latent_in(x), z)
                    acc["inside"] += int((d < r).sum())
                    acc["n"] += len(x)
                    acc["min_dist"] = min(acc["min_dist"], float(d.min()))
                    acc["feats"].append(bench.features(x)[0])
                    if label == "none" and "d_first" not in acc:
                        acc["d_first"] = d
                    if label == "enforce":
                        acc["moved"] += latest_log(model).enforced
            except Exception as e:  # a sampler that fails on this model is reported, not hidden
                row[label] = dict(error=f"{type(e).__name__}: {e}")
                continue
            row[label] = dict(inside=acc["inside"], n=acc["n"], min_dist=acc["min_dist"],
                              precision=prdc(bench.test_feats, torch.cat(acc["feats"]), k=5)["precision"],
                              s_per_image=acc["secs"] / acc["n"])
            if label == "enforce":
                row[label]["moved"] = acc["moved"]
            if label == "none" and r_stress is not None:
                d0 = acc["d_first"]
                row["stress"] = dict(n=len(d0), none=int((d0 < r_stress).sum()))
        if r_stress is not None and "stress" in row:
            for label, model in stress_models:  # first seed only, the same noise as the first "none" batch
                try:
                    x = bench.sample(model, "any digit", P["shield_seeds"][0], batch=P["shield_batch"], sampler=name,
                                     steps=STEPS)
                except Exception as e:
                    row["stress"][label] = f"error: {type(e).__name__}: {e}"
                    continue
                d = nearest(bench.model.model.process_latent_in(x), z)
                row["stress"][label] = int((d < r_stress).sum())
                if label == "enforce":
                    row["stress"]["moved"] = latest_log(model).enforced
                    row["stress"]["min_dist_enforced"] = float(d.min())
        if "push" in row and "inside" in row["push"] and "moved" in row.get("enforce", {}):
            checks.append(dict(sampler=name, push_run_inside=row["push"]["inside"], enforce_run_moved=row["enforce"]["moved"]))
        if "push" not in row and "moved" in row.get("enforce", {}):
            e = row["enforce"]
            row["push"] = dict(inside=e["moved"], n=e["n"], derived=True)
        rows.append(row)
        el = time.perf_counter() - t0
        fmt = lambda k: (f"{row[k]['inside']}/{row[k]['n']}" if "inside" in row.get(k, {}) else "err")
        st = row.get("stress", {})
        log(f"T2 {name:28s} inside: none {fmt('none')}  push {fmt('push')}  enforce {fmt('enforce')}  "
            f"(stress r: {st.get('none')}/{st.get('push')}/{st.get('enforce')} of {st.get('n')})  "
            f"[{n + 1}/{len(samplers)}, {el:.0f}s, eta {el / (n + 1) * (len(samplers) - n - 1):.0f}s]")
    return dict(r=r, r_stress=r_stress, rows=rows, n_refs=len(refs), checks=checks)


# ------------------------------------------------------------------------------------------- 4. sparsity
def sparsity(bench: Bench, logs: list) -> dict:
    bins = [[] for _ in range(10)]
    for run in logs:
        for sigma, active, ratio in run:
            t = bench.t_of(sigma)
            b = min(int(t * 10), 9)
            bins[b].extend(zip(active, ratio))
    rows = []
    for b, pairs in enumerate(bins):
        if not pairs:
            continue
        act = [r for a, r in pairs if a > 0]
        rows.append(dict(t_lo=b / 10, t_hi=(b + 1) / 10, pairs=len(pairs), active_share=len(act) / len(pairs),
                         push_median=statistics.median(act) if act else 0.0,
                         push_p90=float(torch.tensor(act).quantile(0.9)) if act else 0.0,
                         push_max=max(act) if act else 0.0))
    allp = [(a, r) for pairs in bins for a, r in pairs]
    act = [r for a, r in allp if a > 0]
    summary = dict(active_share=len(act) / max(len(allp), 1),
                   share_active_push_le_5pct=sum(r <= 0.05 for r in act) / max(len(act), 1),
                   push_median=statistics.median(act) if act else 0.0, push_max=max(act) if act else 0.0)
    return dict(rows=rows, summary=summary)


# ------------------------------------------------------------------------------------------- 5. cost
def run_cost(bench: Bench, P: dict, r: float) -> dict:
    spell = bench.spell(r, "mutual")
    times = {"baseline": [], "SPELL mutual": []}
    bench.sample(bench.model, "any digit", 1, batch=P["cost_batch"])  # warm-up
    bench.sample(spell, "any digit", 1, batch=P["cost_batch"])
    for i in range(P["cost_repeats"]):
        order = [("baseline", bench.model), ("SPELL mutual", spell)]
        if i % 2:
            order.reverse()
        for name, model in order:
            t = time.perf_counter()
            bench.sample(model, "any digit", 300 + i, batch=P["cost_batch"])
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["SPELL mutual"] / med["baseline"]
    pair_ratios = [s / b for s, b in zip(times["SPELL mutual"], times["baseline"])]
    log(f"cost: baseline {med['baseline']:.2f}s, SPELL {med['SPELL mutual']:.2f}s, ratio {ratio:.3f}")
    return dict(times=times, median=med, ratio=ratio, pair_ratios=pair_ratios,
                min_ratio=min(times["SPELL mutual"]) / min(times["baseline"]))


# ------------------------------------------------------------------------------------------- plots (Pillow)
COLORS = {"baseline": (0, 0, 0), "SPELL mutual": (214, 39, 40), "SPELL ordered": (255, 127, 14),
          "SPELL memory": (148, 103, 189), "CADS": (31, 119, 180), "Particle Guidance": (44, 160, 44),
          "Interval guidance": (140, 86, 75), "active share": (214, 39, 40), "median push (active)": (31, 119, 180),
          "p90 push (active)": (44, 160, 44)}


def plot(path: Path, panels: list[dict], title: str) -> None:
    """panels: [{xlabel, ylabel, series: [(label, xs, ys)]}] side by side; lines with markers, a legend."""
    from PIL import Image, ImageDraw, ImageFont

    pw, ph, m = 520, 400, 60
    img = Image.new("RGB", (pw * len(panels), ph + 40), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((10, 8), title, fill="black", font=font)
    for p, panel in enumerate(panels):
        ox, oy = p * pw, 40
        xs = [x for _, sx, _ in panel["series"] for x in sx]
        ys = [y for _, _, sy in panel["series"] for y in sy]
        if not xs:
            continue
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        dx, dy = (x1 - x0) or 1.0, (y1 - y0) or 1.0
        x0, x1, y0, y1 = x0 - 0.05 * dx, x1 + 0.05 * dx, y0 - 0.05 * dy, y1 + 0.05 * dy
        L, R, T, B = ox + m, ox + pw - 20, oy + 10, oy + ph - m
        X = lambda v: L + (v - x0) / (x1 - x0) * (R - L)
        Y = lambda v: B - (v - y0) / (y1 - y0) * (B - T)
        d.rectangle([L, T, R, B], outline="black")
        for i in range(6):
            vx, vy = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
            d.line([X(vx), B, X(vx), B + 4], fill="black")
            d.text((X(vx) - 14, B + 6), f"{vx:.3g}", fill="black", font=font)
            d.line([L - 4, Y(vy), L, Y(vy)], fill="black")
            d.text((ox + 5, Y(vy) - 5), f"{vy:.3g}", fill="black", font=font)
            d.line([L, Y(vy), R, Y(vy)], fill=(230, 230, 230))
        d.text(((L + R) // 2 - 40, B + 24), panel["xlabel"], fill="black", font=font)
        d.text((L + 5, T + 3), panel["ylabel"] + " (y)", fill="black", font=font)
        for k, (label, sx, sy) in enumerate(panel["series"]):
            col = COLORS.get(label, (100, 100, 100))
            pts = list(zip(sx, sy))
            if len(pts) > 1:
                d.line([(X(a), Y(b)) for a, b in pts], fill=col, width=2)
            for a, b in pts:
                d.ellipse([X(a) - 4, Y(b) - 4, X(a) + 4, Y(b) + 4], fill=col)
            ly = T + 18 + 13 * k
            d.rectangle([R - 150, ly + 2, R - 142, ly + 10], fill=col)
            d.text((R - 138, ly), label, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# ------------------------------------------------------------------------------------------- analysis
def curve(results, method, key_x="precision", key_y="vendi_batch"):
    pts = [(r["mean"][key_x], r["mean"][key_y]) for r in results if r["method"] == method]
    return sorted(pts)


def interp_upper(curve_pts, x):
    """Best y SPELL reaches at precision ≥ x (the upper envelope, step-wise), None if it never reaches x."""
    ys = [y for px, y in curve_pts if px >= x - 1e-9]
    return max(ys) if ys else None


def compare_curves(results, key_y):
    """For every peer point: SPELL mutual's best diversity at equal or higher precision, minus the peer's."""
    spell = curve(results, "SPELL mutual", "precision", key_y) + curve(results, "baseline", "precision", key_y)
    out = []
    for r in results:
        if r["method"] not in ("CADS", "Particle Guidance", "Interval guidance"):
            continue
        p, y = r["mean"]["precision"], r["mean"][key_y]
        s = interp_upper(spell, p)
        out.append(dict(method=r["method"], knob=r["knob"], precision=p, peer=y, spell=s,
                        above=None if s is None else s > y))
    return out


def pick_default_radius(results, base):
    """Largest-diversity SPELL mutual radius whose mean precision stays within 0.05 of the baseline's."""
    ok = [r for r in results if r["method"] == "SPELL mutual" and r["mean"]["precision"] >= base["precision"] - 0.05]
    if not ok:
        return None
    return max(ok, key=lambda r: r["mean"]["vendi_batch"])["knob"]


# ------------------------------------------------------------------------------------------- report
def fmt(v, n=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{n}f}" if isinstance(v, float) else str(v)


def write_report(R: dict, args) -> str:
    res = R["diversity"]["results"]
    base = next(r for r in res if r["method"] == "baseline")["mean"]
    L = []
    L.append("# SPELL benchmark on the demo model\n")
    L.append(f"Generated by `{R['command']}` on {R['when']} ({R['wall_s'] / 60:.1f} min wall clock). "
             f"Demo weights: `demo/weights/{R.get('weights', 'demo_model.safetensors')}`, sha256 {R['weights_sha'][:12]}…, "
             f"modified {R['weights_mtime']}.\n")
    L.append(f"Machine: {R['machine']}. Load: {R['load']}. The CPU was shared with other jobs, so absolute times "
             "are noisy; the cost ratio comes from interleaved repeats in the same run.\n")
    L.append(f"Sampling: ComfyUI {R['comfy']} `nodes.common_ksampler`, euler / normal, {STEPS} steps, CFG {CFG}, "
             f"negative prompt \"(empty)\", batch {BATCH}, seeds {R['plan']['seeds']} (the same seeds for every "
             f"method), λ = {LAM}. Metrics on the demo evaluator's 64-d features against the held-out real digits "
             "(`digits_split()['test']`: all 360 for \"any digit\", the prompt's class for single-class prompts), "
             "averaged over the prompts " + ", ".join(f'\"{p}\"' for p in R['plan']['prompts']) + ". "
             "Vendi (batch) is the mean over batches of the Vendi score of one batch of 8; Vendi (pooled), "
             "precision, recall, density, coverage (k = 5) and Fréchet distance (FD) use all images of a prompt "
             f"({BATCH * len(R['plan']['seeds'])} per prompt and method; FD on so few samples is biased upward and only "
             "comparable within this table). Class acc: share of single-class prompts' outputs classified as "
             "the prompted digit; classes: distinct predicted digits for \"any digit\" (per batch / pooled).\n")
    if args.quick:
        L.append("**This is a `--quick` smoke run: one seed, few knob values, few samplers. Do not quote it.**\n")

    L.append("## 1. Diversity vs quality (Table 1 analogue)\n")
    L.append("| method | knob | Vendi (batch) | Vendi (pooled) | precision | recall | density | coverage | FD | "
             "class acc | classes any (batch/pooled) | NN RMS in batch | s / batch |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    knob_name = {"SPELL mutual": "r", "SPELL ordered": "r", "SPELL memory": "r", "CADS": "s",
                 "Particle Guidance": "w", "Interval guidance": "σ_hi"}
    for r in res:
        m = r["mean"]
        n_batches = len(R["plan"]["prompts"]) * (R["plan"]["memory_batches"] if r["method"] == "SPELL memory" and
                                                  len(R["plan"]["seeds"]) < R["plan"]["memory_batches"] else len(R["plan"]["seeds"]))
        knob = "" if r["knob"] is None else f"{knob_name[r['method']]} = {r['knob']}"
        L.append(f"| {r['method']} | {knob} | {fmt(m['vendi_batch'])} | {fmt(m['vendi_pooled'])} | "
                 f"{fmt(m['precision'])} | {fmt(m['recall'])} | {fmt(m['density'])} | {fmt(m['coverage'])} | "
                 f"{fmt(m['fd'], 1)} | {fmt(m['class_acc'])} | {fmt(m.get('any_classes_batch'), 2)} / "
                 f"{m.get('any_classes_pooled', '–')} | {fmt(m['nn_rms'])} | {r['seconds'] / n_batches:.2f} |")
    L.append("")
    L.append("Ratios to the baseline (Vendi batch, recall, precision):\n")
    for r in res[1:]:
        m = r["mean"]
        L.append(f"- {r['method']} {'' if r['knob'] is None else knob_name[r['method']] + ' = ' + str(r['knob'])}: "
                 f"Vendi ×{m['vendi_batch'] / base['vendi_batch']:.3f}, recall ×{m['recall'] / max(base['recall'], 1e-9):.3f}, "
                 f"precision ×{m['precision'] / max(base['precision'], 1e-9):.3f}")
    L.append("")
    L.append("Knobs: SPELL r = radius (RMS, model space); CADS s = noise scale (τ1 = 0.6, τ2 = 0.9, ψ = 1); "
             "Particle Guidance w = strength (RBF kernel on x̂0, median-heuristic bandwidth, "
             "x̂0_i += w·σ·(−∇_i Σ_j k(x̂0_i, x̂0_j))); "
             "Interval guidance σ_hi = upper end of the CFG interval (σ_lo = 0.28; CFG 1 outside; the schedule's "
             f"σ_max is {R['sigma_max']:.2f}). With ψ = 1 the rescaling restores the condition's mean and std, so for "
             "t ≥ τ2 the condition is random tokens whatever s is and s only shapes the τ1–τ2 ramp: s is a weak knob "
             "here (τ1, τ2 would be the stronger ones). Per-prompt numbers are in `docs/spell_bench/results.json`.\n")
    L.append("![diversity vs precision](spell_bench/tradeoff.png)\n")
    for key, name in (("vendi_batch", "Vendi (batch)"), ("recall", "recall")):
        cmp = R["curves"][key]
        known = [c for c in cmp if c["above"] is not None]
        above = sum(c["above"] for c in known)
        L.append(f"**Is SPELL's curve above the peers' at equal precision ({name})?** For each peer point, the best "
                 f"{name} of SPELL mutual (or the baseline) at equal or higher precision: SPELL is above at "
                 f"{above} of {len(known)} comparable peer points"
                 + (f" ({len(cmp) - len(known)} peer points have a precision SPELL's sweep does not reach)" if len(cmp) > len(known) else "")
                 + ".\n")
        L.append("| peer | knob | peer precision | peer " + name + " | SPELL best " + name + " at ≥ that precision | above |")
        L.append("|---|---|---|---|---|---|")
        for c in cmp:
            L.append(f"| {c['method']} | {c['knob']} | {fmt(c['precision'])} | {fmt(c['peer'])} | {fmt(c['spell'])} | "
                     f"{'–' if c['above'] is None else ('yes' if c['above'] else 'no')} |")
        L.append("")

    L.append("## 2. Radius and the in_batch default\n")
    L.append("Distances between baseline outputs (RMS in model space; quantiles 10 / 25 / 50 / 75 / 90 %):\n")
    L.append("| prompt | nearest other image of the batch | all pairs in the batch | nearest training image |")
    L.append("|---|---|---|---|")
    for p, g in R["radius"].items():
        L.append(f"| {p} | {' / '.join(map(str, g['nn_in_batch']))} | {' / '.join(map(str, g['pairwise']))} | "
                 f"{' / '.join(map(str, g['nearest_train']))} |")
    L.append("")
    L.append(R["recommendation"] + "\n")
    L.append("Per prompt, SPELL mutual and ordered against the baseline (Vendi batch / recall / precision / class acc):\n")
    prompts = R["plan"]["prompts"]
    L.append("| method | r | " + " | ".join(f'\"{p}\"' for p in prompts) + " |")
    L.append("|---|---|" + "---|" * len(prompts))
    for r in res:
        if r["method"] not in ("baseline", "SPELL mutual", "SPELL ordered"):
            continue
        cells = []
        for p in prompts:
            m = r["per_prompt"][p]
            acc = f" / {m['class_acc']:.2f}" if "class_acc" in m else ""
            cells.append(f"{m['vendi_batch']:.2f} / {m['recall']:.2f} / {m['precision']:.2f}{acc}")
        L.append(f"| {r['method']} | {'' if r['knob'] is None else r['knob']} | " + " | ".join(cells) + " |")
    L.append("")

    sh = R["shield"]
    L.append("## 3. Shield: the whole training set as protected set (Table 2 analogue)\n")
    L.append(f"Protected set: all {sh['n_refs']} training digits as latents (`SpellProtectedSetLoader`, latent input). "
             f"r = {sh['r']:.3f} ({R['shield_r_rule']}). Prompt \"any digit\", CFG {CFG}, {STEPS} steps, "
             f"normal scheduler, {R['plan']['shield_batch'] * len(R['plan']['shield_seeds'])} images per sampler and setting ("
             f"batches of {R['plan']['shield_batch']}, seeds {R['plan']['shield_seeds']}, the same noise for the three settings), in_batch off. \"inside\": final output with RMS distance < r to a "
             "training latent. Enforced: SpellRepellency with enforce_shield on. Push only (the paper's method, "
             "enforce_shield off): enforcement acts only on the finished output, so the push-only run is the "
             "enforced run's trajectory before that last projection and its count inside the shield equals the "
             "enforced run's \"moved\" count; where a count is marked * it is taken from there, and the push-only "
             "run is done for real on " + (", ".join(R['plan']['push_check']) if R['plan']['push_check'] else "every sampler") + " as a check ("
             + "; ".join(f"{c['sampler']}: push-only run {c['push_run_inside']} inside, enforced run moved {c['enforce_run_moved']}"
                         for c in sh['checks']) + "). "
             "Precision against the 360 held-out digits (k = 5). Time: seconds per image of the whole sampling call.\n")
    L.append("| sampler | inside, no SPELL | inside, push only | inside, enforced | moved by enforcement | "
             "precision none / push / enforced | s / image none / push / enforced |")
    L.append("|---|---|---|---|---|---|---|")
    tot = {k: [0, 0] for k in ("none", "push", "enforce")}
    errors = []
    for row in sh["rows"]:
        cells = []
        for k in ("none", "push", "enforce"):
            e = row.get(k, {})
            if "inside" in e:
                tot[k][0] += e["inside"]
                tot[k][1] += e["n"]
                cells.append(f"{e['inside']}/{e['n']}" + ("*" if e.get("derived") else ""))
            else:
                cells.append("error")
                errors.append(f"{row['sampler']} ({k}): {e.get('error', '?')}")
        g = lambda k, f: fmt(row[k][f], 2) if f in row.get(k, {}) else "–"
        L.append(f"| {row['sampler']} | {cells[0]} | {cells[1]} | {cells[2]} | {row.get('enforce', {}).get('moved', '–')} | "
                 f"{g('none', 'precision')} / {g('push', 'precision')} / {g('enforce', 'precision')} | "
                 f"{fmt(row['none'].get('s_per_image'), 3) if 'none' in row else '–'} / "
                 f"{fmt(row['push'].get('s_per_image'), 3) if 'push' in row else '–'} / "
                 f"{fmt(row['enforce'].get('s_per_image'), 3) if 'enforce' in row else '–'} |")
    share = lambda k: 100 * tot[k][0] / max(tot[k][1], 1)
    L.append(f"| **all samplers** | **{share('none'):.2f} %** ({tot['none'][0]}/{tot['none'][1]}) | "
             f"**{share('push'):.2f} %** ({tot['push'][0]}/{tot['push'][1]}) | **{share('enforce'):.2f} %** "
             f"({tot['enforce'][0]}/{tot['enforce'][1]}) | | {fmt(R['shield_summary']['precision']['none'], 3)} / "
             f"{fmt(R['shield_summary']['precision']['push'], 3)} / {fmt(R['shield_summary']['precision']['enforce'], 3)} | "
             f"{fmt(R['shield_summary']['s_per_image']['none'], 3)} / {fmt(R['shield_summary']['s_per_image']['push'], 3)} / "
             f"{fmt(R['shield_summary']['s_per_image']['enforce'], 3)} |")
    L.append("")
    worst = max((row["enforce"]["inside"] for row in sh["rows"] if "inside" in row.get("enforce", {})), default=None)
    L.append(f"Target: 0.00 % inside with enforcement on every sampler (the paper's best: 0.16 %). "
             f"{'Met' if worst == 0 and not errors else 'Not met'}: "
             f"{share('enforce'):.2f} % inside with enforcement over {tot['enforce'][1]} outputs, "
             f"{sum(1 for row in sh['rows'] if row.get('enforce', {}).get('inside') == 0)} of {len(sh['rows'])} samplers at 0.\n")
    if errors:
        L.append("Errors: " + "; ".join(errors) + "\n")
    if sh.get("r_stress") is not None:
        st_rows = [row for row in sh["rows"] if "stress" in row]
        ok = lambda k: [row["stress"][k] for row in st_rows if isinstance(row["stress"].get(k), int)]
        n_all = sum(row["stress"]["n"] for row in st_rows)
        L.append(f"**Stress test, r = {sh['r_stress']:.3f}** (the median distance of the baseline's \"any digit\" outputs "
                 "to their nearest training digit, so about half the baseline lands inside; first seed only, "
                 f"{R['plan']['shield_batch']} images per sampler, same noise as the first baseline batch). Here the "
                 "balls are large and overlap, the regime in which the paper reports that pushes can cancel and the push alone "
                 "can leak:\n")
        L.append("| sampler | inside, no SPELL | inside, push only | inside, enforced | moved by enforcement | "
                 "min distance after enforcement / r |")
        L.append("|---|---|---|---|---|---|")
        for row in st_rows:
            t = row["stress"]
            md = t.get("min_dist_enforced")
            ratio = "–" if md is None else f"{md / sh['r_stress']:.5f}"
            L.append(f"| {row['sampler']} | {t['none']}/{t['n']} | {t.get('push')}/{t['n']} | {t.get('enforce')}/{t['n']} | "
                     f"{t.get('moved', '–')} | {ratio} |")
        L.append(f"| **all samplers** | **{100 * sum(ok('none')) / max(n_all, 1):.2f} %** | "
                 f"**{100 * sum(ok('push')) / max(n_all, 1):.2f} %** | **{100 * sum(ok('enforce')) / max(n_all, 1):.2f} %** | "
                 f"{sum(ok('moved'))} | |")
        L.append("")
        if sum(ok("moved")) == 0:
            L.append("On this model the push alone (λ = 1.6, every step) left no output inside the shield at either "
                     "radius, on any sampler, so the enforcement never had to move an output in this benchmark: the "
                     "0.00 % with enforcement is the push's result here, not a demonstration of the projection (which "
                     "the in-ComfyUI tests exercise). The last column shows outputs end just outside r (ratios close "
                     "to 1: the push puts them near the border).\n")

    sp = R["sparsity"]
    L.append("## 4. Sparsity of the push\n")
    L.append(f"From SpellRepellency's run logs (in_batch mutual, r = {R['plan']['default_r']}, all Table 1 runs of that "
             "setting: every model call of every image). t = the model's normalised timestep (1 = pure noise). "
             "Push size = ||Δ|| / ||x̂0 − x_t|| on the (step, image) pairs where the push is active.\n")
    L.append("| t | (step, image) pairs | active | median push (active) | 90 % push (active) | max push |")
    L.append("|---|---|---|---|---|---|")
    for row in sp["rows"]:
        L.append(f"| {row['t_lo']:.1f}–{row['t_hi']:.1f} | {row['pairs']} | {100 * row['active_share']:.1f} % | "
                 f"{100 * row['push_median']:.2f} % | {100 * row['push_p90']:.2f} % | {100 * row['push_max']:.2f} % |")
    s = sp["summary"]
    L.append(f"\nOverall: push active on {100 * s['active_share']:.1f} % of (step, image) pairs; "
             f"{100 * s['share_active_push_le_5pct']:.1f} % of active pushes are ≤ 5 % of the score; median "
             f"{100 * s['push_median']:.2f} %, max {100 * s['push_max']:.1f} % (r = {R['plan']['default_r']}). Paper: ~40 % active at t = 0.8, ~21 % at "
             "t = 0.6, virtually never near the end; push ≤ 5 % of the score typically (35 % at most).\n")
    L.append("![sparsity](spell_bench/sparsity.png)\n")
    L.append("Sparsity at every swept radius (in_batch mutual):\n")
    L.append("| r | active, all steps | active at t 0.8–0.9 | active at t 0.6–0.7 | active at t < 0.1 | active pushes ≤ 5 % | median push |")
    L.append("|---|---|---|---|---|---|---|")
    pct = lambda v: "–" if v is None else f"{100 * v:.1f} %"
    for rr, b in sp["by_radius"].items():
        L.append(f"| {rr} | {pct(b['active_share'])} | {pct(b['t08'])} | {pct(b['t06'])} | {pct(b['t00'])} | "
                 f"{pct(b['share_active_push_le_5pct'])} | {pct(b['push_median'])} |")
    L.append("")

    c = R["cost"]
    L.append("## 5. Cost\n")
    L.append(f"Batch {R['plan']['cost_batch']}, \"any digit\", euler {STEPS} steps, CFG {CFG}; baseline and SPELL "
             f"(in_batch mutual, r = {R['plan']['default_r']}) interleaved (alternating order), {R['plan']['cost_repeats']} "
             "repeats each after one warm-up each.\n")
    L.append("| | median s / batch | all runs (s) |")
    L.append("|---|---|---|")
    for k in ("baseline", "SPELL mutual"):
        L.append(f"| {k} | {c['median'][k]:.3f} | {', '.join(f'{t:.2f}' for t in c['times'][k])} |")
    L.append(f"\nRatio SPELL / baseline: **{c['ratio']:.3f}** (median/median; min/min {c['min_ratio']:.3f}; per "
             f"interleaved pair {', '.join(f'{x:.3f}' for x in c['pair_ratios'])}). Target ≤ 1.05: "
             f"{'met' if c['ratio'] <= 1.05 else 'missed'}.\n")

    L.append("## Targets\n")
    for line in R["targets"]:
        L.append(f"- {line}")
    L.append("")
    L.append("## Reproduce\n")
    L.append(f"    {R['command']}\n")
    L.append("Everything above (tables, plots, `docs/spell_bench/results.json`) is written by that one command; the "
             "peer methods are in `benchmarks/peers.py`.\n")
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke version (~3 min): one seed, few knobs, 4 samplers")
    ap.add_argument("--out", default=str(DOCS / "spell_benchmark.md"))
    ap.add_argument("--from-json", help="only rewrite the report and plots from a results.json of an earlier run")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    args.out = str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out)  # results.json: no machine path
    if args.from_json:
        R = json.loads(Path(args.from_json).read_text())
        R["out"] = args.out
        finish(R, write_json=False)
        return
    torch.set_num_threads(1)  # tiny model on shared cores: one thread avoids contention
    P = plan(args.quick)
    t_start = time.perf_counter()
    load0 = os.getloadavg()

    from tools import comfy_host

    nodes = comfy_host.start(tempfile.mkdtemp(prefix="spell-bench-"))
    import comfy.samplers  # noqa: F401
    import hashlib

    weights = ROOT / "demo" / "weights" / DEFAULT_WEIGHTS
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    mtime = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(weights.stat().st_mtime))
    if time.time() - weights.stat().st_mtime < 300:
        log("WARNING: the demo weights were modified less than 5 minutes ago (training may still be running)")
    bench = Bench(nodes)
    log(f"demo model loaded (weights sha {sha[:12]}, {mtime}); plan: {json.dumps({k: v for k, v in P.items()})}")

    div = run_diversity(bench, P)
    res = div["results"]
    base = next(r for r in res if r["method"] == "baseline")["mean"]
    radius = radius_guidance(bench, div["baseline_batches"])

    # shield radius: "a reproduction" = closer to a training digit than the 8th percentile of the baseline's
    # nearest-training-image distances (so the baseline has a leak like the paper's 7.6 %)
    from spell_core import nearest
    allbase = torch.cat(div["baseline_batches"]["any digit"])
    d_train = nearest(allbase, bench.train_latents)
    shield_r = round(float(d_train.quantile(0.08)), 3)
    shield_r_rule = ("the 8th percentile of the baseline Table 1 \"any digit\" outputs' RMS distance to their nearest training "
                     "latent, so that the baseline leaks about as much as the paper's 7.6 %; for comparison the "
                     "median nearest-neighbour distance between training digits is "
                     f"{float(train_nn_median(bench.train_latents)):.3f}")
    log(f"shield radius r = {shield_r}")
    shield_r_stress = round(float(d_train.quantile(0.5)), 3)
    log(f"stress radius r = {shield_r_stress} (median distance of baseline outputs to the training set)")
    shield = run_shield(bench, P, shield_r, shield_r_stress)
    sp = sparsity(bench, div["sparsity_logs"][P["default_r"]])
    sp["by_radius"] = {}
    for rr, lg in sorted(div["sparsity_logs"].items()):
        one = sparsity(bench, lg)
        bt = {round(row["t_lo"], 1): row["active_share"] for row in one["rows"]}
        sp["by_radius"][rr] = dict(**one["summary"], t08=bt.get(0.8), t06=bt.get(0.6), t00=bt.get(0.0))
    log(f"sparsity: {json.dumps(sp['summary'])}")
    cost = run_cost(bench, P, P["default_r"])

    import comfy  # noqa: F401
    try:
        import comfyui_version
        comfy_v = comfyui_version.__version__
    except Exception:
        comfy_v = "0.3.75"
    command = "python -m benchmarks.spell_bench" + (" --quick" if args.quick else "")
    load1 = os.getloadavg()
    R = dict(command=command, when=time.strftime("%Y-%m-%d %H:%M"), wall_s=time.perf_counter() - t_start,
             weights=DEFAULT_WEIGHTS, weights_sha=sha, weights_mtime=mtime, comfy=comfy_v, plan=P,
             machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, torch "
                     f"{torch.__version__}, {torch.get_num_threads()} torch thread, Python {platform.python_version()}",
             load=f"1-min load average {load0[0]:.2f} at start and {load1[0]:.2f} at the end on {os.cpu_count()} cores "
                  f"(5-min: {load0[1]:.2f} / {load1[1]:.2f})",
             sigma_max=float(bench.sampling.sigma_max),
             diversity=dict(results=res), radius=radius, shield=shield, shield_r_rule=shield_r_rule, sparsity=sp,
             cost=cost, out=args.out)
    finish(R, write_json=True)


def analyse(R: dict) -> None:
    """Derived numbers (curve comparison, recommendation, shield totals, target lines) from R's raw results."""
    P, res, sp, shield, cost, radius = (R["plan"], R["diversity"]["results"], R["sparsity"], R["shield"], R["cost"],
                                        R["radius"])
    base = next(r for r in res if r["method"] == "baseline")["mean"]
    curves = {k: compare_curves(res, k) for k in ("vendi_batch", "recall")}
    recommendation, chosen_r = recommend(res, base, radius, P)
    ssum = {"precision": {}, "s_per_image": {}}
    for k in ("none", "push", "enforce"):
        ok = [row[k] for row in shield["rows"] if "precision" in row.get(k, {})]
        ssum["precision"][k] = statistics.mean(e["precision"] for e in ok) if ok else None
        ssum["s_per_image"][k] = statistics.mean(e["s_per_image"] for e in ok) if ok else None

    tot = lambda k: (sum(row[k]["inside"] for row in shield["rows"] if "inside" in row.get(k, {})),
                     sum(row[k]["n"] for row in shield["rows"] if "inside" in row.get(k, {})))
    tn, te = tot("none"), tot("enforce")
    tp = tot("push")
    known_v = [c for c in curves["vendi_batch"] if c["above"] is not None]
    known_r = [c for c in curves["recall"] if c["above"] is not None]
    spell_def = next((r["mean"] for r in res if r["method"] == "SPELL mutual" and abs(r["knob"] - P["default_r"]) < 1e-9), None)
    recommendation, chosen_r = recommend(res, base, radius, P)
    chosen = next((r["mean"] for r in res if r["method"] == "SPELL mutual" and chosen_r is not None
                   and abs(r["knob"] - chosen_r) < 1e-9), None)
    bins = {round(row["t_lo"], 1): row["active_share"] for row in sp["rows"]}
    targets = [
        f"Diversity up at about flat quality (SPELL mutual, r = {P['default_r']}): Vendi (batch) "
        f"{base['vendi_batch']:.3f} → {spell_def['vendi_batch']:.3f}, recall {base['recall']:.3f} → {spell_def['recall']:.3f}, "
        f"precision {base['precision']:.3f} → {spell_def['precision']:.3f}, FD {base['fd']:.1f} → {spell_def['fd']:.1f}"
        + (f"; at r = {chosen_r}: Vendi {chosen['vendi_batch']:.3f}, recall {chosen['recall']:.3f}, precision "
           f"{chosen['precision']:.3f}, FD {chosen['fd']:.1f}" if chosen else "")
        + f" (diversity and FD improve; precision is {'about flat' if spell_def['precision'] >= base['precision'] - 0.02 else 'not flat'} at r = {P['default_r']}).",
        f"SPELL's curve above the peers' at equal precision: Vendi {sum(c['above'] for c in known_v)}/{len(known_v)}, "
        f"recall {sum(c['above'] for c in known_r)}/{len(known_r)} comparable peer points "
        f"(target {'met' if known_v and all(c['above'] for c in known_v) else 'missed'}).",
        f"Shield: {100 * tn[0] / max(tn[1], 1):.2f} % inside without SPELL, {100 * tp[0] / max(tp[1], 1):.2f} % with the push "
        f"only, {100 * te[0] / max(te[1], 1):.2f} % with enforcement over {len(shield['rows'])} samplers "
        f"(target 0.00 %: {'met' if te[0] == 0 and te[1] > 0 else 'missed'}).",
        f"Sparsity: active share {100 * sp['summary']['active_share']:.1f} % overall; at t≈0.8 "
        f"{100 * bins.get(0.8, float('nan')):.1f} %, t≈0.6 {100 * bins.get(0.6, float('nan')):.1f} %, t<0.1 "
        f"{100 * bins.get(0.0, float('nan')):.1f} % (paper ~40 %, ~21 %, ~0); "
        f"{100 * sp['summary']['share_active_push_le_5pct']:.1f} % of active pushes ≤ 5 % of the score "
        f"(paper-like sparsity: {'yes' if sp['summary']['share_active_push_le_5pct'] > 0.5 and sp['summary']['active_share'] < 0.4 else 'no, denser and larger pushes on this model'}).",
        f"Cost ratio at batch {P['cost_batch']}: {cost['ratio']:.3f} (target ≤ 1.05: {'met' if cost['ratio'] <= 1.05 else 'missed'}).",
    ]

    R.update(curves=curves, recommendation=recommendation, chosen_r=chosen_r, shield_summary=ssum, targets=targets)


def finish(R: dict, write_json: bool) -> None:
    """results.json (optional), plots and the markdown report from the results dict R."""
    quick = "--quick" in R["command"]
    analyse(R)
    P, res, sp = R["plan"], R["diversity"]["results"], R["sparsity"]
    base = next(r for r in res if r["method"] == "baseline")["mean"]
    OUT.mkdir(parents=True, exist_ok=True)
    if write_json:
        (OUT / ("results_quick.json" if quick else "results.json")).write_text(json.dumps(R, indent=1, default=float))
    methods = ["baseline", "SPELL mutual", "SPELL ordered", "SPELL memory", "CADS", "Particle Guidance", "Interval guidance"]
    panels = []
    for key, name in (("vendi_batch", "Vendi (batch of 8)"), ("recall", "recall (k=5)")):
        b0 = (base["precision"], base[key])  # every knob's zero (or full-interval) end is the baseline
        series = []
        for m in methods:  # points joined in knob order, starting at the baseline (knob 0 / the full interval)
            rows = sorted((r for r in res if r["method"] == m), key=lambda r: r["knob"] or 0.0,
                          reverse=(m == "Interval guidance"))
            pts = [(r["mean"]["precision"], r["mean"][key]) for r in rows]
            if pts and m not in ("baseline", "SPELL memory"):
                pts = [b0] + pts
            if pts:
                series.append((m, [p for p, _ in pts], [y for _, y in pts]))
        panels.append(dict(xlabel="precision (k=5)", ylabel=name, series=series))
    plot(OUT / "tradeoff.png", panels, "Diversity vs precision on the demo model, each method's knob swept "
                                       "(mean over prompts)")
    ts = [(r["t_lo"] + r["t_hi"]) / 2 for r in sp["rows"]]
    plot(OUT / "sparsity.png", [
        dict(xlabel="normalised time t (1 = noise)", ylabel="share of (step, image) pairs with push active",
             series=[("active share", ts, [r["active_share"] for r in sp["rows"]])]),
        dict(xlabel="normalised time t (1 = noise)", ylabel="||delta|| / ||x0_hat - x_t|| (active pairs)",
             series=[("median push (active)", ts, [r["push_median"] for r in sp["rows"]]),
                     ("p90 push (active)", ts, [r["push_p90"] for r in sp["rows"]])]),
    ], f"SPELL sparsity, in_batch mutual, r = {P['default_r']}")

    md = write_report(R, argparse.Namespace(quick=quick))
    out = ROOT / R["out"]  # relative to the repository, or absolute
    out.write_text(md)
    for t in R["targets"]:
        log("TARGET " + t)
    log(f"wrote {out}, {OUT}/tradeoff.png, {OUT}/sparsity.png")


def train_nn_median(z: torch.Tensor) -> float:
    from spell_core.repellency import flat32, rms_cdist
    d = rms_cdist(flat32(z), flat32(z))
    d.fill_diagonal_(float("inf"))
    return float(d.min(1).values.median())


def recommend(res, base, radius, P):
    """The in_batch default and radius guidance, from the measurements (text for the report)."""
    dr = P["default_r"]
    by = {(r["method"], r["knob"]): r["mean"] for r in res}
    common = [k for m, k in by if m == "SPELL ordered" and ("SPELL mutual", k) in by]
    lines = []
    for k in sorted(common):
        mu, od = by[("SPELL mutual", k)], by[("SPELL ordered", k)]
        lines.append(f"r = {k}: mutual Vendi {mu['vendi_batch']:.3f} / recall {mu['recall']:.3f} / precision "
                     f"{mu['precision']:.3f} / FD {mu['fd']:.1f}; ordered {od['vendi_batch']:.3f} / {od['recall']:.3f} / "
                     f"{od['precision']:.3f} / {od['fd']:.1f}")
    # at equal precision: a point of one mode is beaten when the other mode's curve (baseline included) reaches
    # more Vendi at equal or higher precision
    env = {m: curve(res, f"SPELL {m}", "precision", "vendi_batch") + [(base["precision"], base["vendi_batch"])]
           for m in ("mutual", "ordered")}
    wins = {"mutual": 0, "ordered": 0}
    for m, other in (("mutual", "ordered"), ("ordered", "mutual")):
        for p, v in curve(res, f"SPELL {other}", "precision", "vendi_batch"):
            best = interp_upper(env[m], p)
            wins[m] += best is not None and best > v + 0.01  # ignore differences within 0.01 Vendi
    n_pts = {m: len(curve(res, f"SPELL {m}")) for m in ("mutual", "ordered")}
    choice = "ordered" if wins["ordered"] > wins["mutual"] else "mutual"
    chosen_r = pick_default_radius(res, base)
    nn_lo = min(g["nn_in_batch"][0] for g in radius.values())
    nn_med = [g["nn_in_batch"][2] for g in radius.values()]
    pair_med = [g["pairwise"][2] for g in radius.values()]
    r_lo = statistics.median(g["nn_in_batch"][1] for g in radius.values())
    r_hi = statistics.median(g["pairwise"][2] for g in radius.values())
    other = "ordered" if choice == "mutual" else "mutual"
    counts = (f"mutual's curve reaches more Vendi (batch, by > 0.01) at equal or higher precision than {wins['mutual']} "
              f"of {n_pts['ordered']} ordered points; ordered's curve beats {wins['ordered']} of {n_pts['mutual']} mutual points")
    if wins["mutual"] == wins["ordered"]:
        why = (f"because at equal precision neither mode is better here ({counts}), and a tie keeps mutual: it is "
               "symmetric, no image of the batch is privileged or left as the unpatched sample")
    else:
        why = f"because at equal precision {choice}'s curve is the better one more often ({counts})"
    text = (f"**Default in_batch: {choice}**, {why}"
            + ". At the radii where both were run: " + "; ".join(lines) + ". "
            "Both modes use the same push; mutual treats every image alike (each is pushed by all others, so a close "
            "pair splits symmetrically and each moves about half as far), ordered leaves image 0 exactly the "
            "unpatched sample and pushes later images away from earlier ones (the whole move falls on the later "
            "image, so late images of a large batch are pushed hardest).\n\n"
            f"**Radius.** Baseline outputs' nearest other image in the batch lies at RMS {', '.join(map(str, nn_med))} "
            f"(median per prompt, {', '.join(radius)}) and batch pairs at a median of {', '.join(map(str, pair_med))}; the "
            f"10 % quantile of nearest-neighbour distances is ≥ {nn_lo}. Below about {nn_lo} SPELL almost never acts; "
            f"above the median pairwise distance every image pushes every other one and precision falls. "
            f"The largest swept r whose mean precision stays within 0.05 of the baseline's is "
            f"{chosen_r if chosen_r is not None else 'none of the swept radii'}; the benchmark's default point was r = {dr}. "
            "Sensible range, per prompt (from the lower quartile of in-batch nearest-neighbour distances, where "
            "only the closest pairs are pushed, to the median pairwise distance, where most pairs are): "
            + "; ".join(f"\"{p}\" {g['nn_in_batch'][1]:.2f}–{g['pairwise'][2]:.2f}" for p, g in radius.items())
            + f" (medians over prompts: {r_lo:.2f}–{r_hi:.2f}). The radius is absolute, so one value acts very "
            "differently on a spread-out prompt (\"any digit\") and on a tight single-class prompt: a radius that "
            "suits \"any digit\" pushes nearly every pair of a single-class batch and costs precision there (per-prompt "
            "table below). "
            + (f"**Recommended default radius for the demo model: r = {chosen_r}** (the largest swept radius whose mean "
               f"precision stays within 0.05 of the baseline's); the node's shipped default is 0.5. "
               if chosen_r is not None else "No swept radius keeps precision within 0.05 of the baseline's. ")
            + "For shielding against a training set, r is a different quantity (how close counts as a copy), see section 3.")
    return text, chosen_r


if __name__ == "__main__":
    main()
