"""Each benchmark runner on a small fixture in its publisher's format, with planted replies: expected scores."""

from __future__ import annotations

import base64
import csv
import io
import json
import sys

import pytest
from PIL import Image

from vila_hd.eval.benchmarks import FormatError, build_benchmark
from vila_hd.eval.benchmarks.hrbench import HRBench, report_acc_hrbench
from vila_hd.eval.benchmarks.vstar import split_vstar_text
from vila_hd.eval.harness import run_benchmark
from vila_hd.eval.replies import load_replies


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
    assert summary["unparsed_rate"] == 0.0  # lmms-eval reads C (any A-D counts), wrong for a 2-option question
    assert summary["by_category"] == {"direct_attributes": {"n": 2, "accuracy": 50.0},
                                      "relative_position": {"n": 1, "accuracy": 0.0}}
    assert summary["by_bucket"] == {"1K": {"n": 3, "accuracy": 33.33}}  # from the 64x48 images
    robust = build_benchmark("vstar", str(vstar_root(tmp_path)), answer_parser="robust")
    assert score(robust, replies, tmp_path / "robust")["unparsed_rate"] == pytest.approx(33.33)  # C: no option


def test_vstar_official_rule_is_lmms_evals(tmp_path):
    """The official number for these replies, worked out from lmms-eval's ``extract_answer_letter``
    (EvolvingLMMs-Lab/lmms-eval, lmms_eval/tasks/vstar_bench/utils.py, commit 75571cf), which upper-cases the
    reply and tries its patterns in order:
      q0 (label B) "Answer: B"            -> "ANSWER: B" starts with A-D: A           -> wrong
      q1 (label C) "The glove is leather." -> no pattern; the only A-D character is the A of LEATHER: A -> wrong
      q2 (label A) "A man would say left"  -> starts with A: A                         -> right
    so vstar_overall_acc = 1/3 = 33.33 (and 50.0 / 100.0 per category). Our robust parser reads B, C, A: 100.
    """
    root = vstar_root(tmp_path)
    replies = {"0": "Answer: B", "1": "The glove is leather.", "2": "A man would say left"}
    summary = score(build_benchmark("vstar", str(root)), replies, tmp_path / "official")
    assert summary["accuracy"] == pytest.approx(33.33) and summary["answer_parser"] == "official"
    assert summary["by_category"] == {"direct_attributes": {"n": 2, "accuracy": 0.0},
                                      "relative_position": {"n": 1, "accuracy": 100.0}}
    assert summary["settings"]["answer_parser"] == "official" and "vstar_bench" in summary["official_scorer"]
    robust = score(build_benchmark("vstar", str(root), answer_parser="robust"), replies, tmp_path / "robust")
    assert robust["accuracy"] == 100.0 and robust["answer_parser"] == "robust"
    assert robust["parse_rules"] == {"option_text": 2, "statement": 1}
    with pytest.raises(ValueError, match="--answer-parser must be one of"):
        build_benchmark("vstar", str(root), answer_parser="lenient")


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
    assert score(bench, {s.id: f"({s.answer})" for s in samples}, tmp_path)["accuracy"] == 100.0
    robust = build_benchmark("vstar", str(root), answer_parser="robust")
    assert score(robust, {s.id: s.options[s.answer] for s in samples}, tmp_path / "r")["accuracy"] == 100.0


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
    assert samples[1].answer == "D" and samples[1].meta["cycle_category"] == 1
    assert len({s.meta["rotation_group"] for s in samples}) == 2  # each question's 4 rotations share a group
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


