"""VilaHDProcessor: placeholder expansion with the model's count, prompt positions, chat templates,
save/load, and clear errors on bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vila_hd.builder import build_tiny_processor
from vila_hd.model.tiny import build_tiny_tokenizer, tiny_config
from vila_hd.model.token_layout import TokenLayoutSpec, image_token_layout
from vila_hd.processing import VilaHDProcessor


def rgb(seed: int, size=(200, 150)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor() -> VilaHDProcessor:
    return build_tiny_processor("tiny")


def chat(processor, content, history=()):
    return processor.apply_chat_template([*history, {"role": "user", "content": content}])


def test_expansion_uses_the_model_count(processor):
    text = chat(processor, "<image>\nWhat color is the car?")
    inputs = processor(text=text, images=[rgb(0)])
    n = image_token_layout(TokenLayoutSpec.from_config(tiny_config("tiny")), (448, 448)).num_tokens
    assert n == processor.num_image_tokens() == 16 + 64  # 4x4 low-res + 2 steps x 32 groups
    ids = inputs["input_ids"][0]
    image_id = processor.image_token_id
    assert int((ids == image_id).sum()) == n
    run_end = int((ids == image_id).nonzero().max())
    assert ids[run_end + 1 : run_end + 1 + len(processor.image_end_ids)].tolist() == processor.image_end_ids
    assert inputs["pixel_values"].shape == (1, 3, 448, 448)
    assert inputs["num_look_close"] == 2 and inputs["num_token_look_close"] is None


def test_look_close_override_changes_count(processor):
    text = chat(processor, "<image>Describe the image.")
    small = processor(text=text, images=rgb(0), num_look_close=1)
    tokens = processor(text=text, images=rgb(0), num_token_look_close=64)
    image_id = processor.image_token_id
    assert int((small["input_ids"] == image_id).sum()) == 16 + 32
    assert int((tokens["input_ids"] == image_id).sum()) == 16 + 16
    assert small["num_look_close"] == 1 and tokens["num_token_look_close"] == 64


def test_prompt_position_is_end_of_latest_user_message(processor):
    history = [{"role": "user", "content": "<image>What color is the car?"}, {"role": "assistant", "content": "red"}]
    text = chat(processor, "Where is the cat?", history)
    inputs = processor(text=text, images=[rgb(1)])
    pos = int(inputs["prompt_positions"][0])
    ids = inputs["input_ids"][0].tolist()
    assert processor.tokenizer.decode(ids[: pos + 1]).endswith("Where is the cat?")
    assert ids[pos + 1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_raw_prompt_without_template_uses_last_token(processor):
    inputs = processor(text="<image> describe", images=[rgb(2)])
    assert int(inputs["prompt_positions"][0]) == inputs["input_ids"].shape[1] - 1


def test_batch_left_padding_and_positions(processor):
    texts = [chat(processor, "<image>What color is the car?"), chat(processor, "Hi")]
    inputs = processor(text=texts, images=[rgb(3)])
    ids, mask, pos = inputs["input_ids"], inputs["attention_mask"], inputs["prompt_positions"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[0].all() and not mask[1].all() and mask[1, -1] == 1 and mask[1, 0] == 0
    assert processor.tokenizer.decode(ids[1, : pos[1] + 1], skip_special_tokens=True).endswith("Hi")
    assert inputs["pixel_values"].shape[0] == 1


def test_nested_images_and_multi_image_prompt(processor):
    texts = [chat(processor, "<image><image>Compare them."), chat(processor, "<image>And this?")]
    inputs = processor(text=texts, images=[[rgb(4), rgb(5)], [rgb(6)]])
    assert inputs["pixel_values"].shape[0] == 3
    n = processor.num_image_tokens()
    assert (inputs["input_ids"] == processor.image_token_id).sum(1).tolist() == [2 * n, n]


def test_typed_message_parts_collect_images(processor):
    messages = [{"role": "user", "content": [{"type": "image", "image": rgb(7)}, {"type": "text", "text": "Hi"}]}]
    inputs = processor.apply_chat_template(messages, tokenize=True)
    assert inputs["pixel_values"].shape[0] == 1
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == processor.num_image_tokens()


def test_image_paths_are_loaded(processor, tmp_path):
    path = tmp_path / "a.png"
    rgb(8).save(path)
    inputs = processor(text=chat(processor, "<image>What?"), images=[str(path)])
    assert inputs["pixel_values"].shape == (1, 3, 448, 448)


# --- bad input ------------------------------------------------------------------------------------------
def test_more_placeholders_than_images(processor):
    with pytest.raises(ValueError, match=r"prompt 0 has 2 <image> placeholder\(s\) but 1 image\(s\) were given"):
        processor(text=chat(processor, "<image><image>What?"), images=[rgb(0)])


def test_fewer_placeholders_than_images(processor):
    with pytest.raises(ValueError, match=r"prompt 0 has 1 <image> placeholder\(s\) but 2 image\(s\) were given"):
        processor(text=chat(processor, "<image>What?"), images=[rgb(0), rgb(1)])


def test_images_without_placeholder(processor):
    with pytest.raises(ValueError, match=r"no <image> placeholder but 1 image\(s\) were given"):
        processor(text=chat(processor, "What?"), images=[rgb(0)])
    with pytest.raises(ValueError, match=r"prompt 1 has no <image> placeholder but 1 image\(s\) were given"):
        processor(text=[chat(processor, "<image>A"), chat(processor, "B")], images=[[rgb(0)], [rgb(1)]])


def test_batch_count_mismatch(processor):
    with pytest.raises(ValueError, match=r"3 <image> placeholders in all \(\[2, 1\]\) but 2 image\(s\)"):
        processor(text=[chat(processor, "<image><image>A"), chat(processor, "<image>B")], images=[rgb(0), rgb(1)])


def test_sequence_longer_than_context():
    processor = build_tiny_processor("tiny", text_overrides={"max_position_embeddings": 100})
    with pytest.raises(
        ValueError,
        match=r"sequence of \d+ tokens after image expansion .* exceeds the LLM context "
        r"of 100 \(max_position_embeddings\)",
    ):
        processor(text=chat(processor, "<image>What?"), images=[rgb(0)])


def test_unknown_image_token():
    with pytest.raises(ValueError, match="has no '<img>' token"):
        VilaHDProcessor(None, build_tiny_tokenizer(), TokenLayoutSpec((112, 224), 14, (128,)), image_token="<img>")


# --- templates and stop tokens ----------------------------------------------------------------------------
def test_stop_tokens_and_prompt_end(processor):
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert processor.stop_token_ids == [im_end]
    assert processor.prompt_end_text == "<|im_end|>\n<|im_start|>assistant"


def test_fallback_template_when_tokenizer_has_none():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    processor = VilaHDProcessor.from_config(tiny_config("tiny", tokenizer=tokenizer), tokenizer)
    assert "<|im_start|>" in processor.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_save_load_roundtrip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    with open(tmp_path / "tokenizer_config.json") as f:
        assert json.load(f)["chat_template"] == processor.chat_template
    assert (tmp_path / "chat_template.jinja").read_text() == processor.chat_template
    assert os.path.exists(tmp_path / "preprocessor_config.json")
    loaded = VilaHDProcessor.from_pretrained(tmp_path)
    text = chat(processor, "<image>What color is the car?")
    a, b = processor(text=text, images=[rgb(9)]), loaded(text=text, images=[rgb(9)])
    for key in ("input_ids", "attention_mask", "prompt_positions", "pixel_values"):
        assert torch.equal(a[key], b[key]), key
    assert loaded.layout == processor.layout
