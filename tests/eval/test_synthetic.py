"""The synthetic high-resolution benchmark: deterministic, every target invisible at low resolution by the
documented rule, usable as grounded LLaVA training data and as an evaluation file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vila_hd.eval.benchmarks import build_benchmark
from vila_hd.eval.cli import synth_main
from vila_hd.eval.synthetic import (
    MAX_LOW_RES_PX,
    MIN_LEGIBLE_PX,
    SynthConfig,
    _split_of_string,
    detail_range,
    generate,
    generate_sample,
    is_invisible,
    low_res_view,
    pattern_array,
)

TINY = SynthConfig(image_size=448, low_res=112, train=6, test=6)


def test_same_seed_same_samples_other_seed_other_samples():
    for split, index in [("train", 0), ("train", 4), ("test", 2)]:
        image_a, record_a = generate_sample(TINY, split, index)
        image_b, record_b = generate_sample(TINY, split, index)
        assert record_a == record_b
        assert np.array_equal(np.asarray(image_a), np.asarray(image_b))
    image_c, record_c = generate_sample(SynthConfig(image_size=448, low_res=112, seed=1), "train", 0)
    assert not np.array_equal(np.asarray(generate_sample(TINY, "train", 0)[0]), np.asarray(image_c))


def test_generated_files_are_identical_across_runs(tmp_path):
    generate(TINY, tmp_path / "a")
    generate(TINY, tmp_path / "b")
    for name in ("train.json", "train_eval.jsonl", "test.json", "test_eval.jsonl", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for path in sorted((tmp_path / "a" / "images").rglob("*.png")):
        twin = tmp_path / "b" / path.relative_to(tmp_path / "a")
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(twin)))


@pytest.mark.parametrize("config, count", [
    (SynthConfig(image_size=448, low_res=112), 24),     # the tiny demo scale
    (SynthConfig(image_size=1512, low_res=378), 6),     # PS3-1.5K
    (SynthConfig(image_size=3780, low_res=378), 3),     # PS3-4K
])
def test_every_target_is_invisible_at_low_resolution(config, count):
    for split in ("train", "test"):
        for i in range(count):
            image, record = generate_sample(config, split, i)
            category, critical = record["category"], record["critical_px"]
            assert image.size == (config.image_size, config.image_size)
            # the documented rule: the critical detail spans at most MAX_LOW_RES_PX low-res pixels ...
            assert critical * config.low_res / config.image_size <= MAX_LOW_RES_PX[category] + 1e-9
            assert is_invisible(category, critical, config.image_size, config.low_res)
            assert record["low_res_px"] <= MAX_LOW_RES_PX[category]
            # ... while it is legible at full resolution, so looking closely answers the question
            assert critical >= MIN_LEGIBLE_PX[category]
            assert record["required_resolution"] > config.low_res
            x1, y1, x2, y2 = record["box"]
            assert 0 <= x1 < x2 <= config.image_size and 0 <= y1 < y2 <= config.image_size
            assert critical <= max(x2 - x1, y2 - y1)


def test_patterns_average_out_in_the_low_res_view():
    """Empirical check of the pattern rule: a 4-px period seen at 1/4 scale becomes a flat colour."""
    config = SynthConfig(image_size=448, low_res=112, categories=("pattern",))
    for i in range(4):
        image, record = generate_sample(config, "train", i)
        x1, y1, x2, y2 = record["box"]
        full = np.asarray(image.crop((x1, y1, x2, y2)), np.float32)
        s = config.low_res / config.image_size
        low = np.asarray(low_res_view(image, config.low_res), np.float32)
        inner = low[int(np.ceil(y1 * s)) : int(y2 * s), int(np.ceil(x1 * s)) : int(x2 * s)]
        spread = lambda a: a.reshape(-1, 3).std(axis=0).max()  # noqa: E731 - per channel, over pixels
        assert spread(full) > 40 and inner.size and spread(inner) < 1.0
    for kind in ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard"):
        patch = Image.fromarray(pattern_array(kind, 16, 2, (200, 0, 0)))
        flat = np.asarray(patch.resize((4, 4), Image.Resampling.BOX), np.float32)
        assert flat.reshape(-1, 3).std(axis=0).max() <= 0.5  # every pattern -> the same flat colour


def test_outputs_are_llava_grounded_data_and_an_eval_file(tmp_path):
    meta = generate(TINY, tmp_path)
    train = json.loads((tmp_path / "train.json").read_text())
    assert len(train) == 6 and meta["counts"]["train"]["samples"] == 6
    for sample in train:
        assert set(sample) == {"id", "image", "box", "conversations"}
        assert (tmp_path / sample["image"]).is_file()
        human, gpt = sample["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["from"] == "gpt"
        assert len(sample["box"]) == 4 and all(isinstance(v, int) for v in sample["box"])
    assert meta["rule"]["max_low_res_px"] == MAX_LOW_RES_PX
    assert set(meta["counts"]["test"]["category"]) == {"text", "object", "pattern"}
    bench = build_benchmark("jsonl", str(tmp_path / "test_eval.jsonl"))
    samples = bench.samples()
    assert len(samples) == 6 and all(s.bucket in {"1K", "2K", "4K"} for s in samples)
    for sample, line in zip(samples, (tmp_path / "test_eval.jsonl").read_text().splitlines()):
        record = json.loads(line)
        if record.get("options"):
            assert sample.options[sample.answer] == record["answer_text"]
    # the reference answers score 100
    from vila_hd.eval.harness import run_benchmark

    replies = {s.id: (s.answer if s.options else s.answers[0]) for s in samples}
    summary = run_benchmark(bench, tmp_path / "out", replies=replies, progress=False)
    assert summary["accuracy"] == 100.0


def test_held_out_strings_never_occur_in_training():
    config = SynthConfig(image_size=448, low_res=112, categories=("text",), mc_fraction=0.0)
    answers = {split: {generate_sample(config, split, i)[1]["answer"] for i in range(12)} for split in ("train", "test")}
    assert not answers["train"] & answers["test"]
    assert all(_split_of_string(a) == "test" for a in answers["test"])


def test_multiple_choice_options_come_from_the_image():
    config = SynthConfig(image_size=448, low_res=112, categories=("text",), mc_fraction=1.0)
    _, record = generate_sample(config, "train", 3)
    assert len(record["options"]) == 4 and record["options"]["ABCD".index(record["answer"])] == record["answer_text"]


def test_impossible_scales_are_refused():
    assert detail_range("pattern", 448, 112) == (4, 4)
    with pytest.raises(ValueError, match="category 'text' is impossible at 600 px"):
        SynthConfig(image_size=600, low_res=378)
    with pytest.raises(ValueError, match="must be larger than low_res"):
        SynthConfig(image_size=300, low_res=378)


def test_synth_cli(tmp_path, capsys):
    assert synth_main(["--out", str(tmp_path), "--image-size", "448", "--low-res", "112", "--train", "2",
                       "--test", "1", "--categories", "object,pattern", "--format", "jpg"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["train"]["samples"] == 2 and set(counts["train"]["category"]) == {"object", "pattern"}
    assert sorted(p.suffix for p in (tmp_path / "images" / "train").iterdir()) == [".jpg", ".jpg"]
    with pytest.raises(SystemExit):
        synth_main(["--out", str(tmp_path), "--image-size", "200", "--low-res", "112"])
