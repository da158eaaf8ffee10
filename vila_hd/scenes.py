"""Synthetic scene drawing shared by the synthetic benchmark (:mod:`vila_hd.eval.synthetic`) and PS3
pre-training's synthetic data (:mod:`vila_hd.train.pretrain.synthetic`): a cluttered gradient background,
solid shapes in named colours, and non-overlapping placement of boxes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

OBJECT_COLOURS = {"red": (220, 30, 30), "green": (20, 150, 40), "blue": (30, 60, 220), "yellow": (230, 190, 0),
                  "purple": (140, 40, 170), "orange": (245, 120, 0), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle", "plus", "diamond")


class Placer:
    """Places boxes without overlap (with a margin) by rejection sampling."""

    def __init__(self, rng: random.Random, size: int, margin: int):
        self.rng, self.size, self.margin, self.boxes = rng, size, margin, []

    def place(self, w: int, h: int, tries: int = 200) -> tuple[int, int, int, int] | None:
        for _ in range(tries):
            x = self.rng.randint(self.margin, self.size - w - self.margin)
            y = self.rng.randint(self.margin, self.size - h - self.margin)
            box = (x, y, x + w, y + h)
            if all(_apart(box, other, self.margin) for other in self.boxes):
                self.boxes.append(box)
                return box
        return None


def _apart(a, b, margin: int) -> bool:
    return a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: Sequence[int], colour) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if kind == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
    elif kind == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
    elif kind == "triangle":
        draw.polygon([(x0 + w / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=colour)
    elif kind == "diamond":
        draw.polygon([(x0 + w / 2, y0), (x1 - 1, y0 + h / 2), (x0 + w / 2, y1 - 1), (x0, y0 + h / 2)], fill=colour)
    elif kind == "plus":
        t = max(1, round(w / 3))
        cx, cy = x0 + (w - t) // 2, y0 + (h - t) // 2
        draw.rectangle([cx, y0, cx + t - 1, y1 - 1], fill=colour)
        draw.rectangle([x0, cy, x1 - 1, cy + t - 1], fill=colour)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(kind)


def draw_background(rng: random.Random, size: int, clutter: float) -> Image.Image:
    """A two-colour gradient with large shapes: structure that survives any downscale."""
    a = np.array([rng.randint(60, 200) for _ in range(3)], np.float32)
    b = np.array([rng.randint(60, 200) for _ in range(3)], np.float32)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    column = (a * (1 - t) + b * t).astype(np.uint8)  # (size, 1, 3)
    image = Image.fromarray(np.repeat(column, size, axis=1))
    draw = ImageDraw.Draw(image)
    for _ in range(int(40 * clutter)):
        w, h = (rng.randint(size // 40, size // 6) for _ in range(2))
        x, y = rng.randint(-w // 2, size - w // 2), rng.randint(-h // 2, size - h // 2)
        colour = tuple(rng.randint(30, 225) for _ in range(3))
        kind = rng.choice(("rectangle", "ellipse", "line"))
        if kind == "rectangle":
            draw.rectangle([x, y, x + w, y + h], fill=colour)
        elif kind == "ellipse":
            draw.ellipse([x, y, x + w, y + h], fill=colour)
        else:
            draw.line([x, y, x + w, y + h], fill=colour, width=max(2, size // 200))
    return image
