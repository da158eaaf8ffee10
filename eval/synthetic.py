"""A synthetic high-resolution benchmark whose questions cannot be answered from the low-resolution view.

    vila-hd synth --out data/synth4k --image-size 3780 --low-res 378 --train 2000 --test 300
    vila-hd synth --out data/synth-tiny --image-size 448 --low-res 112 --train 64 --test 16   # tiny demo scale

Each image is a cluttered scene (large shapes visible at any resolution, many small look-alike decoys) with
one *target*: a small object, a short string of small text on a label, or a patch of a fine pattern. The
question is about the target's fine detail (which shape, which string, which pattern), multiple-choice or short
answer, and comes with the target's box ``[x1, y1, x2, y2]`` in image pixels.

The invisibility rule. A target's *critical size* ``c`` is the size of the detail the answer depends on: the
ink height of the text, the side of the object, the period of the pattern. Seen at the low resolution ``L``
(the encoder's low-res view, 378 px for PS3; 112 for the tiny models) an ``S``-pixel image is scaled by ``L/S``
and the detail spans ``c * L / S`` low-res pixels. Every target satisfies

    text    c * L / S <= 2.5 glyphs under 3 pixels tall cannot be read (the smallest pixel fonts need 5+ rows)
    object  c * L / S <= 2   a 2x2 blob keeps its colour but not its shape (circle / square / triangle ...)
    pattern c * L / S <= 1   a whole period of the pattern falls inside one low-res pixel, so any area-averaging
                             downscale turns every pattern into the same flat colour

while at full resolution the detail is at least the legible size (text 7 px, objects 6 px, pattern period 4 px).
Decoys make the coarse cue useless: the question names the target by something visible at low resolution (the
label's or square's colour, or a shape that only the target has) but the answer needs the detail; the other
options are details that occur elsewhere in the image. At 1512 px with a 378 px view (scale 1/4) text is at
most 10 px tall, objects at most 8 px and pattern periods exactly 4 px; at 3780 px (scale 1/10) up to 25, 20 and
10 px.

Each sample also records the *required resolution*: the image side at which the detail reaches its legible
size (``S * legible / c``), bucketed 1K / 2K / 4K like 4KPro, and a difficulty (``hard`` when the detail is
within 25% of the legible size at full resolution, ``medium`` within 2x, else ``easy``).

Splits are seeded independently (``seed``, split, index) so any sample can be regenerated alone; the text
strings of the held-out split never occur in the training split (the string space is partitioned by a hash).
Output (``--out``):

    images/<split>/<id>.png     the images
    <split>.json                LLaVA-format grounded samples: {"id", "image", "box", "conversations"}
    <split>_eval.jsonl          the evaluation file (generic JSONL of ``vila-hd eval --benchmark jsonl``)
    meta.json                   the settings, the rule and counts per category / difficulty / bucket
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import string
import sys
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vila_hd.scenes import OBJECT_COLOURS, SHAPES, Placer, draw_background, draw_shape

CATEGORIES = ("text", "object", "pattern")
# Largest size of the critical detail in low-resolution pixels (the invisibility rule; see the module docstring).
MAX_LOW_RES_PX = {"text": 2.5, "object": 2.0, "pattern": 1.0}
# Smallest size of the critical detail in full-resolution pixels (legible when looked at closely).
MIN_LEGIBLE_PX = {"text": 7, "object": 6, "pattern": 4}
# The detail is never made larger than this (in full-resolution pixels), whatever the scale allows.
MAX_DETAIL_PX = {"text": 30, "object": 20, "pattern": 10}
SPLITS = ("train", "test")
TEXT_ALPHABET = "ACDEFHJKLMNPRTUVWXY345679"  # no look-alikes (0/O, 1/I, 2/Z, 5/S, 8/B, 6/G)
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."

LABEL_COLOURS = {"yellow": (255, 232, 110), "pink": (255, 175, 200), "cyan": (160, 225, 255),
                 "green": (170, 235, 160), "orange": (255, 195, 130), "lavender": (205, 185, 255),
                 "white": (250, 250, 250)}
PATTERNS = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard")
PAD_COLOUR = (215, 215, 215)


@dataclass(frozen=True)
class SynthConfig:
    """Generator settings. ``image_size`` / ``low_res`` set the scale of the invisibility rule."""

    image_size: int = 1512
    low_res: int = 378
    train: int = 100
    test: int = 50
    seed: int = 0
    categories: tuple[str, ...] = CATEGORIES
    mc_fraction: float = 0.5  # share of multiple-choice questions (the rest are short answers)
    clutter: float = 1.0  # density of large shapes and decoys
    image_format: str = "png"

    def __post_init__(self):
        if self.low_res < 1 or self.image_size <= self.low_res:
            raise ValueError(f"image_size ({self.image_size}) must be larger than low_res ({self.low_res})")
        unknown = set(self.categories) - set(CATEGORIES)
        if unknown or not self.categories:
            raise ValueError(f"categories must be a non-empty subset of {CATEGORIES}, got {self.categories}")
        if not 0.0 <= self.mc_fraction <= 1.0:
            raise ValueError(f"mc_fraction must be in [0, 1], got {self.mc_fraction}")
        if self.image_format not in ("png", "jpg"):
            raise ValueError(f"image_format must be png or jpg, got {self.image_format!r}")
        for category in self.categories:
            low, high = detail_range(category, self.image_size, self.low_res)
            if low > high:
                raise ValueError(
                    f"category {category!r} is impossible at {self.image_size} px with a {self.low_res} px low-res "
                    f"view: its detail must be >= {MIN_LEGIBLE_PX[category]} px to be legible but <= {high} px to "
                    f"stay invisible; use a larger image_size or leave the category out")

    @property
    def scale(self) -> float:
        return self.low_res / self.image_size


def detail_range(category: str, image_size: int, low_res: int) -> tuple[int, int]:
    """Allowed critical sizes (full-resolution pixels) of a category's target at this scale."""
    high = math.floor(MAX_LOW_RES_PX[category] * image_size / low_res + 1e-9)
    return MIN_LEGIBLE_PX[category], min(high, MAX_DETAIL_PX[category])


