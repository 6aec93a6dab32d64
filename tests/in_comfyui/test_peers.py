"""SPELL Guidance Interval and SPELL CADS (nodes/peers.py) inside ComfyUI's real KSampler path
(nodes.common_ksampler) on the toy EPS model built on ComfyUI's UNetModel: the formulas, the skipped uncond call,
reproducibility, and chaining with SPELL Sparse Repellency, RescaleCFG and a unet function wrapper."""
import math

import pytest
import torch
from comfy.patcher_extension import WrappersMP

from helpers import last_log, model_space, sample


def interval(comfy, model, start, end):
    return comfy.NODE_CLASS_MAPPINGS["SpellGuidanceInterval"]().patch(model, start, end)[0]


def cads(comfy, model, s=0.25, tau1=0.6, tau2=0.9, psi=1.0, seed=0):
    return comfy.NODE_CLASS_MAPPINGS["SpellCADS"]().patch(model, s, tau1, tau2, psi, seed)[0]


def probed(model, seen):
    """A clone with an APPLY_MODEL wrapper of its own that records (σ, which chunks) of every model call."""
    m = model.clone()

    def probe(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        seen.append((float(t.max()), sorted(transformer_options["cond_or_uncond"])))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test_probe", probe)
    return m


def spell(comfy, model, radius):
    """SPELL Sparse Repellency, every image repelled by the others within the absolute radius."""
    return comfy.NODE_CLASS_MAPPINGS["SpellRepellency"]().patch(model, radius, 1.6, "mutual", 0.0, 1.0, False,
                                                                 batch_radius_scale=0.0, batch_end_percent=1.0)[0]


def spell_pushed(model):
    return sum(sum(s.active_pairs) for s in last_log(model).steps)


def test_interval_over_the_whole_schedule_is_plain_cfg_and_an_empty_one_is_cfg_1(comfy, toy_models, conds):
    """start 0, end 1: bit-identical to the unpatched run at CFG 4; start = end: bit-identical to CFG 1 (the uncond
    prediction is never made, exactly as ComfyUI's own CFG-1 path)."""
    model = toy_models["eps"]
    plain, cfg1 = sample(comfy, model, conds, 3), sample(comfy, model, conds, 3, cfg=1.0)
    assert not torch.equal(plain, cfg1)  # precondition: guidance matters on this model
    assert torch.equal(sample(comfy, interval(comfy, model, 0.0, 1.0), conds, 3), plain)
    assert torch.equal(sample(comfy, interval(comfy, model, 0.5, 0.5), conds, 3), cfg1)


def test_interval_guides_inside_only_and_skips_the_uncond_call_outside(comfy, toy_models, conds):
    """start 0.3, end 0.7 over 8 Euler steps: calls with σ in (σ(0.7), σ(0.3)] evaluate cond and uncond, all others
    the cond alone; the result matches a reference cfg function written from the paper's rule (CFG at σ in the
    interval, the cond prediction elsewhere), up to the rounding of that hook's x − (x − D)."""
    model = toy_models["eps"]
    ms = model.get_model_object("model_sampling")
    lo, hi = ms.percent_to_sigma(0.7), ms.percent_to_sigma(0.3)
    seen = []
    out = sample(comfy, probed(interval(comfy, model, 0.3, 0.7), seen), conds, 3, steps=8)
    inside = [cu for s, cu in seen if lo < s <= hi]
    outside = [cu for s, cu in seen if not lo < s <= hi]
    assert inside and outside, "precondition: steps on both sides of the interval"
    assert all(cu == [0, 1] for cu in inside) and all(cu == [0] for cu in outside)

    reference = model.clone()
    reference.set_model_sampler_cfg_function(
        lambda a: a["uncond"] + (a["cond"] - a["uncond"]) * a["cond_scale"] if lo < float(a["sigma"].max()) <= hi
        else a["cond"], disable_cfg1_optimization=True)
    ref = sample(comfy, reference, conds, 3, steps=8)
    # the hook's x − (x − D) rounds to about one float32 step of |x| per call: 2 per step over the 8 steps
    # (measured: 2.1e-5 on an AVX2 CPU, where the bound is 7.8e-5; 1e-5 held on the earlier machines' CPUs)
    tol = 2 * 8 * torch.finfo(torch.float32).eps * float(ref.abs().max())
    assert torch.allclose(out, ref, atol=tol, rtol=0), ((out - ref).abs().max(), tol)
    assert not torch.allclose(out, sample(comfy, model, conds, 3, steps=8), atol=1e-3)


def test_interval_leaves_the_cfg_slot_to_rescale_cfg(comfy, toy_models, conds):
    """RescaleCFG (ComfyUI's sampler_cfg_function) before or after the interval node: over the whole schedule the
    result is RescaleCFG's, bit for bit; with an empty interval RescaleCFG sees cond = uncond and gives CFG 1."""
    model = toy_models["eps"]
    rescale = comfy.NODE_CLASS_MAPPINGS["RescaleCFG"]()
    rescaled = sample(comfy, rescale.patch(model, 0.7)[0], conds, 3)
    cfg1 = sample(comfy, model, conds, 3, cfg=1.0)
    assert torch.equal(sample(comfy, interval(comfy, rescale.patch(model, 0.7)[0], 0.0, 1.0), conds, 3), rescaled)
    assert torch.equal(sample(comfy, rescale.patch(interval(comfy, model, 0.0, 1.0), 0.7)[0], conds, 3), rescaled)
    empty = sample(comfy, rescale.patch(interval(comfy, model, 0.4, 0.4), 0.7)[0], conds, 3)
    assert torch.allclose(empty, cfg1, atol=1e-5) and not torch.allclose(rescaled, cfg1, atol=1e-3)


@pytest.mark.parametrize("peer", ["interval", "cads"])
def test_peers_chain_with_spell_in_either_order(comfy, toy_models, conds, peer):
    """SPELL Sparse Repellency (mutual, r twice the batch's largest distance) before or after each peer node: both act (the
    result differs from each alone) and SPELL's run log shows pushed pairs."""
    model = toy_models["eps"]
    patch = (lambda m: interval(comfy, m, 0.2, 0.8)) if peer == "interval" else (lambda m: cads(comfy, m, seed=3))
    peer_only = sample(comfy, patch(model), conds, 4)
    z = model_space(model, peer_only).flatten(1)
    r = 2.0 * (torch.cdist(z, z) / z.shape[1] ** 0.5).max().item()  # every pair within r at the end
    spell_alone = spell(comfy, model, r)
    spell_only = sample(comfy, spell_alone, conds, 4)
    assert spell_pushed(spell_alone) > 0
    for chained in (patch(spell(comfy, model, r)),
                    spell(comfy, patch(model), r)):
        out = sample(comfy, chained, conds, 4)
        assert not torch.equal(out, peer_only) and not torch.equal(out, spell_only)
        assert spell_pushed(chained) > 0


def test_cads_is_reproducible_from_its_seed_per_run(comfy, toy_models, conds):
    """One patched model sampled twice with one seed gives the same images (the generator is re-seeded every run);
    another seed gives others; s = 0 is not a no-op (ψ = 1 turns the tokens into their mean for t ≥ τ2)."""
    model = toy_models["eps"]
    plain = sample(comfy, model, conds, 2)
    patched = cads(comfy, model, seed=5)
    first = sample(comfy, patched, conds, 2)
    assert torch.equal(sample(comfy, patched, conds, 2), first)
    assert torch.equal(sample(comfy, cads(comfy, model, seed=5), conds, 2), first)
    assert not torch.equal(sample(comfy, cads(comfy, model, seed=6), conds, 2), first)
    assert not torch.equal(first, plain)
    assert not torch.equal(sample(comfy, cads(comfy, model, s=0.0), conds, 2), plain)


def test_cads_keeps_the_unet_wrapper_slot_and_the_uncond(comfy, toy_models, conds):
    """A unet function wrapper set by another node (ComfyUI's single slot) still runs with CADS after it, and the
    result is CADS's alone; a wrapper inside CADS's sees the negative prompt's tokens unchanged and the positive
    prompt's replaced while t > τ1, untouched after."""
    model = toy_models["eps"]
    calls = []

    def passthrough(apply_model, args):
        calls.append(args["cond_or_uncond"])
        return apply_model(args["input"], args["timestep"], **args["c"])

    wrapped = model.clone()
    wrapped.set_model_unet_function_wrapper(passthrough)
    alone = sample(comfy, cads(comfy, model, seed=2), conds, 2)
    both = cads(comfy, wrapped, seed=2)
    assert torch.equal(sample(comfy, both, conds, 2), alone) and calls
    assert both.model_options["model_function_wrapper"] is passthrough

    seen = []
    inner = cads(comfy, model, seed=2).clone()

    def tokens(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        seen.append((float(t.max()), transformer_options["cond_or_uncond"], c_crossattn))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    inner.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test_tokens", tokens)
    sample(comfy, inner, conds, 2, steps=6)
    pos, neg = conds[0][0][0], conds[1][0][0]
    ms = model.get_model_object("model_sampling")
    from spell_core.peers import normalised_time
    changed = []
    for sigma, cou, y in seen:
        for k, chunk in zip(cou, y.chunk(len(cou))):
            ref = (pos if k == 0 else neg).expand_as(chunk)
            if k == 1:
                assert torch.equal(chunk, ref)
            else:
                changed.append((normalised_time(ms, sigma) > 0.6, not torch.equal(chunk, ref)))
    assert changed and all(late_noise == differs for late_noise, differs in changed)


def test_benchmark_patches_are_the_nodes(comfy, toy_models, conds):
    """benchmarks/peers.py builds its CADS and interval patches through nodes/peers.py: same images."""
    from benchmarks.peers import patch_cads, patch_interval_guidance

    model = toy_models["eps"]
    ms = model.get_model_object("model_sampling")
    assert torch.equal(sample(comfy, patch_cads(model, 0.25, seed=4), conds, 2),
                       sample(comfy, cads(comfy, model, seed=4), conds, 2))
    bench = patch_interval_guidance(model, ms.percent_to_sigma(0.7), ms.percent_to_sigma(0.3))
    assert torch.equal(sample(comfy, bench, conds, 2), sample(comfy, interval(comfy, model, 0.3, 0.7), conds, 2))


@pytest.mark.parametrize("node, values, message", [
    ("SpellGuidanceInterval", (0.6, 0.4), "start_percent (0.6) must not be above end_percent (0.4)"),
    ("SpellGuidanceInterval", (math.nan, 0.4), "start_percent must be a finite number"),
    ("SpellCADS", (0.25, 0.9, 0.6, 1.0, 0), "need 0 ≤ tau1 < tau2 ≤ 1"),
    ("SpellCADS", (math.nan, 0.6, 0.9, 1.0, 0), "noise_scale must be a finite number"),
])
def test_bad_inputs_are_refused_naming_the_node(comfy, toy_models, node, values, message):
    with pytest.raises(ValueError, match=f"{node}: {message}".replace("(", r"\(").replace(")", r"\)")):
        comfy.NODE_CLASS_MAPPINGS[node]().patch(toy_models["eps"], *values)
