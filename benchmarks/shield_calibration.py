"""Shield calibration on the demo model (issue 12, item 2): which radius r makes a SPELL shield catch near-copies of
the protected digits and leave distinct digits alone.

    .venv/bin/python -m benchmarks.shield_calibration            # ~1-2 min on 2 shared CPU cores

Runs ComfyUI headless (tools/comfy_host.py) with the pack loaded and calls SPELL Shield Calibration on the demo
model and VAE (``SpellDemoModelLoader``), as a graph would:
- the protected-set example's 24 digits, loaded with ComfyUI's LoadImage from input/spell_protected_digits/ (the
  PNGs the pack writes there), distinct images = the other protected digits, then the 360 held-out test digits;
- a mixed set, 20 training digits per class (SPELL Demo Digit Examples), the same two distinct sets;
- each without mirror images (the demo's default here: a mirrored digit is another glyph), and the example's set
  once with them, to show what they would cost;
- all of it again with the shield holding shifted and zoomed versions of each image (variants "shifts + zoom",
  18 per image; "shifts + zoom + mirror", 36, for the row with mirror images).
Writes docs/shield_calibration.md and its charts under docs/shield_calibration/, and prints the reports.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOCS = ROOT / "docs"
CHARTS = DOCS / "shield_calibration"
COMMAND = ".venv/bin/python -m benchmarks.shield_calibration"
SHIELD_VARIANTS = "shifts + zoom"  # the variants rows: the shield holds shifted and zoomed versions of each image


def held_out_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 360 held-out test digits as 64x64 IMAGEs, drawn like the example's PNGs (nearest 4x upscale), and their
    labels."""
    from demo.data import digits_split

    images16, labels = digits_split()["test"]
    grey = ((images16[:, 0] + 1) / 2 * 255).round() / 255
    big = grey.repeat_interleave(4, 1).repeat_interleave(4, 2)
    return big[..., None].expand(-1, -1, -1, 3).contiguous(), labels


def load_folder(nodes, folder: str) -> torch.Tensor:
    """Every PNG of an input sub-folder through ComfyUI's LoadImage, as one IMAGE batch."""
    import folder_paths

    names = sorted(p.name for p in Path(folder_paths.get_input_directory(), folder).glob("*.png"))
    load = nodes.NODE_CLASS_MAPPINGS["LoadImage"]()
    return torch.cat([load.load_image(f"{folder}/{n}")[0] for n in names])


def run_case(node, model, vae, name, images, copies, flip, distinct, seed, variants="none"):
    t = time.perf_counter()
    out = node.calibrate(model, vae, images, copies, seed, flip, distinct, variants)
    seconds = time.perf_counter() - t
    chart, text, radius = out["result"]
    picture = (chart[0].numpy() * 255).round().astype(np.uint8)
    print(f"== {name} ({seconds:.1f} s)\n{text}\n", flush=True)
    return dict(name=name, text=text, radius=radius, picture=picture, seconds=seconds, n=len(images),
                copies=copies, flip=flip, distinct=None if distinct is None else len(distinct), variants=variants)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(DOCS / "shield_calibration.md"))
    args = ap.parse_args(argv)
    from tools import comfy_host

    nodes = comfy_host.start(tempfile.mkdtemp(prefix="spell-calibration-"))
    pack = comfy_host.pack_module()
    from demo.example_inputs import PROTECTED_FOLDER, write_protected_digits
    import folder_paths

    write_protected_digits(folder_paths.get_input_directory())
    M = nodes.NODE_CLASS_MAPPINGS
    model, vae, _ = M["SpellDemoModelLoader"]().load()
    node = M["SpellShieldCalibration"]()
    example = load_folder(nodes, PROTECTED_FOLDER)
    mixed = M["SpellDemoDigitExamples"]().load(20)[0]
    test, test_labels = held_out_digits()
    t0 = time.perf_counter()
    cases = [
        run_case(node, model, vae, "example", example, 20, False, None, args.seed),
        run_case(node, model, vae, "example_vs_held_out", example, 20, False, test, args.seed),
        run_case(node, model, vae, "mixed", mixed, 10, False, None, args.seed),
        run_case(node, model, vae, "mixed_vs_held_out", mixed, 10, False, test, args.seed),
        run_case(node, model, vae, "example_with_flip", example, 20, True, test, args.seed),
        run_case(node, model, vae, "example_variants", example, 20, False, None, args.seed, SHIELD_VARIANTS),
        run_case(node, model, vae, "example_vs_held_out_variants", example, 20, False, test, args.seed, SHIELD_VARIANTS),
        run_case(node, model, vae, "mixed_variants", mixed, 10, False, None, args.seed, SHIELD_VARIANTS),
        run_case(node, model, vae, "mixed_vs_held_out_variants", mixed, 10, False, test, args.seed, SHIELD_VARIANTS),
        run_case(node, model, vae, "example_with_flip_variants", example, 20, True, test, args.seed,
                 SHIELD_VARIANTS + " + mirror"),
    ]
    total = time.perf_counter() - t0
    CHARTS.mkdir(parents=True, exist_ok=True)
    for c in cases:
        Image.fromarray(c["picture"]).save(CHARTS / f"{c['name']}.png")
    strengths = pack.spell_core.calibration.Strengths()
    Path(args.out).write_text(report(cases, strengths, args.seed, total, test_labels))
    print(f"wrote {args.out} and {len(cases)} charts in {CHARTS.relative_to(ROOT)}/ ({total:.0f} s)")
    return 0


