"""One sampling run with sparse repellency: the references, the push at every model call, the final
enforcement of the shield, and a log of what happened (SPELL, arXiv 2410.06025, Algorithm 1).

Everything is in the sampler's own space (model space); callers convert latents in and out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .feature_push import Features, feature_push
from .repellency import (IN_BATCH_MODES, flat32, in_batch_mask, nearest, repellency, repellency_weights, rms_cdist,
                         sparse_push)
from .shield import Shield, StepReuse

# The report lists nearest static references up to this many radii away (a range search, not a k-NN).
NEAREST_CAP = 4.0


@dataclass(frozen=True)
class SpellConfig:
    """r: shield radius (RMS, model space); lam: overcompensation λ; in_batch: off / mutual / ordered;
    sigma_start ≥ sigma_end: the push acts while sigma_end ≤ σ ≤ sigma_start; enforce: project final
    outputs out of the static shield; margin: relative slack of that projection; batch_scale: 0 = the
    images of a batch repel each other within r (the paper's SPELL), > 0 = within the batch radius
    ``batch_radius`` (a multiple of the batch's own spacing) while r stays the radius of the protected set
    and the memory; reuse: 0 = search the static references at every model call, > 0 = reuse one search at
    r·(1 + reuse) until an image's x̂0 has moved r·reuse (``shield.StepReuse``; exact); batch_sigma_end: the
    images of a batch repel each other only while σ ≥ batch_sigma_end (and inside the window), so the last
    steps refine each image undisturbed (0: until the end, the paper's SPELL); the protected set and the
    memory push in the whole window."""

    r: float
    lam: float = 1.6
    in_batch: str = "ordered"
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    enforce: bool = True
    margin: float = 1e-4
    batch_scale: float = 0.0
    reuse: float = 0.0
    batch_sigma_end: float = 0.0

    def __post_init__(self):
        if not (self.r > 0 and math.isfinite(self.r)):
            raise ValueError(f"radius must be a finite number > 0, got {self.r}")
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"overcompensation must be a finite number ≥ 0, got {self.lam}")
        if not (self.reuse >= 0 and math.isfinite(self.reuse)):
            raise ValueError(f"reuse must be a finite number ≥ 0, got {self.reuse}")
        if not self.batch_sigma_end >= 0:
            raise ValueError(f"batch_sigma_end must be a number ≥ 0, got {self.batch_sigma_end}")
        if not (self.batch_scale >= 0 and math.isfinite(self.batch_scale)):
            raise ValueError(f"batch radius scale must be a finite number ≥ 0, got {self.batch_scale}")
        if self.in_batch not in IN_BATCH_MODES:
            raise ValueError(f"in_batch must be one of {IN_BATCH_MODES}, got {self.in_batch!r}")


@dataclass
class StepRecord:
    """One model call: σ, references pushing each image, ||Δ|| / ||x̂0 − x_t|| per image, the in-batch radius
    (in feature units when SpellRun has features)."""

    sigma: float
    active_pairs: list[int]
    push_ratio: list[float]
    batch_r: float = math.nan


@dataclass
class RunLog:
    """What one run did, for the report node and the benchmarks (r: the run's shield radius, RMS)."""

    batch: int = 0
    n_static: int = 0
    r: float = math.nan
    steps: list[StepRecord] = field(default_factory=list)
    enforced: int = 0
    shield_searched_rows: int = 0  # (model call, image) pairs that searched the static references
    shield_reused_rows: int = 0  # ... that reused an earlier search (StepReuse)
    nearest_batch: list[float] = field(default_factory=list)
    finished: bool = False
    _nearest_static: list[float] | None = field(default=None, repr=False)
    _nearest_fn: object = field(default=None, repr=False, compare=False)

    @property
    def nearest_static(self) -> list[float]:
        """RMS distance of each final output to its nearest static reference (inf beyond NEAREST_CAP·r).

        Computed on first use (by the report), not when the run finishes: on a million-reference index the
        searches out to NEAREST_CAP·r can cost more than the whole run, and sampling should not pay for them.
        The shield the run saw is kept for it (memory parts are snapshots, so later appends do not count)."""
        if self._nearest_static is None:
            self._nearest_static = self._nearest_fn().tolist() if self._nearest_fn is not None else []
            self._nearest_fn = None
        return self._nearest_static

    def active_share(self) -> float:
        """Share of (model call, image) pairs where the push was non-zero."""
        pairs = [a for s in self.steps for a in s.active_pairs]
        return sum(a > 0 for a in pairs) / max(len(pairs), 1)

    def pushed_per_step(self) -> list[int]:
        """How many images of the batch were pushed at each logged model call."""
        return [sum(a > 0 for a in s.active_pairs) for s in self.steps]

    def max_push_per_step(self) -> list[float]:
        """The largest ||Δ|| / ||x̂0 − x_t|| over the batch at each logged model call."""
        return [max(s.push_ratio, default=0.0) for s in self.steps]


class SpellRun:
    """Sparse repellency over one sampling run.

    shield: the protected set and batch memory in model space (``shield.Shield``; may be empty).
    features: None = the images of the batch repel each other in model space; a differentiable map φ: x̂0
    [B, ...] -> [B, F] = they repel each other in its feature space (``feature_push``: SPELL on φ(x̂0) within the
    adaptive radius of the features' own spacing, carried back by one Gauss–Newton step). The protected set and
    the memory always repel in model space within r.
    """

    def __init__(self, config: SpellConfig, shield: Shield | None, sample_shape: tuple,
                 features: Features | None = None):
        check_features(features, config.batch_scale)
        self.config = config
        self.features = features
        self.sample_shape = tuple(sample_shape)
        self.shield = shield if shield is not None else Shield([])
        self.log = RunLog(batch=self.sample_shape[0], n_static=len(self.shield), r=config.r)
        self.batch_r = math.inf  # the adaptive in-batch radius so far (never grows within a run)
        self.reuse = StepReuse(self.shield, config.r * config.reuse) if config.reuse > 0 and len(self.shield) else None

    def active(self, sigma: float) -> bool:
        return self.config.sigma_end <= sigma <= self.config.sigma_start

    def static_push(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """λ Σ_k relu(r/d − 1)(x̂0 − z_k) over the references found within r -> (Δ [B, D], active [B])."""
        xf = flat32(x0)
        if self.reuse is not None:
            i, k, d, z = self.reuse.pairs(x0, self.config.r)
        else:
            i, k, d = self.shield.range_search(x0, self.config.r)
            z = self.shield.get(k, x0.device)
        w = repellency_weights(d, self.config.r)
        delta = sparse_push(xf, z, i, torch.arange(len(k), device=x0.device), w) * self.config.lam
        return delta, torch.bincount(i, minlength=x0.shape[0])

    def step(self, x0: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x̂0 -> x̂0 + Δ for one model call (post-CFG); x0 is returned untouched outside the window."""
        s = float(sigma.max())
        if not self.active(s) or x0.shape[0] == 0:
            return x0
        cfg = self.config
        delta, active = self.static_push(x0)
        mask = in_batch_mask(x0.shape[0], cfg.in_batch, x0.device) if s >= cfg.batch_sigma_end else None
        r_b = math.nan
        if mask is not None and self.features is not None:
            d_b, a_b, r_b = feature_push(self.features, x0, cfg.lam, mask, self.in_batch_radius)
            delta, active = delta + d_b, active + a_b
        elif mask is not None:
            xf = flat32(x0)
            d = rms_cdist(xf, xf)  # one distance matrix for the batch radius and the push
            r_b = self.in_batch_radius(x0, d)
            d_b, a_b = repellency(x0, x0, r_b, cfg.lam, mask, d)
            delta, active = delta + flat32(d_b), active + a_b
        score = flat32(x0 - x_t).norm(dim=1).clamp_min(1e-12)
        self.log.steps.append(StepRecord(s, active.tolist(), (delta.norm(dim=1) / score).tolist(), r_b))
        if not bool(active.any()):
            return x0
        return x0 + delta.reshape(x0.shape).to(x0.dtype)

    def in_batch_radius(self, x0: torch.Tensor, d: torch.Tensor | None = None) -> float:
        """The radius within which the images of the batch repel each other at this model call: r, or with
        batch_scale > 0 ``batch_radius(x0, batch_scale, d)`` capped by its value at the run's earlier calls
        (with ``features``: x0 and d are the features and their distances, the cap is in feature units)."""
        if self.config.batch_scale == 0:
            return self.config.r
        self.batch_r = min(self.batch_r, batch_radius(x0, self.config.batch_scale, d))
        return self.batch_r

    def finish(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final outputs [B, ...] (model space) -> (outputs, moved [B] bool): rows closer than r to a static
        reference are projected out of the shield if enforce is on; other rows are returned untouched."""
        moved = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if self.config.enforce and len(self.shield):
            x, moved = self.shield.project_out(x, self.config.r, self.config.margin)
        self.log.enforced = int(moved.sum())
        if self.reuse is not None:
            self.log.shield_searched_rows, self.log.shield_reused_rows = self.reuse.searched_rows, self.reuse.reused_rows
        final, shield, cap = x.detach().clone(), self.shield, NEAREST_CAP * self.config.r
        self.log._nearest_fn = lambda: shield.nearest(final, cap)
        b = x.shape[0]
        self.log.nearest_batch = nearest(x, x, ~torch.eye(b, dtype=torch.bool, device=x.device)).tolist()
        self.log.finished = True
        return x, moved


def check_features(features, batch_scale: float) -> None:
    """ValueError unless features is None or a callable usable with this batch radius scale (the feature-space
    push needs the adaptive radius: an absolute r is in the model's units, not the features')."""
    if features is None:
        return
    if not callable(features):
        raise ValueError(f"features must be a callable x̂0 [B, ...] -> [B, F] or None, got {type(features).__name__}")
    if not batch_scale > 0:
        raise ValueError("a feature-space push needs batch_radius_scale > 0 (SpellConfig.batch_scale > 0, the adaptive "
                         "batch radius): the absolute radius r is in the model's units, not the features'")


def batch_radius(x0: torch.Tensor, scale: float, d: torch.Tensor | None = None) -> float:
    """scale × the median over the batch of each x̂0's RMS distance to its nearest other x̂0 [B, ...]
    (d [B, B]: the batch's RMS distances, when the caller has them).

    The batch's own spacing, so one scale suits a spread-out prompt and a tight one, any model and any
    resolution. SpellRun holds it non-increasing over a run: the spacing grows as the push spreads the batch,
    and a radius that followed it would push harder at every call (measured: it runs away above scale ≈ 1.1,
    docs/diversity_decide.md). Batches of one image have no spacing (0: no push)."""
    b = x0.shape[0]
    if b < 2:
        return 0.0
    if d is None:
        d = rms_cdist(flat32(x0), flat32(x0))
    off = torch.where(torch.eye(b, dtype=torch.bool, device=d.device), torch.full_like(d, math.inf), d)
    return scale * float(off.min(1).values.median())


class RunHistory:
    """The logs of the runs of one patched model, latest last (at most ``keep``).

    A shared handle: ComfyUI's ``ModelPatcher.clone()`` deep-copies ``model_options``, and a copy would
    stop seeing later runs, so copying returns the same object.
    """

    def __init__(self, keep: int = 16):
        self.keep = keep
        self.runs: list[RunLog] = []

    def add(self, log: RunLog) -> None:
        self.runs = (self.runs + [log])[-self.keep:]

    def latest(self) -> RunLog | None:
        return self.runs[-1] if self.runs else None

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self
