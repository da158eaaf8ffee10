"""Every ``vila-hd`` subcommand end to end, through the installed console script in a subprocess (a fresh
one-process job, no PYTHONPATH, run from a scratch folder) on tiny checkpoints and data the tests build: exit
codes, the files each command writes and what they hold, and stdout where it is the command's output.

One module-scoped pipeline: ``synth`` writes the data that ``data check``, ``finetune-lora``, ``chat``, ``infer``
and ``eval`` read; ``finetune-lora -> merge-lora``; ``eval --model -> eval --replies``; ``convert --to vila ->
convert --to hf``. ``train`` and ``pretrain`` run their own tiny recipes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import testpaths
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from train_helpers import fresh_job_env, make_dataset, one_thread, stage_dict  # noqa: F401 (fixture)

ROOT = Path(testpaths.REPO_ROOT)
QUESTION = "What is written on the label?"
LORA_FLAGS = ["--rank", "4", "--micro-batch-size", "2", "--global-batch-size", "2", "--max-length", "512",
              "--set", "max_steps=2", "--set", "precision=fp32", "--set", "look_close.num_look_close=2",
              "--set", "look_close.num_token_look_close=null", "--set", "logging.progress_bar=false",
              "--set", "logging.tensorboard=false", "--set", "data.num_workers=0"]

pytestmark = pytest.mark.usefixtures("one_thread")  # the in-process checks: tiny models on a shared CPU
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="training needs the train extra (pip install -e .[train])")


def console_script() -> str:
    """The ``vila-hd`` executable of this interpreter's environment (else the one on PATH); fails when missing."""
    beside = os.path.join(os.path.dirname(sys.executable), "vila-hd")
    found = beside if os.access(beside, os.X_OK) else shutil.which("vila-hd")
    if found is None:
        pytest.fail(f"no vila-hd console script next to {sys.executable} or on PATH: install the package "
                    "(`make venv`, or `pip install -e .`)")
    return found


class VilaHD:
    """Runs ``vila-hd ARGS`` as a user would: the console script, in ``cwd``, without the launcher variables."""

    def __init__(self, cwd: Path):
        self.exe, self.cwd = console_script(), cwd
        self.env = fresh_job_env()
        self.env.pop("PYTHONPATH", None)  # the installed package, not this checkout on the path
        self.env["OMP_NUM_THREADS"] = "1"  # tiny models on a shared 2-core machine

    def __call__(self, *args, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run([self.exe, *map(str, args)], cwd=self.cwd, env=self.env, capture_output=True,
                              encoding="utf-8", timeout=timeout)


def succeeded(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (f"{proc.args} exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n"
                                  f"{proc.stderr[-4000:]}")
    return proc


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def logits(model_dir, image: Image.Image) -> torch.Tensor:
    """The logits of one image question under the checkpoint (either layout) at ``model_dir``."""
    from vila_hd.model import VilaHDForConditionalGeneration
    from vila_hd.processing import VilaHDProcessor

    model = VilaHDForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = VilaHDProcessor.from_pretrained(model_dir)
    prompt = processor.apply_chat_template([{"role": "user", "content": f"<image>\n{QUESTION}"}])
    with torch.no_grad():
        return model(**processor(text=prompt, images=[image])).logits


@pytest.fixture(scope="module")
def vila_hd(tmp_path_factory) -> VilaHD:
    return VilaHD(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    """The library's engine on the checkpoint the commands load: the answers they must print."""
    from vila_hd.engine import Engine, GenerationOptions

    return Engine.from_pretrained(tiny_checkpoint, options=GenerationOptions(max_new_tokens=3))


# --- argument wiring (in process: what every model-loading command hands to vila_hd.serve.arguments.load_engine) ---
def test_every_model_loading_command_parses_what_load_engine_reads():
    from vila_hd import cli
    from vila_hd.engine import ServingLimits
    from vila_hd.eval.cli import build_eval_parser
    from vila_hd.serve import arguments

    parsed = {
        "chat": cli.build_parser().parse_args(["chat", "--model", "m"]),
        "infer": cli.build_parser().parse_args(["infer", "--model", "m", "--input", "q.jsonl", "--output", "a.jsonl"]),
        "eval": build_eval_parser().parse_args(["--benchmark", "jsonl", "--data", "d.jsonl", "--model", "m",
                                                "--output", "o", "--limit", "2", "--limit-images", "3"]),
    }
    for name, args in parsed.items():
        for attr in ("model", "adapter", "device", "dtype", "device_map", "load_4bit", "seed"):
            assert hasattr(args, attr), f"{name}: no {attr}"
        arguments.generation_options(args)
        limits = arguments.serving_limits(args)
        assert limits == (ServingLimits(max_images_per_prompt=3) if name == "eval" else ServingLimits()), name
    assert parsed["eval"].limit == 2  # --limit (samples) stays apart from the --limit-* serving limits


# --- synth -> data check ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth(vila_hd, tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    proc = vila_hd("synth", "--out", out, "--image-size", "448", "--low-res", "112", "--train", "4", "--test", "3",
                   "--mc-fraction", "1.0", "--seed", "0")
    return proc, out


@pytest.fixture(scope="module")
def image(synth) -> Path:
    return synth[1] / read_jsonl(synth[1] / "test_eval.jsonl")[0]["image"]


def test_synth_writes_the_benchmark_it_reports(synth):
    proc, out = synth
    counts = json.loads(succeeded(proc).stdout)
    assert counts["train"]["samples"] == 4 and counts["test"]["samples"] == 3
    train = json.loads((out / "train.json").read_text())
    test = read_jsonl(out / "test_eval.jsonl")
    assert len(train) == 4 and len(test) == 3 and len(read_jsonl(out / "train_eval.jsonl")) == 4
    for record in train + test:
        assert Image.open(out / record["image"]).size == (448, 448), record["id"]
    assert all(len(r["options"]) == 4 and r["answer"] in "ABCD" for r in test)
    assert json.loads((out / "meta.json").read_text())["config"]["image_size"] == 448


def test_data_check_reports_the_bad_sample_and_exits_1(vila_hd, synth, tiny_checkpoint, tmp_path):
    out = synth[1]
    records = json.loads((out / "train.json").read_text())
    records.append({"id": "broken", "image": "images/none.png",
                    "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A"}]})
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records))
    proc = vila_hd("data", "check", data, "--media", out, "--model", tiny_checkpoint, "--num-look-close", "2",
                   "--json", tmp_path / "report.json")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "checked 5 sample(s)" in proc.stdout and "bad samples: 1" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["samples"] == {"mixed.json": 5} and report["counts"] == {"missing image": 1}
    assert [(b["index"], b["id"], b["reason"]) for b in report["bad"]] == [(4, "broken", "missing image")]
    assert "none.png" in report["bad"][0]["detail"]


