"""The demo data: scikit-learn's ``load_digits`` (1797 8x8 images, values 0..16) as 16x16 grey images in [-1, 1]
and as the [4, 8, 8] latents that ``demo.model.PixelShuffleVAE`` gives for them. Plain torch, no ComfyUI import.

The split is fixed: ``train_test_split(test_size=0.2, stratify=labels, random_state=SPLIT_SEED)``, so every
script (model training, evaluator training, checks) holds out the same 360 images.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SPLIT_SEED = 0
HELD_OUT = 0.2
CLASS_NAMES = tuple(str(d) for d in range(10))


def digits_split() -> dict:
    """Held-out split of load_digits as {"train": (images16, labels), "test": (images16, labels)}."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.images.astype(np.float32), digits.target, test_size=HELD_OUT, stratify=digits.target,
        random_state=SPLIT_SEED)
    return {"train": (to_images16(x_tr), torch.as_tensor(y_tr)), "test": (to_images16(x_te), torch.as_tensor(y_te))}


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
