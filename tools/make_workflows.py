"""Writes example_workflows/*.json (ComfyUI's UI format) from the compact graphs below, with widget values
ordered by the installed nodes' INPUT_TYPES. Run ``python -m tools.make_workflows`` after changing a node's
inputs; tests/in_comfyui/test_workflows.py converts the files back and runs them, so a renamed input fails CI.

Layout: columns by depth in the graph (left to right), nodes stacked in a column without overlap, sizes from
each node's slots and widgets (LiteGraph's own rule: 20 px per slot row, 24 px per widget), a Markdown note
saying what the example shows, and ``extra.ds`` opening the whole graph in a 1600 x 1000 window at a zoom
where the front end still draws text (LiteGraph switches to low-quality drawing below 0.6)."""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

from demo import DEFAULT_WEIGHTS, DEMO_LORA
from demo.example_inputs import PROTECTED_FOLDER  # written into ComfyUI's input folder by the pack on its first start
from tools import comfy_host
from tools.workflow import has_control_widget, widget_inputs

OUT = comfy_host.PACK_DIR / "example_workflows"

COMMON = {
    1: ("SpellDemoModelLoader", {"weights": DEFAULT_WEIGHTS}, {}),
    2: ("SpellDemoClassPrompt", {"prompt": "any digit"}, {"prompts": (1, 2)}),
    3: ("SpellDemoClassPrompt", {"prompt": "(empty)"}, {"prompts": (1, 2)}),
    4: ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 8}, {}),
}
SAMPLER = {"seed": 42, "steps": 20, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
SPELL = {"radius": 0.5, "overcompensation": 1.6, "in_batch": "mutual", "start_percent": 0.0, "end_percent": 1.0,
         "enforce_shield": True, "batch_radius_scale": 1.1, "batch_end_percent": 0.6}
# The diversity example at the node's defaults (the adaptive in-batch radius); its seed is the one whose Vendi gain
# is the median of the 8 seeds of `python -m tools.main_job --sweep` (docs/diversity_example.md).
SPELL_DIVERSITY = dict(SPELL)
SAMPLER_DIVERSITY = {**SAMPLER, "seed": 42}
# Guidance limited to an interval before SPELL (docs/diversity_decide.md): CFG only from 65 % to 93 % of the
# schedule (σ 0.99 to 0.27 on the demo model), i.e. the benchmark's σ_hi = 1.0 point.
INTERVAL = {"start_percent": 0.65, "end_percent": 0.93}


def tail(spell_inputs: dict, prefix: str, spell: dict = SPELL, sampler: dict = SAMPLER) -> dict:
    """SpellRepellency -> KSampler -> VAE Decode -> Save Image, plus SPELL Report."""
    return {
        10: ("SpellRepellency", spell, {"model": (1, 0), **spell_inputs}),
        11: ("KSampler", sampler, {"model": (10, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0)}),
        12: ("VAEDecode", {}, {"samples": (11, 0), "vae": (1, 1)}),
        13: ("SaveImage", {"filename_prefix": prefix}, {"images": (12, 0)}),
        14: ("SpellReport", {}, {"model": (10, 0), "samples": (11, 0)}),
    }


GRAPHS = {
    "spell_diversity": {**COMMON, **tail({}, "spell_diversity", SPELL_DIVERSITY, SAMPLER_DIVERSITY)},
    "spell_diversity_interval": {
        **COMMON,
        5: ("SpellGuidanceInterval", INTERVAL, {"model": (1, 0)}),
        **tail({"model": (5, 0)}, "spell_diversity_interval", SPELL_DIVERSITY, SAMPLER_DIVERSITY),
    },
    "spell_protected_set": {
        **COMMON,
        5: ("SpellProtectedSetLoader", {"folder": PROTECTED_FOLDER, "set_file": "(none)", "width": 64, "height": 64,
                                        "resize": "center crop"}, {"vae": (1, 1)}),
        **tail({"references": (5, 0)}, "spell_protected"),
    },
    "spell_shield_calibrated": {
        **COMMON,
        5: ("SpellProtectedSetLoader", {"folder": PROTECTED_FOLDER, "set_file": "(none)", "width": 64, "height": 64,
                                        "resize": "center crop", "variants": "shifts + zoom"}, {"vae": (1, 1)}),
        6: ("SpellShieldCalibration", {"copies_per_image": 10, "seed": 0, "flip": False, "variants": "shifts + zoom",
                                       "folder": PROTECTED_FOLDER, "width": 64, "height": 64,
                                       "resize": "center crop"}, {"model": (1, 0), "vae": (1, 1)}),
        **tail({"references": (5, 0), "radius": (6, 2)}, "spell_shield_calibrated"),
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
    "spell_fair_lora": {
        **COMMON,
        5: ("LoraLoaderModelOnly", {"lora_name": DEMO_LORA, "strength_model": 1.0},
            {"model": (1, 0)}),
        11: ("KSampler", SAMPLER, {"model": (5, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0)}),
        12: ("VAEDecode", {}, {"samples": (11, 0), "vae": (1, 1)}),
        13: ("SaveImage", {"filename_prefix": "spell_fair_lora"}, {"images": (12, 0)}),
    },
}


NOTES = {
    "spell_diversity": (
        "**SPELL: diversity within a batch.** Eight images of \"any digit\" from one fixed seed. SPELL Sparse "
        "Repellency pushes each image's predicted result away from the other images of the batch whenever two come "
        "closer than batch_radius_scale x the batch's own spacing, until batch_end_percent of the schedule, and "
        "leaves the others untouched.\n\nBypass the SPELL node (Ctrl+B) and run again "
        "to compare the two batches; SPELL Report shows how often the push acted and each image's distance to its "
        "nearest neighbour in the batch."),
    "spell_diversity_interval": (
        "**SPELL with guidance limited to an interval.** The same batch as spell_diversity, with SPELL Guidance "
        "Interval before SPELL: classifier-free guidance acts only in the later part of the schedule, so the "
        "early steps, which decide the layout, follow the prompt without being pulled to its most typical image, "
        "and SPELL keeps the images of the batch apart.\n\nBypass either node (Ctrl+B) to compare; on the demo "
        "benchmark the pair raised diversity on every prompt, where the interval alone lowered it on \"any "
        "digit\" (docs/diversity_decide.md)."),
    "spell_protected_set": (
        "**SPELL: a protected set.** The loader encodes 24 images of the digit 1 (ComfyUI's "
        "input/spell_protected_digits) into a protected set, and SPELL keeps every output at least r away from all "
        "of them; with enforce_shield on this is a guarantee.\n\nWithout SPELL most outputs of this seed are near "
        "copies of a protected 1. SPELL Report lists each output's distance to its nearest protected reference: "
        "all at or above r."),
    "spell_shield_calibrated": (
        "**SPELL: a shield whose radius is measured.** SPELL Shield Calibration makes near-copies of the protected "
        "images (crops, small shifts, JPEG, brightness; mirror images off for digits), encodes them with the demo "
        "VAE and suggests the smallest r that holds 95 % of them; its radius output drives SPELL Sparse "
        "Repellency's radius. Both it and the loader hold each image also shifted and zoomed (variants), so a "
        "small r catches shifted copies without pushing other digits away.\n\nPoint both folders at your own "
        "protected images and set width and height to your generation size; read the report on the node (and the "
        "histogram: its first output, for a Preview Image) before trusting the number: it says how many distinct "
        "images that r would also push away."),
    "spell_batch_memory": (
        "**SPELL: a batch memory across runs.** Press Run several times with the same fixed seed: each run appends "
        "its outputs to the memory \"demo\" (user/spell/memory/demo.safetensors), and the next run is pushed away "
        "from everything stored, so each press gives new images instead of the same ones.\n\nSPELL Report's "
        "\"static references\" grows by 8 per run. To start over, put SPELL Batch Memory Clear between the "
        "memory and SPELL for one run."),
    "spell_fairness": (
        "**SPELL fairness: steer the digit distribution.** The trainer learns small attribute heads from labelled "
        "demo digits; Distribution Guidance then steers the biased \"any digit\" batch toward a uniform share of "
        "the ten digits, and the running count keeps the target over many runs.\n\nSPELL Fairness Report compares "
        "the outputs' digits with the target; run it a few times and watch the running shares approach 10 %."),
    "spell_fair_lora": (
        "**SPELL fairness by finetuning: a fair LoRA.** ComfyUI's own LoraLoaderModelOnly loads the demo's fair "
        "LoRA (models/loras/" + DEMO_LORA + ", trained by SPELL Fair LoRA Trainer with "
        "`python -m demo.train_fair_lora`). Nothing else runs at sampling time: every image of \"any digit\" "
        "is drawn from a model finetuned toward a uniform share of the ten digits, at any batch size.\n\nSet "
        "strength_model to 0 and run again to see the base model's bias (many 1s and 7s)."),
}
NOTE_ID = 30
PREVIEW_ID = {"SpellReport": 15, "SpellFairnessReport": 16}


def with_previews(graph: dict, node_classes: dict) -> dict:
    """A Preview Image on every report whose slot 1 is an IMAGE (the report as a picture)."""
    g = dict(graph)
    for nid, (kind, _, _) in graph.items():
        types = getattr(node_classes[kind], "RETURN_TYPES", ())
        if kind in PREVIEW_ID and len(types) > 1 and types[1] == "IMAGE":
            g[PREVIEW_ID[kind]] = ("PreviewImage", {}, {"images": (nid, 1)})
    return g


# ------------------------------------------------------------------------------------------------ layout
TITLE_H, SLOT_H, WIDGET_H = 30, 20, 24  # LiteGraph: NODE_TITLE_HEIGHT, NODE_SLOT_HEIGHT, widget height + gap
COLUMN_GAP, ROW_GAP, MARGIN = 36, 30, 20
WINDOW = (1600, 1000)  # the browser window the graph should fit when it opens
INSETS = (64, 84, 16, 40)  # left, top, right, bottom: the front end's side bar, tab bar and menus over the canvas
IMAGES = {"SaveImage": (280, 260), "PreviewImage": (280, 260)}  # room for the images they show after a run
# Nodes whose text web/spell.js shows in a box below their widgets after a run: (min width, box height), so the
# box (80 px at least) fits without the node growing over its neighbours; longer text scrolls in the box.
TEXT = {"SpellReport": (500, 200), "SpellFairnessReport": (440, 230), "SpellAttributeHeadTrainer": (330, 170),
        "SpellShieldCalibration": (300, 90),
        "SpellProtectedSetLoader": (300, 90), "SpellDemoDigitExamples": (260, 90)}


def node_size(kind: str, cls, n_inputs: int, n_widgets: int) -> list[int]:
    """[width, height] of the node's body (the title bar sits above it), as LiteGraph's computeSize would give,
    enlarged for nodes that show images or text after a run."""
    names = getattr(cls, "RETURN_NAMES", None) or getattr(cls, "RETURN_TYPES", ())
    rows = max(n_inputs, len(names), 1)
    title = getattr(cls, "DISPLAY_NAME", kind)
    width = max(230, round(7.5 * len(title)) + 50)  # the title at LiteGraph's 14 px font, plus the collapse dot
    height = rows * SLOT_H + n_widgets * WIDGET_H + 10
    text_w, text_h = TEXT.get(kind, (0, 0))
    image_w, image_h = IMAGES.get(kind, (0, 0))
    return [max(width, text_w, image_w), max(height + text_h, image_h)]


def columns(graph: dict, stack_sinks: bool = False) -> dict:
    """Depth of each node: 0 for sources, else one more than its deepest input; sources sit one column before
    their first consumer, so the graph reads left to right with no long wires back. ``stack_sinks``: image
    nodes at the end of a wire (Save Image, Preview Image) go into their source's column, below it."""
    depth: dict = {}

    def d(n):
        if n not in depth:
            depth[n] = 1 + max((d(src) for src, _ in graph[n][2].values()), default=-1)
        return depth[n]

    for n in graph:
        d(n)
    for n in graph:
        consumers = [c for c, (_, _, ins) in graph.items() if any(src == n for src, _ in ins.values())]
        if not graph[n][2] and consumers:
            depth[n] = max(depth[n], min(depth[c] for c in consumers) - 1)
    if stack_sinks:
        for n, (kind, _, ins) in graph.items():
            if kind in IMAGES and len(ins) == 1 and not any(src == n for _, _, i in graph.values() for src, _ in i.values()):
                depth[n] = depth[next(iter(ins.values()))[0]]
    return depth


def place(graph: dict, sizes: dict, depth: dict) -> dict:
    """Top-left corners of the node bodies: columns left to right, each column stacked top-down in the order
    of the inputs it feeds (so wires cross little; a sink right below its source), nothing overlapping (title
    bars included)."""
    def feeds(n):
        ins = graph[n][2]
        if ins and depth[next(iter(ins.values()))[0]] == depth[n]:  # a sink stacked in its source's column
            return feeds(next(iter(ins.values()))[0])[:3] + (1,)
        uses = [(depth[c], c, slot, 0) for c, (_, _, i) in graph.items() for slot, (src, _) in enumerate(i.values())
                if src == n and depth[c] != depth[n]]
        return min(uses, default=(len(graph), n, 0, 0))

    pos, x = {}, MARGIN
    for col in range(max(depth.values()) + 1):
        members = sorted((n for n in graph if depth[n] == col), key=feeds)
        y = MARGIN + TITLE_H
        for n in members:
            pos[n] = [x, y]
            y += sizes[n][1] + TITLE_H + ROW_GAP
        x += max((sizes[n][0] for n in members), default=0) + COLUMN_GAP
    return pos


def view(boxes: list) -> dict:
    """extra.ds: the largest scale (at most 1) at which every box [x, y, w, h] fits WINDOW less INSETS, and the
    offset that puts the graph's top-left corner at the insets' corner; LiteGraph draws a canvas point p at
    (p + offset) * scale."""
    x0 = min(b[0] for b in boxes) - MARGIN
    y0 = min(b[1] for b in boxes) - MARGIN
    x1 = max(b[0] + b[2] for b in boxes) + MARGIN
    y1 = max(b[1] + b[3] for b in boxes) + MARGIN
    left, top, right, bottom = INSETS
    scale = round(min(1.0, (WINDOW[0] - left - right) / (x1 - x0), (WINDOW[1] - top - bottom) / (y1 - y0)), 3)
    return {"scale": scale, "offset": [round(left / scale - x0), round(top / scale - y0)]}


def node_boxes(nodes: list) -> list:
    """[x, y, w, h] of each UI node, title bar included."""
    return [[n["pos"][0], n["pos"][1] - TITLE_H, n["size"][0], n["size"][1] + TITLE_H] for n in nodes]


def template_fit(boxes: list) -> float:
    """The zoom newer front ends (1.49) open a template at, ignoring extra.ds: LGraphCanvas fitView, i.e.
    ``ds.fitToBounds`` of the nodes' bounds with its default zoom 0.75, in WINDOW."""
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    return 0.75 * min(WINDOW[0] / max(x1 - x0, 300), WINDOW[1] / max(y1 - y0, 300))


def opening_zoom(boxes: list) -> float:
    """The smaller of the zooms the two front end lines open the graph at (extra.ds; fitView for templates)."""
    return min(view(boxes)["scale"], template_fit(boxes))


def overlaps(boxes: list) -> list[tuple]:
    """Pairs of boxes [x, y, w, h] that intersect."""
    return [(i, j) for i, a in enumerate(boxes) for j, b in enumerate(boxes[i + 1:], i + 1)
            if a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]]


def to_ui(graph: dict, node_classes: dict, note: str | None = None, extra: dict | None = None) -> dict:
    """Compact graph {id: (type, widgets, {input: (src id, src slot)})} -> UI-format workflow, laid out left to
    right, with ``note`` as a Markdown note above the graph and ``extra`` merged into the workflow's ``extra``
    (the place for template metadata such as a description)."""
    links = []
    out_links: dict[tuple, list] = {}
    for nid, (_, _, inputs) in sorted(graph.items()):
        for name, (src, slot) in inputs.items():
            links.append([len(links) + 1, src, slot, nid, None, None])
            out_links.setdefault((src, slot), []).append(len(links))
    entries, sizes = {}, {}
    for nid, (kind, widgets, inputs) in sorted(graph.items()):
        cls = node_classes[kind]
        values, n_widgets = [], 0
        for name, spec in widget_inputs(cls):
            if name in widgets:
                values.append(widgets[name])
                n_widgets += 1
                if has_control_widget(name, spec):
                    values.append("fixed")
                    n_widgets += 1
        types = {**cls.INPUT_TYPES().get("required", {}), **cls.INPUT_TYPES().get("optional", {})}
        ui_inputs = []
        widget_names = {name for name, spec in widget_inputs(cls)
                        if not (len(spec) > 1 and spec[1].get("forceInput"))}
        for slot, name in enumerate(inputs):
            link_id = next(l[0] for l in links if l[3] == nid and l[1:3] == list(inputs[name]) and l[4] is None)
            links[link_id - 1][4] = slot
            links[link_id - 1][5] = types[name][0]
            entry = {"name": name, "type": types[name][0], "link": link_id}
            if name in widget_names:  # a widget driven by a link: the front end keeps its value, draws a slot
                entry["widget"] = {"name": name}
            ui_inputs.append(entry)
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        outputs = [{"name": n, "type": t, "links": out_links.get((nid, s), []), "slot_index": s}
                   for s, (n, t) in enumerate(zip(names, cls.RETURN_TYPES))]
        # the front end draws a slot for every input that is not a widget, linked or not (optional ones too)
        n_slots = len(set(types) - {name for name, _ in widget_inputs(cls)})
        sizes[nid] = node_size(kind, cls, max(len(ui_inputs), n_slots), n_widgets)
        entries[nid] = {"id": nid, "type": kind, "pos": None, "size": sizes[nid], "flags": {}, "order": 0,
                        "mode": 0, "inputs": ui_inputs, "outputs": outputs,
                        "properties": {"Node name for S&R": kind}, "widgets_values": values}
    layouts = [arrange(copy.deepcopy(entries), graph, sizes, note, stack) for stack in (False, True)]
    nodes, boxes, ds = max(layouts, key=lambda layout: opening_zoom(layout[1]))  # first on ties
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": ds, **(extra or {})}, "version": 0.4}


def arrange(entries: dict, graph: dict, sizes: dict, note: str | None, stack_sinks: bool):
    """(nodes, their boxes, extra.ds) for one layout: the entries placed, the note above them."""
    depth = columns(graph, stack_sinks)
    pos = place(graph, sizes, depth)
    for order, nid in enumerate(sorted(graph, key=lambda n: (depth[n], n))):
        entries[nid]["pos"], entries[nid]["order"] = pos[nid], order
    nodes = [entries[n] for n in sorted(entries)]
    if note:
        right = max(p[0] + sizes[n][0] for n, p in pos.items())
        note_size = [min(right - MARGIN, 760), 150]
        for n in nodes:  # the note takes the top band of the columns it spans; they move down below it
            if n["pos"][0] < MARGIN + note_size[0]:
                n["pos"] = [n["pos"][0], n["pos"][1] + note_size[1] + TITLE_H + ROW_GAP]
        nodes.append({"id": NOTE_ID, "type": "MarkdownNote", "pos": [MARGIN, MARGIN + TITLE_H], "size": note_size,
                      "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                      "properties": {}, "widgets_values": [note], "color": "#432", "bgcolor": "#653"})
    boxes = node_boxes(nodes)
    clash = overlaps(boxes)
    if clash:
        raise ValueError(f"nodes overlap: {[(nodes[i]['id'], nodes[j]['id']) for i, j in clash]}")
    return nodes, boxes, view(boxes)

def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-previews", action="store_true",
                        help="no Preview Image on the reports even where the installed reports have an IMAGE output")
    args = parser.parse_args()
    nodes = comfy_host.start(tempfile.mkdtemp(prefix="spell-workflows-"))
    OUT.mkdir(exist_ok=True)
    for name, graph in GRAPHS.items():
        if not args.no_previews:
            graph = with_previews(graph, nodes.NODE_CLASS_MAPPINGS)
        workflow = to_ui(graph, nodes.NODE_CLASS_MAPPINGS, NOTES[name])
        (OUT / f"{name}.json").write_text(json.dumps(workflow, indent=1) + "\n")
        boxes = node_boxes(workflow["nodes"])
        print(f"wrote example_workflows/{name}.json (opens at zoom {workflow['extra']['ds']['scale']}; "
              f"from the template browser of newer front ends {template_fit(boxes):.3f})")


if __name__ == "__main__":
    main()
