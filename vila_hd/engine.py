"""The generation engine behind ``vila-hd chat``, ``vila-hd infer`` and :func:`vila_hd.load`.

- :func:`load_model`: a checkpoint directory or Hub id (our layout or VILA's), optionally with a LoRA
  adapter (recognised by its ``adapter_config.json``), on an automatically chosen device and dtype (CUDA
  bf16, else CPU fp32), loaded straight onto its device (meta-device init) or spread with a device map.
- :class:`Conversation`: messages (with ``<image>`` placeholders) and the images they refer to.
- :class:`Engine`: ``generate`` / ``stream`` (text chunks as soon as they are decoded, stoppable from
  another thread) / ``generate_batch`` / ``selection``, each answer with :class:`GenerationStats`.
- :class:`ServingLimits`: what one request may cost (pixels per image, images per prompt, new tokens, prompt
  tokens after image expansion), enforced by the engine for chat, infer and the Python API alike; a request
  over a limit raises :class:`LimitExceeded` naming the limit, the value and the setting that raises it.

Timings: *preprocess* (chat template, tokenisation, image resizing), *prefix* (the LLM pass over the
question that steers top-down selection), *encode* (PS3 and the projector: the rest of the time to the
first token), *prefill* (the main LLM pass over the whole prompt) and *decode* (every later token). They
are measured with forward hooks on the LLM decoder; on CUDA the hooks synchronise before reading the clock
until the first token is out.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers.generation import BaseStreamer, StoppingCriteria

from vila_hd.hub import resolve_checkpoint
from vila_hd.images import DEFAULT_MAX_PIXELS, load_image
from vila_hd.processing import PromptTooLong

ADAPTER_CONFIG = "adapter_config.json"
LOOK_CLOSE_MODES = {"top-down": "after_prompt", "bottom-up": "after_image"}
MODE_NAMES = {v: k for k, v in LOOK_CLOSE_MODES.items()}
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


# --- options ----------------------------------------------------------------------------------------
def parse_look_close(name: str, value: Any) -> int | str | None:
    """``None``, ``"all"`` or a non-negative int (strings of digits accepted); anything else is an error."""
    if value is None or value == "all":
        return value
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a non-negative integer or 'all', got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a non-negative integer or 'all', got {value!r}") from None
    if number < 0 or (isinstance(value, float) and value != number):
        raise ValueError(f"{name} must be a non-negative integer or 'all', got {value!r}")
    return number


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


# --- conversation -------------------------------------------------------------------------------------
@dataclass
class Conversation:
    """Chat state: ``messages`` (``{"role", "content"}``, content holding one ``image_token`` per image) and
    ``images`` (in placeholder order). Images added with :meth:`add_image` join the next user message."""

    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    pending_images: list[Image.Image] = field(default_factory=list)
    image_token: str = "<image>"

    def add_image(self, image: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
        """Load ``image`` (path, bytes, PIL, array) now, so a bad file fails here with a clear message."""
        loaded = load_image(image, max_pixels=max_pixels)
        self.pending_images.append(loaded)
        return loaded

    def add_user(self, text: str) -> None:
        """Append a user message; pending images go first, one placeholder (and a newline) each."""
        if self.image_token in text:
            raise ValueError(
                f"the message contains the image placeholder {self.image_token}; add images with "
                "add_image (/image PATH in the chat) instead"
            )
        content = f"{self.image_token}\n" * len(self.pending_images) + text
        self.messages.append({"role": "user", "content": content})
        self.images.extend(self.pending_images)
        self.pending_images = []

    def add_assistant(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

    def pop_user(self) -> None:
        """Undo the last :meth:`add_user` (its images become pending again): used when an answer fails."""
        if not self.messages or self.messages[-1]["role"] != "user":
            return
        n = self.messages.pop()["content"].count(self.image_token)
        if n:
            self.pending_images = self.images[-n:] + self.pending_images
            del self.images[-n:]

    def clear(self) -> None:
        """Forget every message and image (the system prompt stays)."""
        self.messages, self.images, self.pending_images = [], [], []

    def chat_messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + list(self.messages)


# --- results ------------------------------------------------------------------------------------------
@dataclass
class GenerationStats:
    """What an answer cost. Token counts per image exclude the image-end text (``"\\n"``).

    Counts and image fields are the answer's own (a text-only answer has 0 of each). The times (``*_s``) are
    those of the generate call that produced it, shared by the ``batch_size`` answers of its batch; so is the
    decoding time behind ``tokens_per_s`` (this answer's tokens over the batch's decoding seconds)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    images: int = 0
    image_tokens: int = 0  # all images together
    tokens_per_image: int = 0
    low_res_tokens_per_image: int = 0
    high_res_tokens_per_image: int = 0
    selected_patches: int = 0  # per image, over all high-res scales
    total_patches: int = 0
    look_close_mode: str | None = None
    num_look_close: int | str | None = None
    num_token_look_close: int | str | None = None
    batch_size: int = 1
    preprocess_s: float = 0.0
    prefix_s: float = 0.0
    encode_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    stopped: bool = False  # interrupted by Generation.stop()

    @property
    def selected_pct(self) -> float:
        return 100.0 * self.selected_patches / self.total_patches if self.total_patches else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed (tokens after the first per second of decoding)."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["look_close_mode"] = MODE_NAMES.get(self.look_close_mode, self.look_close_mode)
        for key in ("preprocess_s", "prefix_s", "encode_s", "prefill_s", "decode_s", "total_s"):
            out[key] = round(out[key], 4)
        out["selected_pct"] = round(self.selected_pct, 2)
        out["tokens_per_s"] = round(self.tokens_per_s, 2)
        return out

    def format(self) -> str:
        """Human-readable summary (what ``/stats`` prints)."""
        mode = MODE_NAMES.get(self.look_close_mode, self.look_close_mode)
        budget = (
            f"steps {self.num_look_close}"
            if self.num_token_look_close is None
            else f"tokens {self.num_token_look_close}"
        )
        times = "times" if self.batch_size == 1 else f"times (batch of {self.batch_size})"
        lines = []
        if self.images:
            lines += [
                f"image tokens   {self.tokens_per_image} per image x {self.images} image(s) = {self.image_tokens} "
                f"({self.low_res_tokens_per_image} low-res + {self.high_res_tokens_per_image} high-res per image)",
                f"selected       {self.selected_patches} / {self.total_patches} high-res patches per image "
                f"({self.selected_pct:.1f}%), mode {mode}, {budget}",
            ]
        else:
            lines.append(f"image tokens   0 (no image), mode {mode}, {budget}")
        lines += [
            f"tokens         {self.prompt_tokens} prompt, {self.new_tokens} generated"
            + (" (stopped)" if self.stopped else ""),
            f"{times:<14} preprocess {self.preprocess_s:.3f} s | prefix {self.prefix_s:.3f} s | encode "
            f"{self.encode_s:.3f} s | prefill {self.prefill_s:.3f} s | decode {self.decode_s:.3f} s",
            f"speed          {self.tokens_per_s:.1f} tokens/s (decode), total {self.total_s:.3f} s",
        ]
        return "\n".join(lines)


