"""Trains the demo's fair LoRA: "any digit" (which the demo model draws with about 32 % ones and 21 % sevens)
toward a uniform share of the ten digits, through the pack's own nodes in a headless ComfyUI: SPELL Latent
Classifier Trainer on the demo's training digits, then SPELL Fair LoRA Trainer with the ten single-digit prompts
kept.

    .venv/bin/python -m demo.train_fair_lora [--method resampled|alignment] [--target "1: 0.3, ..."] [--out NAME]

--method resampled (the default; the demo LoRA since stop 33): the trainer draws 4000 images of "any digit" with
the frozen model, weights each by the digit the classifier reads in it so that the digits follow the target, and
trains the LoRA with the model's own denoising loss on them, correcting the weights 3 times from the LoRA's own
images (1200 iterations of 64; only images the classifier reads with confidence ≥ 0.95; classifier robustness 0,
as nothing is optimised against it). --method alignment:
the paper's distributional alignment loss through the sampling chain (600 iterations of 20, classifier robustness
0.2, the single-digit prompts also as class_prompts, each batch assigned with the 180 images before it; the demo
LoRA of stop 32). Each flag's default follows the method (METHOD_DEFAULTS).

Writes demo/weights/<out>.safetensors (the LoRA the example workflow loads with stock LoraLoaderModelOnly once it is
copied to demo_fair_digits.safetensors; the pack copies that into models/loras on start),
docs/fairness/<out>.training.json (settings, losses, gradient norms, validation bias, the corrections) and
docs/fairness/<out>.png (the training chart). The demo's evaluator (decoded pixels, another network) stays the judge
in ``benchmarks/fair_lora_eval.py``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UNIFORM = ", ".join(f"{d}: 0.1" for d in range(10))
# flag: (resampled own images, distributional alignment): each method's recipe measured best on demo_model_6000
METHOD_DEFAULTS = {"iterations": (1200, 600), "learning_rate": (2e-3, 1e-3), "batch": (64, 20),
                   "preservation": (1.0, 8.0), "ema_warmup": (True, False), "robustness": (0.0, 0.2),
                   "confidence": (0.95, 0.8)}


def generated_examples(comfy, model, vae, prompts, per_class: int, seed: int = 7_000_000):
    """The demo model's own images of each single-digit prompt, labelled by their prompt, as a user makes them with
    stock nodes (KSampler: euler, 20 steps, CFG 4; then VAE Decode): IMAGE [10 * per_class, 64, 64, 3] and labels.
    Seeds from ``seed`` on, apart from the evaluations' (benchmarks.fair_classifier_agreement uses the same)."""
    import torch

    nodes = comfy.NODE_CLASS_MAPPINGS
    encode = nodes["SpellDemoClassPrompt"]().encode
    neg = encode(prompts, "(empty)")[0]
    images = []
    for d in range(10):
        for k, a in enumerate(range(0, per_class, 50)):
            lat = comfy.common_ksampler(model, seed + 1000 * d + k, 20, 4.0, "euler", "normal",
                                        encode(prompts, str(d))[0], neg,
                                        {"samples": torch.zeros(min(50, per_class - a), 4, 8, 8)})[0]
            images.append(nodes["VAEDecode"]().decode(vae, lat)[0])
    return torch.cat(images), ", ".join(str(d) for d in range(10) for _ in range(per_class))


