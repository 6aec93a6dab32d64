"""Fair by construction: finetuning a LoRA with the distributional alignment loss through the sampling chain
(Shen et al., "Finetuning Text-to-Image Diffusion Models for Fairness", ICLR 2024, arXiv 2311.07604).

- Distributional alignment targets (``alignment_targets``): a frozen classifier gives p_i per image of a batch
  of one prompt; one-hot target labels u drawn from the target distribution are assigned to the images by the
  exact assignment of ``fairness.assign`` (a sort for two classes); q_i is the expectation of image i's assigned
  label over the draws: exact for two classes (a binomial tail) and for K classes while the label counts are
  few enough to enumerate, else Monte Carlo; or "stratified" draws (every draw holds floor/ceil(B·q_k) labels
  of class k; the pack's choice for small batches, where i.i.d. draws leave most images below the confidence
  threshold). ``confident_labels``: y_i = argmax q_i, c_i = max q_i, kept where c_i ≥ C (C = 0.8 in the paper).
- Adjusted direct finetuning (``sample_chain``): a deterministic sampler (DDIM, written in σ-space as Euler with
  the denoiser's x̂0) whose gradients flow back through every step, but with the denoiser's *input* detached (only
  the direct path x_t → x_{t−1} keeps its gradient) and each step's gradient on the prediction multiplied by
  g_t = sqrt(ᾱ_t)·sqrt(1 − ᾱ_t)/(1 − α_t) over the geometric mean of the g_t (``dft_scales``); "naive" is the exact
  gradient (nothing detached or scaled).
- LoRA (``LoRA``): W x + (α/r)·B A x on chosen linear layers, added by forward hooks (the host's layers are not
  replaced), exported with ComfyUI's key names (``lora_unet_<module path with _>.lora_up.weight`` /
  ``.lora_down.weight`` / ``.alpha``) so that ComfyUI's stock LoraLoader reads it.
- ``LatentClassifier``: the attribute classifier the training uses, a small CNN on latents trained from labelled
  examples (never the classifier a benchmark measures with), optionally adversarially (``adversarial_inputs``), so
  that the LoRA trained through it has fewer patterns to fool it with.
- ``FairTrainer``: the loop (AdamW, EMA of the LoRA weights, skipped non-finite steps, checkpoints that resume
  exactly, a log of losses and gradient norms), over callables so that it never imports ComfyUI.

Plain torch/numpy/scipy.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from itertools import combinations_with_replacement
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fairness import assign, carried_labels, stratified_labels
from .storage import StorageError, atomic_save, atomic_write_json, read_safetensors

DRAWS = ("stratified", "iid", "carried")
GRADIENTS = ("adjusted", "naive")
METHODS = ("alignment", "resampled")
CLASSIFIER_FORMAT = "spell-latent-classifier/1"
CHECKPOINT_FORMAT = "spell-fair-lora-checkpoint/1"
EXACT_LIMIT = 4096  # label-count vectors enumerated exactly for K > 2 (more: Monte Carlo)


# ---------------------------------------------------------------------------------------------------------------
# Distributional alignment targets
# ---------------------------------------------------------------------------------------------------------------

def _count_vectors(batch: int, k: int):
    """Every vector of k non-negative integers summing to batch."""
    for bars in combinations_with_replacement(range(batch + 1), k - 1):
        edges = (0,) + bars + (batch,)
        yield [edges[i + 1] - edges[i] for i in range(k)]


def _multinomial_log_pmf(counts, p: torch.Tensor) -> float:
    n = sum(counts)
    out = math.lgamma(n + 1)
    for c, pk in zip(counts, p.tolist()):
        if c:
            if pk <= 0:
                return -math.inf
            out += c * math.log(pk) - math.lgamma(c + 1)
    return out


def alignment_targets(probs: torch.Tensor, target: torch.Tensor, draw: str = "stratified", samples: int = 256,
                      generator: torch.Generator | None = None, exact_limit: int = EXACT_LIMIT,
                      iteration: int = 0) -> torch.Tensor:
    """Expected assigned label q [B, K] of each image, given its class probabilities probs [B, K] and the target
    distribution target [K].

    draw "iid" (the paper's): the B target labels are drawn i.i.d. from target, then assigned (``fairness.assign``).
    Two classes: exact, q_i1 = P(M > rank of image i by p_1), M ~ Binomial(B, target_1). K classes: exact over the
    multinomial label counts while there are at most exact_limit of them, else the mean over `samples` draws.
    draw "stratified": each draw holds floor(B·target_k) labels of class k and the remaining seats drawn in
    proportion to the fractional parts (``fairness.stratified_labels``); one draw when B·target is whole.
    draw "carried": the one label set of batch number ``iteration`` when the fractional seats are carried over
    from batch to batch (``fairness.carried_labels``), so q is one-hot: with a target whose seats are not whole
    (30 % ones and 7.78 % each other digit, at batch 20), the stratified draw leaves most images' confidence below
    0.8 and trains them toward nothing.
    """
    p = probs.detach().double().cpu()
    t = torch.as_tensor(target, dtype=torch.float64).cpu()
    b, k = p.shape
    if t.numel() != k:
        raise ValueError(f"the target has {t.numel()} classes, the classifier {k}")
    if draw not in DRAWS:
        raise ValueError(f"draw must be one of {DRAWS}, got {draw!r}")
    q = torch.zeros(b, k, dtype=torch.float64)
    if draw == "carried":
        q[torch.arange(b), assign(p, carried_labels(t, b, iteration))] = 1
        return q.float()
    if draw == "stratified":
        whole = bool(torch.allclose(t * b, (t * b).round(), atol=1e-9))
        n = 1 if whole else samples
        for _ in range(n):
            q[torch.arange(b), assign(p, stratified_labels(t, b, generator))] += 1
        return (q / n).float()
    if k == 2:
        order = torch.argsort(p[:, 1], descending=True, stable=True)
        rank = torch.empty(b, dtype=torch.long)
        rank[order] = torch.arange(b)
        m = torch.arange(b + 1, dtype=torch.float64)
        pmf = torch.exp(torch.lgamma(torch.tensor(b + 1.0, dtype=torch.float64)) - torch.lgamma(m + 1)
                        - torch.lgamma(b - m + 1) + m * t[1].clamp_min(1e-300).log()
                        + (b - m) * t[0].clamp_min(1e-300).log())
        if t[1] == 0:
            pmf = (m == 0).double()
        elif t[0] == 0:
            pmf = (m == b).double()
        tail = pmf.flip(0).cumsum(0).flip(0)  # tail[j] = P(M >= j)
        q[:, 1] = tail[rank + 1]
        q[:, 0] = 1 - q[:, 1]
        return q.float()
    if math.comb(b + k - 1, k - 1) <= exact_limit:
        for counts in _count_vectors(b, k):
            w = _multinomial_log_pmf(counts, t)
            if w == -math.inf:
                continue
            labels = torch.repeat_interleave(torch.arange(k), torch.tensor(counts))
            q[torch.arange(b), assign(p, labels)] += math.exp(w)
        return (q / q.sum(1, keepdim=True)).float()
    for _ in range(samples):
        labels = torch.multinomial(t, b, replacement=True, generator=generator)
        q[torch.arange(b), assign(p, labels)] += 1
    return (q / samples).float()


def confident_labels(q: torch.Tensor, threshold: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [B] = argmax q_i, keep [B] = max q_i ≥ threshold)."""
    c, y = q.max(1)
    return y, c >= threshold - 1e-9


def alignment_loss(logits: torch.Tensor, y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """L_align = (1/B) Σ_i keep_i · CE(logits_i, y_i)."""
    ce = F.cross_entropy(logits, y.to(logits.device), reduction="none")
    return (ce * keep.to(ce)).sum() / len(ce)


# ---------------------------------------------------------------------------------------------------------------
# Adjusted direct finetuning through a deterministic sampler
# ---------------------------------------------------------------------------------------------------------------

class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x in the forward pass; its gradient multiplied by scale in the backward pass."""
    return _ScaleGrad.apply(x, float(scale))


def timesteps_of(sigmas: torch.Tensor, schedule_sigmas: torch.Tensor) -> torch.Tensor:
    """Nearest discrete timestep (index into schedule_sigmas [T], ascending) of each σ > 0, by log σ."""
    log_s = schedule_sigmas.double().log()
    return (sigmas.double().log()[:, None] - log_s[None]).abs().argmin(1)


def dft_scales(schedule_sigmas: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """g_t = sqrt(ᾱ_t)·sqrt(1 − ᾱ_t)/(1 − α_t) at the timesteps of sigmas [S] (σ > 0), divided by their geometric
    mean. ᾱ_t = 1/(1 + σ_t²) on the model's discrete schedule schedule_sigmas [T] (ascending; DDPM's 1000 steps
    for SD-style models), α_t = ᾱ_t/ᾱ_{t−1}."""
    abar = 1 / (1 + schedule_sigmas.double() ** 2)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    alpha = abar / prev
    t = timesteps_of(sigmas, schedule_sigmas)
    g = abar[t].sqrt() * (1 - abar[t]).sqrt() / (1 - alpha[t]).clamp_min(1e-12)
    return (g / g.log().mean().exp()).float()


Denoiser = Callable[[torch.Tensor, float], torch.Tensor]  # (x [B, ...] at σ, σ) -> x̂0 [B, ...]


def sample_chain(denoise: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, gradient: str | None = "adjusted",
                 scales: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic DDIM from x = noise·σ_0 along sigmas [S+1] (descending, last 0): x ← x̂0 + (σ_next/σ)(x − x̂0).

    gradient "adjusted": the denoiser sees x detached and the gradient on its x̂0 is multiplied by scales[i]
    (``dft_scales``); "naive": the exact gradient; None: no graph (torch.no_grad)."""
    if gradient not in (*GRADIENTS, None):
        raise ValueError(f"gradient must be one of {GRADIENTS} or None, got {gradient!r}")
    with torch.set_grad_enabled(gradient is not None and torch.is_grad_enabled()):
        x = noise * sigmas[0]
        for i in range(len(sigmas) - 1):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            x0 = denoise(x.detach() if gradient == "adjusted" else x, s)
            if gradient == "adjusted" and scales is not None:
                x0 = scale_grad(x0, scales[i])
            x = x0 + (s_next / s) * (x - x0)
        return x


# ---------------------------------------------------------------------------------------------------------------
# LoRA on linear layers, in ComfyUI's key format
# ---------------------------------------------------------------------------------------------------------------

class LoRA(nn.Module):
    """Low-rank updates (α/r)·up @ down of the linear layers ``modules`` {path: nn.Linear}; down is initialised
    like nn.Linear (Kaiming uniform), up with zeros, so an untrained LoRA changes nothing. ``attach`` adds them
    to the layers' outputs with forward hooks; ``enabled = False`` gives the frozen model back."""

    def __init__(self, modules: dict[str, nn.Linear], rank: int, alpha: float | None = None, seed: int = 0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be ≥ 1, got {rank}")
        if not modules:
            raise ValueError("no linear layers to adapt")
        g = torch.Generator().manual_seed(seed)
        self.paths = sorted(modules)
        self.targets = modules
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)  # α = r: no scaling, as the paper's library
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        for path in self.paths:
            m = modules[path]
            r = min(rank, m.in_features, m.out_features)
            bound = 1 / math.sqrt(m.in_features)  # kaiming_uniform_(a=√5) of an [r, in] weight
            self.down.append(nn.Parameter((torch.rand(r, m.in_features, generator=g) * 2 - 1) * bound))
            self.up.append(nn.Parameter(torch.zeros(m.out_features, r)))
        self.enabled = True
        self._hooks = []

    def scale(self, j: int) -> float:
        return self.alpha / self.down[j].shape[0]

    def delta(self, j: int) -> torch.Tensor:
        """The weight update [out, in] of layer j."""
        return self.scale(j) * self.up[j] @ self.down[j]

    def attach(self) -> "LoRA":
        self.detach_hooks()
        for j, path in enumerate(self.paths):
            def hook(module, args, out, j=j):
                if not self.enabled:
                    return out
                x = args[0]
                down, up = self.down[j].to(x), self.up[j].to(x)
                return out + self.scale(j) * F.linear(F.linear(x, down), up)
            self._hooks.append(self.targets[path].register_forward_hook(hook))
        return self

    def detach_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def comfy_state_dict(self, prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
        """{prefix + path with '.' -> '_' + ".lora_up.weight" | ".lora_down.weight" | ".alpha"}: what ComfyUI's
        LoraLoader maps onto ``diffusion_model.<path>.weight`` (comfy/lora.py model_lora_keys_unet)."""
        out = {}
        for j, path in enumerate(self.paths):
            key = prefix + path.replace(".", "_")
            out[f"{key}.lora_up.weight"] = self.up[j].detach().float().contiguous().clone()
            out[f"{key}.lora_down.weight"] = self.down[j].detach().float().contiguous().clone()
            out[f"{key}.alpha"] = torch.tensor(self.alpha)
        return out


def attention_linears(net: nn.Module, names: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0")) -> dict[str, nn.Linear]:
    """The attention projections of a U-Net/DiT (modules whose path ends in one of names), {path: module}."""
    out = {}
    for path, m in net.named_modules():
        if isinstance(m, nn.Linear) and any(path == n or path.endswith("." + n) for n in names):
            out[path] = m
    return out


# ---------------------------------------------------------------------------------------------------------------
# The training classifier: a small CNN on latents
# ---------------------------------------------------------------------------------------------------------------

class LatentClassifier(nn.Module):
    """conv(32) -> conv(64, stride 2) -> conv(64) -> global mean -> linear(K), on standardised latents [B, C, h, w]
    (any size). Deliberately another network than the demo's evaluator (which sees decoded pixels)."""

    def __init__(self, channels: int, classes: Sequence[str], width: int = 32):
        super().__init__()
        self.classes = list(classes)
        self.channels = channels
        self.width = width
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
        )
        self.head = nn.Linear(2 * width, len(self.classes))
        self.meta: dict = {}

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = (z - self.mean[:, None, None].to(z)) / self.std[:, None, None].to(z)
        return self.head(self.body(z).mean((2, 3)))

    def save(self, path: str | os.PathLike) -> None:
        tensors = {k: v.detach().float().contiguous().clone() for k, v in self.state_dict().items()}
        atomic_save(tensors, path, {"format": CLASSIFIER_FORMAT, "classes": json.dumps(self.classes),
                                    "channels": str(self.channels), "width": str(self.width),
                                    "meta": json.dumps(self.meta)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatentClassifier | ClassifierEnsemble":
        """A file written by ``save`` (one network) or ``ClassifierEnsemble.save`` (header ``members`` > 1)."""
        tensors, header = read_safetensors(path)
        if header.get("format") != CLASSIFIER_FORMAT:
            raise StorageError(f"{path} is not a SPELL latent classifier (format {header.get('format')!r})")
        try:
            members = int(header.get("members", "1"))
            shape = int(header["channels"]), json.loads(header["classes"]), int(header["width"])
            if members > 1:
                nets = []
                for j in range(members):
                    prefix = f"members.{j}."
                    net = cls(*shape)
                    net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
                    nets.append(net)
                if len(tensors) != members * len(nets[0].state_dict()):
                    raise ValueError(f"{len(tensors)} tensors for {members} members")
                net = ClassifierEnsemble(nets)
            else:
                net = cls(*shape)
                net.load_state_dict(tensors)
            net.meta = json.loads(header.get("meta", "{}"))
        except (KeyError, ValueError, RuntimeError) as e:
            raise StorageError(f"{path} is a damaged SPELL latent classifier ({e})") from e
        return net.eval()


class ClassifierEnsemble(nn.Module):
    """Several LatentClassifiers (trained from different seeds) read as one: its logits are the log of the members'
    mean class probability, so its softmax is that mean and the cross-entropy toward a label is −log of the mean
    probability of that label. A LoRA trained through it moves its reading only by moving every member's, so
    patterns that fool one network and not the others count for 1/M of what they would alone."""

    def __init__(self, nets: Sequence[LatentClassifier]):
        super().__init__()
        nets = list(nets)
        if len(nets) < 2:
            raise ValueError(f"an ensemble needs at least 2 classifiers, got {len(nets)}")
        first = nets[0]
        for net in nets[1:]:
            if (net.classes, net.channels, net.width) != (first.classes, first.channels, first.width):
                raise ValueError("the members of an ensemble must share classes, channels and width")
        self.nets = nn.ModuleList(nets)
        self.classes, self.channels, self.width = list(first.classes), first.channels, first.width
        self.meta: dict = {}

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([F.log_softmax(net(z), dim=1) for net in self.nets])
        return torch.logsumexp(logp, dim=0) - math.log(len(self.nets))

    def save(self, path: str | os.PathLike) -> None:
        tensors = {f"members.{j}.{k}": v.detach().float().contiguous().clone()
                   for j, net in enumerate(self.nets) for k, v in net.state_dict().items()}
        atomic_save(tensors, path, {"format": CLASSIFIER_FORMAT, "classes": json.dumps(self.classes),
                                    "channels": str(self.channels), "width": str(self.width),
                                    "members": str(len(self.nets)), "meta": json.dumps(self.meta)})


def adversarial_inputs(net: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: float, steps: int = 3) -> torch.Tensor:
    """x moved within an L2 ball of radius·sqrt(x[0].numel()) per example (in units of net.std, so radius is the
    RMS change per value in standard deviations) toward another class: projected gradient ascent on the logit
    margin max_{j≠y} l_j − l_y (which, unlike the cross-entropy, does not vanish on confident examples) with
    normalised steps of 2.5·radius/steps (Madry et al., 2018; Carlini and Wagner, 2017). Training on these makes
    the classifier robust within that radius, and a robust classifier's gradient points more at changes of the
    class itself than at small patterns no other network reads (Santurkar et al., 2019): the LoRA trained through
    it has fewer such patterns to exploit."""
    scale = net.std[:, None, None].to(x)
    ball = radius * math.sqrt(x[0].numel())
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = net(x + delta * scale)
        own = logits.gather(1, y[:, None])[:, 0]
        other = logits.scatter(1, y[:, None], -math.inf).max(1).values
        (grad,) = torch.autograd.grad((other - own).sum(), delta)
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
        delta = delta.detach() + (2.5 * ball / steps) * grad / norm
        delta = delta * (ball / delta.flatten(1).norm(dim=1).clamp_min(ball)[:, None, None, None])
    return (x + delta * scale).detach()


def train_classifier(latents: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], epochs: int = 60,
                     held_out: float = 0.2, seed: int = 0, noise: float = 0.05, progress=None,
                     robustness: float = 0.0, members: int = 1) -> LatentClassifier | ClassifierEnsemble:
    """Trains a LatentClassifier on latents [N, C, h, w] with labels [N] (AdamW, batches of 64, small Gaussian
    noise on the inputs); held-out accuracy (held_out of each class) in .meta, then refitted on every example.
    robustness > 0: adversarial training, each batch replaced by ``adversarial_inputs`` at that radius (the
    held-out accuracy is measured on the clean examples, and on examples attacked at the same radius).
    members > 1: that many classifiers from seeds seed, seed + 1, ... as a ``ClassifierEnsemble``; its .meta
    holds each member's meta and the mean of their held-out accuracies (each measured on its own split)."""
    if members > 1:
        nets = []
        for j in range(members):
            step = (lambda d, t, j=j: progress(j * t + d, members * t)) if progress is not None else None
            nets.append(train_classifier(latents, labels, classes, epochs, held_out, seed + j, noise, step,
                                         robustness))
        ensemble = ClassifierEnsemble(nets)
        ensemble.meta = {"members": [net.meta for net in nets], "seed": seed, "robustness": robustness}
        for key in ("examples", "held_out", "epochs"):
            ensemble.meta[key] = nets[0].meta[key]
        for key in ("held_out_accuracy", "held_out_attacked_accuracy"):
            if all(key in net.meta for net in nets):
                ensemble.meta[key] = sum(net.meta[key] for net in nets) / members
        return ensemble.eval()
    if members < 1:
        raise ValueError(f"members must be >= 1, got {members}")
    from .fairness import split_held_out

    with torch.inference_mode(False), torch.enable_grad():
        latents, labels = latents.detach().clone().float(), labels.detach().clone().long()
        g = torch.Generator().manual_seed(seed)
        test = split_held_out(labels, held_out, g) if held_out > 0 else torch.zeros(len(labels), dtype=torch.bool)
        meta = {"examples": len(labels), "held_out": int(test.sum()), "seed": seed, "epochs": epochs,
                "robustness": robustness}
        runs = [(~test, True), (torch.ones_like(test), False)] if test.any() else [(~test, False)]
        for mask, measure in runs:
            torch.manual_seed(seed)
            net = LatentClassifier(latents.shape[1], classes)
            x, y = latents[mask], labels[mask]
            net.mean.copy_(x.mean((0, 2, 3)))
            net.std.copy_(x.std((0, 2, 3)).clamp_min(1e-4))
            opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)
            for epoch in range(epochs):
                order = torch.randperm(len(y), generator=g)
                for a in range(0, len(y), 64):
                    i = order[a:a + 64]
                    xb = x[i] + noise * torch.randn(x[i].shape, generator=g) * net.std[:, None, None]
                    if robustness > 0:
                        xb = adversarial_inputs(net, xb, y[i], robustness)
                    loss = F.cross_entropy(net(xb), y[i])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                if progress is not None:
                    progress(epoch + 1 + (0 if measure or len(runs) == 1 else epochs), epochs * len(runs))
            if measure:
                with torch.no_grad():
                    meta["held_out_accuracy"] = float((net.eval()(latents[test]).argmax(1) == labels[test])
                                                      .float().mean())
                if robustness > 0:
                    attacked = adversarial_inputs(net, latents[test], labels[test], robustness)
                    with torch.no_grad():
                        meta["held_out_attacked_accuracy"] = float((net(attacked).argmax(1) == labels[test])
                                                                   .float().mean())
        net.meta = meta
        return net.eval()


# ---------------------------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class FairLoRAConfig:
    """Training settings (defaults: the paper's where they carry over to a small model; stated otherwise)."""
    iterations: int = 600
    batch: int = 20                # images of one prompt per iteration
    steps: tuple[int, int] = (10, 14)  # sampling steps drawn per iteration (paper: 19-23 with DPM-Solver++)
    rank: int = 8                  # paper: 50 (on SD1.5's much wider layers)
    lr: float = 1e-3               # paper: 5e-5 (SD1.5); the demo's tiny U-Net needs larger steps
    weight_decay: float = 0.01
    ema: float = 0.996
    ema_warmup: bool = False       # True: decay min(ema, (1+k)/(10+k)) at update k (0 at the first), diffusers'
                                   # EMAModel; measured worse on the demo (docs/fairness_finetune.md)
    threshold: float = 0.8         # confidence C
    draw: str = "stratified"       # or "iid" (the paper's), or "carried" (fractional seats carried across batches)
    gradient: str = "adjusted"     # or "naive"
    keep_weight: float = 8.0       # semantics preservation, as the paper's weight 8 (on 1 - cos of latents)
    mismatch_weight: float = 0.3   # preservation weight of images assigned another class than the frozen model's
    class_reference: bool = False  # True: an image confidently assigned another class than the frozen model's is kept
                                   # close to the frozen model's image of that class's prompt (``FairLoRATask.
                                   # class_prompts``), same noise, at full weight, instead of down-weighted toward the
                                   # frozen image of the wrong class
    keep_prompts_per_step: int = 1  # prompts to keep unchanged, one batch each per iteration (0: none)
    pool: int = 0                  # class probabilities of this many recent images of the prompt are assigned together
                                   # with the batch (only the batch is trained): the target is matched over pool +
                                   # batch images, so a batch that happens to hold four ones is not pushed to give
                                   # two of them up; 0: the batch alone (the paper's)
    seed: int = 0
    max_grad_norm: float = 1.0
    method: str = "alignment"      # or "resampled" (``resampled.ResampledTrainer``: denoising on the model's own
                                   # images, drawn at the rates the target asks of their classes)
    own_images: int = 4000         # resampled: the frozen model's images of the prompt to draw from
    rounds: int = 4                # resampled: the weights are corrected rounds − 1 times, evenly spaced

    def check(self) -> None:
        if self.draw not in DRAWS:
            raise ValueError(f"draw must be one of {DRAWS}, got {self.draw!r}")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {self.gradient!r}")
        if not 1 <= self.steps[0] <= self.steps[1]:
            raise ValueError(f"steps must be a range lo ≤ hi with lo ≥ 1, got {self.steps}")
        if self.batch < 2:
            raise ValueError(f"batch must be ≥ 2 (the target is a distribution over a batch), got {self.batch}")
        if self.pool < 0:
            raise ValueError(f"pool must be ≥ 0, got {self.pool}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.own_images < 10 or self.rounds < 1:
            raise ValueError(f"own_images must be ≥ 10 and rounds ≥ 1, got {self.own_images} and {self.rounds}")
        for name in ("lr", "weight_decay", "ema", "threshold", "keep_weight", "mismatch_weight", "max_grad_norm"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number ≥ 0, got {v}")


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 − cos of flattened a [B, ...] and b [B, ...] -> [B]."""
    return 1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


@dataclass
class FairLoRATask:
    """What the loop needs from its host (ComfyUI, or a plain script).

    denoiser(prompt, lora_on) -> Denoiser for one prompt (CFG included), the LoRA's hooks on or off;
    sigmas(steps) -> σ schedule [steps+1]; schedule_sigmas: the model's discrete σ [T] ascending (for g_t);
    shape: one latent's shape; classify(latents) -> logits [B, K]; target [K]; prompts to debias and to keep;
    class_prompts: one prompt per class, in the classifier's order (only with ``FairLoRAConfig.class_reference``):
    denoiser(stacked prompts [n, ...], False) must then denoise image j under prompt j."""
    denoiser: Callable[[object, bool], Denoiser]
    sigmas: Callable[[int], torch.Tensor]
    schedule_sigmas: torch.Tensor
    shape: tuple
    classify: Callable[[torch.Tensor], torch.Tensor]
    target: torch.Tensor
    prompts: list
    keep: list = field(default_factory=list)
    class_prompts: list = field(default_factory=list)


def class_references(task: FairLoRATask, noise: torch.Tensor, labels: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The frozen model's images of noise [n, ...] under the prompt of class labels[j] each (no graph): one chain
    with the prompts stacked where they share a shape, else one chain per class."""
    prompts = [task.class_prompts[int(k)] for k in labels]
    if len({tuple(p.shape) for p in prompts}) == 1:
        return sample_chain(task.denoiser(torch.cat(prompts), False), noise, sigmas, None)
    out = torch.empty_like(noise)
    for k in labels.unique().tolist():
        at = (labels == k).nonzero().flatten()
        out[at] = sample_chain(task.denoiser(task.class_prompts[k], False), noise[at], sigmas, None)
    return out


class FairTrainer:
    """Trains ``lora`` on ``task`` with ``config``; ``step()`` runs one iteration and returns its log row."""

    def __init__(self, task: FairLoRATask, lora: LoRA, config: FairLoRAConfig):
        config.check()
        if config.class_reference and len(task.class_prompts) != len(task.target):
            raise ValueError(f"class_reference needs one prompt per class ({len(task.target)}), got "
                             f"{len(task.class_prompts)}")
        self.task, self.lora, self.config = task, lora, config
        self.params = list(lora.parameters())
        self.ema = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.iteration = 0
        self.log: list[dict] = []
        self.generator = torch.Generator().manual_seed(config.seed)
        self.pools: dict[int, torch.Tensor] = {}  # prompt index -> class probabilities [≤ pool, K] of recent images
        self.best: dict | None = None  # {"iteration", "bias", "ema": [tensors]}: the EMA weights of the lowest
                                       # validation bias so far (``note_validation``)

    def _noise(self, n: int) -> torch.Tensor:
        return torch.randn((n, *self.task.shape), generator=self.generator)

    def losses(self) -> dict:
        """One iteration's losses (with graph): alignment on a batch of a prompt to debias, preservation on it
        and on batches of prompts to keep."""
        c, t = self.config, self.task
        lo, hi = c.steps
        steps = int(torch.randint(lo, hi + 1, (1,), generator=self.generator))
        sigmas = t.sigmas(steps).float()
        scales = dft_scales(t.schedule_sigmas, sigmas[:-1][sigmas[:-1] > 0]) if c.gradient == "adjusted" else None
        which = int(torch.randint(len(t.prompts), (1,), generator=self.generator))
        prompt = t.prompts[which]
        noise = self._noise(c.batch)
        with torch.no_grad():
            reference = sample_chain(t.denoiser(prompt, False), noise, sigmas, None)
            ref_class = t.classify(reference).argmax(1)
        x = sample_chain(t.denoiser(prompt, True), noise, sigmas, c.gradient, scales)
        logits = t.classify(x)
        probs = logits.detach().softmax(1).float()
        if c.pool:
            probs = torch.cat([self.pools.get(which, probs[:0]), probs])
            self.pools[which] = probs[-c.pool:].clone()
        q = alignment_targets(probs, t.target, c.draw, generator=self.generator,
                              iteration=self.iteration)[-len(logits):]
        y, keep = confident_labels(q, c.threshold)
        align = alignment_loss(logits, y, keep)
        w = torch.where(y == ref_class, 1.0, c.mismatch_weight)
        moved = (y != ref_class) & keep
        if c.class_reference and bool(moved.any()):
            # the reference of an image moved to class y: the frozen model's image of y's prompt, same noise
            at = moved.nonzero().flatten()
            with torch.no_grad():
                reference = reference.clone()
                reference[at] = class_references(t, noise[at], y[at], sigmas)
            w = torch.where(moved, 1.0, w)
        preserve = (w * cosine_distance(x, reference)).mean()
        total = align + c.keep_weight * preserve
        kept = torch.zeros(())
        if t.keep and c.keep_prompts_per_step:
            for _ in range(c.keep_prompts_per_step):
                other = t.keep[int(torch.randint(len(t.keep), (1,), generator=self.generator))]
                n2 = self._noise(max(2, c.batch // 2))
                with torch.no_grad():
                    ref2 = sample_chain(t.denoiser(other, False), n2, sigmas, None)
                x2 = sample_chain(t.denoiser(other, True), n2, sigmas, c.gradient, scales)
                kept = kept + cosine_distance(x2, ref2).mean() / c.keep_prompts_per_step
            total = total + c.keep_weight * kept
        share = torch.bincount(logits.argmax(1), minlength=len(t.target)).float() / len(logits)
        return {"total": total, "align": align, "preserve": preserve, "keep": kept, "confident": keep.float().mean(),
                "moved": moved.float().mean(),
                "steps": steps, "batch_tv": 0.5 * float((share - t.target.float()).abs().sum())}

    def step(self) -> dict:
        c = self.config
        with torch.inference_mode(False), torch.enable_grad():
            parts = self.losses()
            self.opt.zero_grad(set_to_none=True)
            parts["total"].backward(inputs=self.params)
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
            finite = math.isfinite(norm) and math.isfinite(float(parts["total"].detach()))
            if finite:
                if c.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
                self.opt.step()
                decay = self.ema_decay(self.iteration)
                with torch.no_grad():
                    for e, p in zip(self.ema, self.params):
                        e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        self.iteration += 1
        row = {"iteration": self.iteration, "grad_norm": norm, "skipped": not finite,
               **{k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in parts.items()}}
        self.log.append(row)
        return row

    def ema_decay(self, k: int) -> float:
        """The EMA's decay at update k (0-based). Without warm-up it is ``ema`` from the start, and the untrained
        LoRA keeps a weight of ema^n in the result after n updates (0.996^500 = 13.5 %: the saved weights lag far
        behind on a short run); with it the average starts at the first trained weights and widens to ``ema``."""
        c = self.config
        if not c.ema_warmup:
            return c.ema
        return 0.0 if k == 0 else min(c.ema, (1 + k) / (10 + k))

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights in ComfyUI's LoRA key format: the result (the raw weights are only for resuming)."""
        return self._state_dict_of(self.ema)

    def _state_dict_of(self, weights: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``weights`` (one per LoRA parameter) in ComfyUI's LoRA key format; the LoRA keeps its own weights."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, w in zip(self.params, weights):
                p.copy_(w)
        try:
            return self.lora.comfy_state_dict()
        finally:
            self.restore(saved)

    def note_validation(self, bias: float) -> bool:
        """Records the validation bias of the current EMA weights; keeps a copy of them when it is the lowest so
        far (the first of equal ones). Returns whether it was. A run that goes past its best (on the demo, runs
        that collapsed onto one or two classes after their best iteration) can still write that best state."""
        if not math.isfinite(bias) or (self.best is not None and bias >= self.best["bias"]):
            return False
        self.best = {"iteration": self.iteration, "bias": float(bias), "ema": [e.detach().clone() for e in self.ema]}
        return True

    def best_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights of the lowest validation bias, in ComfyUI's LoRA key format (the current EMA weights
        when nothing was validated)."""
        return self._state_dict_of(self.ema if self.best is None else self.best["ema"])

    def use_ema(self) -> list[torch.Tensor]:
        """Swaps the EMA weights into the LoRA (returns the raw ones to swap back with ``restore``)."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.ema):
                p.copy_(e)
        return saved

    def restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, saved):
                p.copy_(s)

    # ---- checkpoints: everything needed to continue exactly where training stopped ----
    def save_checkpoint(self, path: str | os.PathLike, extra: dict | None = None,
                        more: dict[str, torch.Tensor] | None = None) -> None:
        """more: further tensors to keep (a subclass's data), stored as "data.<name>"."""
        tensors = {f"param.{i}": p.detach().float().contiguous().clone() for i, p in enumerate(self.params)}
        tensors.update({f"ema.{i}": e.float().contiguous().clone() for i, e in enumerate(self.ema)})
        state = self.opt.state_dict()
        for i, s in state["state"].items():
            for k, v in s.items():
                tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).float().reshape(-1).clone() if k == "step" else v.float().contiguous().clone()
        tensors["rng"] = self.generator.get_state().clone()
        tensors.update({f"pool.{k}": v.contiguous() for k, v in self.pools.items()})
        tensors.update({f"data.{k}": v.contiguous() for k, v in (more or {}).items()})
        best = {}
        if self.best is not None:
            tensors.update({f"best.{i}": e.float().contiguous().clone() for i, e in enumerate(self.best["ema"])})
            best = {"iteration": self.best["iteration"], "bias": self.best["bias"]}
        meta = {"format": CHECKPOINT_FORMAT, "iteration": str(self.iteration), "config": json.dumps(asdict(self.config)),
                "best": json.dumps(best),
                "paths": json.dumps(self.lora.paths), "log": json.dumps(self.log), "extra": json.dumps(extra or {})}
        atomic_save(tensors, path, meta)

    def load_checkpoint(self, path: str | os.PathLike) -> dict:
        """Restores a checkpoint written by save_checkpoint for the same layers and settings; returns its extra."""
        tensors, meta = read_safetensors(path)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise StorageError(f"{path} is not a SPELL fair-LoRA checkpoint (format {meta.get('format')!r})")
        if json.loads(meta["paths"]) != self.lora.paths:
            raise StorageError(f"{path} was trained on other layers; start afresh (switch resume off)")
        saved = json.loads(meta["config"])
        saved.setdefault("ema_warmup", False)  # checkpoints from before the option used a constant decay
        saved.setdefault("class_reference", False)  # and the frozen image of the same prompt as every reference
        saved.setdefault("pool", 0)  # and assigned each batch alone
        for key, old in (("method", "alignment"), ("own_images", 4000), ("rounds", 4)):
            saved.setdefault(key, old)  # and knew one method
        mine = asdict(self.config)
        differ = sorted(k for k in mine if k != "iterations" and json.dumps(saved.get(k)) != json.dumps(mine[k]))
        if differ:
            raise StorageError(f"{path} was trained with other settings ({', '.join(differ)}); use the same "
                               f"settings to resume, or switch resume off")
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(tensors[f"param.{i}"])
                self.ema[i].copy_(tensors[f"ema.{i}"])
        state = self.opt.state_dict()
        for i in range(len(self.params)):
            if f"opt.{i}.exp_avg" in tensors:
                state["state"][i] = {"step": tensors[f"opt.{i}.step"].reshape(()).clone(),
                                     "exp_avg": tensors[f"opt.{i}.exp_avg"], "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"]}
        self.opt.load_state_dict(state)
        self.generator.set_state(tensors["rng"].to(torch.uint8))
        self.pools = {int(k[len("pool."):]): v for k, v in tensors.items() if k.startswith("pool.")}
        best = json.loads(meta.get("best", "{}"))  # checkpoints from before it kept none
        self.best = ({**best, "ema": [tensors[f"best.{i}"].clone() for i in range(len(self.params))]}
                     if best else None)
        self.iteration = int(meta["iteration"])
        self.log = json.loads(meta["log"])
        return json.loads(meta.get("extra", "{}"))


def bias_of(labels: torch.Tensor, classes: int) -> float:
    from .fairness import bias

    return bias(torch.bincount(labels.flatten(), minlength=classes).double() / max(labels.numel(), 1))


def write_log(path: str | os.PathLike, rows: list[dict], summary: dict) -> None:
    """The training log beside the LoRA: JSON with the settings, every iteration's losses and validations."""
    atomic_write_json(path, {"summary": summary, "iterations": rows})
