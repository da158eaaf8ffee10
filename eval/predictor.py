"""What the harness asks a model: the :class:`Predictor` protocol and its VILA-HD implementation.

A predictor is any callable ``(images, prompt, options) -> Prediction``: ``images`` are loaded PIL images,
``prompt`` the benchmark's text, ``options`` the generation options of the run (``max_new_tokens``,
``steps`` / ``tokens`` / ``mode``... -- see ``vila_hd.engine.GenerationOptions``). A predictor that can answer
several samples at once implements ``predict_batch`` (used with ``--batch-size``); one that can also rank given
answers implements ``score_continuations`` (used by ``--mc-mode likelihood``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class Prediction:
    """A reply and what it cost. ``latency_s`` ``None`` lets the harness time the call itself."""

    text: str
    image_tokens: int | None = None  # LLM visual tokens (all images of the sample)
    selected_pct: float | None = None  # share of high-res patches selected (percent)
    latency_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Predictor(Protocol):
    def __call__(self, images: list[Any], prompt: str, options: Mapping[str, Any]) -> Prediction: ...


@runtime_checkable
class BatchPredictor(Protocol):
    def predict_batch(self, requests: Sequence[tuple[list[Any], str]], options: Mapping[str, Any]) -> list[Prediction]:
        """Answer several ``(images, prompt)`` requests at once, in order."""
        ...


@runtime_checkable
class LikelihoodPredictor(Protocol):
    def score_continuations(self, images: list[Any], prompt: str, continuations: Sequence[str],
                            options: Mapping[str, Any]) -> list[float]:
        """Mean negative log-likelihood per token of each continuation as the assistant's reply (lower = more
        likely)."""
        ...


class EnginePredictor:
    """A :class:`Predictor` on a ``vila_hd.engine.Engine`` (or the object ``vila_hd.load`` returns)."""

    def __init__(self, engine: Any):
        self.engine = getattr(engine, "engine", engine)
        self.last_image_tokens: int | None = None  # visual tokens of the last likelihood-scored sample

    def __call__(self, images: list[Any], prompt: str, options: Mapping[str, Any]) -> Prediction:
        return self.predict_batch([(images, prompt)], options)[0]

    def predict_batch(self, requests: Sequence[tuple[list[Any], str]], options: Mapping[str, Any]) -> list[Prediction]:
        """One left-padded ``generate`` for all requests; each latency is the batch's time over its size."""
        start = time.perf_counter()
        conversations = [self.engine.single_turn(images, prompt) for images, prompt in requests]
        results = self.engine.generate_batch(conversations, **dict(options))
        latency = (time.perf_counter() - start) / len(requests)
        return [self._prediction(result, latency) for result in results]

    @staticmethod
    def _prediction(result: Any, latency: float) -> Prediction:
        stats = result.stats
        return Prediction(text=result.text.strip(), image_tokens=stats.image_tokens,
                          selected_pct=round(stats.selected_pct, 3) if stats.images else None, latency_s=latency,
                          extra={"new_tokens": stats.new_tokens, "prompt_tokens": stats.prompt_tokens})

    def score_continuations(self, images: list[Any], prompt: str, continuations: Sequence[str],
                            options: Mapping[str, Any]) -> list[float]:
        """Mean next-token loss of each continuation (plus the end-of-turn text the chat template adds) after
        the rendered question, with the selection budget of ``options`` (V*Bench's likelihood protocol)."""
        return [total / count for total, count, _ in self.continuation_losses(images, prompt, continuations, options)]

    def continuation_losses(self, images: list[Any], prompt: str, continuations: Sequence[str],
                            options: Mapping[str, Any]) -> list[tuple[float, int, bool]]:
        """For each continuation as the assistant's reply to ``prompt``: ``(summed negative log-likelihood,
        number of tokens, whether greedy decoding would produce exactly these tokens)``.

        The images and the prompt run once (vision tower, selection, prefill); each continuation then runs from
        the prompt's KV cache, which is cut back to the prompt afterwards."""
        import torch

        from vila_hd.model.cache import CACHE_FIELD, crop_cache

        engine = self.engine
        processor, model = engine.processor, engine.model
        settings = engine.options.updated(**{k: v for k, v in options.items() if k != "max_new_tokens"})
        conversation = engine.single_turn(images, prompt)
        messages = conversation.chat_messages()
        prefix_text = processor.apply_chat_template(messages, add_generation_prompt=True)
        budget = dict(num_look_close=settings.num_look_close, num_token_look_close=settings.num_token_look_close)
        prefix = processor(text=[prefix_text], images=conversation.images or None, **budget).to(engine.input_device)
        n_prefix = prefix["input_ids"].shape[1]
        self.last_image_tokens = int((prefix["input_ids"] == processor.image_token_id).sum())
        with torch.inference_mode():
            out = model(**prefix, look_close_mode=settings.look_close_mode, use_cache=True, logits_to_keep=1)
        cache = out[CACHE_FIELD]
        first = out.logits[0, -1:].float()  # predicts the first continuation token
        head = processor.tokenizer(prefix_text, add_special_tokens=False).input_ids
        results = []
        for continuation in continuations:
            targets = self._continuation_ids(messages, prefix_text, head, continuation).to(engine.input_device)
            with torch.inference_mode():
                step = model(input_ids=targets[None], cache=cache, use_cache=True)
            crop_cache(cache, n_prefix)
            logits = torch.cat([first, step.logits[0, :-1].float()])
            total = float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            greedy = bool((logits.argmax(-1) == targets).all())
            results.append((total, int(targets.numel()), greedy))
        return results

    def _continuation_ids(self, messages: list[dict], prefix_text: str, head: list[int], continuation: str):
        """Token ids the answered chat adds after the generation prompt (``prefix_text``, tokenised as ``head``):
        the answer and its end of turn."""
        import torch

        processor = self.engine.processor
        full_text = processor.apply_chat_template(messages + [{"role": "assistant", "content": continuation}],
                                                  add_generation_prompt=False)
        if not full_text.startswith(prefix_text):
            raise ValueError("the chat template renders the answer turn differently from the generation prompt; "
                             "likelihood scoring needs the prompt to be a prefix of the answered chat")
        ids = processor.tokenizer(full_text, add_special_tokens=False).input_ids
        if len(ids) <= len(head) or ids[: len(head)] != head:
            raise ValueError(f"the continuation {continuation!r} does not tokenise as an extension of the prompt")
        return torch.tensor(ids[len(head):], dtype=torch.long)
