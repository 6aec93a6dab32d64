"""Peer diversity methods for the SPELL benchmark, as ComfyUI MODEL patches (no ComfyUI import at module level).

- CADS, condition-annealed diffusion sampling (Sadat et al., ICLR 2024): Gaussian noise is mixed into the
  *conditional* tokens, ŷ = √γ(t)·y + s·√(1 − γ(t))·n, n ~ N(0, I) drawn afresh at every model call, with
  γ(t) = 1 for t ≤ τ1, (τ2 − t)/(τ2 − τ1) for τ1 < t < τ2, 0 for t ≥ τ2 (t = 1 is pure noise). Then the
  rescaling ŷ_rescaled = (ŷ − mean(ŷ))/std(ŷ)·std(y) + mean(y), ŷ ← ψ·ŷ_rescaled + (1 − ψ)·ŷ (per sample).
  The unconditional tokens are left as they are. Patch: ``set_model_unet_function_wrapper`` on the cond chunk.
- Particle Guidance (Corso et al., ICLR 2024): the particles of one batch interact through a potential
  Φ = Σ_{i,j} k(x̂0_i, x̂0_j), an RBF kernel k(a, b) = exp(−||a − b||²/h) with the median heuristic
  h = median(||a − b||²)/log B. The repulsion g_i = −∇_{x_i} Σ_j k(x_i, x_j) (= −½ ∇_{x_i}Φ) is added to the
  guided prediction the way a gradient added to the noise prediction acts: ε ← ε − w·g_i, i.e.
  x̂0_i ← x̂0_i + w·σ·g_i, with w the strength. Patch: a post-CFG function (whole batch).
- Guidance in a limited interval (Kynkäänniemi et al., NeurIPS 2024): classifier-free guidance only while
  σ_lo < σ ≤ σ_hi, the conditional prediction alone (CFG scale 1) outside. Patch: ``set_model_sampler_cfg_function``.
"""
from __future__ import annotations

import math

import torch


# ---------------------------------------------------------------------------------------------- pure maths
def cads_gamma(t: float, tau1: float, tau2: float) -> float:
    """CADS' annealing schedule γ(t) ∈ [0, 1]: 1 (clean condition) for t ≤ τ1, 0 (pure noise) for t ≥ τ2."""
    if not 0 <= tau1 < tau2 <= 1:
        raise ValueError(f"need 0 ≤ τ1 < τ2 ≤ 1, got {tau1}, {tau2}")
    if t <= tau1:
        return 1.0
    if t >= tau2:
        return 0.0
    return (tau2 - t) / (tau2 - tau1)


def cads_condition(y: torch.Tensor, gamma: float, noise_scale: float, psi: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """CADS' corrupted condition for y [B, ...]: √γ·y + s·√(1−γ)·n, then the per-sample rescaling mixed by ψ."""
    if gamma >= 1.0:
        return y
    n = torch.randn(y.shape, generator=generator, dtype=torch.float32).to(y.device, y.dtype)
    noisy = math.sqrt(gamma) * y + noise_scale * math.sqrt(1.0 - gamma) * n
    if psi == 0:
        return noisy
    dims = tuple(range(1, y.ndim))
    mu_y, sd_y = y.mean(dims, keepdim=True), y.std(dims, keepdim=True)
    mu_n, sd_n = noisy.mean(dims, keepdim=True), noisy.std(dims, keepdim=True).clamp_min(1e-12)
    rescaled = (noisy - mu_n) / sd_n * sd_y + mu_y
    return psi * rescaled + (1.0 - psi) * noisy


def rbf_repulsion(x0: torch.Tensor) -> torch.Tensor:
    """−∇_{x_i} Σ_j k(x_i, x_j) for the RBF kernel with the median-heuristic bandwidth, x0 [B, ...] -> [B, ...].

    −∇_{x_i} Σ_j exp(−||x_i − x_j||²/h) = Σ_j (2/h)·k_ij·(x_i − x_j); zero for B < 2.
    """
    b = x0.shape[0]
    if b < 2:
        return torch.zeros_like(x0)
    x = x0.reshape(b, -1).double()
    diff = x[:, None, :] - x[None, :, :]  # [B, B, D]
    sq = diff.pow(2).sum(-1)
    off = sq[~torch.eye(b, dtype=torch.bool, device=x.device)]
    h = float(off.median()) / math.log(b) if b > 2 else float(off.median())
    h = max(h, 1e-12)
    k = torch.exp(-sq / h)
    grad = (2.0 / h) * (k[:, :, None] * diff).sum(1)  # the j == i term is zero (diff = 0)
    return grad.reshape(x0.shape).to(x0.dtype)


# ------------------------------------------------------------------------------------------ ComfyUI patches
def normalised_time(model_sampling, sigma: float) -> float:
    """σ -> t ∈ [0, 1] (1 = pure noise) through the model's discrete timestep."""
    steps = len(model_sampling.sigmas) - 1 if hasattr(model_sampling, "sigmas") else 1000
    t = float(model_sampling.timestep(torch.tensor(float(sigma))))
    return min(max(t / steps, 0.0), 1.0) if steps > 1 else min(max(t, 0.0), 1.0)


def patch_cads(model, noise_scale: float, tau1: float = 0.6, tau2: float = 0.9, psi: float = 1.0, seed: int = 0):
    """A clone of the ModelPatcher with CADS on the conditional cross-attention tokens."""
    patched = model.clone()
    sampling = patched.get_model_object("model_sampling")
    gen = torch.Generator().manual_seed(seed)

    def cads_wrapper(apply_model, args):
        x, sigma, c, cou = args["input"], args["timestep"], dict(args["c"]), args["cond_or_uncond"]
        y = c.get("c_crossattn")
        gamma = cads_gamma(normalised_time(sampling, float(sigma.max())), tau1, tau2)
        if y is not None and gamma < 1.0 and 0 in cou:
            chunks = y.chunk(len(cou))
            c["c_crossattn"] = torch.cat([cads_condition(ch, gamma, noise_scale, psi, gen) if k == 0 else ch
                                          for k, ch in zip(cou, chunks)])
        return apply_model(x, sigma, **c)

    patched.set_model_unet_function_wrapper(cads_wrapper)
    return patched


def patch_particle_guidance(model, strength: float):
    """A clone with Particle Guidance's RBF repulsion between the batch's x̂0 (post-CFG, chains)."""
    patched = model.clone()

    def pg_post_cfg(args):
        x0, sigma = args["denoised"], args["sigma"]
        s = sigma.reshape(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)
        return x0 + strength * s * rbf_repulsion(x0)

    patched.set_model_sampler_post_cfg_function(pg_post_cfg)
    return patched


def patch_interval_guidance(model, sigma_lo: float, sigma_hi: float):
    """A clone that applies CFG only for σ_lo < σ ≤ σ_hi and the conditional prediction elsewhere."""
    patched = model.clone()

    def interval_cfg(args):
        cond, uncond, scale = args["cond"], args["uncond"], args["cond_scale"]  # x − x̂0 (cond / uncond)
        s = float(args["sigma"].max())
        if sigma_lo < s <= sigma_hi:
            return uncond + (cond - uncond) * scale
        return cond

    patched.set_model_sampler_cfg_function(interval_cfg)
    return patched