def training_classifier(comfy, model, vae, prompts, robustness: float, generated: int = 0, seed: int = 0,
                        name: str = "demo_digits", members: int = 1):
    """The latent classifier the fair LoRA steers by, through SPELL Latent Classifier Trainer: the demo's whole
    training split (140 per digit) and, with ``generated`` > 0, that many of the demo model's own images per
    single-digit prompt, labelled by their prompt; ``members`` > 1: an ensemble of that many (seeds seed, seed + 1,
    ...). benchmarks.fair_lora_eval retrains it the same way."""
    import torch

    nodes = comfy.NODE_CLASS_MAPPINGS
    images, labels = nodes["SpellDemoDigitExamples"]().load(140)
    if generated:
        more, more_labels = generated_examples(comfy, model, vae, prompts, generated)
        images, labels = torch.cat([images, more]), labels + ", " + more_labels
    return nodes["SpellLatentClassifierTrainer"]().train(
        model, vae, "(none)", name, 64, 64, 40, 0.2, seed, True, images, labels, robustness=robustness,
        members=members)["result"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="resampled", choices=("resampled", "alignment"),
                    help="resampled own images (the demo LoRA since stop 33) or the paper's distributional alignment "
                         "(the node's method input); the defaults of the flags below follow it")
    ap.add_argument("--iterations", type=int, default=None, help="default: 1200 resampled, 600 alignment")
    ap.add_argument("--target", default=UNIFORM)
    ap.add_argument("--out", default="demo_fair_digits")
    ap.add_argument("--weights", default=None, help="the demo model file in demo/weights to finetune (default: "
                    "SPELL Demo Model Loader's, demo_model_6000.safetensors)")
    ap.add_argument("--gradient", default="adjusted", choices=("adjusted", "naive"),
                    help="the paper's adjusted DFT (the node's default; with class references it reaches the lower "
                         "loss on the demo) or naive, the exact gradient")
    ap.add_argument("--learning-rate", type=float, default=None, help="default: 2e-3 resampled, 1e-3 alignment")
    ap.add_argument("--batch", type=int, default=None, help="images per iteration (default: 64 resampled, 20 "
                    "alignment)")
    ap.add_argument("--own-images", type=int, default=4000, help="resampled: the frozen model's images to weight")
    ap.add_argument("--confidence", type=float, default=None, help="the node's confidence (the paper's C; default: "
                    "0.95 resampled, 0.8 alignment)")
    ap.add_argument("--rounds", type=int, default=4, help="resampled: weight corrections + 1 (the node's rounds)")
    ap.add_argument("--draw", default="stratified", choices=("stratified", "iid", "carried"),
                    help="target labels of a batch (the node's draw input)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preservation", type=float, default=None, help="weight of the preservation loss (default: 1 "
                    "resampled, on the kept prompts' denoising error; 8 alignment, on 1 - cosine)")
    ap.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=None,
                    help="warm the EMA up (the node's ema_warmup; default: on resampled, off alignment)")
    ap.add_argument("--validation-seeds", type=int, default=64,
                    help="images each validation counts (the node's validation_seeds)")
    ap.add_argument("--result", default="last", choices=("last", "lowest validation bias"),
                    help="which EMA weights the LoRA file holds (the node's result): the last iteration's, or those "
                         "of the validation with the lowest bias")
    ap.add_argument("--robustness", type=float, default=None,
                    help="adversarial training radius of the latent classifier (the classifier trainer's robustness; "
                         "default: 0 resampled, where nothing is optimised against it; 0.2 alignment)")
    ap.add_argument("--members", type=int, default=1, help="classifiers in the training classifier's ensemble "
                    "(the classifier trainer's members; 1: one network)")
    ap.add_argument("--generated", type=int, default=0,
                    help="the demo model's own images per single-digit prompt added to the classifier's examples, "
                         "labelled by their prompt (0: the training split alone)")
    ap.add_argument("--no-keep", action="store_true", help="train without the single-digit prompts kept")
    ap.add_argument("--class-reference", action=argparse.BooleanOptionalAction, default=True,
                    help="alignment: connect the ten single-digit prompts as class_prompts (reference of a moved image: the "
                         "frozen model's image of its new digit's prompt); --no-class-reference: the paper's rule")
    ap.add_argument("--pool", type=int, default=180,
                    help="recent images assigned with each batch (the node's pool; 0: each batch alone)")
    args = ap.parse_args(argv)
    for key, (resampled, alignment) in METHOD_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, resampled if args.method == "resampled" else alignment)
    import torch

    torch.set_num_threads(2)
    from tools import comfy_host

    comfy = comfy_host.start(tempfile.mkdtemp(prefix="spell-fair-lora-"))
    import folder_paths
    from PIL import Image

    import comfy.utils as comfy_utils
    from tqdm import tqdm

    bars = {}

    def show(value, total, preview, node_id=None):  # the nodes' ProgressBar, as a console bar per stage
        bar = bars.get(total)
        if bar is None:
            bar = bars[total] = tqdm(total=total, desc="classifier" if not bars else "LoRA", dynamic_ncols=True)
        bar.update(value - bar.n)

    comfy_utils.set_progress_bar_global_hook(show)
    nodes = comfy.NODE_CLASS_MAPPINGS
    t0 = time.perf_counter()
    model, vae, prompts = nodes["SpellDemoModelLoader"]().load(*([args.weights] if args.weights else []))
    clf, clf_report = training_classifier(comfy, model, vae, prompts, args.robustness, args.generated, args.seed,
                                          members=args.members)
    print(clf_report, file=sys.stderr, flush=True)
    encode = nodes["SpellDemoClassPrompt"]().encode
    pos, neg = encode(prompts, "any digit")[0], encode(prompts, "(empty)")[0]
    digits = [entry for d in range(10) for entry in encode(prompts, str(d))[0]]
    keep = None if args.no_keep else digits
    result = nodes["SpellFairLoRATrainer"]().train(
        model, pos, neg, clf, args.target, args.out, args.iterations, args.batch, 10 if args.method == "resampled" else 6, 4.0, 8,
        args.learning_rate,
        args.seed, False, 50, keep=keep, gradient=args.gradient, draw=args.draw,
        preservation=args.preservation, ema_warmup=args.ema_warmup,
        class_prompts=digits if args.class_reference and args.method == "alignment" else None,
        pool=args.pool if args.method == "alignment" else 0, result=args.result,
        validation_seeds=args.validation_seeds,
        method="resampled own images" if args.method == "resampled" else "distributional alignment",
        own_images=args.own_images, rounds=args.rounds, confidence=args.confidence)["result"]
    seconds = time.perf_counter() - t0
    print(result[1], file=sys.stderr)
    loras = Path(folder_paths.get_folder_paths("loras")[0])
    (ROOT / "demo" / "weights").mkdir(exist_ok=True)
    shutil.copyfile(loras / f"{args.out}.safetensors", ROOT / "demo" / "weights" / f"{args.out}.safetensors")
    log = json.loads((loras / f"{args.out}.training.json").read_text())
    log["summary"].update(command="python -m demo.train_fair_lora " + " ".join(argv or sys.argv[1:]),
                          seconds=round(seconds, 1), classifier=clf_report, threads=torch.get_num_threads())
    docs = ROOT / "docs" / "fairness"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"{args.out}.training.json").write_text(json.dumps(log, indent=1))
    chart = (result[2][0].numpy() * 255).round().astype("uint8")
    Image.fromarray(chart).save(docs / f"{args.out}.png")
    print(f"trained in {seconds:.0f} s: demo/weights/{args.out}.safetensors, docs/fairness/{args.out}.training.json",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
