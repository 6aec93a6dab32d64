"""The report nodes' chart outputs inside ComfyUI: after a real sampling run, SPELL Report and SPELL Fairness Report
return their text (also as UI text) and an IMAGE [1, H, W, 3] float32 in 0..1 that ComfyUI's own Preview Image
accepts, both called directly and linked in a graph run by ComfyUI's executor. The charts' contents are checked
against the run's log by the colours of ``spell_core/charts.py``."""
from pathlib import Path

import folder_paths
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import last_log, model_space, protected, sample, spell

CHART = 1  # the chart's output slot on both report nodes (after the report text, slot 0)
SIZE = (512, 768)


def check_chart(image):
    assert isinstance(image, torch.Tensor) and image.dtype == torch.float32
    assert tuple(image.shape) == (1, *SIZE, 3)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


def previewed(comfy, image):
    """ComfyUI's PreviewImage function on the chart; returns the PNG it wrote to the temp folder."""
    images = comfy.NODE_CLASS_MAPPINGS["PreviewImage"]().save_images(image)["ui"]["images"]
    assert len(images) == 1 and images[0]["type"] == "temp"
    return preview_file(images[0])


def preview_file(entry):
    path = Path(folder_paths.get_temp_directory(), entry["subfolder"], entry["filename"])
    return np.asarray(Image.open(path).convert("RGB"))


def bar_count(picture, box, colour):
    """Number of separate runs of columns holding colour inside box (left, top, right, bottom)."""
    x0, y0, x1, y1 = box
    cols = (picture[y0:y1 + 1, x0:x1 + 1] == np.array(colour, dtype=np.uint8)).all(-1).any(0)
    return int(np.count_nonzero(cols[1:] & ~cols[:-1]) + cols[0])


def test_spell_report_gives_text_and_a_chart_of_the_run(comfy, pack, toy_models, conds):
    """Through ComfyUI's KSampler with a protected set near the outputs and mutual in-batch repellency: the
    chart has one bar per output and neighbour kind, the r line, and a push bar per call that pushed."""
    charts = pack.spell_core.charts
    model = toy_models["eps"]
    base = sample(comfy, model, conds, 4)
    z = model_space(model, base).flatten(1)
    d = torch.cdist(z, z) / z.shape[1] ** 0.5
    r = 0.5 * d[d > 0].min().item()
    refs = protected(comfy, base + 0.01 * base.std() * torch.randn(base.shape, generator=torch.Generator().manual_seed(0)))
    patched = spell(comfy, model, r, in_batch="mutual", references=refs)
    out = sample(comfy, patched, conds, 4)
    result = comfy.NODE_CLASS_MAPPINGS["SpellReport"]().report(patched, {"samples": out})
    text, image = result["result"]
    assert result["ui"]["text"] == [text] and "push active" in text and f"r = {r:.3g}" in text
    check_chart(image)
    picture = previewed(comfy, image)
    assert picture.shape == (*SIZE, 3)
    assert np.abs(picture.astype(int) - (image[0].numpy() * 255).round().astype(int)).max() <= 1

    log = last_log(patched)
    assert log.r == r and log.finished
    finite = [v for v in log.nearest_static if v != float("inf")]
    assert finite, "precondition: references within reach of the outputs"
    assert bar_count(picture, charts.DISTANCE_BOX, charts.REFERENCE) == len(finite)
    assert bar_count(picture, charts.DISTANCE_BOX, charts.FAR) == 4 - len(finite)
    assert bar_count(picture, charts.DISTANCE_BOX, charts.PEER) == 4
    assert bar_count(picture, charts.DISTANCE_BOX, charts.RADIUS) >= 1
    pushed = log.pushed_per_step()
    assert any(pushed), "precondition: the push acted"
    runs = sum(1 for i, p in enumerate(pushed) if p and (i == 0 or not pushed[i - 1]))  # adjacent bars have gaps
    assert runs <= bar_count(picture, charts.PUSH_BOX, charts.PUSHED) <= sum(p > 0 for p in pushed)


def test_spell_report_before_any_run_still_gives_a_chart(comfy, toy_models):
    patched = spell(comfy, toy_models["eps"], 0.5)
    result = comfy.NODE_CLASS_MAPPINGS["SpellReport"]().report(patched, {"samples": torch.zeros(2, 4, 8, 8)})
    text, image = result["result"]
    assert "no sampling run yet" in text and result["ui"]["text"] == [text]
    check_chart(image)
    previewed(comfy, image)


