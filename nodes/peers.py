"""Two peer diversity methods as MODEL patches that chain with SPELL Sparse Repellency (maths: ``spell_core/peers.py``).

SpellGuidanceInterval: classifier-free guidance only in an interval of the schedule (Kynkäänniemi et al.,
NeurIPS 2024, arXiv 2404.07724), CFG scale 1 (the conditional prediction alone) elsewhere.
  Hook: a CALC_COND_BATCH wrapper (``comfy/samplers.py: _calc_cond_batch_outer``), keyed, so it chains with any
  other wrapper. ``sampling_function`` calls it with ``conds = [cond, uncond]``; outside the interval it calls the
  next with ``[cond, None]`` (the unconditional model call is skipped, as ComfyUI's own CFG-1 optimisation does)
  and returns ``[cond_pred, cond_pred]``. Every later stage (pre-CFG functions, a ``sampler_cfg_function`` such as
  RescaleCFG, post-CFG functions such as SPELL's) then sees uncond = cond, so any guidance rule that is the
  identity when both predictions agree gives the conditional prediction, at any CFG scale. The uncond call is
  skipped even where another node set ``disable_cfg1_optimization`` (CFG++ samplers, SAG): outside the interval
  they get uncond = cond, which is what CFG 1 means for them. Why not the other
  hooks: ``sampler_cfg_function`` is a single slot (a second node would silently overwrite the first, or we would
  take it from RescaleCFG-type nodes) and cannot skip the uncond call; a pre-CFG function chains but runs after
  both predictions are made and its order among other pre-CFG functions (APG) would matter; ``cond_scale`` itself
  cannot be changed per call through any public hook. Not covered: nodes that replace the whole batch
  (``sampler_calc_cond_batch_function``, e.g. SkipLayerGuidanceDiTSimple, which is warned about) and guiders that
  batch their own predictions (PerpNeg, DualCFG).
  σ bounds: (σ_lo, σ_hi] = (percent_to_sigma(end_percent), percent_to_sigma(start_percent)], converted at every
  call through the sampled model's ``model_sampling``, so a model-sampling node placed after this one is honoured.

SpellCADS: condition-annealed sampling (Sadat et al., ICLR 2024, arXiv 2310.17347), noise on the conditional
cross-attention tokens. Hooks, both keyed (they chain; ComfyUI's ``model_function_wrapper`` slot is left free):
  - APPLY_MODEL wrapper (``comfy/model_base.py: BaseModel.apply_model``): reads ``c_crossattn``, ``t`` (σ) and
    ``transformer_options["cond_or_uncond"]``, replaces the conditional chunks' tokens (at every model call, also
    those other nodes make, e.g. PAG's perturbed pass). A call outside a run started by ``CFGGuider.sample`` (no
    generator) is left as it is.
  - OUTER_SAMPLE wrapper (``comfy/samplers.py: CFGGuider.sample``): a ``torch.Generator`` seeded with the node's
    seed at the start of every sampling run, kept in the run's own ``model_options["transformer_options"]`` under
    this patch's key; the same seed gives the same images run after run.
Both wrappers are found by feature (``WrappersMP.APPLY_MODEL`` / ``CALC_COND_BATCH`` / ``OUTER_SAMPLE``); a
ComfyUI without them is refused with the fix.
"""
from __future__ import annotations

import logging
import uuid

import comfy.patcher_extension
import torch

from ..spell_core.peers import cads_gamma, cads_on_cond_chunks, guided, normalised_time
from .common import SpellInputError, check_numbers


def wrapper_type(node_id: str, name: str) -> str:
    """``WrappersMP.<name>``, or a refusal naming the node and the fix where this ComfyUI lacks it."""
    kind = getattr(getattr(comfy.patcher_extension, "WrappersMP", None), name, None)
    if kind is None:
        raise SpellInputError(node_id, f"this ComfyUI has no {name} wrappers (comfy/patcher_extension.py); update "
                                       f"ComfyUI to 0.3.75 or newer.")
    return kind