def test_hrbench_official_rule_is_vlmevalkits_exact_matching(tmp_path):
    """The official numbers, worked out from VLMEvalKit's exact matching (open-compass/VLMEvalKit, commit
    e8e78f0: ``can_infer`` in vlmeval/utils/matching_util.py, ``report_acc_hrbench`` in
    vlmeval/dataset/utils/hrbench.py). Answers: question 1 (single) A, D, C, B; question 2 (cross) A, D, C, B.
      q1 c0 "a"  -> no upper-case option token, "a" holds no option text: no match        -> wrong
      q1 c1 "The answer is D because ..." (16 tokens; D too far from the end) -> "answer is D" -> right
      q1 c2 "C"  -> right
      q1 c3 "B. It is not a dog" -> B is token 0 of 6, not among the last 4; the text step finds "dog" = C -> wrong
      q2 c0 "A" -> right; c1 "I think it's D" -> right; c2 "red" -> the option text red = C -> right;
      q2 c3 "The red car." -> red = B -> right
    Per cycle (all / single / cross): c0 50/0/100, c1 100/100/100, c2 100/100/100, c3 50/0/100;
    Average = sum / 4 cycles: all 75, single 50, cross 100. Our robust parser reads all eight right.
    """
    replies_by_row = ["a", "The answer is D because the cat is on the sign and nothing else is there", "C",
                      "B. It is not a dog", "A", "I think it's D", "red", "The red car."]
    bench = build_benchmark("hrbench", str(hrbench_tsv(tmp_path)))
    replies = {s.id: reply for s, reply in zip(bench.samples(), replies_by_row)}
    summary = score(bench, replies, tmp_path / "official")
    assert summary["accuracy"] == 75.0
    assert summary["by_category"] == {"cross": {"n": 4, "accuracy": 100.0}, "single": {"n": 4, "accuracy": 50.0}}
    report = summary["report_acc_hrbench"]
    assert report["0"] == {"all": 50.0, "cross": 100.0, "single": 0.0}
    assert report["3"] == {"all": 50.0, "cross": 100.0, "single": 0.0}
    assert report["Average"] == {"all": 75.0, "cross": 100.0, "single": 50.0}
    assert summary["categories"] == {"cross": "FCP", "single": "FSP"}
    assert summary["all_cycles_correct"] == 50.0  # question 2 right in all four rotations, question 1 not
    robust = build_benchmark("hrbench", str(hrbench_tsv(tmp_path)), answer_parser="robust")
    assert score(robust, replies, tmp_path / "robust")["accuracy"] == 100.0


def test_hrbench_average_divides_by_every_cycle():
    """report_acc_hrbench adds a type's accuracy only in the cycles that have it, then divides by the number
    of cycles: cross, right in cycle 0 and absent from cycle 1, averages (100 + 0) / 2 = 50."""
    records = [{"meta": {"cycle_category": 0}, "category": "single", "score": 1.0},
               {"meta": {"cycle_category": 0}, "category": "cross", "score": 1.0},
               {"meta": {"cycle_category": 1}, "category": "single", "score": 0.0}]
    assert report_acc_hrbench(records)["Average"] == {"all": 50.0, "cross": 50.0, "single": 50.0}


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
    path.write_text("question\tA\tB\tanswer\nQ?\tx\ty\tA\n")  # no index: the row is named by its line only
    with pytest.raises(FormatError, match=r"hr_bench_8k.tsv line 2: missing field\(s\) \['index', 'image'\]"):
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
    assert summary["by_category"]["Perception/Monitoring/person/attribute"] == {"n": 1, "accuracy": 0.0}
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
    assert (first.meta["task"], first.meta["subtask"], first.meta["category"]) == ("Perception", "Autonomous_Driving",
                                                                                   "motion")
    assert first.category == "Perception/Autonomous_Driving/motion"
    assert (second.meta["task"], second.meta["subtask"]) == ("Reasoning", "Monitoring")
    summary = score(bench, {"0": "(B) right", "1": "C"}, tmp_path)
    assert summary["accuracy"] == 50.0
    assert summary["by_task"] == {"Perception": {"n": 1, "accuracy": 100.0}, "Reasoning": {"n": 1, "accuracy": 0.0}}


