"""SpellRepellency: sparse repellency (SPELL, Kirchhof et al., ICML 2025, arXiv 2410.06025) as a MODEL patch.

Hooks, both chaining with other nodes' patches:
- post-CFG function (``comfy/samplers.py: cfg_function``): reads ``denoised`` (x̂0 after CFG, whole batch),
  ``input`` (x_t), ``sigma`` and ``model_options``; returns x̂0 + Δ.
- OUTER_SAMPLE wrapper (``comfy/samplers.py: CFGGuider.sample``): starts one ``spell_core.SpellRun`` per
  sampling run (references moved to model space, stored memory read), keeps it in the run's own
  ``model_options["transformer_options"]`` under this node's key, and at the end enforces the shield on
  the final latents and appends them to the batch memory.
"""
from __future__ import annotations

import uuid

import comfy.patcher_extension
import torch
from safetensors import SafetensorError

from ..spell_core import RunHistory, SpellConfig, SpellRun
from ..spell_core.repellency import IN_BATCH_MODES
from ..spell_core.run import check_features
from ..spell_core.shield import IndexPart, Shield, TensorPart, scalar_affine
from ..spell_core.storage import StorageError
from .common import SpellInputError, check_numbers

HISTORY_KEY = "spell_history"
# Step reuse of shield searches (spell_core.shield.StepReuse: one search at r·(1 + f) reused until an image's x̂0
# has moved r·f; exact) is off: on the demo with a 1.2 M shield it was slower than a search at every call (f 0.25:
# 0.977 s, f 0.5: 1.039 s, f 1: 5.4 s per batch of 8 against 0.862 s; docs/shield_e2e.md): a wider search returns many
# more of a dense set's near-duplicates than it saves. It is for searches that cost more per call than per
# candidate (a remote engine).
SHIELD_REUSE = 0.0
# The in-batch defaults (docs/diversity_decide.md, benchmarks/diversity_decide.py, 11 demo prompts x 16 seeds at
# batch 4 and 8): scale 1.1 with the in-batch push ending at 60 % of the schedule raised Vendi on every prompt at both
# batch sizes with precision within 0.03 of the baseline on all 22 (prompt, batch) cases (worst -0.023), and more
# than the earlier default (1.05 until the end: +0.039 against +0.033 at batch 8, mean precision 0.909 against 0.898);
# on 16 fresh seeds (2000-2015) it again gained more Vendi at higher mean precision than 1.05 (worst prompt -0.031).
# Pushing until the end at 1.1 cost up to 0.094 on "3"; the last steps refine each image undisturbed.
BATCH_SCALE_DEFAULT = 1.1
BATCH_END_DEFAULT = 0.6


