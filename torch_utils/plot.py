"""Line plots drawn with PIL, so benchmarks and training runs can write PNGs without a plotting library.

    axes = line_plot("ratio.png", "MSM step / floor", "K", "ratio", {"gray64": [(1, 1.01), (2, 1.02)]},
                     hlines={"1.03x target": 1.03})
    axes.pixel(1, 1.01)  # where that point was drawn, in image pixels

Every figure is WIDTH x HEIGHT pixels: a plot area inside fixed margins, ticks with labels on both axes, a light grid,
and a legend in the right margin with one distinct colour per series (solid lines with dots) and per horizontal
reference line (dashed). The PNG is written to a temporary name and renamed, so a failed plot leaves no partial file.
"""

import math

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from dnnlib import atomic_write

WIDTH, HEIGHT = 900, 520
LEFT, RIGHT, TOP, BOTTOM = 80, 220, 48, 60  # margins: tick labels left and below, legend right, title above

# Distinct, colour-blind-friendly hues (Tableau 10); series beyond ten reuse them in order.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _nice_step(span: float, target_ticks: int = 6) -> float:
    """A step of 1, 2 or 5 times a power of ten that cuts `span` into about `target_ticks` intervals."""
    raw = span / target_ticks
    power = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * power >= raw:
            return m * power
    return 10 * power


class Axis:
    """One axis: data range (after the log transform, if any) to a pixel interval, and its tick positions."""

    def __init__(self, values: list, log: bool, name: str):
        if log and min(values) <= 0:
            raise ValueError(f"{name}: a log axis needs positive values, got {min(values):g}")
        self.log = log
        t = [self.transform(v) for v in values]
        lo, hi = min(t), max(t)
        if log:  # whole decades when the data span more than one, else a tenth of a decade of room either side
            lo, hi = (math.floor(lo), math.ceil(hi)) if hi - lo > 1 else (lo - 0.1, hi + 0.1)
        else:  # 5% room either side so points do not sit on the frame
            pad = (hi - lo) * 0.05 if hi > lo else max(abs(lo) * 0.1, 0.5)
            lo, hi = lo - pad, hi + pad
        self.lo, self.hi = lo, hi

    def transform(self, v: float) -> float:
        return math.log10(v) if self.log else float(v)

    def fraction(self, v: float) -> float:
        """Where `v` falls between the ends of the axis, 0 at the low end and 1 at the high end."""
        return (self.transform(v) - self.lo) / (self.hi - self.lo)

    def ticks(self) -> list:
        if self.log:
            decades = range(math.ceil(self.lo), math.floor(self.hi) + 1)
            mantissas = range(1, 10) if self.hi - self.lo < 1 else (1, 2, 5) if len(decades) <= 3 else (1,)
            ticks = [m * 10.0**d for d in range(math.floor(self.lo), math.ceil(self.hi) + 1) for m in mantissas]
            ticks = [v for v in ticks if self.lo - 1e-9 <= math.log10(v) <= self.hi + 1e-9]
            if len(ticks) >= 2:
                return ticks
            return [10**self.lo, 10 ** ((self.lo + self.hi) / 2), 10**self.hi]  # less than a factor of 2 in range
        step = _nice_step(self.hi - self.lo)
        first = math.ceil(self.lo / step - 1e-9)
        return [round(i * step, 12) for i in range(first, math.floor(self.hi / step + 1e-9) + 1)]


class Axes:
    """The mapping from data coordinates to image pixels of one plot (returned by line_plot)."""

    def __init__(self, x: Axis, y: Axis):
        self.x, self.y = x, y
        self.width, self.height = WIDTH, HEIGHT
        self.box = (LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM)  # plot area: left, top, right, bottom pixel

    def pixel(self, x: float, y: float) -> tuple:
        """Image pixel (column, row) of the data point (x, y); rows grow downwards."""
        left, top, right, bottom = self.box
        return left + self.x.fraction(x) * (right - left), bottom - self.y.fraction(y) * (bottom - top)


