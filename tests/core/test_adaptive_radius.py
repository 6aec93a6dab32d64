"""The adaptive in-batch radius of SpellRun (``batch_scale`` > 0): a multiple of the batch's own spacing, held
non-increasing over a run, the static shield keeping the absolute r."""
import math

import pytest
import torch

from spell_core import SpellConfig, SpellRun, nearest
from spell_core.run import batch_radius
from spell_core.shield import Shield, TensorPart


def spread(seed, n, scale):
    return torch.randn(n, 4, 3, 3, generator=torch.Generator().manual_seed(seed)) * scale


def test_batch_radius_is_scale_times_median_nearest_neighbour():
    x = torch.zeros(4, 1, 1, 1)
    x[:, 0, 0, 0] = torch.tensor([0.0, 1.0, 3.0, 7.0])  # nearest-neighbour distances 1, 1, 2, 4
    assert batch_radius(x, 1.5) == pytest.approx(1.5 * 1.0)  # torch's median of an even count: the lower middle
    assert batch_radius(x[:1], 2.0) == 0.0


@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_the_radius_follows_the_batch_not_its_units(scale):
    """The same batch at another scale (another VAE, another resolution's statistics): the same images are
    pushed, by pushes scaled alike, where an absolute radius would act on all or none of them."""
    x = spread(0, 8, 1.0)
    x_t = torch.zeros_like(x)
    runs = [SpellRun(SpellConfig(r=1.0, in_batch="mutual", batch_scale=1.2), None, x.shape) for _ in range(2)]
    a = runs[0].step(x, x_t, torch.tensor([5.0]))
    b = runs[1].step(x * scale, x_t, torch.tensor([5.0]))
    assert runs[0].log.steps[0].active_pairs == runs[1].log.steps[0].active_pairs
    assert 0 < sum(runs[0].log.steps[0].active_pairs)
    assert torch.allclose(b, a * scale, atol=1e-5)
    assert runs[1].log.steps[0].batch_r == pytest.approx(scale * runs[0].log.steps[0].batch_r, rel=1e-5)


def test_the_radius_never_grows_within_a_run_and_restarts_with_the_next():
    run = SpellRun(SpellConfig(r=1.0, in_batch="mutual", batch_scale=1.2), None, (8, 4, 3, 3))
    for k, scale in enumerate([1.0, 2.0, 0.5, 3.0]):  # the batch spreads out, contracts, spreads again
        run.step(spread(1, 8, scale), torch.zeros(8, 4, 3, 3), torch.tensor([10.0 - k]))
    radii = [s.batch_r for s in run.log.steps]
    assert radii == sorted(radii, reverse=True) and radii[2] < radii[0]
    assert radii[3] == radii[2]  # capped: the spreading batch does not widen it
    fresh = SpellRun(run.config, None, (8, 4, 3, 3))
    fresh.step(spread(1, 8, 3.0), torch.zeros(8, 4, 3, 3), torch.tensor([10.0]))
    assert fresh.log.steps[0].batch_r > radii[3]


def test_scale_zero_is_the_papers_absolute_radius():
    x = spread(2, 6, 1.0)
    r = float(nearest(x, x, ~torch.eye(6, dtype=torch.bool)).median())
    absolute = SpellRun(SpellConfig(r=r, in_batch="mutual"), None, x.shape)
    absolute.step(x, torch.zeros_like(x), torch.tensor([1.0]))
    assert absolute.log.steps[0].batch_r == r


def test_the_protected_set_keeps_the_absolute_radius():
    """A reference within r of an image pushes it whatever the batch's spacing; the in-batch radius is apart."""
    x = spread(3, 4, 10.0)  # widely spread batch: its adaptive radius is far above r
    ref = x[:1] + 0.01
    run = SpellRun(SpellConfig(r=0.05, in_batch="off", batch_scale=1.2), Shield([TensorPart(ref)]), x.shape)
    run.step(x, torch.zeros_like(x), torch.tensor([1.0]))
    assert run.log.steps[0].active_pairs == [1, 0, 0, 0]
    assert math.isnan(run.log.steps[0].batch_r)  # in-batch off: no batch radius


@pytest.mark.parametrize("bad", [-0.1, math.inf, math.nan])
def test_bad_scale_is_refused(bad):
    with pytest.raises(ValueError, match="batch radius scale"):
        SpellConfig(r=0.5, batch_scale=bad)


def test_the_batch_push_stops_at_batch_sigma_end_while_the_shield_keeps_pushing():
    """batch_sigma_end: the images repel each other only while σ ≥ it; below, a batch with no reference near is
    returned bit-identical, and a protected reference within r still pushes."""
    x = spread(2, 8, 1.0)
    x_t = torch.zeros_like(x)
    cfg = SpellConfig(r=0.5, in_batch="mutual", batch_scale=1.2, batch_sigma_end=1.0)
    run = SpellRun(cfg, None, x.shape)
    above = run.step(x, x_t, torch.tensor([1.0]))  # σ = batch_sigma_end: still on
    assert sum(run.log.steps[0].active_pairs) > 0 and not torch.equal(above, x)
    below = run.step(x, x_t, torch.tensor([0.99]))
    assert torch.equal(below, x) and sum(run.log.steps[1].active_pairs) == 0
    assert math.isnan(run.log.steps[1].batch_r)
    ref = x[:1] + 0.01  # a protected reference next to image 0
    shielded = SpellRun(cfg, Shield([TensorPart(ref)]), x.shape)
    out = shielded.step(x, x_t, torch.tensor([0.5]))
    assert shielded.log.steps[0].active_pairs == [1] + [0] * 7
    assert not torch.equal(out[0], x[0]) and torch.equal(out[1:], x[1:])


@pytest.mark.parametrize("bad", [-0.1, math.nan])
def test_a_bad_batch_sigma_end_is_refused(bad):
    with pytest.raises(ValueError, match="batch_sigma_end"):
        SpellConfig(r=0.5, batch_sigma_end=bad)
