"""Charts for the report nodes: plain numbers in, an RGB picture out (numpy + Pillow, no plotting library).

Sized for ComfyUI's Preview Image (768 x 512). Every function returns an ``[H, W, 3]`` uint8 array; ``to_unit``
turns it into the float32 0..1 array that a ComfyUI IMAGE holds. Text is plain ASCII: Pillow's embedded default
font (Aileron) has no Greek letters, so sigma, delta and x0_pred are spelled out.

The plot areas are module constants (``DISTANCE_BOX``, ``PUSH_BOX``, ``BAR_BOX``: left, top, right, bottom in
pixels) so that tests can find the bars and lines where the numbers say they are.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 768, 512
DISTANCE_BOX = (78, 96, 704, 262)  # SPELL report, top: distance of each output to its nearest neighbours
PUSH_BOX = (78, 346, 690, 456)  # SPELL report, bottom: push activity per model call
BAR_BOX = (70, 104, 748, 442)  # fairness report: shares per class

MAX_BAR = 48  # widest bar in pixels, so that a few categories do not make slabs

WHITE = (255, 255, 255)
TEXT = (25, 25, 25)
MUTED = (95, 95, 95)
AXIS = (70, 70, 70)
GRID = (226, 226, 226)
REFERENCE = (31, 119, 180)  # nearest static reference (blue)
PEER = (255, 127, 14)  # nearest other image of the batch (orange)
FAR = (158, 196, 224)  # a static reference beyond the search cap: bar drawn to the top, lighter
RADIUS = (204, 32, 32)  # the line at r
SHIELD = (252, 226, 226)  # the band below r
PUSHED = (44, 160, 44)  # images pushed per model call (green)
PUSH_SIZE = (128, 70, 178)  # largest push size per model call (purple)
TARGET = (160, 160, 172)  # not a pure grey, so anti-aliased text never takes its colour
OUTPUTS = REFERENCE
RUNNING = PEER


@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.ImageFont:
    """Pillow's embedded font at a pixel size (Pillow ≥ 10.1 with FreeType); the fixed bitmap font otherwise."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def to_unit(img: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W, 3] float32 in 0..1 (a ComfyUI IMAGE without its batch axis)."""
    return np.ascontiguousarray(img, dtype=np.float32) / 255.0


def nice_ticks(hi: float, n: int = 5) -> tuple[float, list[float]]:
    """Axis top ≥ hi and ticks 0, step, ..., top, step 1, 2, 2.5 or 5 x 10^k: the lowest top with 3 to
    n + 2 intervals (fewer intervals on a tie), so the data fill the axis."""
    hi = hi if hi > 0 and math.isfinite(hi) else 1.0
    mag = 10 ** math.floor(math.log10(hi / n))
    options = []
    for step in (m * mag * e for e in (0.1, 1, 10) for m in (1, 2, 2.5, 5)):
        count = math.ceil(hi / step - 1e-9)
        if 3 <= count <= n + 2:
            options.append((step * count, count, step))
    top, count, step = min(options) if options else (hi, 1, hi)
    return top, [step * i for i in range(count + 1)]


def tick_label(v: float, step: float, percent: bool = False) -> str:
    if percent:
        v, step = 100 * v, 100 * step
    decimals = 0
    while decimals < 6 and abs(step * 10 ** decimals - round(step * 10 ** decimals)) > 1e-6:
        decimals += 1
    return f"{v:.{decimals}f}" + ("%" if percent else "")


