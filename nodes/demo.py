"""SpellDemoModelLoader and SpellDemoClassPrompt: the pack's embedded demo model, so every SPELL node can be tried
without downloading a checkpoint. A toy class-conditional U-Net (ComfyUI's own UNetModel, EPS, 8x8x4 latents for
64x64 images) trained on scikit-learn's digits by ``python -m demo.train``; the weights ship in ``demo/weights``.
No sampling hook: the model goes into any KSampler like a checkpoint's MODEL.

On import, a fresh ComfyUI's input folder gets the protected digits the ``spell_protected_set`` example loads
(``input/spell_protected_digits/``, 24 PNGs), so every shipped template runs right after installing; a folder
of that name that is already there is never touched. Likewise models/loras gets the demo's fair LoRA
(``demo.DEMO_LORA``, trained by ``python -m demo.train_fair_lora``) that the ``spell_fair_lora`` example loads with
ComfyUI's stock LoraLoaderModelOnly; a file of that name already there is never replaced (a LoRA for another demo
model ships under another name).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import folder_paths

from ..demo.example_inputs import ensure_protected_digits
from ..demo import DEFAULT_WEIGHTS, DEMO_LORA
from ..demo.model import load_demo
from .common import SpellInputError

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "demo" / "weights"
PROMPT_CHOICES = [str(d) for d in range(10)] + ["any digit", "(empty)"]


def fill_example_inputs() -> None:
    try:
        written = ensure_protected_digits(folder_paths.get_input_directory())
    except OSError as e:
        logging.warning("SPELL: could not write the example workflows' protected digits into ComfyUI's input "
                        "folder (%s); the spell_protected_set template needs input/spell_protected_digits/.", e)
        return
    if written is not None:
        logging.info("SPELL: wrote the example workflows' protected digits to %s", written)


def fill_demo_lora() -> None:
    source = WEIGHTS_DIR / "demo_fair_digits.safetensors"
    try:
        target = Path(folder_paths.get_folder_paths("loras")[0], DEMO_LORA)
        if source.is_file() and not (target.exists() or target.is_symlink()):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            logging.info("SPELL: wrote the demo's fair LoRA to %s", target)
    except OSError as e:
        logging.warning("SPELL: could not write the demo's fair LoRA into models/loras (%s); the spell_fair_lora "
                        "template needs models/loras/%s.", e, DEMO_LORA)


fill_example_inputs()
fill_demo_lora()


def weight_files() -> list[str]:
    """Demo model files shipped in demo/weights (the evaluator's weights excluded), default first."""
    found = sorted(p.name for p in WEIGHTS_DIR.glob("demo_model*.safetensors"))
    return [DEFAULT_WEIGHTS] + [f for f in found if f != DEFAULT_WEIGHTS]


class SpellDemoModelLoader:
    NODE_ID = "SpellDemoModelLoader"
    DISPLAY_NAME = "SPELL Demo Model Loader"
    CATEGORY = "SPELL/demo"
    DESCRIPTION = (
        "Loads the pack's tiny demo model (a class-conditional digit generator trained on scikit-learn's digits): "
        "MODEL for any KSampler, a VAE for VAE Decode/Encode (64x64 images), and the prompt table for SPELL Demo "
        "Class Prompt. Use an Empty Latent Image of 64x64; sampling takes well under a second per image on CPU."
    )
    RETURN_TYPES = ("MODEL", "VAE", "SPELL_DEMO_PROMPTS")
    RETURN_NAMES = ("model", "vae", "prompts")
    OUTPUT_TOOLTIPS = (
        "The demo U-Net (EPS prediction, ComfyUI's default discrete schedule). Euler, 20 steps, CFG 3-5 work well.",
        "The demo VAE: 64x64 grey images <-> [4, 8, 8] latents.",
        "The learned prompt table; connect to SPELL Demo Class Prompt.",
    )
    FUNCTION = "load"
    SEARCH_ALIASES = ["SPELL", "demo", "digits", "toy model"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {
            "weights": (weight_files(), {"default": DEFAULT_WEIGHTS, "tooltip":
                f"Which demo weights in the pack's demo/weights folder: {DEFAULT_WEIGHTS} is the default (retrain it "
                "with `python -m demo.train`); demo_model.safetensors, the same recipe trained a third as long, "
                "draws rougher digits."}),
        }}

    def load(self, weights=DEFAULT_WEIGHTS):
        return load_demo(WEIGHTS_DIR / Path(weights).name)


class SpellDemoClassPrompt:
    NODE_ID = "SpellDemoClassPrompt"
    DISPLAY_NAME = "SPELL Demo Class Prompt"
    CATEGORY = "SPELL/demo"
    DESCRIPTION = (
        "The demo model's 'text encoder': turns a digit class into CONDITIONING. Use a digit or 'any digit' as "
        "positive and '(empty)' as negative. 'any digit' was trained on a deliberately biased mix (mostly 1s and "
        "7s), a mode collapse for SPELL to spread out."
    )
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Conditioning for KSampler's positive or negative input.",)
    FUNCTION = "encode"
    SEARCH_ALIASES = ["SPELL", "demo", "digit prompt"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prompts": ("SPELL_DEMO_PROMPTS", {"tooltip": "The prompt table from SPELL Demo Model Loader."}),
            "prompt": (PROMPT_CHOICES, {"default": "any digit", "tooltip":
                "'0'-'9': that digit. 'any digit': a digit drawn from the biased training mix (stored in the "
                "weights' metadata; the shipped one favours 1s and 7s). '(empty)': the unconditional "
                "prompt, for the negative input."}),
        }}

    def encode(self, prompts, prompt):
        if prompt not in prompts.names:
            raise SpellInputError(self.NODE_ID, f"prompt {prompt!r} is not in this prompt table; choose one of "
                                  f"{prompts.names}.")
        return (prompts.conditioning(prompt),)


NODES = [SpellDemoModelLoader, SpellDemoClassPrompt]