NO_IMAGE = dict(tokens_per_image=0, low_res_tokens_per_image=0, high_res_tokens_per_image=0, selected_patches=0,
                total_patches=0)


@dataclass
class ImageSelection:
    """Where PS3 looked in one image: per high-res scale a 0/1 ``maps[i]`` (h, w) and ``probs[i]`` (h, w)."""

    image: Image.Image
    maps: list[torch.Tensor]
    probs: list[torch.Tensor]

    @property
    def selected_fraction(self) -> float:
        total = sum(m.numel() for m in self.maps)
        return float(sum(m.sum() for m in self.maps)) / total if total else 0.0

    def figure(self, tile: int = 512) -> Image.Image:
        """Heatmap of the probabilities (top row) and the selected patches (bottom row), one column per scale."""
        from vila_hd.visualize import selection_figure

        return selection_figure(self.image, self.probs, self.maps, tile=tile)

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`figure` as a PNG and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figure().save(path, format="PNG")
        return path


@dataclass
class GenerationResult:
    text: str
    stats: GenerationStats
    token_ids: list[int] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    selection_maps: list[torch.Tensor] | None = None  # per scale (num_images, h, w)
    selection_probs: list[torch.Tensor] | None = None

    def selection(self, index: int = -1) -> ImageSelection | None:
        """The selection of image ``index`` of this answer (default the last); ``None`` without images."""
        if not self.images or self.selection_maps is None:
            return None
        return ImageSelection(
            self.images[index],
            [m[index].cpu() for m in self.selection_maps],
            [p[index].float().cpu() for p in self.selection_probs],
        )


