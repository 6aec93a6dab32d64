"""Checks the trained demo model through ComfyUI's own sampler (``nodes.common_ksampler``) and the pack's demo
nodes, scoring samples with the demo evaluator: class accuracy per digit prompt, the class mix of "any digit"
against the mix it was trained on, and a 64x64 workflow (loader -> EmptyLatentImage -> KSampler -> VAEDecode).

    python -m demo.verify [--grid /tmp/demo_grid.png]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: 2 threads stay fast on a busy CPU
import torch  # noqa: E402

STEPS, CFG, SAMPLER, SCHEDULER = 20, 4.0, "euler", "normal"
PER_CLASS = 50  # samples per digit prompt
ANY_SAMPLES = 400  # samples of "any digit"
SEED = 1234


def sample_latents(nodes, model, prompts, name: str, n: int, seed: int, cfg: float = CFG) -> torch.Tensor:
    """n latents [n, 4, 8, 8] for one prompt name against "(empty)", through ComfyUI's common_ksampler."""
    latent = {"samples": torch.zeros(n, 4, 8, 8)}
    with torch.inference_mode():
        out = nodes.common_ksampler(model, seed, STEPS, cfg, SAMPLER, SCHEDULER, prompts.conditioning(name),
                                    prompts.conditioning("(empty)"), latent)[0]
    return out["samples"].clone()


def class_mix(evaluator, latents: torch.Tensor) -> torch.Tensor:
    """Fraction [10] of latents the evaluator assigns to each digit."""
    from .data import latents_to_images16

    pred = evaluator.predict(latents_to_images16(latents)).argmax(-1)
    return torch.bincount(pred, minlength=10).float() / len(pred)


def report(nodes, cfg: float = CFG, weights=None) -> dict:
    """Prints and returns per-prompt class accuracy and the "any digit" class mix (at cfg and at cfg 1) of the
    demo model (or the model file ``weights``)."""
    import comfy.utils

    from .evaluator import load_evaluator
    from .model import load_demo

    comfy.utils.PROGRESS_BAR_ENABLED = False
    model, _, prompts = load_demo() if weights is None else load_demo(weights)
    evaluator = load_evaluator()
    result = {"class_accuracy": {}, "any_digit_mix": {}, "target_mix": prompts.meta["any_digit_mix"]}
    print(f"sampling check: {SAMPLER}/{SCHEDULER}, {STEPS} steps, cfg {cfg}, {PER_CLASS} samples per digit")
    for d in range(10):
        acc = class_mix(evaluator, sample_latents(nodes, model, prompts, str(d), PER_CLASS, SEED + d, cfg))[d].item()
        result["class_accuracy"][str(d)] = acc
        print(f"  prompt {d!r:>5}: evaluator agrees on {acc:6.1%}")
    target = torch.tensor([prompts.meta["any_digit_mix"][str(d)] for d in range(10)])
    print(f"'any digit' class mix over {ANY_SAMPLES} samples (digit: measured / target):")
    for c in (cfg, 1.0):
        mix = class_mix(evaluator, sample_latents(nodes, model, prompts, "any digit", ANY_SAMPLES, SEED + 100, c))
        result["any_digit_mix"][str(c)] = [round(v, 4) for v in mix.tolist()]
        tv = 0.5 * (mix - target).abs().sum().item()
        cells = "  ".join(f"{d}: {m:.2f}/{t:.2f}" for d, (m, t) in enumerate(zip(mix.tolist(), target.tolist())))
        print(f"  cfg {c}: {cells}  (total variation {tv:.3f})")
    return result


def workflow_grid(nodes, path: str | Path, seeds: int = 8, cfg: float = CFG) -> torch.Tensor:
    """Runs loader -> class prompt -> EmptyLatentImage -> KSampler -> VAEDecode through the registered node classes;
    checks a 64x64 batch of 4, then saves a PNG grid (rows: digits 0-9, columns: seeds) and returns it [H, W, 3]."""
    import numpy as np
    from PIL import Image

    m = nodes.NODE_CLASS_MAPPINGS
    model, vae, prompts = m["SpellDemoModelLoader"]().load()
    negative = m["SpellDemoClassPrompt"]().encode(prompts, "(empty)")[0]

    def generate(prompt: str, seed: int, batch: int) -> torch.Tensor:
        """IMAGE [batch, 64, 64, 3] for one prompt through the node classes."""
        positive = m["SpellDemoClassPrompt"]().encode(prompts, prompt)[0]
        latent = m["EmptyLatentImage"]().generate(64, 64, batch)[0]
        with torch.inference_mode():
            samples = m["KSampler"]().sample(model, seed, STEPS, cfg, SAMPLER, SCHEDULER, positive, negative,
                                             latent)[0]
            return m["VAEDecode"]().decode(vae, samples)[0]

    images = generate("any digit", 0, 4)
    if images.shape != (4, 64, 64, 3) or images.min() < 0 or images.max() > 1:
        raise RuntimeError(f"workflow gave IMAGE {tuple(images.shape)} in [{images.min()}, {images.max()}]")
    print(f"workflow: IMAGE {tuple(images.shape)} in [{images.min():.2f}, {images.max():.2f}]")
    rows = [torch.cat([generate(str(d), s, 1)[0] for s in range(seeds)], 1) for d in range(10)]
    grid = torch.cat(rows, 0)
    Image.fromarray((grid.numpy() * 255).round().astype(np.uint8)).save(path)
    print(f"saved grid of digits 0-9 x {seeds} seeds to {path}")
    return grid


def main() -> None:
    """Starts ComfyUI in-process, prints the sampling report and writes the workflow grid."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default=str(Path(tempfile.gettempdir()) / "demo_grid.png"))
    parser.add_argument("--cfg", type=float, default=CFG)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tools import comfy_host

    torch.set_num_threads(2)
    nodes = comfy_host.start(tempfile.mkdtemp(prefix="spell_demo_"))
    report(nodes, args.cfg)
    workflow_grid(nodes, args.grid, cfg=args.cfg)


if __name__ == "__main__":
    main()
