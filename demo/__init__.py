"""The pack's embedded demo: a toy model family built on ComfyUI's own U-Net class."""
