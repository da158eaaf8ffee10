"""The Python API: ``vila_hd.load(path_or_id)`` and the small object it returns.

import vila_hd

model = vila_hd.load("nvidia/VILA-HD-8B-PS3-4K-SigLIP2")       # or a local directory / LoRA adapter
print(model.chat("photo.jpg", "What does the small sign say?", max_new_tokens=64))
for chunk in model.chat(["a.jpg", "b.jpg"], "What changed?", stream=True):
    print(chunk, end="", flush=True)
model.selection("photo.jpg", "What does the small sign say?").save("where_it_looked.png")
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from vila_hd.engine.engine import Engine
from vila_hd.engine.options import GenerationOptions, ServingLimits
from vila_hd.engine.results import GenerationStats, ImageSelection


class VilaHD:
    """A loaded model ready to answer. ``engine`` gives the full engine (conversations, batches)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.last_stats: GenerationStats | None = None

    @property
    def model(self):
        return self.engine.model

    @property
    def processor(self):
        return self.engine.processor

    def chat(
        self, images: Any, text: str, stream: bool = False, *, system: str | None = None, **generation_options: Any
    ) -> str | Iterator[str]:
        """Answer one question about ``images`` (``None``, one image or a list: paths, PIL images, arrays).

        Args:
            text: the question; images go before it unless it places them with ``<image>`` placeholders.
            stream: return an iterator of text chunks (as they are generated) instead of the answer.
            system: optional system message.
            generation_options: :class:`~vila_hd.engine.GenerationOptions` fields, e.g. ``max_new_tokens``,
                ``temperature`` (0 = greedy), ``num_look_close`` / ``steps``, ``num_token_look_close`` /
                ``tokens``, ``look_close_mode`` / ``mode`` (``"top-down"`` or ``"bottom-up"``).

        After the answer, :attr:`last_stats` holds its :class:`~vila_hd.engine.GenerationStats`.
        """
        conversation = self.engine.single_turn(images, text, system)
        if not stream:
            result = self.engine.generate(conversation, **generation_options)
            self.last_stats = result.stats
            return result.text
        generation = self.engine.stream(conversation, **generation_options)
        return self._chunks(generation)

    def _chunks(self, generation) -> Iterator[str]:
        finished = False
        try:
            yield from generation
            finished = True
        finally:
            if not finished:  # the caller stopped reading (break, error): stop generating, let the thread end
                generation.stop()
                generation.thread.join()
            if generation.result is not None:
                self.last_stats = generation.result.stats

    def selection(self, image: Any, text: str, **generation_options: Any) -> ImageSelection:
        """Where PS3 looks in ``image`` to answer ``text``: per-scale ``maps`` (0/1) and ``probs`` (h, w);
        ``.figure()`` draws them, ``.save(path)`` writes the PNG."""
        return self.engine.selection(image, text, **generation_options)

    def __repr__(self) -> str:
        config = self.model.config
        return (
            f"VilaHD({config.name_or_path or type(self.model).__name__!r}, device={self.engine.input_device}, "
            f"dtype={self.model.dtype})"
        )


def load(
    path_or_id: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    device_map: str | dict | None = None,
    load_4bit: bool = False,
    limits: ServingLimits | None = None,
    **generation_options: Any,
) -> VilaHD:
    """Load a VILA-HD checkpoint (directory or Hub id, our layout or VILA's; a LoRA adapter directory works
    too) for inference. Device and dtype default to CUDA + bf16 when a GPU is present, else CPU + fp32.

    ``generation_options`` become the defaults of :meth:`VilaHD.chat` (e.g. ``max_new_tokens=128``); ``limits``
    (:class:`~vila_hd.engine.ServingLimits`) bound every request (pixels, images, new and prompt tokens)."""
    options = GenerationOptions().updated(**generation_options)
    return VilaHD(
        Engine.from_pretrained(
            path_or_id,
            adapter,
            options=options,
            limits=limits,
            device=device,
            dtype=dtype,
            device_map=device_map,
            load_4bit=load_4bit,
        )
    )