class Canvas:
    """A white RGB picture with the few drawing primitives the charts need."""

    def __init__(self, width: int = WIDTH, height: int = HEIGHT):
        self.image = Image.new("RGB", (width, height), WHITE)
        self.draw = ImageDraw.Draw(self.image)

    def text(self, xy, s, size=12, fill=TEXT, anchor="la"):
        self.draw.text(xy, s, font=font(size), fill=fill, anchor=anchor)

    def text_width(self, s, size=12) -> float:
        return self.draw.textlength(s, font=font(size))

    def vertical_text(self, x, y_mid, s, size=12, fill=TEXT):
        """Text rotated 90° counter-clockwise, centred on y_mid, its left edge at x."""
        f = font(size)
        w = int(self.draw.textlength(s, font=f)) + 4
        mask = Image.new("L", (w, size + 6), 0)
        ImageDraw.Draw(mask).text((2, 1), s, font=f, fill=255)
        mask = mask.rotate(90, expand=True)
        self.image.paste(Image.new("RGB", mask.size, fill), (int(x), int(y_mid - mask.size[1] / 2)), mask)

    def rect(self, x0, y0, x1, y1, fill, outline=None):
        if x1 - x0 >= 0 and y1 - y0 >= 0:
            self.draw.rectangle([round(x0), round(y0), round(x1), round(y1)], fill=fill, outline=outline)

    def hline(self, x0, x1, y, fill, width=1, dash=0):
        y = round(y)
        if not dash:
            self.draw.line([(x0, y), (x1, y)], fill=fill, width=width)
            return
        x = x0
        while x < x1:
            self.draw.line([(x, y), (min(x + dash, x1), y)], fill=fill, width=width)
            x += 2 * dash

    def bar_label(self, a, b, y, s, size=10):
        """s centred above a bar spanning columns a..b whose top is row y, if it fits the bar's width."""
        if self.text_width(s, size) + 2 <= b - a + 6:
            self.text(((a + b) / 2, y - 2), s, size=size, fill=TEXT, anchor="md")

    def title(self, title, subtitle=""):
        self.text((WIDTH / 2, 8), title, size=19, anchor="ma")
        for n, line in enumerate(subtitle.splitlines()[:2]):
            self.text((WIDTH / 2, 33 + 16 * n), line, size=13, fill=MUTED, anchor="ma")

    def legend(self, x, y, entries, size=12):
        """entries: [(label, colour, kind)], kind 'box' (a bar), 'line' (a line with dots), 'dash' (a dashed
        line) or 'band' (the shield band under the r line), left to right from (x, y); returns the x after the
        last entry."""
        for label, colour, kind in entries:
            if kind == "box":
                self.rect(x, y + 2, x + 12, y + 13, colour)
                swatch = 12
            elif kind == "band":
                self.rect(x, y + 3, x + 20, y + 14, SHIELD)
                self.hline(x, x + 20, y + 3, colour, width=2, dash=4)
                swatch = 20
            elif kind == "dash":
                self.hline(x, x + 20, y + 8, colour, width=2, dash=3)
                swatch = 20
            else:
                self.hline(x, x + 20, y + 8, colour, width=2)
                self.draw.ellipse([x + 7, y + 5, x + 13, y + 11], fill=colour)
                swatch = 20
            self.text((x + swatch + 5, y), label, size=size)
            x += swatch + 5 + self.text_width(label, size) + 18
        return x

    def y_axis(self, box, top, ticks, title, percent=False, right=False, colour=TEXT, grid=True):
        """Ticks, labels and an axis title for values 0..top mapped onto box's height."""
        x0, y0, x1, y1 = box
        step = ticks[1] - ticks[0] if len(ticks) > 1 else top
        widest = 0.0
        for v in ticks:
            y = value_y(box, top, v)
            if grid and not right:
                self.hline(x0, x1, y, GRID)
            label = tick_label(v, step, percent)
            widest = max(widest, self.text_width(label, 11))
            if right:
                self.draw.line([(x1, round(y)), (x1 + 4, round(y))], fill=AXIS)
                self.text((x1 + 7, y), label, size=11, fill=colour, anchor="lm")
            else:
                self.draw.line([(x0 - 4, round(y)), (x0, round(y))], fill=AXIS)
                self.text((x0 - 7, y), label, size=11, fill=colour, anchor="rm")
        mid = (y0 + y1) / 2
        if right:
            self.vertical_text(x1 + 11 + widest, mid, title, size=12, fill=colour)
        else:
            self.vertical_text(x0 - 27 - widest, mid, title, size=12, fill=colour)

    def frame(self, box):
        x0, y0, x1, y1 = box
        self.draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=AXIS)

    def array(self) -> np.ndarray:
        return np.asarray(self.image, dtype=np.uint8).copy()


def value_y(box, top: float, v: float) -> float:
    """Pixel row of value v on an axis 0..top drawn over box (its bottom is 0)."""
    return box[3] - (box[3] - box[1]) * min(max(v / top, 0.0), 1.0)


def slots(box, n: int) -> list[tuple[float, float]]:
    """n equal category slots across box's width: [(left, right)]."""
    w = (box[2] - box[0]) / max(n, 1)
    return [(box[0] + i * w, box[0] + (i + 1) * w) for i in range(n)]


def sparse_labels(n: int, room: float, widest: float) -> set[int]:
    """Indices of categories to label so that labels of width widest do not overlap in slots of width room."""
    every = max(1, math.ceil((widest + 8) / max(room, 1e-9)))
    return set(range(0, n, every))


