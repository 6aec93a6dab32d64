"""One sampling run with sparse repellency: the references, the push at every model call, the final
enforcement of the shield, and a log of what happened (SPELL, arXiv 2410.06025, Algorithm 1).

Everything is in the sampler's own space (model space); callers convert latents in and out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .repellency import IN_BATCH_MODES, flat32, in_batch_mask, nearest, project_out, repellency


@dataclass(frozen=True)
class SpellConfig:
    """r: shield radius (RMS, model space); lam: overcompensation λ; in_batch: off / mutual / ordered;
    sigma_start ≥ sigma_end: the push acts while sigma_end ≤ σ ≤ sigma_start; enforce: project final
    outputs out of the static shield; margin: relative slack of that projection."""

    r: float
    lam: float = 1.6
    in_batch: str = "ordered"
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    enforce: bool = True
    margin: float = 1e-4

    def __post_init__(self):
        if not (self.r > 0 and math.isfinite(self.r)):
            raise ValueError(f"radius must be a finite number > 0, got {self.r}")
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"overcompensation must be a finite number ≥ 0, got {self.lam}")
        if self.in_batch not in IN_BATCH_MODES:
            raise ValueError(f"in_batch must be one of {IN_BATCH_MODES}, got {self.in_batch!r}")


@dataclass
class StepRecord:
    """One model call: σ, references pushing each image, ||Δ|| / ||x̂0 − x_t|| per image."""

    sigma: float
    active_pairs: list[int]
    push_ratio: list[float]


@dataclass
class RunLog:
    """What one run did, for the report node and the benchmarks."""

    batch: int = 0
    n_static: int = 0
    steps: list[StepRecord] = field(default_factory=list)
    enforced: int = 0
    nearest_static: list[float] = field(default_factory=list)
    nearest_batch: list[float] = field(default_factory=list)
    finished: bool = False

    def active_share(self) -> float:
        """Share of (model call, image) pairs where the push was non-zero."""
        pairs = [a for s in self.steps for a in s.active_pairs]
        return sum(a > 0 for a in pairs) / max(len(pairs), 1)


class SpellRun:
    """Sparse repellency over one sampling run.

    static [N, ...]: protected references and batch memory, already in model space (may be empty).
    """

    def __init__(self, config: SpellConfig, static: torch.Tensor | None, sample_shape: tuple):
        self.config = config
        self.sample_shape = tuple(sample_shape)
        if static is None:
            static = torch.zeros((0,) + self.sample_shape[1:])
        if tuple(static.shape[1:]) != self.sample_shape[1:]:
            raise ValueError(
                f"references have shape {tuple(static.shape[1:])} per item, the sampler's latents "
                f"{self.sample_shape[1:]}: they must match (same model family and generation size)"
            )
        self.static = static
        self._static_on = {}
        self.log = RunLog(batch=self.sample_shape[0], n_static=static.shape[0])

    def static_on(self, like: torch.Tensor) -> torch.Tensor:
        """The static references on like's device in float32, moved once per run."""
        key = like.device
        if key not in self._static_on:
            self._static_on[key] = self.static.to(device=like.device, dtype=torch.float32)
        return self._static_on[key]

    def active(self, sigma: float) -> bool:
        return self.config.sigma_end <= sigma <= self.config.sigma_start

    def step(self, x0: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x̂0 -> x̂0 + Δ for one model call (post-CFG); x0 is returned untouched outside the window."""
        s = float(sigma.max())
        if not self.active(s) or x0.shape[0] == 0:
            return x0
        cfg = self.config
        delta, active = repellency(x0, self.static_on(x0), cfg.r, cfg.lam)
        mask = in_batch_mask(x0.shape[0], cfg.in_batch, x0.device)
        if mask is not None:
            d_b, a_b = repellency(x0, x0, cfg.r, cfg.lam, mask)
            delta, active = delta + d_b, active + a_b
        score = flat32(x0 - x_t).norm(dim=1).clamp_min(1e-12)
        self.log.steps.append(StepRecord(s, active.tolist(), (flat32(delta).norm(dim=1) / score).tolist()))
        if not bool(active.any()):
            return x0
        return x0 + delta

    def finish(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final outputs [B, ...] (model space) -> (outputs, moved [B] bool): rows closer than r to a static
        reference are projected out of the shield if enforce is on; other rows are returned untouched."""
        static = self.static_on(x)
        moved = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if self.config.enforce and static.shape[0]:
            moved = nearest(x, static).to(x.device) < self.config.r
            if bool(moved.any()):
                x = project_out(x, static, self.config.r, self.config.margin)
        self.log.enforced = int(moved.sum())
        self.log.nearest_static = nearest(x, static).tolist()
        b = x.shape[0]
        self.log.nearest_batch = nearest(x, x, ~torch.eye(b, dtype=torch.bool, device=x.device)).tolist()
        self.log.finished = True
        return x, moved

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
