"""Trains the demo model: ComfyUI's own toy U-Net (``demo.model``, EPS prediction, ComfyUI's discrete
linear-beta schedule taken from the model's ``model_sampling``) on the training split of scikit-learn's digits
(``demo.data``: 16x16 grey images as [4, 8, 8] latents in [-1, 1]), class-conditional through a learned prompt
table, then checks it through ComfyUI's sampler (``demo.verify``). Seeded; the 2000-step model took about 9 minutes
on 2 CPU cores.

    python -m demo.train      # writes demo/weights/demo_model_6000.safetensors, the pack's default demo model
    python -m demo.train --steps 2000 --out demo/weights/demo_model.safetensors   # the default before (rougher)

Prompt rows: 0-9 the digit classes (images drawn uniformly from the training split), 10 "any digit" (images
drawn from the deliberately biased ANY_DIGIT_MIX), 11 "(empty)", the unconditional prompt used for
classifier-free guidance. "(empty)" replaces the prompt of EMPTY_FRACTION of all samples (label dropout); its
images come from ANY_DIGIT_MIX as well, so that CFG between "any digit" and "(empty)" keeps the class mix
biased but not exaggerated, while CFG between a class and "(empty)" pushes towards that class.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: 2 threads stay fast on a busy CPU
import torch  # noqa: E402

from spell_core.resampled import denoising_loss  # noqa: E402  (the loss the resampled fair LoRA trains with too)

SEED = 0
MODEL_CHANNELS = 32
STEPS = 6000
BATCH = 128
LR = 1e-3
WARMUP = 100
EMA_DECAY = 0.999
GRAD_CLIP = 1.0
ANY_DIGIT_MIX = {1: 0.40, 7: 0.20, **{d: 0.05 for d in (0, 2, 3, 4, 5, 6, 8, 9)}}  # the biased "any digit" mix
CLASS_FRACTION, ANY_FRACTION, EMPTY_FRACTION = 0.55, 0.30, 0.15  # prompt kinds in each batch
PROMPT_NAMES = [str(d) for d in range(10)] + ["any digit", "(empty)"]
ANY_ROW, EMPTY_ROW = 10, 11


def mixture_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-image sampling weights [N] so that drawn images follow ANY_DIGIT_MIX over classes."""
    counts = torch.bincount(labels, minlength=10).float()
    mix = torch.tensor([ANY_DIGIT_MIX[d] for d in range(10)])
    return (mix / counts)[labels]


