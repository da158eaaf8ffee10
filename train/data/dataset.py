"""Samples -> model inputs: chat template, assistant-only labels, ``<image>`` expansion, images, boxes.

:class:`SampleEncoder` turns a :class:`~vila_hd.compat.datasets.RawSample` into an :class:`EncodedSample`:

- the conversation is rendered with the processor's chat template; the labels keep only the tokens of the
  assistant turns **and their end-of-turn text** (e.g. ``<|im_end|>``), found by rendering growing prefixes
  of the chat (the template must render a chat as a prefix of its continuation; it is checked);
- each ``<image>`` becomes the exact number of image tokens of the training look-close budget plus the
  image-end text (same count as :class:`~vila_hd.processing.VilaHDProcessor`), labels ignored there;
- each image gets a *prompt position*: the last token of the user turn that holds it (the top-down prompt);
- the length after expansion is checked against ``max_length``;
- images are loaded with :func:`vila_hd.images.load_image` (full decode) and boxes normalised to [0, 1].

Every failure is a :class:`~vila_hd.compat.datasets.SampleError` with a reason from a fixed vocabulary;
:class:`TrainingDataset` returns :class:`SkippedSample` instead of raising, so a bad sample hours into a run
is counted, not fatal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vila_hd.compat import datasets as ds
from vila_hd.templates import (
    assistant_turn_end_text,
    last_token_before,
    latest_user_turn_end,
    render_with,
    user_turn_end_text,
)

IGNORE_INDEX = -100


@dataclass
class EncodedSample:
    input_ids: torch.Tensor  # (L,) long, image tokens expanded
    labels: torch.Tensor  # (L,) long, IGNORE_INDEX outside assistant turns
    prompt_positions: torch.Tensor  # (num_images,) index of each image's prompt token
    pixel_values: torch.Tensor | None = None  # (num_images, 3, S, S): uint8 (normalised on the GPU) or float
    boxes: torch.Tensor | None = None  # (num_images, 4) in [0, 1] (x1, y1, x2, y2); NaN rows: no box
    id: str = ""
    index: int = -1

    @property
    def num_images(self) -> int:
        return int(self.prompt_positions.numel())

    @property
    def num_targets(self) -> int:
        """Tokens that carry loss (a label at position t is predicted from position t - 1)."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())


@dataclass
class SkippedSample:
    index: int
    id: str
    reason: str
    detail: str


@dataclass
class _Rendered:
    text: str
    targets: list[tuple[int, int]] = field(default_factory=list)  # char spans trained on
    user_ends: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end of content, turn end)


