"""Diversity and quality metrics on feature vectors [N, F] (plain torch).

- Vendi score: Friedman & Dieng (2023), exp of the Shannon entropy of the eigenvalues of K/N, cosine kernel.
- Precision, recall, density, coverage: Naeem et al. (2020), k-NN balls as in the ``prdc`` package.
- Fréchet distance between Gaussians fitted to two feature sets (FID's formula, any feature extractor).
"""
from __future__ import annotations

import torch


def vendi_score(features: torch.Tensor) -> float:
    """Effective number of distinct items (1 = all identical, N = all orthogonal)."""
    x = torch.nn.functional.normalize(features.double(), dim=1)
    eig = torch.linalg.eigvalsh(x @ x.T / x.shape[0]).clamp_min(0)
    eig = eig[eig > 1e-12]
    return float(torch.exp(-(eig * eig.log()).sum()))


def _kth_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict:
    """Precision, recall, density, coverage of fake against real features (k nearest neighbours)."""
    real, fake = real.double(), fake.double()
    r_real, r_fake = _kth_radius(real, k), _kth_radius(fake, k)
    d = torch.cdist(real, fake)  # [R, F]
    inside_real = d < r_real[:, None]
    return {
        "precision": float(inside_real.any(0).double().mean()),
        "recall": float((d < r_fake[None, :]).any(1).double().mean()),
        "density": float(inside_real.double().sum(0).mean() / k),
        "coverage": float((d.min(1).values < r_real).double().mean()),
    }


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||μa − μb||² + Tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    sa = _sqrtm_psd(ca)
    cross = _sqrtm_psd(sa @ cb @ sa)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(ca + cb - 2 * cross))


def class_shares(probabilities: torch.Tensor, classes: int | None = None) -> torch.Tensor:
    """Share of each predicted class among the rows of probabilities [N, K]."""
    k = classes or probabilities.shape[1]
    return torch.bincount(probabilities.argmax(1), minlength=k).double() / probabilities.shape[0]
