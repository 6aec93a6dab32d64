"""Fair by resampling: a LoRA finetuned with the model's own denoising loss on the model's own images of the prompt,
each image drawn as often as the target asks of the class a frozen classifier reads in it.

Why beside the distributional alignment loss (``finetune.FairTrainer``, Shen et al.): there the LoRA is trained
*through* the classifier, and on the demo it learns to move images to where the classifier reads the assigned
class and a second network does not (docs/fairness_finetune.md: the training classifier's agreement with the judge
falls, the bias cut stops near 60 %). Here nothing is optimised against the classifier. It only decides how often
each of the frozen model's own images is seen; the LoRA then learns that reweighted set as the model learned its
data, so it can only draw images of the kind the model already draws, at other rates.

- ``resampling_weights``: w_i = target[y_i] / n[y_i] over the images the classifier is confident about
  (c_i ≥ C, the paper's rule); the weighted set's classes follow the target exactly under the classifier.
- ``stable_targets``: the regression target of each noisy image, the weighted set's own ideal denoiser at x_t
  (Xu et al., "Stable Target Field for Reduced Variance Score Estimation in Diffusion Models", ICLR 2023): the
  posterior mean of the clean image over the whole set instead of the one image x_t was made from. The same
  expectation, without the variance of drawing one image; at low noise it is that image.
- ``denoising_loss``: (1/σ² + 1)·‖x̂0 − target‖², the ε- plus x̂0-error (as ``demo.train`` trains the demo model).
- ``corrected_weights``: between rounds the LoRA's own images are classified and each class's weight multiplied
  by target/share (bounded), so that what the LoRA under-learns is asked for more (iterative proportional fitting).
- ``ResampledTrainer``: the loop, ``finetune.FairTrainer``'s optimiser, EMA, checkpoints and log with this loss;
  prompts to keep are held to the frozen model's denoiser on the frozen model's own images of them.

Plain torch; never imports ComfyUI.
"""
from __future__ import annotations

import math

import torch

from .finetune import FairLoRAConfig, FairLoRATask, FairTrainer, LoRA, sample_chain
from .storage import StorageError, read_safetensors

CORRECTION_LIMIT = 2.0  # one round multiplies a class's weight by at most this (or divides by it)


def resampling_weights(probs: torch.Tensor, target: torch.Tensor, threshold: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [N] summing to 1, labels [N]) for images with class probabilities probs [N, K]: an image the
    classifier reads with confidence ≥ threshold gets target[y] / (confident images of class y); the others 0.
    Raises ValueError when a class the target asks for has no confident image (the set cannot follow it)."""
    conf, y = probs.float().max(1)
    ok = conf >= threshold - 1e-9
    counts = torch.bincount(y[ok], minlength=len(target)).double()
    t = target.double() / target.double().sum()
    missing = [k for k in range(len(t)) if t[k] > 0 and counts[k] == 0]
    if missing:
        raise ValueError(f"no image is read as class {missing} with confidence ≥ {threshold}: draw more images "
                         f"of the prompt (own_images), or check that the classifier reads that class in them")
    w = torch.zeros(len(y), dtype=torch.float64)
    w[ok] = (t / counts.clamp_min(1))[y[ok]]
    return (w / w.sum()).float(), y


def weighted_shares(weights: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Each class's share of the weight [K]."""
    return torch.zeros(classes, dtype=torch.float64).index_add_(0, labels, weights.double()).float()


def corrected_weights(weights: torch.Tensor, labels: torch.Tensor, share: torch.Tensor, target: torch.Tensor,
                      limit: float = CORRECTION_LIMIT) -> torch.Tensor:
    """weights · target[y] / share[y] per class, each factor within [1/limit, limit]; renormalised. share [K]: the
    classes the classifier reads in the LoRA's own images."""
    factor = (target.double() / share.double().clamp_min(1e-6)).clamp(1 / limit, limit)
    factor = torch.where(target.double() > 0, factor, torch.ones_like(factor))
    w = weights.double() * factor[labels]
    return (w / w.sum()).float()


