"""SPELL Shield Calibration (nodes/calibration.py) inside ComfyUI: a graph run by ComfyUI's executor on the demo
model and VAE whose suggested radius is wired into SPELL Sparse Repellency's radius input, and the node's refusals
of inputs it cannot measure."""
from pathlib import Path

import pytest
import torch

from helpers import model_space


def demo_graph(variants=None):
    """Baseline: KSampler on the demo model (prompt "1", batch 4, 4 steps), decoded; those images are the protected
    set and are calibrated (5 near-copies each, no mirror images); SPELL, with the suggested radius linked into its radius
    input, samples the same seed again (SPELL Report, an output node, makes it run)."""
    sampler = {"seed": 5, "steps": 4, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
               "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}
    return {
        "1": {"class_type": "SpellDemoModelLoader", "inputs": {}},
        "2": {"class_type": "SpellDemoClassPrompt", "inputs": {"prompts": ["1", 2], "prompt": "1"}},
        "3": {"class_type": "SpellDemoClassPrompt", "inputs": {"prompts": ["1", 2], "prompt": "(empty)"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], **sampler}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 1]}},
        "7": {"class_type": "SpellShieldCalibration", "inputs": {
            "model": ["1", 0], "vae": ["1", 1], "images": ["6", 0], "copies_per_image": 5, "seed": 0,
            "flip": False}},
        "8": {"class_type": "SpellProtectedSetLoader", "inputs": {
            "folder": "(none)", "set_file": "(none)", "width": 64, "height": 64, "resize": "center crop",
            "vae": ["1", 1], "images": ["6", 0]}},
        "9": {"class_type": "SpellRepellency", "inputs": {
            "model": ["1", 0], "radius": ["7", 2], "overcompensation": 1.6, "in_batch": "off", "start_percent": 0.0,
            "end_percent": 1.0, "enforce_shield": True, "batch_radius_scale": 0.0, "references": ["8", 0]}},
        "10": {"class_type": "KSampler", "inputs": {"model": ["9", 0], **sampler}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
        "12": {"class_type": "SpellReport", "inputs": {"model": ["9", 0], "samples": ["10", 0]}},  # runs node 10
    } if variants is None else with_variants(demo_graph(), variants)


def with_variants(graph, variants):
    """The same graph with the loader's and the calibration's variants set (the two must agree)."""
    graph["7"]["inputs"]["variants"] = graph["8"]["inputs"]["variants"] = variants
    return graph


def test_suggested_radius_wired_into_spell_shields_the_copies(comfy, executor):
    """The graph runs; the report is UI text and equals the STRING output; the histogram is one 768x512 IMAGE;
    the radius FLOAT is accepted by SpellRepellency. Unpatched, the same seed reproduces the protected images
    (nearest protected latent well inside r: copies); with SPELL at the suggested r every output lies at least r
    from every protected latent, farther than 95 % of the near-copies lie from their source."""
    result = executor.run(demo_graph())
    assert result.success, result.error
    chart, report, radius = result.outputs["7"]
    assert result.ui["7"]["text"][0] == report and report.startswith(f"suggested shield radius r = {radius:.3g}")
    assert "near-copies inside r:" in report and "flip" not in report and "crop:" in report
    assert isinstance(radius, float) and 0 < radius < 10
    assert tuple(chart.shape) == (1, 512, 768, 3) and chart.dtype == torch.float32
    model = comfy.NODE_CLASS_MAPPINGS["SpellDemoModelLoader"]().load()[0]
    pixels = result.outputs["6"][0]
    protected = model_space(model, comfy.NODE_CLASS_MAPPINGS["SpellDemoModelLoader"]().load()[1].encode(pixels))
    base, shielded = (model_space(model, result.outputs[k][0]["samples"]).flatten(1) for k in ("5", "10"))
    d_base = torch.cdist(base, protected.flatten(1)).min(1).values / base.shape[1] ** 0.5
    d_spell = torch.cdist(shielded.double(), protected.flatten(1).double()).min(1).values / base.shape[1] ** 0.5
    assert float(d_base.max()) < 0.5 * radius  # unpatched: the protected images again
    assert float(d_spell.min()) >= radius
    assert f"r = {radius:.3g}" in result.ui["12"]["text"][0]


@pytest.fixture()
def calibrate(comfy):
    model, vae, _ = comfy.NODE_CLASS_MAPPINGS["SpellDemoModelLoader"]().load()
    digits = comfy.NODE_CLASS_MAPPINGS["SpellDemoDigitExamples"]().load(2)[0]  # 20 training digits, 64x64
    node = comfy.NODE_CLASS_MAPPINGS["SpellShieldCalibration"]()

    def run(images=digits, copies=2, distinct=None, flip=True):
        return node.calibrate(model, vae, images, copies, 0, flip, distinct)

    return run, digits


