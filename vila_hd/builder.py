"""Fresh VILA-HD models, returned as ``(model, processor)`` with the generation defaults set (so a
``save_pretrained`` of both writes a checkpoint that loads ready to generate).

- :func:`build_vila_hd`: assembled from a PS3 checkpoint and an LLM checkpoint (the start of stage 1). The
  vision tower and the LLM keep their pretrained weights; the projector and the prompt head are freshly
  initialised. The tokenizer gets the ``<image>`` token if it lacks one (the LLM's embeddings are resized to
  match) and a chat template of its family if it ships none.
- :func:`build_from_config`: randomly initialised from a configuration and a tokenizer.
- :func:`build_tiny_model` / :func:`build_tiny_processor`: the tiny presets of :mod:`vila_hd.model.tiny`
  (tests and demos; no downloads).
"""

from __future__ import annotations

import os
from typing import Any

import torch


def build_vila_hd(
    ps3: str | os.PathLike,
    llm: str | os.PathLike,
    *,
    projector_type: str = "mlp_downsample_2x2",
    prompt_head_type: str | None = "mlp",
    high_res_pos_embed: bool = False,
    look_close_mode: str = "after_prompt",
    num_look_close: int | str | None = 6,
    num_token_look_close: int | None = None,
    select_num_each_scale: list[int] | None = None,
    vision_feature_layer: int = -2,
    max_select_num: int | None = None,
    dtype: torch.dtype | str | None = None,
    chat_template: str | None = None,
    image_token: str = "<image>",
    seed: int | None = None,
    **hub_kwargs: Any,
):
    """Return ``(model, processor)`` for a new VILA-HD model.

    Args:
        ps3: PS3 checkpoint (directory or Hub id, e.g. ``nvidia/PS3-4K-SigLIP2``; a full ``ps3`` or a
            vision-only ``ps3_vision_model`` checkpoint).
        llm: causal-LM checkpoint (directory or Hub id, e.g. ``Qwen/Qwen2-7B-Instruct``).
        max_select_num: per-step patch budget of PS3 (the released models use 2560).
        Others: :class:`~vila_hd.model.configuration.VilaHDConfig` fields.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vila_hd.dtypes import dtype_kwargs, resolve_dtype
    from vila_hd.hub import resolve_model_dir, strict_from_pretrained
    from vila_hd.model.configuration import VilaHDConfig
    from vila_hd.model.modeling import VilaHDForConditionalGeneration, default_attn_implementation
    from vila_hd.model.vila_layout import read_vision_config
    from vila_hd.ps3 import PS3ImageProcessor, PS3VisionModel

    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, torch.device("cpu"))
    ps3_dir = resolve_model_dir(ps3, kind="model", **hub_kwargs)
    vision_config = read_vision_config(ps3_dir)
    if max_select_num is not None:
        vision_config.max_select_num = max_select_num
    vision = PS3VisionModel.from_pretrained(ps3_dir, config=vision_config, use_safetensors=True, **dtype_kwargs(dtype))
    llm = resolve_model_dir(llm, kind="model", **hub_kwargs)  # (refuses custom code before the Auto* calls)
    tokenizer = AutoTokenizer.from_pretrained(llm, trust_remote_code=False, **hub_kwargs)
    language_model = strict_from_pretrained(  # a missing / unexpected tensor is an error naming it
        AutoModelForCausalLM.from_pretrained,
        llm,
        "LLM checkpoint",
        use_safetensors=True,
        attn_implementation=default_attn_implementation(),
        **dtype_kwargs(dtype),
        **hub_kwargs,
    )
    if tokenizer.convert_tokens_to_ids(image_token) in (None, tokenizer.unk_token_id):
        tokenizer.add_tokens([image_token], special_tokens=True)
    if len(tokenizer) > language_model.get_input_embeddings().weight.shape[0]:
        language_model.resize_token_embeddings(len(tokenizer))
    config = VilaHDConfig(
        vision_config=vision.config,
        text_config=language_model.config,
        projector_type=projector_type,
        prompt_head_type=prompt_head_type,
        high_res_pos_embed=high_res_pos_embed,
        look_close_mode=look_close_mode,
        num_look_close=num_look_close,
        num_token_look_close=num_token_look_close,
        select_num_each_scale=select_num_each_scale,
        vision_feature_layer=vision_feature_layer,
        image_token=image_token,
        image_token_id=tokenizer.convert_tokens_to_ids(image_token),
    )
    if seed is not None:
        torch.manual_seed(seed)
    model = VilaHDForConditionalGeneration(config, vision_tower=vision, language_model=language_model)
    model.mm_projector.to(next(language_model.parameters()).dtype)
    try:
        image_processor = PS3ImageProcessor.from_pretrained(ps3_dir)
    except OSError:  # a checkpoint without preprocessor_config.json: the PS3 defaults
        image_processor = PS3ImageProcessor(image_size=vision.config.ps3_scales[-1])
    return with_processor(model, tokenizer, image_processor=image_processor, chat_template=chat_template)


def build_from_config(config, tokenizer, *, seed: int = 0, dtype: torch.dtype | None = None):
    """A randomly initialised model of ``config`` (eval mode) and its processor around ``tokenizer``:
    ``(model, processor)``."""
    from vila_hd.model.modeling import VilaHDForConditionalGeneration

    torch.manual_seed(seed)
    model = VilaHDForConditionalGeneration(config)
    if dtype is not None:
        model = model.to(dtype)
    return with_processor(model.eval(), tokenizer)


def with_processor(model, tokenizer, **processor_kwargs):
    """``(model, processor)``: the processor of ``model``'s config around ``tokenizer`` (``processor_kwargs``:
    :meth:`~vila_hd.processing.VilaHDProcessor.from_config`'s), its tokens set as the model's generation
    defaults."""
    from vila_hd.processing import VilaHDProcessor

    processor = VilaHDProcessor.from_config(model.config, tokenizer, **processor_kwargs)
    model.set_generation_defaults(processor)
    return model, processor


def build_tiny_model(name: str = "tiny", *, seed: int = 0, dtype=None, **overrides):
    """A randomly initialised tiny model and its processor: ``(model, processor)``."""
    from vila_hd.model.tiny import build_tiny_tokenizer, tiny_config

    tokenizer = build_tiny_tokenizer()
    return build_from_config(tiny_config(name, tokenizer=tokenizer, **overrides), tokenizer, seed=seed, dtype=dtype)


def build_tiny_processor(name: str = "tiny", **overrides):
    """The processor of :func:`build_tiny_model` without building the model."""
    from vila_hd.model.tiny import build_tiny_tokenizer, tiny_config
    from vila_hd.processing import VilaHDProcessor

    tokenizer = build_tiny_tokenizer()
    return VilaHDProcessor.from_config(tiny_config(name, tokenizer=tokenizer, **overrides), tokenizer)