def stable_targets(x_t: torch.Tensor, sigma: torch.Tensor, data: torch.Tensor, log_weights: torch.Tensor,
                   chunk: int = 4096) -> torch.Tensor:
    """The weighted set's ideal denoiser E[z | x_t] for x_t [B, ...] at noise levels sigma [B]: Σ_i a_i z_i with
    a_i ∝ w_i·exp(−‖x_t − z_i‖² / 2σ²) over data [N, ...] (log_weights [N], −inf for weight 0). Exact (a
    log-sum-exp over the whole set, in chunks of the set); no graph."""
    with torch.no_grad():
        x = x_t.flatten(1).double()
        s2 = 2 * sigma.double().reshape(-1, 1) ** 2
        flat = data.flatten(1)
        m = torch.full((len(x), 1), -math.inf, dtype=torch.float64)
        num = torch.zeros(len(x), flat.shape[1], dtype=torch.float64)
        den = torch.zeros(len(x), 1, dtype=torch.float64)
        for a in range(0, len(flat), chunk):
            z = flat[a:a + chunk].double()
            logit = log_weights[a:a + chunk].double()[None] - torch.cdist(x, z).pow(2) / s2
            m_new = torch.maximum(m, logit.max(1, keepdim=True).values)
            scale = torch.exp(m - m_new).nan_to_num(0.0)
            p = torch.exp(logit - m_new)
            num = num * scale + p @ z
            den = den * scale + p.sum(1, keepdim=True)
            m = m_new
        return (num / den).to(x_t.dtype).view_as(x_t)


