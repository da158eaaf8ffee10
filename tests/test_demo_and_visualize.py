"""The README's demo command and the selection pictures."""

from __future__ import annotations

import json

import torch
from PIL import Image

from vila_hd import demo
from vila_hd.visualize import heatmap_overlay, selection_figure, selection_overlay


def test_quick_demo_runs_every_step(tmp_path):
    """The README's main job end to end on a handful of samples: data, model, two stages, five evaluations,
    report, heatmaps and one `vila-hd chat --prompt` answer (accuracies are meaningless at this size)."""
    demo.main(["--out", str(tmp_path), "--quick"])
    report = (tmp_path / "report.md").read_text()
    for setting in ("low resolution only", "bottom-up", "top-down", "all patches"):
        assert setting in report
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary
    for name in ("accuracy_vs_tokens.png", "selection_top_down.png", "selection_bottom_up.png"):
        picture = Image.open(tmp_path / name)
        picture.load()
        assert picture.format == "PNG" and min(picture.size) > 64
    assert (tmp_path / "sft" / "final" / "config.json").exists()


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
