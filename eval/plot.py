"""Line charts as PNG with Pillow only (no matplotlib): accuracy against visual tokens for budget sweeps."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


@dataclass
class Series:
    """One line: points ``(x, y)`` in order, with an optional label per point (e.g. the budget)."""

    name: str
    points: list[tuple[float, float]]
    labels: list[str] = field(default_factory=list)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2, 2.5 or 5 times a power of ten) covering ``[low, high]``."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    start = math.floor(low / step) * step
    ticks, value = [], start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text(draw: ImageDraw.ImageDraw, xy, text: str, font, anchor: str, fill="black") -> None:
    """Text at ``xy`` with an anchor (only TrueType fonts take anchors; the bitmap font starts at ``xy``)."""
    if isinstance(font, ImageFont.FreeTypeFont):
        draw.text(xy, text, fill=fill, font=font, anchor=anchor)
    else:
        draw.text(xy, text, fill=fill, font=font)


def _format(value: float) -> str:
    if abs(value) >= 10000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


def line_chart(series: Sequence[Series], path: str | os.PathLike, *, title: str = "", x_label: str = "",
               y_label: str = "", size: tuple[int, int] = (900, 600),
               y_range: tuple[float, float] | None = None) -> Path:
    """Draw ``series`` as lines with markers and write a PNG to ``path``; ``y_range`` clamps the y axis
    (e.g. ``(0, 100)`` for accuracies)."""
    points = [p for s in series for p in s.points]
    if not points:
        raise ValueError("nothing to plot: every series is empty")
    width, height = size
    left, right, top, bottom = 90, 30, 60, 80
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_pad = 0.06 * (max(xs) - min(xs)) or max(1.0, 0.1 * abs(xs[0]))
    y_pad = 0.1 * (max(ys) - min(ys)) or max(1.0, 0.1 * abs(ys[0]))
    y_low, y_high = min(ys) - y_pad, max(ys) + y_pad
    if y_range is not None:
        y_low, y_high = max(y_low, y_range[0]), min(y_high, y_range[1])
    x_ticks = nice_ticks(max(0.0, min(xs) - x_pad) if min(xs) >= 0 else min(xs) - x_pad, max(xs) + x_pad)
    y_ticks = nice_ticks(y_low, y_high)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    to_px = lambda x, y: (left + (x - x0) / (x1 - x0) * (width - left - right),  # noqa: E731
                          height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    small, medium = _font(13), _font(17)
    for x in x_ticks:
        px, _ = to_px(x, y0)
        draw.line([(px, top), (px, height - bottom)], fill=(230, 230, 230))
        _text(draw, (px, height - bottom + 8), _format(x), small, "mt", fill="black")
    for y in y_ticks:
        _, py = to_px(x0, y)
        draw.line([(left, py), (width - right, py)], fill=(230, 230, 230))
        _text(draw, (left - 8, py), _format(y), small, "rm", fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    _text(draw, (width / 2, 20), title, medium, "mt", fill="black")
    _text(draw, (width / 2, height - 30), x_label, small, "mt", fill="black")
    label_img = Image.new("RGB", (height, 24), "white")
    _text(ImageDraw.Draw(label_img), (height / 2, 12), y_label, small, "mm")
    image.paste(label_img.rotate(90, expand=True), (8, 0))

    for i, s in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        pixels = [to_px(x, y) for x, y in s.points]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=3)
        for j, (px, py) in enumerate(pixels):
            draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=colour)
            if j < len(s.labels) and s.labels[j]:
                near_right = px > width - right - 90
                _text(draw, (px - 7 if near_right else px + 7, py - 7), s.labels[j], small,
                      "rd" if near_right else "ld", fill=colour)
        if len(series) > 1 or s.name:
            ly = top + 10 + 20 * i
            draw.line([(left + 12, ly), (left + 36, ly)], fill=colour, width=3)
            _text(draw, (left + 42, ly), s.name, small, "lm", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
