"""LLaVA/VILA conversations <-> Hugging Face chat messages, known chat templates, and the template
probes VILA-HD needs (where a user turn ends, which token ends an assistant turn).

Everything template-specific is found by *rendering* dummy turns with the chat template, never by
hard-coding one family's token ids. The probes take a ``render(messages, add_generation_prompt) -> str``
callable, so they work with a tokenizer's ``apply_chat_template`` or with a bare Jinja string.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

IMAGE_TOKEN = "<image>"
SENTINEL = "VILAHDSENTINEL7F3A"

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


# --- LLaVA/VILA <-> messages ---------------------------------------------------------------------
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_MESSAGE_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}


def llava_to_messages(conversations: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
    """LLaVA/VILA ``[{"from": "human"|"gpt"|"system", "value": str}]`` -> ``[{"role", "content"}]``.

    ``<image>`` placeholders stay in the text where they are.
    """
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"conversation turn {i} must be a dict with 'from' and 'value', got {turn!r}")
        role = _LLAVA_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise ValueError(f"conversation turn {i} has unknown sender {turn['from']!r}; expected human/gpt/system")
        if not isinstance(turn["value"], str):
            raise ValueError(f"conversation turn {i} has a non-string value: {type(turn['value']).__name__}")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def messages_to_llava(messages: Iterable[dict[str, Any]], image_token: str = IMAGE_TOKEN) -> list[dict[str, str]]:
    """``[{"role", "content"}]`` (string or typed-part content) -> LLaVA ``[{"from", "value"}]``."""
    text_messages, _ = flatten_messages(messages, image_token)
    out = []
    for i, m in enumerate(text_messages):
        sender = _MESSAGE_ROLES.get(m["role"])
        if sender is None:
            raise ValueError(f"message {i} has role {m['role']!r}, which LLaVA conversations cannot hold")
        out.append({"from": sender, "value": m["content"]})
    return out


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
