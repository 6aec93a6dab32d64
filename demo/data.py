"""The demo data: scikit-learn's ``load_digits`` (1797 8x8 images, values 0..16) as 16x16 grey images in [-1, 1]
and as the [4, 8, 8] latents that ``demo.model.PixelShuffleVAE`` gives for them. Plain torch, no ComfyUI import.

The split is fixed: ``train_test_split(test_size=0.2, stratify=labels, random_state=SPLIT_SEED)``, so every
script (model training, evaluator training, checks) holds out the same 360 images. The split ships in
``weights/demo_digits.safetensors`` (115 kB, written by ``python -m demo.data`` from scikit-learn), so the demo
nodes need no scikit-learn in a user's ComfyUI; tests/core/test_demo_data.py checks it against scikit-learn.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SPLIT_SEED = 0
HELD_OUT = 0.2
CLASS_NAMES = tuple(str(d) for d in range(10))
DIGITS_FILE = Path(__file__).resolve().parent / "weights" / "demo_digits.safetensors"


def digits_split() -> dict:
    """Held-out split of load_digits as {"train": (images16, labels), "test": (images16, labels)}."""
    from safetensors.torch import load_file

    stored = load_file(str(DIGITS_FILE))
    return {part: (to_images16(stored[f"{part}_images"].numpy().astype(np.float32)), stored[f"{part}_labels"].long())
            for part in ("train", "test")}


def sklearn_split() -> dict:
    """The split as scikit-learn makes it: {"train_images", "train_labels", "test_images", "test_labels"} (uint8)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.images, digits.target, test_size=HELD_OUT, stratify=digits.target, random_state=SPLIT_SEED)
    return {name: torch.as_tensor(np.asarray(a).astype(np.uint8)) for name, a in
            (("train_images", x_tr), ("train_labels", y_tr), ("test_images", x_te), ("test_labels", y_te))}


def to_images16(digits8: np.ndarray) -> torch.Tensor:
    """load_digits images [N, 8, 8] in 0..16 -> grey images [N, 1, 16, 16] in [-1, 1] (bilinear upsampling)."""
    x = torch.as_tensor(digits8, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    return x.clamp(0, 1) * 2 - 1


def images16_to_latents(images16: torch.Tensor) -> torch.Tensor:
    """Grey images [N, 1, 16, 16] in [-1, 1] -> latents [N, 4, 8, 8], as PixelShuffleVAE.encode does."""
    return F.pixel_unshuffle(images16, 2)


def latents_to_images16(latents: torch.Tensor) -> torch.Tensor:
    """Latents [N, 4, 8, 8] -> grey images [N, 1, 16, 16] (inverse of images16_to_latents, no clamping)."""
    return F.pixel_shuffle(latents, 2)


def rgb_to_images16(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [N, 64, 64, 3] in 0..1 -> grey images [N, 1, 16, 16] in [-1, 1] (4x4 average pool)."""
    grey = images[..., :3].float().mean(-1)[:, None]
    return F.avg_pool2d(grey, images.shape[1] // 16) * 2 - 1


if __name__ == "__main__":
    from safetensors.torch import save_file

    save_file(sklearn_split(), str(DIGITS_FILE), metadata={"source": "sklearn.datasets.load_digits, train_test_split("
                                                           f"test_size={HELD_OUT}, stratify, random_state={SPLIT_SEED})"})
    print(f"wrote {DIGITS_FILE}")
