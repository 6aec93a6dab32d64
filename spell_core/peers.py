"""Peer diversity methods in plain torch (never imports ComfyUI); ``nodes/peers.py`` and ``benchmarks/peers.py``
patch them into ComfyUI.

- CADS, condition-annealed diffusion sampling (Sadat et al., ICLR 2024, arXiv 2310.17347): Gaussian noise is
  mixed into the *conditional* tokens, ŷ = √γ(t)·y + s·√(1 − γ(t))·n, n ~ N(0, I) drawn afresh at every model
  call, with γ(t) = 1 for t ≤ τ1, (τ2 − t)/(τ2 − τ1) for τ1 < t < τ2, 0 for t ≥ τ2 (t = 1 is pure noise). Then
  the rescaling ŷ_rescaled = (ŷ − mean(ŷ))/std(ŷ)·std(y) + mean(y), ŷ ← ψ·ŷ_rescaled + (1 − ψ)·ŷ (per sample).
  The unconditional tokens are left as they are.
- Particle Guidance (Corso et al., ICLR 2024, arXiv 2310.13102): the particles of one batch interact through a
  potential Φ = Σ_{i,j} k(x̂0_i, x̂0_j), an RBF kernel k(a, b) = exp(−||a − b||²/h) with the median heuristic
  h = median(||a − b||²)/log B. The repulsion g_i = −∇_{x_i} Σ_j k(x_i, x_j) (= −½ ∇_{x_i}Φ) is added to the
  guided prediction the way a gradient added to the noise prediction acts: ε ← ε − w·g_i, i.e.
  x̂0_i ← x̂0_i + w·σ·g_i, with w the strength.
- Guidance in a limited interval (Kynkäänniemi et al., NeurIPS 2024, arXiv 2404.07724): classifier-free guidance
  D = D_u + w·(D_c − D_u) only while σ_lo < σ ≤ σ_hi, the conditional prediction D_c alone (w = 1) elsewhere.
"""
from __future__ import annotations

import math

import torch


# ------------------------------------------------------------------------------------------------------- CADS
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
    """CADS' corrupted condition for y [B, ...]: √γ·y + s·√(1−γ)·n, then the per-sample rescaling mixed by ψ.

    γ = 1 returns y itself. s = 0 is not a no-op for γ < 1: ŷ = √γ·y, which ψ = 1 rescales back to y (up to
    rounding) for γ > 0 and to the constant mean(y) at γ = 0 (std(ŷ) = 0)."""
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


def cads_on_cond_chunks(y: torch.Tensor, cond_or_uncond: list[int], gamma: float, noise_scale: float, psi: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """y [len(cond_or_uncond)·B, ...], the model call's chunks stacked: CADS on the conditional chunks (0), the
    others (1 = unconditional) unchanged. γ ≥ 1 or no conditional chunk returns y itself."""
    if gamma >= 1.0 or 0 not in cond_or_uncond:
        return y
    chunks = y.chunk(len(cond_or_uncond))
    return torch.cat([cads_condition(ch, gamma, noise_scale, psi, generator) if k == 0 else ch
                      for k, ch in zip(cond_or_uncond, chunks)])


def normalised_time(model_sampling, sigma: float) -> float:
    """σ -> t ∈ [0, 1] (1 = pure noise) through the model's discrete timestep (``model_sampling.timestep``, over
    its ``len(sigmas) − 1`` steps; a continuous one without ``sigmas`` is taken as already in [0, 1])."""
    steps = len(model_sampling.sigmas) - 1 if hasattr(model_sampling, "sigmas") else 1000
    t = float(model_sampling.timestep(torch.tensor(float(sigma))))
    return min(max(t / steps, 0.0), 1.0) if steps > 1 else min(max(t, 0.0), 1.0)


# ---------------------------------------------------------------------------------------- Particle Guidance
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


def particle_guidance(x0: torch.Tensor, sigma: torch.Tensor, strength: float) -> torch.Tensor:
    """x̂0 [B, ...], σ [B] -> x̂0 + w·σ·g (Particle Guidance's repulsion g = ``rbf_repulsion``)."""
    s = sigma.reshape(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)
    return x0 + strength * s * rbf_repulsion(x0)


# --------------------------------------------------------------------------------------- guidance interval
def guided(sigma: float, sigma_lo: float, sigma_hi: float) -> bool:
    """Whether classifier-free guidance applies at σ: the interval (σ_lo, σ_hi] of Kynkäänniemi et al."""
    return sigma_lo < sigma <= sigma_hi
