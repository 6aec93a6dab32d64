"""A small CNN digit classifier used to score demo samples (class accuracy, class mix, Fréchet distance,
precision/recall). Plain torch, no ComfyUI import.

Input: grey images [B, 1, 16, 16] in [-1, 1] (``demo.data.latents_to_images16`` turns demo latents into them,
``demo.data.rgb_to_images16`` turns decoded ComfyUI IMAGEs into them). ``features`` gives the penultimate layer
[B, FEATURES]; ``predict`` gives class probabilities [B, 10]. Trained by ``python -m demo.train_evaluator``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

WEIGHTS = Path(__file__).resolve().parent / "weights" / "demo_evaluator.safetensors"
FEATURES = 64


class DigitEvaluator(nn.Module):
    """conv(32)x2 -> pool -> conv(64)x2 -> pool -> linear(FEATURES) -> linear(10), on 16x16 grey images."""

    def __init__(self, features: int = FEATURES, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, features), nn.ReLU(),
        )
        self.head = nn.Linear(features, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [B, FEATURES] of images [B, 1, 16, 16] in [-1, 1]."""
        return self.body(x.clamp(-1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, 10] of images [B, 1, 16, 16] in [-1, 1]."""
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities [B, 10] of images [B, 1, 16, 16] in [-1, 1]."""
        return self.forward(x).softmax(-1)


def load_evaluator(path: str | Path = WEIGHTS) -> DigitEvaluator:
    """The trained evaluator in eval mode, on CPU."""
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no evaluator weights at {path}; run `python -m demo.train_evaluator`")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["spell_demo_evaluator"])
    net = DigitEvaluator(features=meta["features"])
    net.load_state_dict(load_file(str(path)))
    return net.eval()
