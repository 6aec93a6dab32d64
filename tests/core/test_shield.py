"""The Shield: brute-force and indexed parts give the same pairs, and projection leaves every ball."""
import pytest
import torch

from spell_core import nearest
from spell_core.index import ReferenceIndex
from spell_core.repellency import rms_cdist
from spell_core.shield import IndexPart, Shield, TensorPart, scalar_affine


def clustered(seed, n, shape=(4, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn((8,) + shape, generator=g)
    return centres[torch.randint(0, 8, (n,), generator=g)] + 0.2 * torch.randn((n,) + shape, generator=g)


@pytest.mark.parametrize("scale, shift", [(1.0, 0.0), (0.18215, 0.0), (1.5305, -0.0609 * 1.5305)])
def test_index_part_matches_brute_force_in_model_space(scale, shift):
    vae = clustered(0, 600)
    model = vae * scale + shift
    x = model[:5] + 0.05 * scale * torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    r = 0.3 * scale
    brute = Shield([TensorPart(model)])
    indexed = Shield([IndexPart(ReferenceIndex.build(vae), scale, shift)])
    bi, bk, bd = brute.range_search(x, r)
    ii, ik, idd = indexed.range_search(x, r)
    assert sorted(zip(bi.tolist(), bk.tolist())) == sorted(zip(ii.tolist(), ik.tolist()))
    assert len(bi) > 5
    torch.testing.assert_close(indexed.get(ik, "cpu"), model.flatten(1)[ik], rtol=1e-5, atol=1e-6)


def test_parts_are_concatenated_with_offsets():
    a, b = clustered(1, 30), clustered(2, 40)
    x = torch.cat([a[:2], b[:2]])
    shield = Shield([TensorPart(a), IndexPart(ReferenceIndex.build(b), 1.0, 0.0)])
    i, k, d = shield.range_search(x, 0.25)
    full = torch.cat([a, b]).flatten(1)
    dist = rms_cdist(x.flatten(1), full)
    assert sorted(zip(i.tolist(), k.tolist())) == sorted(map(tuple, torch.nonzero(dist < 0.25).tolist()))
    assert torch.equal(shield.get(k, "cpu"), full[k])


def test_projection_with_an_index_leaves_every_ball():
    vae = clustered(3, 800)
    shield = Shield([IndexPart(ReferenceIndex.build(vae), 1.0, 0.0)])
    x = vae[:6] + 0.01
    y, moved = shield.project_out(x, 0.4)
    assert moved.all()
    assert (nearest(y, vae) >= 0.4).all()
    assert (shield.nearest(y, 1.6) >= 0.4).all()


def test_scalar_affine_detection():
    assert scalar_affine(lambda v: v * 0.5 + 1, (2, 2)) == pytest.approx((0.5, 1.0))
    per_channel = torch.tensor([1.0, 2.0]).view(1, 2, 1)
    assert scalar_affine(lambda v: v * per_channel, (2, 3)) is None


def test_nearest_grows_its_radius_only_as_far_as_each_row_needs():
    """Shield.nearest equals the brute-force nearest distance below the cap (inf beyond), for rows at every
    distance band, on a plain and an indexed part; rows resolved early are not searched again."""
    z = clustered(3, 500)
    g = torch.Generator().manual_seed(4)
    far = torch.cat([z[:1] + s * torch.randn(1, 4, 4, 4, generator=g) for s in (0.01, 0.3, 0.6, 1.0, 2.0, 9.0)])
    truth = rms_cdist(far.flatten(1), z.flatten(1)).min(1).values
    cap = 1.2
    want = torch.where(truth < cap, truth, torch.full_like(truth, float("inf")))
    assert torch.isinf(want).any() and (want < 0.25 * cap).any() and ((want > 0.5 * cap) & (want < cap)).any()
    for part in (TensorPart(z), IndexPart(ReferenceIndex.build(z), 1.0, 0.0)):
        shield, radii = Shield([part]), []
        search = shield.range_search
        shield.range_search = lambda x, r: (radii.append((len(x), r)), search(x, r))[1]
        torch.testing.assert_close(shield.nearest(far, cap), want)
        assert radii[0] == (6, 0.25 * cap) and radii[-1][0] < 6


# ------------------------------------------------------------------------------------- reuse across steps
def walk(seed, b, shape, steps, step_sizes):
    """A batch moving like x̂0 over a run: big moves first, small ones later, sometimes a jump."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((b,) + shape, generator=g)
    out = []
    for s in range(steps):
        x = x + torch.randn(x.shape, generator=g) * step_sizes[s % len(step_sizes)]
        out.append(x.clone())
    return out


def pair_set(i, k):
    return sorted(zip(i.tolist(), k.tolist()))


@pytest.mark.parametrize("use_index", [False, True])
@pytest.mark.parametrize("delta_frac,max_candidates", [(0.25, 4096), (1.0, 4096), (0.5, 3)])
def test_step_reuse_misses_nothing(use_index, delta_frac, max_candidates):
    """At every call the reused search returns exactly the brute force's pairs (0 misses, 0 extra), while
    searching the shield for fewer rows than it answers."""
    from spell_core.index import ReferenceIndex
    from spell_core.shield import StepReuse

    shape, r = (4, 3, 3), 1.05
    g = torch.Generator().manual_seed(5)
    z = torch.randn((3000,) + shape, generator=g)
    part = IndexPart(ReferenceIndex.build(z, backend="clusters", dim=6), 1.0, 0.0) if use_index else TensorPart(z)
    shield, brute = Shield([part]), Shield([TensorPart(z)])
    reuse = StepReuse(shield, delta_frac * r, max_candidates=max_candidates)
    for x in walk(1, 6, shape, 30, [0.3, 0.02, 0.02, 0.05, 0.01]):
        i, k, d, zr = reuse.pairs(x, r)
        bi, bk, bd = brute.range_search(x, r)
        assert pair_set(i, k) == pair_set(bi, bk)
        assert len(bi) > 0
        assert torch.equal(zr, brute.get(k, x.device))
        o, bo = torch.argsort(i * 10**6 + k), torch.argsort(bi * 10**6 + bk)
        assert torch.allclose(d[o], bd[bo], rtol=1e-6)
    assert reuse.searched_rows + reuse.reused_rows == 6 * 30
    if max_candidates == 3:  # rows with more candidates are not kept: searched again at the next call
        assert reuse.searched_rows > 6 * 30 / 2
    else:
        assert reuse.reused_rows > 6 * 30 / 3


def test_step_reuse_in_a_run_pushes_as_a_fresh_search():
    """SpellRun with reuse > 0 pushes the same images by the same amounts as without it, at every call."""
    from spell_core import SpellConfig, SpellRun

    shape = (4, 3, 3)
    z = torch.randn((500,) + shape, generator=torch.Generator().manual_seed(2))
    runs = [SpellRun(SpellConfig(r=1.0, in_batch="off", reuse=f), Shield([TensorPart(z)]), (5,) + shape) for f in (0, 0.5)]
    for n, x in enumerate(walk(3, 5, shape, 20, [0.2, 0.03])):
        a, b = (run.step(x, torch.zeros_like(x), torch.tensor([20.0 - n])) for run in runs)
        assert torch.allclose(a, b, atol=1e-6)
        assert runs[0].log.steps[-1].active_pairs == runs[1].log.steps[-1].active_pairs
    assert runs[1].reuse.reused_rows > 0
