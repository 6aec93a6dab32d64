"""Batch memory through ComfyUI's executor, a simulated restart, and bad input of every kind: each gives an
error naming the node and the fix, and nothing already stored is lost."""
import shutil
from pathlib import Path

import folder_paths
import pytest
import torch

from helpers import protected, sample, spell


def memory_graph(name="mem-test", capacity=5, batch=2, seed=1, clear=False, radius=0.5):
    """API-format graph: demo loader -> memory -> SPELL -> KSampler, with the report."""
    g = {
        "1": {"class_type": "SpellDemoModelLoader", "inputs": {}},
        "2": {"class_type": "SpellDemoClassPrompt", "inputs": {"prompts": ["1", 2], "prompt": "any digit"}},
        "3": {"class_type": "SpellDemoClassPrompt", "inputs": {"prompts": ["1", 2], "prompt": "(empty)"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "6": {"class_type": "SpellBatchMemory", "inputs": {"name": name, "capacity": capacity}},
        "10": {"class_type": "SpellRepellency", "inputs": {
            "model": ["1", 0], "radius": radius, "overcompensation": 1.6, "in_batch": "mutual", "start_percent": 0.0,
            "end_percent": 1.0, "enforce_shield": True, "memory": ["7" if clear else "6", 0]}},
        "11": {"class_type": "KSampler", "inputs": {
            "model": ["10", 0], "seed": seed, "steps": 4, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "14": {"class_type": "SpellReport", "inputs": {"model": ["10", 0], "samples": ["11", 0]}},
    }
    if clear:
        g["7"] = {"class_type": "SpellBatchMemoryClear", "inputs": {"memory": ["6", 0]}}
    return g


def memory_file(name):
    return Path(folder_paths.get_user_directory(), "spell", "memory", f"{name}.safetensors")


def test_memory_fills_persists_and_survives_a_restart(pack, executor):
    from tools.workflow import Executor

    name = "restart-test"
    memory_file(name).unlink(missing_ok=True)
    first = executor.run(memory_graph(name, seed=1))
    assert first.success, first.error
    assert "static references 0" in first.ui["14"]["text"][0]
    second = executor.run(memory_graph(name, seed=2))
    assert second.success, second.error
    assert "static references 2" in second.ui["14"]["text"][0]  # the first run's outputs repel the second
    # the report (run after the memory append) measures against the references the run saw, not its own outputs
    near = next(l for l in second.ui["14"]["text"][0].splitlines() if l.startswith("nearest static"))
    values = [v.strip() for v in near.split(":")[1].split(",")]
    assert len(values) == 2 and all(v == "beyond 4r" or float(v) >= 0.5 * (1 - 1e-3) for v in values), near
    stored = pack.spell_core.load_latents(memory_file(name))[0]
    assert stored.shape == (4, 4, 8, 8)
    assert torch.equal(stored[2:], second.outputs["11"][0]["samples"])

    pack.spell_core.memory.forget_loaded()  # a ComfyUI restart: new process state, new executor and caches
    third = Executor().run(memory_graph(name, seed=3))
    assert third.success, third.error
    assert "static references 4" in third.ui["14"]["text"][0]
    assert pack.spell_core.load_latents(memory_file(name))[0].shape[0] == 5  # capacity 5: the oldest left


def test_memory_clear_node_empties_it(pack, executor):
    name = "clear-test"
    assert executor.run(memory_graph(name, seed=1)).success
    assert memory_file(name).exists()
    cleared = executor.run(memory_graph(name, seed=2, clear=True))
    assert cleared.success, cleared.error
    assert "static references 0" in cleared.ui["14"]["text"][0]
    assert pack.spell_core.load_latents(memory_file(name))[0].shape[0] == 2  # only this run's outputs


def test_memory_of_another_size_is_refused_and_kept(pack, executor):
    name = "size-test"
    assert executor.run(memory_graph(name)).success
    before = memory_file(name).read_bytes()
    g = memory_graph(name, seed=5)
    g["4"]["inputs"].update(width=128, height=128)
    result = executor.run(g)
    assert not result.success
    assert "SpellRepellency" in result.error and "batch memory holds latents for 64 x 64 px images but this " \
        "sampler makes 128 x 128 px (latents 8 x 8 / 16 x 16)" in result.error, result.error
    assert "SPELL Batch Memory" in result.error and "Empty Latent Image to 64 x 64 px" in result.error
    assert memory_file(name).read_bytes() == before


def test_damaged_memory_file_is_reported_and_left_alone(pack, executor):
    name = "damaged-test"
    pack.spell_core.memory.forget_loaded()
    memory_file(name).parent.mkdir(parents=True, exist_ok=True)
    memory_file(name).write_bytes(b"\x00" * 64)
    result = executor.run(memory_graph(name))
    assert not result.success
    assert "SpellRepellency" in result.error and "not a readable safetensors" in result.error
    assert memory_file(name).read_bytes() == b"\x00" * 64


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden"])
def test_memory_names_cannot_leave_the_folder(executor, name):
    result = executor.run(memory_graph(name))
    assert not result.success and "SpellBatchMemory" in result.error and "not allowed" in result.error


def test_radius_must_be_positive(executor):
    result = executor.run(memory_graph("radius-test", radius=0.0))
    assert not result.success and "SpellRepellency: radius must be > 0" in result.error


def test_window_must_be_ordered(comfy, toy_models):
    with pytest.raises(ValueError, match="SpellRepellency: start_percent"):
        spell(comfy, toy_models["eps"], 0.5, start=0.8, end=0.2)


def test_other_model_family_is_refused_before_sampling(comfy, toy_models, conds):
    """A 4-channel protected set with a 16-channel (SD3-style) model: a clear error, no sampling."""
    refs = protected(comfy, torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="SpellRepellency: the protected set holds 4-channel latents but this model samples 16"):
        sample(comfy, spell(comfy, toy_models["flow"], 0.5, references=refs), conds, 2)


def test_other_size_is_refused_before_sampling(comfy, toy_models, conds):
    """In pixels (the user's unit; 8 px per latent cell), naming the node whose width/height to change."""
    refs = protected(comfy, torch.zeros(2, 4, 16, 16))
    with pytest.raises(ValueError, match=r"protected set holds latents for 128 x 128 px images but this sampler makes "
                                         r"64 x 64 px \(latents 16 x 16 / 8 x 8\); set width/height of SPELL Protected "
                                         r"Set Loader to 64 x 64 px \(or of Empty Latent Image to 128 x 128 px\)"):
        sample(comfy, spell(comfy, toy_models["eps"], 0.5, references=refs), conds, 2)
    wide = protected(comfy, torch.zeros(2, 4, 8, 12))  # width and height apart: [C, h, w] -> "w x h px"
    with pytest.raises(ValueError, match=r"latents for 96 x 64 px images but this sampler makes 64 x 64 px"):
        sample(comfy, spell(comfy, toy_models["eps"], 0.5, references=wide), conds, 2)


def loader(comfy):
    return comfy.NODE_CLASS_MAPPINGS["SpellProtectedSetLoader"]()


def test_loader_errors_name_the_node_and_the_fix(comfy):
    vae = comfy.NODE_CLASS_MAPPINGS["SpellDemoModelLoader"]().load()[1]
    cases = [
        (dict(), "no source given"),
        (dict(latent={"samples": torch.full((1, 4, 8, 8), float("nan"))}), "NaN"),
        (dict(images=torch.rand(1, 64, 64, 3)), "connect the VAE"),
        (dict(latent={"samples": torch.zeros(1, 4, 8, 8)}, images=torch.rand(1, 64, 64, 3), vae=vae, width=128, height=128),
         "different shapes"),
    ]
    for kwargs, message in cases:
        size = dict(width=kwargs.pop("width", 64), height=kwargs.pop("height", 64))
        with pytest.raises(ValueError, match=f"SpellProtectedSetLoader: .*{message}"):
            loader(comfy).load("(none)", "(none)", size["width"], size["height"], "center crop", **kwargs)
    with pytest.raises(ValueError, match="SpellProtectedSetLoader: .*outside"):
        loader(comfy).load("../..", "(none)", 64, 64, "center crop", vae=vae)


def test_set_files_round_trip_and_bad_files_are_refused(comfy):
    refs = protected(comfy, torch.randn(3, 4, 8, 8))
    saver = comfy.NODE_CLASS_MAPPINGS["SpellProtectedSetSave"]()
    saver.save(refs, "roundtrip", False)
    with pytest.raises(ValueError, match="SpellProtectedSetSave: roundtrip.safetensors already exists"):
        saver.save(refs, "roundtrip", False)
    with pytest.raises(ValueError, match="SpellProtectedSetSave: .*outside"):
        saver.save(refs, "../../escape", False)
    loaded = loader(comfy).load("(none)", "roundtrip.safetensors", 64, 64, "center crop")[0]
    assert torch.equal(loaded.latents, refs.latents)
    base = Path(folder_paths.get_folder_paths("spell_sets")[0])
    (base / "truncated.safetensors").write_bytes((base / "roundtrip.safetensors").read_bytes()[:-50])
    (base / "pickle.safetensors").write_bytes(b"\x80\x04\x95 pickled data")
    for name in ("truncated.safetensors", "pickle.safetensors"):
        with pytest.raises(ValueError, match=f"SpellProtectedSetLoader: .*{name}.*not a readable safetensors"):
            loader(comfy).load("(none)", name, 64, 64, "center crop")


def test_folder_source_is_encoded_once_then_cached(comfy, tmp_path):
    from PIL import Image

    folder = Path(folder_paths.get_input_directory(), "cache-test")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for n in range(3):
        Image.new("RGB", (80, 64), (30 * n, 30 * n, 30 * n)).save(folder / f"{n}.png")
    vae = comfy.NODE_CLASS_MAPPINGS["SpellDemoModelLoader"]().load()[1]
    calls = []
    encode = vae.encode

    class CountingVAE:
        def encode(self, pixels):
            calls.append(len(pixels))
            return encode(pixels)

        get_sd = vae.get_sd

    first = loader(comfy).load("cache-test", "(none)", 64, 64, "center crop", vae=CountingVAE())[0]
    second = loader(comfy).load("cache-test", "(none)", 64, 64, "center crop", vae=CountingVAE())[0]
    assert len(calls) == 3 and torch.equal(first.latents, second.latents) and len(first) == 3
