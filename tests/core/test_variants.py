"""spell_core.variants (the shield's shifted, zoomed, mirrored versions of each protected image) and what they do
to the shield calibration (spell_core.calibration) and the folder encoder (spell_core.references)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from spell_core import calibration as cal
from spell_core import variants as V
from spell_core.references import EncodingCache, encode_folder


def pictures(n=3, side=32, seed=0):
    return torch.rand(n, side, side, 3, generator=torch.Generator().manual_seed(seed))


def test_counts_order_and_offsets():
    """Row 0 of each image's block is the image itself; the counts are 1, 9, 18, 36; the shift step is a whole
    number of pixels, at least one."""
    x = pictures(2)
    assert [V.preset(k).count for k in V.PRESETS] == [1, 9, 18, 36]
    assert V.preset("shifts").offsets(64) == (0, -2, 2) and V.preset("shifts").offsets(512) == (0, -15, 15)
    assert V.preset("shifts").offsets(8) == (0, -1, 1) and V.preset("none").offsets(64) == (0,)
    for name, spec in V.PRESETS.items():
        out = V.make(x, spec)
        assert out.shape == (2 * spec.count, 32, 32, 3)
        assert torch.equal(out[::spec.count], x), name


def test_versions_are_the_shifts_zooms_and_mirrors():
    """Every whole-pixel shift of the grid is among the versions exactly, each also zoomed, each also mirrored."""
    x = pictures(1)
    out = V.make(x, V.preset("shifts + zoom + mirror"))
    z = V.zoomed(x, 1.05)
    expected = [V.shifted(s, dy, dx) for s in (x, z) for dy in (0, -1, 1) for dx in (0, -1, 1)]
    expected += [e.flip(2) for e in expected]
    assert len(expected) == out.shape[0]
    for got, want in zip(out, expected):
        assert torch.equal(got, want[0].clamp(0, 1))
    moved = V.shifted(x, 1, -1)
    assert torch.equal(moved[0, 1:, :-1], x[0, :-1, 1:]) and torch.equal(moved[0, 0, :-1], x[0, 0, 1:])


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="one of"):
        V.preset("shift")
    with pytest.raises(ValueError, match="share of the side"):
        V.Variants(shift=0.7)
    with pytest.raises(ValueError, match="zooms"):
        V.Variants(zooms=(0.9,))


def brute(protected, per_image, copies, source, distinct=None):
    """Distances by definition: each near-copy to every version of its source, each distinct image (default: each
    protected original) to every version of every (other) protected image, the smallest RMS distance."""
    d = protected.shape[1:].numel()
    groups = protected.reshape(-1, per_image, d)
    copy_d = torch.stack([min(torch.linalg.vector_norm(c.flatten() - v) for v in groups[s]) for c, s in
                          zip(copies, source)]) / math.sqrt(d)
    if distinct is None:
        far = [min(torch.linalg.vector_norm(groups[i, 0] - v) for j in range(len(groups)) if j != i for v in groups[j])
               for i in range(len(groups))]
    else:
        far = [min(torch.linalg.vector_norm(x.flatten() - v) for v in groups.reshape(-1, d)) for x in distinct]
    return copy_d, torch.stack(far) / math.sqrt(d)


@pytest.mark.parametrize("per_image", [1, 4])
def test_calibrate_measures_to_the_nearest_version(per_image):
    """Near-copies against the nearest version of their own source, distinct images against the nearest version
    of any protected image, the default distinct set never against an image's own versions."""
    g = torch.Generator().manual_seed(1)
    protected = torch.randn(5 * per_image, 2, 3, 3, generator=g)
    source = torch.tensor([0, 0, 1, 2, 3, 4, 4, 4])
    copies = protected[source * per_image] + 0.3 * torch.randn(len(source), 2, 3, 3, generator=g)
    distinct = torch.randn(6, 2, 3, 3, generator=g)
    for d in (None, distinct):
        got = cal.calibrate(protected, copies, source, ["crop"] * len(source), d, per_image=per_image)
        want_c, want_d = brute(protected, per_image, copies, source, d)
        assert torch.allclose(got.copy_distances, want_c, atol=1e-5)
        assert torch.allclose(got.distinct_distances, want_d, atol=1e-5)
        assert got.n_protected == 5 and got.per_image == per_image
    with pytest.raises(ValueError, match="versions per image"):
        cal.calibrate(protected[:-1], copies, source, ["crop"] * len(source), per_image=3)
    with pytest.raises(ValueError, match="must index"):
        cal.calibrate(protected, copies, source + 1, ["crop"] * len(source), per_image=per_image)


