"""SpellRepellency inside ComfyUI's real sampler, on toy models built on ComfyUI's UNetModel:
EPS and v-prediction (4 channels) and flow (16 channels, SD3 latent format)."""
import math
from pathlib import Path

import comfy.samplers
import pytest
import torch

from spell_core import nearest

from helpers import last_log, model_space, protected, sample, spell

SAMPLERS = list(comfy.samplers.KSampler.SAMPLERS)
# One sampler per family, for the model type that is not swept over every sampler (to keep the suite short).
FAMILIES = ["euler_ancestral", "heun", "dpmpp_2m", "dpmpp_sde", "dpmpp_2m_sde", "lcm", "ddim", "uni_pc", "res_multistep"]


def nearest64(model, latents, refs):
    """What a user checks: float64 RMS distances, in the model's space, from each returned latent (VAE space,
    float32 as the sampler returns it) to its nearest reference; the latent format applied in float64."""
    fmt = model.model.latent_format
    x, z = fmt.process_in(latents.double()).flatten(1), fmt.process_in(refs.double()).flatten(1)
    return (torch.cdist(x, z, compute_mode="donot_use_mm_for_euclid_dist") / x.shape[1] ** 0.5).min(1).values


def shield_case(comfy, model, conds):
    """A protected set made of what the model itself would generate (plus a little noise): the hardest case."""
    base = sample(comfy, model, conds, 4)
    z = model_space(model, base)
    g = torch.Generator().manual_seed(0)
    refs = base + 0.01 * base.std() * torch.randn(base.shape, generator=g)
    d = torch.cdist(z.flatten(1), z.flatten(1)) / z[0].numel() ** 0.5
    r = 0.5 * d[d > 0].min().item()  # balls around distinct outputs do not swallow each other
    return protected(comfy, refs), r


@pytest.mark.parametrize("kind, lam, samplers", [("eps", 1.6, SAMPLERS), ("flow", 1.0, SAMPLERS),
                                                 ("v_prediction", 1.6, FAMILIES)])
def test_every_sampler_keeps_outputs_out_of_the_shield(comfy, toy_models, conds, kind, lam, samplers):
    """No final output inside the shield, for every sampler ComfyUI ships (including two-call samplers), with
    λ = 1 (parks images exactly on the border) on the 16-channel flow model: checked in float64 on the returned
    latents, with no tolerance."""
    model = toy_models[kind]
    refs, r = shield_case(comfy, model, conds)
    failures = []
    for name in samplers:
        patched = spell(comfy, model, r, lam=lam, references=refs)
        out = sample(comfy, patched, conds, 4, sampler=name)
        d = nearest64(model, out, refs.latents)
        if not (d >= r).all() or not torch.isfinite(out).all():
            failures.append((name, d.min().item() / r))
        assert last_log(patched).finished
    assert not failures, f"outputs inside the shield (distance / r): {failures}"


def test_shield_without_enforcement_is_the_paper_push_only(comfy, toy_models, conds):
    """enforce_shield off: the log counts no enforcement and the push alone acts (it may leak)."""
    model = toy_models["eps"]
    refs, r = shield_case(comfy, model, conds)
    patched = spell(comfy, model, r, enforce=False, references=refs)
    sample(comfy, patched, conds, 4)
    log = last_log(patched)
    assert log.enforced == 0 and log.active_share() > 0


def test_sparsity_untouched_images_are_bit_identical(comfy, toy_models, conds):
    """An image whose trajectory never comes within r of a reference is bit-identical to the unpatched run."""
    model = toy_models["eps"]
    base = sample(comfy, model, conds, 4, steps=10)
    z = model_space(model, base)
    d = torch.cdist(z.flatten(1), z.flatten(1)) / z[0].numel() ** 0.5
    refs = protected(comfy, base[:1] + 0.01)
    patched = spell(comfy, model, 0.3 * d[0, 1:].min().item(), references=refs)
    out = sample(comfy, patched, conds, 4, steps=10)
    log = last_log(patched)
    never = [i for i in range(4) if all(s.active_pairs[i] == 0 for s in log.steps)]
    assert 0 not in never and never, f"precondition: image 0 pushed, some others never ({never})"
    assert not torch.equal(out[0], base[0])
    for i in never:
        assert torch.equal(out[i], base[i]), f"image {i} was never pushed but changed"


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_noop_settings_are_bit_identical(comfy, toy_models, conds, kind):
    """λ = 0 without enforcement, or an active window that no step falls in, changes nothing at all."""
    model = toy_models[kind]
    base = sample(comfy, model, conds, 3)
    refs = protected(comfy, base.clone())
    zero = spell(comfy, model, 5.0, lam=0.0, in_batch="mutual", enforce=False, references=refs)
    assert torch.equal(sample(comfy, zero, conds, 3), base)
    narrow = spell(comfy, model, 5.0, in_batch="mutual", start=0.5, end=0.5001, enforce=False, references=refs)
    assert torch.equal(sample(comfy, narrow, conds, 3), base)
    assert last_log(narrow).steps == []  # precondition: no model call fell inside the window