def is_invisible(category: str, critical_px: float, image_size: int, low_res: int) -> bool:
    """The documented rule: the critical detail spans at most ``MAX_LOW_RES_PX[category]`` low-res pixels."""
    return critical_px * low_res / image_size <= MAX_LOW_RES_PX[category] + 1e-9


def required_resolution(category: str, critical_px: float, image_size: int) -> float:
    """The image side at which the detail reaches its legible size."""
    return image_size * MIN_LEGIBLE_PX[category] / critical_px


def resolution_bucket(side: float) -> str:
    return "1K" if side <= 1024 else "2K" if side <= 2048 else "4K"


def difficulty(category: str, critical_px: float) -> str:
    ratio = critical_px / MIN_LEGIBLE_PX[category]
    return "hard" if ratio <= 1.25 else "medium" if ratio <= 2.0 else "easy"


# --- drawing helpers (shapes, background, placement: vila_hd.scenes) -------------------------------------
@functools.lru_cache(maxsize=128)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _font_for_height(text: str, height: int) -> tuple[Any, int, tuple[int, int, int, int]]:
    """The largest font whose ink height for ``text`` is at most ``height``: ``(font, ink height, bbox)``."""
    best = None
    for size in range(4, 4 * height + 8):
        font = _font(size)
        bbox = font.getbbox(text)
        ink = bbox[3] - bbox[1]
        if ink > height:
            break
        best = (font, ink, bbox)
    if best is None:
        raise ValueError(f"no font renders {text!r} within {height} px")
    return best


