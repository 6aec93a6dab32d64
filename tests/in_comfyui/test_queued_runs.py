"""Many queued runs through ComfyUI's executor, as a server receiving one prompt after another: the batch memory
stays at its capacity (first in, first out) and the process's resident memory stays flat. The shipped
spell_batch_memory example with a smaller memory and SaveImage replaced by a preview (nothing written to
output/), the seed changed on every run (as "increment" does)."""
import gc
import json
from pathlib import Path

import psutil

from tools.workflow import Executor, ui_to_api

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
RUNS, WARMUP, CAPACITY = 40, 10, 20
RSS_GROWTH_MB = 20  # after the warm-up; keeping each run's outputs (5 MB) fails it (151 MB, measured)


def test_forty_queued_runs_keep_the_memory_at_capacity_and_rss_flat(comfy):
    prompt = ui_to_api(json.loads((EXAMPLES / "spell_batch_memory.json").read_text()), comfy.NODE_CLASS_MAPPINGS)
    node = {n["class_type"]: k for k, n in prompt.items()}
    prompt[node["SpellBatchMemory"]]["inputs"].update(name="queued", capacity=CAPACITY)
    prompt[node["SaveImage"]] = {"class_type": "PreviewImage", "inputs": {"images": prompt[node["SaveImage"]]["inputs"]["images"]}}
    memory = comfy.NODE_CLASS_MAPPINGS["SpellBatchMemory"]().open(**prompt[node["SpellBatchMemory"]]["inputs"])[0]
    memory.clear()
    batch = prompt[node["EmptyLatentImage"]]["inputs"]["batch_size"]
    executor, process, rss, sizes = Executor(), psutil.Process(), [], []
    for k in range(RUNS):
        prompt[node["KSampler"]]["inputs"]["seed"] = k
        result = executor.run(prompt)
        assert result.success, result.error
        gc.collect()
        rss.append(process.memory_info().rss / 2**20)
        sizes.append(len(memory))
    assert sizes == [min(batch * (k + 1), CAPACITY) for k in range(RUNS)]
    growth = max(rss[WARMUP:]) - rss[WARMUP - 1]
    print(f"RSS MB: {[round(r) for r in rss]}")
    assert growth < RSS_GROWTH_MB, f"RSS grew {growth:.1f} MB over runs {WARMUP}..{RUNS}: {[round(r) for r in rss]}"
    memory.clear()
