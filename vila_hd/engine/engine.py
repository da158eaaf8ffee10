"""The engine: :class:`Engine` answers conversations with a VILA-HD model and its processor.

``generate`` / ``stream`` (text chunks as soon as they are decoded, stoppable from another thread) /
``generate_batch`` / ``selection``, each answer with :class:`~vila_hd.engine.results.GenerationStats`; every
request is checked against the engine's :class:`~vila_hd.engine.options.ServingLimits` before the model runs.

Timings: *preprocess* (chat template, tokenisation, image resizing), *prefix* (the LLM pass over the
question that steers top-down selection), *encode* (PS3 and the projector: the rest of the time to the
first token), *prefill* (the main LLM pass over the whole prompt) and *decode* (every later token). They
are measured with forward hooks on the LLM decoder; on CUDA the hooks synchronise before reading the clock
until the first token is out.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers.generation import BaseStreamer

from vila_hd.engine.conversation import Conversation
from vila_hd.engine.options import GenerationOptions, LimitExceeded, ServingLimits
from vila_hd.engine.results import NO_IMAGE, GenerationResult, GenerationStats, ImageSelection
from vila_hd.engine.streaming import Generation, _Clock, _TextChunks
from vila_hd.images import DEFAULT_MAX_PIXELS, load_image
from vila_hd.loading import load_pretrained
from vila_hd.processing import PromptTooLong


class Engine:
    """Answers conversations with a VILA-HD model and its processor (see the module docstring)."""

    def __init__(
        self,
        model,
        processor,
        options: GenerationOptions | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
        limits: ServingLimits | None = None,
        image_cache_size: int = 4,
    ):
        """``limits`` (default :class:`ServingLimits()`) bound every request; ``max_image_pixels`` is the older
        spelling of ``limits.max_image_pixels`` (used when ``limits`` is not given). ``image_cache_size``: the
        preprocessed tensors of this many most recent images are kept, so a conversation does not resize its
        images again at every turn (0: keep none; a 4K image takes 171 MB)."""
        if image_cache_size < 0:
            raise ValueError(f"image_cache_size must be >= 0, got {image_cache_size}")
        self.model = model
        self.processor = processor
        self.limits = limits if limits is not None else ServingLimits(max_image_pixels=max_image_pixels)
        self.options = options or GenerationOptions()
        self.image_cache_size = image_cache_size
        self._pixel_cache: OrderedDict[int, tuple[Image.Image, torch.Tensor]] = OrderedDict()

    @property
    def max_image_pixels(self) -> int | None:
        return self.limits.max_image_pixels

    @property
    def stop_token_ids(self) -> set[int]:
        """The ids that end a row: the processor's end-of-turn ids and the padding of finished rows."""
        return set(self.processor.stop_token_ids) | {self.model.generation_config.pad_token_id}

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        adapter: str | os.PathLike | None = None,
        *,
        options: GenerationOptions | None = None,
        limits: ServingLimits | None = None,
        image_cache_size: int = 4,
        **load_kwargs: Any,
    ) -> Engine:
        """:func:`vila_hd.loading.load_pretrained` + an engine around it."""
        loaded, processor = load_pretrained(model, adapter, **load_kwargs)
        return cls(loaded, processor, options, limits=limits, image_cache_size=image_cache_size)

    # --- conversations ---------------------------------------------------------------------------------
    def conversation(self, system: str | None = None) -> Conversation:
        return Conversation(system=system, image_token=self.processor.image_token)

    def single_turn(self, images: Any, text: str, system: str | None = None) -> Conversation:
        """A conversation of one user message. Without ``<image>`` placeholders in ``text`` the images go
        first; with them, their count must match the images."""
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        self.limits.check_images(len(images))  # before loading any of them
        conv = self.conversation(system)
        token = self.processor.image_token
        if token in text:
            if text.count(token) != len(images):
                raise ValueError(
                    f"the text has {text.count(token)} {token} placeholder(s) but {len(images)} image(s) were given"
                )
            conv.messages.append({"role": "user", "content": text})
            conv.images.extend(load_image(im, max_pixels=self.max_image_pixels) for im in images)
            return conv
        for image in images:
            conv.add_image(image, self.max_image_pixels)
        conv.add_user(text)
        return conv

    # --- public generation -----------------------------------------------------------------------------
    def stream(
        self, conversation: Conversation, options: GenerationOptions | None = None, **changes: Any
    ) -> Generation:
        """Start answering the conversation's last user message in a background thread; iterate the returned
        :class:`Generation` for text chunks. The answer is not added to the conversation."""
        options = (options or self.options).updated(**changes)
        start = time.perf_counter()
        inputs, stats = self._prepare([conversation], options)
        stats.preprocess_s = time.perf_counter() - start
        chunks = _TextChunks(self.processor.tokenizer)
        event = threading.Event()
        run = lambda: self._run(inputs, stats, options, [conversation.images], event, chunks)[0]  # noqa: E731
        return Generation(run, chunks, event)

    def generate(
        self, conversation: Conversation, options: GenerationOptions | None = None, **changes: Any
    ) -> GenerationResult:
        """Answer the conversation's last user message (blocking; the answer is not added to it)."""
        return self.generate_batch([conversation], options, **changes)[0]

    def generate_batch(
        self,
        conversations: Sequence[Conversation],
        options: GenerationOptions | None = None,
        *,
        streamer: BaseStreamer | None = None,
        stop: threading.Event | None = None,
        **changes: Any,
    ) -> list[GenerationResult]:
        """Answer several conversations in one left-padded batch (timings are the batch's). ``streamer``
        (optional) gets transformers' calls: the prompt ids once, then each step's new ids, one per row (rows
        that finished get padding); setting ``stop`` ends the whole batch after the current token."""
        options = (options or self.options).updated(**changes)
        start = time.perf_counter()
        inputs, stats = self._prepare(list(conversations), options)
        stats.preprocess_s = time.perf_counter() - start
        event = stop if stop is not None else threading.Event()
        return self._run(inputs, stats, options, [c.images for c in conversations], event, streamer)

    def selection(
        self, image: Any, text: str, options: GenerationOptions | None = None, **changes: Any
    ) -> ImageSelection:
        """Where PS3 looks in ``image`` for the question ``text`` (one forward pass, no answer)."""
        options = (options or self.options).updated(**changes)
        conv = self.single_turn([image], text)
        inputs, _ = self._prepare([conv], options)
        with torch.inference_mode():
            out = self.model(
                **inputs,
                look_close_mode=options.look_close_mode,
                output_selection_maps=True,
                use_cache=False,
                logits_to_keep=1,
            )
        return ImageSelection(
            conv.images[0], [m[0].cpu() for m in out.selection_maps], [p[0].float().cpu() for p in out.selection_probs]
        )

    # --- internals -------------------------------------------------------------------------------------
    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def _prepare(self, conversations: list[Conversation], options: GenerationOptions):
        from vila_hd.model.token_layout import image_token_layout

        for i, conv in enumerate(conversations):
            if not conv.messages or conv.messages[-1]["role"] != "user":
                raise ValueError(f"conversation {i} does not end with a user message; nothing to answer")
        self._check_limits(conversations, options)
        texts = [
            self.processor.apply_chat_template(c.chat_messages(), add_generation_prompt=True) for c in conversations
        ]
        images = [list(c.images) for c in conversations]
        try:  # the processor checks the length before it resizes any image
            inputs = self.processor(
                text=texts,
                images=images if any(images) else None,
                preprocess=self._pixel_values,
                num_look_close=options.num_look_close,
                num_token_look_close=options.num_token_look_close,
                max_length=self.limits.prompt_limit(self.model.config),
            )
        except PromptTooLong as err:
            raise self._prompt_too_long(err, len(conversations), len(images[err.index])) from None
        steps, tokens = inputs["num_look_close"], inputs["num_token_look_close"]
        mode = options.look_close_mode or self.model.config.look_close_mode
        stats = GenerationStats(
            look_close_mode=mode, num_look_close=steps, num_token_look_close=tokens, batch_size=len(conversations)
        )
        n_images = max(len(group) for group in images)
        if n_images:
            layout = image_token_layout(
                self.processor.layout,
                tuple(inputs["pixel_values"].shape[-2:]),
                num_look_close=steps,
                num_token_look_close=tokens,
            )
            stats.images = n_images
            stats.tokens_per_image = layout.num_tokens
            stats.image_tokens = n_images * layout.num_tokens
            stats.low_res_tokens_per_image = layout.num_low_res_tokens
            stats.high_res_tokens_per_image = layout.num_high_res_tokens
            stats.selected_patches = layout.num_selected_patches
            stats.total_patches = sum(h * w for h, w in layout.high_res_grids)
        return inputs.to(self.input_device), stats

    def _pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """Preprocessed images (placeholder order); images seen lately (the same objects) come from the cache."""
        out = []
        for image in images:
            hit = self._pixel_cache.get(id(image))
            if hit is not None and hit[0] is image:
                self._pixel_cache.move_to_end(id(image))
                out.append(hit[1])
                continue
            pixels = self.processor.preprocess_images([image])[0]
            out.append(pixels)
            if self.image_cache_size:
                self._pixel_cache[id(image)] = (image, pixels)
                while len(self._pixel_cache) > self.image_cache_size:
                    self._pixel_cache.popitem(last=False)
        return torch.stack(out)

    def _check_limits(self, conversations: list[Conversation], options: GenerationOptions) -> None:
        """The limits that need no tokenisation: new tokens, images per prompt, pixels per image."""
        self.limits.check_new_tokens(options.max_new_tokens)
        for i, conv in enumerate(conversations):
            where = "the prompt" if len(conversations) == 1 else f"conversation {i}"
            self.limits.check_images(len(conv.images), where)
            for j, image in enumerate(conv.images):  # images added as PIL objects skipped the loader's check
                self.limits.check_image(image, f"image {j + 1} of {where}")

    def _prompt_too_long(self, err: PromptTooLong, batch: int, images: int) -> LimitExceeded:
        where = "the prompt" if batch == 1 else f"the prompt of conversation {err.index}"
        what = f"{where} after image expansion ({images} image(s)) in tokens"
        if err.limit != self.limits.max_prompt_tokens:
            return LimitExceeded(
                f"{what} is {err.length}, above the model's context length {err.limit} (max_position_embeddings); "
                "use fewer or smaller images, fewer look-close tokens or a shorter conversation"
            )
        return self.limits.exceeded("max_prompt_tokens", what, err.length)

    def _generation_config(self, options: GenerationOptions):
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = options.max_new_tokens
        if options.temperature is not None:
            config.do_sample = options.temperature > 0
        if config.do_sample:
            if options.temperature:
                config.temperature = options.temperature
            if options.top_p is not None:
                config.top_p = options.top_p
            if options.top_k is not None:
                config.top_k = options.top_k
        else:  # sampling knobs left in a checkpoint's config only cause warnings when decoding greedily
            config.temperature = config.top_p = config.top_k = None
        return config

    def _run(
        self,
        inputs,
        stats: GenerationStats,
        options: GenerationOptions,
        images: list[list[Image.Image]],
        event: threading.Event,
        chunks: BaseStreamer | None,
    ) -> list[GenerationResult]:
        from transformers import StoppingCriteriaList

        clock = _Clock(event, self.model.language_model.base_model, self.input_device)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                output, selection = self.model.generate(
                    **inputs,
                    generation_config=self._generation_config(options),
                    look_close_mode=options.look_close_mode,
                    streamer=chunks,
                    stopping_criteria=StoppingCriteriaList([clock]),
                    return_selection_maps=True,
                )
        finally:
            clock.close()
        end = time.perf_counter()
        self._fill_times(stats, clock, start, end, event.is_set())
        return self._results(inputs, output[:, inputs["input_ids"].shape[1] :].tolist(), selection, stats, images)

    def _results(self, inputs, rows: list[list[int]], selection, stats: GenerationStats, images) -> list:
        """One :class:`GenerationResult` per batch row: its text, counts and its images' selection maps."""
        stop_ids = self.stop_token_ids
        results, offset = [], 0
        for i, (row, row_images) in enumerate(zip(rows, images)):
            generated = len(row)
            while row and row[-1] in stop_ids:  # end-of-turn, then padding of finished rows
                row.pop()
            row_stats = dataclasses.replace(
                stats,
                prompt_tokens=int(inputs["attention_mask"][i].sum()),
                new_tokens=min(len(row) + 1, generated),  # the end-of-turn token counts
                images=len(row_images),
                image_tokens=len(row_images) * stats.tokens_per_image,
                **({} if row_images else NO_IMAGE),  # a text-only row has no image stats, whatever its batch-mates
            )
            text = self.processor.tokenizer.decode(row, skip_special_tokens=True)
            maps = probs = None
            if selection is not None and row_images:
                maps = [m[offset : offset + len(row_images)] for m in selection.maps]
                probs = [p[offset : offset + len(row_images)] for p in selection.probs]
            offset += len(row_images)
            results.append(GenerationResult(text, row_stats, row, list(row_images), maps, probs))
        return results

    @staticmethod
    def _fill_times(stats: GenerationStats, clock: _Clock, start: float, end: float, stopped: bool) -> None:
        stats.total_s = stats.preprocess_s + (end - start)
        stats.stopped = stopped
        if not clock.token_times:
            return
        first = clock.token_times[0]
        before = [(a, b) for a, b in clock.calls if b <= first]
        if before:
            stats.prefill_s = before[-1][1] - before[-1][0]
            stats.prefix_s = sum(b - a for a, b in before[:-1])
        rest = max(first - start - stats.prefill_s - stats.prefix_s, 0.0)  # vision, projector, first sampling
        if stats.images:
            stats.encode_s = rest
        else:
            stats.prefill_s += rest
        stats.decode_s = end - first