def pattern_array(kind: str, size: int, width: int, colour, background=(255, 255, 255)) -> np.ndarray:
    """(size, size, 3) uint8 patch: stripes / checks of ``width`` pixels (period ``2 * width``)."""
    y, x = np.mgrid[0:size, 0:size]
    if kind == "horizontal stripes":
        on = (y // width) % 2 == 0
    elif kind == "vertical stripes":
        on = (x // width) % 2 == 0
    elif kind == "diagonal stripes":
        on = ((x + y) // width) % 2 == 0
    elif kind == "checkerboard":
        on = ((x // width) + (y // width)) % 2 == 0
    else:
        raise ValueError(f"unknown pattern {kind!r}")
    out = np.empty((size, size, 3), np.uint8)
    out[:] = background
    out[on] = colour
    return out


# --- targets ---------------------------------------------------------------------------------------------
@dataclass
class Target:
    category: str
    question: str
    answer: str  # the correct option's text / the short answer
    distractors: list[str]  # other plausible answers, present in the image where possible
    box: tuple[int, int, int, int]
    critical_px: float


def _decoy_count(size: int, clutter: float, cap: int = 300) -> int:
    return max(6, min(cap, int(10 * clutter * (size / 448) ** 2)))


def _split_of_string(text: str) -> str:
    return "test" if zlib.crc32(text.encode()) % 4 == 0 else "train"


def _string(rng: random.Random, split: str, avoid: set[str]) -> str:
    while True:
        text = "".join(rng.choice(TEXT_ALPHABET) for _ in range(rng.randint(3, 4)))
        if text not in avoid and _split_of_string(text) == split:
            return text


def _text_target(rng, image, placer, config: SynthConfig, split: str) -> Target:
    draw = ImageDraw.Draw(image)
    low, high = detail_range("text", config.image_size, config.low_res)
    colours = list(LABEL_COLOURS)
    rng.shuffle(colours)
    target_colour, others = colours[0], colours[1:]
    strings: set[str] = set()
    decoy_strings = []
    n = _decoy_count(config.image_size, config.clutter, cap=120)
    labels = [(target_colour, True)] + [(rng.choice(others), False) for _ in range(n)]
    target = None
    for colour, is_target in labels:
        text = _string(rng, split, strings)
        font, ink, bbox = _font_for_height(text, rng.randint(low, high))
        if ink < MIN_LEGIBLE_PX["text"]:
            font, ink, bbox = _font_for_height(text, high)
        pad = max(2, ink // 3)
        w, h = bbox[2] - bbox[0] + 2 * pad, ink + 2 * pad
        box = placer.place(w, h)
        if box is None:
            if is_target:
                raise RuntimeError("no room for the target label; lower the clutter")
            continue
        strings.add(text)
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=LABEL_COLOURS[colour])
        draw.text((box[0] + pad - bbox[0], box[1] + pad - bbox[1]), text, font=font, fill=(0, 0, 0))
        if is_target:
            target = (text, box, ink)
        else:
            decoy_strings.append(text)
    text, box, ink = target
    while len(decoy_strings) < 3:  # too crowded for decoys: still offer three other strings
        decoy_strings.append(_string(rng, split, strings | set(decoy_strings)))
    template = rng.choice(("What is written on the small {c} label?", "Read the text on the small {c} label.",
                           "Which code is printed on the tiny {c} tag?"))
    return Target("text", template.format(c=target_colour), text, decoy_strings, box, float(ink))


def _object_target(rng, image, placer, config: SynthConfig, split: str) -> Target:
    draw = ImageDraw.Draw(image)
    low, high = detail_range("object", config.image_size, config.low_res)
    size = rng.randint(low, high)
    ask_colour = rng.random() < 0.5
    shape, colour = rng.choice(SHAPES), rng.choice(list(OBJECT_COLOURS))
    if ask_colour:  # the target is the only object of its shape; decoys have every colour
        decoys = [(rng.choice([s for s in SHAPES if s != shape]), rng.choice(list(OBJECT_COLOURS)))
                  for _ in range(_decoy_count(config.image_size, config.clutter))]
    else:  # the target is the only object of its colour; decoys have every shape
        decoys = [(rng.choice(SHAPES), rng.choice([c for c in OBJECT_COLOURS if c != colour]))
                  for _ in range(_decoy_count(config.image_size, config.clutter))]
    target_box = None
    for kind, name, is_target in [(shape, colour, True)] + [(k, c, False) for k, c in decoys]:
        pad = max(1, size // 4)
        box = placer.place(size + 2 * pad, size + 2 * pad)
        if box is None:
            if is_target:
                raise RuntimeError("no room for the target object; lower the clutter")
            continue
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=PAD_COLOUR)
        draw_shape(draw, kind, (box[0] + pad, box[1] + pad, box[0] + pad + size, box[1] + pad + size),
               OBJECT_COLOURS[name])
        if is_target:
            target_box = box
    if ask_colour:
        question = rng.choice(("What color is the small {s}?", "Which color does the tiny {s} have?")).format(s=shape)
        return Target("object", question, colour, [c for c in OBJECT_COLOURS if c != colour], target_box, float(size))
    question = rng.choice(("What shape is the small {c} object?", "Which shape has the tiny {c} mark?")).format(c=colour)
    return Target("object", question, shape, [s for s in SHAPES if s != shape], target_box, float(size))


def _pattern_target(rng, image, placer, config: SynthConfig, split: str) -> Target:
    low, high = detail_range("pattern", config.image_size, config.low_res)
    width = rng.randint(math.ceil(low / 2), high // 2)  # stripe width; the period is twice that
    period = 2 * width
    side = max(4 * period, 12)
    colours = list(OBJECT_COLOURS)
    rng.shuffle(colours)
    kind = rng.choice(PATTERNS)
    items = [(colours[0], kind, True)] + [(rng.choice(colours[1:]), rng.choice(PATTERNS), False)
                                         for _ in range(_decoy_count(config.image_size, config.clutter, cap=150))]
    target_box = None
    for colour, pattern, is_target in items:
        box = placer.place(side, side)
        if box is None:
            if is_target:
                raise RuntimeError("no room for the target pattern; lower the clutter")
            continue
        image.paste(Image.fromarray(pattern_array(pattern, side, width, OBJECT_COLOURS[colour])), box[:2])
        if is_target:
            target_box = box
    question = rng.choice(("What is the fine pattern inside the small {c} square?",
                           "Which pattern fills the tiny {c} square?")).format(c=colours[0])
    return Target("pattern", question, kind, [p for p in PATTERNS if p != kind], target_box, float(period))


_TARGETS = {"text": _text_target, "object": _object_target, "pattern": _pattern_target}


# --- samples ---------------------------------------------------------------------------------------------
def generate_sample(config: SynthConfig, split: str, index: int) -> tuple[Image.Image, dict[str, Any]]:
    """The image and the description of sample ``index`` of ``split`` (the same for the same config)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"vila-hd-synth:{config.seed}:{split}:{index}")
    category = config.categories[index % len(config.categories)]
    image = draw_background(rng, config.image_size, config.clutter)
    margin = max(2, config.image_size // 300)
    target = _TARGETS[category](rng, image, Placer(rng, config.image_size, margin), config, split)
    if not (is_invisible(category, target.critical_px, config.image_size, config.low_res)
            and target.critical_px >= MIN_LEGIBLE_PX[category]):  # pragma: no cover - guaranteed by detail_range
        raise AssertionError(f"{category} target of {target.critical_px} px breaks the size rules")
    sample_id = f"synth-{split}-{index:06d}"
    multiple_choice = rng.random() < config.mc_fraction
    record: dict[str, Any] = {"id": sample_id, "image": f"images/{split}/{sample_id}.{config.image_format}",
                              "question": target.question, "category": category}
    if multiple_choice:
        distractors = rng.sample(target.distractors, min(3, len(target.distractors)))
        options = distractors + [target.answer]
        rng.shuffle(options)
        record.update(options=options, answer=string.ascii_uppercase[options.index(target.answer)])
    else:
        record["answer"] = target.answer
    required = required_resolution(category, target.critical_px, config.image_size)
    record.update(
        resolution=resolution_bucket(required), difficulty=difficulty(category, target.critical_px),
        box=list(target.box), image_size=[config.image_size, config.image_size], critical_px=target.critical_px,
        low_res_px=round(target.critical_px * config.scale, 3), required_resolution=round(required, 1),
        answer_text=target.answer,
    )
    return image, record


def eval_prompt(record: dict[str, Any]) -> str:
    """The question as asked (options and instruction included), as the eval harness builds it."""
    if record.get("options"):
        lines = [f"{string.ascii_uppercase[i]}. {o}" for i, o in enumerate(record["options"])]
        return "\n".join([record["question"], *lines, MC_INSTRUCTION])
    return f"{record['question']}\n{SHORT_INSTRUCTION}"


def llava_record(record: dict[str, Any]) -> dict[str, Any]:
    """The LLaVA-format grounded training sample of an evaluation record."""
    return {"id": record["id"], "image": record["image"], "box": record["box"],
            "conversations": [{"from": "human", "value": "<image>\n" + eval_prompt(record)},
                              {"from": "gpt", "value": record["answer"]}]}


def generate(config: SynthConfig, out: str | Path, progress: bool = False) -> dict[str, Any]:
    """Write the benchmark (see the module docstring) to ``out`` and return ``meta.json``'s content."""
    out = Path(out)
    counts: dict[str, Any] = {}
    for split in SPLITS:
        n = getattr(config, split)
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(n):
            image, record = generate_sample(config, split, i)
            path = out / record["image"]
            if config.image_format == "png":
                image.save(path, format="PNG", compress_level=1)
            else:
                image.save(path, format="JPEG", quality=95, subsampling=0)
            records.append(record)
            if progress:
                print(f"\r{split}: {i + 1}/{n}", end="", file=sys.stderr, flush=True)
        if progress and n:
            print(file=sys.stderr)
        with open(out / f"{split}_eval.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        (out / f"{split}.json").write_text(json.dumps([llava_record(r) for r in records], indent=1) + "\n",
                                           encoding="utf-8")
        counts[split] = {
            "samples": n,
            "category": dict(Counter(r["category"] for r in records)),
            "difficulty": dict(Counter(r["difficulty"] for r in records)),
            "resolution": dict(Counter(r["resolution"] for r in records)),
            "multiple_choice": sum("options" in r for r in records),
        }
    meta = {"config": asdict(config), "scale": config.scale,
            "rule": {"max_low_res_px": MAX_LOW_RES_PX, "min_legible_px": MIN_LEGIBLE_PX,
                     "detail_range_px": {c: detail_range(c, config.image_size, config.low_res)
                                         for c in config.categories}},
            "counts": counts}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def low_res_view(image: Image.Image, low_res: int) -> Image.Image:
    """The image as the low-resolution view sees it (area-averaging downscale)."""
    return image.resize((low_res, low_res), Image.Resampling.BOX)


# --- CLI -------------------------------------------------------------------------------------------------
# ``vila-hd synth`` (vila_hd.eval.cli.SYNTH): its help texts, arguments and run.
DESCRIPTION = __doc__.split("\n\n")[0]
EPILOG = "The invisibility rule and the file formats: docs/evaluation.md."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--image-size", type=int, default=1512, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--low-res", type=int, default=378,
                        help="side of the low-resolution view the targets must be invisible at (default: %(default)s)")
    parser.add_argument("--train", type=int, default=100, help="training samples (default: %(default)s)")
    parser.add_argument("--test", type=int, default=50, help="held-out samples (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--categories", default=",".join(CATEGORIES),
                        help="comma-separated subset of %(default)s")
    parser.add_argument("--mc-fraction", type=float, default=0.5,
                        help="share of multiple-choice questions (default: %(default)s)")
    parser.add_argument("--clutter", type=float, default=1.0, help="density of clutter and decoys (default: 1)")
    parser.add_argument("--format", choices=["png", "jpg"], default="png", help="image format (default: png)")


def run(args: argparse.Namespace) -> int:
    """``vila-hd synth``: write the benchmark to ``--out``; exit code 0 (a bad setting is a usage error)."""
    from vila_hd.arguments import UsageError

    if args.train < 0 or args.test < 0:
        raise UsageError("--train and --test must be >= 0")
    try:
        config = SynthConfig(image_size=args.image_size, low_res=args.low_res, train=args.train, test=args.test,
                             seed=args.seed, categories=tuple(c.strip() for c in args.categories.split(",") if c.strip()),
                             mc_fraction=args.mc_fraction, clutter=args.clutter, image_format=args.format)
    except ValueError as err:
        raise UsageError(str(err)) from None
    meta = generate(config, args.out, progress=sys.stderr.isatty())
    print(json.dumps(meta["counts"], indent=2))
    return 0
