"""Tiny VILA-HD configurations for tests and demos: a byte-level BPE tokenizer with a Qwen2-style (ChatML) chat
template, a two-layer Qwen2 and a few-kB PS3, all built on the spot (no downloads); the models themselves:
:func:`vila_hd.builder.build_tiny_model`.

``tiny`` uses small scales (112/224/448, patch 14) so a forward pass takes milliseconds on CPU;
``tiny-1.5K`` / ``tiny-4K`` keep the real scales and budgets (real token counts) with tiny widths.
"""

from __future__ import annotations

import functools
from typing import Any

from vila_hd.templates import CHATML_TEMPLATE, IMAGE_TOKEN

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]

_CORPUS = [
    "You are a helpful assistant.",
    "What color is the car? The car is red.",
    "Describe the image in detail. The image shows a street with a red car, a tree and a blue sign.",
    "How many people are in the picture? There are two people standing next to the door.",
    "Read the text on the sign. The sign says stop. Where is the cat? The cat is on the table.",
    "What is written at the bottom left corner of the screen? A small label with numbers 0123456789.",
    "yes no left right top bottom small large image picture photo question answer user assistant system",
]

TINY_PRESETS: dict[str, dict[str, Any]] = {
    # Small geometry: low-res 8x8, high-res 16x16 and 32x32 (1280 patches), 128 patches per step.
    "tiny": dict(scales=[112, 224, 448], max_select_num=128, num_look_close=2, highres_selection_image_size=448),
    # Real geometry and budgets (real token counts), tiny widths.
    "tiny-1.5K": dict(
        scales=[378, 756, 1512], max_select_num=2560, num_look_close=6, highres_selection_image_size=1512
    ),
    "tiny-4K": dict(
        scales=[378, 756, 1512, 3780], max_select_num=2560, num_look_close=6, highres_selection_image_size=1512
    ),
}


@functools.lru_cache(maxsize=4)
def _trained_bpe(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def build_tiny_tokenizer(vocab_size: int = 512):
    """A small byte-level BPE tokenizer: ``<|im_start|>``/``<|im_end|>`` (end of turn), ``<|endoftext|>``
    (padding), ``<image>`` (added special token) and a ChatML chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_bpe(vocab_size)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", IMAGE_TOKEN],
        padding_side="left",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_text_config(vocab_size: int, **overrides):
    from transformers import Qwen2Config

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
    )
    fields.update(overrides)
    return Qwen2Config(**fields)


def tiny_config(
    name: str = "tiny",
    *,
    tokenizer=None,
    text_overrides: dict | None = None,
    vision_overrides: dict | None = None,
    **overrides,
):
    """A :class:`VilaHDConfig` of the tiny preset ``name`` whose token ids match ``tokenizer``
    (default: :func:`build_tiny_tokenizer`)."""
    from vila_hd.model.configuration import VilaHDConfig
    from vila_hd.ps3.configuration import tiny_vision_config

    if name not in TINY_PRESETS:
        raise ValueError(f"unknown tiny preset {name!r}; known: {sorted(TINY_PRESETS)}")
    preset = dict(TINY_PRESETS[name])
    tokenizer = tokenizer or build_tiny_tokenizer()
    vision = dict(
        max_select_num=preset["max_select_num"], highres_selection_image_size=preset["highres_selection_image_size"]
    )
    vision.update(vision_overrides or {})
    vision_config = tiny_vision_config(scales=preset["scales"], **vision)
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = dict(eos_token_id=eot, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    text.update(text_overrides or {})
    text_config = tiny_text_config(len(tokenizer), **text)
    fields = dict(
        projector_type="mlp_downsample_2x2",
        prompt_head_type="mlp",
        look_close_mode="after_prompt",
        num_look_close=preset["num_look_close"],
        image_token=IMAGE_TOKEN,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        prompt_end_token_ids=tokenizer("<|im_end|>\n<|im_start|>assistant", add_special_tokens=False).input_ids,
    )
    fields.update(overrides)
    return VilaHDConfig(vision_config=vision_config, text_config=text_config, **fields)
