"""The README's main job: train a tiny VILA-HD from scratch on a synthetic high-resolution task, then show on
held-out images that top-down patch selection answers what the low-resolution view cannot, with a fraction of
the visual tokens of full high-resolution encoding.

    python -m vila_hd.demo --out outputs/demo                  # tiny scales 112/224/448: ~8 min on 2 CPU cores
    python -m vila_hd.demo --out outputs/demo-quick --quick    # every step on a handful of samples (smoke test)
    python -m vila_hd.demo --out outputs/demo-real --scale real    # the same at 378/756/1512/3780 (for a GPU)

What it does (each step prints its progress and the elapsed time; docs/demo.md has the details):

1. data: seeded images of large grey clutter with a few small squares, each framed in its own colour and filled
   with a fine pattern. A question names a frame colour and asks which pattern fills that square. A pattern's
   period is one low-res pixel and the squares sit on the grid of the high-res patches, so PS3's low-res view
   shows every pattern as the same flat half-tone (checked at generation) while the colours stay visible: the
   low-res view can tell where to look, only high resolution what is there. An easier ``align`` set (two
   large squares per image), the training set and a held-out set, as LLaVA grounded JSON (with the asked
   square's box) and an evaluation JSONL.
2. model: a byte-level BPE tokenizer trained on the task's text, a small Qwen2-style LLM and a small PS3, with
   random weights, saved as ``init/``.
3. training with the stage recipes ``configs/demo/{align,sft}.yaml`` through the real trainer
   (``vila_hd.train.cli train``): ``align`` learns to read patterns on the large squares; ``sft`` learns the task
   itself, the LLM seeing every patch while the box-supervised selection loss teaches the prompt head and PS3's
   selection modules where the named square is.
4. evaluation of the held-out split with the eval harness (``vila_hd.eval.harness.run_benchmark``, generic JSONL):
   low resolution only, bottom-up selection, top-down selection at two budgets, all patches.
5. ``report.md`` with the table, ``accuracy_vs_tokens.png``, selection heatmaps of one held-out image (top-down
   vs bottom-up), ``example.png`` (full vs low-res view) and one held-out question answered by
   ``vila-hd chat --prompt``; ``summary.json`` holds every number.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vila_hd.arguments import Command, guarded
from vila_hd.errors import require_extra

PATTERNS = ("horizontal stripes", "vertical stripes", "checkerboard")  # the options, always in this order
DECOY_TEXTURE = "fine checkerboard"  # what fills the squares that are not asked about
COLOURS = {"red": (220, 30, 30), "green": (20, 150, 40), "blue": (30, 60, 220), "yellow": (230, 190, 0),
           "purple": (140, 40, 170), "orange": (245, 120, 0), "black": (20, 20, 20)}
LETTERS = string.ascii_uppercase
STAGES = ("align", "sft")


# --- settings ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskConfig:
    """The synthetic task at one scale. ``low_res`` is PS3's low-res view; a pattern's period is one low-res
    pixel (``image_size / low_res`` image pixels), the largest the invisibility rule allows."""

    image_size: int = 448
    low_res: int = 112
    grid: int = 28  # squares sit on this grid: a multiple of the period and of the high-res 2x2 patch groups
    side_cells: int = 2  # side of a square in grid cells
    squares: int = 4  # squares per image, each framed in its own colour: the asked one (a random pattern of
    # PATTERNS) and squares - 1 decoys (DECOY_TEXTURE)
    clutter: float = 0.4  # density of the large grey background shapes
    seed: int = 0

    @property
    def period(self) -> int:
        return self.image_size // self.low_res

    @property
    def side(self) -> int:
        return self.side_cells * self.grid


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "tiny"  # geometry of vila_hd.model.tiny: "tiny" (112/224/448) or "tiny-4K" (378/756/1512/3780)
    max_select_num: int = 128  # high-res patches per look-close step
    highres_selection_image_size: int = 448
    vision: dict = field(default_factory=lambda: {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
                                                  "intermediate_size": 64})
    text: dict = field(default_factory=lambda: {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3,
                                                "num_attention_heads": 4, "num_key_value_heads": 4,
                                                "max_position_embeddings": 1024})
    vocab_size: int = 400


@dataclass(frozen=True)
class RunConfig:
    """One demo run: data sizes, steps, batch (``micro_batch`` per forward), what SFT shows the LLM, and
    ``budgets``, the look-close steps evaluated with top-down and bottom-up selection."""

    align_task: TaskConfig = TaskConfig(side_cells=6, squares=2)
    task: TaskConfig = TaskConfig()
    model: ModelConfig = ModelConfig()
    align_train: int = 2000
    train: int = 3000
    test: int = 200
    align_steps: int = 200
    sft_steps: int = 250
    batch: int = 16
    micro_batch: int = 16
    sft_look_close: int | str = "all"  # look-close steps the LLM sees in SFT (the selection loss trains either way)
    max_length: int = 1024  # tokens per training sample after image expansion
    loader_workers: int = 0  # data-loader processes of the training stages (large images need several)
    budgets: tuple[int, ...] = (1, 2)
    threads: int = 1


SCALES = {
    "tiny": RunConfig(),
    "real": RunConfig(
        align_task=TaskConfig(image_size=3780, low_res=378, grid=140, side_cells=8, squares=2),
        task=TaskConfig(image_size=3780, low_res=378, grid=140, side_cells=1),
        model=ModelConfig(preset="tiny-4K", max_select_num=2560, highres_selection_image_size=1512,
                          vision={"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                                  "intermediate_size": 128},
                          text={"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                                "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 32768}),
        align_train=1000, train=2000, test=100, align_steps=150, sft_steps=200, batch=16, micro_batch=2,
        max_length=24576, loader_workers=12, threads=8,
    ),
}


def quick(run: RunConfig) -> RunConfig:
    """A smoke version of ``run``: every step on a handful of samples (no accuracy claims)."""
    return replace(run, align_train=8, train=8, test=4, align_steps=2, sft_steps=2, batch=4, micro_batch=4,
                   loader_workers=0)


class Log:
    """Progress lines with the elapsed time since the start."""

    def __init__(self):
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        print(f"[{format_seconds(self.elapsed):>7}] {message}", flush=True)


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# --- data ----------------------------------------------------------------------------------------------------
def options_text() -> str:
    return "\n".join(f"{LETTERS[i]}. {p}" for i, p in enumerate(PATTERNS))


def question_prompt(colour: str) -> str:
    """The prompt of a question (training and evaluation use the same text). The options come first and the
    question ends on the colour, so the last prompt token (whose LLM state steers the selection) is near it."""
    return f"{options_text()}\nWhich pattern fills the square framed in {colour}?"


def pattern_mask(kind: str, side: int, period: int) -> np.ndarray:
    """(side, side) bool, True where the pattern is inked: stripes / checks half a period wide, or one-pixel
    checks. Each puts half of every period x period tile in ink, so PS3's low-res resize of a grid-aligned
    square (one low-res pixel per period) shows the same flat half-tone for every pattern."""
    y, x = np.mgrid[0:side, 0:side]
    w = period // 2
    if kind == "horizontal stripes":
        return (y // w) % 2 == 0
    if kind == "vertical stripes":
        return (x // w) % 2 == 0
    if kind == "checkerboard":
        return ((x // w) + (y // w)) % 2 == 0
    if kind == "fine checkerboard":
        return (x + y) % 2 == 0
    raise ValueError(f"unknown pattern {kind!r}")


def pattern_patch(kind: str | None, side: int, period: int, colour) -> np.ndarray:
    """(side, side, 3): a frame one period wide in ``colour`` around the pattern (``colour`` on white);
    ``kind=None`` fills the inside with the flat half-tone that the low-res view shows for every pattern."""
    patch = np.empty((side, side, 3), np.uint8)
    if kind is None:
        patch[:] = [(c + 255) // 2 for c in colour]
    else:
        patch[:] = 255
        patch[pattern_mask(kind, side, period)] = colour
    patch[:period], patch[-period:], patch[:, :period], patch[:, -period:] = colour, colour, colour, colour
    return patch


def low_res_views(task: TaskConfig, colour=(220, 30, 30)) -> dict[str, np.ndarray]:
    """What PS3's low-res pass sees (its own resize) of a grid-aligned square of each pattern, and of the flat
    half-tone: ``{pattern or "flat": (3, s, s) array}``."""
    import torch

    from vila_hd.ps3.vision import resize_image

    views = {}
    for kind in (*PATTERNS, DECOY_TEXTURE, None):
        patch = pattern_patch(kind, task.side, task.period, colour).astype(np.float32)
        x = torch.from_numpy(patch).permute(2, 0, 1)[None]
        side = task.side * task.low_res // task.image_size
        views[kind or "flat"] = resize_image(x, (side, side))[0].numpy()
    return views


def check_invisible(task: TaskConfig, tolerance: float = 4.0) -> float:
    """The largest difference (0-255 levels) between the low-res views of two patterns inside the frame;
    raises when one could tell the patterns apart at low resolution."""
    views = low_res_views(task)
    inner = slice(2, -2)
    ref = views["flat"][:, inner, inner]
    worst = max(float(np.abs(v[:, inner, inner] - ref).max()) for v in views.values())
    if worst > tolerance:
        raise AssertionError(f"a pattern differs by {worst:.1f} levels from the others at low resolution")
    return worst


def grey_background(rng: random.Random, size: int, clutter: float) -> Image.Image:
    """The synthetic benchmark's gradient with large shapes, in grey (only the squares carry colour)."""
    from vila_hd.scenes import draw_background

    return draw_background(rng, size, clutter).convert("L").convert("RGB")


