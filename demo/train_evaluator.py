"""Trains the demo evaluator (``demo.evaluator.DigitEvaluator``) on the training split of ``demo.data`` and
reports its accuracy on the held-out split. Seeded; about a minute on 2 CPU cores.

    python -m demo.train_evaluator      # writes demo/weights/demo_evaluator.safetensors
"""
from __future__ import annotations

import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: 2 threads stay fast on a busy CPU
import torch  # noqa: E402
import torch.nn.functional as F

from .data import SPLIT_SEED, digits_split
from .evaluator import FEATURES, WEIGHTS, DigitEvaluator

SEED = 0
EPOCHS = 30
BATCH = 64
LR = 2e-3
MAX_SHIFT = 1  # random translation in 16x16 pixels (augmentation)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to MAX_SHIFT pixels (background-padded) and light Gaussian noise."""
    pad = F.pad(x, [MAX_SHIFT] * 4, value=-1.0)
    out = torch.empty_like(x)
    dx, dy = torch.randint(0, 2 * MAX_SHIFT + 1, (2, x.shape[0]), generator=g).tolist()
    for i in range(x.shape[0]):
        out[i] = pad[i, :, dy[i]:dy[i] + 16, dx[i]:dx[i] + 16]
    return (out + 0.05 * torch.randn(out.shape, generator=g)).clamp(-1, 1)


@torch.no_grad()
def accuracy(net: DigitEvaluator, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of images whose most probable class is the label."""
    return (net.predict(x).argmax(-1) == y).float().mean().item()


def fit(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator, epochs: int, lr: float,
        batch: int, report) -> float:
    """Cross-entropy on augmented batches (AdamW, one-cycle schedule), seeded by g; after each epoch prints the
    loss and report(net) (e.g. an accuracy). Returns the seconds taken. Shared by the demo's classifiers."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * -(-len(x) // batch))
    t0 = time.time()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x), generator=g)
        total = 0.0
        for idx in order.split(batch):
            loss = F.cross_entropy(net(augment(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        net.eval()
        print(f"epoch {epoch + 1:2d}/{epochs}  loss {total / len(x):.4f}  {report(net)}  {time.time() - t0:.0f}s",
              flush=True)
    return time.time() - t0


def main() -> None:
    """Trains, reports held-out accuracy, saves the weights with their metadata."""
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    split = digits_split()
    x_tr, y_tr = split["train"]
    x_te, y_te = split["test"]
    net = DigitEvaluator()
    secs = fit(net, x_tr, y_tr, g, EPOCHS, LR, BATCH, lambda n: f"held-out acc {accuracy(n, x_te, y_te):.4f}")
    acc = accuracy(net, x_te, y_te)
    meta = dict(features=FEATURES, input="grey images [B,1,16,16] in [-1,1]", seed=SEED, split_seed=SPLIT_SEED,
                epochs=EPOCHS, train_size=len(x_tr), held_out_size=len(x_te), held_out_accuracy=round(acc, 4))
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(WEIGHTS), metadata={"spell_demo_evaluator": json.dumps(meta)})
    print(f"held-out accuracy {acc:.4f} ({len(x_te)} images); {secs:.0f}s; saved {WEIGHTS}")


if __name__ == "__main__":
    main()
