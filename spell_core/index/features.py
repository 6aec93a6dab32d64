"""Contractive lower-bound features of the index (step 1 of the method in ``spell_core.index.search``).

y(x) = [W(x − μ), ||(I − WᵀW)(x − μ)||] with W an orthonormal basis [m, D]: the top principal directions
(``pca_basis``) or average pooling (``pool_basis``); ``Features`` computes it, ``project_store`` streams a whole
``LatentStore`` through a basis, ``cascade_basis`` fits the subspace of the cascade's cells.
"""
from __future__ import annotations

import torch

from ..storage import check_finite
from .shards import LatentStore, ProgressFn

# Relative slack on lower bounds, in units of the norms involved: float32 storage/scan error is ~1e-6 of them.
SLACK = 1e-4
# "cascade": dimension m of the subspace holding the cell centres, references per k-means cell before
# impure cells are split, and the split rule (cells with a radius above CASCADE_SPLIT × the median
# reference-to-centre distance are re-clustered, up to CASCADE_ROUNDS times).
CELL_DIM = 256
CASCADE_CELL = 64
CASCADE_SPLIT = 2.0
CASCADE_ROUNDS = 6


def pca_basis(sample: torch.Tensor, m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and orthonormal top-m principal directions W [m, D] (float64) of sample [n, D].

    Randomised SVD (Halko et al. 2011): the directions need not be optimal, only orthonormal, which the
    final float64 QR guarantees whatever the data."""
    mu = sample.double().mean(0)
    xc = (sample.double() - mu).float()
    state = torch.random.get_rng_state()  # svd_lowrank draws its test matrix from the global generator
    torch.manual_seed(seed)
    try:
        _, _, v = torch.svd_lowrank(xc, q=min(m + 8, *xc.shape), niter=4)
    finally:
        torch.random.set_rng_state(state)
    q, _ = torch.linalg.qr(v[:, :m].double())
    return mu, q.T.contiguous()


def pool_basis(item_shape: tuple, pool: int) -> torch.Tensor:
    """Orthonormal rows [C·(h/pool)·(w/pool), D]: average pooling over pool×pool blocks times pool."""
    if len(item_shape) != 3 or item_shape[1] % pool or item_shape[2] % pool:
        raise ValueError(f"pool projection needs [C, h, w] latents divisible by pool={pool}, got {item_shape}")
    c, h, w = item_shape
    eye = torch.eye(c * (h // pool) * (w // pool), dtype=torch.float64).reshape(-1, c, h // pool, w // pool)
    up = eye.repeat_interleave(pool, 2).repeat_interleave(pool, 3) / pool
    return up.reshape(eye.shape[0], -1).contiguous()


class Features:
    """y(x) = [W(x − μ), ρ(x)], ρ(x) = ||(I − WᵀW)(x − μ)||: 1-Lipschitz, computed in float64."""

    def __init__(self, mu: torch.Tensor, w: torch.Tensor):
        self.mu, self.w = mu.double(), w.double()

    @property
    def dim(self) -> int:
        return self.w.shape[0] + 1

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, D] -> (y [n, m + 1] float64, ||x − μ|| [n] float64)."""
        xc = x.to("cpu", torch.float64) - self.mu
        p = xc @ self.w.T
        n2 = (xc * xc).sum(1)
        rho = (n2 - (p * p).sum(1)).clamp_min(0).sqrt()  # float64: cancellation error ≤ 1e-8·||x − μ||
        return torch.cat([p, rho[:, None]], 1), n2.sqrt()



def project_store(store: "LatentStore", mu: torch.Tensor, basis: torch.Tensor, dim: int,
                  progress: ProgressFn | None = None, check: bool = True):
    """One streamed pass over the references with basis [M, D] (float64; its first dim rows are the feature
    basis) -> (features y [N, dim + 1] float32, p [N, M] float32, ρ_M² [N] float64, max ‖z − μ‖)."""
    n = len(store)
    y = torch.empty(n, dim + 1)
    p_all = torch.empty(n, basis.shape[0])
    rho2 = torch.empty(n, dtype=torch.float64)
    znorm = 0.0
    for a, rows in store.chunks(8192):
        if check and store.tensor is None:
            check_finite(rows, f"reference rows {a}..{a + len(rows)}")
        xc = rows.to(torch.float64) - mu
        p = xc @ basis.T
        n2 = (xc * xc).sum(1)
        head = (p[:, :dim] * p[:, :dim]).sum(1)
        b = a + len(rows)
        y[a:b, :dim] = p[:, :dim].float()
        y[a:b, dim] = (n2 - head).clamp_min(0).sqrt().float()  # = Features(mu, basis[:dim])(rows)
        p_all[a:b] = p.float()
        rho2[a:b] = (n2 - (p * p).sum(1)).clamp_min(0)
        znorm = max(znorm, float(n2.max().sqrt()))
        if progress is not None:
            progress(b, n)
    return y, p_all, rho2, znorm


def cascade_basis(store: "LatentStore", fit_rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, orthonormal basis [M, D]) of the cascade's cell subspace, M = min(CELL_DIM, D, N − 1)."""
    n, dmodel = len(store), store.dim
    mc = max(1, min(CELL_DIM, dmodel, max(n - 1, 1)))
    if n >= 2:
        return pca_basis(store.sample(fit_rows, seed), mc, seed)
    return torch.zeros(dmodel, dtype=torch.float64), torch.eye(mc, dmodel, dtype=torch.float64)
