"""Shield calibration alone (spell_core/calibration.py, charts.calibration_chart): near-copies deterministic and in
range, the suggested radius on constructed distances whose answer is known by hand, the overlap reported, the
chart's lines and bars where the numbers put them."""
import numpy as np
import pytest
import torch

from spell_core import calibration as cal
from spell_core import charts


def pictures(n=3, size=32, seed=0):
    """[n, size, size, 3] in 0..1: smooth colour gradients plus a bright square, so every alteration changes them."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    base = (ramp[None, :, None, None] * torch.rand(n, 1, 1, 3, generator=g)
            + ramp[None, None, :, None] * torch.rand(n, 1, 1, 3, generator=g)) / 2
    base[:, size // 4:size // 2, size // 3:size // 2 + 4] = 0.95
    return base.permute(0, 1, 2, 3).contiguous()


def test_near_copies_are_deterministic_in_shape_and_range():
    """Same seed, same bits; another seed, other copies; kinds taken in turn; every copy in 0..1, float32, the
    images' shape; a copy depends on (seed, image, copy) only, not on how many copies are made."""
    x = pictures()
    a, src, kinds = cal.near_copies(x, 7, seed=3)
    b, _, _ = cal.near_copies(x, 7, seed=3)
    c, _, _ = cal.near_copies(x, 7, seed=4)
    assert a.shape == (21, 32, 32, 3) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert src.tolist() == [i for i in range(3) for _ in range(7)]
    assert kinds[:7] == ["crop", "shift", "flip", "jpeg", "colour", "crop", "shift"]
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    fewer, _, _ = cal.near_copies(x, 5, seed=3)
    assert torch.equal(fewer, a.view(3, 7, 32, 32, 3)[:, :5].reshape(15, 32, 32, 3))


def test_each_kind_changes_the_image_as_named():
    """flip is the exact mirror image; shift keeps the pixels (moved, edges repeated); jpeg stays within a few
    grey levels; every kind changes the picture but stays closer to its source than to another picture."""
    x = pictures(2)
    copies, src, kinds = cal.near_copies(x, 5, seed=0)
    for m, k in enumerate(kinds):
        own, other = x[src[m]], x[1 - src[m]]
        assert not torch.equal(copies[m], own), k
        assert (copies[m] - own).abs().mean() < (copies[m] - other).abs().mean(), k
    assert torch.equal(copies[2], x[0].flip(1))
    assert set(torch.unique(copies[1]).tolist()) <= set(torch.unique(x[0]).tolist())  # shifted, nothing new
    assert (copies[3] - x[0]).abs().mean() < 0.03
    with pytest.raises(ValueError, match="kinds"):
        cal.near_copies(x, 2, kinds=("rotate",))


def test_grey_images_stay_grey_and_single_channel_images_work():
    """colour on a grey picture changes only brightness and contrast (saturation and hue leave grey alone); one
    channel goes through every kind."""
    grey = pictures(1).mean(-1, keepdim=True)
    copies, _, kinds = cal.near_copies(grey.expand(-1, -1, -1, 3).contiguous(), 5, seed=1)
    coloured = copies[kinds.index("colour")]
    assert torch.allclose(coloured[..., 0], coloured[..., 1], atol=1e-5)
    assert torch.allclose(coloured[..., 0], coloured[..., 2], atol=1e-5)
    one, _, _ = cal.near_copies(grey, 5, seed=1)
    assert one.shape == (5, 32, 32, 1) and 0 <= float(one.min()) and float(one.max()) <= 1


def constructed(copy_d, distinct_d, dim=16):
    """Latents whose distances are known: protected images far apart on the axes (scale 100), each near-copy at RMS
    copy_d[m] from protected image m % N along another axis, each distinct image at RMS distinct_d[k] from
    protected image k % N."""
    n = 4
    protected = torch.zeros(n, dim)
    protected[torch.arange(n), torch.arange(n)] = 100.0
    scale = dim ** 0.5

    def around(ds, axis):
        out = protected[torch.arange(len(ds)) % n].clone()
        out[:, axis] += torch.tensor(ds) * scale
        return out

    source = torch.arange(len(copy_d)) % n
    return protected, around(copy_d, 10), source, around(distinct_d, 11)


def test_suggested_radius_is_the_smallest_covering_95_percent_strictly():
    """100 near-copies at 0.0104, 0.0204, ..., 1.0004: 95 must lie strictly inside, so r is the first 3-digit value
    above the 95th (0.9504): 0.951, covering exactly 95 %; one step lower (0.950) covers 94 %. Distinct images
    at 2..2.39: none inside, no overlap; per kind, the r that kind alone needs."""
    ds = [0.01 * (i + 1) + 0.0004 for i in range(100)]
    protected, copies, source, distinct = constructed(ds, [2.0 + 0.01 * i for i in range(40)])
    kinds = ["a" if i % 2 else "b" for i in range(100)]  # a: 0.0204, 0.0404, ..., 1.0004
    result = cal.calibrate(protected, copies, source, kinds, distinct)
    assert result.radius == pytest.approx(0.951, abs=1e-9)
    assert result.coverage == pytest.approx(0.95)
    assert cal.share_below(result.copy_distances, 0.950) == pytest.approx(0.94)
    assert result.false_positive == 0 and not result.overlap and result.balanced is None
    per = result.per_kind()
    assert per["a"]["n"] == 50 and per["a"]["needs"] == pytest.approx(0.961)  # 48th of a's 50: 0.9604
    assert per["a"]["coverage"] == pytest.approx(0.94)  # 0.0204..0.9404 of a lie below 0.951
    assert "OVERLAP" not in result.text() and "r = 0.951" in result.text()