class SampleEncoder:
    """Tokenize, label and expand samples for one processor and one training look-close budget."""

    def __init__(self, processor, max_length: int, look_close: dict[str, Any] | None = None,
                 load_images: bool = True, uint8_pixels: bool = False):
        self.processor = processor
        self.uint8_pixels = uint8_pixels  # leave normalisation to the training step (on the GPU)
        self.tokenizer = processor.tokenizer
        self.max_length = int(max_length)
        self.look_close = dict(look_close or {})
        self.load_images = load_images
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        self.image_end_ids = list(processor.image_end_ids)
        self.tokens_per_image = processor.num_image_tokens(**self.look_close)
        self._render = render_with(self.tokenizer, processor.chat_template)
        if not processor.chat_template:
            raise ValueError("training needs a chat template on the processor (none is set)")
        self.user_end = user_turn_end_text(self._render)
        self.assistant_end = assistant_turn_end_text(self._render)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("training needs a fast tokenizer (offsets are used to place the labels)")

    # --- text ---------------------------------------------------------------------------------
    def render(self, messages: list[dict[str, str]]) -> _Rendered:
        """Full text plus the character spans of assistant targets and user turns."""
        out = _Rendered(text=self._render(messages, False))
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                start = len(self._prefix(messages[:i], True))
                turn = self._prefix(messages[: i + 1], False)
                stop = turn.rfind(self.assistant_end) if self.assistant_end else -1
                stop = len(turn) if stop < start else stop + len(self.assistant_end)
                out.targets.append((start, stop))
            elif m["role"] == "user":
                start = len(self._prefix(messages[:i], False))
                with_header = self._prefix(messages[: i + 1], True)
                end = latest_user_turn_end(with_header, self.user_end)
                out.user_ends.append((start, end if end is not None else len(with_header), len(with_header)))
        return out

    def _prefix(self, messages, generation_prompt: bool) -> str:
        text = self._render(messages, generation_prompt) if messages else ""
        if not messages and generation_prompt:
            return ""
        return text

    def encode_text(self, sample: ds.RawSample) -> EncodedSample:
        """Token ids, labels and prompt positions (no images loaded)."""
        sample = ds.ensure_placeholders(sample, self.image_token)
        ds.check_turns(sample.messages)
        rendered = self.render(sample.messages)
        text = rendered.text
        for start, _ in rendered.targets:  # the template must render a chat as a prefix of its continuation
            if start > len(text):
                raise ValueError("the chat template does not render a chat as a prefix of its continuation; "
                                 "assistant turns cannot be located for the labels")
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        labels = [IGNORE_INDEX] * len(ids)
        for t, (s, e) in enumerate(offsets):
            if e > s and any(a <= s < b for a, b in rendered.targets):
                labels[t] = ids[t]
        image_tokens = [t for t, i in enumerate(ids) if i == self.image_token_id]
        if len(image_tokens) != len(sample.images):
            raise ds.SampleError(ds.PLACEHOLDER_MISMATCH,
                                 f"{len(image_tokens)} {self.image_token} token(s) after tokenization for "
                                 f"{len(sample.images)} image(s)")
        prompt_tokens = []
        for t in image_tokens:
            char = offsets[t][0]
            turn = next(((s, end) for s, end, stop in rendered.user_ends if s <= char < stop), None)
            if turn is None:
                raise ds.SampleError(ds.MALFORMED, f"an {self.image_token} placeholder is outside the user turns")
            prompt_tokens.append(last_token_before(offsets, turn[1]))
        return self._expand(ids, labels, image_tokens, prompt_tokens, sample)

    def _expand(self, ids, labels, image_tokens, prompt_tokens, sample) -> EncodedSample:
        n, end = self.tokens_per_image, self.image_end_ids
        out_ids: list[int] = []
        out_labels: list[int] = []
        new_index = []
        for i, lab in zip(ids, labels):
            new_index.append(len(out_ids))
            if i == self.image_token_id:
                out_ids.extend([i] * n + end)
                out_labels.extend([IGNORE_INDEX] * (n + len(end)))
            else:
                out_ids.append(i)
                out_labels.append(lab)
        if len(out_ids) > self.max_length:
            raise ds.SampleError(ds.TOO_LONG, f"{len(out_ids)} tokens ({len(sample.images)} image(s) x {n} tokens) "
                                              f"> max_length {self.max_length}")
        if not any(lab != IGNORE_INDEX for lab in out_labels[1:]):
            raise ds.SampleError(ds.NO_TARGET, "no assistant token survives tokenization")
        positions = [new_index[p] for p in prompt_tokens]
        return EncodedSample(
            input_ids=torch.tensor(out_ids, dtype=torch.long),
            labels=torch.tensor(out_labels, dtype=torch.long),
            prompt_positions=torch.tensor(positions, dtype=torch.long),
            id=sample.id,
        )

    # --- images -------------------------------------------------------------------------------
    def open_images(self, sample: ds.RawSample) -> list:
        """Decode every image fully (``SampleError`` for missing / unreadable ones)."""
        from vila_hd.images import DEFAULT_MAX_PIXELS

        return open_images(sample.images, getattr(self.processor.image_processor, "max_pixels", DEFAULT_MAX_PIXELS))

    def encode(self, sample: ds.RawSample, index: int = -1) -> EncodedSample:
        encoded = self.encode_text(sample)
        encoded.index = index
        if not sample.images or not self.load_images:
            return encoded
        images = self.open_images(sample)
        ip = self.processor.image_processor
        encoded.pixel_values = torch.stack([(ip.to_uint8 if self.uint8_pixels else ip.to_tensor)(im) for im in images])
        encoded.boxes = normalized_boxes(sample.boxes, [im.size for im in images])
        return encoded

    def text_length(self, sample: ds.RawSample) -> int:
        return int(self.encode_text(sample).input_ids.numel())


def open_images(refs: list, max_pixels: int | None = None) -> list:
    """PIL images of ``refs`` (paths, bytes, PIL...), fully decoded; ``SampleError`` for missing / unreadable."""
    import os

    from vila_hd.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

    images = []
    for ref in refs:
        # lexists: a dangling symlink or a symlink loop is there but unreadable (the loader says which)
        if isinstance(ref, str) and not os.path.lexists(ref):
            raise ds.SampleError(ds.MISSING_IMAGE, f"{ref} does not exist")
        try:
            images.append(load_image(ref, max_pixels=max_pixels or DEFAULT_MAX_PIXELS))
        except ImageLoadError as err:
            raise ds.SampleError(ds.UNREADABLE_IMAGE, str(err)) from None
    return images


def normalized_boxes(boxes: list, sizes: list[tuple[int, int]]) -> torch.Tensor:
    """Per image (x1, y1, x2, y2) / (w, h, w, h), clipped to [0, 1]; NaN rows where there is no box."""
    out = torch.full((len(sizes), 4), float("nan"))
    for i, (box, (w, h)) in enumerate(zip(boxes or [None] * len(sizes), sizes)):
        if box is None:
            continue
        x1, y1, x2, y2 = box
        if x1 >= w or y1 >= h:
            raise ds.SampleError(ds.BAD_BOX, f"box {box} lies outside the {w}x{h} image")
        out[i] = torch.tensor([x1 / w, y1 / h, min(x2 / w, 1.0), min(y2 / h, 1.0)])
    return out


class TrainingDataset(torch.utils.data.Dataset):
    """A mixture of raw sources encoded on the fly; bad samples come back as :class:`SkippedSample`."""

    def __init__(self, mixture, encoder: SampleEncoder):
        self.mixture = mixture
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.mixture)

    def describe(self, index: int) -> str:
        name, local = self.mixture.locate(index)
        return f"{name}[{local}]"

    def __getitem__(self, index: int) -> EncodedSample | SkippedSample:
        sid = f"#{index}"
        try:
            raw = self.mixture[index]
            sid = raw.id
            return self.encoder.encode(raw, index)
        except ds.SampleError as err:
            return SkippedSample(index, sid, err.reason, f"{self.describe(index)}: {err.detail}")
