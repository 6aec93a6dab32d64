"""The peer methods' maths used by benchmarks/spell_bench.py (benchmarks/peers.py): CADS' schedule and
condition corruption, Particle Guidance's RBF repulsion."""
import math

import pytest
import torch

from benchmarks.peers import cads_condition, cads_gamma, rbf_repulsion


def test_cads_gamma_piecewise_linear():
    assert cads_gamma(0.0, 0.6, 0.9) == 1.0
    assert cads_gamma(0.6, 0.6, 0.9) == 1.0
    assert cads_gamma(0.75, 0.6, 0.9) == pytest.approx(0.5)
    assert cads_gamma(0.9, 0.6, 0.9) == 0.0
    assert cads_gamma(1.0, 0.6, 0.9) == 0.0
    with pytest.raises(ValueError):
        cads_gamma(0.5, 0.9, 0.6)


def test_cads_condition_clean_at_gamma_one_and_rescaled_at_zero():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 2, 32, generator=g) * 2 + 1
    assert torch.equal(cads_condition(y, 1.0, 0.5, 1.0, g), y)
    out = cads_condition(y, 0.0, 0.5, 1.0, g)  # pure noise, rescaled to each sample's mean and std
    dims = (1, 2)
    assert torch.allclose(out.mean(dims), y.mean(dims), atol=1e-5)
    assert torch.allclose(out.std(dims), y.std(dims), atol=1e-5)
    raw = cads_condition(y, 0.0, 0.5, 0.0, torch.Generator().manual_seed(1))  # ψ = 0: s·n alone
    n = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(raw, 0.5 * n)
    mixed = cads_condition(y, 0.25, 0.5, 0.0, torch.Generator().manual_seed(1))
    assert torch.allclose(mixed, math.sqrt(0.25) * y + 0.5 * math.sqrt(0.75) * n, atol=1e-6)


def test_rbf_repulsion_is_minus_the_kernel_gradient():
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    b = x.shape[0]
    flat = x.reshape(b, -1)
    sq = torch.cdist(flat, flat).pow(2)
    h = float(sq[~torch.eye(b, dtype=torch.bool)].median()) / math.log(b)
    xr = x.clone().requires_grad_(True)
    f = xr.reshape(b, -1)
    phi = torch.exp(-(f[:, None] - f[None]).pow(2).sum(-1) / h).sum()
    (grad,) = torch.autograd.grad(phi, xr)
    # Φ counts every pair twice (k_ij and k_ji); the per-particle repulsion is half of −∇Φ
    assert torch.allclose(rbf_repulsion(x), -grad / 2, atol=1e-10)


def test_rbf_repulsion_pushes_pairs_apart_and_is_zero_alone():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    d = rbf_repulsion(x)
    assert d[0, 0] < 0 < d[1, 0] and torch.allclose(d[0], -d[1])
    assert torch.equal(rbf_repulsion(x[:1]), torch.zeros(1, 2))
