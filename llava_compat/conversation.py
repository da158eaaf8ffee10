"""LLaVA/VILA conversations <-> Hugging Face chat messages (the templates and their probes:
:mod:`vila_hd.templates`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vila_hd.templates import IMAGE_TOKEN, flatten_messages

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
