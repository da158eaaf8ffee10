"""Each benchmark runner on a small fixture in its publisher's format, with planted replies: expected scores."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
from PIL import Image

from eval.benchmarks import FormatError, build_benchmark
from eval.benchmarks.hrbench import HRBench
from eval.benchmarks.vstar import split_vstar_text
from eval.harness import run_benchmark


def write_image(path, size=(64, 48), colour=(200, 30, 30), fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def jpeg_base64(size=(64, 48), colour=(10, 120, 200)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def score(benchmark, replies, tmp_path, **kwargs):
    return run_benchmark(benchmark, tmp_path / "out", replies=replies, progress=False, **kwargs)


# --- V*Bench ----------------------------------------------------------------------------------------------
def vstar_root(tmp_path):
    root = tmp_path / "vstar_bench"
    instruction = "Answer with the option's letter from the given choices directly."
    rows = [
        {"image": "direct_attributes/sa_1.jpg", "category": "direct_attributes", "question_id": 0, "label": "B",
         "text": f"What is the color of the cup?\n(A) white\n(B) red\n(C) blue\n(D) black\n{instruction}"},
        {"image": "direct_attributes/sa_2.jpg", "category": "direct_attributes", "question_id": 1, "label": "C",
         "text": f"What is the material of the glove?\n(A) rubber\n(B) cotton\n(C) leather\n(D) wool\n{instruction}"},
        {"image": "relative_position/sa_3.jpg", "category": "relative_position", "question_id": 2, "label": "A",
         "text": f"Is the dog on the left or right of the car?\n(A) left\n(B) right\n{instruction}"},
    ]
    write_jsonl(root / "test_questions.jsonl", rows)
    for row in rows:
        write_image(root / row["image"])
    return root


def test_vstar_generative_scoring(tmp_path):
    bench = build_benchmark("vstar", str(vstar_root(tmp_path)))
    samples = bench.samples()
    assert [s.id for s in samples] == ["0", "1", "2"]
    assert samples[0].options == {"A": "white", "B": "red", "C": "blue", "D": "black"}
    assert samples[0].question == "What is the color of the cup?"
    assert samples[0].prompt.endswith("directly.") and "(B) red" in samples[0].prompt  # the published text
    replies = {"0": "(B)", "1": "The answer is A", "2": "C"}  # right; wrong; C is not an option of a 2-way question
    summary = score(bench, replies, tmp_path)
    assert summary["accuracy"] == pytest.approx(33.33)
    assert summary["unparsed_rate"] == pytest.approx(33.33)
    assert summary["by_category"] == {"direct_attributes": {"n": 2, "accuracy": 50.0},
                                      "relative_position": {"n": 1, "accuracy": 0.0}}
    assert summary["by_bucket"] == {"1K": {"n": 3, "accuracy": 33.33}}  # from the 64x48 images


def test_vstar_from_per_image_annotations(tmp_path):
    root = tmp_path / "vstar_bench"
    for i, (cat, options) in enumerate([("direct_attributes", ["red", "blue", "green", "white"]),
                                        ("relative_position", ["left", "right"])]):
        write_image(root / cat / f"sa_{i}.jpg")
        (root / cat / f"sa_{i}.json").write_text(json.dumps(
            {"target_object": ["cup"], "bbox": [[1, 2, 3, 4]], "question": f"Question {i}?", "options": options}))
    bench = build_benchmark("vstar", str(root))
    samples = bench.samples()
    assert [s.category for s in samples] == ["direct_attributes", "relative_position"]
    for sample, correct in zip(samples, ["red", "left"]):
        assert sample.options[sample.answer] == correct  # the first published option is the correct one
    assert build_benchmark("vstar", str(root)).samples()[0].options == samples[0].options  # fixed order
    summary = score(bench, {s.id: s.options[s.answer] for s in samples}, tmp_path)
    assert summary["accuracy"] == 100.0


def test_vstar_errors_name_the_culprit(tmp_path):
    root = tmp_path / "v"
    write_jsonl(root / "test_questions.jsonl", [{"image": "a.jpg", "text": "Q?\n(A) x\n(B) y", "label": "C"}])
    with pytest.raises(FormatError, match=r"test_questions.jsonl line 1: label 'C' is not one of the options AB"):
        build_benchmark("vstar", str(root)).samples()
    with pytest.raises(FormatError, match="no '\\(A\\) ...' option lines"):
        split_vstar_text("What colour?", "here")


# --- HR-Bench -------------------------------------------------------------------------------------------
def hrbench_tsv(tmp_path):
    """Two questions x 4 option cycles, columns in the published order (index, question, A-D, answer, ...)."""
    questions = [("What animal is on the sign?", ["cat", "dog", "cow", "pig"], "single"),
                 ("Which car is closer to the tree?", ["red", "blue", "green", "white"], "cross")]
    image = jpeg_base64()
    rows, index = [], 0
    for q, opts, category in questions:
        for cycle in range(4):
            rotated = opts[cycle:] + opts[:cycle]
            answer = "ABCD"[rotated.index(opts[0])]
            cell = image if index % 4 == 0 else str(index - index % 4)  # VLMEvalKit: later rows point to the first
            rows.append([index, q, *rotated, answer, category, cycle, cell])
            index += 1
    path = tmp_path / "hr_bench_4k.tsv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["index", "question", "A", "B", "C", "D", "answer", "category", "cycle_category", "image"])
        writer.writerows(rows)
    return path


def test_hrbench_circular_mean_over_cycles(tmp_path):
    bench = build_benchmark("hrbench", str(hrbench_tsv(tmp_path)))
    samples = bench.samples()
    assert len(samples) == 8 and samples[1].options == {"A": "dog", "B": "cow", "C": "pig", "D": "cat"}
    assert samples[1].answer == "D" and samples[1].meta == {"cycle_category": 1}
    assert samples[1].images[0] == samples[0].images[0]  # the referenced image, decoded once
    assert samples[0].prompt.endswith("D. pig\nAnswer the option letter directly.")
    # question 1: the model names the animal (right in every cycle); question 2: always "A" (right once)
    replies = {s.id: ("cat" if s.category == "single" else "A") for s in samples}
    summary = score(bench, replies, tmp_path)
    assert summary["by_cycle"] == {"0": {"n": 2, "accuracy": 100.0}, "1": {"n": 2, "accuracy": 50.0},
                                   "2": {"n": 2, "accuracy": 50.0}, "3": {"n": 2, "accuracy": 50.0}}
    assert summary["accuracy"] == 62.5  # mean over the 4 cycles
    assert summary["by_category"] == {"cross": {"n": 4, "accuracy": 25.0}, "single": {"n": 4, "accuracy": 100.0}}
    assert summary["all_cycles_correct"] == 50.0  # MMBench-style, for reference only


def test_hrbench_cycle_mean_differs_from_micro_mean():
    records = [{"meta": {"cycle_category": 0}, "score": 1.0}, {"meta": {"cycle_category": 0}, "score": 1.0},
               {"meta": {"cycle_category": 1}, "score": 0.0}]
    assert HRBench.group_accuracy(None, records) == 0.5  # micro would be 2/3


def test_hrbench_errors_name_row_and_column(tmp_path):
    path = tmp_path / "hr_bench_8k.tsv"
    path.write_text("index\tquestion\tA\tB\tanswer\tcategory\tcycle_category\timage\n"
                    f"17\tQ?\tx\ty\tF\tsingle\t0\t{jpeg_base64()}\n")
    with pytest.raises(FormatError, match=r"line 2 \(index 17\): answer 'F' is not one of the options AB"):
        build_benchmark("hrbench", str(path)).samples()
    path.write_text("index\tquestion\tA\tB\tanswer\n17\tQ?\tx\ty\tA\n")
    with pytest.raises(FormatError, match=r"missing field\(s\) \['image'\]"):
        build_benchmark("hrbench", str(path)).samples()


# --- MME-RealWorld ---------------------------------------------------------------------------------------
def mme_records():
    choices = ["(A) one", "(B) two", "(C) three", "(D) four", "(E) five"]
    base = {"Question Type": "Multiple Choice", "Answer choices": choices, "Task": "Perception"}
    specs = [  # (ground truth, reply, subtask, category)
        ("A", "", "Monitoring", "Vehicle/counting"),
        ("C", "Based on the image, the answer is (C).", "Monitoring", "Person/attribute/color"),
        ("B", "B", "Remote Sensing", "Position"),
        ("E", "E. five", "Remote Sensing", "Position"),
        ("E", "Answer: E", "OCR with Complex Context", "Person/attribute/orientation"),
    ]
    records, replies = [], {}
    for i, (truth, reply, subtask, category) in enumerate(specs):
        records.append({**base, "Question_id": f"perception/{i}", "Image": f"img/{i}.jpg", "Text": f"Question {i}?",
                        "Ground truth": truth, "Subtask": subtask, "Category": category})
        replies[f"perception/{i}"] = reply
    return records, replies


def test_mme_realworld_official_and_fixed_rules(tmp_path):
    records, replies = mme_records()
    path = tmp_path / "MME_RealWorld.json"
    path.write_text(json.dumps(records))
    for i in range(len(records)):
        write_image(tmp_path / "img" / f"{i}.jpg")
    bench = build_benchmark("mme-realworld", str(path))
    sample = bench.samples()[0]
    assert sample.prompt == ("Question 0? The choices are listed below: \n(A) one\n(B) two\n(C) three\n(D) four\n"
                             "(E) five\nSelect the best answer to the above multiple-choice question based on the "
                             "image. Respond with only the letter (A, B, C, D, or E) of the correct option.\n"
                             "The best answer is:")
    summary = score(bench, replies, tmp_path)
    # official: "" -> A (right), "Based ..." -> B (wrong), B, E, "Answer: E" -> A (wrong): 3/5
    assert summary["accuracy"] == 60.0 and summary["accuracy_official"] == 60.0
    assert summary["accuracy_fixed"] == 80.0  # our parser: the empty reply is wrong, the others right
    assert summary["by_category"]["person/attribute"] == {"n": 2, "accuracy": 0.0}  # attribute categories merged
    assert summary["by_subtask"] == {"Perception/Monitoring": {"n": 2, "accuracy": 50.0},
                                     "Perception/OCR with Complex Context": {"n": 1, "accuracy": 0.0},
                                     "Perception/Remote Sensing": {"n": 2, "accuracy": 100.0}}
    fixed = build_benchmark("mme-realworld", str(path), rule="fixed")
    assert score(fixed, replies, tmp_path / "fixed")["accuracy"] == 80.0


def test_mme_realworld_base64_variant(tmp_path):
    path = tmp_path / "MME-RealWorld-Base64.tsv"
    options = "\n".join(["(A) left", "(B) right", "(C) up", "(D) down", "(E) none"])
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["index", "image", "question", "multi-choice options", "answer", "category", "l2-category"])
        writer.writerow([0, jpeg_base64(), "Where?", options, "B", "Perception/Autonomous_Driving", "motion"])
        writer.writerow([1, jpeg_base64(), "Why?", options, "D", "Reasoning/Monitoring", "intention"])
    bench = build_benchmark("mme-realworld", str(path))
    first, second = bench.samples()
    assert (first.meta["task"], first.meta["subtask"], first.category) == ("Perception", "Autonomous_Driving", "motion")
    assert (second.meta["task"], second.meta["subtask"]) == ("Reasoning", "Monitoring")
    summary = score(bench, {"0": "(B) right", "1": "C"}, tmp_path)
    assert summary["accuracy"] == 50.0
    assert summary["by_task"] == {"Perception": {"n": 1, "accuracy": 100.0}, "Reasoning": {"n": 1, "accuracy": 0.0}}


def test_mme_realworld_missing_field(tmp_path):
    records, _ = mme_records()
    del records[2]["Ground truth"]
    path = tmp_path / "MME_RealWorld.json"
    path.write_text(json.dumps(records))
    with pytest.raises(FormatError, match=r"record 2: missing field\(s\) \['Ground truth'\]"):
        build_benchmark("mme-realworld", str(path)).samples()


# --- TextVQA --------------------------------------------------------------------------------------------
def textvqa_files(tmp_path):
    data = [
        {"question": "what brand is the drink?", "image_id": "img1", "question_id": 100,
         "answers": ["coca cola"] * 4 + ["coke"] * 6},
        {"question": "how many cups are there?", "image_id": "img2", "question_id": 101,
         "answers": ["two", "two", "2", "3", "3", "3", "3", "3", "3", "3"]},
        {"question": "what does the sign say?", "image_id": "img1", "question_id": 102,
         "answers": ["stop"] + ["yield"] * 9},
    ]
    path = tmp_path / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps({"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}))
    for image_id in ("img1", "img2"):
        write_image(tmp_path / "train_images" / f"{image_id}.jpg")
    return path


def test_textvqa_soft_accuracy(tmp_path):
    bench = build_benchmark("textvqa", str(textvqa_files(tmp_path)))
    samples = bench.samples()
    assert samples[0].prompt == "what brand is the drink?\nAnswer the question using a single word or phrase."
    assert samples[0].images[0].endswith("train_images/img1.jpg")
    summary = score(bench, {"100": "Coca-Cola.", "101": "2", "102": "STOP"}, tmp_path)
    assert summary["accuracy"] == pytest.approx(100 * (1.0 + 0.9 + 0.3) / 3, abs=0.01)
    assert summary["metric"] == "VQA soft accuracy" and summary["unparsed_rate"] is None


def test_textvqa_llava_question_file(tmp_path):
    path = textvqa_files(tmp_path)
    llava = write_jsonl(tmp_path / "llava_textvqa_val_v051_ocr.jsonl", [  # question_id holds the image id
        {"question_id": "img1", "image": "img1.jpg",
         "text": "What does the sign say?\nReference OCR token: STOP, 3\nAnswer the question using a single word or "
                 "phrase."},
        {"question_id": "img2", "image": "img2.jpg", "text": "How many cups are there?\nAnswer briefly."},
    ])
    bench = build_benchmark("textvqa", str(path), questions=str(llava))
    samples = bench.samples()
    assert [s.id for s in samples] == ["101", "102"]  # joined on (image id, lower-cased question)
    assert "Reference OCR token: STOP" in samples[1].prompt
    stray = write_jsonl(tmp_path / "stray.jsonl", [{"question_id": "img9", "text": "Unknown?"}])
    with pytest.raises(FormatError, match="have no annotation"):
        build_benchmark("textvqa", str(path), questions=str(stray)).samples()


# --- 4KPro-style and generic JSONL ----------------------------------------------------------------------
def test_4kpro_jsonl(tmp_path):
    for i in range(4):
        write_image(tmp_path / "images" / f"{i}.png", size=(3840, 2160) if i < 2 else (64, 64), fmt="PNG")
    rows = [
        {"id": "kp-0", "image": "images/0.png", "question": "Price on the tag?", "options": ["$1", "$2", "$3", "$4"],
         "answer": "B", "category": "household", "resolution": "4K"},
        {"id": "kp-1", "image": "images/1.png", "question": "Score on the screen?",
         "options": {"A": "10", "B": "20", "C": "30", "D": "40"}, "answer": "30", "category": "gaming",
         "resolution": "4K"},
        {"id": "kp-2", "image": "images/2.png", "question": "Which menu is open?", "options": ["File", "Edit"],
         "answer": "(A)", "category": "ui", "resolution": "2K"},
        {"id": "kp-3", "image": "images/3.png", "question": "Lane count?", "options": ["1", "2", "3", "4"],
         "answer": "D", "category": "av", "resolution": "1K"},
    ]
    bench = build_benchmark("4kpro", str(write_jsonl(tmp_path / "4kpro.jsonl", rows)))
    assert [s.answer for s in bench.samples()] == ["B", "C", "A", "D"]  # text and "(A)" answers resolved
    summary = score(bench, {"kp-0": "B", "kp-1": "The answer is (C)", "kp-2": "Edit", "kp-3": "4"}, tmp_path)
    assert summary["accuracy"] == 75.0
    assert summary["by_bucket"] == {"1K": {"n": 1, "accuracy": 100.0}, "2K": {"n": 1, "accuracy": 0.0},
                                    "4K": {"n": 2, "accuracy": 100.0}}  # the declared required resolution
    assert summary["by_category"]["ui"] == {"n": 1, "accuracy": 0.0}
    rows[2].pop("resolution")
    with pytest.raises(FormatError, match=r"4kpro.jsonl line 3: a 4KPro-style record needs \['resolution'\]"):
        build_benchmark("4kpro", str(write_jsonl(tmp_path / "4kpro.jsonl", rows))).samples()


def test_generic_jsonl_open_and_choice(tmp_path):
    write_image(tmp_path / "a.png", fmt="PNG")
    write_image(tmp_path / "b.png", size=(5000, 100), fmt="PNG")
    rows = [
        {"id": 1, "image": "a.png", "question": "What colour?", "answer": "red"},
        {"id": 2, "images": ["a.png", "b.png"], "question": "Which word?", "answers": ["stop", "halt"],
         "metric": "contains", "category": "ocr"},
        {"id": 3, "image": "b.png", "question": "Pick", "options": ["x", "y"], "answer": "y", "difficulty": "hard"},
    ]
    bench = build_benchmark("jsonl", str(write_jsonl(tmp_path / "custom.jsonl", rows)))
    samples = bench.samples()
    assert samples[0].prompt == "What colour?\nAnswer the question using a single word or phrase."
    assert samples[2].meta == {"difficulty": "hard"}
    summary = score(bench, {"1": "Red.", "2": "It says HALT", "3": "x"}, tmp_path)
    assert summary["accuracy"] == pytest.approx(66.67)
    assert summary["by_bucket"] == {"1K": {"n": 2, "accuracy": 100.0}, "8K": {"n": 1, "accuracy": 0.0}}
    assert summary["unparsed_rate"] == 0.0


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.png", "question": "Q", "options": ["x"], "answer": "A"}', "at least 2 options"),
    ('{"image": "a.png", "question": "Q", "options": ["x", "y"], "answer": "z"}', "neither one of the option letters"),
    ('{"image": "a.png", "question": "Q"}', "needs 'answer'"),
    ('{"question": "Q", "answer": "a"}', "'image' must be a path"),
    ('{"image": "a.png", "question": "Q", "answer": "a", "metric": "bleu"}', "'metric' must be one of"),
    ('{"image": "a.png", "question": ', "is not valid JSON"),
])
def test_generic_jsonl_malformed_lines(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "a.png", "question": "ok", "answer": "a"}\n' + line + "\n")
    with pytest.raises(FormatError, match=f"bad.jsonl line 2.*{message}"):
        build_benchmark("jsonl", str(path)).samples()


def test_duplicate_ids_and_unknown_names(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "x", "image": "a.png", "question": "Q", "answer": "a"}] * 2)
    with pytest.raises(FormatError, match="id 'x' is used by samples 0 and 1"):
        build_benchmark("jsonl", str(path)).samples()
    with pytest.raises(ValueError, match="unknown benchmark 'mmbench'"):
        build_benchmark("mmbench", str(path))
    with pytest.raises(TypeError, match="does not take the option"):
        build_benchmark("vstar", str(path), rule="fixed")
    with pytest.raises(FileNotFoundError):
        build_benchmark("vstar", str(tmp_path / "missing"))


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "hr_bench_4k.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"needs pyarrow \(pip install pyarrow\), or use the .tsv"):
        build_benchmark("hrbench", str(path)).samples()
