"""Fair generation: steering a batch toward a target attribute distribution in U-Net h-space.

Two losses on timestep-aware attribute heads over the middle-block features h:
- batch mean: Distribution Guidance ("Balancing Act", Parihar et al., CVPR 2024, arXiv 2404.04253):
  p̂ = mean_i softmax(head(h_i) / T); L = Σ_k (p̂_k − q_k)² / q_k (chi-square) or KL(p̂ ‖ q).
- per-image assignment: distributional alignment (Shen et al., ICLR 2024, arXiv 2311.07604): the batch's target
  labels (whole seats per class, ``batch_counts``) are assigned to the images by an exact assignment on their
  predicted class probabilities (a sort for two classes); L = (1/B) Σ_i CE(head(h_i), y_i).
- per-image draw: plain classifier guidance toward one label per image drawn i.i.d. from the target (baseline).

The update is h ← h − η ∇_h L, differentiating only the heads. The assignment always works on a whole batch
target (``batch_counts``: integer seats per class, ties broken by the run's seed, so that over many runs every
class gets its share): from an empty count for a single run, or from a running class count over earlier runs,
where it brings the cumulative distribution closest to the target.
Plain torch/numpy/scipy; never imports ComfyUI.
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .locking import file_lock, file_stamp
from .storage import atomic_save, atomic_write_json, read_safetensors, remove_stale_temporaries

LOSSES = ("batch mean", "per-image assignment", "per-image draw")
DIVERGENCES = ("chi-square", "KL")
HEADS_FORMAT = "spell-attribute-heads/1"
COUNT_FORMAT = "spell-fairness-count/1"
TARGET_TOLERANCE = 1e-3
_TOKEN = re.compile(r"^\s*(?P<name>[^:]+?)\s*:\s*(?P<share>\S+)\s*$")


# ---------------------------------------------------------------------------------------------------------------
# Target distributions and running counts
# ---------------------------------------------------------------------------------------------------------------

def parse_target(text: str, classes: list[str] | tuple[str, ...]) -> torch.Tensor:
    """"young: 0.75, old: 0.25" -> shares [K] in the order of classes. Classes left out get share 0.

    Raises ValueError quoting the bad token: unknown or repeated class, unparsable or negative share, shares
    not summing to 1 within 1e-3. Percent signs are read as percent ("young: 75%").
    """
    classes = [str(c) for c in classes]
    tokens = [t for t in re.split(r"[,;\n]", text) if t.strip()]
    if not tokens:
        raise ValueError(f"the target is empty; write shares like '{classes[0]}: 0.5, {classes[-1]}: 0.5'")
    p = [0.0] * len(classes)
    seen = set()
    for token in tokens:
        m = _TOKEN.match(token)
        if m is None:
            raise ValueError(f"cannot read {token.strip()!r}: write 'class: share', e.g. '{classes[0]}: 0.5'")
        name, raw = m.group("name"), m.group("share")
        if name not in classes:
            raise ValueError(f"unknown class {name!r} in {token.strip()!r}; the heads know {classes}")
        if name in seen:
            raise ValueError(f"class {name!r} appears twice ({token.strip()!r})")
        seen.add(name)
        try:
            share = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
        except ValueError:
            raise ValueError(f"share {raw!r} in {token.strip()!r} is not a number") from None
        if not math.isfinite(share) or share < 0:
            raise ValueError(f"share {raw!r} in {token.strip()!r} must be a finite number ≥ 0")
        p[classes.index(name)] = share
    total = sum(p)
    if abs(total - 1) > TARGET_TOLERANCE:
        raise ValueError(f"shares sum to {total:.4g}, they must sum to 1 (within {TARGET_TOLERANCE})")
    return torch.tensor(p, dtype=torch.float64) / total


def bias(freq: torch.Tensor) -> float:
    """Mean over class pairs of |freq_i − freq_j| (Shen et al.'s bias; 0 = balanced)."""
    f = torch.as_tensor(freq, dtype=torch.float64)
    k = f.numel()
    if k < 2:
        return 0.0
    return float((f[:, None] - f[None, :]).abs().sum() / (k * (k - 1)))


def batch_counts(counts: torch.Tensor, p: torch.Tensor, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Class counts b [K] (integers ≥ 0 summing to batch) that bring (counts + b) / (N + batch) closest to p in L2.

    Greedy seat-by-seat: each seat goes to the class with the largest deficit p_k (N + batch) − counts_k − b_k,
    which is optimal for this separable convex objective; ties are broken at random by generator.
    """
    c = torch.as_tensor(counts, dtype=torch.float64).clone()
    p = torch.as_tensor(p, dtype=torch.float64)
    total = float(c.sum()) + batch
    jitter = torch.rand(p.shape, generator=generator, dtype=torch.float64) * 1e-9
    b = torch.zeros_like(p)
    for _ in range(batch):
        deficit = p * total - c - b + jitter
        deficit[p <= 0] = -math.inf  # classes with target 0 never get a seat
        b[int(deficit.argmax())] += 1
    return b.long()


def stratified_labels(p: torch.Tensor, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw of batch target labels [batch]: floor(p·batch) of each class, the remaining seats drawn without
    replacement with probability ∝ the fractional parts (exactly p·batch when that is whole)."""
    p = torch.as_tensor(p, dtype=torch.float64)
    ideal = p * batch
    base = ideal.floor()
    rest = batch - int(base.sum())
    if rest > 0:
        frac = (ideal - base).clamp_min(0)
        extra = torch.multinomial(frac.float() + 1e-12, rest, replacement=False, generator=generator)
        base[extra] += 1
    return torch.repeat_interleave(torch.arange(p.numel()), base.long())


def carried_labels(p: torch.Tensor, batch: int, iteration: int) -> torch.Tensor:
    """The target labels [batch] of batch number ``iteration`` (0-based) when the fractional seats are carried over
    from batch to batch instead of drawn: batch n gives each class its deficit (n+1)·batch·p_k − (seats it had in
    batches 0..n−1), rounded down, and the seats left over to the largest remainders (ties to the lower class
    index). Deterministic, so every image's assigned label is certain (confidence 1); over n batches every class
    holds within one seat of n·batch·p_k. A pure function of the iteration (the earlier batches are replayed), so a
    resumed training draws what it would have. Equals ``stratified_labels`` whenever p·batch is whole."""
    p = torch.as_tensor(p, dtype=torch.float64)
    seats = torch.zeros_like(p)
    for n in range(iteration + 1):
        deficit = (n + 1) * batch * p - seats
        now = deficit.floor().clamp_min(0)
        rest = batch - int(now.sum())
        if rest > 0:
            order = torch.argsort(-(deficit - now), stable=True)
            now[order[:rest]] += 1
        elif rest < 0:  # only by rounding of p summing to 1 ± ε: take seats back from the smallest remainders
            order = torch.argsort(deficit - now, stable=True)
            order = order[now[order] > 0]
            now[order[:-rest]] -= 1
        seats += now
    return torch.repeat_interleave(torch.arange(p.numel()), now.long())


def assign(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Exact assignment of target labels [B] to images with class probabilities probs [B, K]: returns y [B] with
    y a permutation of labels minimising Σ_i ||p_i − onehot(y_i)||₂ (Shen et al.'s DAL). Two classes: a sort."""
    p = probs.detach().double().cpu()
    labels = labels.cpu()
    b, k = p.shape
    if k == 2:
        n1 = int((labels == 1).sum())
        order = torch.argsort(p[:, 1], descending=True, stable=True)
        y = torch.zeros(b, dtype=torch.long)
        y[order[:n1]] = 1
        return y
    from scipy.optimize import linear_sum_assignment

    onehot = F.one_hot(labels, k).double()
    cost = torch.cdist(p, onehot)  # [B images, B label slots]
    rows, cols = linear_sum_assignment(cost.numpy())
    y = torch.empty(b, dtype=torch.long)
    y[torch.as_tensor(rows)] = labels[torch.as_tensor(cols)]
    return y


# ---------------------------------------------------------------------------------------------------------------
# Losses (all on logits [B, K]; gradients reach h only through the heads)
# ---------------------------------------------------------------------------------------------------------------

def batch_mean_loss(logits: torch.Tensor, q: torch.Tensor, temperature: float = 8.0, divergence: str = "chi-square",
                    floor: float = 1e-2) -> torch.Tensor:
    """Distribution Guidance: p̂ = mean_i softmax(logits_i / T); chi-square Σ (p̂ − q)² / max(q, floor) or KL(p̂ ‖ q̃)
    with q̃ = q smoothed by floor (so classes with target 0 stay finite)."""
    q = q.to(logits)
    p_hat = (logits / temperature).softmax(-1).mean(0)
    if divergence == "chi-square":
        return ((p_hat - q) ** 2 / q.clamp_min(floor)).sum()
    if divergence == "KL":
        q_s = (q + floor) / (1 + floor * q.numel())
        return (p_hat * (p_hat.clamp_min(1e-12).log() - q_s.log())).sum()
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def assignment_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(1/B) Σ_i CE(logits_i, y_i) (Shen et al.'s L_align; their confidence threshold selects images whose labels
    agree over random draws, and with a whole batch target every draw is the same, so it is not needed here)."""
    return F.cross_entropy(logits, y.to(logits.device), reduction="mean")


# ---------------------------------------------------------------------------------------------------------------
# Attribute heads: one linear head per noise-level bucket on pooled, standardised h
# ---------------------------------------------------------------------------------------------------------------

def pool_features(h: torch.Tensor, grid: int) -> torch.Tensor:
    """h [B, C, H, W] -> [B, C·g·g], adaptive average pooling to a g x g grid (g = min(grid, H, W))."""
    g = max(1, min(grid, h.shape[-2], h.shape[-1]))
    return F.adaptive_avg_pool2d(h, g).flatten(1)


@dataclass
class AttributeHeads:
    """classes: K names; sigmas [S] bucket centres (descending); mean/std [S, F], weight [S, K, F], bias [S, K];
    grid: pooling grid; channels: h's channel count; accuracy [S]: held-out accuracy per bucket."""

    classes: list[str]
    sigmas: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    grid: int
    channels: int
    accuracy: list[float] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        s, k, f = self.weight.shape
        if len(self.classes) != k or self.sigmas.shape != (s,) or self.mean.shape != (s, f) or self.bias.shape != (s, k):
            raise ValueError("attribute heads: inconsistent shapes")
        if k < 2:
            raise ValueError("attribute heads need at least 2 classes")

    def bucket_weights(self, sigma: float) -> list[tuple[int, float]]:
        """[(bucket, weight)]: linear interpolation in log σ between the two nearest bucket centres."""
        ls = torch.log(self.sigmas.double().clamp_min(1e-6))
        x = math.log(max(float(sigma), 1e-6))
        if x >= ls[0]:
            return [(0, 1.0)]
        if x <= ls[-1]:
            return [(len(ls) - 1, 1.0)]
        j = int((ls > x).sum())  # ls[j-1] > x >= ls[j]
        w = float((ls[j - 1] - x) / (ls[j - 1] - ls[j]))
        return [(j - 1, 1 - w), (j, w)]

    def logits(self, h: torch.Tensor, sigma: float) -> torch.Tensor:
        """h [B, C, H, W] -> logits [B, K] at noise level sigma (float32, differentiable in h)."""
        if h.shape[1] != self.channels:
            raise ValueError(f"the heads were trained on {self.channels}-channel features, these have {h.shape[1]}")
        x = pool_features(h.float(), self.grid)
        out = 0
        for s, w in self.bucket_weights(sigma):
            mean, std, weight, bias_ = (_usable(t[s], x) for t in (self.mean, self.std, self.weight, self.bias))
            out = out + w * (((x - mean) / std) @ weight.T + bias_)
        return out

    def gradient_scale(self, sigma: float, h_shape: tuple) -> float:
        """G² = mean_k ||∂logit_k / ∂h||² per image, so that Δh = −η g / G² moves logits by about η ∂L/∂logit."""
        g = max(1, min(self.grid, h_shape[-2], h_shape[-1]))
        area = (h_shape[-2] / g) * (h_shape[-1] / g)
        total = 0.0
        for s, w in self.bucket_weights(sigma):
            total += w * float(((self.weight[s] / self.std[s]) ** 2).sum(1).mean()) / area
        return max(total, 1e-12)

    def state(self) -> dict:
        return {"sigmas": self.sigmas, "mean": self.mean, "std": self.std, "weight": self.weight, "bias": self.bias}

    def save(self, path: str | os.PathLike) -> None:
        """Atomic safetensors write; the class names and settings go into the metadata."""
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state().items()}
        header = {"format": HEADS_FORMAT, "classes": json.dumps(self.classes), "grid": str(self.grid),
                  "channels": str(self.channels), "accuracy": json.dumps(self.accuracy), "meta": json.dumps(self.meta)}
        atomic_save(tensors, path, header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AttributeHeads":
        """Reads a file written by save; ValueError naming the file when it is not one."""
        path = Path(path)
        tensors, header = read_safetensors(path)  # StorageError (a ValueError) naming the file
        if header.get("format") != HEADS_FORMAT or set(tensors) != {"sigmas", "mean", "std", "weight", "bias"}:
            raise ValueError(f"{path.name} is a safetensors file but not SPELL attribute heads")
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise ValueError(f"{path.name} holds NaN/Inf values")
        try:
            return cls(json.loads(header["classes"]), tensors["sigmas"], tensors["mean"], tensors["std"],
                       tensors["weight"], tensors["bias"], int(header["grid"]), int(header["channels"]),
                       json.loads(header.get("accuracy", "[]")), json.loads(header.get("meta", "{}")))
        except (KeyError, json.JSONDecodeError, ValueError) as e:
            raise ValueError(f"{path.name} has unreadable head metadata ({e})") from e

    def describe(self) -> str:
        lines = [f"{len(self.classes)} classes ({', '.join(self.classes)}); {len(self.sigmas)} noise-level heads on "
                 f"{self.channels}-channel h pooled to {self.grid}x{self.grid}"]
        if self.accuracy:
            lines.append("held-out accuracy per noise level:")
            lines += [f"  σ={float(s):8.3f}: {100 * a:5.1f}%" for s, a in zip(self.sigmas, self.accuracy)]
        return "\n".join(lines)


def _usable(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t on like's device and dtype; a copy if it was made under inference mode (autograd refuses those)."""
    t = t.to(device=like.device, dtype=like.dtype)
    return t.clone() if t.is_inference() and not torch.is_inference_mode_enabled() else t


def split_held_out(labels: torch.Tensor, held_out: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask [N] of held-out examples: held_out of each class (at least one when a class has ≥ 2)."""
    mask = torch.zeros(labels.numel(), dtype=torch.bool)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        n = int(round(held_out * idx.numel()))
        if held_out > 0 and idx.numel() >= 2:
            n = min(max(n, 1), idx.numel() - 1)
        mask[idx[:n]] = True
    return mask


def fit_linear_head(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float = 1e-3, iters: int = 100
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised x [N, F] (L-BFGS) -> (mean [F], std [F], W [K, F], b [K])."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().float()
        y = y.detach().clone().long()
        mean, std = x.mean(0), x.std(0).clamp_min(1e-4) if x.shape[0] > 1 else torch.ones(x.shape[1])
        z = (x - mean) / std
        w = torch.zeros(classes, x.shape[1], requires_grad=True)
        b = torch.zeros(classes, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(z @ w.T + b, y) + weight_decay * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return mean.detach(), std.detach(), w.detach().clone(), b.detach().clone()


def train_heads(features: torch.Tensor, labels: torch.Tensor, sigmas: torch.Tensor, classes: list[str], grid: int,
                channels: int, held_out: float = 0.2, seed: int = 0, weight_decay: float = 1e-3,
                progress=None) -> AttributeHeads:
    """features [S, N, F] (pooled h of N examples at S noise levels, σ descending), labels [N] -> AttributeHeads with
    held-out accuracy per level; the final heads are refitted on all examples. progress(done, total) per level."""
    with torch.inference_mode(False):
        return _train_heads(features.clone(), labels.clone(), sigmas.clone(), classes, grid, channels, held_out, seed,
                            weight_decay, progress)


def _train_heads(features, labels, sigmas, classes, grid, channels, held_out, seed, weight_decay, progress):
    s_count, n, f = features.shape
    k = len(classes)
    g = torch.Generator().manual_seed(seed)
    test = split_held_out(labels, held_out, g) if held_out > 0 else torch.zeros(n, dtype=torch.bool)
    mean, std = torch.zeros(s_count, f), torch.ones(s_count, f)
    weight, bias_ = torch.zeros(s_count, k, f), torch.zeros(s_count, k)
    accuracy = []
    for s in range(s_count):
        x = features[s]
        if test.any():
            m, sd, w, b = fit_linear_head(x[~test], labels[~test], k, weight_decay)
            pred = (((x[test] - m) / sd) @ w.T + b).argmax(1)
            accuracy.append(float((pred == labels[test]).float().mean()))
        mean[s], std[s], weight[s], bias_[s] = fit_linear_head(x, labels, k, weight_decay)
        if progress is not None:
            progress(s + 1, s_count)
    return AttributeHeads(list(classes), sigmas.float(), mean, std, weight, bias_, grid, channels, accuracy,
                          {"examples": int(n), "held_out": int(test.sum()), "seed": seed})


def bucket_sigmas(percent_to_sigma, buckets: int) -> torch.Tensor:
    """Bucket centre σ [S] (descending) at schedule percents (i + 0.5) / S, from the model's percent_to_sigma."""
    return torch.tensor([float(percent_to_sigma((i + 0.5) / buckets)) for i in range(buckets)])


# ---------------------------------------------------------------------------------------------------------------
# One guided sampling run
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FairConfig:
    """loss: one of LOSSES; strength η: logit units per guided call (0 = off); temperature T and divergence of
    the batch mean."""

    loss: str = "batch mean"
    strength: float = 1.0
    temperature: float = 8.0
    divergence: str = "chi-square"

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if not (self.strength >= 0 and math.isfinite(self.strength)):
            raise ValueError(f"strength must be a finite number ≥ 0, got {self.strength}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class FairLog:
    """What one run did: the batch target, loss per guided call, final predicted classes (−1 = not measured)."""

    target: list[float] = field(default_factory=list)
    batch_target: list[float] = field(default_factory=list)
    losses: list[tuple[float, float]] = field(default_factory=list)
    final_probs: list[list[float]] = field(default_factory=list)
    finished: bool = False

    def final_classes(self) -> list[int]:
        return [int(np.argmax(p)) for p in self.final_probs]


class FairRun:
    """Guidance state of one sampling run: the batch target q (from the target p and the running count),
    per-image labels for the draw baseline, and the log."""

    def __init__(self, heads: AttributeHeads, p: torch.Tensor, config: FairConfig, batch: int,
                 counts: torch.Tensor | None = None, seed: int = 0):
        self.heads, self.p, self.config, self.batch = heads, torch.as_tensor(p, dtype=torch.float64), config, batch
        self.generator = torch.Generator().manual_seed(int(seed) % (2**63))
        self.measuring = False
        if counts is None and config.loss == "per-image assignment":
            counts = torch.zeros_like(self.p)  # a whole batch target: this run's share of the seats nearest p
        if counts is not None:
            b = batch_counts(counts, self.p, batch, self.generator)
            self.q = b.double() / batch
        else:
            self.q = self.p.clone()
        self.draw_labels = torch.multinomial(self.q.float() + 0.0, batch, replacement=True, generator=self.generator)
        self.evidence: torch.Tensor | None = None  # Σ over guided calls of log softmax(head(h)), [B, K]
        self.log = FairLog(target=self.p.tolist(), batch_target=self.q.tolist())

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.loss == "batch mean":
            return batch_mean_loss(logits, self.q, cfg.temperature, cfg.divergence)
        if cfg.loss == "per-image assignment":
            # the run's whole seats (q·B); a chunk of another size (ComfyUI may split a batch) draws its share
            labels = stratified_labels(self.q, logits.shape[0], self.generator)
            return assignment_loss(logits, assign(self.accumulate(logits), labels))
        return assignment_loss(logits, self.draw_labels[: logits.shape[0]])

    def accumulate(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities [B, K] from all guided calls so far (normalised geometric mean), so that assignments
        settle as the images take shape instead of flipping with every noisy early prediction."""
        lp = logits.detach().float().log_softmax(-1).cpu()
        if self.evidence is None or self.evidence.shape != lp.shape:
            self.evidence = torch.zeros_like(lp)
        self.evidence += lp
        return self.evidence.softmax(-1)

    def step(self, h: torch.Tensor, sigma: float) -> torch.Tensor:
        """h [B, C, H, W] of one conditional chunk -> h − η B ∇_h L / G² (h untouched when strength is 0)."""
        if self.measuring:
            with torch.no_grad():
                self.log.final_probs = self.heads.logits(h, sigma).softmax(-1).tolist()
            return h
        if self.config.strength == 0 or h.shape[0] == 0:
            return h
        with torch.inference_mode(False), torch.enable_grad():
            x = h.detach().clone().float().requires_grad_(True)
            loss = self.loss(self.heads.logits(x, sigma))
            (grad,) = torch.autograd.grad(loss, x)
        eta = self.config.strength * h.shape[0] / self.heads.gradient_scale(sigma, tuple(h.shape))
        self.log.losses.append((float(sigma), float(loss.detach())))
        return (h.float() - eta * grad.to(h.device)).to(h.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Running class counts across runs (a JSON file + a registry keyed by it)
# ---------------------------------------------------------------------------------------------------------------

class FairnessCount:
    """Class counts of earlier outputs, kept in a JSON file; the registry ``COUNTS`` keeps one per file.
    Like the batch memory, every update takes the file's inter-process lock (``<name>.json.lock``), re-reads the
    file, adds and writes atomically, so runs of several processes are all counted; reads re-read the file
    when it changed. A writer that cannot get the lock within ``LOCK_TIMEOUT_S`` raises LockTimeout, unchanged."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._state: dict | None = None
        self._seen: tuple | None = None  # the file's (size, mtime, inode) when _state was read or written

    @property
    def name(self) -> str:
        return self.path.stem

    def _load(self) -> dict:
        stamp = file_stamp(self.path)
        if stamp is None:
            state = {"format": COUNT_FORMAT, "classes": [], "counts": [], "runs": 0}
        else:
            try:
                state = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"running count file {self.path.name} is unreadable ({e})") from e
            if (not isinstance(state, dict) or state.get("format") != COUNT_FORMAT
                    or len(state.get("classes", [])) != len(state.get("counts", []))):
                raise ValueError(f"{self.path.name} is not a SPELL fairness count file")
        self._state, self._seen = state, stamp
        return state

    def _read(self) -> dict:
        """The state as the file holds it now (self._lock held); re-read when the file changed."""
        if self._state is None or file_stamp(self.path) != self._seen:
            with file_lock(self.path, f"running count {self.name!r}", for_read=True) as locked:
                if locked:
                    remove_stale_temporaries(self.path)
                return self._load()
        return self._state

    def _counts(self, state: dict, classes: list[str]) -> torch.Tensor:
        if state["classes"] and list(state["classes"]) != list(classes):
            raise ValueError(f"running count {self.name!r} counts classes {state['classes']}, these heads have "
                             f"{list(classes)}: use another count name or reset it")
        return torch.tensor(state["counts"] or [0] * len(classes), dtype=torch.float64)

    def counts(self, classes: list[str]) -> torch.Tensor:
        """Counts [K] in the order of classes (zeros when empty); ValueError if it counts other classes."""
        with self._lock:
            return self._counts(self._read(), classes)

    def runs(self) -> int:
        with self._lock:
            return int(self._read()["runs"])

    def add(self, classes: list[str], predicted: list[int], timeout: float | None = None) -> torch.Tensor:
        """Adds one run's predicted classes to the file's counts (re-read under its lock, so other processes'
        runs are kept) and writes it atomically; returns the new counts."""
        self.counts(classes)  # refuses other classes before taking the lock
        with self._lock, file_lock(self.path, f"running count {self.name!r}", timeout):
            state = self._load()
            counts = self._counts(state, classes)
            for c in predicted:
                counts[c] += 1
            state = {"format": COUNT_FORMAT, "classes": list(classes), "counts": [int(c) for c in counts],
                     "runs": int(state["runs"]) + 1}
            atomic_write_json(self.path, state)
            self._state, self._seen = state, file_stamp(self.path)
        return counts

    def reset(self, timeout: float | None = None) -> None:
        with self._lock, file_lock(self.path, f"running count {self.name!r}", timeout):
            remove_stale_temporaries(self.path)
            self.path.unlink(missing_ok=True)
            self._state, self._seen = None, None


COUNTS: dict[str, FairnessCount] = {}


def open_count(path: str | os.PathLike) -> FairnessCount:
    """The one FairnessCount for this file in this process."""
    key = str(Path(path).resolve())
    if key not in COUNTS:
        COUNTS[key] = FairnessCount(key)
    return COUNTS[key]