def message_chart(title: str, message: str) -> np.ndarray:
    """A picture that only says something (e.g. 'no sampling run yet'), so Preview Image always gets an image."""
    c = Canvas()
    c.title(title)
    for n, line in enumerate(message.splitlines()):
        c.text((WIDTH / 2, HEIGHT / 2 - 10 + 20 * n), line, size=15, fill=MUTED, anchor="ma")
    return c.array()


def spell_report_chart(r: float, nearest_static, nearest_batch, sigmas, pushed, push_size, batch: int,
                       title: str = "SPELL Report", subtitle: str = "", cap: float = 4.0,
                       batch_r: float | None = None) -> np.ndarray:
    """The SPELL report as a picture [HEIGHT, WIDTH, 3] uint8.

    Top: per output image, the RMS distance to its nearest static reference (protected set + memory;
    ``inf`` = beyond cap·r, drawn to the top, lighter) and to its nearest other image of the batch, against
    the shield radius r (a dashed line over a shaded band). Either list may be empty (no static references,
    batch of 1). Bottom: per model call in the active window (labelled by σ), how many of the batch's images
    were pushed (bars, left axis, 0..batch) and the largest push size ||Δ|| / ||x̂0 − x_t|| (line, right axis).
    ``batch_r``: the adaptive in-batch radius at the last model call, drawn as a second dashed line (the batch's
    bars are measured against it, the static references' against r).
    """
    c = Canvas()
    c.title(title, subtitle)
    near_s = [float(d) for d in nearest_static]
    near_b = [float(d) for d in nearest_batch]
    distance_panel(c, r, near_s, near_b, cap, batch_r if near_b else None)
    push_panel(c, [float(s) for s in sigmas], [int(p) for p in pushed], [float(p) for p in push_size], batch)
    return c.array()


def distance_panel(c: Canvas, r, near_s, near_b, cap, batch_r=None):
    box = DISTANCE_BOX
    x0, y0, x1, y1 = box
    n = max(len(near_s), len(near_b))
    c.text((x0 - 60, y0 - 42), "Distance of each output to its nearest neighbour (RMS, the sampler's latent space)",
           size=14)
    entries, short = [], batch_r is not None and bool(near_s)  # four entries: short labels, so they fit
    if near_s:
        entries.append(("nearest static reference" + ("" if short else " (protected set + memory)"), REFERENCE, "box"))
    if near_b:
        entries.append(("nearest other image" + ("" if short else " of this batch"), PEER, "box"))
    entries.append((("r" if short else "shield radius r") + f" = {r:.3g}", RADIUS, "band"))
    if batch_r is not None:
        entries.append((f"in-batch radius {batch_r:.3g}", PEER, "dash"))
    c.legend(x0 - 60, y0 - 22, entries, size=12)
    finite = [d for d in near_s + near_b if math.isfinite(d)]
    top, ticks = nice_ticks(max(finite + [r] + ([batch_r] if batch_r is not None else [])) * 1.12)
    c.rect(x0 + 1, value_y(box, top, r), x1, y1 - 1, SHIELD)
    c.y_axis(box, top, ticks, "RMS distance")
    if n == 0:
        c.text(((x0 + x1) / 2, (y0 + y1) / 2), "no finished output to measure", size=13, fill=MUTED, anchor="mm")
    series = [(near_s, REFERENCE), (near_b, PEER)]
    series = [(values, colour) for values, colour in series if values]
    for i, (left, right) in enumerate(slots(box, n)):
        inner = min((right - left) * 0.76, MAX_BAR * max(len(series), 1))
        bar = inner / max(len(series), 1)
        start = left + (right - left - inner) / 2
        for k, (values, colour) in enumerate(series):
            if i >= len(values):
                continue
            a, b = start + k * bar + (1 if bar > 4 else 0), start + (k + 1) * bar - (1 if bar > 4 else 0)
            d = values[i]
            if math.isfinite(d):
                c.rect(a, value_y(box, top, d), b, y1 - 1, colour)
                c.bar_label(a, b, value_y(box, top, d), f"{d:.2f}")
            else:  # beyond the range search's cap: no exact value, only "farther than cap·r"
                c.rect(a, y0, b, y1 - 1, FAR)
                c.text(((a + b) / 2, y0 + 3), f">{cap:g}r", size=10, fill=TEXT, anchor="ma")
    c.hline(x0 + 1, x1, value_y(box, top, r), RADIUS, width=2, dash=6)
    c.text((x1 - 2, value_y(box, top, r) - 3), "r", size=12, fill=RADIUS, anchor="rb")
    if batch_r is not None:
        c.hline(x0 + 1, x1, value_y(box, top, batch_r), PEER, width=2, dash=3)
    c.frame(box)
    widest = c.text_width(str(n), 11)
    shown = sparse_labels(n, (x1 - x0) / max(n, 1), widest)
    for i, (left, right) in enumerate(slots(box, n)):
        if i in shown:
            c.text(((left + right) / 2, y1 + 4), str(i + 1), size=11, anchor="ma")
    c.text(((x0 + x1) / 2, y1 + 20), "output image (batch index, from 1)", size=12, anchor="ma")


