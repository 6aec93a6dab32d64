"""The report charts alone (spell_core/charts.py): shape and dtype, and bars, lines and bands drawn where the
numbers say, found by their colours inside the plot areas the module names."""
import math

import numpy as np
import pytest

from spell_core import charts


def crop(img, box):
    x0, y0, x1, y1 = box
    return img[y0:y1 + 1, x0:x1 + 1]


def colour_mask(img, colour):
    return (img == np.array(colour, dtype=np.uint8)).all(-1)


def bars(img, box, colour):
    """[(first column, last column, height in pixels)] of the runs of columns holding colour inside box."""
    counts = colour_mask(crop(img, box), colour).sum(0)
    out, start = [], None
    for x, n in enumerate(list(counts) + [0]):
        if n and start is None:
            start = x
        elif not n and start is not None:
            out.append((start, x - 1, int(counts[start:x].max())))
            start = None
    return out


def test_charts_are_preview_sized_rgb_uint8():
    pictures = [
        charts.spell_report_chart(0.5, [0.3, math.inf], [0.6, 0.6], [14.6, 1.0], [2, 0], [0.2, 0.0], 2),
        charts.fairness_chart(["a", "b"], [0.5, 0.5], [1.0, 0.0], [0.6, 0.4]),
        charts.message_chart("SPELL Report", "no sampling run yet"),
    ]
    for img in pictures:
        assert img.shape == (charts.HEIGHT, charts.WIDTH, 3) and img.dtype == np.uint8
    unit = charts.to_unit(pictures[0])
    assert unit.dtype == np.float32 and unit.shape == pictures[0].shape
    assert 0.0 <= unit.min() and unit.max() <= 1.0 and unit.max() == 1.0  # white background


def test_charts_are_deterministic():
    args = (0.5, [0.3, 0.7], [0.6, 0.6], [3.0, 1.0], [1, 0], [0.1, 0.0], 2)
    assert np.array_equal(charts.spell_report_chart(*args), charts.spell_report_chart(*args))


def test_fairness_bars_are_as_tall_as_their_shares():
    """One bar per class and series, left to right, heights proportional to the shares (±2 px); a share of 0
    draws no bar."""
    target, outputs, running = [0.2, 0.5, 0.3], [0.6, 0.0, 0.4], [0.25, 0.45, 0.30]
    img = charts.fairness_chart(["x", "y", "z"], target, outputs, running)
    box = charts.BAR_BOX
    for colour, shares in ((charts.TARGET, target), (charts.OUTPUTS, outputs), (charts.RUNNING, running)):
        found = bars(img, box, colour)
        drawn = [s for s in shares if s > 0]
        assert len(found) == len(drawn), (colour, found)
        unit = found[0][2] / drawn[0]
        for (_, _, h), s in zip(found, drawn):
            assert abs(h - s * unit) <= 2, (colour, found, shares)
    # the biggest share reaches close to the top of the axis (no wasted space), never past it
    tallest = max(h for c in (charts.TARGET, charts.OUTPUTS, charts.RUNNING) for _, _, h in bars(img, box, c))
    assert 0.8 * (box[3] - box[1]) <= tallest <= box[3] - box[1]
    # the grouped bars of class y sit between those of x and z
    t, o = bars(img, box, charts.TARGET), bars(img, box, charts.OUTPUTS)
    assert t[0][1] < o[0][0] < t[1][0] < t[2][0] < o[1][0]


def test_fairness_series_left_out_are_not_drawn():
    img = charts.fairness_chart(["a", "b"], [0.5, 0.5])
    assert not colour_mask(img, charts.OUTPUTS).any() and not colour_mask(img, charts.RUNNING).any()
    assert len(bars(img, charts.BAR_BOX, charts.TARGET)) == 2


def radius_row(img):
    """Row (in DISTANCE_BOX coordinates) holding the most pixels of the r line."""
    return int(colour_mask(crop(img, charts.DISTANCE_BOX), charts.RADIUS).sum(1).argmax())


def test_distance_bars_against_the_r_line():
    """A distance equal to r ends on the r line, 2r is twice as tall, and the band below r is shaded."""
    r = 0.4
    img = charts.spell_report_chart(r, [r, 2 * r, 0.5 * r], [1.5 * r, r, r], [], [], [], 3)
    box = charts.DISTANCE_BOX
    height = box[3] - box[1]
    line = radius_row(img)
    ref, peer = bars(img, box, charts.REFERENCE), bars(img, box, charts.PEER)
    assert len(ref) == 3 and len(peer) == 3
    at_r = height - line  # pixels from the axis' bottom row to the r line
    assert abs(ref[0][2] - at_r) <= 2 and abs(peer[1][2] - at_r) <= 2
    assert abs(ref[1][2] - 2 * at_r) <= 3 and abs(ref[2][2] - 0.5 * at_r) <= 2
    assert abs(peer[0][2] - 1.5 * at_r) <= 3
    # shading only below the line
    band = colour_mask(crop(img, box), charts.SHIELD).any(1)
    grid = colour_mask(crop(img, box), charts.GRID).any(1)  # gridlines cross the band
    assert (band | grid)[line + 3:height - 2].all() and not band[:line - 2].any()