def denoising_loss(x0: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """mean over images of (1/σ² + 1)·mean‖x̂0 − target‖²: the ε-error plus the x̂0-error."""
    w = (1 / sigma.float() ** 2 + 1).reshape(-1, *([1] * (x0.dim() - 1)))
    return (w * (x0.float() - target.float()).pow(2)).mean()


def draw_images(denoise, n: int, shape: tuple, sigmas: torch.Tensor, generator: torch.Generator,
                batch: int = 50, progress=None) -> torch.Tensor:
    """n images [n, *shape] of a denoiser from seeded noise along sigmas (deterministic: Euler in σ), no graph."""
    out = []
    for a in range(0, n, batch):
        noise = torch.randn((min(batch, n - a), *shape), generator=generator)
        out.append(sample_chain(denoise, noise, sigmas, None))
        if progress is not None:
            progress(min(a + batch, n), n)
    return torch.cat(out)


class ResampledTrainer(FairTrainer):
    """Trains ``lora`` by denoising on ``data`` (the frozen model's images of ``task.prompts[0]``) drawn by
    ``weights``; ``kept`` [P, M, ...]: the frozen model's images of each prompt in ``task.keep``, where the LoRA's
    denoiser is held to the frozen one. ``config.batch`` images a step, ``config.keep_weight`` the keeping's
    weight; ``correct(share)`` starts the next round (see ``corrected_weights``)."""

    def __init__(self, task: FairLoRATask, lora: LoRA, config: FairLoRAConfig, data: torch.Tensor,
                 labels: torch.Tensor, weights: torch.Tensor, kept: torch.Tensor | None = None):
        super().__init__(task, lora, config)
        if not (len(data) == len(labels) == len(weights)) or len(data) == 0:
            raise ValueError(f"data, labels and weights must be as many and not empty, got {len(data)}, "
                             f"{len(labels)}, {len(weights)}")
        if task.keep and (kept is None or len(kept) != len(task.keep)):
            raise ValueError("kept must hold the frozen model's images of each prompt to keep")
        self.data, self.labels = data, labels.long()
        self.weights = weights.float()
        self.kept = kept
        self.rounds: list[dict] = []  # {"iteration", "share", "factor"} of every correction

    def _sigmas(self, n: int) -> torch.Tensor:
        s = self.task.schedule_sigmas
        return s[torch.randint(len(s), (n,), generator=self.generator)].float()

    def losses(self) -> dict:
        c, t = self.config, self.task
        idx = torch.multinomial(self.weights, c.batch, replacement=True, generator=self.generator)
        z0 = self.data[idx]
        sigma = self._sigmas(c.batch)
        x = z0 + sigma.reshape(-1, *([1] * (z0.dim() - 1))) * torch.randn(z0.shape, generator=self.generator)
        target = stable_targets(x, sigma, self.data, self.weights.clamp_min(1e-30).log()
                                .masked_fill(self.weights <= 0, -math.inf))
        fit = denoising_loss(t.denoiser(t.prompts[0], True)(x, sigma), target, sigma)
        kept = torch.zeros(())
        if t.keep and c.keep_prompts_per_step:
            n2 = max(2, c.batch // 2)
            which = torch.randint(len(t.keep), (n2,), generator=self.generator)
            pick = torch.randint(self.kept.shape[1], (n2,), generator=self.generator)
            zk = self.kept[which, pick]
            sk = self._sigmas(n2)
            xk = zk + sk.reshape(-1, *([1] * (zk.dim() - 1))) * torch.randn(zk.shape, generator=self.generator)
            prompts = torch.cat([t.keep[int(k)] for k in which])
            with torch.no_grad():
                ref = t.denoiser(prompts, False)(xk, sk)
            kept = denoising_loss(t.denoiser(prompts, True)(xk, sk), ref, sk)
        total = fit + c.keep_weight * kept
        drawn = torch.bincount(self.labels[idx], minlength=len(t.target)).float() / c.batch
        return {"total": total, "denoise": fit, "keep": kept,
                "batch_tv": 0.5 * float((drawn - t.target.float()).abs().sum())}

    def correct(self, share: torch.Tensor) -> torch.Tensor:
        """Starts a round: multiplies each class's weight by target/share (share: the classes the classifier reads
        in the LoRA's own images now); returns the factors."""
        before = weighted_shares(self.weights, self.labels, len(self.task.target))
        self.weights = corrected_weights(self.weights, self.labels, share, self.task.target)
        after = weighted_shares(self.weights, self.labels, len(self.task.target))
        factor = after / before.clamp_min(1e-12)
        self.rounds.append({"iteration": self.iteration, "share": share.tolist(), "factor": factor.tolist()})
        return factor

    def save_checkpoint(self, path, extra: dict | None = None) -> None:
        super().save_checkpoint(path, {**(extra or {}), "rounds": self.rounds},
                                more={"data": self.data, "labels": self.labels, "weights": self.weights,
                                      **({"kept": self.kept} if self.kept is not None else {})})

    def load_checkpoint(self, path) -> dict:
        extra = super().load_checkpoint(path)
        tensors, _ = read_safetensors(path)
        if "data.data" not in tensors:
            raise StorageError(f"{path} was not written by the resampled trainer; switch resume off")
        self.data, self.labels = tensors["data.data"], tensors["data.labels"].long()
        self.weights = tensors["data.weights"]
        self.kept = tensors.get("data.kept")
        self.rounds = extra.pop("rounds", [])
        return extra

    def round_due(self) -> bool:
        """Whether a round ends at this iteration: rounds − 1 corrections, evenly spaced, none at the end."""
        c = self.config
        per = c.iterations // c.rounds
        return (c.rounds > 1 and per > 0 and self.iteration % per == 0 and 0 < self.iteration < c.iterations
                and len(self.rounds) < c.rounds - 1)

    def probe(self, n: int, steps: int, seed: int) -> torch.Tensor:
        """The classes [K] the classifier reads in n images of the LoRA (its EMA weights, the result) from fixed
        noise, drawn in ``steps`` steps."""
        saved = self.use_ema()
        try:
            images = draw_images(self.task.denoiser(self.task.prompts[0], True), n, self.task.shape,
                                 self.task.sigmas(steps).float(), torch.Generator().manual_seed(seed))
        finally:
            self.restore(saved)
        pred = torch.cat([self.task.classify(x).argmax(1) for x in images.split(256)])
        return torch.bincount(pred, minlength=len(self.task.target)).float() / len(pred)


def start_resampled(task: FairLoRATask, lora: LoRA, config: FairLoRAConfig, steps: int, kept_images: int = 64,
                    progress=None) -> ResampledTrainer:
    """Draws the frozen model's ``config.own_images`` images of ``task.prompts[0]`` (and ``kept_images`` of each
    prompt in ``task.keep``) in ``steps`` steps from noise seeded by ``config.seed``, weights them by the classes
    ``task.classify`` reads in them with confidence ≥ ``config.threshold``, and returns the trainer.
    progress(done, total) while drawing."""
    if len(task.prompts) != 1:
        raise ValueError(f"the resampled method trains one prompt at a time, got {len(task.prompts)}")
    g = torch.Generator().manual_seed(config.seed + 1)
    sigmas = task.sigmas(steps).float()
    total = config.own_images + kept_images * len(task.keep)
    tick = (lambda base: (lambda done, _n: progress(base + done, total))) if progress else (lambda base: None)
    data = draw_images(task.denoiser(task.prompts[0], False), config.own_images, task.shape, sigmas, g,
                       progress=tick(0))
    with torch.no_grad():
        probs = torch.cat([task.classify(x).float().softmax(1) for x in data.split(256)])
    weights, labels = resampling_weights(probs, task.target, config.threshold)
    kept = None
    if task.keep:
        kept = torch.stack([draw_images(task.denoiser(p, False), kept_images, task.shape, sigmas, g,
                                        progress=tick(config.own_images + kept_images * j))
                            for j, p in enumerate(task.keep)])
    return ResampledTrainer(task, lora, config, data, labels, weights, kept)