def test_distinct_images_are_measured_when_connected(calibrate):
    """With distinct images connected the report names them; without, the other protected images; the mirror
    image counts as a kind only when flip is on."""
    run, digits = calibrate
    supplied = run(digits[:10], 5, distinct=digits[10:])["result"][1]
    assert "of 10 (supplied distinct images" in supplied and "flip:" in supplied
    assert "of 20 (other protected images" in run(flip=False)["result"][1]


def test_inputs_it_cannot_measure_are_refused_naming_the_fix(calibrate):
    run, digits = calibrate
    with pytest.raises(ValueError, match=r"SpellShieldCalibration: got 1 image; .* connect at least 2 images"):
        run(digits[:1], 40)
    with pytest.raises(ValueError, match=r"SpellShieldCalibration: 5 images x 3 copies = 15 .* at least 4"):
        run(digits[:5], 3)
    small = torch.nn.functional.interpolate(digits[10:].permute(0, 3, 1, 2), size=(32, 32)).permute(0, 2, 3, 1)
    with pytest.raises(ValueError, match=r"SpellShieldCalibration: distinct_images are 32x32 .* resize them to 64x64"):
        run(digits[:10], 2, distinct=small)


def test_shield_with_variants_keeps_outputs_off_every_version(comfy, executor):
    """Loader and calibration both set to "shifts + zoom", through ComfyUI's executor: the protected set holds 18
    versions of each of the 4 images (the loader's summary says so, and the first of each block is the plain
    encoding), the report measures to the nearest version, and SPELL at the suggested r keeps every output at least r
    from every version, shifted and zoomed ones included."""
    from spell_core.variants import make, preset

    result = executor.run(demo_graph("shifts + zoom"))
    assert result.success, result.error
    refs, summary = result.outputs["8"]
    assert len(refs) == 4 * 18 and "18 versions of each image" in summary and "72 references" in summary
    _, report, radius = result.outputs["7"]
    assert "4 protected images, 18 versions of each image" in report and "72 references" in report
    model, vae, _ = comfy.NODE_CLASS_MAPPINGS["SpellDemoModelLoader"]().load()
    pixels = result.outputs["6"][0]
    assert torch.equal(refs.latents, vae.encode(make(pixels, preset("shifts + zoom"))).float())
    versions = model_space(model, refs.latents).flatten(1).double()
    shielded = model_space(model, result.outputs["10"][0]["samples"]).flatten(1).double()
    d = torch.cdist(shielded, versions) / versions.shape[1] ** 0.5
    assert float(d.min()) >= radius
    plain = executor.run(demo_graph())
    assert plain.success and radius < plain.outputs["7"][2]  # the versions absorb the shifts: a smaller r


def test_loader_folder_with_variants_and_refusals(comfy, executor):
    """A folder under input/ with variants "shifts": 9 references per image, encoded once (a re-run reads the
    encoding cache, the plain encoding stays as it was); an unknown variants value is refused with the node's name."""
    import folder_paths
    from PIL import Image
    from pathlib import Path

    from spell_core import ReferenceSet

    folder = Path(folder_paths.get_input_directory(), "variants_images")
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(3):
        Image.new("RGB", (64, 64), (30 + 60 * k, 200 - 50 * k, 90)).save(folder / f"{k}.png")
    loader = comfy.NODE_CLASS_MAPPINGS["SpellProtectedSetLoader"]()
    vae = comfy.NODE_CLASS_MAPPINGS["SpellDemoModelLoader"]().load()[1]
    plain, _ = loader.load("variants_images", "(none)", 64, 64, "center crop", vae=vae)
    nine, summary = loader.load("variants_images", "(none)", 64, 64, "center crop", vae=vae, variants="shifts")
    assert len(plain) == 3 and len(nine) == 27 and torch.equal(nine.latents[::9], plain.latents)
    assert "folder variants_images (3 images" in summary and "27 references" in summary
    graph = {"1": {"class_type": "SpellDemoModelLoader", "inputs": {}},
             "2": {"class_type": "SpellProtectedSetLoader", "inputs": {
                 "folder": "variants_images", "set_file": "(none)", "width": 64, "height": 64,
                 "resize": "center crop", "vae": ["1", 1], "variants": "shifts"}},
             "3": {"class_type": "SpellProtectedSetSave", "inputs": {"references": ["2", 0], "name": "variants_test",
                                                                     "overwrite": True}}}
    again = executor.run(graph)
    assert again.success, again.error
    assert torch.equal(again.outputs["2"][0].latents, nine.latents)
    saved = ReferenceSet.load(Path(folder_paths.get_folder_paths("spell_sets")[0], "variants_test.safetensors"))
    assert torch.equal(saved.latents, nine.latents)
    graph["2"]["inputs"]["variants"] = "sideways"
    refused = executor.run(graph)
    assert not refused.success and "SpellProtectedSetLoader" in refused.error and "sideways" in refused.error, \
        refused.error