def patch_guidance_interval(model, bounds, node_id="SpellGuidanceInterval"):
    """A clone of the ModelPatcher with CFG only for σ_lo < σ ≤ σ_hi, ``bounds(model_sampling) -> (σ_lo, σ_hi)``."""
    kind = wrapper_type(node_id, "CALC_COND_BATCH")
    warned = []

    def interval_calc_cond_batch(executor, base, conds, x_in, timestep, model_options):
        """[cond, uncond] -> [cond, cond] outside the interval, the uncond never evaluated."""
        if "sampler_calc_cond_batch_function" in model_options and not warned:
            warned.append(True)
            logging.warning(f"{node_id}: another node replaced ComfyUI's cond batch (sampler_calc_cond_batch_function"
                            f", e.g. SkipLayerGuidanceDiTSimple); guidance may act outside the interval.")
        if len(conds) != 2 or conds[0] is None or conds[1] is None or guided(float(timestep.max()), *bounds(base.model_sampling)):
            return executor(base, conds, x_in, timestep, model_options)
        cond_pred = executor(base, [conds[0], None], x_in, timestep, model_options)[0]
        return [cond_pred, cond_pred.clone()]

    patched = model.clone()
    patched.add_wrapper_with_key(kind, f"spell_interval_{uuid.uuid4().hex[:8]}", interval_calc_cond_batch)
    return patched


def patch_cads(model, noise_scale, tau1=0.6, tau2=0.9, psi=1.0, seed=0, node_id="SpellCADS"):
    """A clone of the ModelPatcher with CADS on the conditional cross-attention tokens, re-seeded every run."""
    apply_kind, outer_kind = wrapper_type(node_id, "APPLY_MODEL"), wrapper_type(node_id, "OUTER_SAMPLE")
    key = f"spell_cads_{uuid.uuid4().hex[:8]}"

    def cads_outer_sample(executor, *args, **kwargs):
        """Seeds this run's generator."""
        options = executor.class_obj.model_options.setdefault("transformer_options", {})
        options[key] = torch.Generator().manual_seed(seed)
        return executor(*args, **kwargs)

    def cads_apply_model(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        """c_crossattn -> ŷ on the conditional chunks."""
        if c_crossattn is not None and key in transformer_options:
            gamma = cads_gamma(normalised_time(executor.class_obj.model_sampling, float(t.max())), tau1, tau2)
            c_crossattn = cads_on_cond_chunks(c_crossattn, transformer_options["cond_or_uncond"], gamma, noise_scale,
                                              psi, transformer_options[key])
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    patched = model.clone()
    patched.add_wrapper_with_key(outer_kind, key, cads_outer_sample)
    patched.add_wrapper_with_key(apply_kind, key, cads_apply_model)
    return patched


class SpellGuidanceInterval:
    """Implementation of arXiv 2404.07724 'Applying Guidance in a Limited Interval Improves Sample and
    Distribution Quality in Diffusion Models'."""
    NODE_ID = "SpellGuidanceInterval"
    DISPLAY_NAME = "SPELL Guidance Interval"
    CATEGORY = "SPELL"
    DESCRIPTION = (
        "Guidance in a limited interval (Kynkäänniemi et al., NeurIPS 2024): classifier-free guidance acts only "
        "between start_percent and end_percent of the schedule; elsewhere the sampler uses the conditional "
        "prediction alone (CFG 1) and skips the unconditional model call. More diverse images, often better ones. "
        "Place it anywhere in the MODEL chain before the sampler; it chains with SPELL Sparse Repellency, CFG "
        "rescaling and other guidance nodes in either order."
    )
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with guidance limited to the interval.",)
    FUNCTION = "patch"
    SEARCH_ALIASES = ["SPELL", "guidance interval", "limited interval guidance", "CFG interval", "diversity"]

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to patch."}),
                "start_percent": ("FLOAT", {"default": 0.19, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                    "Where in the schedule guidance starts (0 = first step). Steps before it use CFG 1 (the image's "
                    "layout is then left free: more diversity). Default 0.19: σ = 5.33 on SD1.x/SDXL's schedule, the "
                    "paper's SD-XL interval (0.28, 5.42] to whole percents. Tune this first: larger = more diverse."}),
                "end_percent": ("FLOAT", {"default": 0.93, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                    "Where in the schedule guidance ends (1 = last step). Steps after it use CFG 1. Default 0.93: "
                    "σ = 0.27 on SD1.x/SDXL's schedule. start 0 and end 1: plain CFG everywhere (no-op); "
                    "start = end: CFG 1 everywhere."}),
            },
        }

    def patch(self, model, start_percent, end_percent):
        check_numbers(self.NODE_ID, start_percent=start_percent, end_percent=end_percent)
        if start_percent > end_percent:
            raise SpellInputError(self.NODE_ID, f"start_percent ({start_percent}) must not be above end_percent "
                                                f"({end_percent}); swap them.")

        def bounds(sampling):
            return float(sampling.percent_to_sigma(end_percent)), float(sampling.percent_to_sigma(start_percent))

        return (patch_guidance_interval(model, bounds, self.NODE_ID),)


