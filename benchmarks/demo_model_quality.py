"""The demo model's sample quality, for several weight files side by side (issues 11 and 12: is a retrained demo
model less ambiguous and less speckled than the shipped one?).

    python -m benchmarks.demo_model_quality demo/weights/demo_model.safetensors demo/weights/demo_model_6000.safetensors \
        --cfg 4 1 --out docs/demo_model_quality.md

Through ComfyUI's ``common_ksampler`` (euler / normal, 20 steps, negative "(empty)", CFG 4 as in the benchmarks
unless --cfg says otherwise), the same seeds for every model and CFG. Scored with the demo evaluator (the judge; it never saw a generated
image) on the 16x16 images:
- "any digit": --any images; the judge's class shares against the mix the model was trained on (total variation)
  and the bias of the fairness benchmarks (mean over class pairs of |share_i − share_j|); the share of images the
  judge is less than 0.8 / 0.95 sure of (its top probability), the ambiguity that bounds the fair LoRA
  (docs/fairness_finetune.md, "What bounds the bias cut");
- each digit prompt: --per-digit images; the judge's accuracy and its < 0.8-sure share;
- roughness: an image's mean squared discrete Laplacian over its 16x16 pixels; "rough" is above the 99th
  percentile of the 360 held-out real digits' (speckled patches are what makes a sample rough);
- precision and recall (k = 5) of the "any digit" images against all held-out real digits in the judge's features.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20


def laplacian_energy(images: torch.Tensor) -> torch.Tensor:
    """Mean squared 4-neighbour Laplacian of images [B, 1, H, W] (edges repeated) -> [B]."""
    x = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate")
    lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return lap.pow(2).mean((1, 2, 3))


def measure(nodes, path: Path, cfg: float, args, real_feats, rough_cut) -> dict:
    from demo.data import latents_to_images16
    from demo.evaluator import load_evaluator
    from demo.model import load_demo
    from spell_core.metrics import prdc

    model, _, prompts = load_demo(path)
    judge = load_evaluator()

    def sample(name: str, n: int, seed: int) -> torch.Tensor:
        out = []
        for a in range(0, n, args.batch):
            b = min(args.batch, n - a)
            with torch.inference_mode():
                lat = nodes.common_ksampler(model, seed + a, STEPS, cfg, "euler", "normal", prompts.conditioning(name),
                                            prompts.conditioning("(empty)"), {"samples": torch.zeros(b, 4, 8, 8)})[0]
            out.append(latents_to_images16(lat["samples"].float()))
        return torch.cat(out)

    t0 = time.time()
    imgs = sample("any digit", args.any, 5000)
    with torch.no_grad():
        prob, feats = judge.predict(imgs), judge.features(imgs)
    top = prob.max(1).values
    share = torch.bincount(prob.argmax(1), minlength=10).double() / len(imgs)
    mix = torch.tensor([prompts.meta["any_digit_mix"][str(d)] for d in range(10)], dtype=torch.float64)
    pairs = [(i, j) for i in range(10) for j in range(i + 1, 10)]
    quality = prdc(real_feats, feats)  # k = 5, as the diversity benchmark
    res = {"file": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
           "trained_steps": prompts.meta.get("steps"), "cfg": cfg,
           "any": {"images": len(imgs), "shares": [round(float(v), 4) for v in share],
                   "trained_mix": [float(v) for v in mix], "tv_to_trained_mix": 0.5 * float((share - mix).abs().sum()),
                   "bias_uniform": sum(abs(float(share[i] - share[j])) for i, j in pairs) / len(pairs),
                   "unsure_0.8": float((top < 0.8).double().mean()), "unsure_0.95": float((top < 0.95).double().mean()),
                   "rough": float((laplacian_energy(imgs) > rough_cut).double().mean()),
                   "precision": quality["precision"], "recall": quality["recall"]}}
    digits = {}
    for d in range(10):
        x = sample(str(d), args.per_digit, 6000 + 100 * d)
        with torch.no_grad():
            p = judge.predict(x)
        digits[str(d)] = {"accuracy": float((p.argmax(1) == d).double().mean()),
                          "unsure_0.8": float((p.max(1).values < 0.8).double().mean()),
                          "rough": float((laplacian_energy(x) > rough_cut).double().mean())}
    res["digits"] = digits
    res["mean_digit"] = {k: sum(v[k] for v in digits.values()) / 10 for k in ("accuracy", "unsure_0.8", "rough")}
    res["seconds"] = round(time.time() - t0, 1)
    print(f"{res['file']} at CFG {cfg:g}: ones {res['any']['shares'][1]:.3f}, unsure<0.8 {res['any']['unsure_0.8']:.3f}, rough "
          f"{res['any']['rough']:.3f}, digit accuracy {res['mean_digit']['accuracy']:.3f} ({res['seconds']} s)", flush=True)
    return res


def report(R: dict) -> str:
    ms = R["models"]
    L = [f"# The demo model's sample quality, side by side\n",
         f"Made by `{R['command']}` on {R['machine']}; {R['seconds']} s; raw numbers in "
         f"`{Path(R['json']).name}`.\n", __doc__.split("\n\n", 2)[2].strip() + "\n",
         f"Real held-out digits: {R['real']['images']}; their own rough share (by construction) "
         f"{R['real']['rough']:.3f}, the judge < 0.8 sure of {R['real']['unsure_0.8']:.3f} of them.\n",
         "| model file | trained steps | CFG | ones in \"any digit\" (trained 0.40) | sevens (trained 0.20) | TV to the trained mix "
         "| bias (uniform) | judge < 0.8 sure | judge < 0.95 sure | rough | precision | recall | digit prompts: "
         "accuracy | < 0.8 sure | rough |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in ms:
        a, d = m["any"], m["mean_digit"]
        L.append(f"| {m['file']} | {m['trained_steps']} | {m['cfg']:g} | {a['shares'][1]:.3f} | {a['shares'][7]:.3f} | "
                 f"{a['tv_to_trained_mix']:.3f} | {a['bias_uniform']:.4f} | {a['unsure_0.8']:.3f} | "
                 f"{a['unsure_0.95']:.3f} | {a['rough']:.3f} | {a['precision']:.3f} | {a['recall']:.3f} | "
                 f"{d['accuracy']:.3f} | {d['unsure_0.8']:.3f} | {d['rough']:.3f} |")
    L += ["", "Per digit prompt (accuracy / judge < 0.8 sure / rough):", "",
          "| model file | CFG | " + " | ".join(f'"{d}"' for d in range(10)) + " |", "|---|---|" + "---|" * 10]
    for m in ms:
        L.append(f"| {m['file']} | {m['cfg']:g} | " + " | ".join(
            f"{v['accuracy']:.2f} / {v['unsure_0.8']:.2f} / {v['rough']:.2f}" for v in m["digits"].values()) + " |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", nargs="+", help="demo model files (written by demo.train)")
    ap.add_argument("--any", type=int, default=1000, help="\"any digit\" images per model")
    ap.add_argument("--per-digit", type=int, default=100, help="images per digit prompt and model")
    ap.add_argument("--cfg", type=float, nargs="+", default=[4.0], help="CFG scales, each model at each (default 4)")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / "docs" / "demo_model_quality.md"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(2)
    from tools import comfy_host
    from demo.data import digits_split
    from demo.evaluator import load_evaluator

    nodes = comfy_host.start(tempfile.mkdtemp(prefix="spell_quality_"))
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    t0 = time.time()
    real_images, _ = digits_split()["test"]
    judge = load_evaluator()
    with torch.no_grad():
        real_feats, real_prob = judge.features(real_images), judge.predict(real_images)
    energy = laplacian_energy(real_images)
    rough_cut = float(energy.quantile(0.99))
    out = Path(args.out)
    R = {"command": "python -m benchmarks.demo_model_quality " + " ".join(sys.argv[1:] if argv is None else argv),
         "machine": f"{platform.machine()}, torch {torch.__version__}, 2 threads",
         "json": str(out.with_suffix(".json")),
         "real": {"images": len(real_images), "rough": float((energy > rough_cut).double().mean()),
                  "unsure_0.8": float((real_prob.max(1).values < 0.8).double().mean()), "rough_cut": rough_cut},
         "models": [measure(nodes, Path(w).resolve(), c, args, real_feats, rough_cut) for w in args.weights
                    for c in args.cfg]}
    R["seconds"] = round(time.time() - t0, 1)
    out.with_suffix(".json").write_text(json.dumps(R, indent=1))
    out.write_text(report(R))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
