"""SPELL's in-batch push measured in the features of an image network instead of the model's space (issue 12,
item 4). The paper (arXiv 2410.06025) names latent L2 as a limitation (it is not semantic similarity) and
suggests features such as DINOv2's; this module carries the push through any differentiable feature map.

φ maps x̂0 [B, ...] (model space) to features f [B, F], image by image (f_i depends on x̂0_i only: no batch
statistics, e.g. no BatchNorm in training mode). The wanted feature move Δf is SPELL's push on the rows of f
(``repellency``: RMS distances, the caller's radius and mask, λ). With J_i = ∂f_i/∂x̂0_i, it is carried back by
one Gauss–Newton step restricted to the gradient direction:

    g_i = J_iᵀ Δf_i,   u_i = J_i g_i,   α_i = (Δf_i · u_i) / ||u_i||²,   Δx̂0_i = α_i g_i

α_i g_i is the move along g_i whose first-order feature change α_i u_i is closest to Δf_i (least squares in α),
so no step size is tuned. g comes from one vector-Jacobian product for the whole batch (f_i depends on x̂0_i only,
so the batched vjp with cotangent Δf is J_iᵀ Δf_i row by row); u from the double-vjp trick (J g is the vjp of
the linear map v -> Jᵀ v), which needs autograd only, no forward-mode formulas. Images without a neighbour inside
the feature radius have Δf_i = 0 and get Δx̂0_i = 0 exactly.

Measured on the demo (``demo.feature_net``, batch 8, 20 euler steps, 2 shared CPU cores): one Gauss–Newton move is
small in latent terms, so the adaptive scale that acts is higher than in latent space (1.0-1.5 raised Vendi by
0.001-0.024 on 4 prompts x 4 seeds, 2.0-3.0 by 0.09-0.29); sampling took 1.06x the latent push's time at scale 1.1
and 1.17x at 2.5 (``python -m benchmarks.feature_push_cost``). Whether it wins: ``benchmarks/diversity_decide.py``.
"""
from __future__ import annotations

from typing import Callable

import torch

from .repellency import flat32, repellency, rms_cdist

Features = Callable[[torch.Tensor], torch.Tensor]


def checked_features(f, batch: int) -> torch.Tensor:
    """φ's output, refused unless it is a finite floating tensor [batch, F] with F ≥ 1."""
    if not isinstance(f, torch.Tensor):
        raise ValueError(f"the feature map must return a tensor [B, F], got {type(f).__name__}")
    if f.ndim != 2 or f.shape[0] != batch or f.shape[1] == 0:
        raise ValueError(f"the feature map must return features [B, F] = [{batch}, F ≥ 1] for a batch of {batch}, "
                         f"got shape {list(f.shape)}")
    if not f.is_floating_point():
        raise ValueError(f"the feature map must return floating-point features, got {f.dtype}")
    if not bool(torch.isfinite(f).all()):
        raise ValueError("the feature map returned non-finite features (inf or nan)")
    if not f.requires_grad:
        raise ValueError("the feature map's output does not depend differentiably on its input (it must be "
                         "differentiable: no torch.no_grad, detach or integer steps inside)")
    return f


def gauss_newton_step(f: torch.Tensor, x: torch.Tensor, delta_f: torch.Tensor) -> torch.Tensor:
    """Δx [B, ...] = α g with g = Jᵀ Δf, u = J g, α = (Δf · u)/||u||² per image (0 where u = 0).

    f [B, F] = φ(x) with its graph, x [B, ...] the leaf it was computed from, delta_f [B, F] the wanted move."""
    v = delta_f.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f, x, v, create_graph=True, retain_graph=True)  # Jᵀ Δf, linear in v
    if not g.requires_grad:
        raise ValueError("the feature map's gradient is not differentiable (its backward must support autograd)")
    (u,) = torch.autograd.grad(g, v, g.detach())  # J g: the vjp of v -> Jᵀ v
    g, u = flat32(g.detach()), u.detach().float()
    uu = u.pow(2).sum(1)
    alpha = torch.where(uu > 0, (delta_f.float() * u).sum(1) / uu.clamp_min(torch.finfo(uu.dtype).tiny),
                        torch.zeros_like(uu))
    return (alpha[:, None] * g).reshape(x.shape)


def feature_push(phi: Features, x0: torch.Tensor, lam: float, mask: torch.Tensor,
                 radius: Callable[[torch.Tensor, torch.Tensor], float]):
    """The in-batch SPELL push computed on φ(x̂0) and carried back to model space.

    x0 [B, ...] expected final images (model space), mask [B, B] bool (``in_batch_mask``), radius(f, d) -> the
    feature radius r_f from the features f [B, F] and their RMS distances d [B, B] (e.g. SpellRun's capped
    adaptive radius). Returns (Δ [B, D] float32, active pairs per image [B], r_f).

    Runs under autograd even inside ComfyUI's sampler (``torch.inference_mode`` / ``no_grad``): x̂0 is cloned
    into a normal tensor first. φ's parameters must be normal tensors too (loaded outside inference mode)."""
    b = x0.shape[0]
    with torch.inference_mode(False), torch.enable_grad():
        x = x0.detach().float().clone().requires_grad_(True)
        f = checked_features(phi(x), b)
        fd = f.detach().float()
        d = rms_cdist(fd, fd)
        r_f = radius(fd, d)
        delta_f, active = repellency(fd, fd, r_f, lam, mask, d)
        if not bool(active.any()):
            return x.new_zeros(b, flat32(x).shape[1]), active, r_f
        dx = flat32(gauss_newton_step(f, x, delta_f))
    dx = torch.where(active[:, None] > 0, dx, torch.zeros_like(dx))  # untouched images: exactly 0
    if not bool(torch.isfinite(dx).all()):
        raise ValueError("the feature push is non-finite: the feature map's gradient overflowed")
    return dx, active, r_f