def demo_base(batch):
    return {
        "1": {"class_type": "SpellDemoModelLoader", "inputs": {}},
        "2": {"class_type": "SpellDemoClassPrompt", "inputs": {"prompts": ["1", 2], "prompt": "any digit"}},
        "3": {"class_type": "SpellDemoClassPrompt", "inputs": {"prompts": ["1", 2], "prompt": "(empty)"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
    }


def ksampler(model):
    return {"class_type": "KSampler", "inputs": {
        "model": [model, 0], "seed": 5, "steps": 4, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}


def test_spell_report_chart_links_to_preview_image_in_a_graph(executor):
    """The protected-set graph with Preview Image fed by the report's chart: validated and run by ComfyUI's
    executor; the loader's summary and the report are UI text."""
    from tools.demo_assets import PROTECTED_FOLDER, write_protected_digits

    write_protected_digits(folder_paths.get_input_directory())
    g = demo_base(2)
    g["5"] = {"class_type": "SpellProtectedSetLoader", "inputs": {
        "folder": PROTECTED_FOLDER, "set_file": "(none)", "width": 64, "height": 64, "resize": "center crop",
        "vae": ["1", 1]}}
    g["10"] = {"class_type": "SpellRepellency", "inputs": {
        "model": ["1", 0], "radius": 0.5, "overcompensation": 1.6, "in_batch": "mutual", "start_percent": 0.0,
        "end_percent": 1.0, "enforce_shield": True, "references": ["5", 0]}}
    g["11"] = ksampler("10")
    g["14"] = {"class_type": "SpellReport", "inputs": {"model": ["10", 0], "samples": ["11", 0]}}
    g["20"] = {"class_type": "PreviewImage", "inputs": {"images": ["14", CHART]}}
    result = executor.run(g)
    assert result.success, result.error
    assert "references, latent shape" in result.ui["5"]["text"][0]
    assert "push active" in result.ui["14"]["text"][0] and result.outputs["14"][0] == result.ui["14"]["text"][0]
    check_chart(result.outputs["14"][CHART])
    assert preview_file(result.ui["20"]["images"][0]).shape == (*SIZE, 3)


def fair_graph(train=True):
    """Heads trained on a few demo digits, guidance toward 0 and 6, a running count reset every run."""
    g = demo_base(4)
    if train:
        g["5"] = {"class_type": "SpellDemoDigitExamples", "inputs": {"per_class": 6}}
        g["6"] = {"class_type": "SpellAttributeHeadTrainer", "inputs": {
            "model": ["1", 0], "vae": ["1", 1], "positive": ["2", 0], "folder": "(none)", "name": "chart_digits",
            "width": 64, "height": 64, "noise_levels": 2, "pool_grid": 2, "held_out": 0.2, "seed": 0,
            "overwrite": True, "images": ["5", 0], "labels": ["5", 1]}}
    else:
        g["6"] = {"class_type": "SpellAttributeHeadLoader", "inputs": {"heads_file": "chart_digits.safetensors"}}
    g["7"] = {"class_type": "SpellFairnessCount", "inputs": {"name": "chart-count", "reset": True}}
    g["10"] = {"class_type": "SpellDistributionGuidance", "inputs": {
        "model": ["1", 0], "heads": ["6", 0], "target": "0: 0.5, 6: 0.5", "strength": 100.0,
        "loss": "per-image assignment", "temperature": 8.0, "divergence": "chi-square", "count": ["7", 0]}}
    g["11"] = ksampler("10")
    g["14"] = {"class_type": "SpellFairnessReport", "inputs": {"model": ["10", 0], "heads": ["6", 0],
                                                               "samples": ["11", 0], "count": ["7", 0]}}
    g["20"] = {"class_type": "PreviewImage", "inputs": {"images": ["14", CHART]}}
    return g


@pytest.mark.parametrize("train", [True, False], ids=["trainer", "loader"])
def test_fairness_report_gives_text_and_a_bar_chart(comfy, pack, executor, train):
    """Two target classes: two target bars; one output bar per class the outputs fell in (read from the
    report's table); running-share bars since a count is connected; the heads' text is UI text too."""
    charts = pack.spell_core.charts
    result = executor.run(fair_graph(train))
    assert result.success, result.error
    assert "held-out accuracy per noise level" in result.ui["6"]["text"][0]
    text, image = result.outputs["14"]
    assert result.ui["14"]["text"] == [text] and "distance to target" in text
    check_chart(image)
    picture = preview_file(result.ui["20"]["images"][0])
    assert np.abs(picture.astype(int) - (image[0].numpy() * 255).round().astype(int)).max() <= 1
    assert np.array_equal(previewed(comfy, image), picture)
    rows = text.splitlines()[1:11]  # class, target, batch target, outputs, running
    hit = sum(int(row.split()[3]) > 0 for row in rows)
    assert sum(int(row.split()[3]) for row in rows) == 4 and hit >= 1
    assert bar_count(picture, charts.BAR_BOX, charts.TARGET) == 2
    assert bar_count(picture, charts.BAR_BOX, charts.OUTPUTS) == hit
    assert bar_count(picture, charts.BAR_BOX, charts.RUNNING) == hit  # reset every run: running = this batch
