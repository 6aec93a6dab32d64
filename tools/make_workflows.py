"""Writes example_workflows/*.json (ComfyUI's UI format) from the compact graphs below, with widget values
ordered by the installed nodes' INPUT_TYPES. Run ``python -m tools.make_workflows`` after changing a node's
inputs; tests/in_comfyui/test_workflows.py converts the files back and runs them, so a renamed input fails CI."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tools import comfy_host
from tools.workflow import has_control_widget, widget_inputs

OUT = comfy_host.PACK_DIR / "example_workflows"
PROTECTED_FOLDER = "spell_protected_digits"  # copied into ComfyUI's input folder by the main job and the tests

COMMON = {
    1: ("SpellDemoModelLoader", {"weights": "demo_model.safetensors"}, {}),
    2: ("SpellDemoClassPrompt", {"prompt": "any digit"}, {"prompts": (1, 2)}),
    3: ("SpellDemoClassPrompt", {"prompt": "(empty)"}, {"prompts": (1, 2)}),
    4: ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 8}, {}),
}
SAMPLER = {"seed": 42, "steps": 20, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
SPELL = {"radius": 0.5, "overcompensation": 1.6, "in_batch": "mutual", "start_percent": 0.0, "end_percent": 1.0,
         "enforce_shield": True}


def tail(spell_inputs: dict, prefix: str) -> dict:
    """SpellRepellency -> KSampler -> VAE Decode -> Save Image, plus SPELL Report."""
    return {
        10: ("SpellRepellency", SPELL, {"model": (1, 0), **spell_inputs}),
        11: ("KSampler", SAMPLER, {"model": (10, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0)}),
        12: ("VAEDecode", {}, {"samples": (11, 0), "vae": (1, 1)}),
        13: ("SaveImage", {"filename_prefix": prefix}, {"images": (12, 0)}),
        14: ("SpellReport", {}, {"model": (10, 0), "samples": (11, 0)}),
    }


GRAPHS = {
    "spell_diversity": {**COMMON, **tail({}, "spell_diversity")},
    "spell_protected_set": {
        **COMMON,
        5: ("SpellProtectedSetLoader", {"folder": PROTECTED_FOLDER, "set_file": "(none)", "width": 64, "height": 64,
                                        "resize": "center crop"}, {"vae": (1, 1)}),
        **tail({"references": (5, 0)}, "spell_protected"),
    },
    "spell_batch_memory": {
        **COMMON,
        6: ("SpellBatchMemory", {"name": "demo", "capacity": 256}, {}),
        **tail({"memory": (6, 0)}, "spell_memory"),
    },
    "spell_fairness": {
        **COMMON,
        5: ("SpellDemoDigitExamples", {"per_class": 40}, {}),
        6: ("SpellAttributeHeadTrainer", {"folder": "(none)", "name": "demo_digits", "width": 64, "height": 64,
                                          "noise_levels": 8, "pool_grid": 4, "held_out": 0.2, "seed": 0,
                                          "overwrite": True},
            {"model": (1, 0), "vae": (1, 1), "positive": (2, 0), "images": (5, 0), "labels": (5, 1)}),
        7: ("SpellFairnessCount", {"name": "demo", "reset": False}, {}),
        10: ("SpellDistributionGuidance", {"target": ", ".join(f"{d}: 0.1" for d in range(10)), "strength": 100.0,
                                           "loss": "per-image assignment", "temperature": 8.0,
                                           "divergence": "chi-square"},
             {"model": (1, 0), "heads": (6, 0), "count": (7, 0)}),
        11: ("KSampler", SAMPLER, {"model": (10, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0)}),
        12: ("VAEDecode", {}, {"samples": (11, 0), "vae": (1, 1)}),
        13: ("SaveImage", {"filename_prefix": "spell_fairness"}, {"images": (12, 0)}),
        14: ("SpellFairnessReport", {}, {"model": (10, 0), "heads": (6, 0), "samples": (11, 0), "count": (7, 0)}),
    },
}


def to_ui(graph: dict, node_classes: dict) -> dict:
    """Compact graph {id: (type, widgets, {input: (src id, src slot)})} -> UI-format workflow."""
    links, nodes = [], []
    out_links: dict[tuple, list] = {}
    for nid, (_, _, inputs) in graph.items():
        for name, (src, slot) in inputs.items():
            links.append([len(links) + 1, src, slot, nid, None, None])
            out_links.setdefault((src, slot), []).append(len(links))
    for order, (nid, (kind, widgets, inputs)) in enumerate(sorted(graph.items())):
        cls = node_classes[kind]
        values = []
        for name, spec in widget_inputs(cls):
            if name in widgets:
                values.append(widgets[name])
                if has_control_widget(name, spec):
                    values.append("fixed")
        types = {**cls.INPUT_TYPES().get("required", {}), **cls.INPUT_TYPES().get("optional", {})}
        ui_inputs = []
        for slot, name in enumerate(inputs):
            link_id = next(l[0] for l in links if l[3] == nid and l[1:3] == list(inputs[name]) and l[4] is None)
            links[link_id - 1][4] = slot
            links[link_id - 1][5] = types[name][0]
            ui_inputs.append({"name": name, "type": types[name][0], "link": link_id})
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        outputs = [{"name": n, "type": t, "links": out_links.get((nid, s), []), "slot_index": s}
                   for s, (n, t) in enumerate(zip(names, cls.RETURN_TYPES))]
        column = {1: 0, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1, 10: 2, 11: 3, 12: 4, 13: 5, 14: 4}.get(nid, order)
        row = {2: 0, 3: 1, 4: 2, 5: 3, 6: 3, 13: 0, 14: 1}.get(nid, 0)
        nodes.append({"id": nid, "type": kind, "pos": [40 + 340 * column, 60 + 260 * row], "size": [300, 200],
                      "flags": {}, "order": order, "mode": 0, "inputs": ui_inputs, "outputs": outputs,
                      "properties": {"Node name for S&R": kind}, "widgets_values": values})
    return {"last_node_id": max(graph), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def main():
    nodes = comfy_host.start(tempfile.mkdtemp(prefix="spell-workflows-"))
    OUT.mkdir(exist_ok=True)
    for name, graph in GRAPHS.items():
        (OUT / f"{name}.json").write_text(json.dumps(to_ui(graph, nodes.NODE_CLASS_MAPPINGS), indent=1) + "\n")
        print(f"wrote example_workflows/{name}.json")


if __name__ == "__main__":
    main()