def test_the_r_line_moves_with_r():
    """Same distances, a larger r: the line sits higher."""
    lo = charts.spell_report_chart(0.3, [0.5, 0.9], [0.6, 0.6], [], [], [], 2)
    hi = charts.spell_report_chart(0.6, [0.5, 0.9], [0.6, 0.6], [], [], [], 2)
    assert radius_row(hi) < radius_row(lo)


def test_the_adaptive_batch_radius_is_a_second_line_at_its_value():
    """batch_r drawn as a dashed line of the batch's colour at its own height (half of r: halfway to r's line),
    spanning the plot, where bars of the same colour only fill their slots; none without it."""
    r = 0.6
    args = (r, [0.9, 0.8], [0.7, 0.65], [], [], [], 2)
    img = charts.spell_report_chart(*args, batch_r=0.3)
    box = charts.DISTANCE_BOX
    height = box[3] - box[1]
    peer = colour_mask(crop(img, box), charts.PEER)
    wide = [y for y in range(peer.shape[0]) if peer[y].sum() > 0.4 * peer.shape[1]]  # bars are narrower
    assert wide and abs((height - wide[0]) - 0.5 * (height - radius_row(img))) <= 2
    plain = colour_mask(crop(charts.spell_report_chart(*args), box), charts.PEER)
    assert not any(plain[y].sum() > 0.4 * plain.shape[1] for y in range(plain.shape[0]))


def test_references_beyond_the_cap_are_drawn_to_the_top_in_a_lighter_colour():
    img = charts.spell_report_chart(0.5, [math.inf, 0.2], [0.6, 0.6], [], [], [], 2)
    box = charts.DISTANCE_BOX
    far = bars(img, box, charts.FAR)
    assert len(far) == 1 and far[0][2] >= box[3] - box[1] - 24  # full height, less the ">4r" label
    assert len(bars(img, box, charts.REFERENCE)) == 1


def test_missing_series_and_empty_logs_draw_nothing_of_theirs():
    """No static references and a batch of 1, no logged calls: no bars, only the r line."""
    img = charts.spell_report_chart(0.5, [], [], [], [], [], 1)
    assert not colour_mask(img, charts.REFERENCE).any() and not colour_mask(img, charts.PEER).any()
    assert not colour_mask(crop(img, charts.PUSH_BOX), charts.PUSHED).any()
    assert colour_mask(crop(img, charts.DISTANCE_BOX), charts.RADIUS).any()


def test_push_bars_count_images_and_the_line_follows_push_size():
    """Images pushed per call as bars on a 0..batch axis; the push-size dot is highest where the push is largest."""
    pushed, size = [4, 2, 0, 1], [0.1, 0.4, 0.0, 0.2]
    img = charts.spell_report_chart(0.5, [], [0.6] * 4, [10.0, 5.0, 2.0, 1.0], pushed, size, 4)
    box = charts.PUSH_BOX
    height = box[3] - box[1]
    found = bars(img, box, charts.PUSHED)
    assert len(found) == 3
    assert abs(found[0][2] - height) <= 2  # all 4 of 4 pushed: full height
    assert abs(found[1][2] - height / 2) <= 2 and abs(found[2][2] - height / 4) <= 2
    mask = colour_mask(crop(img, box), charts.PUSH_SIZE)
    slot = (box[2] - box[0]) / 4
    tops = [int(np.nonzero(mask[:, int((i + 0.5) * slot)])[0].min()) for i in range(4)]
    assert tops[1] < tops[3] < tops[0] < tops[2]  # 0.4 > 0.2 > 0.1 > 0.0


@pytest.mark.parametrize("hi", [0.013, 0.37, 1.0, 7.2, 480.0])
def test_nice_ticks_cover_the_range_with_round_steps(hi):
    top, ticks = charts.nice_ticks(hi)
    step = ticks[1] - ticks[0]
    assert ticks[0] == 0 and top >= hi and abs(ticks[-1] - top) < 1e-9 and top < hi + step + 1e-9
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(abs(mantissa - m) < 1e-6 for m in (1, 2, 2.5, 5))
    assert 4 <= len(ticks) <= 8
