"""Chat templates: the known template strings (fallbacks when a tokenizer ships none), their files in a
checkpoint, and the template probes VILA-HD needs (where a user turn ends, which token ends an assistant turn).

Everything template-specific is found by *rendering* dummy turns with the chat template, never by
hard-coding one family's token ids. The probes take a ``render(messages, add_generation_prompt) -> str``
callable, so they work with a tokenizer's ``apply_chat_template`` or with a bare Jinja string. Hugging Face
chat messages with typed content parts are flattened to template input here too (:func:`flatten_messages`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

IMAGE_TOKEN = "<image>"
SENTINEL = "VILAHDSENTINEL7F3A"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

Render = Callable[[list[dict[str, Any]], bool], str]

# --- known templates (fallbacks when a tokenizer ships none) -------------------------------------
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
VICUNA_V1_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
    '{% else %}{{ "A chat between a curious user and an artificial intelligence assistant. The assistant gives '
    "helpful, detailed, and polite answers to the user's questions. \" }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
KNOWN_TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama-3": LLAMA3_TEMPLATE, "vicuna-v1": VICUNA_V1_TEMPLATE}


def template_family(text_config) -> str:
    """Pick the fallback template family from an LLM config (by its fields, not by a path or name)."""
    model_type = getattr(text_config, "model_type", None) or (text_config or {}).get("model_type")
    vocab = getattr(text_config, "vocab_size", None)
    if vocab is None and isinstance(text_config, dict):
        vocab = text_config.get("vocab_size")
    if model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        return "chatml"
    if model_type == "llama" and vocab is not None and vocab >= 128000:
        return "llama-3"
    if model_type in ("llama", "mistral"):
        return "vicuna-v1"
    raise ValueError(
        f"no fallback chat template for an LLM of model_type={model_type!r}; give the tokenizer a chat template "
        f"or pass one of {sorted(KNOWN_TEMPLATES)}"
    )


def fallback_chat_template(text_config) -> str:
    return KNOWN_TEMPLATES[template_family(text_config)]


# --- messages -> template input -------------------------------------------------------------------
def flatten_messages(
    messages: Iterable[dict[str, Any]], image_token: str = IMAGE_TOKEN
) -> tuple[list[dict[str, str]], list[Any]]:
    """Turn typed content parts (``[{"type": "image", "image": ...}, {"type": "text", "text": ...}]``) into
    plain strings with ``image_token`` where each image was; returns ``(messages, images)``, images in
    order of appearance (``None`` for an image part that carries no image)."""
    out, images = [], []
    for i, m in enumerate(messages):
        if "role" not in m:
            raise ValueError(f"message {i} has no 'role': {m!r}")
        content = m.get("content", "")
        if isinstance(content, str):
            images.extend([None] * content.count(image_token))
            out.append({"role": m["role"], "content": content})
            continue
        parts = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                parts.append(part.get("text", ""))
                images.extend([None] * part.get("text", "").count(image_token))
            elif kind == "image":
                parts.append(image_token)
                images.append(next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None))
            else:
                raise ValueError(f"message {i} has a content part of unsupported type {kind!r}")
        out.append({"role": m["role"], "content": "".join(parts)})
    return out, images


# --- template probes ------------------------------------------------------------------------------
def user_turn_end_text(render: Render) -> str:
    """The text that follows a user message's content up to the assistant's reply (stripped), e.g.
    ``<|im_end|>\\n<|im_start|>assistant`` for ChatML; found by rendering a dummy user turn."""
    text = render([{"role": "user", "content": SENTINEL}], True)
    if SENTINEL not in text:
        raise ValueError("the chat template drops the user message content; cannot locate the end of a user turn")
    end = text.split(SENTINEL)[-1].strip()
    if not end:
        raise ValueError("the chat template adds nothing after a user message; cannot locate the end of a user turn")
    return end


def assistant_turn_end_text(render: Render) -> str:
    """The text that closes an assistant turn (e.g. ``<|im_end|>``), found by rendering a dummy exchange."""
    text = render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": SENTINEL}], False)
    if SENTINEL not in text:
        raise ValueError("the chat template drops the assistant message content")
    tail = text.split(SENTINEL)[-1]
    stripped = tail.strip()
    return stripped.split()[0] if stripped else ""


def latest_user_turn_end(text: str, end_text: str) -> int | None:
    """Character index in ``text`` where the latest user message's content ends (``None`` if no user turn
    is found, e.g. a raw prompt without a chat template)."""
    index = text.rfind(end_text)
    if index < 0:
        return None
    # Whitespace the template puts before its end marker belongs to the template, not to the message.
    while index > 0 and text[index - 1] in " \t" and not end_text[:1].isspace():
        index -= 1
    return index


def last_token_before(offsets: Sequence[tuple[int, int]], char_index: int) -> int:
    """Index of the last token that starts before ``char_index`` (offsets as from a fast tokenizer)."""
    last = 0
    for i, (start, end) in enumerate(offsets):
        if start < char_index and end > start:
            last = i
        elif start >= char_index and end > start:
            break
    return last


def render_with(tokenizer, chat_template: str | None) -> Render:
    """A ``render`` callable using a tokenizer's ``apply_chat_template`` with ``chat_template``."""

    def render(messages, add_generation_prompt):
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    return render


def stop_token_ids(tokenizer, assistant_end: str | None) -> list[int]:
    """Token ids that end an assistant turn: the first token of ``assistant_end`` (the template's end-of-turn
    text, see :func:`assistant_turn_end_text`) and the tokenizer's EOS."""
    ids = []
    if assistant_end:
        ids.extend(tokenizer(assistant_end, add_special_tokens=False).input_ids[:1])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def turn_ends(tokenizer, chat_template: str | None) -> tuple[str | None, list[int]]:
    """``(user-turn end text, stop token ids)`` of ``chat_template`` rendered by ``tokenizer`` (see
    :func:`user_turn_end_text`, :func:`stop_token_ids`); without a template: ``(None, [EOS])``."""
    if not chat_template:
        return None, stop_token_ids(tokenizer, None)
    render = render_with(tokenizer, chat_template)
    return user_turn_end_text(render), stop_token_ids(tokenizer, assistant_turn_end_text(render))


def image_token_id(tokenizer, image_token: str) -> int:
    """The id of the placeholder ``image_token``; an error if the tokenizer does not know it."""
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {image_token!r} token; add it (tokenizer.add_tokens) first")
    return token_id


# --- template files ------------------------------------------------------------------------------
def read_chat_template(path: str | os.PathLike) -> str | None:
    """Chat template stored in ``chat_template.jinja`` or, for older checkpoints, ``tokenizer_config.json``."""
    jinja = os.path.join(path, CHAT_TEMPLATE_FILE)
    if os.path.exists(jinja):
        with open(jinja) as f:
            return f.read()
    cfg = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg):
        with open(cfg) as f:
            template = json.load(f).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def write_chat_template(path: str | os.PathLike, template: str | None) -> None:
    """Write the template to ``chat_template.jinja`` and into ``tokenizer_config.json``."""
    if not template:
        return
    with open(os.path.join(path, CHAT_TEMPLATE_FILE), "w") as f:
        f.write(template)
    cfg_path = os.path.join(path, "tokenizer_config.json")
    cfg = {}
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
    cfg["chat_template"] = template
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
