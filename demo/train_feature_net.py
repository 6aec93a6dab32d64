"""Trains the demo feature network (``demo.feature_net.DigitFeatureNet``) on the training split of ``demo.data``
only; the held-out split (the benchmark judge's real set) is never loaded. Seeded; seconds on 2 CPU cores.

    python -m demo.train_feature_net      # writes demo/weights/demo_feature_net.safetensors
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: 2 threads stay fast on a busy CPU
import torch  # noqa: E402

from .data import SPLIT_SEED, digits_split  # noqa: E402
from .feature_net import FEATURES, META_KEY, WEIGHTS, DigitFeatureNet  # noqa: E402
from .train_evaluator import fit  # noqa: E402  (the same loop and augmentation: one-pixel shifts, light noise)

SEED = 1  # the evaluator uses 0
EPOCHS = 40
BATCH = 64
LR = 3e-3


@torch.no_grad()
def accuracy(net: DigitFeatureNet, x: torch.Tensor, y: torch.Tensor) -> float:
    return (net(x).argmax(-1) == y).float().mean().item()


def main() -> None:
    """Trains, reports training accuracy, saves the weights with their metadata."""
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    x_tr, y_tr = digits_split()["train"]
    net = DigitFeatureNet()
    secs = fit(net, x_tr, y_tr, g, EPOCHS, LR, BATCH, lambda n: f"train acc {accuracy(n, x_tr, y_tr):.4f}")
    acc = accuracy(net, x_tr, y_tr)
    meta = dict(features=FEATURES, input="grey images [B,1,16,16] in [-1,1]", seed=SEED, split_seed=SPLIT_SEED,
                epochs=EPOCHS, train_size=len(x_tr), data="training split only", train_accuracy=round(acc, 4),
                train_seconds=round(secs, 1))
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(WEIGHTS),
              metadata={META_KEY: json.dumps(meta)})
    print(f"training accuracy {acc:.4f} ({len(x_tr)} images); {secs:.0f}s; saved {WEIGHTS}")


if __name__ == "__main__":
    main()