def push_panel(c: Canvas, sigmas, pushed, push_size, batch):
    box = PUSH_BOX
    x0, y0, x1, y1 = box
    n = len(sigmas)
    c.text((x0 - 60, y0 - 42), "Push per model call (only calls inside the active window are logged)", size=14)
    c.legend(x0 - 60, y0 - 22, [(f"images pushed (of {batch})", PUSHED, "box"),
                                ("largest push size |delta| / |x0_pred - x_t|", PUSH_SIZE, "line")], size=12)
    count_top = float(max(batch, 1))
    step = max(1, math.ceil(count_top / 4))
    count_ticks = list(range(0, int(count_top) + 1, step))
    if count_ticks[-1] != int(count_top):
        count_ticks.append(int(count_top))
    c.y_axis(box, count_top, count_ticks, "images pushed", colour=TEXT)
    size_top, size_ticks = nice_ticks(max(push_size + [0.0]) * 1.1 or 1.0, n=4)
    c.y_axis(box, size_top, size_ticks, "push size", right=True, colour=PUSH_SIZE)
    if n == 0:
        c.text(((x0 + x1) / 2, (y0 + y1) / 2), "no model call inside the active window", size=13, fill=MUTED,
               anchor="mm")
    points = []
    for i, (left, right) in enumerate(slots(box, n)):
        pad = (right - left) * 0.15
        if pushed[i] > 0:
            c.rect(left + pad, value_y(box, count_top, pushed[i]), right - pad, y1 - 1, PUSHED)
        points.append(((left + right) / 2, value_y(box, size_top, push_size[i])))
    if len(points) > 1:
        c.draw.line(points, fill=PUSH_SIZE, width=2)
    dot = 3 if n <= 40 else 2
    for x, y in points:
        c.draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=PUSH_SIZE)
    c.frame(box)
    c.draw.line([(x1, y0), (x1, y1)], fill=AXIS)
    labels = [f"{s:.3g}" for s in sigmas]
    widest = max([c.text_width(s, 11) for s in labels] + [0])
    shown = sparse_labels(n, (x1 - x0) / max(n, 1), widest)
    for i, (left, right) in enumerate(slots(box, n)):
        if i in shown:
            c.draw.line([((left + right) / 2, y1), ((left + right) / 2, y1 + 3)], fill=AXIS)
            c.text(((left + right) / 2, y1 + 5), labels[i], size=11, anchor="ma")
    c.text(((x0 + x1) / 2, y1 + 21), "model call, labelled by its noise level sigma (high noise first)", size=12,
           anchor="ma")


def bar_chart(categories, series, title: str = "", subtitle: str = "", y_title: str = "share",
              percent: bool = True, x_title: str = "") -> np.ndarray:
    """Grouped bars [HEIGHT, WIDTH, 3] uint8: for each category one bar per series, series = [(label, values,
    colour)] or [(label, values, colour, notes)] (texts written above the bars) with values aligned with categories. The y axis starts at 0 and reaches just above the largest value."""
    c = Canvas()
    c.title(title, subtitle)
    box = BAR_BOX
    x0, y0, x1, y1 = box
    c.legend(x0 - 40, y0 - 26, [(entry[0], entry[2], "box") for entry in series], size=13)
    values = [float(v) for entry in series for v in entry[1]]
    top, ticks = nice_ticks(max(values + [0.0]) * 1.08 or 1.0)
    c.y_axis(box, top, ticks, y_title, percent=percent)
    n = len(categories)
    for i, (left, right) in enumerate(slots(box, n)):
        inner = min((right - left) * 0.8, MAX_BAR * max(len(series), 1))
        bar = inner / max(len(series), 1)
        start = left + (right - left - inner) / 2
        for k, (_, vs, colour, *notes) in enumerate(series):
            v = float(vs[i])
            gap = 1 if bar > 5 else 0
            a, b = start + k * bar + gap, start + (k + 1) * bar - gap
            if v > 0:
                c.rect(a, value_y(box, top, v), b, y1 - 1, colour)
            if notes and notes[0] is not None:
                c.bar_label(a, b, value_y(box, top, v), notes[0][i], size=11)
    c.frame(box)
    names = [str(s) for s in categories]
    size = 13 if n <= 12 else 11
    widest = max([c.text_width(s, size) for s in names] + [0])
    shown = sparse_labels(n, (x1 - x0) / max(n, 1), widest)
    for i, (left, right) in enumerate(slots(box, n)):
        if i in shown:
            c.text(((left + right) / 2, y1 + 5), names[i], size=size, anchor="ma")
    if x_title:
        c.text(((x0 + x1) / 2, y1 + 26), x_title, size=12, anchor="ma")
    return c.array()