# --- loading ------------------------------------------------------------------------------------------
def choose_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, else CUDA when available, else CPU."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} was requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def choose_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The requested dtype, else bf16 on a GPU that supports it (fp16 on older ones) and fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None and dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} or 'auto'")
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """A PEFT (LoRA) adapter directory is one with ``adapter_config.json``."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def adapter_base(adapter_dir: str) -> str:
    """The base checkpoint an adapter was trained on (``base_model_name_or_path`` of its config)."""
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"adapter {adapter_dir} does not name its base model (base_model_name_or_path in "
            f"{ADAPTER_CONFIG}); pass the base with --model and the adapter with --adapter"
        )
    if not os.path.isdir(base) and os.path.isdir(os.path.join(adapter_dir, base)):
        base = os.path.join(adapter_dir, base)  # a path relative to the adapter
    return base


def load_model(
    model: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    load_4bit: bool = False,
    merge_adapter: bool = True,
    **hub_kwargs: Any,
):
    """Load ``(model, processor)`` for inference (eval mode).

    Args:
        model: checkpoint directory or Hub id, in our layout or VILA's (decided by its ``config.json``);
            a LoRA adapter directory works too (its base is read from ``adapter_config.json``).
        adapter: a LoRA adapter directory or Hub id to apply on ``model``.
        device / dtype: default CUDA + bf16 when a GPU is present, else CPU + fp32.
        device_map: e.g. ``"auto"`` to spread the model over every visible GPU (and CPU) with accelerate.
        load_4bit: quantise the LLM to 4 bits with bitsandbytes (needs a CUDA GPU); vision tower and
            projector stay in ``dtype``.
        merge_adapter: fold the LoRA weights into the base (faster); never done on a 4-bit model.
    """
    model_dir = resolve_checkpoint(model, "model", **hub_kwargs)
    adapter_dir = resolve_checkpoint(adapter, "adapter", **hub_kwargs) if adapter is not None else None
    if adapter_dir is not None and not is_adapter_dir(adapter_dir):
        raise ValueError(f"adapter {adapter_dir} is not a LoRA adapter directory (it has no {ADAPTER_CONFIG})")
    if is_adapter_dir(model_dir):
        if adapter_dir is not None:
            raise ValueError(
                f"{model_dir} is itself an adapter; give its base as --model and it as --adapter, "
                "or the adapter alone as --model"
            )
        adapter_dir, model_dir = model_dir, resolve_checkpoint(adapter_base(model_dir), "base model", **hub_kwargs)

    target = choose_device(device)
    torch_dtype = choose_dtype(dtype, target)
    base = _load_base(model_dir, target, torch_dtype, device_map, load_4bit)
    processor = _load_processor(adapter_dir, model_dir)
    if adapter_dir is not None:
        base = _apply_adapter(base, adapter_dir, merge=merge_adapter and not load_4bit)
    base.set_generation_defaults(processor)
    return base.eval(), processor


def _load_base(model_dir: str, device: torch.device, dtype: torch.dtype, device_map, load_4bit: bool):
    from vila_hd.compat.vila_checkpoint import is_vila_checkpoint
    from vila_hd.model import VilaHDForConditionalGeneration

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir} has no config.json; it is not a VILA-HD checkpoint")
    if is_vila_checkpoint(model_dir):
        if load_4bit:
            raise ValueError(
                f"--load-4bit needs our single-directory layout; convert {model_dir} first with "
                "`vila-hd convert --to hf SRC DST`"
            )
        from vila_hd.compat.vila_checkpoint import load_vila_model

        return load_vila_model(model_dir, dtype=dtype, device=device_map or device)
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device_map or {"": str(device)}}
    if load_4bit:
        kwargs["quantization_config"] = _four_bit_config(device, dtype)
    # Weights are created on the meta device and filled from the safetensors shards on their target
    # device: no second full copy in CPU memory.
    return VilaHDForConditionalGeneration.from_pretrained(model_dir, use_safetensors=True, **kwargs)


def _four_bit_config(device: torch.device, dtype: torch.dtype):
    """The NF4 settings QLoRA trains with (:mod:`vila_hd.model.quantization`: one definition for both)."""
    from vila_hd.model.quantization import nf4_config, require_four_bit_support

    require_four_bit_support("--load-4bit", device)
    return nf4_config(dtype)


def _load_processor(adapter_dir: str | None, model_dir: str):
    from vila_hd.processing import PROCESSOR_CONFIG, VilaHDProcessor

    if adapter_dir is not None and os.path.isfile(os.path.join(adapter_dir, PROCESSOR_CONFIG)):
        return VilaHDProcessor.from_pretrained(adapter_dir)  # saved with the adapter (e.g. new tokens)
    return VilaHDProcessor.from_pretrained(model_dir)


def _apply_adapter(model, adapter_dir: str, merge: bool):
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ImportError(f"loading the adapter {adapter_dir} needs peft (pip install peft)") from err
    from vila_hd.hub import refuse_unsafe_adapter

    refuse_unsafe_adapter(adapter_dir)  # before peft would unpickle adapter_model.bin (weights-only)
    import warnings

    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing: not ours
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        wrapped = PeftModel.from_pretrained(model, adapter_dir, trust_remote_code=False)
    # peft injects the LoRA layers in place: the unwrapped model runs with them (merged or not).
    return wrapped.merge_and_unload() if merge else wrapped.get_base_model()


# --- generation internals ------------------------------------------------------------------------------
class IncrementalText:
    """The text of a growing token list, handed out as soon as it decodes to complete characters (a
    byte-level token may end inside a UTF-8 character). Each :meth:`feed` decodes only a short window: the
    tokens since the last text handed out plus the one before them (so that tokenizers which drop a leading
    space at the start of a decode still get it right)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._start = 0  # window start (one token before the first unsent one)
        self._sent = 0  # tokens whose text is out

    def feed(self, ids: list[int], final: bool = False) -> str | None:
        """The new text of ``ids`` (the whole list so far), or ``None`` while there is none that is whole."""
        done = self.tokenizer.decode(ids[self._start : self._sent], skip_special_tokens=True)
        text = self.tokenizer.decode(ids[self._start :], skip_special_tokens=True)
        if len(text) > len(done) and (final or not text.endswith("\ufffd")):
            self._start, self._sent = self._sent, len(ids)
            return text[len(done) :]
        return None


