"""The main job: runs the pack's example workflows headless through ComfyUI's executor on the embedded demo
model, each as shipped (with SPELL) and with the SPELL node bypassed (same seed), and writes a labelled figure
and the metrics to run/main_job/ (``scripts/run_demo.sh``):

- diversity: one batch with and without SPELL, each image's predicted digit under it;
- protected set: the protected references, then the outputs with their distance to the nearest reference
  (inside or outside the shield);
- batch memory: three consecutive runs with one memory (emptied first), the same fixed seed each time, with
  each output's distance to the earlier runs' outputs: without SPELL the runs repeat exactly, with SPELL the
  memory pushes runs 2 and 3 away from what came before;
- fair LoRA: the fair-LoRA example (stock LoraLoaderModelOnly) at strength 1 and at strength 0 (the base model),
  same seed, a batch of FAIR_IMAGES: the share of each digit under the evaluator; the LoRA acts on each image
  alone, so the shares are what batch 1 gives.

``--sweep`` instead measures the diversity example at several SPELL settings over several seeds
(docs/diversity_example.md)."""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from tools import comfy_host
from tools.workflow import Executor, ui_to_api

ROOT = comfy_host.PACK_DIR
MEMORY_RUNS = 3
FAIR_IMAGES = 256
SWEEP_SEEDS = tuple(range(42, 50))
SWEEP_SETTINGS = {  # label -> SpellRepellency inputs changed from the shipped diversity example
    "adaptive 1.1 until 60 % (the defaults)": dict(),
    "adaptive 1.2 until 60 %": dict(batch_radius_scale=1.2),
    "adaptive 1.05 until the end (earlier default)": dict(batch_radius_scale=1.05, batch_end_percent=1.0),
    "adaptive 1.1 until the end": dict(batch_radius_scale=1.1, batch_end_percent=1.0),
    "absolute r 0.5 until the end": dict(batch_radius_scale=0.0, radius=0.5, batch_end_percent=1.0),
    "absolute r 0.7 until the end": dict(batch_radius_scale=0.0, radius=0.7, batch_end_percent=1.0),
}


# ------------------------------------------------------------------------------------------------ graphs
def load_example(name: str, nodes) -> dict:
    workflow = json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())
    return ui_to_api(workflow, nodes.NODE_CLASS_MAPPINGS)


def node_of(prompt: dict, class_type: str) -> str:
    return next(n for n, node in prompt.items() if node["class_type"] == class_type)


def bypass_spell(prompt: dict) -> dict:
    """The same graph with SpellRepellency bypassed: the sampler takes the model the SPELL node took."""
    g = copy.deepcopy(prompt)
    for sid in [n for n, node in g.items() if node["class_type"] == "SpellRepellency"]:
        source = g[sid]["inputs"]["model"]
        for node in g.values():
            for name, value in node["inputs"].items():
                if value == [sid, 0]:
                    node["inputs"][name] = source
        del g[sid]
    reports = {n for n, node in g.items() if node["class_type"] == "SpellReport"}
    return {n: node for n, node in g.items()  # the reports go, and what shows them (Preview Image)
            if n not in reports and not any(isinstance(v, list) and v[0] in reports for v in node["inputs"].values())}


def run(executor: Executor, prompt: dict, what: str):
    """One queue press (Executor.run copies the prompt, as each POST /prompt brings its own)."""
    result = executor.run(prompt)
    if not result.success:
        raise SystemExit(f"{what} failed: {result.error}")
    return result


def sampled(prompt: dict, result) -> torch.Tensor:
    return result.outputs[node_of(prompt, "KSampler")][0]["samples"]


# ------------------------------------------------------------------------------------------------ metrics
class Scorer:
    """The demo evaluator: features, predicted digits, and precision/recall against held-out real digits."""

    def __init__(self):
        from demo.data import digits_split
        from demo.evaluator import load_evaluator

        self.evaluator = load_evaluator()
        with torch.no_grad():
            self.real = self.evaluator.features(digits_split()["test"][0])

    def __call__(self, latents: torch.Tensor):
        from demo.data import latents_to_images16

        images = latents_to_images16(latents.float())
        with torch.no_grad():
            return self.evaluator.features(images), self.evaluator.predict(images).argmax(1)

    def batch(self, latents: torch.Tensor) -> dict:
        from spell_core import nearest
        from spell_core.metrics import vendi_score

        feats, classes = self(latents)
        nn = nearest(latents, latents, ~torch.eye(len(latents), dtype=torch.bool))
        return {"vendi": round(vendi_score(feats), 3), "distinct classes": int(classes.unique().numel()),
                "classes": classes.tolist(), "mean nearest-neighbour RMS": round(float(nn.mean()), 4),
                "closest pair RMS": round(float(nn.min()), 4)}


