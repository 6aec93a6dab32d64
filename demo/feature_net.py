"""A second, independent digit network whose features the feature-space SPELL push uses on the demo
(``spell_core.feature_push``; issue 12, item 4). Plain torch, no ComfyUI import.

The demo's stand-in for the CLIP vision model a ComfyUI user would hand the push: a semantic network trained on
its own, never the benchmark's judge. The judge (``demo.evaluator.DigitEvaluator``: ReLU, max pooling, 64
features, trained with held-out accuracy reported) scores the benchmark, and a push that climbed the judge's own
features would grade itself. So this network differs in what can differ cheaply: architecture (strided
convolutions and global average pooling instead of max pooling, SiLU instead of ReLU, widths 24/48/64,
32 features), seed, and data seen (the training split only; the held-out split that the judge's real reference
set comes from is never loaded). A classifier rather than an autoencoder: an autoencoder's code mostly keeps pixel
layout, which latent L2 already measures, while the point of the feature space is class-level similarity.
Smooth activations and no clamp of the input keep the Jacobian informative for the Gauss–Newton step (the
judge clamps images to [-1, 1], which zeroes the gradient of every pixel outside).

Input: grey images [B, 1, 16, 16] (nominally in [-1, 1]; ``demo.data.latents_to_images16`` of demo latents).
``features`` gives [B, FEATURES]; ``latent_features(net)`` is the map φ on demo latents [B, 4, 8, 8] (the demo's
model space: ``ToyLatent`` has scale 1, so model space and latents coincide). Trained by
``python -m demo.train_feature_net``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from .data import latents_to_images16

WEIGHTS = Path(__file__).resolve().parent / "weights" / "demo_feature_net.safetensors"
META_KEY = "spell_demo_feature_net"
FEATURES = 32


class DigitFeatureNet(nn.Module):
    """conv(24) -> conv(48, stride 2) -> conv(64, stride 2) -> global average pool -> linear(FEATURES) ->
    linear(10), SiLU throughout, on 16x16 grey images."""

    def __init__(self, features: int = FEATURES, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 24, 3, padding=1), nn.SiLU(),
            nn.Conv2d(24, 48, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(48, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, features), nn.SiLU(),
        )
        self.head = nn.Linear(features, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [B, FEATURES] of images [B, 1, 16, 16] (differentiable, no clamp)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, 10]."""
        return self.head(self.features(x))


def latent_features(net: DigitFeatureNet):
    """φ for ``SpellRun(features=...)`` on the demo: latents [B, 4, 8, 8] -> features [B, FEATURES]."""

    def phi(z: torch.Tensor) -> torch.Tensor:
        return net.features(latents_to_images16(z))

    return phi


def load_feature_net(path: str | Path = WEIGHTS) -> DigitFeatureNet:
    """The trained feature network in eval mode, on CPU, parameters frozen."""
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no feature network weights at {path}; run `python -m demo.train_feature_net`")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    net = DigitFeatureNet(features=meta["features"])
    net.load_state_dict(load_file(str(path)))
    net.requires_grad_(False)
    return net.eval()
