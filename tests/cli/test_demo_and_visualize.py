"""The README's demo (``python -m vila_hd.demo``): its synthetic task, a quick run of the whole pipeline, and the
selection pictures."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import fresh_job_env

from vila_hd import demo
from vila_hd.visualize import heatmap_overlay, selection_figure, selection_overlay

SETTINGS = ["low_res", "bottom_up_1", "bottom_up_2", "top_down_1", "top_down_2", "all"]


# --- the task ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", sorted(demo.SCALES))
def test_patterns_are_invisible_at_low_resolution_but_not_at_full(scale):
    run = demo.SCALES[scale]
    for task in (run.task, run.align_task):
        assert demo.check_invisible(task) <= 1.0  # every pattern: the same flat half-tone in PS3's low-res view
        assert task.grid % task.period == 0 and task.image_size % task.grid == 0
    task = run.task
    masks = [demo.pattern_mask(k, task.side, task.period) for k in (*demo.PATTERNS, demo.DECOY_TEXTURE)]
    for i, a in enumerate(masks):  # half the pixels inked, and no two patterns alike at full resolution
        assert abs(a.mean() - 0.5) < 0.05
        assert all((a != b).mean() > 0.25 for b in masks[i + 1:])


def test_a_pattern_that_shows_at_low_resolution_is_refused(monkeypatch):
    task = demo.TaskConfig()
    real = demo.pattern_mask

    def leaky(kind, side, period):  # checks two periods wide survive the low-res resize
        if kind != "checkerboard":
            return real(kind, side, period)
        y, x = np.mgrid[0:side, 0:side]
        return ((x // period) + (y // period)) % 2 == 0

    monkeypatch.setattr(demo, "pattern_mask", leaky)
    with pytest.raises(AssertionError, match="low resolution"):
        demo.check_invisible(task)


def test_samples_are_seeded_grounded_and_answered_in_a_fixed_option_order():
    task = demo.TaskConfig()
    image, record = demo.generate_sample(task, "test", 3)
    again, same = demo.generate_sample(task, "test", 3)
    assert np.array_equal(np.asarray(image), np.asarray(again)) and record == same
    other, _ = demo.generate_sample(task, "train", 3)
    assert not np.array_equal(np.asarray(image), np.asarray(other))
    assert image.size == (task.image_size, task.image_size)
    assert record["options"] == list(demo.PATTERNS)
    assert record["answer"] == demo.LETTERS[demo.PATTERNS.index(record["category"])]
    assert record["prompt"].endswith(f"framed in {record['colour']}?")
    squares = record["squares"]
    assert len(squares) == task.squares and len({s["colour"] for s in squares}) == task.squares
    assert squares[0]["box"] == record["box"] and squares[0]["pattern"] == record["category"]
    assert all(s["pattern"] == demo.DECOY_TEXTURE for s in squares[1:])
    x0, y0, x1, y1 = record["box"]
    assert x1 - x0 == y1 - y0 == task.side and x0 % task.grid == 0 and y0 % task.grid == 0
    inside = np.asarray(image)[y0 + task.period:y1 - task.period, x0 + task.period:x1 - task.period]
    expected = demo.pattern_mask(record["category"], task.side, task.period)[task.period:-task.period,
                                                                              task.period:-task.period]
    assert np.array_equal((inside == 255).all(-1), ~expected)  # the asked square holds its pattern


def test_answers_are_balanced_in_every_run_of_three():
    task = demo.TaskConfig(seed=5)
    answers = [demo.generate_sample(task, "train", i)[1]["answer"] for i in range(12)]
    assert all(sorted(answers[i:i + 3]) == ["A", "B", "C"] for i in range(0, 12, 3))
    assert answers != [demo.generate_sample(demo.TaskConfig(seed=6), "train", i)[1]["answer"] for i in range(12)]


def test_the_tokenizer_is_trained_on_the_task_and_keeps_colours_whole():
    tokenizer = demo.build_tokenizer(400)
    for colour in demo.COLOURS:
        assert len(tokenizer.tokenize(" " + colour)) == 1
    assert tokenizer.convert_tokens_to_ids("<image>") != tokenizer.unk_token_id
    assert tokenizer.chat_template


def test_claims_pick_the_best_top_down_budget_within_a_quarter_of_the_tokens():
    rows = [{"setting": "low_res", "mode": "bottom-up", "visual_tokens": 16, "accuracy": 33.0},
            {"setting": "top_down_1", "mode": "top-down", "visual_tokens": 48, "accuracy": 80.0},
            {"setting": "top_down_2", "mode": "top-down", "visual_tokens": 80, "accuracy": 92.0},
            {"setting": "top_down_9", "mode": "top-down", "visual_tokens": 300, "accuracy": 99.0},
            {"setting": "all", "mode": "bottom-up", "visual_tokens": 332, "accuracy": 95.0}]
    claims = demo.check_claims(rows)
    assert claims["top_down"] == "top_down_2" and claims["token_fraction"] == round(80 / 332, 3)
    assert claims["gain_over_low_res"] == 59.0 and claims["gap_to_all"] == 3.0
    assert claims["beats_low_res_by_20"] and claims["within_5_of_all"]
    rows[2]["accuracy"] = 50.0
    claims = demo.check_claims(rows)
    assert claims["top_down"] == "top_down_1" and not claims["within_5_of_all"]


# --- the whole pipeline, quickly -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    done = subprocess.run([sys.executable, "-m", "vila_hd.demo", "--out", str(out), "--quick"],
                          capture_output=True, text=True, timeout=600, env=fresh_job_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def test_quick_run_writes_a_well_formed_report(quick_run):
    out, stdout = quick_run
    for line in ("step 1/5: data", "align: step 2/2", "sft: step 2/2", "eval all patches", "total wall time"):
        assert line in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] and summary["scale"] == "tiny" and summary["wall_seconds"] > 0
    assert [t["stage"] for t in summary["training"]] == ["align", "sft"]
    assert all(t["final"]["step"] == t["steps"] == 2 for t in summary["training"])
    rows = {r["setting"]: r for r in summary["results"]}
    assert list(rows) == SETTINGS
    tokens = {k: r["visual_tokens"] for k, r in rows.items()}
    assert tokens["low_res"] == 16 and tokens["top_down_1"] == tokens["bottom_up_1"] == 16 + 32
    assert tokens["top_down_2"] == tokens["bottom_up_2"] == 16 + 64 and tokens["all"] > 300
    assert all(r["n"] == 4 and r["errors"] == 0 and 0 <= r["accuracy"] <= 100 for r in rows.values())
    assert summary["chat"]["command"].startswith("vila-hd chat --model ") and "answer" in summary["chat"]
    assert summary["chat"]["expected"] in "ABC"

    report = (out / "report.md").read_text()
    assert report.startswith("# VILA-HD demo report") and "quick smoke run" in report
    assert "| setting | look-close steps | visual tokens | share of all-patches tokens | accuracy (%) |" in report
    for label in ("low resolution only", "bottom-up, 1 step", "top-down, 2 steps", "all patches"):
        assert f"| {label} |" in report
    for name in ("example.png", "accuracy_vs_tokens.png", "selection_top_down.png", "selection_bottom_up.png"):
        assert f"]({name})" in report
        with Image.open(out / name) as image:
            image.load()
            assert image.format == "PNG" and image.width >= 600 and image.height >= 300
    assert "vila-hd chat --model" in report


def test_quick_run_keeps_its_data_checkpoints_and_eval_records(quick_run):
    out, _ = quick_run
    data = out / "data"
    assert len(json.loads((data / "train.json").read_text())) == 8
    test = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    assert len(test) == 4 and all((data / r["image"]).exists() for r in test)
    for stage in ("align", "sft"):
        assert (out / stage / "final" / "config.json").exists()
        assert (out / stage / "stage.json").exists()
    for setting in SETTINGS:
        records = (out / "eval" / setting / "samples.jsonl").read_text().splitlines()
        assert len(records) == 4
    assert json.loads((out / "eval" / "top_down_1" / "run.json").read_text())["generation"]["mode"] == "top-down"


# --- pictures ------------------------------------------------------------------------------------------------
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


def test_example_figure_shows_the_low_res_view(tmp_path):
    task = demo.TaskConfig()
    image, record = demo.generate_sample(task, "test", 0)
    (tmp_path / "images" / "test").mkdir(parents=True)
    image.save(tmp_path / record["image"])
    path = demo.save_example(replace(task), record, tmp_path, tmp_path / "example.png")
    with Image.open(path) as figure:
        assert figure.width > 4 * 300
