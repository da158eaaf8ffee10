"""Named VILA-HD configurations: the released 8B models (with their aliases) and the tiny presets of
:mod:`vila_hd.model.tiny`, by name (``VILA-HD-8B-4K``, ``nvidia/VILA-HD-8B-PS3-4K-SigLIP2``, ``tiny``...)."""

from __future__ import annotations

import copy
from typing import Any

from vila_hd.model.configuration import VilaHDConfig
from vila_hd.model.tiny import TINY_PRESETS, tiny_config
from vila_hd.ps3.configuration import preset_config as ps3_preset_config

QWEN2_7B_TEXT = dict(
    model_type="qwen2",
    hidden_size=3584,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    intermediate_size=18944,
    vocab_size=152064,
    rope_theta=1_000_000.0,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    tie_word_embeddings=False,
    bos_token_id=151643,
    eos_token_id=151645,
)

_VILA_HD = dict(projector_type="mlp_downsample_2x2", prompt_head_type="mlp", look_close_mode="after_prompt")
PRESETS: dict[str, dict[str, Any]] = {
    "VILA-HD-8B-PS3-1.5K-SigLIP": dict(_VILA_HD, ps3="PS3-1.5K-SigLIP", num_look_close=6),
    "VILA-HD-8B-PS3-4K-SigLIP": dict(_VILA_HD, ps3="PS3-4K-SigLIP", num_look_close=6),
    "VILA-HD-8B-PS3-1.5K-SigLIP2": dict(_VILA_HD, ps3="PS3-1.5K-SigLIP2", num_look_close=6),
    "VILA-HD-8B-PS3-4K-SigLIP2": dict(_VILA_HD, ps3="PS3-4K-SigLIP2", num_look_close=6),
}
PRESET_ALIASES = {
    "VILA-HD-8B-1.5K": "VILA-HD-8B-PS3-1.5K-SigLIP2",
    "VILA-HD-8B-4K": "VILA-HD-8B-PS3-4K-SigLIP2",
}


def preset_names() -> list[str]:
    """Every name :func:`preset_config` knows."""
    return sorted(PRESETS) + sorted(PRESET_ALIASES) + sorted(TINY_PRESETS)


def preset_config(
    name: str, *, text_overrides: dict | None = None, vision_overrides: dict | None = None, **overrides
) -> VilaHDConfig:
    """The configuration of a named model (``VILA-HD-8B-4K``, ``nvidia/VILA-HD-8B-PS3-4K-SigLIP2``, ``tiny``...).

    ``vision_overrides`` / ``text_overrides`` replace fields of the sub-configs (e.g. tiny widths with the
    real scales), other keyword arguments replace top-level fields.
    """
    key = name.split("/")[-1]
    key = PRESET_ALIASES.get(key, key)
    if key not in PRESETS:
        if key in TINY_PRESETS:
            return tiny_config(key, text_overrides=text_overrides, vision_overrides=vision_overrides, **overrides)
        raise ValueError(f"unknown VILA-HD preset {name!r}; known: {preset_names()}")
    spec = copy.deepcopy(PRESETS[key])
    vision = ps3_preset_config(spec.pop("ps3"), **(vision_overrides or {})).vision_config
    text = dict(QWEN2_7B_TEXT, **(text_overrides or {}))
    spec.update(overrides)
    return VilaHDConfig(vision_config=vision, text_config=text, **spec)