def fairness_chart(classes, target, outputs=None, running=None, running_label: str = "running share",
                   title: str = "SPELL Fairness Report", subtitle: str = "", output_counts=None) -> np.ndarray:
    """Per class: the target share, this batch's share of outputs (None: not measured; output_counts, if given,
    are written above its bars) and the running share (None: no count), as grouped bars [HEIGHT, WIDTH, 3]
    uint8. Shares are fractions (0..1)."""
    series = [("target", list(target), TARGET)]
    if outputs is not None:
        notes = [str(int(n)) for n in output_counts] if output_counts is not None else None
        label = "this batch's outputs" + (" (how many, above the bars)" if notes else "")
        series.append((label, list(outputs), OUTPUTS, notes))
    if running is not None:
        series.append((running_label, list(running), RUNNING))
    return bar_chart(classes, series, title, subtitle, y_title="share of outputs", x_title="class")


LINE_BOX = (78, 104, 680, 442)  # training chart: loss (left axis) and validation bias (right axis) per iteration


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to window values (the first ones over what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def training_chart(rows: list[dict], title: str = "SPELL Fair LoRA Trainer", subtitle: str = "",
                   part: tuple[str, str] = ("align", "alignment loss")) -> np.ndarray:
    """Training curves [HEIGHT, WIDTH, 3] uint8 from log rows ({"iteration", "total", part[0], optional
    "validation_bias"}): total loss and the loss part[0] (labelled part[1]; trailing means over 20 iterations) on
    the left axis, the validation bias as dots on the right axis."""
    c = Canvas()
    trained = [r for r in rows if "total" in r and math.isfinite(r["total"])]
    if not trained:
        return message_chart(title, "no iteration has run yet")
    c.title(title, subtitle or f"{trained[-1]['iteration']} iterations; loss: trailing mean of 20")
    box = LINE_BOX
    x0, y0, x1, y1 = box
    last = max(r["iteration"] for r in trained)
    first = min(r["iteration"] for r in trained)
    total, align = smoothed([r["total"] for r in trained], 20), smoothed([r[part[0]] for r in trained], 20)
    top, ticks = nice_ticks(max(total + align) * 1.08 or 1.0)
    c.y_axis(box, top, ticks, "loss")
    val = [(r["iteration"], r["validation_bias"]) for r in rows if "validation_bias" in r]
    vtop, vticks = nice_ticks(max([b for _, b in val] + [1e-3]) * 1.15)
    c.y_axis(box, vtop, vticks, "validation bias", right=True, colour=PUSH_SIZE, grid=False)

    def x_of(it):
        return x0 + (x1 - x0) * (it - first) / max(last - first, 1)

    for values, colour in ((total, REFERENCE), (align, PEER)):
        pts = [(x_of(r["iteration"]), value_y(box, top, v)) for r, v in zip(trained, values)]
        if len(pts) > 1:
            c.draw.line(pts, fill=colour, width=2)
    for it, b in val:
        x, y = x_of(max(it, first)), value_y(box, vtop, b)
        c.draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=PUSH_SIZE)
    c.frame(box)
    _, xticks = nice_ticks(float(last))
    for t in xticks:
        if first <= t <= last:
            c.draw.line([(round(x_of(t)), y1), (round(x_of(t)), y1 + 4)], fill=AXIS)
            c.text((x_of(t), y1 + 6), f"{t:g}", size=11, anchor="ma")
    c.text(((x0 + x1) / 2, y1 + 24), "iteration", size=12, anchor="ma")
    c.legend(x0, y0 - 26, [("total loss", REFERENCE, "line"), (part[1], PEER, "line"),
                           ("validation bias", PUSH_SIZE, "line")], size=13)
    return c.array()