class _TextChunks(BaseStreamer):
    """A streamer (``generate(streamer=...)``) that turns the new ids into text chunks on a queue.

    Unlike transformers' ``TextIteratorStreamer`` (which waits for whole words), it hands out text as soon
    as it decodes to complete characters (:class:`IncrementalText`)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # SimpleQueue: its get() survives a KeyboardInterrupt in the reading thread without leaving a lock held
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self._ids: list[int] = []
        self._text = IncrementalText(tokenizer)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        self._ids.extend(value.reshape(-1).tolist())
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)
        self.queue.put(None)

    def _emit(self, final: bool) -> None:
        chunk = self._text.feed(self._ids, final)
        if chunk is not None:
            self.queue.put(chunk)


class _Clock(StoppingCriteria):
    """Stops generation when ``event`` is set, and records when each token was produced (a stopping
    criterion runs once per generated token) and when the LLM decoder ran (forward hooks)."""

    def __init__(self, event: threading.Event, decoder: torch.nn.Module, device: torch.device):
        self.event = event
        self.cuda = device.type == "cuda"
        self.token_times: list[float] = []
        self.calls: list[tuple[float, float]] = []
        self._start_call = 0.0
        self._handles = [decoder.register_forward_pre_hook(self._pre), decoder.register_forward_hook(self._post)]

    def _now(self) -> float:
        if self.cuda and not self.token_times:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, module, args):
        self._start_call = self._now()

    def _post(self, module, args, output):
        if not self.token_times:  # only the calls before the first token are needed
            self.calls.append((self._start_call, self._now()))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.token_times.append(self._now())
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


class Generation:
    """A streamed answer: iterate for text chunks; :meth:`stop` (from any thread) ends it early.

    After the iteration, :attr:`result` holds the full :class:`GenerationResult`."""

    def __init__(self, run, chunks: _TextChunks, stop_event: threading.Event):
        self._chunks = chunks
        self._stop = stop_event
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._drained = False
        self.result: GenerationResult | None = None
        self.thread = threading.Thread(target=self._work, args=(run,), daemon=True, name="vila-hd-generate")
        self.thread.start()

    def _work(self, run) -> None:
        try:
            self.result = run()
        except BaseException as err:  # handed to the consumer's thread
            self._error = err
            self._chunks.queue.put(None)
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def stop(self) -> None:
        """Ask the generation to end after the current token."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def __iter__(self) -> Iterator[str]:
        while not self._drained:
            chunk = self._chunks.queue.get()
            if chunk is None:
                self._drained = True
                break
            yield chunk
        self.wait()

    def wait(self) -> GenerationResult:
        """Block until generation ends (stopping it is up to the caller); return the result."""
        self.thread.join()
        if self._error is not None:
            raise self._error
        return self.result


# --- the engine ---------------------------------------------------------------------------------------------
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
        """:func:`load_model` + an engine around it."""
        loaded, processor = load_model(model, adapter, **load_kwargs)
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
