"""Box-caption data for PS3 localized contrastive pre-training (reference spec §10).

A *record* is one image with an optional global caption and a list of (box, local caption) pairs, boxes in
original pixels as ``[x0, y0, x1, y1]``. On disk records are JSONL, one image per line::

    {"image": "imgs/0001.jpg", "global_caption": "A street at night ...",
     "boxes": [{"box": [12, 40, 230, 310], "caption": "A red neon sign reading ..."}, ...]}

The reference's field names (``global_text``, parallel ``box`` / ``text`` lists) are accepted too, and so is any
sequence of such mappings (a ``datasets.Dataset`` whose ``image`` column holds PIL images, for instance).

A *sample* is one image + one caption: with probability ``global_caption_prob`` (0.25 in the paper) the global
caption, else one local caption drawn uniformly. The image and the box go through one joint
RandomResizedCrop (scale 0.9-1.0, bicubic) to a ``size`` x ``size`` square. Samples hold the box, not the
selection map: :func:`gt_selection_map` defines the map (pixels the box touches; the whole image for a global
caption) and :func:`box_maps_for_grids` builds a compact map on the device that every PS3 grid reads exactly
as it would read the full-resolution one.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from vila_hd.errors import VilaHDError
from vila_hd.images import load_image

__all__ = [
    "CAPTION_CLEANUPS",
    "BoxCaption",
    "BoxCaptionDataset",
    "BoxCaptionRecord",
    "RecordError",
    "box_maps_for_grids",
    "build_caption_cleanup",
    "collate_box_caption",
    "gt_selection_map",
    "parse_record",
    "random_resized_crop_with_box",
    "read_jsonl",
]


class RecordError(VilaHDError):
    """A box-caption record is malformed; the message names the record (file:line or index) and the field."""


@dataclass(frozen=True)
class BoxCaption:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original pixels
    caption: str


@dataclass
class BoxCaptionRecord:
    """One image with its captions. ``image`` is a path (resolved against ``image_root``) or any source
    :func:`vila_hd.images.load_image` accepts; ``where`` names the record in error messages."""

    image: Any
    global_caption: str | None = None
    boxes: list[BoxCaption] = field(default_factory=list)
    where: str = "record"
    root: str | None = None  # directory relative image paths are resolved against (and must stay inside)


# --- parsing ---------------------------------------------------------------------------------------------------------
def parse_record(raw: Mapping[str, Any], where: str = "record") -> BoxCaptionRecord:
    """Validate one raw mapping (our field names or the reference's) into a :class:`BoxCaptionRecord`."""
    if not isinstance(raw, Mapping):
        raise RecordError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("image") is None:
        raise RecordError(f"{where}: missing 'image'")
    global_caption = raw.get("global_caption", raw.get("global_text"))
    if global_caption is not None and not isinstance(global_caption, str):
        raise RecordError(f"{where}: 'global_caption' must be a string, got {type(global_caption).__name__}")
    if global_caption is not None and not global_caption.strip():
        global_caption = None
    boxes = [_parse_box(item, f"{where}: boxes[{i}]") for i, item in enumerate(_raw_boxes(raw, where))]
    if global_caption is None and not boxes:
        raise RecordError(f"{where}: has neither a global caption nor any (box, caption) pair")
    return BoxCaptionRecord(image=raw["image"], global_caption=global_caption, boxes=boxes, where=where)


def _raw_boxes(raw: Mapping[str, Any], where: str) -> list[Any]:
    if "boxes" in raw:
        items = raw["boxes"]
        if not isinstance(items, (list, tuple)):
            raise RecordError(f"{where}: 'boxes' must be a list, got {type(items).__name__}")
        return list(items)
    if "box" in raw or "text" in raw:  # the reference's parallel lists
        box, text = raw.get("box"), raw.get("text")
        box = [box] if box and not isinstance(box[0], (list, tuple)) else (box or [])
        text = [text] if isinstance(text, str) else (text or [])
        if len(box) != len(text):
            raise RecordError(f"{where}: 'box' has {len(box)} entries but 'text' has {len(text)}")
        return [{"box": b, "caption": t} for b, t in zip(box, text)]
    return []


def _parse_box(item: Any, where: str) -> BoxCaption:
    if not isinstance(item, Mapping) or "box" not in item or "caption" not in item:
        raise RecordError(f"{where}: expected {{'box': [x0, y0, x1, y1], 'caption': str}}, got {item!r:.120}")
    box, caption = item["box"], item["caption"]
    if not isinstance(caption, str) or not caption.strip():
        raise RecordError(f"{where}: 'caption' must be a non-empty string, got {caption!r:.80}")
    ok = isinstance(box, (list, tuple)) and len(box) == 4
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
    if not ok:
        raise RecordError(f"{where}: 'box' must be 4 finite numbers [x0, y0, x1, y1], got {box!r:.80}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise RecordError(f"{where}: 'box' {list(box)} is empty (need x1 > x0 and y1 > y0, XYXY pixels)")
    return BoxCaption((x0, y0, x1, y1), caption)


def read_jsonl(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[BoxCaptionRecord]:
    """Read and validate every line of a JSONL file (blank lines skipped); errors name ``file:line``.

    Relative image paths are resolved against ``image_root`` (default: the file's directory).
    """
    root = os.path.realpath(image_root if image_root is not None else os.path.dirname(os.path.abspath(path)))
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{os.fspath(path)}:{lineno}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: invalid JSON ({e.msg})") from None
            record = parse_record(raw, where)
            record.root = root
            records.append(record)
    if not records:
        raise RecordError(f"{os.fspath(path)}: no records")
    return records


class LazyRecords:
    """A sequence of raw mappings (a ``datasets.Dataset``, a list of dicts) parsed one record at a time on access,
    so that a large memory-mapped dataset is never decoded up front."""

    def __init__(self, source: Any, name: str = "record"):
        self.source, self.name = source, name

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> BoxCaptionRecord:
        raw = self.source[index]
        return raw if isinstance(raw, BoxCaptionRecord) else parse_record(raw, f"{self.name} {index}")


def as_records(source: Any, image_root: str | os.PathLike | None = None) -> Any:
    """Records from a JSONL path, a list of JSONL paths, or a sequence of records / raw mappings (parsed lazily).

    ``image_root`` replaces each JSONL's own directory as the root of relative image paths.
    """
    if isinstance(source, (str, os.PathLike)):
        return read_jsonl(source, image_root)
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, (str, os.PathLike)) for s in source):
        return [record for path in source for record in read_jsonl(path, image_root)]
    return LazyRecords(source)


# --- caption clean-up hooks -----------------------------------------------------------------------------------------
_SENTENCE_END = re.compile(r"(?<=[.!?]) +")
CaptionHook = Callable[[str, random.Random], str]


def strip_closeup_prefix(text: str, rng: random.Random) -> str:
    """Drop the captioner's 'The (second) image is a close-up of' lead-in."""
    for prefix in ("The second image is a close-up of", "The image is a close-up of"):
        text = text.replace(prefix, "")
    return text.strip()


def drop_visible_text_sentence(text: str, rng: random.Random) -> str:
    """Drop a trailing sentence about (absent) visible text, the captioner's boilerplate."""
    sentences = _SENTENCE_END.split(text)
    if len(sentences) > 1 and "text" in sentences[-1] and "visible" in sentences[-1]:
        sentences = sentences[:-1]
    return " ".join(sentences)


def sentence_masking(text: str, rng: random.Random) -> str:
    """Keep a random contiguous run of sentences starting at one of the first three (a caption augmentation)."""
    sentences = _SENTENCE_END.split(text)
    start = rng.randint(0, min(len(sentences) - 1, 2))
    count = rng.randint(1, max(len(sentences) - start, 1))
    return " ".join(sentences[start : start + count])


def collapse_whitespace(text: str, rng: random.Random) -> str:
    return " ".join(text.split())


CAPTION_CLEANUPS: dict[str, CaptionHook] = {
    "strip_closeup_prefix": strip_closeup_prefix,
    "drop_visible_text_sentence": drop_visible_text_sentence,
    "sentence_masking": sentence_masking,
    "collapse_whitespace": collapse_whitespace,
}


def build_caption_cleanup(steps: Sequence[str | CaptionHook] = ()) -> Callable[[str, random.Random], str]:
    """Chain clean-up hooks given by name (see :data:`CAPTION_CLEANUPS`) or as ``f(text, rng) -> text``."""
    hooks = []
    for step in steps:
        if callable(step):
            hooks.append(step)
        elif step in CAPTION_CLEANUPS:
            hooks.append(CAPTION_CLEANUPS[step])
        else:
            raise ValueError(f"unknown caption clean-up {step!r}; known: {sorted(CAPTION_CLEANUPS)}")

    def cleanup(text: str, rng: random.Random) -> str:
        for hook in hooks:
            text = hook(text, rng)
        return text

    return cleanup


# --- joint image + box transform ------------------------------------------------------------------------------------
def sample_crop(
    width: int, height: int, rng: random.Random, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's crop (left, top, w, h): area fraction in ``scale``, log-uniform aspect in ``ratio``,
    ten tries, then a centre crop clamped to ``ratio`` (torchvision's rule)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop_with_box(
    image: Image.Image,
    box: tuple[float, float, float, float] | None,
    size: int,
    rng: random.Random,
    scale=(0.9, 1.0),
    ratio=(3 / 4, 4 / 3),
) -> tuple[Image.Image, tuple[float, float, float, float] | None]:
    """Crop + bicubic resize to ``size`` x ``size``, moving ``box`` with the image and clipping it to the crop.

    When the crop would cut the box away entirely, the whole image is used instead (the caption must keep
    describing something visible).
    """
    left, top, w, h = sample_crop(image.width, image.height, rng, scale, ratio)
    moved = _move_box(box, left, top, w, h, size) if box is not None else None
    if box is not None and moved is None:
        left, top, w, h = 0, 0, image.width, image.height
        moved = _move_box(box, left, top, w, h, size)
    out = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    return out, moved


def _move_box(box, left, top, w, h, size):
    sx, sy = size / w, size / h
    x0 = min(max((box[0] - left) * sx, 0.0), size)
    y0 = min(max((box[1] - top) * sy, 0.0), size)
    x1 = min(max((box[2] - left) * sx, 0.0), size)
    y1 = min(max((box[3] - top) * sy, 0.0), size)
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1, y1)


# --- GT selection maps ----------------------------------------------------------------------------------------------
def gt_selection_map(box: Sequence[float] | None, height: int, width: int) -> torch.Tensor:
    """The reference definition at input resolution: 1 on every pixel the box touches, (H, W) float.

    ``box=None`` (a global caption) marks the whole image.
    """
    out = torch.zeros(height, width)
    if box is None:
        return out.fill_(1.0)
    x0, y0, x1, y1 = box
    out[math.floor(y0) : math.ceil(y1), math.floor(x0) : math.ceil(x1)] = 1.0
    return out


def box_maps_for_grids(boxes: torch.Tensor, image_hw: tuple[int, int], grids: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(B, 4) XYXY pixel boxes -> (B, m_h, m_w) 0/1 maps equivalent to :func:`gt_selection_map` for PS3.

    PS3 only reads a GT map through ``area`` resizing to its patch grids followed by ``> 0``. When every grid
    divides a common resolution ``m`` that divides the image, the map at ``m`` (1 where any pixel of the cell is
    in the box) gives exactly the same grid maps as the full-resolution one, at a tiny fraction of the memory
    (540 x 540 instead of 3780 x 3780 at 4K). Otherwise the full-resolution map is returned.
    """
    height, width = image_hw
    m_h = _common_resolution([g[0] for g in grids], height)
    m_w = _common_resolution([g[1] for g in grids], width)
    boxes = boxes.float()
    rows = _cells_touched(boxes[:, 1], boxes[:, 3], m_h, height / m_h)
    cols = _cells_touched(boxes[:, 0], boxes[:, 2], m_w, width / m_w)
    return (rows[:, :, None] & cols[:, None, :]).float()


def _common_resolution(sizes: Sequence[int], pixels: int) -> int:
    m = math.lcm(*sizes)
    return m if pixels % m == 0 else pixels


def _cells_touched(lo: torch.Tensor, hi: torch.Tensor, cells: int, cell: float) -> torch.Tensor:
    """(B, cells) bool: cell c covers pixels [c*cell, (c+1)*cell); the box covers [floor(lo), ceil(hi))."""
    start = torch.arange(cells, device=lo.device, dtype=torch.float64) * cell
    first, last = lo.double().floor()[:, None], hi.double().ceil()[:, None]
    return (start[None] < last) & (start[None] + cell > first)


# --- dataset --------------------------------------------------------------------------------------------------------
class BoxCaptionDataset(torch.utils.data.Dataset):
    """Map-style dataset of pre-training samples; deterministic per (seed, epoch, index).

    Each item: ``pixel_values`` (3, size, size) uint8 (normalised on the device), ``input_ids`` (context_length,),
    ``boxes`` (4,) XYXY in output pixels (the whole image for a global caption) and ``is_global`` (bool).

    Args:
        records: JSONL path, :class:`BoxCaptionRecord` list or raw mappings (see :func:`as_records`).
        tokenizer: callable ``list[str] -> LongTensor (n, L)`` (a :class:`vila_hd.ps3.PS3Tokenizer`).
        size: output side, the model's largest scale (1512 or 3780).
        image_root: directory that relative image paths are resolved against (and must stay inside); default:
            each JSONL's own directory (in-memory records then need absolute paths or images).
        global_caption_prob: chance of the global caption when a record has both kinds.
        crop_scale: RandomResizedCrop area range (the paper: 0.9-1.0); ``(1.0, 1.0)`` with ``crop_ratio``
            ``(1, 1)`` on square images disables cropping.
        caption_cleanup: clean-up hooks applied to every caption (names or callables).
        max_pixels: refuse larger source images (see :func:`vila_hd.images.load_image`).
    """

    def __init__(
        self,
        records: Any,
        tokenizer: Callable[[list[str]], torch.Tensor],
        size: int,
        image_root: str | os.PathLike | None = None,
        global_caption_prob: float = 0.25,
        crop_scale: Sequence[float] = (0.9, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        caption_cleanup: Sequence[str | CaptionHook] = (),
        seed: int = 0,
        max_pixels: int | None = None,
    ):
        if not 0.0 <= global_caption_prob <= 1.0:
            raise ValueError(f"global_caption_prob must lie in [0, 1], got {global_caption_prob}")
        if not (len(crop_scale) == 2 and 0 < crop_scale[0] <= crop_scale[1] <= 1):
            raise ValueError(f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {crop_scale}")
        self.image_root = os.path.realpath(image_root) if image_root is not None else None
        self.records = as_records(records, self.image_root)
        self.tokenizer = tokenizer
        self.size = int(size)
        self.global_caption_prob = global_caption_prob
        self.crop_scale = tuple(crop_scale)
        self.crop_ratio = tuple(crop_ratio)
        self.cleanup = build_caption_cleanup(caption_cleanup)
        self.seed = seed
        self.epoch = 0
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng_for(self, index: int) -> random.Random:
        """The RNG of sample ``index`` in the current epoch (caption choice, crop, caption augmentation)."""
        return random.Random(f"{self.seed}/{self.epoch}/{index}")

    def choose_caption(self, record: BoxCaptionRecord, rng: random.Random) -> tuple[str, BoxCaption | None]:
        """(caption, box) for one sample: global with ``global_caption_prob`` when both kinds exist."""
        if record.global_caption is not None and (not record.boxes or rng.random() < self.global_caption_prob):
            return record.global_caption, None
        pick = record.boxes[rng.randrange(len(record.boxes))]
        return pick.caption, pick

    def load(self, record: BoxCaptionRecord) -> Image.Image:
        source, root = record.image, record.root or self.image_root
        if isinstance(source, Mapping):  # a `datasets` Image column read without decoding: {"bytes", "path"}
            source = source.get("bytes") or source.get("path")
        if isinstance(source, (str, os.PathLike)) and root is not None:
            path = os.path.realpath(os.path.join(root, source))
            if os.path.commonpath([path, root]) != root:
                raise RecordError(f"{record.where}: image path {os.fspath(source)!r} escapes the image root {root}")
            source = path
        try:
            return load_image(source, max_pixels=self.max_pixels)
        except ValueError as e:  # ImageLoadError names the file; add the record
            raise RecordError(f"{record.where}: {e}") from e

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """``key``: an index, or ``(epoch, index)`` (what :class:`StepBatches` yields; overrides ``set_epoch``)."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        record = self.records[index]
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        caption, pick = self.choose_caption(record, rng)
        image = self.load(record)
        box = None
        if pick is not None:
            box = _clip_box(pick.box, image.width, image.height)
            if box is None:
                raise RecordError(
                    f"{record.where}: box {list(pick.box)} lies outside the {image.width}x{image.height} image"
                )
        image, box = random_resized_crop_with_box(image, box, self.size, rng, self.crop_scale, self.crop_ratio)
        caption = self.cleanup(caption, rng)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return {
            "pixel_values": pixels,
            "input_ids": self.tokenizer([caption])[0],
            "boxes": torch.tensor(box if box is not None else (0.0, 0.0, self.size, self.size), dtype=torch.float32),
            "is_global": torch.tensor(pick is None),
        }


def _clip_box(box, width, height):
    x0, y0 = max(box[0], 0.0), max(box[1], 0.0)
    x1, y1 = min(box[2], float(width)), min(box[3], float(height))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def collate_box_caption(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch (all images share one size)."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}
