"""Pressing Run again: one executor (caches kept across prompts, like a running server) queues the shipped
spell_batch_memory example again and again with every widget and the seed unchanged. Each run must read the
memory as it is now and append to it; a graph without a memory must stay cached. The same prompt dict is passed
each time: Executor.run copies it, as each POST /prompt brings its own (ComfyUI writes the IS_CHANGED value into
the prompt's node dicts and would read it back from a reused dict)."""
import json
from pathlib import Path

import torch

from tools.workflow import Executor, ui_to_api

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"


def example(comfy, name):
    return ui_to_api(json.loads((EXAMPLES / f"{name}.json").read_text()), comfy.NODE_CLASS_MAPPINGS)


def node_of(prompt, class_type):
    return next(n for n, node in prompt.items() if node["class_type"] == class_type)


def static_references(result, report_id):
    line = next(l for l in result.ui[report_id]["text"][0].splitlines() if "static references" in l)
    return int(line.split("static references")[1].split()[0])


def test_memory_example_reads_and_grows_on_every_run(comfy):
    prompt = example(comfy, "spell_batch_memory")
    mem_id, sampler_id = node_of(prompt, "SpellBatchMemory"), node_of(prompt, "KSampler")
    report_id = node_of(prompt, "SpellReport")
    batch = prompt[node_of(prompt, "EmptyLatentImage")]["inputs"]["batch_size"]
    memory = comfy.NODE_CLASS_MAPPINGS["SpellBatchMemory"]().open(**prompt[mem_id]["inputs"])[0]
    memory.clear()
    executor = Executor()

    first = executor.run(prompt)
    assert first.success, first.error
    assert static_references(first, report_id) == 0 and len(memory) == batch

    second = executor.run(prompt)  # the same prompt, the same fixed seed
    assert second.success, second.error
    assert {mem_id, sampler_id} <= set(second.executed), second.executed
    assert static_references(second, report_id) == batch  # it read the first run's outputs
    assert len(memory) == 2 * batch  # and appended its own
    a, b = first.outputs[sampler_id][0]["samples"], second.outputs[sampler_id][0]["samples"]
    assert not torch.equal(a, b)

    memory.clear()  # emptied outside the graph (as a file removed by hand would be)
    third = executor.run(prompt)
    assert third.success, third.error
    assert sampler_id in third.executed
    assert static_references(third, report_id) == 0 and len(memory) == batch
    assert torch.allclose(third.outputs[sampler_id][0]["samples"], a)  # an empty memory again: the first run's outputs


def test_clear_node_clears_on_every_press(comfy):
    prompt = example(comfy, "spell_batch_memory")
    mem_id, spell_id = node_of(prompt, "SpellBatchMemory"), node_of(prompt, "SpellRepellency")
    prompt["99"] = {"class_type": "SpellBatchMemoryClear", "inputs": {"memory": [mem_id, 0]}}
    prompt[spell_id]["inputs"]["memory"] = ["99", 0]
    report_id = node_of(prompt, "SpellReport")
    executor = Executor()
    for _ in range(2):
        result = executor.run(prompt)
        assert result.success, result.error
        assert "99" in result.executed and static_references(result, report_id) == 0


def test_graph_without_memory_stays_cached(comfy):
    prompt = example(comfy, "spell_diversity")
    executor = Executor()
    assert executor.run(prompt).success
    again = executor.run(prompt)
    assert again.success, again.error
    assert again.executed == [], again.executed
