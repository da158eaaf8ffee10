"""Pictures of what PS3 looked at: selection-probability heatmaps and selected-patch overlays.

Pure PIL + numpy (no matplotlib/OpenCV): a jet-like colour map blended over the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def _jet(values: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8, blue (low) -> cyan -> yellow -> red (high)."""
    v = np.clip(values, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def heatmap_overlay(image: Image.Image, prob: torch.Tensor, alpha: float = 0.45) -> Image.Image:
    """Blend a (h, w) probability map (min-max normalised) over ``image`` at the image's size."""
    p = prob.detach().float().cpu().numpy()
    p = (p - p.min()) / (p.max() - p.min() + 1e-6)
    heat = Image.fromarray(_jet(p)).resize(image.size, Image.Resampling.BILINEAR)
    return Image.blend(image.convert("RGB"), heat, alpha)


def selection_overlay(image: Image.Image, selection: torch.Tensor, alpha: float = 0.55) -> Image.Image:
    """Darken every patch that was *not* selected; selected patches keep their pixels."""
    sel = selection.detach().float().cpu().numpy()
    mask = Image.fromarray((sel * 255).astype(np.uint8)).resize(image.size, Image.Resampling.NEAREST)
    dark = Image.blend(image.convert("RGB"), Image.new("RGB", image.size, (0, 0, 0)), alpha)
    return Image.composite(image.convert("RGB"), dark, mask)


def selection_figure(
    image: Image.Image,
    probs: Sequence[torch.Tensor],
    maps: Sequence[torch.Tensor] | None = None,
    titles: Sequence[str] | None = None,
    tile: int = 512,
) -> Image.Image:
    """One picture: per high-res scale, the probability heatmap (top row) and the selected patches
    (bottom row, when ``maps`` is given), each tile ``tile`` pixels wide."""
    scale = tile / max(image.size)
    small = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)))
    rows = 2 if maps is not None else 1
    pad = 24
    canvas = Image.new("RGB", (len(probs) * (small.width + 8) + 8, rows * (small.height + pad) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    for i, prob in enumerate(probs):
        x = 8 + i * (small.width + 8)
        canvas.paste(heatmap_overlay(small, prob), (x, pad))
        label = titles[i] if titles else f"scale {i + 1}: {prob.shape[-2]}x{prob.shape[-1]} patches"
        draw.text((x, 6), label, fill="black")
        if maps is not None:
            selected = int(maps[i].sum())
            y = pad + small.height + pad
            canvas.paste(selection_overlay(small, maps[i]), (x, y))
            draw.text((x, y - 18), f"{selected} / {maps[i].numel()} selected", fill="black")
    return canvas


def save_selection(image: Image.Image, probs, maps, path: str | Path) -> Path:
    """Write :func:`selection_figure` for the first sample of a batch to ``path`` (PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    first = lambda xs: [x[0] if x.dim() == 3 else x for x in xs]  # noqa: E731
    selection_figure(image, first(probs), first(maps) if maps is not None else None).save(path)
    return path
