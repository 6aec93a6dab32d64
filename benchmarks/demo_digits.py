"""Realistic reference sets on the demo model: augmentations of the demo's digits, as its VAE encodes them.

Random rotation ±12°, scale ±10 %, shift ±1.2 px, contrast 0.85-1.15 and pixel noise 0.03 of the sklearn digits
(16×16 grey, as the demo uses them), encoded to [4, 8, 8] latents (``demo.data.images16_to_latents``, what
``PixelShuffleVAE.encode`` computes): real digit structure with near-duplicates, as a training-set shield holds.
References come from the training split; queries ("new images of the same distribution") from the held-out split.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SHAPE = (4, 8, 8)


def augment(images01: torch.Tensor, m: int, g: torch.Generator) -> torch.Tensor:
    """m random augmentations of images01 [K, 1, 16, 16] (0..1, background 0) -> latents [m, 4, 8, 8]."""
    from demo.data import images16_to_latents

    idx = torch.randint(len(images01), (m,), generator=g)
    ang = (torch.rand(m, generator=g) * 2 - 1) * math.radians(12)
    sc = 1 + (torch.rand(m, generator=g) * 2 - 1) * 0.1
    shift = (torch.rand(2, m, generator=g) * 2 - 1) * 0.15  # of the half-width: ±1.2 px
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, shift[0]], 1), torch.stack([sin, cos, shift[1]], 1)], 1)
    grid = F.affine_grid(theta, (m, 1, 16, 16), align_corners=False)
    img = F.grid_sample(images01[idx], grid, align_corners=False, padding_mode="zeros")
    img = img * (0.85 + 0.3 * torch.rand(m, 1, 1, 1, generator=g))
    img = img + 0.03 * torch.randn(img.shape, generator=g)
    return images16_to_latents(img.clamp(0, 1) * 2 - 1)


def split01(split: str) -> torch.Tensor:
    from demo.data import digits_split

    return (digits_split()[split][0] + 1) / 2


class DemoDigits:
    """n augmented training digits as a resumable ``build_shards`` source, and fresh held-out queries."""

    shape = SHAPE

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed

    def source(self, block: int):
        train = split01("train")

        def gen(start: int):
            assert start % block == 0, "resume at a block boundary (shard size a multiple of the block)"
            for a in range(start, self.n, block):
                yield augment(train, min(block, self.n - a), torch.Generator().manual_seed(self.seed * 1_000_003 + a))
        return gen

    def queries(self, m: int, seed: int) -> torch.Tensor:
        return augment(split01("test"), m, torch.Generator().manual_seed(10_007 + seed))
