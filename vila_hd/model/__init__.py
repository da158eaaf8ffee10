"""VILA-HD model: configuration, projector, token layout and the multimodal LLM.

Importing this package registers ``VilaHDConfig`` with ``AutoConfig`` (model_type ``vila_hd``) and the
model with ``AutoModelForImageTextToText`` (and ``AutoModelForVision2Seq`` where it exists), so
``AutoModelForImageTextToText.from_pretrained(dir)`` works once ``vila_hd`` is imported.
"""

from __future__ import annotations

from transformers import AutoConfig

from .configuration import VilaHDConfig
from .modeling import (
    VilaHDCausalLMOutput,
    VilaHDForConditionalGeneration,
    VilaHDImageFeatures,
    VilaHDPreTrainedModel,
    VilaHDSelection,
)
from .presets import preset_config, preset_names
from .token_layout import ImageTokenLayout, TokenLayoutSpec, image_token_layout, num_image_tokens


def _register() -> None:
    try:
        AutoConfig.register(VilaHDConfig.model_type, VilaHDConfig, exist_ok=True)
    except TypeError:  # pragma: no cover - very old transformers without exist_ok
        AutoConfig.register(VilaHDConfig.model_type, VilaHDConfig)
    import transformers

    for auto_name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        auto = getattr(transformers, auto_name, None)
        if auto is None:
            continue
        try:
            auto.register(VilaHDConfig, VilaHDForConditionalGeneration, exist_ok=True)
        except TypeError:  # pragma: no cover
            auto.register(VilaHDConfig, VilaHDForConditionalGeneration)


_register()

__all__ = [
    "ImageTokenLayout",
    "TokenLayoutSpec",
    "VilaHDCausalLMOutput",
    "VilaHDConfig",
    "VilaHDForConditionalGeneration",
    "VilaHDImageFeatures",
    "VilaHDPreTrainedModel",
    "VilaHDSelection",
    "image_token_layout",
    "num_image_tokens",
    "preset_config",
    "preset_names",
]
