"""``vila-hd infer`` on a tiny checkpoint: batched answers equal single ones, per-item errors are recorded,
runs resume without redoing finished ids, and bad inputs are reported clearly."""

from __future__ import annotations

import json

import pytest
from serving_helpers import rgb

from vila_hd import cli
from vila_hd.engine import Engine, GenerationOptions
from vila_hd.infer import infer, read_done, read_items


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def engine(checkpoint):
    return Engine.from_pretrained(checkpoint, options=GenerationOptions(max_new_tokens=5))


@pytest.fixture
def data(tmp_path):
    (tmp_path / "images").mkdir()
    rgb(0).save(tmp_path / "images" / "car.png")
    rgb(1, (200, 300)).save(tmp_path / "images" / "sign.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return tmp_path


def write_jsonl(path, records):
    with open(path, "a") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


ITEMS = [
    {"id": "q1", "image": "images/car.png", "question": "What color is the car?"},
    {"id": "q2", "image": "images/broken.png", "question": "What is this?"},
    {"id": "q3", "images": ["images/car.png", "images/sign.png"], "question": "Compare <image> and <image>."},
    {"id": "q4", "question": "Hi"},
    {"id": "q5", "image": "images/missing.png", "question": "Where?"},
    {"id": "q6", "image": "images/car.png"},
    "{not json",
]


def run(argv):
    return cli.main(["infer", *argv, "--max-new-tokens", "5", "--no-progress"])


def test_infer_records_errors_and_resumes(checkpoint, engine, data, capsys):
    write_jsonl(data / "questions.jsonl", ITEMS)
    argv = [
        "--model",
        str(checkpoint),
        "--input",
        str(data / "questions.jsonl"),
        "--output",
        str(data / "out" / "answers.jsonl"),
        "--batch-size",
        "3",
    ]
    assert run(argv) == 0
    assert "3 answered, 4 errors, 0 already done (of 7)" in capsys.readouterr().err
    first_run = (data / "out" / "answers.jsonl").read_text()
    records = {r["id"]: r for r in read_jsonl(data / "out" / "answers.jsonl")}
    assert list(records) == ["q1", "q2", "q3", "q4", "q5", "q6", 7]

    # Answers equal what the engine says for each item alone.
    images = data / "images"
    for key, conv in [
        ("q1", engine.single_turn([images / "car.png"], "What color is the car?")),
        ("q3", engine.single_turn([images / "car.png", images / "sign.png"], "Compare <image> and <image>.")),
        ("q4", engine.single_turn(None, "Hi")),
    ]:
        alone = engine.generate(conv)
        assert records[key]["answer"] == alone.text and "error" not in records[key]
        assert records[key]["stats"]["image_tokens"] == alone.stats.image_tokens
    assert records["q3"]["images"] == ["images/car.png", "images/sign.png"]
    assert records["q3"]["stats"]["images"] == 2 and records["q4"]["stats"]["images"] == 0

    # Failures name their culprit and keep the item's fields.
    assert records["q2"]["error"] == f"{images / 'broken.png'}: cannot read image header (Truncated File Read)"
    assert records["q2"]["question"] == "What is this?" and "answer" not in records["q2"]
    assert records["q5"]["error"] == f"{images / 'missing.png'}: not found"
    assert records["q6"]["error"] == "line 6 has no 'question' string"
    assert records[7]["error"].startswith("line 7 is not valid JSON")

    # Resume: new items only; the finished lines stay as they were.
    write_jsonl(
        data / "questions.jsonl",
        [{"id": "q8", "image": "images/sign.png", "question": "Read it."}, {"id": 9, "question": "And this?"}],
    )
    assert run(argv) == 0
    assert "2 answered, 0 errors, 7 already done (of 9)" in capsys.readouterr().err
    text = (data / "out" / "answers.jsonl").read_text()
    assert text.startswith(first_run)
    assert [r["id"] for r in read_jsonl(data / "out" / "answers.jsonl")] == [
        "q1",
        "q2",
        "q3",
        "q4",
        "q5",
        "q6",
        7,
        "q8",
        9,
    ]
    assert run(argv) == 0
    assert "0 answered, 0 errors, 9 already done (of 9)" in capsys.readouterr().err
    assert (data / "out" / "answers.jsonl").read_text() == text

    # --retry-errors redoes the failed ids once their cause is fixed.
    rgb(2).save(images / "broken.png")
    assert run([*argv, "--retry-errors"]) == 0
    assert "1 answered, 3 errors, 5 already done (of 9)" in capsys.readouterr().err
    records = read_jsonl(data / "out" / "answers.jsonl")
    ids = [r["id"] for r in records]
    assert sorted(map(str, ids)) == sorted(map(str, set(ids)))  # one line per id
    assert "answer" in next(r for r in records if r["id"] == "q2")


def test_a_failing_batch_is_retried_item_by_item(engine, data, monkeypatch):
    write_jsonl(data / "q.jsonl", [{"id": i, "question": f"Question {i}"} for i in range(4)])
    generate_batch = engine.generate_batch

    def picky(conversations, options=None, **changes):
        if any("Question 2" in c.messages[-1]["content"] for c in conversations):
            raise ValueError("sequence of 99999 tokens exceeds the LLM context of 4096")
        return generate_batch(conversations, options, **changes)

    monkeypatch.setattr(engine, "generate_batch", picky)
    counts = infer(engine, data / "q.jsonl", data / "a.jsonl", batch_size=4, progress=False)
    assert counts == {"total": 4, "skipped": 0, "answered": 3, "errors": 1}
    records = read_jsonl(data / "a.jsonl")
    assert [("error" in r) for r in records] == [False, False, True, False]
    assert "exceeds the LLM context" in records[2]["error"]


def test_interrupted_output_line_is_dropped_and_redone(data):
    out = data / "a.jsonl"
    out.write_text('{"id": "a", "answer": "x"}\n{"id": "b", "error": "boom"}\n{"id": "c", "ans')
    assert read_done(out) == {'"a"', '"b"'}
    assert out.read_text() == '{"id": "a", "answer": "x"}\n{"id": "b", "error": "boom"}\n'
    assert read_done(out, retry_errors=True) == {'"a"'}
    assert out.read_text() == '{"id": "a", "answer": "x"}\n'
    assert read_done(data / "none.jsonl") == set()


def test_a_finished_run_does_not_load_the_model(data, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for a run with nothing left to do")

    monkeypatch.setattr("vila_hd.infer.load_engine", no_model)
    write_jsonl(data / "q.jsonl", [{"id": "a", "question": "x"}, {"id": 2, "question": "y"}])
    write_jsonl(data / "a.jsonl", [{"id": "a", "answer": "x"}, {"id": 2, "answer": "y"}])
    argv = ["--model", str(data / "no-model"), "--input", str(data / "q.jsonl"), "--output", str(data / "a.jsonl")]
    assert run(argv) == 0
    assert "0 answered, 0 errors, 2 already done (of 2)" in capsys.readouterr().err
    write_jsonl(data / "q.jsonl", [{"id": "b", "question": "z"}])  # one new item: now the model is needed
    with pytest.raises(AssertionError, match="the model was loaded"):
        run(argv)


def test_duplicate_ids_and_missing_input_are_refused(checkpoint, data, capsys):
    write_jsonl(
        data / "dup.jsonl", [{"id": 1, "question": "a"}, {"id": 2, "question": "b"}, {"id": 1, "question": "c"}]
    )
    with pytest.raises(ValueError, match="id 1 appears on lines 1 and 3"):
        read_items(data / "dup.jsonl")
    assert run(["--model", str(checkpoint), "--input", str(data / "dup.jsonl"), "--output", str(data / "o.jsonl")]) == 1
    assert "id 1 appears on lines 1 and 3" in capsys.readouterr().err
    assert (
        run(["--model", str(checkpoint), "--input", str(data / "nope.jsonl"), "--output", str(data / "o.jsonl")]) == 1
    )
    assert f"input file {data / 'nope.jsonl'} does not exist" in capsys.readouterr().err
    write_jsonl(data / "ok.jsonl", [{"id": 1, "question": "a"}])
    assert (
        run(["--model", str(data / "no-model"), "--input", str(data / "ok.jsonl"), "--output", str(data / "o.jsonl")])
        == 1
    )
    assert f"model directory {data / 'no-model'} does not exist" in capsys.readouterr().err
    assert not (data / "o.jsonl").exists()
    with pytest.raises(SystemExit) as exit_info:
        run(["--model", str(checkpoint), "--input", str(data / "ok.jsonl"), "--output", "o.jsonl", "--batch-size", "0"])
    assert exit_info.value.code == 2
    assert "argument --batch-size: expected a positive integer, got '0'" in capsys.readouterr().err


def test_image_root_and_look_close_settings(checkpoint, data, capsys):
    write_jsonl(data / "q.jsonl", [{"id": "a", "image": "car.png", "question": "What color is the car?"}])
    assert (
        run(
            [
                "--model",
                str(checkpoint),
                "--input",
                str(data / "q.jsonl"),
                "--output",
                str(data / "a.jsonl"),
                "--image-root",
                str(data / "images"),
                "--steps",
                "1",
                "--mode",
                "bottom-up",
            ]
        )
        == 0
    )
    stats = read_jsonl(data / "a.jsonl")[0]["stats"]
    assert stats["tokens_per_image"] == 48 and stats["look_close_mode"] == "bottom-up"
    assert stats["selected_pct"] == 10.0


IMAGE_FIELDS = ["images", "image_tokens", "tokens_per_image", "low_res_tokens_per_image", "high_res_tokens_per_image",
                "selected_patches", "total_patches", "selected_pct"]


def test_batched_stats_are_each_items_own(engine, data):
    """A text-only item batched with an image item has no image stats; the image item's equal --batch-size 1's;
    the times are the batch's, labelled by batch_size."""
    write_jsonl(data / "mix.jsonl", [{"id": "img", "image": "images/car.png", "question": "What color?"},
                                     {"id": "txt", "question": "Hi"}])
    stats = {}
    for size in (2, 1):
        infer(engine, data / "mix.jsonl", data / f"mix{size}.jsonl", batch_size=size, progress=False)
        stats[size] = {r["id"]: r["stats"] for r in read_jsonl(data / f"mix{size}.jsonl")}
    batched, alone = stats[2], stats[1]
    assert batched["img"]["selected_patches"] > 0 and batched["img"]["total_patches"] > 0
    assert {k: batched["img"][k] for k in IMAGE_FIELDS} == {k: alone["img"][k] for k in IMAGE_FIELDS}
    assert {k: batched["txt"][k] for k in IMAGE_FIELDS} == dict.fromkeys(IMAGE_FIELDS, 0)
    assert {k: alone["txt"][k] for k in IMAGE_FIELDS} == dict.fromkeys(IMAGE_FIELDS, 0)
    assert [batched[k]["batch_size"] for k in ("img", "txt")] == [2, 2]
    assert [alone[k]["batch_size"] for k in ("img", "txt")] == [1, 1]
    assert batched["img"]["total_s"] == batched["txt"]["total_s"]  # one generate call, one wall time
