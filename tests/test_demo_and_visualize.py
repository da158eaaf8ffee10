"""The README's demo command and the selection pictures."""

from __future__ import annotations

import json

import torch
from PIL import Image

from vila_hd import demo
from vila_hd.visualize import heatmap_overlay, selection_figure, selection_overlay


def test_demo_writes_heatmap_and_summary(tmp_path):
    summary = demo.main(["--out", str(tmp_path), "--num-look-close", "1"])
    assert summary["tokens"] == 729 + 2560
    assert sum(summary["selected_per_scale"]) == 2560
    figure = Image.open(tmp_path / "selection.png")
    figure.load()
    assert figure.format == "PNG" and figure.width > 512 and figure.height > 512
    assert json.loads((tmp_path / "summary.json").read_text())["heatmap"].endswith("selection.png")


def test_overlays_follow_the_maps():
    image = Image.new("RGB", (100, 50), (200, 200, 200))
    prob = torch.zeros(5, 10)
    prob[0, 0] = 1.0
    heat = heatmap_overlay(image, prob)
    assert heat.size == (100, 50)
    hot, cold = heat.getpixel((2, 2)), heat.getpixel((95, 45))
    assert hot[0] > hot[2] and cold[2] > cold[0]  # red where probability is high, blue where low
    sel = torch.zeros(5, 10)
    sel[:, :5] = 1
    over = selection_overlay(image, sel)
    assert over.getpixel((10, 10)) == (200, 200, 200) and over.getpixel((90, 10))[0] < 120
    fig = selection_figure(image, [prob, prob], [sel, sel])
    assert fig.width > 2 * 512 * 0.9