def line(text: str, start: str) -> str:
    return next(s for s in text.splitlines() if s.startswith(start))


def report(cases, s, seed, total, test_labels) -> str:
    from demo.example_inputs import PROTECTED_CLASS

    by = {c["name"]: c for c in cases}
    rows = []
    for c in cases:
        t = c["text"]
        distinct = "other protected" if c["distinct"] is None else f"{c['distinct']} held-out"
        rows.append(f"| {c['name']} | {c['n']} | {c['variants']} | {c['n'] * c['copies']} ({'with' if c['flip'] else 'no'} flip) | "
                    f"{distinct} | **{c['radius']:.3g}** | {share(t, 'near-copies inside r:')} | "
                    f"{share(t, 'distinct images inside r:')} | {balance(t)} |")
    blocks = "\n\n".join(f"### {c['name']}\n\n![{c['name']}](shield_calibration/{c['name']}.png)\n\n```\n{c['text']}\n```"
                         for c in cases)
    ex, exh, mxh, fl = by["example"], by["example_vs_held_out"], by["mixed_vs_held_out"], by["example_with_flip"]
    plain = [c for c in cases if c["variants"] == "none"]
    vcases = [c for c in cases if c["variants"] != "none"]
    missed = sum(fp(c) > 5 for c in plain)
    vmissed = [c["name"] for c in vcases if fp(c) > 5]
    vmet = [c for c in vcases if fp(c) <= 5]
    exv, exhv, mxhv, flv = (by[f"{k}_variants"] for k in ("example", "example_vs_held_out", "mixed_vs_held_out",
                                                          "example_with_flip"))
    ones = int((test_labels == PROTECTED_CLASS).sum())
    inseparable = sum(balanced_rates(c["text"]) is not None and min(balanced_rates(c["text"])) > 5 for c in plain)
    return f"""# Shield calibration on the demo model

Made by `{COMMAND}` (seed {seed}; {total:.0f} s on {platform.machine()}, {torch.get_num_threads()} torch threads,
ComfyUI headless through `tools/comfy_host.py`, node **SPELL Shield Calibration** on the demo model and VAE).
Every number below is printed by that command; re-running it rewrites this file and the charts in
`docs/shield_calibration/`.

## What is measured

A shield's radius r (SPELL Sparse Repellency's `radius`) is an RMS distance in the model's latent space (after
the latent format's `process_latent_in`): how close counts as a copy. The node makes near-copies of each protected
image, encodes everything with the VAE into that space and measures

- **near-copies**: RMS distance of each near-copy to its own source;
- **distinct images**: RMS distance of each distinct image to its nearest protected image; by default the distinct
  images are the protected images themselves, each against its nearest *other* one;
- **suggested r**: the smallest value with 3 significant digits that at least 95 % of the near-copies lie strictly
  inside; the share of distinct images strictly inside that r is the false-positive rate. When it is above 5 %, the
  report says OVERLAP and gives the r where the share of near-copies missed and the share of distinct images caught
  are most nearly equal.

Near-copy kinds, taken in turn per image, each drawn from (seed, image, copy) alone
(`spell_core/calibration.py: Strengths`): **crop** {100 * s.crop_area[0]:.0f}-{100 * s.crop_area[1]:.0f} % of the
area (aspect kept, random place), resized back (bilinear, antialiased); **shift** by 1 pixel up to
{100 * s.shift:g} % of the side in each axis, edges repeated; **flip** (mirror image); **jpeg** re-compression by
Pillow at quality {s.jpeg_quality[0]}-{s.jpeg_quality[1]}; **colour**: brightness and contrast x (1 +-
{s.brightness:g}), saturation x (1 +- {s.saturation:g}), hue +- {s.hue:g} turn.

**The demo digits.** The demo's images are scikit-learn's 8x8 digits, upsampled to 16x16, shown as 64x64 (each
16x16 pixel a 4x4 block); the demo VAE averages 4x4 blocks and packs 2x2, so a latent is the 16x16 grey digit
itself ([4, 8, 8], latent scale 1). The strengths above are the node's defaults, not tuned to the demo; on these
images they are strong: the smallest shift (1 pixel of 64) is a quarter of a 16x16 pixel, the largest (3 pixels)
three quarters, i.e. three eighths of a pixel of the original 8x8 digit, and a 5-15 % crop enlarges a stroke by
3-8 %. Mirror images are **left out** of the demo's calibration (`flip` off): a mirrored 2, 3, 4, 7 or 9 is another
glyph, not a copy; the last row measures what counting them would do. Saturation and hue leave grey images as they
are, so colour here is brightness and contrast only.

## Results

| case | protected | variants | near-copies | distinct images | suggested r | near-copies inside r | distinct inside r | balanced r (missed / caught) |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Cases: *example* is the protected-set example's 24 digits (all of them 1s, `input/spell_protected_digits/`, loaded
with ComfyUI's LoadImage); *mixed* is 20 training digits per class (SPELL Demo Digit Examples); *held-out* are the
360 test digits of the demo's split (all classes), never in either protected set.

**Target (issue 12): the suggested r covers >= 95 % of the near-copies and <= 5 % of distinct images.** Coverage
holds by construction in every case. With each image as it is (variants none), the false-positive side is
**missed in {missed} of {len(plain)} cases** on the demo: with the example's 24 ones the suggested r = {ex['radius']:.3g} also holds {share(ex['text'], 'distinct images inside r:')}
of the other protected ones, and {share(exh['text'], 'distinct images inside r:')} of the held-out digits (which hold
{ones} ones of {len(test_labels)}); the mixed set, which holds every class, catches
{share(mxh['text'], 'distinct images inside r:')} of the held-out digits. The reason is in the per-kind lines below: at
16x16 a sub-pixel shift or a small crop moves a digit a good part of the way (medians {median(ex, 'shift')} and
{median(ex, 'crop')}; 95 % of them lie within {needs(ex, 'shift')} and {needs(ex, 'crop')}) to where the nearest other
protected 1 lies (median {distinct_median(ex)}), or a held-out digit to the nearest protected digit of the mixed set
(median {distinct_median(mxh)}); jpeg ({median(ex, 'jpeg')}) and colour ({median(ex, 'colour')}) changes are an order
of magnitude smaller. In {inseparable} of {len(plain)} cases no radius meets both targets: at the balanced r both
error rates are above 5 % (last column). The report says OVERLAP instead of returning a number
that looks safe. With mirror images counted, the suggested r grows to {fl['radius']:.3g} and would hold
{share(fl['text'], 'distinct images inside r:')} of the held-out digits.

**With variants (the shield holds shifted and zoomed versions of each image).** SPELL Protected Set Loader's
`variants` input stores each protected image also shifted by -3, 0, +3 % of the side in each axis (whole pixels:
2 of 64 here) and zoomed 5 % about its centre (`spell_core/variants.py`; {exhv['n']} images x 18 = {exhv['n'] * 18}
references); the calibration, set the same way, measures each near-copy to the nearest version of its source and
each distinct image to the nearest version of any protected image. A shifted or cropped copy now lies close to the
version moved the same way, and only the rest of the change counts: the shift needs {needs(exv, 'shift')} instead of
{needs(ex, 'shift')}, the crop {needs(exv, 'crop')} instead of {needs(ex, 'crop')}, and colour ({needs(exv, 'colour')})
is now the largest. **The target is met in {len(vmet)} of {len(vcases)} cases with variants**
({', '.join(c['name'] for c in vmet)}): against the held-out digits the suggested r = {exhv['radius']:.3g} holds
{share(exhv['text'], 'near-copies inside r:')} of the near-copies and {share(exhv['text'], 'distinct images inside r:')}
of the held-out digits for the example's ones, and r = {mxhv['radius']:.3g} holds {share(mxhv['text'], 'near-copies inside r:')}
and {share(mxhv['text'], 'distinct images inside r:')} for the mixed set (without variants: {share(exh['text'], 'distinct images inside r:')} and {share(mxh['text'], 'distinct images inside r:')}). With
mirror images counted and mirrored versions in the shield (36 per image) it is r = {flv['radius']:.3g}, catching
{share(flv['text'], 'distinct images inside r:')} of the held-out digits.
{missed_text(vmissed, by)}

{blocks}

## How to choose r for a shield

A shield's r means "how close counts as a copy", in the model's latent space, and depends on the VAE, the size
and the images, so measure it: connect the protected images (or a sample of a few dozen) at the size you generate
at to **SPELL Shield Calibration**, with the model and VAE you sample with, and if you can, a few dozen images that
must *not* count as copies (other work in the same style) to `distinct_images`. Set `variants` to "shifts + zoom"
there and in SPELL Protected Set Loader (the shield then holds 18 shifted and zoomed versions of each image, and a
shifted or cropped copy is caught at a small r; "shifts + zoom + mirror" when mirror images count as copies). It
makes near-copies of each image (crops, shifts, mirror images, JPEG, colour changes; switch `flip` off for text,
digits and logos), and suggests the smallest r that holds 95 % of them; wire its `radius` output into SPELL Sparse
Repellency's radius. Read the report before trusting the number: it gives the share of distinct images that r would also push away, and per kind
how far the near-copies lie. When it says OVERLAP, no radius holds 95 % of the near-copies and at most 5 % of the
distinct images at that size; choose between the suggested r (catches copies, also repels some legitimate images) and the balanced r it
gives (equal error on both sides), or switch variants on. On the demo digits (16x16) it says OVERLAP with each
image as it is and separates the two with variants (above).
"""


