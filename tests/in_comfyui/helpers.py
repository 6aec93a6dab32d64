"""Small helpers for node tests: sampling through ComfyUI's own KSampler code and the pack's nodes."""
import torch


def sample(comfy, model, conds, batch, seed=7, steps=4, sampler="euler", scheduler="normal", cfg=4.0, channels=None):
    """ComfyUI's KSampler path (nodes.common_ksampler) on an empty latent of the toy size [C, 8, 8]."""
    c = channels or model.model.latent_format.latent_channels
    latent = {"samples": torch.zeros(batch, c, 8, 8)}
    pos, neg = conds
    return comfy.common_ksampler(model, seed, steps, cfg, sampler, scheduler, pos, neg, latent)[0]["samples"]


def spell(comfy, model, radius, lam=1.6, in_batch="off", start=0.0, end=1.0, enforce=True, references=None, memory=None,
          batch_scale=0.0, batch_end=1.0):
    """SpellRepellency's patch; batch_scale 0 and batch_end 1 by default: the in-batch push within the absolute r
    until the end (the paper's)."""
    node = comfy.NODE_CLASS_MAPPINGS["SpellRepellency"]()
    return node.patch(model, radius, lam, in_batch, start, end, enforce, references=references, memory=memory,
                      batch_radius_scale=batch_scale, batch_end_percent=batch_end)[0]


def protected(comfy, latents):
    loader = comfy.NODE_CLASS_MAPPINGS["SpellProtectedSetLoader"]()
    return loader.load("(none)", "(none)", 64, 64, "center crop", latent={"samples": latents})[0]


def model_space(model, latents):
    return model.model.process_latent_in(latents.float())


def last_log(model):
    return model.model_options["transformer_options"]["spell_history"][-1].latest()