@pytest.mark.parametrize("mode", ["mutual", "ordered"])
def test_in_batch_repellency_spreads_the_batch(comfy, toy_models, conds, mode):
    """Same prompt, in-batch SPELL: the closest pair of the batch ends farther apart than without it."""
    model = toy_models["eps"]
    base = model_space(model, sample(comfy, model, conds, 6, steps=10))
    mask = ~torch.eye(6, dtype=torch.bool)
    d0 = nearest(base, base, mask)
    patched = spell(comfy, model, 2.0 * d0.max().item(), in_batch=mode)
    out = model_space(model, sample(comfy, patched, conds, 6, steps=10))
    assert nearest(out, out, mask).min() > d0.min()
    if mode == "ordered":
        assert torch.equal(out[0], base[0])  # the first image is never repelled in ordered mode


def test_chains_with_another_post_cfg_node(comfy, toy_models, conds):
    """SPELL before or after ComfyUI's PerturbedAttentionGuidance (also a post-CFG function): both act,
    and the shield still holds."""
    model = toy_models["eps"]
    pag = comfy.NODE_CLASS_MAPPINGS["PerturbedAttentionGuidance"]
    refs, r = shield_case(comfy, model, conds)
    pag_only = sample(comfy, pag.execute(model, 3.0).result[0], conds, 4)
    spell_only = sample(comfy, spell(comfy, model, r, references=refs), conds, 4)
    chains = (pag.execute(spell(comfy, model, r, references=refs), 3.0).result[0],
              spell(comfy, pag.execute(model, 3.0).result[0], r, references=refs))
    for chained in chains:
        assert len(chained.model_options["sampler_post_cfg_function"]) == 2
        out = sample(comfy, chained, conds, 4)
        assert not torch.equal(out, pag_only) and not torch.equal(out, spell_only)
        assert (nearest64(model, out, refs.latents) >= r).all()


def test_partial_runs_are_left_alone(comfy, toy_models, conds):
    """KSamplerAdvanced returning leftover noise: no enforcement and no memory append on the partial run."""
    model = toy_models["eps"]
    refs, r = shield_case(comfy, model, conds)
    mem = comfy.NODE_CLASS_MAPPINGS["SpellBatchMemory"]().open("partial-run", 16)[0]
    mem.clear()
    patched = spell(comfy, model, r, references=refs, memory=mem)
    pos, neg = conds
    adv = comfy.NODE_CLASS_MAPPINGS["KSamplerAdvanced"]()
    adv.sample(patched, "enable", 7, 6, 4.0, "euler", "normal", pos, neg, {"samples": torch.zeros(2, 4, 8, 8)},
               0, 3, "enable")
    assert len(mem) == 0 and last_log(patched).finished is False


def test_large_protected_sets_go_through_the_exact_index(comfy, toy_models, conds):
    """A set above INDEX_MIN_REFERENCES is searched through spell_core.index, in memory or from an index folder
    in models/spell_sets; the shield holds as with brute force (flow model: SD3 latent format's scale and shift)."""
    import folder_paths

    from spell_core.index import ReferenceIndex

    model = toy_models["flow"]
    refs, r = shield_case(comfy, model, conds)
    g = torch.Generator().manual_seed(5)
    filler = refs.latents[:1] + 3.0 * torch.randn((4200,) + refs.latents.shape[1:], generator=g)
    big = protected(comfy, torch.cat([refs.latents, filler]))
    ReferenceIndex.build(big.latents).save(Path(folder_paths.get_folder_paths("spell_sets")[0]) / "big_index")
    from_folder = comfy.NODE_CLASS_MAPPINGS["SpellProtectedSetLoader"]().load(
        "(none)", "big_index/", 64, 64, "center crop")[0]
    for refs_in in (big, from_folder):
        patched = spell(comfy, model, r, references=refs_in)
        out = sample(comfy, patched, conds, 4, sampler="dpmpp_2m")
        assert refs_in.search_index() is not None and last_log(patched).n_static == len(big)
        assert (nearest64(model, out, big.latents) >= r).all()