def demo_sets():
    """The demo's protected-set example (24 training ones) and the 360 held-out digits, as 64x64 IMAGEs, and the
    demo VAE's encoding (grey, 4x4 average pool, pixel-unshuffle; demo.model.PixelShuffleVAE without ComfyUI)."""
    from demo.data import digits_split
    from demo.example_inputs import PROTECTED_CLASS, PROTECTED_COUNT

    def big(img16):
        g = ((img16[:, 0] + 1) / 2 * 255).round() / 255
        return g.repeat_interleave(4, 1).repeat_interleave(4, 2)[..., None].expand(-1, -1, -1, 3).contiguous()

    def encode(pixels):
        grey = pixels[..., :3].float().mean(-1)[:, None]
        return torch.nn.functional.pixel_unshuffle(torch.nn.functional.avg_pool2d(grey, 4) * 2 - 1, 2)

    split = digits_split()
    train, labels = split["train"]
    return big(train[labels == PROTECTED_CLASS][:PROTECTED_COUNT]), big(split["test"][0]), encode


def test_variants_separate_near_copies_from_distinct_digits():
    """The measurement docs/shield_calibration.md reports, on the demo digits without ComfyUI: with each image as
    it is, the r that holds 95 % of the near-copies also holds more than 5 % of the held-out digits (OVERLAP); with
    the shield holding shifted and zoomed versions, the suggested r holds 95 % of the near-copies and at most 1 %
    of the held-out digits, and it is less than half as large."""
    protected, held_out, encode = demo_sets()
    kinds = ("crop", "shift", "jpeg", "colour")
    plain = cal.calibrate_images(protected, encode, 20, 0, kinds, held_out)
    shield = cal.calibrate_images(protected, encode, 20, 0, kinds, held_out, variants_name="shifts + zoom")
    assert plain.overlap and plain.false_positive > 0.05 and "try variants 'shifts + zoom'" in plain.text()
    assert shield.coverage >= 0.95 and shield.false_positive <= 0.01 and not shield.overlap
    assert shield.radius < 0.5 * plain.radius
    assert shield.per_image == 18 and "432 references" in shield.text()
    assert shield.per_kind()["shift"]["needs"] < 0.5 * plain.per_kind()["shift"]["needs"]


def test_encode_folder_stores_the_versions_under_their_own_key(tmp_path):
    """With variants every image gives its versions, image-major, encoded once; the cache keeps them apart from
    the plain encoding, so switching back and forth encodes nothing twice."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for n in range(2):
        Image.fromarray((np.random.default_rng(n).random((16, 16, 3)) * 255).astype(np.uint8)).save(folder / f"{n}.png")
    calls = []

    def encode(pixels):
        calls.append(pixels.shape[0])
        return pixels.mean(-1)[:, None, ::8, ::8]

    cache = EncodingCache(tmp_path / "cache")
    plain, n1 = encode_folder(folder, 16, 16, "stretch", "enc", encode, cache)
    nine, n2 = encode_folder(folder, 16, 16, "stretch", "enc", encode, cache, variants_name="shifts")
    again, n3 = encode_folder(folder, 16, 16, "stretch", "enc", encode, cache, variants_name="shifts")
    plain2, n4 = encode_folder(folder, 16, 16, "stretch", "enc", encode, cache)
    assert (n1, n2, n3, n4) == (2, 2, 0, 0) and calls == [1, 1, 9, 9]
    assert nine.shape[0] == 18 and torch.equal(nine[::9], plain) and torch.equal(again, nine)
    assert torch.equal(plain2, plain)
