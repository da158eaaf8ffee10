"""LLaVA/VILA conversations <-> messages, known templates and the template probes."""

from __future__ import annotations

import jinja2
import pytest

from vila_hd.compat.conversation import llava_to_messages, messages_to_llava
from vila_hd.templates import (
    CHATML_TEMPLATE,
    KNOWN_TEMPLATES,
    LLAMA3_TEMPLATE,
    VICUNA_V1_TEMPLATE,
    assistant_turn_end_text,
    fallback_chat_template,
    flatten_messages,
    last_token_before,
    latest_user_turn_end,
    template_family,
    user_turn_end_text,
)


def jinja_render(template: str):
    compiled = jinja2.Environment().from_string(template)

    def render(messages, add_generation_prompt):
        return compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token="<s>", eos_token="</s>"
        )

    return render


def test_llava_roundtrip():
    conv = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A cat."},
    ]
    messages = llava_to_messages(conv)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == "<image>\nWhat is it?"
    assert messages_to_llava(messages) == conv


@pytest.mark.parametrize(
    "turn, match",
    [
        ({"from": "robot", "value": "x"}, "unknown sender"),
        ({"from": "human"}, "'from' and 'value'"),
        ({"from": "human", "value": 3}, "non-string"),
    ],
)
def test_llava_bad_turns(turn, match):
    with pytest.raises(ValueError, match=match):
        llava_to_messages([turn])


def test_flatten_typed_parts():
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "a.png"},
                {"type": "text", "text": "Hi"},
                {"type": "image", "url": "b.png"},
            ],
        },
        {"role": "assistant", "content": "Hello"},
    ]
    flat, images = flatten_messages(messages)
    assert flat[0]["content"] == "<image>Hi<image>"
    assert images == ["a.png", "b.png"]
    with pytest.raises(ValueError, match="unsupported type"):
        flatten_messages([{"role": "user", "content": [{"type": "audio"}]}])


@pytest.mark.parametrize(
    "template, user_end, turn_end",
    [
        (CHATML_TEMPLATE, "<|im_end|>\n<|im_start|>assistant", "<|im_end|>"),
        (LLAMA3_TEMPLATE, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>", "<|eot_id|>"),
        (VICUNA_V1_TEMPLATE, "ASSISTANT:", "</s>"),
    ],
)
def test_template_probes(template, user_end, turn_end):
    render = jinja_render(template)
    assert user_turn_end_text(render) == user_end
    assert assistant_turn_end_text(render) == turn_end


@pytest.mark.parametrize("template", list(KNOWN_TEMPLATES.values()))
def test_latest_user_turn_is_found(template):
    """The prompt position is the end of the LATEST user message (multi-turn chat)."""
    render = jinja_render(template)
    messages = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "answer one"},
        {"role": "user", "content": "second question"},
    ]
    text = render(messages, True)
    end = latest_user_turn_end(text, user_turn_end_text(render))
    assert text[:end].endswith("second question")
    assert latest_user_turn_end("no template here", user_turn_end_text(render)) is None


def test_last_token_before():
    offsets = [(0, 3), (3, 5), (5, 5), (5, 9)]
    assert last_token_before(offsets, 5) == 1
    assert last_token_before(offsets, 4) == 1
    assert last_token_before(offsets, 9) == 3


def test_template_family_by_config_fields():
    from transformers import LlamaConfig, Qwen2Config

    assert template_family(Qwen2Config()) == "chatml"
    assert template_family(LlamaConfig(vocab_size=128256)) == "llama-3"
    assert template_family(LlamaConfig(vocab_size=32000)) == "vicuna-v1"
    assert fallback_chat_template({"model_type": "qwen2"}) == CHATML_TEMPLATE
    with pytest.raises(ValueError, match="no fallback chat template"):
        template_family({"model_type": "gpt2"})
