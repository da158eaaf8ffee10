"""What one answer may be and what one request may cost.

- :class:`GenerationOptions`: per-answer settings (length, sampling, the PS3 look-close budget and mode),
  checked when built (look-close values by :func:`vila_hd.arguments.parse_look_close`, the one parser of them;
  :func:`parse_mode` reads the mode).
- :class:`ServingLimits`: what one request may cost (pixels per image, images per prompt, new tokens, prompt
  tokens after image expansion), enforced by the engine for chat, infer and the Python API alike; a request
  over a limit raises :class:`LimitExceeded` naming the limit, the value and the setting that raises it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vila_hd.arguments import parse_look_close
from vila_hd.images import DEFAULT_MAX_PIXELS

LOOK_CLOSE_MODES = {"top-down": "after_prompt", "bottom-up": "after_image"}
MODE_NAMES = {v: k for k, v in LOOK_CLOSE_MODES.items()}


def parse_mode(value: str | None) -> str | None:
    """``top-down`` / ``bottom-up`` (or the config names ``after_prompt`` / ``after_image``) -> config name."""
    if value is None or value in MODE_NAMES:
        return value
    if value in LOOK_CLOSE_MODES:
        return LOOK_CLOSE_MODES[value]
    raise ValueError(f"mode must be one of {sorted(LOOK_CLOSE_MODES)}, got {value!r}")


@dataclass(frozen=True)
class GenerationOptions:
    """Per-answer settings. ``None`` means the checkpoint's default (its generation config / VILA-HD config).

    Attributes:
        max_new_tokens: most tokens in an answer.
        temperature: 0 decodes greedily; > 0 samples; ``None`` follows the checkpoint's generation config.
        top_p / top_k: nucleus / top-k sampling (only when sampling).
        num_look_close: PS3 look-close steps (int >= 0 or ``"all"``); replaces ``num_token_look_close``.
        num_token_look_close: high-res patches to select (int >= 0 or ``"all"``); replaces ``num_look_close``.
        look_close_mode: ``"after_prompt"`` (top-down, steered by the question) or ``"after_image"``
            (bottom-up); ``"top-down"`` / ``"bottom-up"`` are accepted too.
    """

    max_new_tokens: int = 512
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    num_look_close: int | str | None = None
    num_token_look_close: int | str | None = None
    look_close_mode: str | None = None

    ALIASES = {"steps": "num_look_close", "tokens": "num_token_look_close", "mode": "look_close_mode"}

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature is not None and (not isinstance(self.temperature, (int, float)) or self.temperature < 0):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        steps = parse_look_close("num_look_close (steps)", self.num_look_close)
        tokens = parse_look_close("num_token_look_close (tokens)", self.num_token_look_close)
        if steps is not None and tokens is not None:
            raise ValueError(
                f"give either num_look_close (steps) or num_token_look_close (tokens), not both "
                f"(got {steps!r} and {tokens!r})"
            )
        object.__setattr__(self, "num_look_close", steps)
        object.__setattr__(self, "num_token_look_close", tokens)
        object.__setattr__(self, "look_close_mode", parse_mode(self.look_close_mode))

    def updated(self, **changes: Any) -> GenerationOptions:
        """A copy with ``changes`` (aliases ``steps`` / ``tokens`` / ``mode`` accepted). Setting the steps
        clears the token count and the other way round; unknown names raise ``TypeError``."""
        known = {f.name for f in dataclasses.fields(self)}
        fields = {}
        for key, value in changes.items():
            name = self.ALIASES.get(key, key)
            if name not in known:
                raise TypeError(f"unknown generation option {key!r}; known: {sorted(known | set(self.ALIASES))}")
            fields[name] = value
        if fields.get("num_look_close") is not None:
            fields.setdefault("num_token_look_close", None)
        if fields.get("num_token_look_close") is not None:
            fields.setdefault("num_look_close", None)
        return dataclasses.replace(self, **fields)


class LimitExceeded(ValueError):
    """A request is over a :class:`ServingLimits` limit; the message names the limit and how to raise it."""


@dataclass(frozen=True)
class ServingLimits:
    """What one request may ask of the engine; ``None`` lifts a limit.

    Attributes:
        max_image_pixels: pixels of one image, checked from the file header before decoding (``--limit-image-pixels``).
        max_images_per_prompt: images in one conversation, all turns together (``--limit-images``).
        max_new_tokens: the largest ``max_new_tokens`` a request may ask for (``--limit-new-tokens``).
        max_prompt_tokens: prompt tokens after each ``<image>`` became its image tokens (``--limit-prompt-tokens``);
            ``None``: the LLM's context length (``max_position_embeddings``) when its config has one.
    """

    max_image_pixels: int | None = DEFAULT_MAX_PIXELS
    max_images_per_prompt: int | None = 32
    max_new_tokens: int | None = 4096
    max_prompt_tokens: int | None = None

    FLAGS = {
        "max_image_pixels": "--limit-image-pixels",
        "max_images_per_prompt": "--limit-images",
        "max_new_tokens": "--limit-new-tokens",
        "max_prompt_tokens": "--limit-prompt-tokens",
    }

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"ServingLimits.{f.name} must be a positive integer or None, got {value!r}")

    def exceeded(self, name: str, what: str, value: int, limit: int | None = None) -> LimitExceeded:
        limit = getattr(self, name) if limit is None else limit
        return LimitExceeded(
            f"{what} is {value}, above the serving limit {name}={limit} (ServingLimits.{name}, "
            f"{self.FLAGS[name]} on the command line)"
        )

    def check_images(self, count: int, where: str = "the prompt") -> None:
        if self.max_images_per_prompt is not None and count > self.max_images_per_prompt:
            raise self.exceeded("max_images_per_prompt", f"the number of images in {where}", count)

    def check_image(self, image: Image.Image, where: str = "an image") -> None:
        pixels = image.width * image.height
        if self.max_image_pixels is not None and pixels > self.max_image_pixels:
            raise self.exceeded("max_image_pixels", f"{where} ({image.width} x {image.height}) pixel count", pixels)

    def check_new_tokens(self, requested: int) -> None:
        if self.max_new_tokens is not None and requested > self.max_new_tokens:
            raise self.exceeded("max_new_tokens", "the requested max_new_tokens", requested)

    def prompt_limit(self, model_config: Any) -> int | None:
        """The prompt-token limit in force: the configured one, else the LLM's context length (if known)."""
        if self.max_prompt_tokens is not None:
            return self.max_prompt_tokens
        text_config = getattr(model_config, "text_config", model_config)
        context = getattr(text_config, "max_position_embeddings", None)
        return context if isinstance(context, int) and context > 0 else None
