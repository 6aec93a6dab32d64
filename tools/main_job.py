"""The main job: runs the pack's example workflows headless through ComfyUI's executor on the embedded demo
model, each once as shipped (with SPELL) and once with the SPELL node bypassed (same seed), and writes a
baseline-vs-SPELL grid and the metrics to run/main_job/ (``scripts/run_demo.sh``)."""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tools import comfy_host
from tools.workflow import Executor, ui_to_api

ROOT = comfy_host.PACK_DIR
WORKFLOWS = ("spell_diversity", "spell_protected_set", "spell_batch_memory")


def bypass_spell(prompt: dict) -> dict:
    """The same graph with SpellRepellency bypassed: the sampler takes the model the SPELL node took."""
    g = copy.deepcopy(prompt)
    spell_ids = [n for n, node in g.items() if node["class_type"] == "SpellRepellency"]
    for sid in spell_ids:
        source = g[sid]["inputs"]["model"]
        for node in g.values():
            for name, value in node["inputs"].items():
                if value == [sid, 0]:
                    node["inputs"][name] = source
        del g[sid]
    return {n: node for n, node in g.items() if node["class_type"] != "SpellReport"}


def sampler_output(prompt: dict, result) -> torch.Tensor:
    sid = next(n for n, node in prompt.items() if node["class_type"] == "KSampler")
    return result.outputs[sid][0]["samples"]


def metrics(latents: torch.Tensor, evaluator, shield=None, radius=None) -> dict:
    from demo.data import latents_to_images16
    from spell_core import nearest
    from spell_core.metrics import vendi_score

    images = latents_to_images16(latents.float())
    with torch.no_grad():
        feats, probs = evaluator.features(images), evaluator.predict(images)
    b = len(latents)
    nn = nearest(latents, latents, ~torch.eye(b, dtype=torch.bool))
    out = {
        "vendi (evaluator features)": round(vendi_score(feats), 3),
        "distinct classes": int(probs.argmax(1).unique().numel()),
        "classes": probs.argmax(1).tolist(),
        "mean nearest-neighbour RMS distance": round(float(nn.mean()), 4),
        "closest pair RMS distance": round(float(nn.min()), 4),
    }
    if shield is not None:
        d = nearest(latents, shield)
        out["inside the shield"] = f"{int((d < radius).sum())}/{b}"
        out["nearest protected reference (RMS)"] = round(float(d.min()), 4)
    return out


def grid(rows: list[torch.Tensor], vae, path: Path) -> None:
    """One row of decoded images per latent batch, 2 px gaps."""
    tiles = [vae.decode(r)[..., 0].numpy() for r in rows]
    h, w = tiles[0].shape[1:]
    n = max(len(t) for t in tiles)
    canvas = np.ones((len(tiles) * (h + 2), n * (w + 2)), np.float32)
    for i, t in enumerate(tiles):
        for j, img in enumerate(t):
            canvas[i * (h + 2):i * (h + 2) + h, j * (w + 2):j * (w + 2) + w] = img
    Image.fromarray((canvas * 255).round().astype(np.uint8)).save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "run" / "main_job"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    nodes = comfy_host.start(out / "comfyui")
    import folder_paths

    from demo.evaluator import load_evaluator
    from tools.demo_assets import write_protected_digits

    write_protected_digits(folder_paths.get_input_directory())
    evaluator = load_evaluator()
    executor = Executor()
    report, rows, labels = {}, [], []
    vae = None
    for name in WORKFLOWS:
        workflow = json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())
        prompt = ui_to_api(workflow, nodes.NODE_CLASS_MAPPINGS)
        if name == "spell_batch_memory":
            memory = nodes.NODE_CLASS_MAPPINGS["SpellBatchMemory"]().open(
                prompt["6"]["inputs"]["name"], prompt["6"]["inputs"]["capacity"])[0]
            memory.clear()
        entry, shield, radius = {}, None, None
        for variant, graph in (("SPELL", prompt), ("baseline", bypass_spell(prompt))):
            start = time.perf_counter()
            result = executor.run(graph)
            if not result.success:
                raise SystemExit(f"{name} ({variant}) failed: {result.error}")
            latents = sampler_output(graph, result)
            if name == "spell_protected_set" and variant == "SPELL":
                shield, radius = result.outputs["5"][0].latents, prompt["10"]["inputs"]["radius"]
            entry[variant] = {"seconds": round(time.perf_counter() - start, 2), **metrics(latents, evaluator, shield, radius)}
            if variant == "SPELL":
                entry["report"] = result.ui["14"]["text"][0].splitlines()[:4]
            vae = vae or result.outputs["1"][1]
            rows.insert(len(rows) - (variant == "baseline"), latents)  # baseline row above its SPELL row
            labels.insert(len(labels) - (variant == "baseline"), f"{name} / {variant}")
            print(f"{name:22s} {variant:9s} " + ", ".join(f"{k}: {v}" for k, v in entry[variant].items() if k != "classes"))
        report[name] = entry
    grid(rows, vae, out / "grid.png")
    (out / "metrics.json").write_text(json.dumps({"rows of grid.png": labels, **report}, indent=1))
    print(f"wrote {out / 'grid.png'} (rows: {', '.join(labels)}) and {out / 'metrics.json'}")


if __name__ == "__main__":
    main()