def _label(v: float) -> str:
    return str(int(v)) if v == int(v) and abs(v) < 1e7 else f"{v:.4g}"


def _check_series(series: dict) -> None:
    if not series:
        raise ValueError("line_plot: `series` is empty; expected at least one name -> [(x, y), ...] entry")
    for name, points in series.items():
        if len(points) == 0:
            raise ValueError(f"line_plot: series {name!r} has no points; expected a list of (x, y) pairs")
        bad = [p for p in points if len(p) != 2 or not all(math.isfinite(float(v)) for v in p)]
        if bad:
            raise ValueError(f"line_plot: series {name!r} has a point that is not a finite (x, y) pair: {bad[0]!r}")


def line_plot(path: str, title: str, xlabel: str, ylabel: str, series: dict, hlines: dict | None = None,
              log_x: bool = False, log_y: bool = False) -> Axes:
    """Draw `series` (name -> [(x, y), ...]) as lines with dots and `hlines` (name -> y) as dashed horizontal lines,
    write the PNG to `path`, and return the Axes mapping (Axes.pixel gives where a data point was drawn)."""
    _check_series(series)
    hlines = dict(hlines or {})
    bad = [name for name, y in hlines.items() if not math.isfinite(float(y))]
    if bad:
        raise ValueError(f"line_plot: horizontal line {bad[0]!r} is not a finite number")
    xs = [float(x) for points in series.values() for x, _ in points]
    ys = [float(y) for points in series.values() for _, y in points] + [float(y) for y in hlines.values()]
    axes = Axes(Axis(xs, log_x, "line_plot: x axis"), Axis(ys, log_y, "line_plot: y axis"))
    left, top, right, bottom = axes.box

    img = PIL.Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = PIL.ImageDraw.Draw(img)
    font = PIL.ImageFont.load_default(size=13)
    for ty in axes.y.ticks():
        _, py = axes.pixel(xs[0], ty)
        draw.line([(left, py), (right, py)], fill=(230, 230, 230))
        draw.line([(left - 5, py), (left, py)], fill="black")
        draw.text((left - 8, py), _label(ty), fill="black", font=font, anchor="rm")
    for tx in axes.x.ticks():
        px, _ = axes.pixel(tx, ys[0])
        draw.line([(px, top), (px, bottom)], fill=(240, 240, 240))
        draw.line([(px, bottom), (px, bottom + 5)], fill="black")
        draw.text((px, bottom + 8), _label(tx), fill="black", font=font, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2, HEIGHT - 8), xlabel, fill="black", font=font, anchor="mb")
    draw.text((8, top - 8), ylabel, fill="black", font=font, anchor="ls")
    draw.text(((left + right) / 2, 6), title, fill="black", font=PIL.ImageFont.load_default(size=15), anchor="mt")

    legend_y = top + 4
    colours = iter(PALETTE * (1 + (len(series) + len(hlines)) // len(PALETTE)))
    for name, points in series.items():
        colour = next(colours)
        pts = [axes.pixel(x, y) for x, y in sorted(points)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.line([(right + 12, legend_y), (right + 36, legend_y)], fill=colour, width=2)
        draw.text((right + 42, legend_y), str(name), fill=colour, font=font, anchor="lm")
        legend_y += 20
    for name, y in hlines.items():
        colour = next(colours)
        _, py = axes.pixel(xs[0], y)
        for x0 in range(left, right, 12):
            draw.line([(x0, py), (min(x0 + 6, right), py)], fill=colour, width=2)
        draw.line([(right + 12, legend_y), (right + 18, legend_y)], fill=colour, width=2)
        draw.line([(right + 24, legend_y), (right + 30, legend_y)], fill=colour, width=2)
        draw.text((right + 42, legend_y), f"{name} ({_label(y)})", fill=colour, font=font, anchor="lm")
        legend_y += 20

    with atomic_write(path) as f:
        img.save(f, format="PNG")
    return axes
