"""Peer diversity methods for the SPELL benchmark, as ComfyUI MODEL patches (no ComfyUI import at module level).

The maths (formulas in its docstrings) is ``spell_core/peers.py``. CADS and guidance limited to an interval are
patched by the pack's own nodes module (``nodes/peers.py``, SPELL CADS and SPELL Guidance Interval), so the
benchmark measures exactly what the nodes do:

- CADS (Sadat et al., ICLR 2024): APPLY_MODEL wrapper on the conditional tokens, its generator re-seeded at the
  start of every sampling run (OUTER_SAMPLE wrapper).
- Guidance in a limited interval (Kynkäänniemi et al., NeurIPS 2024): CFG only for σ_lo < σ ≤ σ_hi, the
  conditional prediction alone (uncond call skipped) elsewhere; CALC_COND_BATCH wrapper.
- Particle Guidance (Corso et al., ICLR 2024): x̂0_i ← x̂0_i + w·σ·g_i with the RBF repulsion g; a post-CFG
  function (whole batch), here only (the pack ships no node for it).
"""
from __future__ import annotations

import importlib

from spell_core.peers import cads_condition, cads_gamma, normalised_time, particle_guidance, rbf_repulsion

__all__ = ["cads_condition", "cads_gamma", "normalised_time", "rbf_repulsion", "patch_cads",
           "patch_interval_guidance", "patch_particle_guidance"]


def pack_peers():
    """``nodes/peers.py`` of the pack as ComfyUI loaded it (its relative imports need the pack's package)."""
    from tools.comfy_host import pack_module

    return importlib.import_module(f"{pack_module().__name__}.nodes.peers")


def patch_cads(model, noise_scale: float, tau1: float = 0.6, tau2: float = 0.9, psi: float = 1.0, seed: int = 0):
    """A clone of the ModelPatcher with CADS on the conditional cross-attention tokens (SPELL CADS's patch)."""
    return pack_peers().patch_cads(model, noise_scale, tau1, tau2, psi, seed)


def patch_interval_guidance(model, sigma_lo: float, sigma_hi: float):
    """A clone that applies CFG only for σ_lo < σ ≤ σ_hi and the conditional prediction elsewhere (SPELL Guidance
    Interval's patch, with σ bounds instead of schedule percents)."""
    return pack_peers().patch_guidance_interval(model, lambda sampling: (sigma_lo, sigma_hi))


def patch_particle_guidance(model, strength: float):
    """A clone with Particle Guidance's RBF repulsion between the batch's x̂0 (post-CFG, chains)."""
    patched = model.clone()

    def pg_post_cfg(args):
        return particle_guidance(args["denoised"], args["sigma"], strength)

    patched.set_model_sampler_post_cfg_function(pg_post_cfg)
    return patched
