"""The pack's embedded demo: a toy model family built on ComfyUI's own U-Net class."""

# The demo model file in demo/weights that SPELL Demo Model Loader loads by default (``demo.model.DEMO_WEIGHTS``):
# the shipped recipe trained 6000 steps. demo_model.safetensors, the same recipe at 2000 steps, was the default
# before; it stays for saved workflows that name it (docs/demo_model_quality.md compares the two).
DEFAULT_WEIGHTS = "demo_model_6000.safetensors"
