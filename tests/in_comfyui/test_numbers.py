"""NaN and ±inf in FLOAT inputs: ComfyUI's min/max check lets NaN through (every comparison with NaN is false),
and the run would fail deep inside the sampler (start_percent = NaN: IndexError in KSampler). Each is refused
before sampling, through ComfyUI's executor, with the node and the input named."""
import math

import pytest


def spell_graph(**spell_inputs):
    g = {
        "1": {"class_type": "SpellDemoModelLoader", "inputs": {}},
        "2": {"class_type": "SpellDemoClassPrompt", "inputs": {"prompts": ["1", 2], "prompt": "any digit"}},
        "3": {"class_type": "SpellDemoClassPrompt", "inputs": {"prompts": ["1", 2], "prompt": "(empty)"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "10": {"class_type": "SpellRepellency", "inputs": {
            "model": ["1", 0], "radius": 0.5, "overcompensation": 1.6, "in_batch": "mutual", "start_percent": 0.0,
            "end_percent": 1.0, "enforce_shield": True}},
        "11": {"class_type": "KSampler", "inputs": {
            "model": ["10", 0], "seed": 1, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "14": {"class_type": "SpellReport", "inputs": {"model": ["10", 0], "samples": ["11", 0]}},
    }
    g["10"]["inputs"].update(spell_inputs)
    return g


@pytest.mark.parametrize("name", ["radius", "overcompensation", "start_percent", "end_percent", "batch_radius_scale",
                                  "batch_end_percent"])
def test_spell_refuses_nan_before_sampling(executor, name):
    result = executor.run(spell_graph(**{name: math.nan}))
    assert not result.success
    assert f"SpellRepellency: {name} must be a finite number, got nan" in result.error, result.error
    assert "11" not in result.executed  # the sampler never started


@pytest.mark.parametrize("value", [math.inf, -math.inf], ids=["inf", "-inf"])
@pytest.mark.parametrize("name", ["radius", "overcompensation", "start_percent", "end_percent"])
def test_spell_refuses_infinities(comfy, toy_models, name, value, executor):
    """±inf: ComfyUI's own range check names the node and input in a queued prompt; a direct call (another
    node pack, a script) meets the node's own check."""
    queued = executor.run(spell_graph(**{name: value}))
    assert not queued.success and "SpellRepellency" in queued.error and name in queued.error
    values = {"radius": 0.5, "overcompensation": 1.6, "start_percent": 0.0, "end_percent": 1.0, name: value}
    with pytest.raises(ValueError, match=f"SpellRepellency: {name} must be a finite number"):
        comfy.NODE_CLASS_MAPPINGS["SpellRepellency"]().patch(
            toy_models["eps"], values["radius"], values["overcompensation"], "mutual", values["start_percent"],
            values["end_percent"], True)


@pytest.mark.parametrize("name", ["strength", "temperature"])
def test_distribution_guidance_refuses_nan(comfy, toy_models, name):
    from spell_core.fairness import AttributeHeads

    node = comfy.NODE_CLASS_MAPPINGS["SpellDistributionGuidance"]()
    model, _, _ = comfy.NODE_CLASS_MAPPINGS["SpellDemoModelLoader"]().load()
    values = {"strength": 100.0, "temperature": 8.0, name: math.nan}
    with pytest.raises(ValueError, match=f"SpellDistributionGuidance: {name} must be a finite number"):
        node.patch(model, AttributeHeads.__new__(AttributeHeads), "0: 1", values["strength"], "batch mean",
                   values["temperature"], "chi-square")


def test_head_trainer_refuses_nan_held_out(comfy):
    node = comfy.NODE_CLASS_MAPPINGS["SpellAttributeHeadTrainer"]()
    model, vae, prompts = comfy.NODE_CLASS_MAPPINGS["SpellDemoModelLoader"]().load()
    with pytest.raises(ValueError, match="SpellAttributeHeadTrainer: held_out must be a finite number"):
        node.train(model, vae, prompts.conditioning("any digit"), "(none)", "nan_test", 64, 64, 4, 4, math.nan, 0,
                   False)
