"""SPELL's in-batch push in a feature space (spell_core.feature_push, SpellRun(features=...)): closed forms for
identity and linear maps, sparsity, a nonlinear conv net, refusals."""
import math

import pytest
import torch

from spell_core import SpellConfig, SpellRun, in_batch_mask, repellency
from spell_core.feature_push import feature_push
from spell_core.repellency import flat32, rms_cdist

SHAPE = (4, 4, 4)
D = math.prod(SHAPE)


def batch(seed, n, scale=1.0):
    return torch.randn((n,) + SHAPE, generator=torch.Generator().manual_seed(seed)) * scale


def flatten(x):
    return x.reshape(x.shape[0], -1)


def conv_net(seed=0):
    """A small nonlinear φ: [B, 4, 4, 4] -> [B, 12] (conv, SiLU, strided conv, tanh, linear)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(),
                              torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.Tanh(),
                              torch.nn.Flatten(), torch.nn.Linear(32, 12))
    return net.requires_grad_(False)


def pairs(seed, n_pairs, gap=0.05):
    """n_pairs near-duplicate pairs (2k, 2k+1), the pairs far apart from each other."""
    base = batch(seed, n_pairs, 2.0)
    noise = torch.randn((n_pairs,) + SHAPE, generator=torch.Generator().manual_seed(seed + 1))
    return torch.stack([v for b, e in zip(base, noise) for v in (b, b + gap * e)])


def step(run, x, sigma=1.0):
    return run.step(x, torch.zeros_like(x), torch.tensor([sigma]))


@pytest.mark.parametrize("mode", ["mutual", "ordered"])
def test_identity_features_give_the_latent_push(mode):
    """φ = flattening: g = Δf, u = Δf, α = 1, so the feature push is the model-space push, radius cap included,
    over several calls of one run."""
    cfg = SpellConfig(r=1.0, in_batch=mode, batch_scale=1.2)
    latent, feat = SpellRun(cfg, None, (8,) + SHAPE), SpellRun(cfg, None, (8,) + SHAPE, features=flatten)
    for k, spread in enumerate([1.0, 2.0, 0.7]):
        x = batch(k, 8, spread)
        a, b = step(latent, x, 5.0 - k), step(feat, x, 5.0 - k)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert torch.equal(a, x) == (k == 1)  # the spread-out call lies beyond the capped radius
        assert feat.log.steps[k].active_pairs == latent.log.steps[k].active_pairs
        assert feat.log.steps[k].batch_r == pytest.approx(latent.log.steps[k].batch_r, rel=1e-6)


@pytest.mark.parametrize("c", [0.3, 4.0])
def test_isotropic_linear_map_reproduces_the_feature_move(c):
    """φ(x) = c·Q x with orthonormal rows (J Jᵀ = c² I): J Δx = Δf exactly, Δx = Qᵀ Δf / c."""
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(3)))
    Q = q[:20]  # 20 orthonormal rows: F < D
    phi = lambda x: c * flatten(x) @ Q.T
    x = batch(4, 6)
    mask = in_batch_mask(6, "mutual")
    f = phi(x)
    r = float(rms_cdist(f, f).masked_fill(~mask, math.inf).min(1).values.median()) * 1.3
    dx, active, r_f = feature_push(phi, x, 1.6, mask, lambda f, d: r)
    df, a_ref = repellency(f, f, r, 1.6, mask)
    assert r_f == r and torch.equal(active, a_ref) and active.any()
    torch.testing.assert_close(c * dx @ Q.T, df, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx, df @ Q / c, rtol=1e-4, atol=1e-5)


def test_anisotropic_linear_map_gives_the_least_squares_step_along_the_gradient():
    """φ(x) = A x: Δx = α Aᵀ Δf with α minimising ||α A Aᵀ Δf − Δf||: the residual is orthogonal to A Aᵀ Δf."""
    A = torch.randn(10, D, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.2, 3.0, 10)[:, None]
    phi = lambda x: flatten(x) @ A.T
    x = batch(6, 5)
    mask = in_batch_mask(5, "mutual")
    f = phi(x)
    r = 2 * float(rms_cdist(f, f).max())  # every pair inside
    dx, active, _ = feature_push(phi, x, 1.6, mask, lambda f, d: r)
    df, _ = repellency(f, f, r, 1.6, mask)
    assert active.tolist() == [4] * 5
    g, u = df @ A, df @ A @ A.T
    alpha = (df * u).sum(1) / u.pow(2).sum(1)
    torch.testing.assert_close(dx, alpha[:, None] * g, rtol=1e-4, atol=1e-5)
    residual = df - dx @ A.T
    assert ((residual * u).sum(1).abs() <= 1e-3 * df.norm(dim=1) * u.norm(dim=1)).all()


def test_images_without_a_feature_neighbour_are_untouched():
    """Sparsity: two near-duplicate pairs pushed, the others returned bit-identical (Δ exactly 0)."""
    phi = conv_net()
    x = torch.cat([pairs(7, 2), batch(8, 4, 3.0)])
    f = phi(x)
    d = rms_cdist(f, f)
    r = 1.5 * max(float(d[0, 1]), float(d[2, 3]))
    mask = in_batch_mask(8, "mutual")
    assert (d.masked_fill(~mask, math.inf)[4:].min(1).values > r).all()  # the premise: the others are far
    dx, active, _ = feature_push(phi, x, 1.6, mask, lambda f, d: r)
    assert active.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert torch.equal(dx[4:], torch.zeros_like(dx[4:])) and (dx[:4].norm(dim=1) > 0).all()
    run = SpellRun(SpellConfig(r=1.0, in_batch="mutual", batch_scale=1.2), None, x.shape, features=phi)
    y = step(run, x)
    pushed = torch.tensor(run.log.steps[0].active_pairs) > 0
    assert pushed.any() and not pushed.all()
    assert torch.equal(y[~pushed], x[~pushed]) and not torch.equal(y[pushed], x[pushed])


def test_nothing_inside_the_radius_returns_the_input_itself():
    x = batch(9, 4)
    dx, active, _ = feature_push(conv_net(), x, 1.6, in_batch_mask(4, "mutual"), lambda f, d: 1e-6)
    assert active.sum() == 0 and torch.equal(dx, torch.zeros_like(dx))


@pytest.mark.parametrize("lam", [0.5, 1.6])
def test_a_conv_net_push_moves_the_features_apart(lam):
    """Nonlinear φ: one step increases the feature distance of every pushed pair, and each pushed image's
    feature change points along its wanted move Δf (the step follows g = Jᵀ Δf only, so not exactly along)."""
    phi = conv_net(1)
    x = pairs(10, 3, gap=0.1)
    f = phi(x)
    mask = in_batch_mask(6, "mutual")
    r = 2.0 * max(float(rms_cdist(f, f)[i, i + 1]) for i in (0, 2, 4))
    dx, active, _ = feature_push(phi, x, lam, mask, lambda f, d: r)
    assert active.tolist() == [1] * 6
    f2 = phi(x + dx.reshape(x.shape))
    for i in (0, 2, 4):
        assert rms_cdist(f2[i:i + 1], f2[i + 1:i + 2]) > 1.5 * rms_cdist(f[i:i + 1], f[i + 1:i + 2])
    df, _ = repellency(f, f, r, lam, mask)
    assert (torch.nn.functional.cosine_similarity(f2 - f, df, dim=1) > 0.5).all()


def test_works_under_comfyuis_inference_mode_and_no_grad():
    """ComfyUI samples under torch.inference_mode (its executor) and no_grad (k-diffusion's samplers)."""
    phi, x = conv_net(), pairs(11, 2)
    mask = in_batch_mask(4, "mutual")
    ref, _, _ = feature_push(phi, x, 1.6, mask, lambda f, d: 1.0)
    with torch.inference_mode():
        xi = x.clone()
        a, _, _ = feature_push(phi, xi, 1.6, mask, lambda f, d: 1.0)
    with torch.no_grad():
        b, _, _ = feature_push(phi, x, 1.6, mask, lambda f, d: 1.0)
    assert ref.abs().sum() > 0 and torch.equal(a, ref) and torch.equal(b, ref)


@pytest.mark.parametrize("bad, match", [
    (lambda x: flatten(x)[:-1], r"\[B, F\]"),
    (lambda x: flatten(x)[:, None], r"\[B, F\]"),
    (lambda x: flatten(x).sum(1), r"\[B, F\]"),
    (lambda x: flatten(x)[:, :0], r"F ≥ 1"),
    (lambda x: flatten(x).tolist(), "must return a tensor"),
    (lambda x: flatten(x) / 0, "non-finite"),
    (lambda x: flatten(x) * math.nan, "non-finite"),
    (lambda x: flatten(x).detach(), "differentiabl"),
    (lambda x: (flatten(x) * 10).long(), "floating-point"),
])
def test_bad_feature_maps_are_refused(bad, match):
    x = batch(12, 4)
    with pytest.raises(ValueError, match=match):
        feature_push(bad, x, 1.6, in_batch_mask(4, "mutual"), lambda f, d: 1.0)
    run = SpellRun(SpellConfig(r=1.0, in_batch="mutual", batch_scale=1.2), None, x.shape, features=bad)
    with pytest.raises(ValueError, match=match):
        step(run, x)


def test_features_need_the_adaptive_radius_and_a_callable():
    with pytest.raises(ValueError, match="batch_scale > 0"):
        SpellRun(SpellConfig(r=1.0, in_batch="mutual"), None, (2,) + SHAPE, features=flatten)
    with pytest.raises(ValueError, match="callable"):
        SpellRun(SpellConfig(r=1.0, in_batch="mutual", batch_scale=1.0), None, (2,) + SHAPE, features="clip")


def test_in_batch_off_never_calls_the_feature_map():
    """The feature map serves the in-batch push only; protected set and memory stay in model space."""
    def refuse(x):
        raise AssertionError("called")
    x = batch(13, 3)
    run = SpellRun(SpellConfig(r=1.0, in_batch="off", batch_scale=1.2), None, x.shape, features=refuse)
    assert torch.equal(step(run, x), x)


def test_the_feature_radius_is_logged_and_never_grows():
    phi = conv_net(2)
    run = SpellRun(SpellConfig(r=1.0, in_batch="mutual", batch_scale=1.2), None, (8,) + SHAPE, features=phi)
    for k, spread in enumerate([1.0, 3.0, 0.5, 3.0]):
        step(run, batch(20, 8, spread), 10.0 - k)
    radii = [s.batch_r for s in run.log.steps]
    f = phi(batch(20, 8, 1.0))
    d = rms_cdist(f, f).fill_diagonal_(math.inf)
    assert radii[0] == pytest.approx(1.2 * float(d.min(1).values.median()), rel=1e-5)
    assert radii == sorted(radii, reverse=True) and radii[2] < radii[0] and radii[3] == radii[2]
