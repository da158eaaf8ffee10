"""Seeded synthetic box-caption data for tests and the CPU demo of PS3 pre-training.

Scenes use the synthetic benchmark's drawing (:mod:`vila_hd.scenes`: its cluttered gradient background,
turned grey, its shape drawing and non-overlapping placement); on top of the clutter a few small shapes of distinct
colours are drawn, each with a box and a local caption ("a red circle"), and the image gets a global caption listing them. A
word-level tokenizer covering the vocabulary can be written next to the data, so the demo needs no download.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from vila_hd import scenes
from vila_hd.ps3 import PS3Config
from vila_hd.ps3.configuration import tiny_text_config, tiny_vision_config

__all__ = [
    "COLORS",
    "SHAPES",
    "make_records",
    "render_scene",
    "tiny_ps3_config",
    "vocabulary",
    "write_dataset",
    "write_word_tokenizer",
]

COLORS: dict[str, tuple[int, int, int]] = {k: v for k, v in scenes.OBJECT_COLOURS.items() if k != "black"}
SHAPES: tuple[str, ...] = tuple(scenes.SHAPES)
_FILLER = ("a", "scene", "with", "and")


def vocabulary() -> list[str]:
    """Every word the captions use."""
    return list(_FILLER) + list(COLORS) + list(SHAPES)


def render_scene(
    rng: random.Random, size: int, n_objects: int = 3, object_frac: tuple[float, float] = (0.1, 0.18),
    clutter: float = 0.5,
) -> tuple[Image.Image, list[tuple[tuple[float, float, float, float], str, str]]]:
    """One ``size`` x ``size`` scene (grey clutter, coloured shapes); returns the image and (box XYXY, colour, shape)
    per shape."""
    if n_objects > len(COLORS):
        raise ValueError(f"n_objects={n_objects} exceeds the {len(COLORS)} distinct colours")
    # The benchmark's clutter in grey: the captions name colours, so only the captioned shapes carry any.
    image = scenes.draw_background(rng, size, clutter).convert("L").convert("RGB")
    draw = ImageDraw.Draw(image)
    placer = scenes.Placer(rng, size, margin=max(2, size // 100))
    objects = []
    for colour in rng.sample(list(COLORS), n_objects):
        side = int(size * rng.uniform(*object_frac))
        box = placer.place(side, side)
        if box is None:
            raise RuntimeError(f"no room for {n_objects} objects of {object_frac} of a {size}-px image")
        shape = rng.choice(SHAPES)
        scenes.draw_shape(draw, shape, box, COLORS[colour])
        objects.append((tuple(float(v) for v in box), colour, shape))
    return image, objects


def make_records(
    n: int,
    seed: int = 0,
    size: int | tuple[int, int] | tuple[tuple[int, int], tuple[int, int]] = 448,
    n_objects: int = 3,
    clutter: float = 0.5,
) -> list[dict[str, Any]]:
    """``n`` in-memory records ``{"image": PIL, "global_caption", "boxes": [{"box", "caption"}]}``.

    ``size`` is a side, (width, height), or ((min_w, max_w), (min_h, max_h)) for images of varying shape;
    ``clutter`` scales the background's decoy shapes (:func:`vila_hd.scenes.draw_background`).
    """
    if isinstance(size, int):
        size = (size, size)
    records = []
    for i in range(n):
        rng = random.Random(f"ps3-pretrain-synth:{seed}:{i}")
        width, height = (rng.randint(s[0], s[1]) if isinstance(s, (tuple, list)) else int(s) for s in size)
        side = max(width, height)
        image, objects = render_scene(rng, side, n_objects, clutter=clutter)
        if (width, height) != (side, side):  # a non-square image: squash the scene and its boxes
            image = image.resize((width, height), Image.Resampling.BICUBIC)
            sx, sy = width / side, height / side
            objects = [((b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy), c, s) for b, c, s in objects]
        names = [f"a {color} {shape}" for _, color, shape in objects]
        records.append({
            "image": image,
            "global_caption": "a scene with " + ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + names[-1],
            "boxes": [{"box": list(box), "caption": name} for (box, _, _), name in zip(objects, names)],
        })
    return records


def write_dataset(out_dir: str | os.PathLike, n: int, seed: int = 0, **kwargs) -> Path:
    """Write ``images/NNNNNN.png`` and ``data.jsonl`` (relative image paths) under ``out_dir``; returns the JSONL."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, record in enumerate(make_records(n, seed, **kwargs)):
        name = f"images/{i:06d}.png"
        record["image"].save(out / name)
        lines.append(json.dumps({**record, "image": name}))
    path = out / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_word_tokenizer(out_dir: str | os.PathLike, words: list[str] | None = None) -> Path:
    """A Hugging Face fast tokenizer (word level, [PAD]=0, [UNK]=1, [SEP]=2 appended) over ``words``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = words or vocabulary()
    vocab = {"[PAD]": 0, "[UNK]": 1, "[SEP]": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A [SEP]", special_tokens=[("[SEP]", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", sep_token="[SEP]")
    out = Path(out_dir)
    fast.save_pretrained(out)
    return out


def tiny_ps3_config(
    scales: tuple[int, ...] = (112, 224, 448), max_select_num: int = 160, context_length: int = 8
) -> PS3Config:
    """A tiny PS3 (width 32, 4 + 2 layers) on an 8 x 8 low-res grid for the synthetic data; its text tower fits the
    word tokenizer of :func:`write_word_tokenizer`."""
    vision = tiny_vision_config(
        list(scales), max_select_num=max_select_num, highres_selection_image_size=2 * scales[0],
        highres_selection_module_kernel_size=14,
    )
    text = tiny_text_config(vocab_size=len(vocabulary()) + 3, context_length=context_length)
    return PS3Config(vision_config=vision.to_dict(), text_config=text.to_dict())
