"""SpellReport: what the last SPELL run of a model did (read from the ``RunHistory`` handle that
``SpellRepellency`` puts in ``model_options["transformer_options"]["spell_history"]``), as text and as a chart
(``spell_core/charts.py``) for Preview Image."""
from __future__ import annotations

import numpy as np
import torch

from ..spell_core import charts
from ..spell_core.run import NEAREST_CAP
from .common import SpellInputError
from .repellency import HISTORY_KEY


def describe(log, radius_note="") -> str:
    near = log.nearest_static
    lines = [
        f"batch {log.batch}; r = {log.r:.3g}; static references {log.n_static} (protected set + memory){radius_note}",
        f"model calls {len(log.steps)}; push active in {100 * log.active_share():.1f}% of (call, image) pairs",
        f"outputs moved by the final shield enforcement: {log.enforced}",
    ]
    if adaptive_batch_radius(log) is not None:
        on = [s for s in log.steps if s.batch_r == s.batch_r]  # NaN: the in-batch push was off at that call
        until = "" if len(on) == len(log.steps) else f" (in-batch push in {len(on)} of {len(log.steps)} calls, down to σ = {on[-1].sigma:.3g})"
        lines.append(f"in-batch radius (adaptive): {on[0].batch_r:.3g} at the first model call, {on[-1].batch_r:.3g} at "
                     f"the last{until}")
    if log.n_static:
        lines.append("nearest static reference (RMS): " + ", ".join(f"{d:.3f}" if d != float("inf") else
                                                                     "beyond 4r" for d in near))
    if log.batch > 1:
        lines.append("nearest other image of the batch (RMS): " + ", ".join(f"{d:.3f}" for d in log.nearest_batch))
    per_step = [f"σ={s.sigma:.3g}: {sum(a > 0 for a in s.active_pairs)}/{len(s.active_pairs)} pushed, "
                f"max ||Δ||/||x̂0−x_t|| {max(s.push_ratio):.3f}" for s in log.steps]
    return "\n".join(lines + per_step)


def chart(log, title="SPELL Report") -> np.ndarray:
    """The log as a picture (``charts.spell_report_chart``), [H, W, 3] uint8."""
    subtitle = (f"batch {log.batch}, {log.n_static} static references; push active in {100 * log.active_share():.1f}% "
                f"of (call, image) pairs; shield enforcement moved {log.enforced}")
    return charts.spell_report_chart(log.r, log.nearest_static if log.n_static else [],
                                     log.nearest_batch if log.batch > 1 else [], [s.sigma for s in log.steps],
                                     log.pushed_per_step(), log.max_push_per_step(), log.batch, title=title,
                                     subtitle=subtitle, cap=NEAREST_CAP, batch_r=adaptive_batch_radius(log))


def adaptive_batch_radius(log):
    """The in-batch radius at the last logged model call when it adapted (differs from r), else None."""
    radii = [s.batch_r for s in log.steps if s.batch_r == s.batch_r]  # NaN: in-batch repellency off
    return radii[-1] if radii and any(b != log.r for b in radii) else None


def image_batch(pictures) -> torch.Tensor:
    """[H, W, 3] uint8 pictures -> a ComfyUI IMAGE [N, H, W, 3] float32 in 0..1."""
    return torch.from_numpy(np.stack([charts.to_unit(p) for p in pictures]))


class SpellReport:
    NODE_ID = "SpellReport"
    DISPLAY_NAME = "SPELL Report"
    CATEGORY = "SPELL"
    DESCRIPTION = (
        "Shows what SPELL did in the last run of a patched model: references in play, how often the push was "
        "active per step, how close each output came to the nearest reference, how many outputs the shield "
        "enforcement moved. Connect the SPELL model and the sampler's output latent (so it runs after sampling). "
        "The chart output shows the same as a picture: connect it to Preview Image."
    )
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "chart")
    OUTPUT_TOOLTIPS = ("The report as text (also shown on the node).",
                       "The report as a picture (768x512, one per SPELL patch): per output, the RMS distance to "
                       "the nearest static reference and to the nearest other image of the batch against r; per "
                       "model call, how many images were pushed and how hard. Connect it to Preview Image.")
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model from SPELL Sparse Repellency that the sampler used."}),
            "samples": ("LATENT", {"tooltip": "The sampler's output; it orders this node after sampling."}),
        }}

    def report(self, model, samples):
        histories = model.model_options.get("transformer_options", {}).get(HISTORY_KEY, [])
        if not histories:
            raise SpellInputError(self.NODE_ID, "this model has no SPELL patch; connect the MODEL output of SPELL Sparse Repellency.")
        texts, pictures = [], []
        for n, history in enumerate(histories):
            log = history.latest()
            title = "SPELL Report" + (f" (patch {n + 1} of {len(histories)})" if len(histories) > 1 else "")
            if log is None:
                texts.append(f"SPELL patch {n + 1}: no sampling run yet")
            elif log.batch != samples["samples"].shape[0]:
                texts.append(f"SPELL patch {n + 1}: its last run had batch {log.batch}, these samples "
                             f"{samples['samples'].shape[0]}: not from this model")
            else:
                texts.append(f"SPELL patch {n + 1}:\n" + describe(log))
                pictures.append(chart(log, title))
                continue
            pictures.append(charts.message_chart(title, texts[-1].split(": ", 1)[1]))
        text = "\n\n".join(texts)
        return {"ui": {"text": [text]}, "result": (text, image_batch(pictures))}


NODES = [SpellReport]
