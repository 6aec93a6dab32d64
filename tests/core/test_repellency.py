"""The repellency maths of spell_core (SPELL, arXiv 2410.06025): closed forms, properties, no-op cases."""
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spell_core import in_batch_mask, nearest, project_out, repellency
from spell_core.repellency import ray_exit, rms_cdist

SHAPE = (4, 3, 3)
D = math.prod(SHAPE)


def batch(seed, n, scale=1.0):
    return torch.randn((n,) + SHAPE, generator=torch.Generator().manual_seed(seed)) * scale


def rms(a, b):
    return ((a - b).pow(2).mean()).sqrt().item()


def test_core_never_imports_comfyui():
    """spell_core loads in a process where no comfy package can be found."""
    code = "import sys; sys.modules['comfy'] = None; import spell_core; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(__import__('pathlib').Path(__file__).parents[2]))
    assert out.stdout.strip() == "ok", out.stderr


@given(d=st.floats(0.01, 0.99), lam=st.floats(0.0, 3.0), seed=st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_single_reference_closed_form(d, lam, seed):
    """One reference at RMS distance d < r: the new distance is d + λ(r − d) along the same ray (r = 1)."""
    z = batch(seed, 1).double()
    u = batch(seed + 1, 1).double()
    u = u / (u.pow(2).mean().sqrt())
    x = z + d * u
    delta, active = repellency(x, z, 1.0, lam)
    assert active.tolist() == [1]
    assert rms(x + delta, z) == pytest.approx(d + lam * (1 - d), rel=1e-6)
    cos = torch.nn.functional.cosine_similarity((x + delta - z).flatten(), (x - z).flatten(), dim=0)
    assert cos.item() == pytest.approx(1.0, abs=1e-9)


@given(seed=st.integers(0, 10_000), r=st.floats(0.05, 2.0))
@settings(max_examples=60, deadline=None)
def test_no_push_outside_the_balls(seed, r):
    """Sparsity: references all farther than r give Δ exactly 0."""
    x = batch(seed, 3)
    z = batch(seed + 7, 5)
    far = rms_cdist(x.flatten(1), z.flatten(1)).min().item()
    delta, active = repellency(x, z, min(r, far * 0.999), 1.6)
    assert torch.equal(delta, torch.zeros_like(x))
    assert active.sum().item() == 0


@given(seed=st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_rows_are_independent_for_static_references(seed):
    """Batch invariance: each image's push depends only on itself and the references."""
    x = batch(seed, 5)
    z = x[[1, 3]] + 0.1 * batch(seed + 1, 2)
    full, _ = repellency(x, z, 0.8, 1.6)
    for i in range(5):
        alone, _ = repellency(x[i:i + 1], z, 0.8, 1.6)
        torch.testing.assert_close(full[i:i + 1], alone, rtol=1e-6, atol=1e-6)


def test_dtype_device_shape_and_lambda_zero():
    x = batch(0, 3).half()
    z = x[:1].float() + 0.01
    delta, _ = repellency(x, z, 1.0, 1.6)
    assert delta.dtype == torch.float16 and delta.shape == x.shape and delta.device == x.device
    zero, _ = repellency(x.float(), z, 1.0, 0.0)
    assert torch.equal(zero, torch.zeros_like(x.float()))


def test_reference_equal_to_image_gives_no_direction():
    """x̂0 exactly on a reference: that reference has no direction, so it contributes nothing (no NaN)."""
    x = batch(0, 2)
    delta, _ = repellency(x, x[:1].clone(), 1.0, 1.6)
    assert torch.isfinite(delta).all()
    assert torch.equal(delta[0], torch.zeros_like(delta[0]))


def test_in_batch_masks():
    assert in_batch_mask(3, "off") is None
    assert in_batch_mask(3, "mutual").tolist() == [[False, True, True], [True, False, True], [True, True, False]]
    assert in_batch_mask(3, "ordered").tolist() == [[False, False, False], [True, False, False], [True, True, False]]
    with pytest.raises(ValueError, match="in-batch mode"):
        in_batch_mask(3, "sideways")


def test_ordered_mode_leaves_first_image_untouched():
    x = batch(3, 4, scale=0.01)
    delta, _ = repellency(x, x, 1.0, 1.6, in_batch_mask(4, "ordered"))
    assert torch.equal(delta[0], torch.zeros_like(delta[0]))
    assert (delta[1:].flatten(1).norm(dim=1) > 0).all()


@given(seed=st.integers(0, 10_000), n=st.integers(1, 12), r=st.floats(0.1, 1.5), spread=st.floats(0.01, 1.0))
@settings(max_examples=80, deadline=None)
def test_projection_leaves_every_ball(seed, n, r, spread):
    """project_out: every output at RMS distance ≥ r from every reference, however the balls overlap."""
    centre = batch(seed, 1)
    z = centre + spread * batch(seed + 1, n)
    x = centre + spread * batch(seed + 2, 6)
    y = project_out(x, z, r)
    assert (nearest(y, z) >= r).all()
    outside = nearest(x, z) >= r
    assert torch.equal(y[outside], x[outside])


@given(d=st.floats(0.0, 0.99), seed=st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_projection_onto_one_ball_is_radial(d, seed):
    """A single ball: the projection is the point on its border along the ray from the centre (λ = 1)."""
    z = batch(seed, 1).double()
    u = batch(seed + 1, 1).double()
    u = u / u.pow(2).mean().sqrt()
    x = z + d * u
    y = project_out(x, z, 1.0, margin=0.0)
    if d > 1e-6:  # below that, x − z is dominated by rounding of z + d·u and has no reliable direction
        torch.testing.assert_close(y, z + u, rtol=1e-7, atol=1e-7)
    assert rms(y, z) == pytest.approx(1.0, rel=1e-6)


def test_ray_exit_skips_over_a_chain_of_balls():
    """Balls centred at 0, 1.5, 3 on a line (radius 1): from 0 along the line the first gap is at 4."""
    z = torch.tensor([[0.0], [1.5], [3.0]], dtype=torch.float64)
    assert ray_exit(torch.tensor([0.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64), z, 1.0) == pytest.approx(4.0)


def test_nearest_with_mask_and_empty():
    x = batch(0, 3)
    assert torch.isinf(nearest(x, x[:0])).all()
    d = nearest(x, x, ~torch.eye(3, dtype=torch.bool))
    assert (d > 0).all()


def test_metrics_closed_forms():
    """Vendi: N orthogonal items -> N, identical -> 1; PRDC of a set against itself -> 1; FD(a, a) -> 0."""
    from spell_core.metrics import class_shares, frechet_distance, prdc, vendi_score

    assert vendi_score(torch.eye(5)) == pytest.approx(5.0)
    assert vendi_score(torch.ones(5, 3)) == pytest.approx(1.0)
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    scores = prdc(x, x, k=5)
    assert scores["precision"] == scores["recall"] == scores["coverage"] == 1.0
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(x, x + 2.0) == pytest.approx(16.0, rel=1e-6)  # |Δμ|² = 4 · 2²
    assert class_shares(torch.eye(3)[[0, 0, 2, 2]]).tolist() == [0.5, 0.0, 0.5]