def fp(case) -> float:
    """The share of distinct images inside the suggested r, in %."""
    return float(share(case["text"], "distinct images inside r:").rstrip("%"))


def missed_text(names, by) -> str:
    if not names:
        return ""
    parts = [f"{n} catches {share(by[n]['text'], 'distinct images inside r:')} of {by[n]['distinct'] or by[n]['n']} "
             f"({'other protected images' if by[n]['distinct'] is None else 'held-out digits'})" for n in names]
    return ("Missed with variants: " + "; ".join(parts) + ". The other protected images of the same class are "
            "other people's handwriting of the same digit; some lie as close to each other as a copy.")


def share(text: str, start: str) -> str:
    """The percentage a report line starting with start gives (e.g. "95.0%")."""
    return line(text, start).split(": ")[1].split(" of")[0]


def balanced_rates(text: str):
    """(share of near-copies missed, share of distinct images caught) at the balanced r, in %, or None."""
    for s in text.splitlines():
        if s.startswith("OVERLAP"):
            return float(s.split("misses ")[1].split("%")[0]), float(s.split("catches ")[1].split("%")[0])
    return None


def balance(text: str) -> str:
    rates = balanced_rates(text)
    if rates is None:
        return "no overlap"
    r = line(text, "OVERLAP").split("balance, r = ")[1].split(" ")[0]
    return f"{r} ({rates[0]:.1f} % / {rates[1]:.1f} %)"


def median(case, kind):
    s = line(case["text"], f"  {kind}:")
    return s.split("median ")[1].split(";")[0]


def needs(case, kind):
    return line(case["text"], f"  {kind}:").split("needs ")[1]


def distinct_median(case):
    return line(case["text"], "distinct distance").split("median ")[1]


if __name__ == "__main__":
    raise SystemExit(main())