def test_adaptive_batch_radius_by_default(comfy):
    """The node's default in-batch radius (batch_radius_scale > 0) through ComfyUI's KSampler on the demo model:
    the batch ends more spread out than without SPELL, the radius shrinks with the batch's spacing while the
    in-batch push acts, the push stops at batch_end_percent (0.6: σ 1.16 on the demo, after 12 of 20 calls), and the
    report states it."""
    model, _, _ = comfy.NODE_CLASS_MAPPINGS["SpellDemoModelLoader"]().load()
    enc = comfy.NODE_CLASS_MAPPINGS["SpellDemoClassPrompt"]()
    prompts = comfy.NODE_CLASS_MAPPINGS["SpellDemoModelLoader"]().load()[2]
    pos, neg = enc.encode(prompts, "3")[0], enc.encode(prompts, "(empty)")[0]
    node = comfy.NODE_CLASS_MAPPINGS["SpellRepellency"]()
    patched = node.patch(model, 0.5, 1.6, "mutual", 0.0, 1.0, True)[0]  # batch_radius_scale left at its default
    base = model_space(model, sample(comfy, model, (pos, neg), 8, steps=20))
    out = model_space(model, sample(comfy, patched, (pos, neg), 8, steps=20))
    mask = ~torch.eye(8, dtype=torch.bool)
    assert nearest(out, out, mask).median() > nearest(base, base, mask).median()
    steps = last_log(patched).steps
    cut = float(model.get_model_object("model_sampling").percent_to_sigma(0.6))
    assert [not math.isnan(s.batch_r) for s in steps] == [s.sigma >= cut for s in steps]
    assert sum(s.sigma >= cut for s in steps) == 12 and len(steps) == 20
    assert all(sum(s.active_pairs) == 0 for s in steps if s.sigma < cut)  # no shield: nothing pushes after the cut
    radii = [s.batch_r for s in steps if s.sigma >= cut]
    assert radii == sorted(radii, reverse=True) and radii[-1] < radii[0] / 2
    assert max(radii[-1], radii[0]) != 0.5  # not the absolute radius
    report = comfy.NODE_CLASS_MAPPINGS["SpellReport"]().report(patched, {"samples": out})["result"][0]
    assert "in-batch radius (adaptive)" in report and "nan" not in report
    assert f"at the last (in-batch push in 12 of 20 calls, down to σ = {steps[11].sigma:.3g})" in report


def test_feature_space_push_through_the_node(comfy):
    """``features`` (a keyword of the patch, not a widget): the batch repels in the demo feature network's space,
    through ComfyUI's KSampler: its images end farther apart in those features than without SPELL, the logged
    radius is in feature units and never grows; the absolute radius (scale 0) is refused."""
    from demo.feature_net import latent_features, load_feature_net
    from spell_core.repellency import rms_cdist

    phi = latent_features(load_feature_net())
    loader = comfy.NODE_CLASS_MAPPINGS["SpellDemoModelLoader"]()
    model, _, prompts = loader.load()
    enc = comfy.NODE_CLASS_MAPPINGS["SpellDemoClassPrompt"]()
    pos, neg = enc.encode(prompts, "any digit")[0], enc.encode(prompts, "(empty)")[0]
    node = comfy.NODE_CLASS_MAPPINGS["SpellRepellency"]()
    patched = node.patch(model, 0.5, 1.6, "mutual", 0.0, 1.0, True, batch_radius_scale=3.0, features=phi)[0]
    base = sample(comfy, model, (pos, neg), 8, steps=20)
    out = sample(comfy, patched, (pos, neg), 8, steps=20)
    mask = ~torch.eye(8, dtype=torch.bool)
    spacing = lambda x: rms_cdist(phi(x).detach(), phi(x).detach()).masked_fill(~mask, float("inf")).min(1).values
    assert spacing(out).median() > spacing(base).median()
    log = last_log(patched)
    radii = [s.batch_r for s in log.steps]
    assert radii == sorted(radii, reverse=True) and log.active_share() > 0
    with pytest.raises(ValueError, match="SpellRepellency: a feature-space push needs batch_radius_scale > 0"):
        node.patch(model, 0.5, 1.6, "mutual", 0.0, 1.0, True, batch_radius_scale=0.0, features=phi)
