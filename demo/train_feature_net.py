"""Trains the demo feature network (``demo.feature_net.DigitFeatureNet``) on the training split of ``demo.data``
only; the held-out split (the benchmark judge's real set) is never loaded. Seeded; seconds on 2 CPU cores.

    python -m demo.train_feature_net      # writes demo/weights/demo_feature_net.safetensors
"""
from __future__ import annotations

import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: 2 threads stay fast on a busy CPU
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from .data import SPLIT_SEED, digits_split  # noqa: E402
from .feature_net import FEATURES, META_KEY, WEIGHTS, DigitFeatureNet  # noqa: E402
from .train_evaluator import augment  # noqa: E402  (the same augmentation: shifts by one pixel, light noise)

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
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=EPOCHS * -(-len(x_tr) // BATCH))
    t0 = time.time()
    for epoch in range(EPOCHS):
        net.train()
        total = 0.0
        for idx in torch.randperm(len(x_tr), generator=g).split(BATCH):
            loss = F.cross_entropy(net(augment(x_tr[idx], g)), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        net.eval()
        print(f"epoch {epoch + 1:2d}/{EPOCHS}  loss {total / len(x_tr):.4f}  train acc "
              f"{accuracy(net, x_tr, y_tr):.4f}  {time.time() - t0:.0f}s", flush=True)
    acc, secs = accuracy(net, x_tr, y_tr), time.time() - t0
    meta = dict(features=FEATURES, input="grey images [B,1,16,16] in [-1,1]", seed=SEED, split_seed=SPLIT_SEED,
                epochs=EPOCHS, train_size=len(x_tr), data="training split only", train_accuracy=round(acc, 4),
                train_seconds=round(secs, 1))
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(WEIGHTS),
              metadata={META_KEY: json.dumps(meta)})
    print(f"training accuracy {acc:.4f} ({len(x_tr)} images); {secs:.0f}s; saved {WEIGHTS}")


if __name__ == "__main__":
    main()