HIST_BOX = (78, 100, 740, 440)  # shield calibration: histograms of near-copy and distinct distances
DISTINCT_FILL = (253, 214, 170)  # distinct images' bars (a light orange, under the near-copies' bars)
BALANCE = PUSH_SIZE  # the line where the two error rates balance (purple)


def calibration_chart(copy_distances, distinct_distances, r: float, balanced: float | None = None,
                      title: str = "SPELL Shield Calibration", subtitle: str = "", bins: int = 40) -> np.ndarray:
    """Two overlaid histograms [HEIGHT, WIDTH, 3] uint8 over the same bins: the RMS distance of each near-copy to
    its source (blue bars) and of each distinct image to its nearest protected image (light orange bars under them,
    their outline in orange on top), each as a share of its own count; the shield band below r with a dashed line at
    r, and a dashed purple line at the balanced r when given."""
    c = Canvas()
    c.title(title, subtitle)
    box = HIST_BOX
    x0, y0, x1, y1 = box
    near = np.asarray([float(d) for d in copy_distances], dtype=np.float64)
    far = np.asarray([float(d) for d in distinct_distances], dtype=np.float64)
    finite = np.concatenate([near, far])
    finite = finite[np.isfinite(finite)]
    xtop, xticks = nice_ticks(max(float(finite.max()) if finite.size else 0.0, r, balanced or 0.0) * 1.05)
    edges = np.linspace(0.0, xtop, bins + 1)

    def shares(d):
        d = d[np.isfinite(d)]
        counts = np.histogram(np.clip(d, 0, xtop), edges)[0]
        return counts / max(len(d), 1)

    near_h, far_h = shares(near), shares(far)
    top, ticks = nice_ticks(max(float(near_h.max(initial=0)), float(far_h.max(initial=0))) * 1.08 or 1.0)

    def x_of(v):
        return x0 + (x1 - x0) * min(max(v / xtop, 0.0), 1.0)

    c.rect(x0 + 1, y0, x_of(r), y1 - 1, SHIELD)
    c.y_axis(box, top, ticks, "share of its group per bin", percent=True)
    for k in range(bins):
        a, b = x_of(edges[k]) + 1, x_of(edges[k + 1]) - 1
        if far_h[k] > 0:
            c.rect(a, value_y(box, top, far_h[k]), b, y1 - 1, DISTINCT_FILL)
        if near_h[k] > 0:
            c.rect(a, value_y(box, top, near_h[k]), b, y1 - 1, REFERENCE)
    heights = [value_y(box, top, h) if h > 0 else y1 for h in far_h]
    for k in range(bins + 1):  # the distinct histogram's outline, drawn over both fills (none along the axis)
        left, right = (heights[k - 1] if k else y1), (heights[k] if k < bins else y1)
        if left != right:
            c.draw.line([(x_of(edges[k]), left), (x_of(edges[k]), right)], fill=PEER, width=2)
        if k < bins and far_h[k] > 0:
            c.draw.line([(x_of(edges[k]), heights[k]), (x_of(edges[k + 1]), heights[k])], fill=PEER, width=2)
    for value, colour, label in ((r, RADIUS, f"r = {r:.3g}"), (balanced, BALANCE, f"balance {balanced or 0:.3g}")):
        if value is None:
            continue
        x = round(x_of(value))
        y = y0
        while y < y1:
            c.draw.line([(x, y), (x, min(y + 6, y1))], fill=colour, width=2)
            y += 12
        c.text((x + 4, y0 + (2 if colour == RADIUS else 18)), label, size=12, fill=colour)
    c.frame(box)
    for t in xticks:
        c.draw.line([(round(x_of(t)), y1), (round(x_of(t)), y1 + 4)], fill=AXIS)
        c.text((x_of(t), y1 + 6), tick_label(t, xticks[1] - xticks[0]), size=11, anchor="ma")
    c.text(((x0 + x1) / 2, y1 + 24), "RMS distance in the model's latent space", size=12, anchor="ma")
    entries = [(f"near-copies to their source ({len(near)})", REFERENCE, "box"),
               (f"distinct images to the nearest protected image ({len(far)})", PEER, "line"),
               ("shield r", RADIUS, "band")]
    c.legend(x0 - 40, y0 - 26, entries, size=12)
    return c.array()
