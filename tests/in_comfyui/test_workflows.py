"""The shipped example workflows (UI format), converted and run by ComfyUI's own executor on the demo model."""
import json
from pathlib import Path

import folder_paths
import pytest

from tools.demo_assets import write_protected_digits
from tools.workflow import ui_to_api

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "example_workflows").glob("*.json"))


def test_there_are_example_workflows():
    assert {p.stem for p in WORKFLOWS} >= {"spell_diversity", "spell_protected_set", "spell_batch_memory"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_runs(comfy, executor, path):
    write_protected_digits(folder_paths.get_input_directory())
    prompt = ui_to_api(json.loads(path.read_text()), comfy.NODE_CLASS_MAPPINGS)
    result = executor.run(prompt)
    assert result.success, result.error
    saved = [n for n, node in prompt.items() if node["class_type"] == "SaveImage"]
    for n in saved:
        images = result.ui[n]["images"]
        assert len(images) == prompt["4"]["inputs"]["batch_size"]
        for img in images:
            assert Path(folder_paths.get_output_directory(), img["subfolder"], img["filename"]).is_file()
    reports = [n for n, node in prompt.items() if node["class_type"] == "SpellReport"]
    for n in reports:
        assert "push active" in result.ui[n]["text"][0]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_reads_well(path):
    """As committed: no two nodes overlap (title bars included) and the graph opens at a zoom where LiteGraph
    still draws text (below 8/14 = 0.57 it draws no text), in front end 1.32.9 (extra.ds) and in newer front ends,
    which open templates with fitView in a 1600 x 1000 window; with a note saying what the example shows."""
    from tools.make_workflows import node_boxes, overlaps, template_fit

    workflow = json.loads(path.read_text())
    boxes = node_boxes(workflow["nodes"])
    assert overlaps(boxes) == []
    assert 0.6 <= workflow["extra"]["ds"]["scale"] <= 1.0
    assert template_fit(boxes) >= 0.6
    assert any(n["type"] == "MarkdownNote" and n["widgets_values"][0].strip() for n in workflow["nodes"])