def test_mme_realworld_groups_task_subtask_category(tmp_path):
    """The official report, worked out from yfzhang114/MME-RealWorld evaluation/eval_your_results.py (commit
    87096fc): categories are lower-cased, "attribute" ones become "<first part>/attribute", and each is counted
    under its Task and Subtask. Replies by the official rule (first capital A-E after the broken prefix list):
      Perception/Monitoring/person/attribute: truth C, "C" right; truth D, "Based on it, D" -> B, wrong   -> 50
      Perception/OCR with Complex Context/person/attribute: truth E, "E" right                         -> 100
      Reasoning/Monitoring/person/attribute: truth A, "" -> matches choice (A), right                 -> 100
    Subtasks: Perception/Monitoring 50, Perception/OCR 100, Reasoning/Monitoring 100; tasks: Perception 2/3,
    Reasoning 1/1; overall 3/4 = 75. Merging categories by name alone would give one row of 3/4."""
    choices = ["(A) one", "(B) two", "(C) three", "(D) four", "(E) five"]
    specs = [("Perception", "Monitoring", "Person/attribute/color", "C", "C"),
             ("Perception", "Monitoring", "person/Attribute/orientation", "D", "Based on it, D"),
             ("Perception", "OCR with Complex Context", "Person/attribute/color", "E", "E"),
             ("Reasoning", "Monitoring", "Person/attribute/color", "A", "")]
    records = [{"Question_id": f"q{i}", "Image": "img/0.jpg", "Text": "?", "Question Type": "Multiple Choice",
                "Answer choices": choices, "Ground truth": truth, "Task": task, "Subtask": sub, "Category": cat}
               for i, (task, sub, cat, truth, _) in enumerate(specs)]
    path = tmp_path / "MME_RealWorld.json"
    path.write_text(json.dumps(records))
    summary = score(build_benchmark("mme-realworld", str(path)), {f"q{i}": s[4] for i, s in enumerate(specs)},
                    tmp_path)
    assert summary["accuracy"] == 75.0
    assert summary["by_category"] == {
        "Perception/Monitoring/person/attribute": {"n": 2, "accuracy": 50.0},
        "Perception/OCR with Complex Context/person/attribute": {"n": 1, "accuracy": 100.0},
        "Reasoning/Monitoring/person/attribute": {"n": 1, "accuracy": 100.0}}
    report = summary["official_report"]
    assert report["Perception"]["n"] == 3 and report["Perception"]["accuracy"] == pytest.approx(66.67)
    assert report["Perception"]["subtasks"]["OCR with Complex Context"]["chose_E"] == 1
    assert report["Reasoning"]["subtasks"]["Monitoring"]["categories"] == {
        "person/attribute": {"n": 1, "accuracy": 100.0, "chose_E": 0}}
    assert summary["answer_parser"] == "official"
    robust = build_benchmark("mme-realworld", str(path), answer_parser="robust")
    assert robust.rule == "fixed"  # the empty reply is wrong, "Based on it, D" is D: 3/4
    assert score(robust, {f"q{i}": s[4] for i, s in enumerate(specs)}, tmp_path / "r")["accuracy"] == 75.0
    with pytest.raises(ValueError, match="--answer-parser robust reads replies with the fixed rule"):
        build_benchmark("mme-realworld", str(path), answer_parser="robust", rule="official")


