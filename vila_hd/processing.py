"""VilaHDProcessor: PS3 image processor + tokenizer + chat template, and ``<image>`` expansion.

Each ``<image>`` placeholder becomes ``N`` image tokens followed by the image-end text (``"\\n"``, one
token for Qwen2), with ``N`` from :func:`vila_hd.model.token_layout.image_token_layout`, the function the
model uses for the same count. The processor also returns ``prompt_positions``: the index of the last
token of the **latest** user message (the question being answered), where the model reads the LLM hidden
state that steers top-down patch selection. (The reference uses the first user message; in a multi-turn
chat the latest question is the one the selection should serve.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import AutoTokenizer, BatchFeature

from vila_hd.model.token_layout import LookClose, TokenLayoutSpec, image_token_layout
from vila_hd.templates import (
    assistant_turn_end_text,
    fallback_chat_template,
    flatten_messages,
    image_token_id,
    last_token_before,
    latest_user_turn_end,
    read_chat_template,
    render_with,
    stop_token_ids,
    user_turn_end_text,
    write_chat_template,
)

PROCESSOR_CONFIG = "processor_config.json"


class PromptTooLong(ValueError):
    """A prompt is longer than the context or ``max_length`` after image expansion (raised before image work)."""

    def __init__(self, message: str, index: int, length: int, limit: int):
        super().__init__(message)
        self.index, self.length, self.limit = index, length, limit


class VilaHDProcessor:
    """Turns chats/prompts and images into the inputs of ``VilaHDForConditionalGeneration.generate``.

    Args:
        image_processor: a ``PS3ImageProcessor`` (squash-resize to the largest PS3 scale, normalise).
        tokenizer: the LLM tokenizer; must know the image placeholder token.
        layout: :class:`TokenLayoutSpec` (or its dict) of the model, see ``TokenLayoutSpec.from_config``.
        chat_template: Jinja chat template; default the tokenizer's own.
        image_token: placeholder in prompts (one per image).
        image_end_text: text appended after each image's tokens.
    """

    def __init__(
        self,
        image_processor,
        tokenizer,
        layout: TokenLayoutSpec | dict,
        chat_template: str | None = None,
        image_token: str = "<image>",
        image_end_text: str = "\n",
        padding_side: str = "left",
    ):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.layout = layout if isinstance(layout, TokenLayoutSpec) else TokenLayoutSpec.from_dict(layout)
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token = image_token
        self.image_end_text = image_end_text
        self.padding_side = padding_side
        self.image_token_id = image_token_id(tokenizer, image_token)
        self.image_end_ids = tokenizer(image_end_text, add_special_tokens=False).input_ids if image_end_text else []

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config, tokenizer, image_processor=None, chat_template: str | None = None) -> VilaHDProcessor:
        """Build from a ``VilaHDConfig`` (layout, image token) and the LLM tokenizer.

        Without a chat template on the tokenizer, the fallback of the LLM's family is used."""
        if image_processor is None:
            from vila_hd.ps3 import PS3ImageProcessor

            size = config.vision_config.ps3_scales[-1]
            image_processor = PS3ImageProcessor(image_size=size)
        template = (
            chat_template or getattr(tokenizer, "chat_template", None) or fallback_chat_template(config.text_config)
        )
        return cls(
            image_processor,
            tokenizer,
            TokenLayoutSpec.from_config(config),
            chat_template=template,
            image_token=config.image_token,
            image_end_text=config.image_end_text,
        )

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, **kwargs) -> VilaHDProcessor:
        """Load from a directory or Hub id written by :meth:`save_pretrained`, or from a VILA checkpoint."""
        from vila_hd.hub import resolve_model_dir
        from vila_hd.model.vila_layout import is_vila_checkpoint

        path = resolve_model_dir(path_or_id, kind="processor", what="VILA-HD processor", **kwargs)
        if not os.path.exists(os.path.join(path, PROCESSOR_CONFIG)):
            if is_vila_checkpoint(path):
                return load_vila_processor(path)
            raise FileNotFoundError(f"{path} has no {PROCESSOR_CONFIG} and is not a VILA checkpoint")
        from vila_hd.ps3 import PS3ImageProcessor

        with open(os.path.join(path, PROCESSOR_CONFIG)) as f:
            cfg = json.load(f)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # resolve_model_dir checked it
        template = read_chat_template(path) or getattr(tokenizer, "chat_template", None)
        return cls(
            PS3ImageProcessor.from_pretrained(path),
            tokenizer,
            TokenLayoutSpec.from_dict(cfg["layout"]),
            chat_template=template,
            image_token=cfg.get("image_token", "<image>"),
            image_end_text=cfg.get("image_end_text", "\n"),
            padding_side=cfg.get("padding_side", "left"),
        )

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write tokenizer, image processor, ``processor_config.json`` and the chat template (to both
        ``chat_template.jinja`` and ``tokenizer_config.json``: older transformers read only the latter)."""
        os.makedirs(save_directory, exist_ok=True)
        self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(save_directory)
        self.image_processor.save_pretrained(save_directory)
        write_chat_template(save_directory, self.chat_template)
        cfg = {
            "processor_class": type(self).__name__,
            "image_token": self.image_token,
            "image_end_text": self.image_end_text,
            "padding_side": self.padding_side,
            "layout": self.layout.to_dict(),
        }
        with open(os.path.join(save_directory, PROCESSOR_CONFIG), "w") as f:
            json.dump(cfg, f, indent=2)

    # --- template probes ----------------------------------------------------------------------
    def _render(self, messages, add_generation_prompt):
        return render_with(self.tokenizer, self.chat_template)(messages, add_generation_prompt)

    def _probe(self, name: str, probe):
        """Template probes are pure functions of the template: compute once per template."""
        key = (name, self.chat_template)
        cache = self.__dict__.setdefault("_probes", {})
        if key not in cache:
            cache[key] = probe(self._render) if self.chat_template else None
        return cache[key]

    @property
    def prompt_end_text(self) -> str | None:
        """Text that closes a user turn in the chat template (``None`` without a template)."""
        return self._probe("user_end", user_turn_end_text)

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end an assistant turn (the template's end-of-turn token and the tokenizer's EOS)."""
        return stop_token_ids(self.tokenizer, self._probe("assistant_end", assistant_turn_end_text))

    # --- chat -----------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        conversation,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        return_dict: bool = True,
        images=None,
        **kwargs,
    ):
        """Render a chat (or a batch of chats) to text; with ``tokenize=True`` return model inputs.

        Message content may be a string with ``<image>`` placeholders or typed parts
        (``{"type": "image", "image": PIL | path}``, ``{"type": "text", "text": ...}``); the images of
        typed parts are collected in order unless ``images`` is given.
        """
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        chats = conversation if batched else [conversation]
        texts, found = [], []
        for chat in chats:
            messages, chat_images = flatten_messages(chat, self.image_token)
            texts.append(self._render(messages, add_generation_prompt))
            found.append([im for im in chat_images if im is not None])
        if not tokenize:
            return texts if batched else texts[0]
        if images is None and any(found):
            images = found if batched else found[0]
        inputs = self(text=texts if batched else texts[0], images=images, **kwargs)
        return inputs if return_dict else inputs["input_ids"]

    # --- main entry -----------------------------------------------------------------------------
    def num_image_tokens(self, image_hw: tuple[int, int] | None = None, **look_close) -> int:
        """Image tokens per image (placeholder run length); the image-end text adds ``len(image_end_ids)``."""
        return image_token_layout(self.layout, image_hw, **look_close).num_tokens

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images=None,
        *,
        num_look_close: LookClose = None,
        num_token_look_close: LookClose = None,
        only_select_first_n_scale: int | None = None,
        return_tensors: str | None = "pt",
        add_special_tokens: bool | None = None,
        padding_side: str | None = None,
        max_length: int | None = None,
        preprocess: Callable[[list[Any]], torch.Tensor] | None = None,
        **_unused: Any,
    ) -> BatchFeature:
        """Tokenize prompts, expand ``<image>`` placeholders and preprocess images.

        Args:
            text: a prompt or a batch of prompts (already rendered with the chat template, see
                :meth:`apply_chat_template`), with one ``<image>`` per image.
            images: ``None``; one image; a flat list (in placeholder order over the whole batch); or one
                list per prompt. PIL images or paths/URLs (loaded with ``vila_hd.images.load_image``).
            num_look_close / num_token_look_close / only_select_first_n_scale: selection budget for these
                inputs (default: the model's); the same values are returned so ``generate(**inputs)`` uses
                them.
            max_length: refuse (:class:`PromptTooLong`) a prompt longer than this after image expansion.
            preprocess: turns the flat image list into (num_images, 3, S, S) pixel values (default
                :meth:`preprocess_images`), e.g. one that keeps them so a chat does not resize the same image at
                every turn.

        Lengths are checked before any image is loaded or resized: a prompt that cannot run costs no image work.

        Returns:
            ``BatchFeature`` with ``input_ids``, ``attention_mask`` (left padding by default),
            ``prompt_positions`` (B,), ``pixel_values`` (num_images, 3, S, S) when there are images, and
            the look-close settings.
        """
        if text is None:
            raise ValueError("text is required (render a chat with apply_chat_template first)")
        texts = [text] if isinstance(text, str) else list(text)
        per_prompt = self._images_per_prompt(texts, images)
        flat_images = [im for group in per_prompt for im in group]
        look_close = self.layout.resolve_look_close(num_look_close, num_token_look_close)
        # Every image is squash-resized to the processor's size, so the token count is known before loading.
        image_hw = tuple(self.image_processor.image_size) if flat_images else None
        n_tokens = image_token_layout(
            self.layout,
            image_hw,
            num_look_close=look_close[0],
            num_token_look_close=look_close[1],
            only_select_first_n_scale=only_select_first_n_scale,
        ).num_tokens
        rows, positions = [], []
        for i, t in enumerate(texts):
            ids, pos = self._expand(*self._tokenize(t, add_special_tokens), n_tokens)
            self._check_length(i, len(ids), len(per_prompt[i]), n_tokens, max_length)
            rows.append(ids)
            positions.append(pos)
        input_ids, attention_mask, positions = self._pad(rows, positions, padding_side or self.padding_side)
        data = {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_positions": positions}
        if flat_images:
            data["pixel_values"] = (preprocess or self.preprocess_images)(flat_images)
            if tuple(data["pixel_values"].shape[-2:]) != image_hw:
                raise RuntimeError(f"the image processor returned {tuple(data['pixel_values'].shape[-2:])} images, "
                                   f"not its image_size {image_hw}")
        out = BatchFeature(data=data, tensor_type=return_tensors)
        out["num_look_close"], out["num_token_look_close"] = look_close
        if only_select_first_n_scale is not None:
            out["only_select_first_n_scale"] = only_select_first_n_scale
        return out

    # --- pieces -----------------------------------------------------------------------------------
    def _check_length(self, index: int, length: int, images: int, n_tokens: int, max_length: int | None) -> None:
        context = self.layout.max_context
        if context is not None and length > context:
            raise PromptTooLong(
                f"prompt {index}: sequence of {length} tokens after image expansion ({images} image(s) x {n_tokens} "
                f"tokens) exceeds the LLM context of {context} (max_position_embeddings)", index, length, context)
        if max_length is not None and length > max_length:
            raise PromptTooLong(
                f"prompt {index}: sequence of {length} tokens after image expansion ({images} image(s) x {n_tokens} "
                f"tokens) exceeds max_length={max_length}", index, length, max_length)

    def _images_per_prompt(self, texts: list[str], images) -> list[list[Any]]:
        counts = [t.count(self.image_token) for t in texts]
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        nested = len(images) > 0 and all(isinstance(x, (list, tuple)) for x in images)
        if nested:
            if len(images) != len(texts):
                raise ValueError(f"got image lists for {len(images)} prompts but {len(texts)} prompts")
            groups = [list(g) for g in images]
        else:
            total = sum(counts)
            if len(images) != total:
                if total == 0:
                    raise ValueError(
                        f"the prompt has no {self.image_token} placeholder but {len(images)} image(s) were given; "
                        f"put {self.image_token} where each image belongs"
                    )
                if len(texts) == 1:
                    raise ValueError(
                        f"prompt 0 has {counts[0]} {self.image_token} placeholder(s) but {len(images)} image(s) "
                        "were given"
                    )
                raise ValueError(
                    f"the prompts have {total} {self.image_token} placeholders in all ({counts}) but "
                    f"{len(images)} image(s) were given"
                )
            groups, start = [], 0
            for c in counts:
                groups.append(list(images[start : start + c]))
                start += c
        for i, (c, g) in enumerate(zip(counts, groups)):
            if c != len(g):
                if c == 0:
                    raise ValueError(
                        f"prompt {i} has no {self.image_token} placeholder but {len(g)} image(s) were given"
                    )
                raise ValueError(
                    f"prompt {i} has {c} {self.image_token} placeholder(s) but {len(g)} image(s) were given"
                )
        return groups

    def preprocess_images(self, images: list[Any]) -> torch.Tensor:
        """(num_images, 3, S, S) model inputs; the PS3 image processor loads paths, bytes, arrays and PIL images
        safely (:mod:`vila_hd.images`)."""
        return torch.as_tensor(self.image_processor.preprocess(images, return_tensors="pt")["pixel_values"])

    def _tokenize(self, text: str, add_special_tokens: bool | None) -> tuple[list[int], int]:
        """Token ids of ``text`` (placeholders unexpanded) and the index of the prompt token."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and text.startswith(bos))
        end_char = None
        end_text = self.prompt_end_text
        if end_text:
            end_char = latest_user_turn_end(text, end_text)
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            pos = len(ids) - 1 if end_char is None else last_token_before(enc["offset_mapping"], end_char)
        else:
            ids = list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)
            if end_char is None:
                pos = len(ids) - 1
            else:
                head = self.tokenizer(text[:end_char], add_special_tokens=add_special_tokens).input_ids
                pos = len(head) - 1
        return ids, max(pos, 0)

    def _expand(self, ids: list[int], pos: int, n_tokens: int) -> tuple[list[int], int]:
        out, new_pos = [], pos
        extra = n_tokens - 1 + len(self.image_end_ids)
        for i, t in enumerate(ids):
            if t == self.image_token_id:
                out.extend([t] * n_tokens)
                out.extend(self.image_end_ids)
                if i < pos:
                    new_pos += extra
            else:
                out.append(t)
        return out, new_pos

    def _pad(self, rows: list[list[int]], positions: list[int], side: str):
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id or 0
        length = max(len(r) for r in rows)
        ids, mask, pos = [], [], []
        for r, p in zip(rows, positions):
            n = length - len(r)
            if side == "left":
                ids.append([pad_id] * n + r)
                mask.append([0] * n + [1] * len(r))
                pos.append(p + n)
            else:
                ids.append(r + [pad_id] * n)
                mask.append([1] * len(r) + [0] * n)
                pos.append(p)
        return ids, mask, pos

    # --- decoding ---------------------------------------------------------------------------------
    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def load_vila_processor(path: str | os.PathLike, config=None) -> VilaHDProcessor:
    """Processor of a VILA checkpoint: ``llm/`` (tokenizer, chat template) and ``vision_tower/`` (image
    processor); ``config``: its :func:`~vila_hd.model.vila_layout.read_vila_config`, read if not given."""
    from vila_hd.model.vila_layout import check_layout, read_vila_config, read_vila_tokenizer
    from vila_hd.ps3 import PS3ImageProcessor

    path = os.fspath(path)
    if config is None:
        config = read_vila_config(path)  # checks the layout and refuses custom code
    else:
        check_layout(path)  # a given config skipped those checks
    tokenizer, template = read_vila_tokenizer(path, config)
    image_processor = PS3ImageProcessor.from_pretrained(os.path.join(path, "vision_tower"))
    return VilaHDProcessor.from_config(config, tokenizer, image_processor=image_processor, chat_template=template)