class SpellRepellency:
    NODE_ID = "SpellRepellency"
    DISPLAY_NAME = "SPELL Sparse Repellency"
    CATEGORY = "SPELL"
    DESCRIPTION = (
        "Sparse repellency (SPELL, ICML 2025): at each step, pushes every image's predicted final result out of "
        "radius-r balls around reference latents (protected set, batch memory, the other images of the batch) "
        "and leaves it alone otherwise. Place it anywhere in the MODEL chain before the sampler; it chains with "
        "other post-CFG patches."
    )
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with sparse repellency applied when it samples.",)
    FUNCTION = "patch"
    SEARCH_ALIASES = ["SPELL", "repellency", "diversity", "shield"]

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to patch."}),
                "radius": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip":
                    "Shield radius r: RMS distance in the model's latent space (the same value means the same at any "
                    "resolution). Images whose predicted result comes closer than r to a protected reference or a "
                    "memory entry are pushed out. Measure it for your VAE and size with SPELL Shield Calibration "
                    "(wire its radius output here). The batch uses its own adaptive radius unless "
                    "batch_radius_scale is 0."}),
                "overcompensation": ("FLOAT", {"default": 1.6, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip":
                    "λ: how far past the ball's border the push aims. 1 moves exactly to the border; the paper uses "
                    "1.6. 0 switches the push off."}),
                "in_batch": (list(IN_BATCH_MODES), {"default": "mutual", "tooltip":
                    "Repel the images of one batch from each other. mutual: every image from every other; ordered: "
                    "image i only from images before it (the first image is never changed); off: only the protected "
                    "set and the memory repel."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                    "Where in the schedule the push starts (0 = first step)."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                    "Where in the schedule the push ends (1 = last step)."}),
                "enforce_shield": ("BOOLEAN", {"default": True, "tooltip":
                    "Guarantee: final outputs closer than r to a protected reference or a memory entry are moved "
                    "the shortest way out (counted in the report). Off: the push alone, as in the paper."}),
            },
            "optional": {
                "batch_radius_scale": ("FLOAT", {"default": BATCH_SCALE_DEFAULT, "min": 0.0, "max": 4.0, "step": 0.05,
                    "tooltip": "In-batch radius that adapts: the images of a batch repel each other within this "
                    "multiple of the batch's own spacing (the median distance from each predicted result to its "
                    "nearest other one, at each step, never growing within a run), so one value suits any "
                    "prompt, model and resolution. Higher: more diverse, less faithful. 0: use the absolute radius "
                    "r for the batch too (the paper's SPELL). The protected set and the memory always use r."}),
                "batch_end_percent": ("FLOAT", {"default": BATCH_END_DEFAULT, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Where in the schedule the images of a batch stop repelling each other (within "
                    "start_percent..end_percent). The last steps then refine each image undisturbed, which keeps "
                    "them faithful. The protected set and the memory push until end_percent. 1: until the end "
                    "(the paper's SPELL)."}),
                "references": ("SPELL_REFERENCES", {"tooltip": "Protected set: latents the outputs must stay away from."}),
                "memory": ("SPELL_MEMORY", {"tooltip": "Batch memory: earlier outputs to repel from; this run's "
                                                       "final latents are appended to it."}),
            },
        }

    def patch(self, model, radius, overcompensation, in_batch, start_percent, end_percent, enforce_shield,
              references=None, memory=None, batch_radius_scale=BATCH_SCALE_DEFAULT,
              batch_end_percent=BATCH_END_DEFAULT, *, shield_reuse=SHIELD_REUSE, features=None):
        """Not widgets, for scripts and benchmarks: ``shield_reuse`` 0 searches the static references at every
        model call; ``features`` (a differentiable map x̂0 [B, ...] in model space -> [B, F], image by image) makes
        the images of a batch repel each other in that feature space (``spell_core.feature_push``)."""
        check_numbers(self.NODE_ID, radius=radius, overcompensation=overcompensation, start_percent=start_percent,
                      end_percent=end_percent, batch_radius_scale=batch_radius_scale,
                      batch_end_percent=batch_end_percent)
        if not 0 <= batch_end_percent <= 1:
            raise SpellInputError(self.NODE_ID, f"batch_end_percent must lie in 0..1, got {batch_end_percent}.")
        if not radius > 0:
            raise SpellInputError(self.NODE_ID, f"radius must be > 0, got {radius}. To switch SPELL off, bypass the node.")
        if start_percent >= end_percent:
            raise SpellInputError(self.NODE_ID, f"start_percent ({start_percent}) must be below end_percent ({end_percent}).")
        if references is not None and len(references) == 0:
            raise SpellInputError(self.NODE_ID, "the protected set is empty; connect a loader with images or latents.")
        try:
            check_features(features, batch_radius_scale)
        except ValueError as e:
            raise SpellInputError(self.NODE_ID, str(e)) from None
        key = f"spell_{uuid.uuid4().hex[:8]}"
        history = RunHistory()
        patched = model.clone()

        def spell_outer_sample(executor, *args, **kwargs):
            """Starts a SpellRun, samples, then enforces the shield and fills the memory."""
            guider = executor.class_obj
            noise, sigmas = args[0], args[3]
            base = guider.model_patcher.model
            sampling = guider.model_patcher.get_model_object("model_sampling")
            config = SpellConfig(radius, overcompensation, in_batch, float(sampling.percent_to_sigma(start_percent)),
                                 float(sampling.percent_to_sigma(end_percent)), enforce_shield,
                                 batch_scale=batch_radius_scale, reuse=shield_reuse,
                                 batch_sigma_end=float(sampling.percent_to_sigma(batch_end_percent)))
            run = SpellRun(config, static_references(self.NODE_ID, base, noise.shape, references, memory), noise.shape,
                           features=features)
            guider.model_options.setdefault("transformer_options", {})[key] = run
            complete = float(sigmas[-1]) == 0  # read first: uni_pc overwrites sigmas[-1] in place
            out = executor(*args, **kwargs)
            if complete:  # partial runs (KSamplerAdvanced with leftover noise) stay untouched
                fixed, moved = run.finish(base.process_latent_in(out))
                if bool(moved.any()):  # untouched rows keep their exact bits (no round trip through the format)
                    out = torch.where(moved.view(-1, *[1] * (out.ndim - 1)), base.process_latent_out(fixed), out)
                if memory is not None:
                    store(memory, out)
            history.add(run.log)
            return out

        def spell_post_cfg(args):
            """x̂0 -> x̂0 + Δ."""
            run = args["model_options"]["transformer_options"][key]
            return run.step(args["denoised"], args["input"], args["sigma"])

        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, spell_outer_sample)
        patched.set_model_sampler_post_cfg_function(spell_post_cfg)
        patched.model_options.setdefault("transformer_options", {}).setdefault(HISTORY_KEY, []).append(history)
        return (patched,)