def test_mme_realworld_base64_distribution_folder(tmp_path):
    """yifanzhang114/MME-RealWorld-Base64 as published: MME-RealWorld/*.json parts, each a list of records whose
    'multi-choice options' is a list and 'category' is '<Task>/<Subtask>' (read as VLMEvalKit's load_data and
    get_dimension_rating read them). Parts are read in name order."""
    folder = tmp_path / "MME-RealWorld-Base64" / "MME-RealWorld"
    folder.mkdir(parents=True)
    options = ["(A) left", "(B) right", "(C) up", "(D) down", "(E) none"]
    record = lambda i, cat, l2, answer: {"index": i, "image": jpeg_base64(), "question": f"Q{i}?",  # noqa: E731
                                         "multi-choice options": options, "answer": answer, "category": cat,
                                         "l2-category": l2}
    (folder / "part_2.json").write_text(json.dumps([record(2, "Reasoning/Monitoring", "Vehicle/attribute/x", "C")]))
    (folder / "part_1.json").write_text(json.dumps([record(0, "Perception/Autonomous_Driving", "motion", "B"),
                                                     record(1, "Perception/Monitoring", "Vehicle/attribute/y", "A")]))
    bench = build_benchmark("mme-realworld", str(folder.parent))  # the repository root: its MME-RealWorld/ folder
    samples = bench.samples()
    assert [s.id for s in samples] == ["0", "1", "2"]
    assert samples[2].category == "Reasoning/Monitoring/vehicle/attribute"
    assert samples[0].prompt.startswith("Q0? The choices are listed below: \n(A) left\n")
    summary = score(bench, {"0": "B", "1": "A", "2": "The best answer is D"}, tmp_path)
    assert summary["accuracy"] == pytest.approx(66.67)
    assert summary["by_task"] == {"Perception": {"n": 2, "accuracy": 100.0}, "Reasoning": {"n": 1, "accuracy": 0.0}}
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="holds no \\*.json part files"):
        build_benchmark("mme-realworld", str(tmp_path / "empty")).samples()


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


# --- RealWorldQA ----------------------------------------------------------------------------------------
RWQA_LETTER = "Please answer directly with only the letter of the correct option and nothing else."
RWQA_NUMBER = "Please answer directly with a single word or number."


