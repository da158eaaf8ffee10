"""The evaluation loop: per-sample output, resume after an interruption, sharding, failures, likelihood mode,
budget sweeps with their plot, the CLI, and a run through the real engine on a tiny model."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image
from tolerances import fp_approx

from vila_hd.eval.benchmarks import build_benchmark
from vila_hd.eval.cli import eval_main, read_replies
from vila_hd.eval.harness import MissingRepliesError, read_parts, run_benchmark
from vila_hd.eval.predictor import Prediction
from vila_hd.eval.sweep import parse_budgets, run_sweep

N = 7


def make_jsonl(tmp_path, n=N, broken: int | None = None):
    """n multiple-choice questions; the answer of question i is option (i % 3); one image may be broken."""
    rows = []
    for i in range(n):
        name = f"img{i}.png"
        if i == broken:
            (tmp_path / name).write_bytes(b"not an image")
        else:
            Image.new("RGB", (40, 30), (i * 30 % 255, 80, 120)).save(tmp_path / name)
        rows.append({"id": f"q{i}", "image": name, "question": f"Question {i}?", "options": ["a", "b", "c"],
                     "answer": "ABC"[i % 3], "category": "even" if i % 2 == 0 else "odd"})
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build_benchmark("jsonl", str(path))


class Oracle:
    """Answers correctly from the prompt (the question number), counts calls, can stop after ``stop_after``."""

    def __init__(self, stop_after: int | None = None, exception=KeyboardInterrupt):
        self.calls: list[str] = []
        self.stop_after, self.exception = stop_after, exception

    def __call__(self, images, prompt, options):
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise self.exception("interrupted")
        assert all(isinstance(im, Image.Image) for im in images)
        self.calls.append(prompt)
        i = int(prompt.split("Question ")[1].split("?")[0])
        steps = options.get("steps", 2)
        return Prediction(f"The answer is {'ABC'[i % 3]}", image_tokens=100 * (steps + 1),
                          selected_pct=10.0 * steps, latency_s=0.1 * (i + 1))


def test_run_writes_records_and_summary(tmp_path):
    bench = make_jsonl(tmp_path)
    summary = run_benchmark(bench, tmp_path / "out", predictor=Oracle(), generation={"steps": 2}, progress=False)
    records = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"q{i}" for i in range(N)]
    first = records[0]
    assert first["question"] == "Question 0?" and first["prediction"] == "The answer is A"
    assert first["correct"] is True and first["parsed"] == "A" and first["parse_rule"] == "statement"
    assert (first["image_tokens"], first["selected_pct"], first["latency_s"]) == (300, 20.0, 0.1)
    assert summary["accuracy"] == 100.0 and summary["n"] == N and summary["errors"] == 0
    assert summary["image_tokens_mean"] == 300.0 and summary["selected_pct_mean"] == 20.0
    assert summary["latency_s"]["p50"] == pytest.approx(0.4) and summary["latency_s"]["p95"] == pytest.approx(0.67)
    assert summary["by_category"] == {"even": {"n": 4, "accuracy": 100.0}, "odd": {"n": 3, "accuracy": 100.0}}
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "| accuracy | 100.0 |" in markdown and "| even | 4 | 100.0 |" in markdown
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["settings"]["generation"] == {"steps": 2}


class BatchOracle(Oracle):
    """An :class:`Oracle` that also answers in batches; fails a batch holding question ``poison``."""

    def __init__(self, poison: int | None = None):
        super().__init__()
        self.batches: list[int] = []
        self.poison = poison

    def predict_batch(self, requests, options):
        prompts = [prompt for _, prompt in requests]
        if self.poison is not None and any(f"Question {self.poison}?" in p for p in prompts):
            raise RuntimeError("out of memory")
        self.batches.append(len(requests))
        return [dataclasses.replace(self(images, prompt, options), latency_s=None) for images, prompt in requests]


def test_batched_run_gives_the_same_records_and_isolates_failures(tmp_path):
    bench = make_jsonl(tmp_path, broken=4)
    single = run_benchmark(bench, tmp_path / "one", predictor=Oracle(), progress=False)
    oracle = BatchOracle()
    batched = run_benchmark(bench, tmp_path / "three", predictor=oracle, batch_size=3, progress=False)
    assert oracle.batches == [3, 2]  # samples 0-2, then 3 and 5 (4's image is broken); 6 alone is a plain call
    keep = ("id", "prediction", "correct", "error", "image_tokens")
    one, three = (list(read_parts(tmp_path / name / "parts").values()) for name in ("one", "three"))
    assert [{k: r.get(k) for k in keep} for r in one] == [{k: r.get(k) for k in keep} for r in three]
    assert single["accuracy"] == batched["accuracy"] and batched["errors"] == 1
    # a batch that fails as a whole is redone sample by sample: only the culprit fails
    poisoned = BatchOracle(poison=1)
    run_benchmark(bench, tmp_path / "poison", predictor=poisoned, batch_size=3, progress=False)
    records = read_parts(tmp_path / "poison" / "parts")
    assert sorted(k for k, r in records.items() if "error" in r) == ["q4"]  # q1 alone succeeds (no batch)
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        run_benchmark(bench, tmp_path / "x", predictor=oracle, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="predict_batch"):
        run_benchmark(bench, tmp_path / "y", predictor=Oracle(), batch_size=2, progress=False)


def test_interrupted_run_resumes_without_recomputing(tmp_path):
    bench = make_jsonl(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(bench, out, predictor=Oracle(stop_after=3), progress=False)
    part = out / "parts" / "rank0.jsonl"
    assert len(part.read_text().splitlines()) == 3 and not (out / "summary.json").exists()
    with open(part, "a") as f:
        f.write('{"id": "q3", "prediction": "cut off mid-wri')  # a record torn by the interruption
    second = Oracle()
    summary = run_benchmark(bench, out, predictor=second, progress=False)
    assert [p.split("?")[0] for p in second.calls] == [f"Question {i}" for i in range(3, N)]  # only what was left
    assert summary["n"] == N and summary["accuracy"] == 100.0
    third = Oracle()
    run_benchmark(bench, out, predictor=third, progress=False, limit=N)
    assert third.calls == []  # nothing left to do; the summary is rewritten


def test_resume_refuses_other_settings_but_allows_a_new_limit(tmp_path):
    bench = make_jsonl(tmp_path)
    run_benchmark(bench, tmp_path / "out", predictor=Oracle(), generation={"steps": 1}, limit=2, progress=False)
    more = Oracle()
    summary = run_benchmark(bench, tmp_path / "out", predictor=more, generation={"steps": 1}, limit=4, progress=False)
    assert len(more.calls) == 2 and summary["n"] == 4 and summary["expected"] == 4
    with pytest.raises(ValueError, match=r"other settings \(generation: \{'steps': 1\} -> \{'steps': 2\}\)"):
        run_benchmark(bench, tmp_path / "out", predictor=Oracle(), generation={"steps": 2}, progress=False)


def test_sharded_run_merges_when_the_last_rank_finishes(tmp_path):
    bench = make_jsonl(tmp_path)
    out = tmp_path / "out"
    rank1, rank0 = Oracle(), Oracle()
    assert run_benchmark(bench, out, predictor=rank1, rank=1, world_size=2, progress=False) is None
    assert not (out / "summary.json").exists()
    summary = run_benchmark(bench, out, predictor=rank0, rank=0, world_size=2, progress=False)
    assert len(rank0.calls) == 4 and len(rank1.calls) == 3  # samples i % 2 == rank
    assert not set(rank0.calls) & set(rank1.calls)
    assert summary["n"] == N and summary["accuracy"] == 100.0
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["rank0.done", "rank0.jsonl", "rank1.done",
                                                                  "rank1.jsonl"]
    assert len(read_parts(out / "parts")) == N


def test_torchrun_environment_sets_the_shard(tmp_path, monkeypatch):
    import torch.distributed as dist

    # The env-var path (no process group); an in-process training test may have left one behind.
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    bench = make_jsonl(tmp_path)
    oracle = Oracle()
    assert run_benchmark(bench, tmp_path / "out", predictor=oracle, progress=False) is None
    assert [p.split("?")[0] for p in oracle.calls] == ["Question 1", "Question 4"]


def test_failed_samples_are_recorded_and_retried(tmp_path):
    bench = make_jsonl(tmp_path, broken=2)
    summary = run_benchmark(bench, tmp_path / "out", predictor=Oracle(), progress=False)
    failed = read_parts(tmp_path / "out" / "parts")["q2"]
    assert "img2.png" in failed["error"] and failed["score"] == 0.0
    assert summary["errors"] == 1 and summary["accuracy"] == pytest.approx(100 * 6 / 7, abs=0.01)
    Image.new("RGB", (40, 30)).save(tmp_path / "img2.png")  # fixed
    again = Oracle()
    run_benchmark(bench, tmp_path / "out", predictor=again, progress=False)
    assert again.calls == []  # failures are kept unless asked
    summary = run_benchmark(bench, tmp_path / "out", predictor=again, progress=False, retry_errors=True)
    assert len(again.calls) == 1 and summary["errors"] == 0 and summary["accuracy"] == 100.0


def test_model_errors_do_not_stop_the_run(tmp_path):
    bench = make_jsonl(tmp_path, n=3)
    summary = run_benchmark(bench, tmp_path / "out", predictor=Oracle(stop_after=1, exception=RuntimeError),
                            progress=False)
    assert summary["errors"] == 2 and "RuntimeError: interrupted" in read_parts(tmp_path / "out" / "parts")["q1"]["error"]


class Ranker:
    """Scores options: the right option text has the lowest loss."""

    def __call__(self, images, prompt, options):  # pragma: no cover - not used in likelihood mode
        raise AssertionError("generation should not be used")

    def score_continuations(self, images, prompt, continuations, options):
        i = int(prompt.split("Question ")[1].split("?")[0])
        return [0.5 if c == "abc"[i % 3] else 2.0 for c in continuations]


def test_likelihood_mode_picks_the_lowest_loss(tmp_path):
    bench = make_jsonl(tmp_path, n=4)
    summary = run_benchmark(bench, tmp_path / "out", predictor=Ranker(), mc_mode="likelihood", progress=False)
    assert summary["accuracy"] == 100.0
    record = read_parts(tmp_path / "out" / "parts")["q1"]
    assert record["prediction"] == "B" and record["stats"]["option_losses"] == {"A": 2.0, "B": 0.5, "C": 2.0}
    with pytest.raises(ValueError, match="score_continuations"):
        run_benchmark(bench, tmp_path / "x", predictor=Oracle(), mc_mode="likelihood", progress=False)


def test_sweep_runs_each_budget_and_plots(tmp_path):
    bench = make_jsonl(tmp_path, n=3)
    oracle = Oracle()
    result = run_sweep(bench, tmp_path / "sweep", parse_budgets("steps=1,2,4"), predictor=oracle,
                       generation={"max_new_tokens": 8, "steps": 6}, progress=False)
    assert len(oracle.calls) == 9
    assert [(r["name"], r["image_tokens_mean"], r["accuracy"]) for r in result["runs"]] == [
        ("steps-1", 200.0, 100.0), ("steps-2", 300.0, 100.0), ("steps-4", 500.0, 100.0)]
    settings = json.loads((tmp_path / "sweep" / "steps-4" / "run.json").read_text())
    assert settings["generation"] == {"max_new_tokens": 8, "steps": 4}
    plot = Image.open(tmp_path / "sweep" / "sweep.png")
    assert plot.format == "PNG" and plot.size == (900, 600)
    assert "| steps-2 | 100.0 | 300.0 |" in (tmp_path / "sweep" / "sweep.md").read_text()
    assert parse_budgets("tokens=100,all") == [{"tokens": 100}, {"tokens": "all"}]
    for bad in ("steps", "size=1", "steps=1,x", "steps=1,1"):
        with pytest.raises(ValueError):
            parse_budgets(bad)


def test_cli_scores_saved_replies(tmp_path, capsys):
    make_jsonl(tmp_path, n=3)
    replies = tmp_path / "replies.jsonl"
    replies.write_text('{"id": "q0", "prediction": "A"}\n{"id": "q1", "text": "C"}\n{"id": "q2", "response": "C"}\n')
    code = eval_main(["--benchmark", "jsonl", "--data", str(tmp_path / "bench.jsonl"), "--replies", str(replies),
                      "--output", str(tmp_path / "out"), "--no-progress"])
    assert code == 0
    assert "| accuracy | 66.67 |" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["latency_s"]["p50"] is None and summary["settings"]["replies"] is True
    assert read_replies(str(tmp_path / "out" / "samples.jsonl"))["q1"] == "C"  # an output is a replies file


def test_missing_replies_are_an_error_unless_allowed(tmp_path):
    bench = make_jsonl(tmp_path, n=7)
    replies = {"q0": "A", "q1": "B"}
    with pytest.raises(MissingRepliesError, match=r"5 of 7 questions have no saved reply \('q2', 'q3', 'q4', 'q5', "
                                                  r"'q6'\); .* --allow-missing"):
        run_benchmark(bench, tmp_path / "out", replies=replies, progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything is written
    summary = run_benchmark(bench, tmp_path / "out", replies=replies, progress=False, allow_missing=True)
    assert summary["missing_replies"] == 5 and summary["errors"] == 5
    assert summary["accuracy"] == pytest.approx(200 / 7, abs=0.01)  # the missing ones count as wrong
    assert "| missing replies | 5 |" in (tmp_path / "out" / "summary.md").read_text()
    limited = run_benchmark(bench, tmp_path / "limited", replies=replies, progress=False, limit=2)
    assert limited["missing_replies"] == 0 and limited["accuracy"] == 100.0  # --limit: only those questions


def test_cli_answer_parser_replies_format_and_allow_missing(tmp_path, capsys):
    make_jsonl(tmp_path, n=3)
    base = ["--benchmark", "jsonl", "--data", str(tmp_path / "bench.jsonl"), "--no-progress"]
    log = tmp_path / "log.jsonl"  # an lmms-eval samples log, by content
    log.write_text('{"doc_id": 0, "filtered_resps": ["A"]}\n{"doc_id": 1, "resps": [["I choose B."]]}\n')
    assert eval_main(base + ["--replies", str(log), "--output", str(tmp_path / "o1")]) == 1
    assert "1 of 3 questions have no saved reply ('q2')" in capsys.readouterr().err
    assert eval_main(base + ["--replies", str(log), "--output", str(tmp_path / "o2"), "--allow-missing",
                             "--answer-parser", "robust"]) == 0
    summary = json.loads((tmp_path / "o2" / "summary.json").read_text())
    assert summary["missing_replies"] == 1 and summary["accuracy"] == pytest.approx(66.67)
    assert summary["answer_parser"] == "robust" and summary["settings"]["answer_parser"] == "robust"
    assert eval_main(base + ["--replies", str(log), "--replies-format", "llava", "--output",
                             str(tmp_path / "o3")]) == 1
    assert "a LLaVA answer line needs 'question_id' and 'text'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(base + ["--replies", str(log), "--answer-parser", "lenient", "--output", str(tmp_path / "o4")])


def test_cli_errors(tmp_path, capsys):
    make_jsonl(tmp_path, n=2)
    data = str(tmp_path / "bench.jsonl")
    base = ["--benchmark", "jsonl", "--data", data, "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        eval_main(base)  # neither --model nor --replies
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "give --model (run a model) or --replies (score saved replies)\n" in err and "not both" not in err
    with pytest.raises(SystemExit) as exit_info:
        eval_main(base + ["--model", "m", "--replies", data])
    assert exit_info.value.code == 2 and "not both" in capsys.readouterr().err
    for replies, what in ((tmp_path / "nope.jsonl", "does not exist"), (tmp_path, "is a directory, not a file")):
        with pytest.raises(SystemExit) as exit_info:  # the same exit code as a missing --data file
            eval_main(base + ["--replies", str(replies)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"vila-hd eval: error: --replies: {replies} {what}\n" in err, err
    with pytest.raises(SystemExit):
        eval_main(base + ["--replies", data, "--set", "nokey"])
    with pytest.raises(SystemExit):
        eval_main(["--benchmark", "vstar", "--data", str(tmp_path / "missing"), "--replies", data, "--output", "o"])
    assert "missing does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png"}\n')
    assert eval_main(["--benchmark", "jsonl", "--data", str(bad), "--replies", data, "--output",
                      str(tmp_path / "o")]) == 1
    assert "bad.jsonl line 1: 'question' must be a non-empty string" in capsys.readouterr().err


# --- the real engine on a tiny random model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_predictor(tiny):
    from vila_hd.engine import Engine, GenerationOptions
    from vila_hd.eval.predictor import EnginePredictor

    model, processor = tiny
    return EnginePredictor(Engine(model, processor, GenerationOptions(max_new_tokens=3)))


def test_engine_predictor_on_synthetic_samples(tmp_path, tiny_predictor):
    from vila_hd.eval.synthetic import SynthConfig, generate

    generate(SynthConfig(image_size=448, low_res=112, train=0, test=3, mc_fraction=1.0), tmp_path)
    bench = build_benchmark("jsonl", str(tmp_path / "test_eval.jsonl"))
    summary = run_benchmark(bench, tmp_path / "out", predictor=tiny_predictor, generation={"steps": 1},
                            progress=False)
    records = list(read_parts(tmp_path / "out" / "parts").values())
    assert summary["n"] == 3 and summary["errors"] == 0
    assert {r["image_tokens"] for r in records} == {48} and {r["selected_pct"] for r in records} == {10.0}
    assert all(r["latency_s"] > 0 and isinstance(r["prediction"], str) for r in records)
    summary = run_benchmark(bench, tmp_path / "lik", predictor=tiny_predictor, mc_mode="likelihood",
                            generation={"steps": 2}, progress=False)
    records = list(read_parts(tmp_path / "lik" / "parts").values())
    assert summary["errors"] == 0 and {r["image_tokens"] for r in records} == {80}
    for record in records:
        losses = record["stats"]["option_losses"]
        assert record["prediction"] == min(losses, key=losses.get) and len(losses) == 4


def test_continuation_losses_equal_a_full_forward_per_continuation(tiny_predictor, monkeypatch):
    """Scoring from the prompt's KV cache gives each continuation's loss as one full forward of prompt + answer
    would, while the vision tower runs once for all of them."""
    import torch
    import torch.nn.functional as F

    from vila_hd.engine import Engine

    engine = tiny_predictor.engine
    processor, model = engine.processor, engine.model
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    options = ["a red car", "two people", "the sign says stop"]
    encodes = []
    low_res = model.encode_low_res
    monkeypatch.setattr(model, "encode_low_res", lambda pixels: encodes.append(1) or low_res(pixels))
    got = tiny_predictor.continuation_losses([image], "What is in the picture?", options, {"steps": 2})
    assert len(encodes) == 1
    monkeypatch.undo()
    conv = Engine.single_turn(engine, [image], "What is in the picture?")
    prefix_text = processor.apply_chat_template(conv.chat_messages(), add_generation_prompt=True)
    prefix = processor(text=[prefix_text], images=conv.images, num_look_close=2)
    n = prefix["input_ids"].shape[1]
    for option, (total, count, greedy) in zip(options, got):
        full = processor.apply_chat_template(conv.chat_messages() + [{"role": "assistant", "content": option}],
                                             add_generation_prompt=False)
        inputs = processor(text=[full], images=conv.images, num_look_close=2)
        inputs["prompt_positions"] = prefix["prompt_positions"]
        with torch.no_grad():
            logits = model(**inputs).logits[0, n - 1:-1].float()
        targets = inputs["input_ids"][0, n:]
        assert count == targets.numel()
        assert total == fp_approx(float(F.cross_entropy(logits, targets, reduction="sum")))
        assert greedy == bool((logits.argmax(-1) == targets).all())


def test_engine_predictor_answers_a_batch_as_it_answers_each_sample(tmp_path, tiny_predictor):
    from vila_hd.eval.synthetic import SynthConfig, generate

    generate(SynthConfig(image_size=448, low_res=112, train=0, test=3, mc_fraction=1.0), tmp_path)
    bench = build_benchmark("jsonl", str(tmp_path / "test_eval.jsonl"))
    runs = {}
    for size in (1, 3):
        run_benchmark(bench, tmp_path / f"b{size}", predictor=tiny_predictor, generation={"steps": 1},
                      batch_size=size, progress=False)
        runs[size] = {k: (r["prediction"], r["image_tokens"]) for k, r in read_parts(tmp_path / f"b{size}" / "parts").items()}
    assert runs[1] == runs[3] and len(runs[3]) == 3