def draw_batch(labels: torch.Tensor, mix_w: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(image indices [BATCH], prompt rows [BATCH]): class prompts on uniform images, "any digit"/"(empty)"
    prompts on images drawn from ANY_DIGIT_MIX."""
    kind = torch.multinomial(torch.tensor([CLASS_FRACTION, ANY_FRACTION, EMPTY_FRACTION]), BATCH, True, generator=g)
    uniform = torch.randint(len(labels), (BATCH,), generator=g)
    biased = torch.multinomial(mix_w, BATCH, True, generator=g)
    idx = torch.where(kind == 0, uniform, biased)
    rows = torch.where(kind == 0, labels[idx], torch.where(kind == 1, ANY_ROW, EMPTY_ROW))
    return idx, rows


def lr_at(step: int, steps: int = STEPS) -> float:
    """Linear warm-up over WARMUP steps, then cosine decay to 0 at ``steps``."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    return LR * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (steps - WARMUP)))


def denoiser_loss(base, z0: torch.Tensor, context: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """SNR+1-weighted x0 error, i.e. eps MSE + x0 MSE (the v-prediction loss of Salimans & Ho 2022,
    arXiv:2202.00512), through ComfyUI's own parametrisation: x_t = x0 + sigma*eps with sigma from the model's
    discrete schedule, BaseModel.apply_model(x_t, sigma) = x0_hat. The x0 term keeps the high-noise predictions,
    which set how often each class is drawn, accurate; plain eps MSE weights them by 1/sigma^2 only."""
    sigmas = base.model_sampling.sigmas
    sigma = sigmas[torch.randint(len(sigmas), (z0.shape[0],), generator=g)][:, None, None, None]
    x_t = z0 + sigma * torch.randn(z0.shape, generator=g)
    x0_hat = base.apply_model(x_t, sigma.flatten(), c_crossattn=context)
    return denoising_loss(x0_hat, z0, sigma.flatten())


def train(steps: int = STEPS) -> tuple[dict, torch.Tensor, dict]:
    """Trains for ``steps`` steps; returns (EMA U-Net state dict, EMA prompt table, metadata)."""
    from .data import CLASS_NAMES, SPLIT_SEED, digits_split, images16_to_latents
    from .model import CONTEXT_DIM, TOKENS, PixelShuffleVAE, build_model

    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    images, labels = digits_split()["train"]
    z_train = images16_to_latents(images)
    rgb = ((images[:8] + 1) / 2).repeat_interleave(4, 2).repeat_interleave(4, 3)[:, 0, :, :, None].expand(-1, -1, -1, 3)
    if not torch.allclose(PixelShuffleVAE().encode(rgb), z_train[:8], atol=1e-6):
        raise RuntimeError("demo.data latents differ from PixelShuffleVAE.encode")
    base = build_model("eps", 4, seed=SEED, model_channels=MODEL_CHANNELS).model
    net = base.diffusion_model.train()
    tokens = torch.nn.Parameter(torch.randn(len(PROMPT_NAMES), TOKENS, CONTEXT_DIM, generator=g))
    params = [*net.parameters(), tokens]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    mix_w = mixture_weights(labels)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"training toy U-Net ({n_params / 1e6:.2f} M parameters, model_channels={MODEL_CHANNELS}) on "
          f"{len(labels)} digits: {steps} steps of {BATCH}", flush=True)
    t0, running = time.time(), 0.0
    with torch.enable_grad():
        for step in range(steps):
            idx, rows = draw_batch(labels, mix_w, g)
            loss = denoiser_loss(base, z_train[idx], tokens[rows], g)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            opt.step()
            decay = min(EMA_DECAY, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
            running += loss.item()
            if (step + 1) % 100 == 0:
                el = time.time() - t0
                print(f"step {step + 1:5d}/{steps}  loss {running / 100:.4f}  lr {lr_at(step, steps):.2e}  "
                      f"{el:.0f}s elapsed, ~{el / (step + 1) * (steps - step - 1):.0f}s left", flush=True)
                running = 0.0
    names = [n for n, _ in net.named_parameters()]
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    state.update({n: e for n, e in zip(names, ema[:-1])})
    meta = dict(
        model_type="eps", channels=4, model_channels=MODEL_CHANNELS, prompt_names=PROMPT_NAMES,
        class_names=list(CLASS_NAMES), any_digit_row=ANY_ROW, empty_row=EMPTY_ROW,
        any_digit_mix={str(d): ANY_DIGIT_MIX[d] for d in range(10)},
        prompt_fractions=dict(cls=CLASS_FRACTION, any=ANY_FRACTION, empty=EMPTY_FRACTION),
        data="sklearn load_digits, bilinear 8x8->16x16, [-1,1], pixel-unshuffle to [4,8,8]",
        split_seed=SPLIT_SEED, seed=SEED, steps=steps, batch=BATCH, lr=LR, ema_decay=EMA_DECAY,
        train_seconds=round(time.time() - t0),
    )
    print(f"trained in {time.time() - t0:.0f}s", flush=True)
    return state, ema[-1], meta


def main() -> None:
    """Trains, saves demo/weights/demo_model_6000.safetensors (or --out), then checks sampling through ComfyUI."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=STEPS,
                    help=f"training steps (default {STEPS}, the default demo model)")
    ap.add_argument("--out", help="weights file (default demo/weights/demo_model_6000.safetensors)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tools import comfy_host

    torch.set_num_threads(2)
    nodes = comfy_host.start(tempfile.mkdtemp(prefix="spell_demo_"))
    from . import verify
    from .model import DEMO_WEIGHTS, save_demo

    out = Path(args.out) if args.out else DEMO_WEIGHTS
    state, tokens, meta = train(args.steps)
    save_demo(out, state, tokens, meta)
    print(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB)", flush=True)
    verify.report(nodes, weights=out)


if __name__ == "__main__":
    main()