def nearest_earlier(runs: list[torch.Tensor]) -> list[list[float] | None]:
    """Per run, each output's RMS distance to the nearest output of the runs before it (None for run 1)."""
    from spell_core import nearest

    return [None if k == 0 else [round(float(d), 4) for d in nearest(x, torch.cat(runs[:k]))]
            for k, x in enumerate(runs)]


def settings(prompt: dict) -> dict:
    """SPELL's widgets and the sampler's seed of an example."""
    spell = prompt[node_of(prompt, "SpellRepellency")]["inputs"]
    return {**{k: v for k, v in spell.items() if not isinstance(v, list)},
            "seed": prompt[node_of(prompt, "KSampler")]["inputs"]["seed"]}


def spell_label(inputs: dict) -> str:
    scale = inputs.get("batch_radius_scale", 0.0)
    s = (f"SPELL {inputs['in_batch']}, batch radius {scale:g} x spacing" if scale and inputs["in_batch"] != "off"
         else f"SPELL r = {inputs['radius']:g}, {inputs['in_batch']}")
    if inputs["start_percent"] > 0 or inputs["end_percent"] < 1:
        s += f", steps {inputs['start_percent']:g}-{inputs['end_percent']:g}"
    if inputs["in_batch"] != "off" and inputs.get("batch_end_percent", 1.0) < 1:
        s += f", batch push until {inputs['batch_end_percent']:.0%}"
    return s


# ------------------------------------------------------------------------------------------------ figure
TILE, GAP, LABEL_W, CAPTION_H, TITLE_H = 80, 4, 300, 16, 48
GOOD, BAD, INK, GREY = (20, 130, 50), (200, 30, 30), (20, 20, 20), (110, 110, 110)


