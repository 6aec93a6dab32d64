"""SpellReport: what the last SPELL run of a model did (read from the ``RunHistory`` handle that
``SpellRepellency`` puts in ``model_options["transformer_options"]["spell_history"]``)."""
from __future__ import annotations

from .common import SpellInputError
from .repellency import HISTORY_KEY


def describe(log, radius_note="") -> str:
    near = log.nearest_static
    lines = [
        f"batch {log.batch}; static references {log.n_static} (protected set + memory){radius_note}",
        f"model calls {len(log.steps)}; push active in {100 * log.active_share():.1f}% of (call, image) pairs",
        f"outputs moved by the final shield enforcement: {log.enforced}",
    ]
    if log.n_static:
        lines.append("nearest static reference (RMS): " + ", ".join(f"{d:.3f}" if d != float("inf") else
                                                                     "beyond 4r" for d in near))
    if log.batch > 1:
        lines.append("nearest other image of the batch (RMS): " + ", ".join(f"{d:.3f}" for d in log.nearest_batch))
    per_step = [f"σ={s.sigma:.3g}: {sum(a > 0 for a in s.active_pairs)}/{len(s.active_pairs)} pushed, "
                f"max ||Δ||/||x̂0−x_t|| {max(s.push_ratio):.3f}" for s in log.steps]
    return "\n".join(lines + per_step)


class SpellReport:
    NODE_ID = "SpellReport"
    DISPLAY_NAME = "SPELL Report"
    CATEGORY = "SPELL"
    DESCRIPTION = (
        "Shows what SPELL did in the last run of a patched model: references in play, how often the push was "
        "active per step, how close each output came to the nearest reference, how many outputs the shield "
        "enforcement moved. Connect the SPELL model and the sampler's output latent (so it runs after sampling)."
    )
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
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
        texts = []
        for n, history in enumerate(histories):
            log = history.latest()
            if log is None:
                texts.append(f"SPELL patch {n + 1}: no sampling run yet")
                continue
            if log.batch != samples["samples"].shape[0]:
                texts.append(f"SPELL patch {n + 1}: its last run had batch {log.batch}, these samples "
                             f"{samples['samples'].shape[0]}: not from this model")
                continue
            texts.append(f"SPELL patch {n + 1}:\n" + describe(log))
        text = "\n\n".join(texts)
        return {"ui": {"text": [text]}, "result": (text,)}


NODES = [SpellReport]