def test_a_copy_exactly_at_a_3_digit_value_is_not_inside_it():
    """Float32 distances compared in float64: 100 copies, the 95th at float32(0.95) = 0.94999999: r = 0.95 holds it
    strictly (in float64), and the coverage computed says so."""
    d = torch.linspace(0.01, 1.0, 100, dtype=torch.float32)
    d[94] = 0.95
    r = cal.covering_radius(d, 0.95)
    assert r > float(d[94]) and cal.share_below(d, r) >= 0.95


def test_overlap_is_reported_with_the_balanced_radius():
    """Near-copies spread 0.0104..1.0004, distinct images 0.5004..1.4904: covering 95 % (r = 0.951) catches 46 % of
    the distinct ones, so the report says OVERLAP and gives the r where misses and catches balance: near 0.75 the
    copies missed (from 0.7504 up, 26 %) and the distinct caught (below 0.75, 25 %) are as near equal as they get."""
    protected, copies, source, distinct = constructed([0.01 * (i + 1) + 0.0004 for i in range(100)],
                                                      [0.5004 + 0.01 * i for i in range(100)])
    result = cal.calibrate(protected, copies, source, ["crop"] * 100, distinct)
    assert result.radius == pytest.approx(0.951)
    assert result.false_positive == pytest.approx(0.46)
    assert result.overlap and result.balanced == pytest.approx(0.75, abs=0.011)
    assert "OVERLAP" in result.text() and f"r = {result.balanced:.3g}" in result.text()


def test_default_distinct_set_is_the_nearest_other_protected_image():
    """Without a distinct set, each protected image is measured against its nearest other one (never itself);
    a single protected image is refused."""
    protected = torch.tensor([[0.0, 0.0], [0.3, 0.4], [3.0, 4.0]])  # RMS = L2 / sqrt(2)
    copies, source = protected + 0.01, torch.arange(3)
    result = cal.calibrate(protected, copies, source, ["jpeg"] * 3)
    assert result.distinct_what == "other protected images"
    assert result.distinct_distances.tolist() == pytest.approx([0.5 / 2 ** 0.5, 0.5 / 2 ** 0.5, 4.5 / 2 ** 0.5])
    with pytest.raises(ValueError, match="at least 2"):
        cal.calibrate(protected[:1], copies[:1], source[:1], ["jpeg"])
    with pytest.raises(ValueError, match="different shapes"):
        cal.calibrate(protected, copies, source, ["jpeg"] * 3, torch.zeros(2, 3))


def test_calibrate_images_encodes_and_finds_the_right_sources():
    """Through calibrate_images with an identity-like encoder (4x4 average pool): jpeg and colour copies land far
    closer to their source than distinct pictures do, so r separates them (no overlap)."""
    x = pictures(4, seed=1)

    def encode(px):
        return torch.nn.functional.avg_pool2d(px.permute(0, 3, 1, 2), 4)

    result = cal.calibrate_images(x, encode, 10, seed=0, kinds=("jpeg", "colour"), batch=3)
    assert result.copy_distances.numel() == 40 and result.n_protected == 4
    assert result.coverage >= 0.95
    assert float(result.copy_distances.max()) < float(result.distinct_distances.min())
    assert not result.overlap


def run_columns(img, colour, box):
    x0, y0, x1, y1 = box
    mask = (img[y0:y1 + 1, x0:x1 + 1] == np.array(colour, dtype=np.uint8)).all(-1)
    return np.nonzero(mask.sum(0))[0] + x0


def test_calibration_chart_draws_r_and_both_histograms_where_the_numbers_say():
    """768x512 RGB uint8; the r line at r's column on the distance axis (±2 px), the balance line at its own;
    near-copy bars (blue) only left of 0.5 and distinct bars only right of it, for data split at 0.5."""
    near = [0.05 + 0.4 * i / 99 for i in range(100)]
    far = [0.55 + 0.4 * i / 49 for i in range(50)]
    img = charts.calibration_chart(near, far, 0.4, balanced=0.5)
    assert img.shape == (charts.HEIGHT, charts.WIDTH, 3) and img.dtype == np.uint8
    box = charts.HIST_BOX
    top = 1.0  # nice_ticks(0.95 * 1.05): ticks 0, 0.2, ..., 1.0

    def column(v):
        return box[0] + (box[2] - box[0]) * v / top

    red = run_columns(img, charts.RADIUS, (box[0], box[1] + 40, box[2], box[3] - 2))
    assert red.size and abs(red.mean() - column(0.4)) <= 2
    purple = run_columns(img, charts.BALANCE, (box[0], box[1] + 40, box[2], box[3] - 2))
    assert purple.size and abs(purple.mean() - column(0.5)) <= 2
    blue = run_columns(img, charts.REFERENCE, box)
    orange = run_columns(img, charts.DISTINCT_FILL, box)
    bin_width = 0.025  # 40 bins over 0..1; a bar spans its whole bin
    assert blue.min() >= column(0.05) - 1 and blue.max() <= column(0.45 + bin_width)
    assert orange.min() >= column(0.55 - bin_width) and orange.max() <= column(0.95 + bin_width)
    assert blue.max() < orange.min()
    assert np.array_equal(img, charts.calibration_chart(near, far, 0.4, balanced=0.5))
    without = charts.calibration_chart(near, far, 0.4)
    assert run_columns(without, charts.BALANCE, (box[0], box[1] + 40, box[2], box[3] - 2)).size == 0
