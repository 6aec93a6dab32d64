"""The pack's embedded demo: a toy model family built on ComfyUI's own U-Net class."""

# The demo model file in demo/weights that SPELL Demo Model Loader loads by default (``demo.model.DEMO_WEIGHTS``):
# the shipped recipe trained 6000 steps. demo_model.safetensors, the same recipe at 2000 steps, was the default
# before; it stays for saved workflows that name it (docs/demo_model_quality.md compares the two).
DEFAULT_WEIGHTS = "demo_model_6000.safetensors"
# The name under which the pack copies demo/weights/demo_fair_digits.safetensors (the demo's fair LoRA, trained on
# DEFAULT_WEIGHTS) into models/loras for the spell_fair_lora example; a file of that name already there is never
# replaced, so a new LoRA gets a new name: spell_demo_fair_digits.safetensors was the one for demo_model.safetensors,
# spell_demo_fair_digits_6000.safetensors the paper-method LoRA for DEFAULT_WEIGHTS (stop 32), this one is made by
# the resampled method (stop 33, docs/fairness_finetune.md).
DEMO_LORA = "spell_demo_fair_digits_6000_resampled.safetensors"
