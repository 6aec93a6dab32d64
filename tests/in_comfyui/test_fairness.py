"""Fair generation through ComfyUI's executor on the demo model: heads trained from labelled digits and saved,
guidance moving the digit classes of "any digit" samples toward a target (scored by the demo evaluator, not
by the heads), the running count across runs, no gradient into the U-Net, and errors naming the node."""
from pathlib import Path

import folder_paths
import pytest
import torch

TARGET = "0: 0.5, 6: 0.5"


def graph(strength=100.0, target=TARGET, loss="per-image assignment", batch=8, seed=3, count=None, train=True):
    """API-format graph: demo digits -> trainer -> guidance -> KSampler -> report."""
    g = {
        "1": {"class_type": "SpellDemoModelLoader", "inputs": {}},
        "2": {"class_type": "SpellDemoClassPrompt", "inputs": {"prompts": ["1", 2], "prompt": "any digit"}},
        "3": {"class_type": "SpellDemoClassPrompt", "inputs": {"prompts": ["1", 2], "prompt": "(empty)"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "5": {"class_type": "SpellDemoDigitExamples", "inputs": {"per_class": 30}},
        "6": {"class_type": "SpellAttributeHeadTrainer", "inputs": {
            "model": ["1", 0], "vae": ["1", 1], "positive": ["2", 0], "folder": "(none)", "name": "test_digits",
            "width": 64, "height": 64, "noise_levels": 4, "pool_grid": 4, "held_out": 0.2, "seed": 0,
            "overwrite": True, "images": ["5", 0], "labels": ["5", 1]}},
        "10": {"class_type": "SpellDistributionGuidance", "inputs": {
            "model": ["1", 0], "heads": ["6", 0], "target": target, "strength": strength, "loss": loss,
            "temperature": 8.0, "divergence": "chi-square"}},
        "11": {"class_type": "KSampler", "inputs": {
            "model": ["10", 0], "seed": seed, "steps": 10, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "14": {"class_type": "SpellFairnessReport", "inputs": {"model": ["10", 0], "heads": ["6", 0],
                                                               "samples": ["11", 0]}},
    }
    if not train:
        g["6"] = {"class_type": "SpellAttributeHeadLoader", "inputs": {"heads_file": "test_digits.safetensors"}}
    if count is not None:
        g["7"] = {"class_type": "SpellFairnessCount", "inputs": {"name": count, "reset": False}}
        g["10"]["inputs"]["count"] = ["7", 0]
        g["14"]["inputs"]["count"] = ["7", 0]
    return g


def digit_classes(latents):
    from demo.data import latents_to_images16
    from demo.evaluator import load_evaluator

    return load_evaluator().predict(latents_to_images16(latents)).argmax(1)


@pytest.fixture(scope="module")
def fx(comfy):
    """One executor for this module, so the trained heads stay cached between tests."""
    from tools.workflow import Executor

    return Executor()


@pytest.fixture(scope="module")
def trained(fx):
    """One executor run: train, save, sample guided (seeded) and unguided (strength 0)."""
    guided = fx.run(graph())
    assert guided.success, guided.error
    plain = fx.run(graph(strength=0.0))
    assert plain.success, plain.error
    assert "6" not in plain.executed  # the trainer is cached: same inputs, no retraining
    return guided, plain


def test_trainer_saves_heads_and_reports_accuracy_per_noise_level(pack, trained):
    guided, _ = trained
    text = guided.ui["6"]["text"][0]
    assert "held-out accuracy per noise level" in text and text.count("σ=") == 4
    path = Path(folder_paths.get_folder_paths("spell_heads")[0], "test_digits.safetensors")
    heads = pack.spell_core.fairness.AttributeHeads.load(path)
    assert heads.classes == [str(d) for d in range(10)] and len(heads.accuracy) == 4
    assert heads.accuracy[-1] >= 0.8  # the least noisy level reads the digit well (measured ~0.95)


def test_guidance_moves_the_outputs_toward_the_target(trained):
    """Seeded: the share of 0s and 6s among 8 'any digit' samples rises (measured by the demo evaluator)."""
    guided, plain = trained
    hit = lambda r: int(torch.isin(digit_classes(r.outputs["11"][0]["samples"]), torch.tensor([0, 6])).sum())
    assert hit(guided) >= hit(plain) + 4, (hit(guided), hit(plain))
    assert "distance to target" in guided.ui["14"]["text"][0]


def test_strength_zero_is_bit_identical_to_the_unpatched_model(comfy, trained):
    from helpers import sample

    _, plain = trained
    loader = comfy.NODE_CLASS_MAPPINGS["SpellDemoModelLoader"]()
    model, _, prompts = loader.load()
    prompt = comfy.NODE_CLASS_MAPPINGS["SpellDemoClassPrompt"]()
    conds = (prompt.encode(prompts, "any digit")[0], prompt.encode(prompts, "(empty)")[0])
    out = sample(comfy, model, conds, 8, seed=3, steps=10)
    assert torch.equal(out, plain.outputs["11"][0]["samples"])


def test_no_gradient_reaches_the_unet(comfy, fx, trained):
    model = trained[0].outputs["10"][0]
    params = list(model.model.diffusion_model.parameters())
    before = [p.detach().clone() for p in params]
    assert fx.run(graph(seed=4, train=False)).success
    assert all(p.grad is None for p in params)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params))


def test_running_count_accumulates_across_runs(pack, fx, trained):
    name = "test-count"
    pack.spell_core.fairness.open_count(Path(folder_paths.get_user_directory(), "spell", "fairness",
                                             f"{name}.json")).reset()
    for seed in (11, 12):
        result = fx.run(graph(batch=4, seed=seed, count=name, train=False))
        assert result.success, result.error
    text = result.ui["14"]["text"][0]
    assert f"running count '{name}': 8 outputs over 2 runs" in text


def test_running_count_grows_when_run_is_pressed_again(pack, fx, trained):
    """The same prompt queued three times (fixed seed, every widget unchanged), as pressing Run again does: each
    run samples again and adds its outputs to the count, and the report follows; with reset on, the count is
    emptied on every press."""
    name = "test-count-rerun"
    pack.spell_core.fairness.open_count(Path(folder_paths.get_user_directory(), "spell", "fairness",
                                             f"{name}.json")).reset()
    prompt = graph(batch=4, seed=5, count=name, train=False)
    for run in (1, 2, 3):
        result = fx.run(prompt)
        assert result.success, result.error
        assert {"7", "10", "11", "14"} <= set(result.executed), result.executed
        assert f"running count '{name}': {4 * run} outputs over {run} runs" in result.ui["14"]["text"][0]
    prompt["7"]["inputs"]["reset"] = True
    for _ in range(2):
        result = fx.run(prompt)
        assert result.success, result.error
        assert f"running count '{name}': 4 outputs over 1 runs" in result.ui["14"]["text"][0]


@pytest.mark.parametrize("change, message", [
    (dict(target="0: 0.5, 6: 0.4"), "SpellDistributionGuidance: shares sum to 0.9"),
    (dict(target="0: 0.5, six: 0.5"), "SpellDistributionGuidance: unknown class 'six' in 'six: 0.5'"),
    (dict(count="../up"), "SpellFairnessCount: count name '../up' is not allowed"),
])
def test_bad_inputs_name_the_node(fx, trained, change, message):
    result = fx.run(graph(train=False, **change))
    assert not result.success and message in result.error, result.error


def test_trainer_and_loader_errors_name_the_node(comfy, toy_models, conds):
    trainer = comfy.NODE_CLASS_MAPPINGS["SpellAttributeHeadTrainer"]()
    vae = comfy.NODE_CLASS_MAPPINGS["SpellDemoModelLoader"]().load()[1]
    args = (toy_models["eps"], vae, conds[0], "(none)", "bad", 64, 64, 2, 2, 0.2, 0, True)
    with pytest.raises(ValueError, match="SpellAttributeHeadTrainer: 2 images but 1 labels"):
        trainer.train(*args, images=torch.rand(2, 64, 64, 3), labels="0")
    with pytest.raises(ValueError, match="SpellAttributeHeadTrainer: no examples"):
        trainer.train(*args)
    with pytest.raises(ValueError, match="SpellAttributeHeadTrainer: name '../x' is not allowed"):
        trainer.train(*args[:4], "../x", *args[5:])
    with pytest.raises(ValueError, match="SpellAttributeHeadLoader: heads file 'nope.safetensors' not found"):
        comfy.NODE_CLASS_MAPPINGS["SpellAttributeHeadLoader"]().load("nope.safetensors")


def test_models_without_a_middle_block_are_refused(comfy, pack):
    """A real ComfyUI UNetModel built without a middle block (transformer_depth_middle < -1) stands in for DiT."""
    from comfy import model_base, model_patcher
    from demo.model import toy_config

    config = toy_config()
    config.unet_config["transformer_depth_middle"] = -2
    base = model_base.BaseModel(config, device="cpu")
    model = model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    heads = pack.spell_core.fairness.AttributeHeads(["a", "b"], torch.ones(1), torch.zeros(1, 4), torch.ones(1, 4),
                                                     torch.zeros(1, 2, 4), torch.zeros(1, 2), 1, 4)
    node = comfy.NODE_CLASS_MAPPINGS["SpellDistributionGuidance"]()
    with pytest.raises(ValueError, match="SpellDistributionGuidance: .*no U-Net middle block.*DiT"):
        node.patch(model, heads, "a: 1", 1.0, "batch mean", 8.0, "chi-square")


def test_h_space_patch_through_either_hook_sees_and_changes_the_same_h(comfy, pack):
    """patch_h_space uses middle_block_after_patch where ComfyUI has it (0.20+), else an output block patch at
    ("output", 0): both routes see the same h at every model call and sampling with a change of h gives
    bit-identical outputs."""
    from helpers import sample

    fairness = pack.nodes.fairness
    model, _, prompts = comfy.NODE_CLASS_MAPPINGS["SpellDemoModelLoader"]().load()
    conds = (prompts.conditioning("any digit"), prompts.conditioning("(empty)"))
    default = "middle_block_after" if hasattr(model, "set_model_middle_block_after_patch") else "output_block"
    routes = ["output_block", "middle_block_after"] if default == "middle_block_after" else ["output_block"]
    seen, outs = {}, {}
    for hook in routes + [None]:
        sums = []

        def on_h(h, transformer_options):
            sums.append(float(h.double().sum()))
            return h * 1.5

        m = model.clone()
        fairness.patch_h_space(m, on_h, hook)
        outs[hook], seen[hook] = sample(comfy, m, conds, batch=2, steps=4), sums
    plain = sample(comfy, model, conds, batch=2, steps=4)
    assert len(seen["output_block"]) == 4  # one call per step (cfg: cond and uncond in one batch)
    assert not torch.equal(outs["output_block"], plain)  # the change of h reaches the output
    for hook in routes[1:] + [None]:
        assert seen[hook] == seen["output_block"]
        assert torch.equal(outs[hook], outs["output_block"])
    patches = model.clone()
    fairness.patch_h_space(patches, lambda h, t: h)
    assert f"{default}_patch" in patches.model_options["transformer_options"]["patches"]
