"""What the example workflows expect in ComfyUI's input folder: a folder of protected digit images (24 training
images of the digit 1, as 64x64 PNGs). Plain torch and Pillow, no ComfyUI import."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .data import digits_split

PROTECTED_FOLDER = "spell_protected_digits"
PROTECTED_CLASS = 1  # the class the "any digit" prompt favours most, so the shield has work to do
PROTECTED_COUNT = 24


def write_protected_digits(input_dir: str | Path) -> Path:
    """Writes the first PROTECTED_COUNT training images of PROTECTED_CLASS as 64x64 PNGs; returns the folder."""
    folder = Path(input_dir) / PROTECTED_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = digits_split()["train"]
    picked = images[labels == PROTECTED_CLASS][:PROTECTED_COUNT]
    for n, img in enumerate(picked):
        grey = ((img[0].numpy() + 1) / 2 * 255).round().astype(np.uint8)
        Image.fromarray(grey).resize((64, 64), Image.Resampling.NEAREST).convert("RGB").save(folder / f"{n:03d}.png")
    return folder


def ensure_protected_digits(input_dir: str | Path) -> Path | None:
    """Writes the folder when it is not there yet (a fresh install); an existing folder is never touched.
    Returns the folder written, or None."""
    folder = Path(input_dir) / PROTECTED_FOLDER
    if folder.exists() or folder.is_symlink():
        return None
    return write_protected_digits(input_dir)
