"""The peer methods' maths (spell_core/peers.py), used by the SPELL CADS and SPELL Guidance Interval nodes and by
benchmarks/spell_bench.py: CADS' schedule and condition corruption, Particle Guidance's RBF repulsion, the
guidance interval's rule."""
import math

import pytest
import torch

from spell_core.peers import (cads_condition, cads_gamma, cads_on_cond_chunks, guided, normalised_time,
                              particle_guidance, rbf_repulsion)


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


def test_cads_noise_scale_zero_is_not_a_no_op():
    """s = 0: ŷ = √γ·y; ψ = 1 rescales it back to y (up to rounding) for γ > 0, to the constant mean(y) at γ = 0."""
    y = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(2)) * 3 - 1
    assert torch.allclose(cads_condition(y, 0.4, 0.0, 1.0), y, atol=1e-5)
    assert torch.allclose(cads_condition(y, 0.4, 0.0, 0.0), math.sqrt(0.4) * y)
    flat = cads_condition(y, 0.0, 0.0, 1.0)
    assert torch.allclose(flat, y.mean((1, 2), keepdim=True).expand_as(y))


def test_cads_acts_on_the_conditional_chunks_only():
    """Chunks stacked as ComfyUI's model call batches them ([uncond, cond] here): the uncond chunk keeps its exact
    bits, the cond chunk gets the noise a generator of the same seed gives cads_condition; γ = 1 or no cond chunk
    returns the input itself."""
    y = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(3))
    out = cads_on_cond_chunks(y, [1, 0], 0.5, 0.25, 1.0, torch.Generator().manual_seed(4))
    assert torch.equal(out[:2], y[:2])
    assert torch.equal(out[2:], cads_condition(y[2:], 0.5, 0.25, 1.0, torch.Generator().manual_seed(4)))
    assert cads_on_cond_chunks(y, [1, 0], 1.0, 0.25, 1.0) is y
    assert cads_on_cond_chunks(y, [1], 0.0, 0.25, 1.0) is y


def test_normalised_time_reads_the_discrete_timestep():
    class Discrete:
        sigmas = torch.linspace(0.1, 10.0, 1000)

        def timestep(self, sigma):
            return (self.sigmas - sigma).abs().argmin()

    assert normalised_time(Discrete(), 10.0) == 1.0
    assert normalised_time(Discrete(), 0.1) == 0.0
    assert normalised_time(Discrete(), float(Discrete.sigmas[333])) == pytest.approx(333 / 999)


def test_guidance_interval_is_half_open():
    """(σ_lo, σ_hi]: the upper end is guided, the lower one not; an empty interval guides nothing."""
    assert guided(5.0, 0.28, 5.0) and guided(0.29, 0.28, 5.0)
    assert not guided(0.28, 0.28, 5.0) and not guided(5.01, 0.28, 5.0)
    assert not any(guided(s, 1.5, 1.5) for s in (1.0, 1.5, 2.0))


def test_particle_guidance_adds_w_sigma_times_the_repulsion():
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64)
    assert torch.allclose(particle_guidance(x, sigma, 0.5), x + 0.5 * 2.0 * rbf_repulsion(x))
    assert torch.equal(particle_guidance(x, sigma, 0.0), x)
