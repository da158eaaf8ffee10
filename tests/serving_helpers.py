"""Shared fixtures' building blocks for the serving tests (engine, infer, API, chat CLI, model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vila_hd.builder import build_tiny_model


def rgb(seed: int, size=(320, 240)) -> Image.Image:
    """A blocky random RGB image (16 px blocks), so that saliency and selection have something to find."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.Resampling.NEAREST)


def save_tiny_checkpoint(path: Path) -> Path:
    """Write the tiny random-weight VILA-HD (seed 0) and its processor to ``path``."""
    model, processor = build_tiny_model("tiny", seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