class Figure:
    """Rows of decoded images, each with a label on the left and a caption under every image (Pillow)."""

    def __init__(self, vae):
        self.vae = vae
        self.items: list[tuple] = []
        self.font = ImageFont.load_default(size=13)
        self.title_font = ImageFont.load_default(size=17)

    def title(self, text: str, sub: str = ""):
        self.items.append(("title", text, sub))

    def row(self, label: str, latents: torch.Tensor, captions=None, colours=None, note: str = ""):
        tiles = self.vae.decode(latents)[..., 0].clamp(0, 1).numpy()
        self.items.append(("row", label, note, tiles, captions or [""] * len(tiles), colours or [INK] * len(tiles)))

    def save(self, path: Path):
        cols = max(len(it[3]) for it in self.items if it[0] == "row")
        row_h = TILE + CAPTION_H + GAP * 2
        height = sum(TITLE_H if it[0] == "title" else row_h for it in self.items) + GAP
        canvas = Image.new("RGB", (LABEL_W + cols * (TILE + GAP) + GAP, height), "white")
        draw = ImageDraw.Draw(canvas)
        y = GAP
        for it in self.items:
            if it[0] == "title":
                draw.line((GAP, y + 4, canvas.width - GAP, y + 4), fill=GREY)
                draw.text((GAP * 2, y + 8), it[1], fill=INK, font=self.title_font)
                draw.text((GAP * 2, y + 29), it[2], fill=GREY, font=self.font)
                y += TITLE_H
                continue
            _, label, note, tiles, captions, colours = it
            lines = wrap(draw, label, self.font, LABEL_W - GAP * 5)  # long setting names take more lines, upward
            for n, line in enumerate(lines):
                draw.text((GAP * 3, y + TILE // 2 - 16 - 15 * (len(lines) - 1 - n)), line, fill=INK, font=self.font)
            draw.text((GAP * 3, y + TILE // 2 + 2), note, fill=GREY, font=self.font)
            for j, (img, cap, colour) in enumerate(zip(tiles, captions, colours)):
                x = LABEL_W + j * (TILE + GAP)
                grey = Image.fromarray((img * 255).round().astype(np.uint8)).resize((TILE, TILE), Image.Resampling.NEAREST)
                canvas.paste(grey.convert("RGB"), (x, y))
                w = draw.textlength(cap, font=self.font)
                draw.text((x + (TILE - w) / 2, y + TILE + 1), cap, fill=colour, font=self.font)
            y += row_h
        canvas.save(path)


def wrap(draw, text: str, font, width: float) -> list[str]:
    """text broken at spaces into lines no wider than width (a single longer word keeps its own line)."""
    lines = [""]
    for word in text.split(" "):
        trial = f"{lines[-1]} {word}".strip()
        if lines[-1] and draw.textlength(trial, font=font) > width:
            lines.append(word)
        else:
            lines[-1] = trial
    return lines


# ------------------------------------------------------------------------------------------------ examples
def diversity(nodes, executor, scorer, fig):
    prompt = load_example("spell_diversity", nodes)
    spell = prompt[node_of(prompt, "SpellRepellency")]["inputs"]
    fig.title(f"1. Diversity: one batch of 'any digit', seed {prompt[node_of(prompt, 'KSampler')]['inputs']['seed']}",
              "under each image: the digit the demo evaluator reads; SPELL pushes the images of a batch apart")
    entry = {"settings": settings(prompt)}
    for variant, graph, label in (("baseline", bypass_spell(prompt), "baseline (SPELL bypassed)"),
                                  ("SPELL", prompt, spell_label(spell))):
        latents = sampled(graph, run(executor, graph, f"spell_diversity ({variant})"))
        m = scorer.batch(latents)
        entry[variant] = m
        fig.row(f"diversity: {label}", latents, [f"digit {c}" for c in m["classes"]],
                note=f"Vendi {m['vendi']:.2f}, {m['distinct classes']} digits, closest pair {m['closest pair RMS']:.2f}")
    return entry


def protected_set(nodes, executor, scorer, fig):
    from spell_core import nearest

    prompt = load_example("spell_protected_set", nodes)
    spell = prompt[node_of(prompt, "SpellRepellency")]["inputs"]
    r, loader = spell["radius"], node_of(prompt, "SpellProtectedSetLoader")
    entry = {"settings": settings(prompt)}
    shield = None
    for variant, graph, label in (("SPELL", prompt, spell_label(spell)),
                                  ("baseline", bypass_spell(prompt), "baseline (SPELL bypassed)")):
        result = run(executor, graph, f"spell_protected_set ({variant})")
        latents = sampled(graph, result)
        if shield is None:
            shield = result.outputs[loader][0].latents
            fig.title(f"2. Protected set: {len(shield)} images of digit 1 must not be reproduced (r = {r:g})",
                      "under each output: RMS distance to its nearest protected reference; red = inside the shield")
            fig.row("protected references", shield[:8], [f"ref {i + 1}" for i in range(min(8, len(shield)))],
                    note=f"{min(8, len(shield))} of {len(shield)} shown")
        d = nearest(latents, shield)
        inside = int((d < r).sum())
        entry[variant] = {**scorer.batch(latents), "inside the shield": f"{inside}/{len(d)}",
                          "nearest reference RMS": [round(float(x), 4) for x in d]}
        fig.row(f"protected: {label}", latents, [f"{float(x):.2f} {'in' if x < r else 'out'}" for x in d],
                [BAD if x < r else GOOD for x in d],
                note=f"{inside}/{len(d)} inside the shield")
    fig.items[-2], fig.items[-1] = fig.items[-1], fig.items[-2]  # baseline row above the SPELL row
    return entry


def batch_memory(nodes, executor, scorer, fig):
    prompt = load_example("spell_batch_memory", nodes)
    spell = prompt[node_of(prompt, "SpellRepellency")]["inputs"]
    mem_inputs = prompt[node_of(prompt, "SpellBatchMemory")]["inputs"]
    memory = nodes.NODE_CLASS_MAPPINGS["SpellBatchMemory"]().open(**mem_inputs)[0]
    seed = prompt[node_of(prompt, "KSampler")]["inputs"]["seed"]
    fig.title(f"3. Batch memory: {MEMORY_RUNS} presses of Run with the same fixed seed {seed}, memory emptied first",
              "under each image: RMS distance to the nearest output of the earlier runs; red = closer than r")
    entry = {"settings": settings(prompt), "memory": mem_inputs}
    memory.clear()
    for variant, graph, label in (("baseline", bypass_spell(prompt), "baseline (SPELL bypassed)"),
                                  ("SPELL", prompt, spell_label(spell) + ", memory")):
        runs, sizes = [], []
        for k in range(MEMORY_RUNS):
            result = run(executor, graph, f"spell_batch_memory ({variant}, run {k + 1})")
            runs.append(sampled(graph, result))
            sizes.append(len(memory))
        dists = nearest_earlier(runs)
        entry[variant] = []
        for k, (x, d) in enumerate(zip(runs, dists)):
            m = {**scorer.batch(x), "memory size after the run": sizes[k]}
            if d is not None:
                m["nearest earlier output RMS"] = d
                m["min nearest earlier output RMS"] = min(d)
            entry[variant].append(m)
            caps = ["first run"] * len(x) if d is None else [f"{v:.2f}" for v in d]
            colours = [GREY] * len(x) if d is None else [BAD if v < spell["radius"] else GOOD for v in d]
            fig.row(f"memory run {k + 1}: {label}", x, caps, colours,
                    note="" if d is None else f"closest to earlier runs: {min(d):.2f}")
    return entry


def fair_lora(nodes, executor, scorer, fig):
    from spell_core.fairness import bias

    prompt = load_example("spell_fair_lora", nodes)
    lora, latent = node_of(prompt, "LoraLoaderModelOnly"), node_of(prompt, "EmptyLatentImage")
    prompt[latent]["inputs"]["batch_size"] = FAIR_IMAGES
    name = prompt[lora]["inputs"]["lora_name"]
    fig.title(f"4. Fair LoRA: {FAIR_IMAGES} images of 'any digit', seed {prompt[node_of(prompt, 'KSampler')]['inputs']['seed']}"
              f", first 8 shown", f"{name} (stock LoraLoaderModelOnly), trained toward equal shares of the ten digits; "
              "under each image: the evaluator's digit")
    entry = {"lora": name, "images": FAIR_IMAGES}
    for variant, strength in (("base", 0.0), ("LoRA", prompt[lora]["inputs"]["strength_model"])):
        g = copy.deepcopy(prompt)
        g[lora]["inputs"]["strength_model"] = strength
        latents = sampled(g, run(executor, g, f"spell_fair_lora ({variant})"))
        classes = scorer(latents)[1]
        counts = torch.bincount(classes, minlength=10)
        entry[variant] = {"counts": counts.tolist(), "bias": round(bias(counts.double() / len(classes)), 4)}
        top = int(counts.argmax())
        fig.row(f"fair LoRA: {'base model (strength 0)' if not strength else f'LoRA, strength {strength:g}'}",
                latents[:8], [f"digit {c}" for c in classes[:8].tolist()],
                note=f"bias {entry[variant]['bias']:.3f}; most: {top}s {int(counts[top])}/{len(classes)}")
    return entry


# ------------------------------------------------------------------------------------------------ sweep
def sweep(nodes, executor, scorer, seeds, out: Path) -> None:
    """The diversity example at SWEEP_SETTINGS over seeds; per setting: mean per-batch Vendi and distinct
    classes, how many seeds each went up / down against the baseline of the same seed, and precision and
    recall (k = 5) of all outputs pooled against the held-out real digits."""
    from spell_core.metrics import prdc

    prompt = load_example("spell_diversity", nodes)
    sid, kid = node_of(prompt, "SpellRepellency"), node_of(prompt, "KSampler")
    variants = {"baseline (bypassed)": None, **SWEEP_SETTINGS}
    rows, base = {}, None
    for label, change in variants.items():
        per_seed = []
        for seed in seeds:
            g = copy.deepcopy(bypass_spell(prompt) if change is None else prompt)
            g[kid]["inputs"]["seed"] = seed
            if change is not None:
                g[sid]["inputs"].update(change)
            latents = sampled(g, run(executor, g, f"sweep {label} seed {seed}"))
            per_seed.append((latents, scorer.batch(latents)))
        feats = scorer(torch.cat([x for x, _ in per_seed]))[0]
        v = [m["vendi"] for _, m in per_seed]
        c = [m["distinct classes"] for _, m in per_seed]
        row = {"vendi": v, "classes": c, "nn": [m["mean nearest-neighbour RMS"] for _, m in per_seed],
               **{k: round(x, 3) for k, x in prdc(scorer.real, feats, k=5).items()}}
        if base is None:
            base = row
        row["vendi up"] = sum(a > b for a, b in zip(v, base["vendi"]))
        row["classes up/down"] = (sum(a > b for a, b in zip(c, base["classes"])), sum(a < b for a, b in zip(c, base["classes"])))
        rows[label] = row
        print(f"[sweep] {label}: Vendi {statistics.mean(v):.3f}, classes {statistics.mean(c):.2f}, "
              f"precision {row['precision']}, recall {row['recall']}", flush=True)
    lines = [f"Seeds {list(seeds)}; batch 8, 20 euler steps, cfg 4, 'any digit'; λ = 1.6 unless noted.", "",
             "| setting | Vendi (mean) | Δ Vendi | seeds Vendi up | distinct classes (mean) | classes up / down "
             "(seeds) | precision | recall | NN RMS in batch |", "|---|---|---|---|---|---|---|---|---|"]
    b_v = statistics.mean(base["vendi"])
    for label, row in rows.items():
        up, down = row["classes up/down"]
        lines.append(f"| {label} | {statistics.mean(row['vendi']):.3f} | {statistics.mean(row['vendi']) - b_v:+.3f} | "
                     f"{row['vendi up']}/{len(seeds)} | {statistics.mean(row['classes']):.2f} | {up} / {down} | "
                     f"{row['precision']:.3f} | {row['recall']:.3f} | {statistics.mean(row['nn']):.3f} |")
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"seeds": list(seeds), "settings": SWEEP_SETTINGS, "rows": rows}, indent=1))
    (out / "sweep.md").write_text(table + "\n")


# ------------------------------------------------------------------------------------------------ main
def comfy_version() -> str:
    try:
        import comfyui_version

        return comfyui_version.__version__
    except ImportError:
        return "unknown"


def summary(report: dict) -> str:
    d, p, m, f = report["diversity"], report["protected set"], report["batch memory"], report["fair LoRA"]
    mem = lambda v: ", ".join(f"run {k + 1} {e['min nearest earlier output RMS']:.3f}" for k, e in enumerate(m[v]) if k)
    return "\n".join([
        "SPELL main job: demo model, batch 8, 20 euler steps, SPELL vs the same graph with SPELL bypassed",
        f"  diversity (seed {d['settings']['seed']}, {spell_label(d['settings'])}): Vendi {d['baseline']['vendi']:.3f} -> {d['SPELL']['vendi']:.3f}, "
        f"distinct digits {d['baseline']['distinct classes']} -> {d['SPELL']['distinct classes']}, closest pair RMS "
        f"{d['baseline']['closest pair RMS']:.3f} -> {d['SPELL']['closest pair RMS']:.3f}",
        f"  protected set (r = {p['settings']['radius']:g}): outputs inside the shield {p['baseline']['inside the shield']}"
        f" -> {p['SPELL']['inside the shield']}, nearest reference RMS {min(p['baseline']['nearest reference RMS']):.3f}"
        f" -> {min(p['SPELL']['nearest reference RMS']):.3f}",
        f"  batch memory (r = {m['settings']['radius']:g}, seed {m['settings']['seed']} each run): closest output to earlier runs, "
        f"baseline {mem('baseline')}; SPELL {mem('SPELL')}; memory size {', '.join(str(e['memory size after the run']) for e in m['SPELL'])}",
        f"  fair LoRA ({f['images']} images, {f['lora']}): bias {f['base']['bias']:.3f} -> {f['LoRA']['bias']:.3f}, digits "
        f"0-9 {'/'.join(map(str, f['base']['counts']))} -> {'/'.join(map(str, f['LoRA']['counts']))}",
    ])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "run" / "main_job"))
    parser.add_argument("--sweep", action="store_true", help="measure the diversity example's settings instead")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SWEEP_SEEDS), help="seeds of --sweep")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    nodes = comfy_host.start(out / "comfyui")
    import folder_paths

    from tools.demo_assets import write_protected_digits

    write_protected_digits(folder_paths.get_input_directory())
    scorer, executor = Scorer(), Executor()
    if args.sweep:
        return sweep(nodes, executor, scorer, args.seeds, out)
    start = time.perf_counter()
    vae = nodes.NODE_CLASS_MAPPINGS["SpellDemoModelLoader"]().load()[1]
    fig = Figure(vae)
    report = {"diversity": diversity(nodes, executor, scorer, fig),
              "protected set": protected_set(nodes, executor, scorer, fig),
              "batch memory": batch_memory(nodes, executor, scorer, fig),
              "fair LoRA": fair_lora(nodes, executor, scorer, fig)}
    fig.save(out / "grid.png")
    rows = [it[1] for it in fig.items if it[0] == "row"]
    setup = {"model": "embedded demo model", "prompt": "any digit", "negative": "(empty)", "batch": 8,
             "sampler": "euler, normal, 20 steps, cfg 4", "ComfyUI": comfy_version(),
             "distances": "RMS over latent elements, in the sampler's latent space"}
    (out / "metrics.json").write_text(json.dumps({"setup": setup, "grid.png rows (top to bottom)": rows, **report,
                                                  "wall seconds": round(time.perf_counter() - start, 1)}, indent=1))
    print(summary(report))
    print(f"wrote {out / 'grid.png'} ({len(rows)} labelled rows) and {out / 'metrics.json'}")


if __name__ == "__main__":
    main()