def realworldqa_parquet(tmp_path):
    """The Hub layout: data/test-*.parquet with image {bytes, path}, question, answer (two files, name order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jpeg = base64.b64decode(jpeg_base64())
    rows = [
        (f"Which way is the arrow pointing?\nA. Left\nB. Right\nC. Up\n{RWQA_LETTER}", "B"),
        (f"How many cars are there?\n{RWQA_NUMBER}", "2"),
        (f"Is the light on?\nA. Yes\nB. No\n{RWQA_LETTER}", "B"),
        (f"Which way is the arrow pointing?\nA. Left\nB. Right\nC. Up\n{RWQA_LETTER}", "A"),
        (f"Which way is the arrow pointing?\nA. Left\nB. Right\nC. Up\n{RWQA_LETTER}", "C"),
    ]
    folder = tmp_path / "RealworldQA" / "data"
    folder.mkdir(parents=True)
    for name, part in (("test-00000-of-00002.parquet", rows[:3]), ("test-00001-of-00002.parquet", rows[3:])):
        table = pa.table({"image": [{"bytes": jpeg, "path": f"{i}.jpg"} for i in range(len(part))],
                          "question": [q for q, _ in part], "answer": [a for _, a in part]})
        pq.write_table(table, folder / name)
    return folder


def test_realworldqa_current_and_legacy_lmms_eval_rules(tmp_path):
    """Numbers worked out from EvolvingLMMs-Lab/lmms-eval lmms_eval/tasks/realworldqa/utils.py.
    current (commit 75571cf; rule since 9ca4445): an A-D answer against extract_mcq_answer
    (lmms_eval/tasks/_task_utils/mcq_extract.py), else lower-case / strip / rstrip(".") equality:
      0 (B) "Right."             -> no capital A-D anywhere: ""                          -> wrong
      1 (2) "two"                -> "two" != "2"                                          -> wrong
      2 (B) "Not sure"           -> ""                                                    -> wrong
      3 (A) "The answer is (A)." -> "(A)" (6) and after "the answer is" (7): A            -> right
      4 (C) "Based on the arrow, C." -> ends with a standalone C (9); "B" of Based is followed by a letter -> right
    = 2/5 = 40. legacy (9ca4445^: NumberWordsToDigitsFilter + MultiChoiceRegexFilter, then the equality):
      0 "Right" is option B's text -> right; 1 "two" -> "2" -> right; 2 "Not sure" contains option B's "No" -> right;
      3 "The answer is A" holds no option text and != "a" -> wrong; 4 likewise -> wrong  = 3/5 = 60.
    robust (our parser for the letters, the current equality for short answers): B, wrong, unparsed, A, C = 60.
    """
    folder = realworldqa_parquet(tmp_path)
    replies = {"0": "Right.", "1": "two", "2": "Not sure", "3": "The answer is (A).", "4": "Based on the arrow, C."}
    bench = build_benchmark("realworldqa", str(folder))
    samples = bench.samples()
    assert [s.id for s in samples] == ["0", "1", "2", "3", "4"]
    assert samples[0].prompt.endswith(RWQA_LETTER) and samples[0].options == {"A": "Left", "B": "Right", "C": "Up"}
    assert samples[1].options is None and samples[1].answer == "2"
    assert score(bench, replies, tmp_path / "current")["accuracy"] == 40.0
    legacy = build_benchmark("realworldqa", str(folder), rule="legacy")
    summary = score(legacy, replies, tmp_path / "legacy")
    assert summary["accuracy"] == 60.0 and summary["metric"] == "exact match (lmms-eval legacy rule)"
    robust = build_benchmark("realworldqa", str(folder), answer_parser="robust")
    assert score(robust, replies, tmp_path / "robust")["accuracy"] == 60.0
    one_file = build_benchmark("rwqa", str(folder / "test-00001-of-00002.parquet")).samples()
    assert [s.answer for s in one_file] == ["A", "C"]
    with pytest.raises(ValueError, match="rule must be one of"):
        build_benchmark("realworldqa", str(folder), rule="newest")


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


# --- saved predictions of other ecosystems (vila_hd.eval.replies) ----------------------------------------------------
def test_lmms_eval_samples_log_is_rescored_from_the_raw_reply(tmp_path):
    """An lmms-eval ``*_samples_vstar_bench.jsonl`` (lmms_eval/loggers/evaluation_tracker.py, commit 75571cf:
    ``resps`` dropped when equal to ``filtered_resps``, one-element lists flattened; older logs nest them)."""
    bench = build_benchmark("vstar", str(vstar_root(tmp_path)))
    log = write_jsonl(tmp_path / "20260101_samples_vstar_bench.jsonl", [
        {"doc_id": 0, "target": "B", "filtered_resps": "(B)", "vstar_overall_acc": {}},
        {"doc_id": 1, "target": "C", "resps": [["The answer is C"]], "filtered_resps": ["The answer is C"]},
        {"doc_id": 2, "target": "A", "resps": ["A man would say left"], "filtered_resps": "A"},
    ])
    replies = load_replies(log, bench)
    assert replies == {"0": "(B)", "1": "The answer is C", "2": "A man would say left"}
    assert score(bench, replies, tmp_path)["accuracy"] == 100.0
    wrong = write_jsonl(tmp_path / "other.jsonl", [{"doc_id": 0, "target": "D", "filtered_resps": "D"}])
    with pytest.raises(FormatError, match="doc_id 0 has target 'D' but question '0' has answer 'B'"):
        load_replies(wrong, bench)
    beyond = write_jsonl(tmp_path / "beyond.jsonl", [{"doc_id": 7, "filtered_resps": "D"}])
    with pytest.raises(FormatError, match="doc_id 7 is not a position among the benchmark's 3 questions"):
        load_replies(beyond, bench)


def test_vlmevalkit_result_tsv_and_xlsx(tmp_path, monkeypatch):
    bench = build_benchmark("hrbench", str(hrbench_tsv(tmp_path)))
    result = tmp_path / "Model_HRBench4K.tsv"  # the name says nothing: the columns decide
    with open(result, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["index", "question", "A", "B", "C", "D", "answer", "category", "prediction"])
        for s in bench.samples():
            writer.writerow([s.id, s.question, *s.options.values(), s.answer, s.category,
                             "" if s.id == "7" else s.answer])
    replies = load_replies(result, bench)
    assert replies["0"] == "A" and replies["7"] == "nan"  # VLMEvalKit scores str(NaN)
    assert score(bench, replies, tmp_path)["accuracy"] == 87.5  # cycle 3: 1 of 2 right
    xlsx = tmp_path / "result.xlsx"
    xlsx.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    monkeypatch.setitem(sys.modules, "openpyxl", None)  # as where openpyxl is not installed
    with pytest.raises(ImportError, match=r"result.xlsx needs openpyxl \(pip install openpyxl\)"):
        load_replies(xlsx, bench)


def test_vlmevalkit_result_xlsx_with_openpyxl(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    bench = build_benchmark("hrbench", str(hrbench_tsv(tmp_path)))
    book = openpyxl.Workbook()
    book.active.append(["index", "prediction"])
    for s in bench.samples():
        book.active.append([int(s.id), s.answer])
    book.save(tmp_path / "result.xlsx")
    assert score(bench, load_replies(tmp_path / "result.xlsx", bench), tmp_path)["accuracy"] == 100.0


def test_mme_realworld_results_json_and_jsonl(tmp_path):
    """MME-RealWorld's results: evaluation/output_test_template.json (records + "Output") and the JSONL of
    evaluation/model_vqa_mme_real_world.py (records + "output")."""
    records, replies = mme_records()
    path = tmp_path / "MME_RealWorld.json"
    path.write_text(json.dumps(records))
    bench = build_benchmark("mme-realworld", str(path))
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{**r, "Output": replies[r["Question_id"]]} for r in records]))
    assert load_replies(results, bench) == replies
    lines = write_jsonl(tmp_path / "answers.jsonl", [{**r, "output": replies[r["Question_id"]]} for r in records])
    assert score(bench, load_replies(lines, bench), tmp_path)["accuracy"] == 60.0  # as with the planted replies


def test_llava_textvqa_answers_join_on_image_and_question(tmp_path):
    """LLaVA's answer file (llava/eval/model_vqa_loader.py): question_id holds the image id, so lines join on
    (image id, question read from the prompt) as llava/eval/eval_textvqa.py does (haotian-liu/LLaVA c121f04)."""
    bench = build_benchmark("textvqa", str(textvqa_files(tmp_path)))
    answers = write_jsonl(tmp_path / "llava-answers.jsonl", [
        {"question_id": "img1", "prompt": "What does the sign say?\nReference OCR token: STOP\nAnswer briefly.",
         "text": "STOP", "answer_id": "x", "model_id": "m", "metadata": {}},
        {"question_id": "img1", "prompt": "what brand is the drink?\nAnswer the question using a single word or phrase.",
         "text": "Coca-Cola.", "answer_id": "y", "model_id": "m", "metadata": {}},
        {"question_id": "img2", "prompt": "How many cups are there?\nAnswer briefly.", "text": "2"},
    ])
    replies = load_replies(answers, bench)
    assert replies == {"102": "STOP", "100": "Coca-Cola.", "101": "2"}
    assert score(bench, replies, tmp_path)["accuracy"] == pytest.approx(100 * (1.0 + 0.9 + 0.3) / 3, abs=0.01)
    stray = write_jsonl(tmp_path / "stray.jsonl", [{"question_id": "img9", "prompt": "Q?\nA.", "text": "x"}])
    with pytest.raises(FormatError, match="1 reply match no question of the benchmark"):
        load_replies(stray, bench)


def test_replies_format_detection_and_errors(tmp_path):
    bench = build_benchmark("vstar", str(vstar_root(tmp_path)))
    ours = write_jsonl(tmp_path / "lmms_eval_samples.jsonl", [{"id": i, "prediction": "B"} for i in range(3)])
    assert load_replies(ours, bench) == {"0": "B", "1": "B", "2": "B"}  # content, not the file name, decides
    with pytest.raises(FormatError, match="line 1: doc_id None"):  # an explicit format is obeyed
        load_replies(ours, bench, "lmms-eval")
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"qid": 0, "reply": "B"}])
    with pytest.raises(FormatError, match=r"cannot tell the replies format .* \['qid', 'reply'\]; pass --replies-format"):
        load_replies(odd, bench)
    twice = write_jsonl(tmp_path / "twice.jsonl", [{"id": 0, "prediction": "B"}, {"id": 0, "prediction": "C"}])
    with pytest.raises(FormatError, match="twice.jsonl line 2: a second reply for question '0'"):
        load_replies(twice, bench)
