"""Fair generation on the demo model: does SPELL Distribution Guidance bring the digit classes of "any digit"
samples (a deliberately biased prompt) to a uniform target, and what does it cost in quality?

Everything runs through the pack's nodes and ComfyUI's own KSampler (euler, 20 steps, CFG 4). The attribute is the
digit class that ``demo/evaluator.py`` predicts on the decoded samples (not the heads the guidance uses).

Metrics: bias = mean pairwise |freq_i − freq_j| (Shen et al.), TV distance to the target, precision/recall and
Fréchet distance of evaluator features against the 360 held-out real digits (spell_core.metrics), similarity to
the unguided sample of the same seed (cosine of evaluator features, share keeping its class, latent RMS change).

    .venv/bin/python -m benchmarks.fairness_eval [--quick] [--memory-runs 100] [--out docs/fairness/results.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET = ", ".join(f"{d}: 0.1" for d in range(10))
STRENGTH = {"per-image assignment": 100.0, "per-image draw": 100.0}
BATCH_MEAN_STRENGTHS = (1000.0, 3000.0)  # the batch mean's gradient is small: calibrated at batch 16 below


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    ap.add_argument("--memory-runs", type=int, default=None, help="runs of batch 4 with the running count "
                                                                     "(default 100; 10 with --quick)")
    ap.add_argument("--memory-only", action="store_true", help="only the running-count experiment")
    ap.add_argument("--heads", help="a heads file from an earlier run (skips training; benchmark-only shortcut)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "fairness" / "results.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    t_start = time.time()

    from tools import comfy_host

    comfy = comfy_host.start(tempfile.mkdtemp(prefix="spell-fairness-"))
    fairness = comfy_host.pack_module().spell_core.fairness
    from spell_core import metrics
    from demo.data import digits_split, latents_to_images16
    from demo.evaluator import load_evaluator

    nodes = comfy.NODE_CLASS_MAPPINGS
    model, vae, prompts = nodes["SpellDemoModelLoader"]().load()
    pos = nodes["SpellDemoClassPrompt"]().encode(prompts, "any digit")[0]
    neg = nodes["SpellDemoClassPrompt"]().encode(prompts, "(empty)")[0]
    ev = load_evaluator()
    test_images, _ = digits_split()["test"]
    with torch.no_grad():
        real = ev.features(test_images)

    # 1. heads: 100 training digits per class, 8 noise levels, full 4x4 h
    t0 = time.time()
    if args.heads:
        heads = fairness.AttributeHeads.load(args.heads)
        head_report = f"loaded {args.heads}\n" + heads.describe()
    else:
        images, labels = nodes["SpellDemoDigitExamples"]().load(100)
        heads, head_report = nodes["SpellAttributeHeadTrainer"]().train(
            model, vae, pos, "(none)", "bench_digits", 64, 64, 8, 4, 0.2, 0, True, images=images,
            labels=labels)["result"]
    train_s = time.time() - t0
    p = fairness.parse_target(TARGET, heads.classes)

    def sample(m, batch, seed):
        out = comfy.common_ksampler(m, seed, 20, 4.0, "euler", "normal", pos, neg,
                                    {"samples": torch.zeros(batch, 4, 8, 8)})[0]["samples"]
        return out

    def guided(loss, strength, count=None):
        if loss == "unguided":
            return model
        return nodes["SpellDistributionGuidance"]().patch(model, heads, TARGET, strength, loss, 8.0, "chi-square",
                                                          count=count)[0]

    def evaluate(lat):
        x = latents_to_images16(lat)
        with torch.no_grad():
            return ev.predict(x).argmax(1), ev.features(x)

    def freq(classes):
        return torch.bincount(classes, minlength=10).double() / classes.numel()

    def summary(classes):
        f = freq(classes)
        return {"n": int(classes.numel()), "bias": fairness.bias(f), "tv": 0.5 * float((f - p).abs().sum()),
                "counts": torch.bincount(classes, minlength=10).tolist()}

    # batch -> seeds (images per configuration = batch x seeds)
    plan = {4: range(100, 108), 16: range(200, 204), 64: range(300, 301)}
    if args.quick:
        plan = {4: range(100, 102), 16: range(200, 201), 64: range(300, 301)}

    cache = {}

    def run_config(loss, strength, batch, seeds):
        key = (loss, strength, batch, tuple(seeds))
        if key not in cache:
            m = guided(loss, strength)
            lats = torch.cat([sample(m, batch, s) for s in seeds])
            cache[key] = (lats,) + evaluate(lats)
        return cache[key]

    # 2. calibrate the batch mean's strength at batch 16 (first seed only)
    calib = {}
    for s in () if args.memory_only else BATCH_MEAN_STRENGTHS:
        calib[s] = summary(run_config("batch mean", s, 16, plan[16][:1])[1])["bias"]
    STRENGTH["batch mean"] = min(calib, key=calib.get) if calib else BATCH_MEAN_STRENGTHS[0]

    methods = [] if args.memory_only else ["unguided", "batch mean", "per-image assignment", "per-image draw"]
    results = {"target": TARGET, "heads": head_report, "train_seconds": round(train_s, 1),
               "strengths": dict(STRENGTH), "batch_mean_calibration_bias": {str(k): v for k, v in calib.items()},
               "plan": {str(b): len(s) for b, s in plan.items()}, "per_batch": {}, "quality": {}}
    for method in methods:
        strength = STRENGTH.get(method, 0.0)
        all_lat, all_cls, all_feat = [], [], []
        for batch, seeds in plan.items():
            lat, cls, feat = run_config(method, strength, batch, seeds)
            base_lat, base_cls, base_feat = run_config("unguided", 0.0, batch, seeds)
            row = summary(cls)
            row["mean_batch_bias"] = float(sum(fairness.bias(freq(c)) for c in cls.split(batch)) / len(seeds))
            row["same_class_as_unguided"] = float((cls == base_cls).double().mean())
            row["feature_cosine_to_unguided"] = float(torch.nn.functional.cosine_similarity(feat, base_feat).mean())
            row["latent_rms_change"] = float((lat - base_lat).pow(2).mean().sqrt())
            results["per_batch"].setdefault(method, {})[str(batch)] = row
            all_lat.append(lat), all_cls.append(cls), all_feat.append(feat)
            print(method, batch, row, flush=True)
        feats = torch.cat(all_feat)
        q = metrics.prdc(real, feats, k=5)
        q["frechet"] = metrics.frechet_distance(real, feats)
        q["n"] = int(feats.shape[0])
        results["quality"][method] = q
        print(method, "quality", q, flush=True)

    # 3. many small runs with the running count (per-image assignment), batch 4
    runs = args.memory_runs or (10 if args.quick else 100)
    count = nodes["SpellFairnessCount"]().open("bench", True)[0]
    m = guided("per-image assignment", STRENGTH["per-image assignment"], count)
    t0 = time.time()
    classes = []
    for r in range(runs):
        lat = sample(m, 4, 1000 + r)
        classes.append(evaluate(lat)[0])
    cls = torch.cat(classes)
    mem = summary(cls)
    f = freq(cls)
    mem.update(runs=runs, seconds=round(time.time() - t0, 1), max_abs_points_off=float(100 * (f - p).abs().max()),
               heads_running_count=count.counts(heads.classes).long().tolist())
    results["memory_batch4"] = mem
    print("memory", mem, flush=True)

    results["checks"] = {"memory_every_class_within_5_points": mem["max_abs_points_off"] <= 5.0}
    if methods:
        base16 = results["per_batch"]["unguided"]["16"]["bias"]
        results["checks"]["bias_cut_at_batch16"] = {
            m_: 1 - results["per_batch"][m_]["16"]["bias"] / base16 for m_ in methods[1:]}
        results["checks"]["precision_drop"] = {
            m_: results["quality"]["unguided"]["precision"] - results["quality"][m_]["precision"] for m_ in methods[1:]}
    results["total_seconds"] = round(time.time() - t_start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["checks"], indent=1), "\ntotal", results["total_seconds"], "s")


if __name__ == "__main__":
    main()
