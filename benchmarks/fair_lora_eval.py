"""The demo's fair LoRA against the base model and the sampling-time guidance, side by side in one run.

Every image comes from ComfyUI's own KSampler (euler, 20 steps, CFG 4); the LoRA is applied by ComfyUI's stock
LoraLoaderModelOnly. The judge is the demo's evaluator on decoded pixels (``demo/evaluator.py``), not the latent
classifier the LoRA was trained with. Methods on "any digit", `--images` images each:
- base model; LoRA at batch 1 (every image sampled alone); LoRA + SPELL Distribution Guidance (per-image
  assignment) at batch 16; the guidance alone at batch 1, 4 and 16.
Metrics: bias (mean pairwise |freq_i − freq_j|), per-class share against the target, precision/recall and Fréchet
distance of evaluator features against the 360 held-out digits; for each single-digit prompt: class accuracy and
same-seed evaluator-feature cosine to the base model (collateral damage); sampling time of the LoRA model
against the base (interleaved, same batches; the median of the pairs' ratios); how often the training classifier
(retrained as demo.train_fair_lora trains it) agrees with the judge; what a model drawing exactly the target would
score on as many images (the counting floor). ``--count-images`` more base and LoRA images in batches of 16 (each
image drawn as at batch 1) resolve shares that 500 images cannot.

    .venv/bin/python -m benchmarks.fair_lora_eval [--lora demo_fair_digits] [--images 500] [--quick]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIME_ROUNDS = 30  # base/LoRA pairs of batches timed for the sampling time ratio


def exact_draws(bias, p: torch.Tensor, n: int, trials: int = 2000) -> dict:
    """What a model that draws exactly the target scores on n images (multinomial, fixed seed): the floor under
    the bias and the points off, set by counting n images alone."""
    g = torch.Generator().manual_seed(0)
    counts = torch.stack([torch.bincount(torch.multinomial(p.double(), n, True, generator=g), minlength=len(p))
                          for _ in range(trials)]).double()
    f = counts / n
    b = torch.tensor([bias(row) for row in f])
    off = 100 * (f - p.double()).abs().max(1).values
    return {"images": n, "trials": trials, "bias_median": round(float(b.median()), 4),
            "bias_95": round(float(b.quantile(0.95)), 4), "max_points_off_median": round(float(off.median()), 2),
            "share_within_3_points": round(float((off <= 3).double().mean()), 3)}


def count_checks(results: dict, count: int) -> dict:
    """The bias cut and worst class of the LoRA on the --count-images rows (empty without them)."""
    rows = {k.split(",")[0]: v for k, v in results["methods"].items() if "in batches of 16" in k}
    if not count or len(rows) < 2:
        return {}
    b, l = rows["base"], rows["LoRA"]
    return {f"bias_cut_lora_{l['n']}_images": 1 - l["bias"] / b["bias"], f"max_points_off_lora_{l['n']}_images":
            l["max_points_off"], f"precision_drop_lora_{l['n']}_images": b["precision"] - l["precision"]}


def demo_with_lora(comfy, lora: str, weights: str | None = None):
    """The demo model (or demo/weights/<weights>), the same with demo/weights/<lora>.safetensors applied by ComfyUI's
    stock LoraLoaderModelOnly (copied into models/loras first), its VAE and prompts."""
    import folder_paths

    nodes = comfy.NODE_CLASS_MAPPINGS
    loras = Path(folder_paths.get_folder_paths("loras")[0])
    loras.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ROOT / "demo" / "weights" / f"{lora}.safetensors", loras / f"{lora}.safetensors")
    model, vae, prompts = nodes["SpellDemoModelLoader"]().load(*([weights] if weights else []))
    lora_model = nodes["LoraLoaderModelOnly"]().load_lora_model_only(model, f"{lora}.safetensors", 1.0)[0]
    return model, lora_model, vae, prompts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lora", default="demo_fair_digits", help="a LoRA in demo/weights (name without .safetensors)")
    ap.add_argument("--target", default=", ".join(f"{d}: 0.1" for d in range(10)))
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--count-images", type=int, default=2000, help="images of the base model and of the LoRA drawn "
                    "in batches of 16 as well, for shares the count of --images alone cannot resolve (0: none)")
    ap.add_argument("--per-digit", type=int, default=64, help="images per single-digit prompt")
    ap.add_argument("--robustness", type=float, default=0.2, help="the robustness the LoRA's training classifier "
                    "was trained with (demo.train_fair_lora --robustness), to retrain the same one for the agreement")
    ap.add_argument("--members", type=int, default=1, help="the --members of demo.train_fair_lora, likewise")
    ap.add_argument("--generated", type=int, default=0, help="the --generated of demo.train_fair_lora (its "
                    "classifier's generated examples per digit prompt), likewise")
    ap.add_argument("--weights", default=None, help="the demo model file in demo/weights the LoRA was trained on "
                    "(default: SPELL Demo Model Loader's, demo_model_6000.safetensors)")
    ap.add_argument("--skip-guidance", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t_start = time.time()
    from tools import comfy_host

    comfy = comfy_host.start(tempfile.mkdtemp(prefix="spell-fair-lora-eval-"))

    pack = comfy_host.pack_module()
    fairness = pack.spell_core.fairness
    from spell_core import metrics
    from demo.data import digits_split, latents_to_images16
    from demo.evaluator import load_evaluator

    nodes = comfy.NODE_CLASS_MAPPINGS
    model, lora_model, vae, prompts = demo_with_lora(comfy, args.lora, args.weights)
    encode = nodes["SpellDemoClassPrompt"]().encode
    pos, neg = encode(prompts, "any digit")[0], encode(prompts, "(empty)")[0]
    ev = load_evaluator()
    test_images, _ = digits_split()["test"]
    with torch.no_grad():
        real = ev.features(test_images)
    p = fairness.parse_target(args.target, [str(d) for d in range(10)])
    # the training classifier, retrained exactly as demo.train_fair_lora trains it (same data, seed, settings), to
    # measure how often it agrees with the judge: a LoRA that fools it more than it changes digits lowers this
    from demo.train_fair_lora import training_classifier

    steer = training_classifier(comfy, model, vae, prompts, args.robustness, args.generated, name="eval_steer",
                                members=args.members)[0]

    def sample(m, batch, seed, cond=pos):
        return comfy.common_ksampler(m, seed, 20, 4.0, "euler", "normal", cond, neg,
                                     {"samples": torch.zeros(batch, 4, 8, 8)})[0]["samples"]

    def evaluate(lat):
        x = latents_to_images16(lat)
        with torch.no_grad():
            return ev.predict(x).argmax(1), ev.features(x)

    def run(m, batch, n, seed0=100_000, cond=pos):
        lats, t = [], time.perf_counter()
        for k in range(n // batch):
            lats.append(sample(m, batch, seed0 + k, cond))
        lat = torch.cat(lats)
        return lat, time.perf_counter() - t

    def summary(lat, feats, cls):
        f = torch.bincount(cls, minlength=10).double() / cls.numel()
        q = metrics.prdc(real, feats, k=5)
        return {"n": int(cls.numel()), "bias": fairness.bias(f), "share": [round(float(v), 4) for v in f],
                "max_points_off": float(100 * (f - p).abs().max()), "precision": q["precision"],
                "recall": q["recall"], "frechet": metrics.frechet_distance(real, feats)}

    results = {"lora": args.lora, "target": args.target, "images": args.images, "robustness": args.robustness, "members": args.members,
               "generated": args.generated,
               "methods": {}}

    def record(name, lat, seconds, batch):
        cls, feats = evaluate(lat)
        row = summary(lat, feats, cls)
        with torch.no_grad():
            row["training_classifier_agrees"] = float((steer(lat.float()).argmax(1) == cls).double().mean())
        row.update(batch=batch, seconds=round(seconds, 2))
        results["methods"][name] = row
        print(name, {k: v for k, v in row.items() if k != "share"}, flush=True)
        return cls, feats

    n = args.images
    base_lat, base_s = run(model, 1, n)
    record("base, batch 1", base_lat, base_s, 1)
    lora_lat, lora_s = run(lora_model, 1, n)
    record("LoRA, batch 1", lora_lat, lora_s, 1)
    if args.count_images:
        # Neither the base model nor the merged LoRA lets the images of a batch interact: each image of a batch of
        # 16 is drawn exactly as at batch 1, from its own noise (only which noise goes with which seed differs),
        # so these rows measure the batch-1 distribution on more images, 16x faster.
        for name, m in (("base", model), ("LoRA", lora_model)):
            lat, s = run(m, 16, args.count_images, seed0=400_000)
            record(f"{name}, {lat.shape[0]} images in batches of 16", lat, s, 16)
    # sampling time: rounds of one batch of 16 each, the same seed, the order alternating; the ratio is the median
    # of the rounds' ratios (a mean of totals let one slow batch on a shared machine move it by 4 %)
    ratios = []
    for k in range(TIME_ROUNDS):
        took = {}
        for name, m in (("base", model), ("LoRA", lora_model)) if k % 2 else (("LoRA", lora_model), ("base", model)):
            t = time.perf_counter()
            sample(m, 16, 200_000 + k)
            took[name] = time.perf_counter() - t
        ratios.append(took["LoRA"] / took["base"])
    results["sampling_time_ratio"] = statistics.median(ratios)
    results["sampling_time_ratio_quartiles"] = [round(float(q), 4) for q in statistics.quantiles(ratios, n=4)]
    print("sampling time ratio LoRA/base", results["sampling_time_ratio"], flush=True)

    if not args.skip_guidance:
        images, labels = nodes["SpellDemoDigitExamples"]().load(100)
        heads = nodes["SpellAttributeHeadTrainer"]().train(model, vae, pos, "(none)", "bench_digits", 64, 64, 8, 4,
                                                           0.2, 0, True, images=images, labels=labels)["result"][0]
        guide = nodes["SpellDistributionGuidance"]()
        guided = guide.patch(model, heads, args.target, 100.0, "per-image assignment", 8.0, "chi-square")[0]
        both = guide.patch(lora_model, heads, args.target, 100.0, "per-image assignment", 8.0, "chi-square")[0]
        for batch in (1, 4, 16):
            lat, s = run(guided, batch, n)
            record(f"guidance alone, batch {batch}", lat, s, batch)
        lat, s = run(both, 16, n)
        record("LoRA + guidance, batch 16", lat, s, 16)

    # collateral damage: each single-digit prompt, base against LoRA, same seeds
    collateral = {}
    for d in range(10):
        cond = encode(prompts, str(d))[0]
        b_lat, _ = run(model, 16, args.per_digit, 300_000 + 1000 * d, cond)
        l_lat, _ = run(lora_model, 16, args.per_digit, 300_000 + 1000 * d, cond)
        (b_cls, b_feat), (l_cls, l_feat) = evaluate(b_lat), evaluate(l_lat)
        collateral[str(d)] = {
            "accuracy_base": float((b_cls == d).double().mean()), "accuracy_lora": float((l_cls == d).double().mean()),
            "feature_cosine": float(torch.nn.functional.cosine_similarity(b_feat, l_feat).mean())}
        print("digit", d, collateral[str(d)], flush=True)
    results["single_digit_prompts"] = collateral
    results["exact_target_draws"] = exact_draws(fairness.bias, p, n)
    if args.count_images:
        results["exact_target_draws_count_images"] = exact_draws(fairness.bias, p, args.count_images // 16 * 16)
    print("n draws from the target itself", results["exact_target_draws"], flush=True)
    base, lora = results["methods"]["base, batch 1"], results["methods"]["LoRA, batch 1"]
    results["checks"] = {
        "bias_cut_lora_batch1": 1 - lora["bias"] / base["bias"],
        "max_points_off_lora_batch1": lora["max_points_off"],
        **count_checks(results, args.count_images),
        "precision_drop_lora": base["precision"] - lora["precision"],
        "min_single_digit_accuracy_lora": min(v["accuracy_lora"] for v in collateral.values()),
        "min_single_digit_feature_cosine": min(v["feature_cosine"] for v in collateral.values()),
        "sampling_time_ratio": results["sampling_time_ratio"],
    }
    results["total_seconds"] = round(time.time() - t_start, 1)
    # another base model's results never overwrite the shipped model's file of the same LoRA name
    stem = args.lora + (f".{Path(args.weights).stem}" if args.weights else "")
    out = Path(args.out or ROOT / "docs" / "fairness" / f"{stem}.eval.json")
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["checks"], indent=1), "\ntotal", results["total_seconds"], "s")


if __name__ == "__main__":
    main()