def static_references(node_id, base, sample_shape, references, memory):
    """The protected set and the stored memory as one Shield in model space, checked against the sampler's
    latents. Large sets keep their index and are reached through the latent format's scalar affine map."""
    item = tuple(sample_shape[1:])
    parts = []
    for what, source in (("protected set", references), ("batch memory", load_memory(node_id, memory))):
        if source is None:
            continue
        shape = source.item_shape if what == "protected set" else tuple(source.shape[1:])
        if shape != item:
            raise SpellInputError(node_id, describe_mismatch(what, shape, item, downscale_ratio(base), source))
        index = source.search_index() if what == "protected set" else None
        if index is None:
            latents = source.latents if what == "protected set" else source
            parts.append(TensorPart(base.process_latent_in(latents.float())))
            continue
        affine = scalar_affine(base.process_latent_in, item)
        if affine is None:
            raise SpellInputError(node_id, "this model's latent format is not a scalar scale and shift, which an "
                                           "indexed protected set needs; use a set of under 4096 references.")
        parts.append(IndexPart(index, *affine))
    return Shield(parts)


def store(memory, out):
    """Appends a run's outputs to its batch memory. A failed write (disk full, read-only folder, lock held by
    another process) leaves the stored memory as it was and is reported naming the memory node and its file; it
    surfaces on the sampler, which runs the append."""
    try:
        memory.append(out)
    except (OSError, SafetensorError, StorageError) as e:
        raise SpellInputError("SpellBatchMemory", f"could not store this run's outputs in {memory.path} ({e}); the "
                                                  f"memory was left as it was: free disk space or fix the folder's "
                                                  f"permissions, or use another memory name.") from e


def load_memory(node_id, memory):
    if memory is None:
        return None
    try:
        return memory.latents()
    except StorageError as e:
        raise SpellInputError(node_id, f"{e}; the file was left as it is: fix or move it, or use another memory name.") from e


def downscale_ratio(base) -> int:
    """Pixels per latent cell: the latent format's ``spacial_downscale_ratio`` where ComfyUI has it (newer
    lines), else 8 (every 2-D image family of 0.3.75: SD1.x, SDXL, SD3, Flux; the demo's VAE also packs 8 x 8)."""
    ratio = getattr(getattr(base, "latent_format", None), "spacial_downscale_ratio", 8)
    return ratio if isinstance(ratio, int) and ratio > 0 else 8


def describe_mismatch(what, have, want, ratio=8, source=None):
    """The fix for a set or memory of another latent shape, in pixels for image latents [C, h, w]."""
    if have[0] != want[0]:
        return (f"the {what} holds {have[0]}-channel latents but this model samples {want[0]}-channel latents "
                f"(another model family); build it with this model's VAE.")
    if len(have) != 3 or len(want) != 3:
        return (f"the {what} holds latents of size {have[1:]} but this sampler makes {want[1:]}; generate at the "
                f"set's size or rebuild the set at the sampler's size.")
    (h0, w0), (h1, w1) = have[1:], want[1:]
    px = lambda h, w: f"{w * ratio} x {h * ratio} px"
    head = (f"the {what} holds latents for {px(h0, w0)} images but this sampler makes {px(h1, w1)} "
            f"(latents {w0} x {h0} / {w1} x {h1}); ")
    if what == "batch memory":
        return head + (f"use another name in SPELL Batch Memory (or empty it with SPELL Batch Memory Clear), or set "
                       f"width/height of Empty Latent Image to {px(h0, w0)}.")
    sources = " ".join(getattr(source, "meta", {}).get("sources", []))
    if sources.startswith(("file ", "index ")):  # a saved set keeps its size
        return head + (f"set width/height of Empty Latent Image to {px(h0, w0)}, or rebuild the set at "
                       f"{px(h1, w1)}.")
    return head + (f"set width/height of SPELL Protected Set Loader to {px(h1, w1)} (or of Empty Latent Image to "
                   f"{px(h0, w0)}).")


NODES = [SpellRepellency]