class SpellCADS:
    """Implementation of arXiv 2310.17347 'CADS: Unleashing the Diversity of Diffusion Models through
    Condition-Annealed Sampling'."""
    NODE_ID = "SpellCADS"
    DISPLAY_NAME = "SPELL CADS"
    CATEGORY = "SPELL"
    DESCRIPTION = (
        "Condition-annealed sampling (CADS, Sadat et al., ICLR 2024): early in the schedule the prompt's tokens are "
        "replaced by noise, which fades out between tau2 and tau1, so images of one prompt start from different "
        "layouts. The negative prompt is left as it is. Place it anywhere in the MODEL chain before the sampler; it "
        "chains with SPELL Sparse Repellency, SPELL Guidance Interval and other model wrappers in either order."
    )
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with CADS applied to the positive conditioning when it samples.",)
    FUNCTION = "patch"
    SEARCH_ALIASES = ["SPELL", "CADS", "condition annealing", "condition noise", "diversity"]

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to patch."}),
                "noise_scale": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 5.0, "step": 0.01, "tooltip":
                    "s: the noise mixed into the prompt's tokens, ŷ = √γ·y + s·√(1−γ)·n. Suggested range 0.025 to "
                    "0.25. With psi 1 the tokens are rescaled to their own mean and spread, so s mostly shapes the "
                    "tau1..tau2 ramp; s = 0 is not off. To switch CADS off, bypass the node."}),
                "tau1": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                    "τ1: below this time (1 = pure noise, 0 = finished) the prompt is clean (γ = 1). Tune this "
                    "first: lower = noise for longer = more diversity, less faithful to the prompt."}),
                "tau2": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                    "τ2: above this time the prompt's tokens are noise only (γ = 0); between tau1 and tau2 γ falls "
                    "linearly. Must be above tau1."}),
                "psi": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                    "ψ: mix of the rescaled noisy tokens (mean and spread of the clean ones restored, 1) and the raw "
                    "noisy tokens (0). The paper uses 1 against divergence."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip":
                    "Seed of the condition noise, re-seeded at the start of every sampling run: the same seed and "
                    "sampler seed give the same images."}),
            },
        }

    def patch(self, model, noise_scale, tau1, tau2, psi, seed):
        check_numbers(self.NODE_ID, noise_scale=noise_scale, tau1=tau1, tau2=tau2, psi=psi)
        if not 0 <= tau1 < tau2 <= 1:
            raise SpellInputError(self.NODE_ID, f"need 0 ≤ tau1 < tau2 ≤ 1, got tau1 = {tau1}, tau2 = {tau2}; set "
                                                f"tau1 below tau2 (defaults 0.6 and 0.9).")
        if noise_scale < 0 or not 0 <= psi <= 1:
            raise SpellInputError(self.NODE_ID, f"need noise_scale ≥ 0 and 0 ≤ psi ≤ 1, got {noise_scale} and {psi}.")
        return (patch_cads(model, noise_scale, tau1, tau2, psi, seed, self.NODE_ID),)


NODES = [SpellGuidanceInterval, SpellCADS]