def test_folder_is_calibrated_as_its_images_connected(comfy, executor, pack, tmp_path, monkeypatch):
    """The protected images chosen as a folder under input/ (the Protected Set Loader's folder, fitted to width x
    height) give the same radius and report as the same images connected as an IMAGE batch; the report names the
    folder and how many of its images were used (a sample, evenly spaced, above FOLDER_SAMPLE); the images input
    fitted to width x height when it is set; refusals name the node and the fix; IS_CHANGED follows the folder."""
    import folder_paths
    import numpy as np
    from PIL import Image

    from tools.demo_assets import write_protected_digits

    folder = write_protected_digits(folder_paths.get_input_directory())
    node_cls = comfy.NODE_CLASS_MAPPINGS["SpellShieldCalibration"]
    node = node_cls()
    model, vae, _ = comfy.NODE_CLASS_MAPPINGS["SpellDemoModelLoader"]().load()
    files = sorted(folder.glob("*.png"))
    pixels = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255
                                        for f in files]))
    graph = {"1": {"class_type": "SpellDemoModelLoader", "inputs": {}},
             "2": {"class_type": "SpellShieldCalibration", "inputs": {
                 "model": ["1", 0], "vae": ["1", 1], "copies_per_image": 2, "seed": 3, "flip": False,
                 "variants": "none", "folder": folder.name, "width": 64, "height": 64, "resize": "center crop"}}}
    result = executor.run(graph)
    assert result.success, result.error
    _, report, radius = result.outputs["2"]
    connected = node.calibrate(model, vae, pixels, 2, 3, False)["result"]
    assert radius == connected[2]
    assert report == connected[1] + f"\nfrom folder {folder.name}: 24 of its 24 images, fitted to 64x64 (center crop)"
    assert f"{len(files)} protected images" in report

    monkeypatch.setattr(pack.nodes.calibration, "FOLDER_SAMPLE", 5)
    sampled = node.calibrate(model, vae, None, 4, 3, False, folder=folder.name, width=64, height=64)["result"][1]
    assert "from folder spell_protected_digits: 5 of its 24 images (evenly spaced by name)" in sampled
    assert "5 protected images" in sampled

    small = torch.nn.functional.interpolate(pixels.permute(0, 3, 1, 2), size=(32, 32)).permute(0, 2, 3, 1)
    fitted = node.calibrate(model, vae, small, 2, 3, False, distinct_images=small[:4], width=64, height=64)
    assert "24 protected images" in fitted["result"][1] and "of 4 (supplied distinct images" in fitted["result"][1]

    with pytest.raises(ValueError, match=r"SpellShieldCalibration: folder 'spell_protected_digits': set width and "
                                         r"height to the size you generate at"):
        node.calibrate(model, vae, None, 2, 3, False, folder=folder.name)
    with pytest.raises(ValueError, match=r"SpellShieldCalibration: width 64 and height 0: set both"):
        node.calibrate(model, vae, pixels, 2, 3, False, width=64)
    with pytest.raises(ValueError, match=r"SpellShieldCalibration: no protected images: connect images or choose"):
        node.calibrate(model, vae, None, 2, 3, False)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (64, 64)).save(outside)
    linked = Path(folder_paths.get_input_directory(), "calibration_linked")
    linked.mkdir(exist_ok=True)
    Image.new("RGB", (64, 64), (255, 255, 255)).save(linked / "a.png")
    (linked / "b.png").unlink(missing_ok=True)
    (linked / "b.png").symlink_to(outside)
    with pytest.raises(ValueError, match=r"SpellShieldCalibration: .*b\.png.*choose another folder"):
        node.calibrate(model, vae, None, 20, 3, False, folder=linked.name, width=64, height=64)

    before = node_cls.IS_CHANGED(folder=folder.name)
    assert node_cls.IS_CHANGED(folder=folder.name) == before
    Image.new("RGB", (64, 64)).save(folder / "zz_added.png")
    try:
        assert node_cls.IS_CHANGED(folder=folder.name) != before
    finally:
        (folder / "zz_added.png").unlink()