# --- chat, infer ---------------------------------------------------------------------------------------------------
def test_chat_prompt_prints_the_answer_and_json_its_record(vila_hd, tiny_checkpoint, image, engine):
    expected = engine.generate(engine.single_turn([image], QUESTION)).text
    common = ["chat", "--model", tiny_checkpoint, "--image", image, "--prompt", QUESTION, "--max-new-tokens", "3"]
    assert succeeded(vila_hd(*common)).stdout == expected + "\n"
    record = json.loads(succeeded(vila_hd(*common, "--json")).stdout)
    assert record["answer"] == expected and record["prompt"] == QUESTION
    assert record["model"] == str(tiny_checkpoint) and record["images"] == [str(image)]
    assert record["stats"]["new_tokens"] <= 3 and record["stats"]["image_tokens"] == 80


def test_infer_writes_one_answer_per_question(vila_hd, tiny_checkpoint, image, engine, tmp_path):
    items = [{"id": "img", "image": str(image), "question": QUESTION}, {"id": "text", "question": "Hello?"},
             {"id": "gone", "image": str(tmp_path / "gone.png"), "question": QUESTION}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    proc = succeeded(vila_hd("infer", "--model", tiny_checkpoint, "--input", tmp_path / "q.jsonl",
                             "--output", tmp_path / "a.jsonl", "--max-new-tokens", "3", "--no-progress"))
    assert "2 answered, 1 errors, 0 already done (of 3)" in proc.stderr
    answers = read_jsonl(tmp_path / "a.jsonl")
    assert [a["id"] for a in answers] == ["img", "text", "gone"]
    assert answers[0]["answer"] == engine.generate(engine.single_turn([image], QUESTION)).text
    assert answers[1]["answer"] == engine.generate(engine.single_turn(None, "Hello?")).text
    assert answers[2]["error"] == f"{tmp_path / 'gone.png'}: not found" and "answer" not in answers[2]


# --- eval: a model, saved replies, a budget sweep -----------------------------------------------------------------
SUMMARY_KEYS = {"benchmark", "metric", "n", "expected", "errors", "accuracy", "by_category", "image_tokens_mean",
                "selected_pct_mean", "latency_s", "settings"}


def eval_args(synth, output) -> list:
    return ["eval", "--benchmark", "jsonl", "--data", synth[1] / "test_eval.jsonl", "--output", output,
            "--no-progress"]


@pytest.fixture(scope="module")
def model_eval(vila_hd, synth, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "model"
    proc = vila_hd(*eval_args(synth, out), "--model", tiny_checkpoint, "--max-new-tokens", "3", "--steps", "1")
    return proc, out


def test_eval_with_a_model_writes_its_summary(model_eval, synth, tiny_checkpoint):
    proc, out = model_eval
    assert "| accuracy |" in succeeded(proc).stdout and "3 of 3 (0 failed)" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys(), SUMMARY_KEYS - summary.keys()
    assert (summary["benchmark"], summary["n"], summary["expected"], summary["errors"]) == ("jsonl", 3, 3, 0)
    assert summary["image_tokens_mean"] == 48.0  # --steps 1: 16 low-res + 32 high-res tokens
    assert summary["settings"]["model"] == str(tiny_checkpoint)
    assert summary["settings"]["generation"] == {"max_new_tokens": 3, "steps": 1}
    samples = read_jsonl(out / "samples.jsonl")
    assert [s["id"] for s in samples] == [r["id"] for r in read_jsonl(synth[1] / "test_eval.jsonl")]
    assert all(isinstance(s["prediction"], str) and s["image_tokens"] == 48 for s in samples)
    assert (out / "summary.md").read_text().startswith("# jsonl")


def test_eval_scores_saved_replies(vila_hd, synth, model_eval, tmp_path):
    """The model run's samples.jsonl, edited to two right replies and one wrong one, scored without a model."""
    truth = {r["id"]: r["answer"] for r in read_jsonl(synth[1] / "test_eval.jsonl")}
    samples = read_jsonl(model_eval[1] / "samples.jsonl")
    for i, sample in enumerate(samples):
        right = truth[sample["id"]]
        sample["prediction"] = right if i < 2 else "ABCD"[("ABCD".index(right) + 1) % 4]
    replies = tmp_path / "replies.jsonl"
    replies.write_text("".join(json.dumps(s) + "\n" for s in samples))
    proc = succeeded(vila_hd(*eval_args(synth, tmp_path / "out"), "--replies", replies))
    assert "| accuracy | 66.67 |" in proc.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys() and (summary["n"], summary["errors"], summary["accuracy"]) == (3, 0, 66.67)
    assert summary["settings"]["replies"] is True
    assert [s["correct"] for s in read_jsonl(tmp_path / "out" / "samples.jsonl")] == [True, True, False]


def test_eval_sweep_runs_each_budget(vila_hd, synth, tiny_checkpoint, tmp_path):
    out = tmp_path / "sweep"
    proc = succeeded(vila_hd(*eval_args(synth, out), "--model", tiny_checkpoint, "--max-new-tokens", "2",
                             "--sweep", "steps=1,2"))
    assert "| steps-1 |" in proc.stdout and "| steps-2 |" in proc.stdout
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [(r["name"], r["n"], r["errors"], r["image_tokens_mean"]) for r in runs] == [
        ("steps-1", 3, 0, 48.0), ("steps-2", 3, 0, 80.0)]
    for name in ("steps-1", "steps-2"):
        assert json.loads((out / name / "summary.json").read_text())["n"] == 3
    assert Image.open(out / "sweep.png").format == "PNG" and (out / "sweep.md").is_file()


# --- train, finetune-lora -> merge-lora ------------------------------------------------------------------------
@needs_deepspeed
def test_train_writes_a_checkpoint_from_its_recipe(vila_hd, tiny_checkpoint, tmp_path):
    from vila_hd.model.parts import part_of

    data = make_dataset(str(tmp_path / "data"), n=4)
    out = tmp_path / "run"
    recipe = stage_dict(data, str(out), init={"model": str(tiny_checkpoint)}, max_steps=3,
                        **{"batch.global_batch_size": 2, "checkpoint.every_steps": 2})
    (tmp_path / "stage.yaml").write_text(yaml.safe_dump(recipe))
    succeeded(vila_hd("train", tmp_path / "stage.yaml", "--set", "max_steps=2"))
    assert sorted(json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()) == [
        1, 2]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
    before, after = load_file(tiny_checkpoint / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert before.keys() == after.keys()
    moved = {part_of(k) for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"projector", "llm"}, moved  # trained parts moved, the frozen ones stayed bit-identical


@pytest.fixture(scope="module")
def finetuned(vila_hd, synth, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    proc = vila_hd("finetune-lora", "--model", tiny_checkpoint, "--data", synth[1] / "train.json", "--media", synth[1],
                   "--output-dir", out, *LORA_FLAGS)
    return proc, out


@needs_deepspeed
def test_finetune_lora_writes_an_adapter_of_its_base(finetuned, tiny_checkpoint):
    proc, out = finetuned
    succeeded(proc)
    adapter = out / "final"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_checkpoint)
    keys = load_file(adapter / "adapter_model.safetensors").keys()
    assert any("lora_A" in k for k in keys) and any("mm_projector" in k for k in keys)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"


@needs_deepspeed
def test_merge_lora_output_loads_and_answers_like_the_adapter(vila_hd, finetuned, tiny_checkpoint, image, tmp_path):
    from vila_hd.loading import load_pretrained as load_model
    from vila_hd.model import VilaHDForConditionalGeneration

    succeeded(finetuned[0])
    adapter, merged = finetuned[1] / "final", tmp_path / "merged"
    proc = succeeded(vila_hd("merge-lora", "--adapter", adapter, "--out", merged))
    assert f"into {merged}" in proc.stdout
    _, info = VilaHDForConditionalGeneration.from_pretrained(merged, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with_adapter, processor = load_model(str(adapter), device="cpu", dtype="float32")
    prompt = processor.apply_chat_template([{"role": "user", "content": f"<image>\n{QUESTION}"}])
    with torch.no_grad():
        expected = with_adapter.eval()(**processor(text=prompt, images=[Image.open(image)])).logits
    got = logits(merged, Image.open(image))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # W + BA folded vs applied: a few ulps
    assert not torch.equal(got, logits(tiny_checkpoint, Image.open(image)))  # the fine-tuning is in it


# --- convert both ways ------------------------------------------------------------------------------------------
def test_convert_round_trip_gives_the_same_logits(vila_hd, tiny_checkpoint, image, tmp_path):
    from vila_hd.model.vila_layout import is_vila_checkpoint

    vila, hf = tmp_path / "vila", tmp_path / "hf"
    proc = succeeded(vila_hd("convert", "--to", "vila", tiny_checkpoint, vila))
    assert proc.stdout.splitlines()[-1] == f"wrote vila checkpoint to {vila}"  # (DeepSpeed may log a line first)
    assert is_vila_checkpoint(str(vila)) and {p.name for p in vila.iterdir()} >= {"llm", "vision_tower", "mm_projector"}
    proc = succeeded(vila_hd("convert", "--to", "hf", vila, hf))
    assert proc.stdout.splitlines()[-1] == f"wrote hf checkpoint to {hf}"
    original = load_file(tiny_checkpoint / "model.safetensors")
    back = load_file(hf / "model.safetensors")
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    reference = logits(tiny_checkpoint, Image.open(image))
    for converted in (vila, hf):  # the same tensors: bit-identical outputs
        torch.testing.assert_close(logits(converted, Image.open(image)), reference, rtol=0, atol=0)


# --- pretrain ------------------------------------------------------------------------------------------------------
@needs_deepspeed
def test_pretrain_writes_its_logs_checkpoint_and_ps3_export(vila_hd, tmp_path):
    from vila_hd.ps3 import PS3Model

    out = tmp_path / "ps3"
    sets = [f"output_dir={out}", "max_steps=2", "data.synthetic.num_images=4", "batch.micro_batch_size=2",
            "checkpoint.every_steps=2", "logging.every_steps=1", "logging.progress_bar=false"]
    recipe = ROOT / "configs" / "ps3" / "tiny_demo.yaml"
    proc = succeeded(vila_hd("pretrain", recipe, *(arg for s in sets for arg in ("--set", s))))
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["step"] == 2 and torch.isfinite(torch.tensor(metrics["loss"]))
    assert f"exported the PS3 checkpoint to {out / 'final'}" in proc.stdout
    assert [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002" and (out / "pretrain.json").is_file()
    _, info = PS3Model.from_pretrained(out / "final", output_loading_info=True)
    assert not any(info.values()), info