def place_squares(rng: random.Random, cells: int, k: int, n: int) -> list[tuple[int, int]]:
    """Top-left cells of ``n`` non-touching k x k squares on a ``cells`` x ``cells`` grid (random, seeded)."""
    for _ in range(100):
        free = [(x, y) for y in range(cells - k + 1) for x in range(cells - k + 1)]
        rng.shuffle(free)
        corners: list[tuple[int, int]] = []
        for x, y in free:  # at least one cell between two squares
            if all(abs(x - a) > k or abs(y - b) > k for a, b in corners):
                corners.append((x, y))
                if len(corners) == n:
                    return corners
    raise RuntimeError(f"no room for {n} squares of {k} x {k} cells on a {cells} x {cells} grid")


def generate_sample(task: TaskConfig, split: str, index: int) -> tuple[Image.Image, dict[str, Any]]:
    """Image and record of sample ``index`` of ``split`` (the same for the same task settings). The answers are
    balanced: each run of ``len(PATTERNS)`` consecutive samples asks about every pattern once, in a seeded order."""
    from vila_hd.eval.synthetic import is_invisible

    rng = random.Random(f"vila-hd-demo:{task.seed}:{split}:{index}")
    block = random.Random(f"vila-hd-demo:{task.seed}:{split}:block{index // len(PATTERNS)}")
    answer = block.sample(PATTERNS, len(PATTERNS))[index % len(PATTERNS)]
    size, grid, k = task.image_size, task.grid, task.side_cells
    image = grey_background(rng, size, task.clutter)
    corners = place_squares(rng, size // grid, k, task.squares)
    squares = []
    for i, (colour, (x, y)) in enumerate(zip(rng.sample(list(COLOURS), task.squares), corners)):
        kind = answer if i == 0 else DECOY_TEXTURE
        box = [x * grid, y * grid, (x + k) * grid, (y + k) * grid]
        image.paste(Image.fromarray(pattern_patch(kind, task.side, task.period, COLOURS[colour])), box[:2])
        squares.append({"colour": colour, "pattern": kind, "box": box})
    target = squares[0]
    if not is_invisible("pattern", task.period, size, task.low_res):  # pragma: no cover - by construction
        raise AssertionError("the pattern period breaks the invisibility rule")
    sample_id = f"demo-{split}-{index:05d}"
    record = {
        "id": sample_id,
        "image": f"images/{split}/{sample_id}.png",
        "question": f"Which pattern fills the square framed in {target['colour']}?",
        "prompt": question_prompt(target["colour"]),
        "options": list(PATTERNS),
        "answer": LETTERS[PATTERNS.index(target["pattern"])],
        "category": target["pattern"],
        "box": target["box"],
        "colour": target["colour"],
        "squares": squares,
    }
    return image, record


def llava_record(record: dict[str, Any]) -> dict[str, Any]:
    """The grounded LLaVA training sample of a record (the asked square's box trains the selection)."""
    return {"id": record["id"], "image": record["image"], "box": record["box"],
            "conversations": [{"from": "human", "value": "<image>\n" + record["prompt"]},
                              {"from": "gpt", "value": record["answer"]}]}


def _generate_range(task: TaskConfig, out: str, split: str, start: int, stop: int) -> list[dict]:
    records = []
    for i in range(start, stop):
        image, record = generate_sample(task, split, i)
        image.save(Path(out) / record["image"], format="PNG", compress_level=1)
        records.append(record)
    return records


def write_split(task: TaskConfig, out: Path, split: str, n: int, log: Callable[[str], None],
                workers: int = 1) -> list[dict]:
    """Generate ``n`` samples of ``split`` into ``out/images/<split>/`` (``workers`` processes; every sample is
    seeded on its own, so the result does not depend on them); returns their records in order."""
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    chunk = max(16, -(-n // (4 * workers)))
    ranges = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    if workers <= 1 or len(ranges) <= 1:
        return _generate_range(task, str(out), split, 0, n)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    records: list[dict] = []
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for part in pool.map(_generate_range, *zip(*[(task, str(out), split, a, b) for a, b in ranges])):
            records += part
            if len(records) < n and len(records) // 1000 > (len(records) - len(part)) // 1000:
                log(f"data: {split} {len(records)}/{n}")
    return records


def generate_data(run: RunConfig, out: Path, log: Callable[[str], None], workers: int = 1) -> dict[str, Any]:
    """Write the demo's data to ``out``: ``images/{align,train,test}/``, ``align.json`` and ``train.json``
    (LLaVA, grounded), ``test.jsonl`` (the evaluation file of ``vila-hd eval --benchmark jsonl``),
    ``registry.yaml`` (datasets ``demo_align`` and ``demo_sft`` for the stage recipes) and ``meta.json``."""
    levels = {"align": check_invisible(run.align_task), "task": check_invisible(run.task)}
    out.mkdir(parents=True, exist_ok=True)
    align = write_split(run.align_task, out, "align", run.align_train, log, workers)
    (out / "align.json").write_text(json.dumps([llava_record(r) for r in align], indent=1) + "\n")
    log(f"data: {len(align)} align samples (2 large squares each)")
    train = write_split(run.task, out, "train", run.train, log, workers)
    (out / "train.json").write_text(json.dumps([llava_record(r) for r in train], indent=1) + "\n")
    log(f"data: {len(train)} training samples")
    test = write_split(run.task, out, "test", run.test, log, workers)
    with open(out / "test.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in test)
    log(f"data: {len(test)} held-out samples")
    (out / "registry.yaml").write_text("demo_align:\n  path: align.json\n  media: .\n"
                                       "demo_sft:\n  path: train.json\n  media: .\n")
    task = run.task
    meta = {
        "align_task": asdict(run.align_task), "task": asdict(task),
        "samples": {"align": len(align), "train": len(train), "test": len(test)},
        "patterns": list(PATTERNS), "colours": list(COLOURS),
        "rule": {"period_px": task.period, "period_low_res_px": task.period * task.low_res / task.image_size,
                 "max_low_res_difference_levels": levels},
        "answers": {split: {k: sum(r["answer"] == LETTERS[i] for r in recs) for i, k in enumerate(PATTERNS)}
                    for split, recs in (("train", train), ("test", test))},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# --- model ---------------------------------------------------------------------------------------------------
def task_corpus() -> list[str]:
    texts = [question_prompt(c) for c in COLOURS] + list(LETTERS[: len(PATTERNS)])
    return texts + ["You are a helpful assistant."]


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on the task's text, with the ChatML template and ``<image>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from vila_hd.model.tiny import SPECIAL_TOKENS
    from vila_hd.templates import CHATML_TEMPLATE, IMAGE_TOKEN

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(task_corpus() * 8, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>", IMAGE_TOKEN], padding_side="left")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_initial_model(model_cfg: ModelConfig, out: Path, seed: int) -> Path:
    """Random-weight VILA-HD (tokenizer, LLM, PS3) saved to ``out`` as the first stage's init."""
    from vila_hd.builder import build_from_config
    from vila_hd.model.tiny import tiny_config

    tokenizer = build_tokenizer(model_cfg.vocab_size)
    vision = dict(model_cfg.vision, max_select_num=model_cfg.max_select_num,
                  highres_selection_image_size=model_cfg.highres_selection_image_size)
    config = tiny_config(model_cfg.preset, tokenizer=tokenizer, text_overrides=dict(model_cfg.text), vision_overrides=vision,
                         num_look_close=2)
    model, processor = build_from_config(config, tokenizer, seed=seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# --- training ------------------------------------------------------------------------------------------------
def config_dir() -> Path:
    from vila_hd.train.config import CONFIG_ROOT

    return Path(CONFIG_ROOT) / "demo"


class MetricsWatcher(threading.Thread):
    """Prints the trainer's logged steps (``logs/metrics.jsonl``) while a stage runs in this process."""

    def __init__(self, path: Path, stage: str, total: int, log: Callable[[str], None]):
        super().__init__(daemon=True)
        self.path, self.stage, self.total, self.log = path, stage, total, log
        self.done = threading.Event()
        self.last: dict[str, Any] = {}
        self._seen = 0

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.poll()
        self.poll()

    def poll(self) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        for line in lines[self._seen:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line being written: read it next time
                break
            self._seen += 1
            self.last = record
            selection = record.get("loss/selection")
            extra = f", selection loss {selection:.3f}" if selection is not None and selection > 0 else ""
            self.log(f"{self.stage}: step {record['step']}/{self.total}, LM loss {record.get('loss/lm', 0):.3f}"
                     f"{extra}, {record.get('samples_per_s', 0):.1f} samples/s")

    def stop(self) -> None:
        self.done.set()
        self.join()


def run_stage(stage: str, init: Path, out: Path, data: Path, run: RunConfig, seed: int,
              log: Callable[[str], None]) -> dict[str, Any]:
    """Train one stage with its recipe ``configs/demo/<stage>.yaml`` through ``vila_hd.train.cli train``; the paths,
    step count, batch and seed of this run are set with ``--set``. Returns the stage's last logged metrics."""
    import torch

    from vila_hd.train.cli import train_main

    steps = run.align_steps if stage == "align" else run.sft_steps
    target = out / stage
    if target.exists():
        shutil.rmtree(target)  # a fresh run: no resuming from an earlier demo's checkpoints
    overrides = {
        "init.model": str(init), "output_dir": str(target), "data.registry": str(data / "registry.yaml"),
        "max_steps": steps, "batch.micro_batch_size": min(run.micro_batch, run.batch),
        "batch.global_batch_size": run.batch, "seed": seed, "logging.every_steps": max(1, steps // 15),
        "data.max_length": run.max_length, "data.num_workers": run.loader_workers,
    }
    if stage == "sft":
        overrides["look_close.num_look_close"] = run.sft_look_close
    if torch.cuda.is_available():
        overrides["precision"] = "bf16"
    argv = [str(config_dir() / f"{stage}.yaml"), "--no-resume"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    log(f"{stage}: {steps} steps of {run.batch} samples (vila_hd.train.cli train configs/demo/{stage}.yaml)")
    start = time.perf_counter()
    watcher = MetricsWatcher(target / "logs" / "metrics.jsonl", stage, steps, log)
    watcher.start()
    try:
        train_main(argv)
    finally:
        watcher.stop()
    seconds = time.perf_counter() - start
    log(f"{stage}: done in {format_seconds(seconds)} -> {target / 'final'}")
    return {"stage": stage, "steps": steps, "batch": run.batch, "seconds": round(seconds, 1),
            "recipe": f"configs/demo/{stage}.yaml", "final": watcher.last}


# --- evaluation ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    name: str  # folder / key
    label: str  # for the report
    steps: int | str  # look-close steps (0: low-res only; "all": every patch)
    mode: str  # top-down / bottom-up


def eval_settings(budgets: tuple[int, ...]) -> list[Setting]:
    out = [Setting("low_res", "low resolution only", 0, "bottom-up")]
    out += [Setting(f"bottom_up_{k}", f"bottom-up, {k} step{'s' * (k > 1)}", k, "bottom-up") for k in budgets]
    out += [Setting(f"top_down_{k}", f"top-down, {k} step{'s' * (k > 1)}", k, "top-down") for k in budgets]
    return out + [Setting("all", "all patches", "all", "bottom-up")]


class ProgressPredictor:
    """Wraps a predictor to print how far a setting is."""

    def __init__(self, predictor, name: str, total: int, log: Callable[[str], None]):
        self.predictor, self.name, self.total, self.log = predictor, name, total, log
        self.count = 0

    def __call__(self, images, prompt, options):
        out = self.predictor(images, prompt, options)
        self.count += 1
        if self.count == self.total or self.count % max(1, self.total // 2) == 0:
            self.log(f"eval {self.name}: {self.count}/{self.total}")
        return out


def evaluate(engine, data: Path, out: Path, settings: list[Setting], log: Callable[[str], None]) -> list[dict]:
    """Run the held-out split through the eval harness once per setting; one row per setting."""
    from vila_hd.eval.benchmarks import build_benchmark
    from vila_hd.eval.harness import run_benchmark
    from vila_hd.eval.predictor import EnginePredictor

    benchmark = build_benchmark("jsonl", str(data / "test.jsonl"))
    total = len(benchmark.samples())
    if out.exists():
        shutil.rmtree(out)
    rows = []
    for s in settings:
        predictor = ProgressPredictor(EnginePredictor(engine), s.label, total, log)
        generation = {"max_new_tokens": 4, "temperature": 0.0, "steps": s.steps, "mode": s.mode}
        summary = run_benchmark(benchmark, out / s.name, predictor=predictor, generation=generation,
                                run_info={"model": "sft/final"}, progress=False)
        rows.append({"setting": s.name, "label": s.label, "steps": s.steps, "mode": s.mode,
                     "visual_tokens": summary["image_tokens_mean"], "accuracy": summary["accuracy"],
                     "n": summary["n"], "errors": summary["errors"], "unparsed_rate": summary["unparsed_rate"],
                     "selected_pct": summary["selected_pct_mean"], "latency_p50_s": summary["latency_s"]["p50"]})
        log(f"eval {s.label}: accuracy {summary['accuracy']}% with {summary['image_tokens_mean']} visual tokens")
    return rows


def check_claims(rows: list[dict]) -> dict[str, Any]:
    """The demo's two claims on the held-out split: the best top-down setting with at most 25% of the visual
    tokens of all patches beats low resolution only by >= 20 points and is within 5 points of all patches."""
    by = {r["setting"]: r for r in rows}
    low, full = by["low_res"], by["all"]
    cheap = [r for r in rows if r["mode"] == "top-down" and r["visual_tokens"] <= 0.25 * full["visual_tokens"]]
    if not cheap:
        return {"top_down": None, "beats_low_res_by_20": False, "within_5_of_all": False}
    best = max(cheap, key=lambda r: (r["accuracy"], -r["visual_tokens"]))
    return {
        "top_down": best["setting"],
        "token_fraction": round(best["visual_tokens"] / full["visual_tokens"], 3),
        "gain_over_low_res": round(best["accuracy"] - low["accuracy"], 2),
        "gap_to_all": round(full["accuracy"] - best["accuracy"], 2),
        "beats_low_res_by_20": best["accuracy"] - low["accuracy"] >= 20,
        "within_5_of_all": full["accuracy"] - best["accuracy"] <= 5,
    }


def plot(rows: list[dict], path: Path) -> Path:
    """Accuracy against mean visual tokens: top-down and bottom-up curves (low-res and all patches are the
    ends of both) and chance."""
    from vila_hd.eval.plot import Series, line_chart

    by = {r["setting"]: r for r in rows}
    series = []
    for mode in ("top-down", "bottom-up"):
        points = [by["low_res"]] + [r for r in rows if r["mode"] == mode and r["setting"] not in ("low_res", "all")]
        points.append(by["all"])
        series.append(Series(mode, [(r["visual_tokens"], r["accuracy"]) for r in points],
                             [str(r["steps"]) if r["setting"] not in ("low_res", "all") else
                              ("low-res" if r["setting"] == "low_res" else "all") for r in points]))
    xs = [r["visual_tokens"] for r in rows]
    chance = 100.0 / len(PATTERNS)
    series.append(Series(f"chance ({chance:.3g}%)", [(min(xs), chance), (max(xs), chance)]))
    return line_chart(series, path, title="held-out accuracy vs visual tokens (look-close steps marked)",
                      x_label="LLM visual tokens per image", y_label="accuracy (%)", y_range=(0, 100))


# --- pictures ------------------------------------------------------------------------------------------------
def with_box(image: Image.Image, box, colour=(0, 255, 0), width: int = 2) -> Image.Image:
    out = image.convert("RGB").copy()
    ImageDraw.Draw(out).rectangle([box[0] - width, box[1] - width, box[2] + width - 1, box[3] + width - 1],
                                  outline=colour, width=width)
    return out


def save_example(task: TaskConfig, record: dict, data: Path, path: Path) -> Path:
    """The held-out image as given and as PS3's low-res pass sees it, with the asked square enlarged in both."""
    import torch

    from vila_hd.ps3.vision import resize_image

    image = Image.open(data / record["image"]).convert("RGB")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    low = resize_image(pixels, (task.low_res, task.low_res))[0].clamp(0, 255).round().byte().permute(1, 2, 0).numpy()
    low_view = Image.fromarray(low).resize(image.size, Image.Resampling.NEAREST)
    x0, y0, x1, y1 = record["box"]
    pad = task.side // 2
    crop = (max(0, x0 - pad), max(0, y0 - pad), min(image.width, x1 + pad), min(image.height, y1 + pad))
    tile = 360
    panels = [("image (full resolution)", with_box(image, record["box"]).resize((tile, tile))),
              (f"PS3 low-res view ({task.low_res} px)", with_box(low_view, record["box"]).resize((tile, tile))),
              ("asked square, full resolution", image.crop(crop).resize((tile, tile), Image.Resampling.NEAREST)),
              ("asked square, low-res view", low_view.crop(crop).resize((tile, tile), Image.Resampling.NEAREST))]
    canvas = Image.new("RGB", (len(panels) * (tile + 8) + 8, tile + 40), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, panel) in enumerate(panels):
        x = 8 + i * (tile + 8)
        canvas.paste(panel, (x, 32))
        draw.text((x, 10), title, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def save_heatmaps(engine, record: dict, data: Path, out: Path, steps: int) -> dict[str, str]:
    """Selection heatmaps of one held-out image for its question: top-down vs bottom-up, same budget."""
    from vila_hd.visualize import selection_figure

    image_path = data / record["image"]
    image = with_box(Image.open(image_path), record["box"])
    files = {}
    for mode in ("top-down", "bottom-up"):
        sel = engine.selection(str(image_path), record["prompt"], steps=steps, mode=mode)
        figure = selection_figure(image, sel.probs, sel.maps)
        header = 28
        canvas = Image.new("RGB", (figure.width, figure.height + header), "white")
        canvas.paste(figure, (0, header))
        ImageDraw.Draw(canvas).text(
            (8, 8), f"{mode} selection, {steps} look-close step{'s' * (steps > 1)}: {record['question']} "
            f"(green box: the asked square; answer {record['answer']}, {record['category']})", fill="black")
        name = f"selection_{mode.replace('-', '_')}.png"
        canvas.save(out / name, format="PNG")
        files[mode] = name
    return files


# --- chat ----------------------------------------------------------------------------------------------------
def run_chat(model: Path, record: dict, data: Path, steps: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Answer one held-out question with ``vila-hd chat --prompt ... --json`` in a subprocess."""
    command = [sys.executable, "-m", "vila_hd", "chat", "--model", str(model), "--image", str(data / record["image"]),
               "--prompt", record["prompt"], "--json", "--steps", str(steps), "--mode", "top-down",
               "--max-new-tokens", "4", "--temperature", "0"]
    log(f"chat: python -m vila_hd chat --model {model} --image {data / record['image']} --prompt ... --json")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"vila-hd chat failed ({done.returncode}): {done.stderr[-2000:]}")
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    answer = reply["answer"].strip()
    log(f"chat: answered {answer!r} (expected {record['answer']}, {record['category']})")
    shown = ["vila-hd" if i == 0 else a for i, a in enumerate(command[2:])]
    return {"command": " ".join(_quote(a) for a in shown), "answer": answer, "expected": record["answer"],
            "correct": answer[:1] == record["answer"], "stats": reply.get("stats", {})}


def _versus_all(gap: float) -> str:
    if gap > 0:
        return f"{gap:g} points below all patches"
    return f"{-gap:g} points above all patches" if gap < 0 else "level with all patches"


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


# --- report --------------------------------------------------------------------------------------------------
def write_report(out: Path, summary: dict[str, Any]) -> Path:
    """``report.md``: task, training, the table of held-out accuracies, claims, plot, heatmaps, chat."""
    run, rows, claims = summary["run"], summary["results"], summary["claims"]
    full = next(r for r in rows if r["setting"] == "all")
    task = run["task"]
    lines = [
        "# VILA-HD demo report", "",
        f"Command: `{summary['command']}`  ",
        f"Wall time: {format_seconds(summary['wall_seconds'])} ({summary['machine']})  ",
        f"Scale: {summary['scale']} (PS3 scales {summary['model']['scales']}, {summary['model']['patch_budget']} "
        f"high-res patches per look-close step), seed {summary['seed']}"
        + (" -- **quick smoke run: a few samples and steps, the accuracies mean nothing**" if summary["quick"] else ""),
        "",
        "## Task", "",
        f"Each {task['image_size']} px image has large grey clutter and {task['squares']} squares "
        f"({task['side_cells'] * task['grid']} px), each framed in its own colour and filled with one of "
        f"{len(PATTERNS)} patterns ({', '.join(PATTERNS)}). The question names a frame colour and asks for the "
        "pattern inside; the options are always listed in the same order. A pattern's period is "
        f"{task['image_size'] // task['low_res']} px, one pixel of PS3's {task['low_res']} px low-res view, and the "
        "squares sit on the grid of the high-res patch groups, so the low-res view shows every pattern as the same "
        f"flat half-tone (largest difference {summary['data']['rule']['max_low_res_difference_levels']['task']:g} of "
        "255 levels, checked at generation) while the frame colours stay visible: low resolution can tell where "
        "the square is, not what fills it.", "",
        "![the image and PS3's low-res view](example.png)", "",
        f"Data: {summary['data']['samples']['align']} align samples (2 large squares), "
        f"{summary['data']['samples']['train']} training and {summary['data']['samples']['test']} held-out samples "
        "(separately seeded).", "",
        "## Training", "",
        "| stage | recipe | steps x batch | final LM loss | final selection loss | time |",
        "|---|---|---|---|---|---|",
    ]
    for st in summary["training"]:
        final = st["final"]
        sel = final.get("loss/selection")
        lines.append(f"| {st['stage']} | `{st['recipe']}` | {st['steps']} x {st['batch']} | "
                     f"{final.get('loss/lm', float('nan')):.3f} | {'-' if not sel else f'{sel:.3f}'} | "
                     f"{format_seconds(st['seconds'])} |")
    lines += [
        "", f"## Held-out results ({full['n']} questions, chance {100 / len(PATTERNS):.3g}%)", "",
        "| setting | look-close steps | visual tokens | share of all-patches tokens | accuracy (%) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        share = r["visual_tokens"] / full["visual_tokens"] if full["visual_tokens"] else 0.0
        lines.append(f"| {r['label']} | {r['steps']} | {r['visual_tokens']:g} | {100 * share:.1f}% | {r['accuracy']} |")
    if claims.get("top_down") and not summary["quick"]:
        best = next(r for r in rows if r["setting"] == claims["top_down"])
        lines += [
            "", f"Top-down selection at {best['steps']} look-close step(s) ({100 * claims['token_fraction']:.1f}% of "
            "the all-patches visual tokens):", "",
            f"- beats low resolution only by {claims['gain_over_low_res']:+g} points (claim: >= 20): "
            f"**{'met' if claims['beats_low_res_by_20'] else 'not met'}**",
            f"- is {_versus_all(claims['gap_to_all'])} (claim: within 5 points): "
            f"**{'met' if claims['within_5_of_all'] else 'not met'}**",
        ]
    lines += [
        "", "![accuracy vs visual tokens](accuracy_vs_tokens.png)", "",
        "## Where the model looked", "",
        f"Held-out `{summary['heatmaps']['id']}`: {summary['heatmaps']['question']} (answer "
        f"{summary['heatmaps']['answer']}). Top row: selection probability per high-res scale; bottom row: the "
        f"patches selected with {summary['heatmaps']['steps']} look-close step(s).", "",
        "Top-down (the question steers the selection):", "", f"![top-down]({summary['heatmaps']['files']['top-down']})",
        "", "Bottom-up (image saliency only):", "", f"![bottom-up]({summary['heatmaps']['files']['bottom-up']})", "",
        "## Chat", "",
        "```", summary["chat"]["command"], "```", "",
        f"Answer: `{summary['chat']['answer']}` (expected {summary['chat']['expected']}: "
        f"{'correct' if summary['chat']['correct'] else 'wrong'}).", "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# --- the demo ------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the weights and training")
    parser.add_argument("--quick", action="store_true", help="smoke run: every step on a few samples and steps")
    parser.add_argument("--scale", choices=sorted(SCALES), default="tiny",
                        help="tiny: PS3 scales 112/224/448 (CPU); real: 378/756/1512/3780 (GPU) (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for tiny, 8 for real)")


def run(args: argparse.Namespace) -> int:
    """``vila-hd demo``: every step (:func:`run_demo`) at the chosen scale; exit code 0."""
    require_extra("train", "vila-hd demo (it trains a model)", ["deepspeed"])
    run = SCALES[args.scale]
    if args.quick:
        run = quick(run)
    run = replace(run, align_task=replace(run.align_task, seed=args.seed), task=replace(run.task, seed=args.seed))
    run_demo(run, Path(args.out), seed=args.seed, scale=args.scale, quick_run=args.quick,
             threads=args.threads or run.threads, argv=_command_line(args))
    return 0


def _command_line(args: argparse.Namespace) -> list[str]:
    """The options of ``args`` that are off their defaults, as a command line (summary.json's ``command``)."""
    parser, line = DEMO.parser(), []
    for name in ("out", "seed", "quick", "scale", "threads"):
        value = getattr(args, name)
        if value != parser.get_default(name):
            line += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return line


DEMO = Command("demo", help="train a tiny VILA-HD on a synthetic high-res task and report what selection buys",
               add_arguments=add_arguments, run=run, description=__doc__.split("\n\n")[0],
               epilog="What it does and the measured results: docs/demo.md.")


def run_demo(run: RunConfig, out: Path, *, seed: int = 0, scale: str = "tiny", quick_run: bool = False,
             threads: int = 1, argv: list[str] | None = None) -> dict[str, Any]:
    """Every step of the demo (see the module docstring); returns ``summary.json``'s content."""
    import torch

    log = Log()
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    data, init = out / "data", out / "init"
    log(f"VILA-HD demo ({scale}{', quick' if quick_run else ''}) -> {out}")

    log("step 1/5: data")
    meta = generate_data(run, data, log, workers=min(os.cpu_count() or 1, 8))

    log("step 2/5: model (tokenizer trained on the task's text, random weights)")
    build_initial_model(run.model, init, seed)
    log(f"model: {init}")

    log("step 3/5: training")
    training = []
    previous = init
    for stage in STAGES:
        training.append(run_stage(stage, previous, out, data, run, seed, log))
        previous = out / stage / "final"
    model_dir = previous

    log("step 4/5: evaluation of the held-out split")
    from vila_hd.engine import Engine

    engine = Engine.from_pretrained(str(model_dir))
    rows = evaluate(engine, data, out / "eval", eval_settings(run.budgets), log)
    claims = check_claims(rows)

    log("step 5/5: report")
    records = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    shown = records[0]
    plot(rows, out / "accuracy_vs_tokens.png")
    save_example(run.task, shown, data, out / "example.png")
    heatmap_steps = min(run.budgets)
    files = save_heatmaps(engine, shown, data, out, heatmap_steps)
    chat = run_chat(model_dir, shown, data, max(run.budgets), log)
    vision = engine.model.config.vision_config
    summary = {
        "command": "python -m vila_hd.demo " + " ".join(argv or []),
        "scale": scale, "quick": quick_run, "seed": seed,
        "machine": f"{os.cpu_count()} CPU cores, {threads} torch thread(s)"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "run": asdict(run),
        "model": {"scales": list(vision.ps3_scales), "patch_budget": int(vision.max_select_num),
                  "path": str(model_dir)},
        "data": meta, "training": training, "results": rows, "claims": claims,
        "heatmaps": {"id": shown["id"], "question": shown["question"], "answer": shown["answer"],
                     "steps": heatmap_steps, "files": files},
        "chat": chat,
    }
    summary["wall_seconds"] = round(log.elapsed, 1)
    write_report(out, summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = "\n".join(f"  {r['label']:<22} {r['visual_tokens']:>7g} tokens  {r['accuracy']:>6}%" for r in rows)
    log(f"held-out accuracy:\n{table}")
    if quick_run:
        log("quick run: a few samples and steps, so no accuracy claims")
    elif claims.get("top_down"):
        log(f"claims ({claims['top_down']}): {claims['gain_over_low_res']:+g} points over low-res only (>= 20: "
            f"{claims['beats_low_res_by_20']}), {_versus_all(claims['gap_to_all'])} (within 5: "
            f"{claims['within_5_of_all']})")
    log(f"report: {out / 'report.md'}")
    log(f"total wall time {format_seconds(log.elapsed)}")
    return summary


if __name__ == "__main__":
    sys.exit(guarded(DEMO.main))
