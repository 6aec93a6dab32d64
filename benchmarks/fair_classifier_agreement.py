"""How far the fair LoRA's training classifier and the judge agree on the demo model's own images, and what that
bounds: the bias the judge would still see if a LoRA made the training classifier read exactly the target.

The fair LoRA (``demo.train_fair_lora``) steers by a latent classifier trained on real digits; the judge of
``benchmarks/fair_lora_eval.py`` is the demo's evaluator (another network, on decoded pixels). Both are right on
real digits (held-out accuracy 0.986 and 0.992), but "any digit" outputs of the demo model hold ambiguous images
where two networks split differently. For each classifier variant (each made with the pack's own SPELL Latent
Classifier Trainer) this measures on ``--images`` base and LoRA images ("any digit", euler, 20 steps, CFG 4):
- agreement with the judge (argmax), overall and by the judge's own confidence;
- the confusion P(judge = j | classifier = c), and from it the judge's shares when the classifier's shares equal
  the target: ``target @ P``, with its bias (mean pairwise |freq_i - freq_j|, as fair_lora_eval) and worst class.
  A LoRA that satisfies the classifier perfectly, without changing how the two networks split the images it
  draws, lands there.
Variants: the shipped recipe (training split, adversarial robustness 0.1); robustness 0 and 0.2; the training
split plus ``--generated`` of the demo model's own images per single-digit prompt, labelled by their prompt
(``demo.train_fair_lora --generated``: stock KSampler + VAE Decode, as a user makes them); the mean probability
of 4 classifiers of the robustness-0.1 recipe (seeds 0-3); ensembles of 4 (SPELL Latent Classifier Trainer's
``members``, the mean probability of seeds 0-3, ``spell_core.finetune.ClassifierEnsemble``) at robustness 0.15 and
0.2 (0.2: the demo LoRA's since stop 32). ``--only NAME`` (repeatable) measures only those variants.

    .venv/bin/python -m benchmarks.fair_classifier_agreement [--lora demo_fair_digits] [--images 1000]
    .venv/bin/python -m benchmarks.fair_classifier_agreement --weights demo_model_6000.safetensors --no-lora \
        --out docs/fairness/classifier_agreement_demo_model_6000     # another demo model file, its base images only
    .venv/bin/python -m benchmarks.fair_classifier_agreement --no-lora --only "ensemble of 4 at robustness 0.2" \
        --out docs/fairness/classifier_agreement_ensembles

Writes docs/fairness/classifier_agreement.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from demo import DEFAULT_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def implied(confusion: torch.Tensor, target: torch.Tensor, bias) -> dict:
    """The judge's shares when the classifier reads exactly ``target``: target @ P(judge | classifier)."""
    rows = confusion.double()
    p = rows / rows.sum(1, keepdim=True).clamp_min(1)
    share = target.double() @ p
    return {"share": [round(float(v), 4) for v in share], "bias": round(bias(share), 4),
            "max_points_off": round(float(100 * (share - target.double()).abs().max()), 2),
            "empty_rows": int((rows.sum(1) == 0).sum())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lora", default="demo_fair_digits")
    ap.add_argument("--images", type=int, default=1000, help="base and LoRA images each")
    ap.add_argument("--generated", type=int, default=100, help="generated images per digit prompt of that variant")
    ap.add_argument("--weights", default=None, help="demo model file in demo/weights (default: SPELL Demo Model "
                    "Loader's)")
    ap.add_argument("--only", action="append", default=None, help="measure only this variant (repeatable; names as "
                    "in the report)")
    ap.add_argument("--no-lora", dest="lora_images", action="store_false",
                    help="base images only (a LoRA trained on one demo model means nothing on another)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "fairness" / "classifier_agreement"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t_start = time.time()
    from tools import comfy_host

    comfy = comfy_host.start(tempfile.mkdtemp(prefix="spell-agreement-"))

    from demo.data import latents_to_images16
    from demo.evaluator import load_evaluator
    from benchmarks.fair_lora_eval import demo_with_lora
    from demo.train_fair_lora import training_classifier
    from spell_core import fairness

    nodes = comfy.NODE_CLASS_MAPPINGS
    model, lora_model, vae, prompts = demo_with_lora(comfy, args.lora, args.weights)
    encode = nodes["SpellDemoClassPrompt"]().encode
    neg = encode(prompts, "(empty)")[0]
    target = torch.full((10,), 0.1)
    ev = load_evaluator()

    def sample(m, prompt, n, seed0):
        return torch.cat([comfy.common_ksampler(m, seed0 + k, 20, 4.0, "euler", "normal", encode(prompts, prompt)[0],
                                                neg, {"samples": torch.zeros(min(50, n - a), 4, 8, 8)})[0]["samples"]
                          for k, a in enumerate(range(0, n, 50))])

    print(f"sampling {args.images} base" + (f" and {args.images} LoRA" if args.lora_images else "") + " images",
          file=sys.stderr, flush=True)
    images = {"base": sample(model, "any digit", args.images, 300_000)}
    if args.lora_images:
        images["LoRA"] = sample(lora_model, "any digit", args.images, 300_000)
    with torch.no_grad():
        judged = {k: ev.predict(latents_to_images16(v)) for k, v in images.items()}
    results = {"lora": args.lora if args.lora_images else None, "weights": args.weights or DEFAULT_WEIGHTS,
               "images": args.images, "generated": args.generated, "judge": {}, "variants": {}}
    bins = ((0.0, 0.8), (0.8, 0.95), (0.95, 1.01))
    for k, p in judged.items():
        conf = p.max(1).values
        f = torch.bincount(p.argmax(1), minlength=10).double() / len(p)
        results["judge"][k] = {"share": [round(float(v), 4) for v in f], "bias": round(fairness.bias(f), 4),
                               "confidence_below_0.8": round(float((conf < 0.8).double().mean()), 4),
                               "confidence_below_0.95": round(float((conf < 0.95).double().mean()), 4)}

    def classifier(name, robustness=0.1, seed=0, generated=0, members=1):  # as demo.train_fair_lora trains it
        return training_classifier(comfy, model, vae, prompts, robustness, generated, seed, name, members)[0]

    variants = {
        "shipped recipe (robustness 0.1)": lambda: [classifier("agree_shipped")],
        "robustness 0": lambda: [classifier("agree_r0", robustness=0.0)],
        "robustness 0.2": lambda: [classifier("agree_r02", robustness=0.2)],
        f"+ {args.generated} generated per digit prompt": lambda: [classifier("agree_gen", generated=args.generated)],
        "mean of 4 (seeds 0-3)": lambda: [classifier(f"agree_seed{s}", seed=s) for s in range(4)],
        "ensemble of 4 at robustness 0.15": lambda: [classifier("agree_e4_r015", robustness=0.15, members=4)],
        "ensemble of 4 at robustness 0.2": lambda: [classifier("agree_e4_r02", robustness=0.2, members=4)],
    }
    if args.only:
        unknown = sorted(set(args.only) - set(variants))
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; choose from {list(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.only}
    for name, make in variants.items():
        t0 = time.time()
        nets = make()
        row = {"held_out_accuracy": [n.meta.get("held_out_accuracy") for n in nets]}
        for k, lat in images.items():
            with torch.no_grad():
                read = torch.stack([n(lat.float()).softmax(1) for n in nets]).mean(0).argmax(1)
            judge = judged[k].argmax(1)
            conf = judged[k].max(1).values
            agree = read == judge
            confusion = torch.zeros(10, 10, dtype=torch.long)
            confusion.index_put_((read, judge), torch.ones_like(read), accumulate=True)
            row[k] = {"agreement": round(float(agree.double().mean()), 4),
                      "agreement_by_judge_confidence": {f"{lo}-{min(hi, 1.0)}": [int(((conf >= lo) & (conf < hi)).sum()),
                                                        round(float(agree[(conf >= lo) & (conf < hi)].double().mean()), 4)]
                                                        for lo, hi in bins},
                      "classifier_share": [round(float(v), 4) for v in torch.bincount(read, minlength=10) / len(read)],
                      "judge_if_classifier_reads_target": implied(confusion, target, fairness.bias)}
        row["seconds"] = round(time.time() - t0, 1)
        results["variants"][name] = row
        print(name, json.dumps({k: (v["agreement"], v["judge_if_classifier_reads_target"]["bias"])
                                for k, v in row.items() if isinstance(v, dict)}), file=sys.stderr, flush=True)
    results["total_seconds"] = round(time.time() - t_start, 1)
    results["out"] = args.out
    results["command"] = "python -m benchmarks.fair_classifier_agreement " + " ".join(argv or sys.argv[1:])
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(report(results))
    print(report(results))
    return 0


def report(r: dict) -> str:
    base_bias = r["judge"]["base"]["bias"]
    lines = [f"# Training classifier against the judge ({r.get('weights', 'demo_model.safetensors')}"
             + (f", {r['lora']})" if r["lora"] else ")"), "",
             (f"Made by `{r['command'].strip()}` ({r['total_seconds']} s, 2 torch threads); raw numbers in "
             f"`{Path(r['out']).name}.json`. {r['images']} base" + (f" and {r['images']} LoRA" if r["lora"] else "")
             + f" images of \"any digit\" (euler, "
             f"20 steps, CFG 4, seeds 300000+). Target: uniform over the ten digits."
             + ("" if r["lora"] else " Base images only.")), "",
             "| images | judge's bias | judge's confidence < 0.8 | < 0.95 |", "|---|---|---|---|"]
    for k, v in r["judge"].items():
        lines.append(f"| {k} | {v['bias']} | {100 * v['confidence_below_0.8']:.1f} % | "
                     f"{100 * v['confidence_below_0.95']:.1f} % |")
    lines += ["", ("Per classifier variant: agreement with the judge (argmax), by the judge's confidence (images, "
              "agreement), and the judge's bias and worst class if the classifier read exactly the target on these "
              f"images (`target @ P(judge | classifier)`; the issue's 80 % cut is a judge's bias of "
              f"{0.2 * base_bias:.4f} against the base's {base_bias} here)."), "",
              ("| variant | held-out accuracy | on | agreement | judge conf. < 0.8 | 0.8-0.95 | >= 0.95 | "
              "judge's bias if the classifier reads the target | worst class, points |"), "|---|---|---|---|---|---|---|---|---|"]
    for name, row in r["variants"].items():
        for k in ("base", "LoRA"):
            if k not in row:
                continue
            v = row[k]
            by = list(v["agreement_by_judge_confidence"].values())
            i = v["judge_if_classifier_reads_target"]
            acc = ", ".join(f"{a:.3f}" for a in row["held_out_accuracy"] if a is not None)
            lines.append(f"| {name} | {acc} | {k} | {v['agreement']:.3f} | " + " | ".join(f"{n}: {a:.3f}" for n, a in by)
                         + f" | {i['bias']} | {i['max_points_off']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
