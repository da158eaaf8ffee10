"""Typed configuration of VILA-HD: a PS3 vision tower, a projector and any causal LM.

``VilaHDConfig`` nests ``vision_config`` (a :class:`~vila_hd.ps3.configuration.PS3VisionConfig`) and
``text_config`` (any ``AutoConfig`` causal-LM config) and owns every VILA-HD knob: projector type,
prompt head, optional high-res position embeddings and the look-close defaults that the processor and
the model both read (so the number of image tokens is decided in one place, see ``token_layout``).
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

from vila_hd.errors import VilaHDError
from vila_hd.ps3.configuration import PS3VisionConfig

PROJECTOR_TYPES = ("mlp_downsample_2x2", "mlp_downsample_3x3", "linear")
# Names used by VILA / NVILA checkpoints for the same projectors.
PROJECTOR_ALIASES = {
    "mlp_downsample": "mlp_downsample_2x2",
    "mlp_downsample_2x2_fix": "mlp_downsample_2x2",
    "mlp_downsample_3x3_fix": "mlp_downsample_3x3",
}
PROMPT_HEAD_TYPES = ("linear", "mlp")
LOOK_CLOSE_MODES = ("after_prompt", "after_image")


def normalize_projector_type(name: str) -> str:
    name = PROJECTOR_ALIASES.get(name, name)
    if name not in PROJECTOR_TYPES:
        raise ValueError(f"unknown projector type {name!r}; known: {list(PROJECTOR_TYPES) + list(PROJECTOR_ALIASES)}")
    return name


def projector_downsample(projector_type: str) -> int:
    """Side of the square of patches merged into one LLM token (1 for ``linear``)."""
    return {"mlp_downsample_2x2": 2, "mlp_downsample_3x3": 3, "linear": 1}[normalize_projector_type(projector_type)]


class VilaHDConfig(PretrainedConfig):
    """Configuration of :class:`~vila_hd.model.modeling.VilaHDForConditionalGeneration`.

    Args:
        vision_config: PS3 vision tower config (dict or ``PS3VisionConfig``).
        text_config: causal-LM config (dict with ``model_type`` or any ``PretrainedConfig``).
        projector_type: ``mlp_downsample_2x2`` (default), ``mlp_downsample_3x3`` or ``linear``.
        prompt_head_type: ``mlp`` / ``linear`` head turning an LLM hidden state into a PS3 prompt; ``None``
            builds no head (then only bottom-up ``after_image`` selection is possible).
        high_res_pos_embed: add a learned (low-res grid) position table, area-resized to each merged grid,
            plus one learned vector per scale, to the image tokens.
        look_close_mode: ``after_prompt`` (top-down, the question steers selection) or ``after_image``
            (bottom-up saliency, no prefix pass).
        num_look_close / num_token_look_close: default selection budget, in look-close steps (int or
            ``"all"``) or in high-res patches; give one of them.
        select_num_each_scale: per-step, per-scale patch budgets (written into
            ``vision_config.max_select_num_each_scale``); ``None`` splits by pixel count.
        smooth_selection_prob: smooth the selection probabilities before top-k (reference knob).
        vision_feature_layer: PS3 block whose output feeds the projector (-2: second-to-last).
        image_token / image_token_id: placeholder token of the tokenizer; each image becomes a run of it.
        image_end_text: text appended after each image's tokens (the reference's "\\n").
        reuse_prefix_cache: at inference, continue the main pass from the LLM KV cache of the top-down
            prefix pass for their shared prefix instead of recomputing it: ``True``, ``False`` or ``"auto"``
            (reuse when it is faster: always with flash attention, with SDPA when the shared prefix is a
            sizeable part of the sequence).
        prompt_end_token_ids: token ids that close a user turn in the chat template (the model's fallback
            for locating the prompt when the processor did not pass ``prompt_positions``).
    """

    model_type = "vila_hd"
    sub_configs = {"vision_config": PS3VisionConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config: dict | PS3VisionConfig | None = None,
        text_config: dict | PretrainedConfig | None = None,
        projector_type: str = "mlp_downsample_2x2",
        prompt_head_type: str | None = "mlp",
        high_res_pos_embed: bool = False,
        look_close_mode: str = "after_prompt",
        num_look_close: int | str | None = 6,
        num_token_look_close: int | None = None,
        select_num_each_scale: list[int] | None = None,
        smooth_selection_prob: bool = False,
        vision_feature_layer: int = -2,
        image_token: str = "<image>",
        image_token_id: int | None = None,
        image_end_text: str = "\n",
        reuse_prefix_cache: bool | str = "auto",
        prompt_end_token_ids: list[int] | None = None,
        **kwargs,
    ):
        for where, fields in (("", kwargs), ("vision_config.", vision_config), ("text_config.", text_config)):
            if isinstance(fields, dict):
                check_dtype_fields(fields, where)
        vision_config = _vision_config(vision_config)
        text_config = _text_config(text_config)
        kwargs.setdefault("tie_word_embeddings", bool(getattr(text_config, "tie_word_embeddings", False)))
        # The base initialiser first: some transformers versions reset attributes of sub-configs in it.
        super().__init__(**kwargs)
        self.vision_config = vision_config
        self.text_config = text_config
        if select_num_each_scale is not None:
            select_num_each_scale = [int(x) for x in select_num_each_scale]
            if len(select_num_each_scale) != len(self.vision_config.ps3_scales) - 1:
                raise ValueError(
                    f"select_num_each_scale={select_num_each_scale} needs one budget per high-res scale "
                    f"({len(self.vision_config.ps3_scales) - 1} for ps3_scales={self.vision_config.ps3_scales})"
                )
            self.vision_config.max_select_num_each_scale = select_num_each_scale
        self.projector_type = normalize_projector_type(projector_type)
        if prompt_head_type is not None and prompt_head_type not in PROMPT_HEAD_TYPES:
            raise ValueError(f"prompt_head_type must be one of {PROMPT_HEAD_TYPES} or None, got {prompt_head_type!r}")
        if look_close_mode not in LOOK_CLOSE_MODES:
            raise ValueError(f"look_close_mode must be one of {LOOK_CLOSE_MODES}, got {look_close_mode!r}")
        if num_look_close is not None and num_token_look_close is not None:
            raise ValueError("give num_look_close or num_token_look_close, not both")
        self.prompt_head_type = prompt_head_type
        self.high_res_pos_embed = bool(high_res_pos_embed)
        self.look_close_mode = look_close_mode
        self.num_look_close = num_look_close
        self.num_token_look_close = num_token_look_close
        self.select_num_each_scale = select_num_each_scale
        self.smooth_selection_prob = bool(smooth_selection_prob)
        self.vision_feature_layer = int(vision_feature_layer)
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.image_end_text = image_end_text
        if reuse_prefix_cache not in (True, False, "auto"):
            raise ValueError(f"reuse_prefix_cache must be True, False or 'auto', got {reuse_prefix_cache!r}")
        self.reuse_prefix_cache = reuse_prefix_cache
        self.prompt_end_token_ids = list(prompt_end_token_ids) if prompt_end_token_ids else None

    # --- derived ---------------------------------------------------------------------------------
    @property
    def downsample(self) -> int:
        return projector_downsample(self.projector_type)

    @property
    def max_context(self) -> int | None:
        return getattr(self.text_config, "max_position_embeddings", None)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["text_config"] = self.text_config.to_dict()
        return out


def check_dtype_fields(fields: dict[str, Any], where: str = "") -> None:
    """Refuse a config's ``torch_dtype`` / ``dtype`` that is not a torch dtype name (``float32``, ``bfloat16``,
    ..., or ``auto``): transformers would look any string up as an attribute of ``torch``."""
    import torch

    for key in ("torch_dtype", "dtype"):
        value = fields.get(key)
        if value is None or isinstance(value, torch.dtype) or value == "auto":
            continue
        name = value[len("torch."):] if isinstance(value, str) and value.startswith("torch.") else value
        if not (isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype)):
            raise VilaHDError(f"config.json: {where}{key}={value!r} is not a torch dtype (float32, bfloat16, "
                              "float16, ... or auto); fix the checkpoint's config.json")


def _vision_config(value) -> PS3VisionConfig:
    if value is None:
        return PS3VisionConfig()
    if isinstance(value, PS3VisionConfig):
        return value
    if isinstance(value, PretrainedConfig):
        value = value.to_dict()
    value = dict(value)
    value.pop("model_type", None)
    return PS3VisionConfig(**value)


def _text_config(value) -> PretrainedConfig:
    if value is None:
        from transformers import Qwen2Config

        return Qwen2Config()
    if isinstance(value, PretrainedConfig):
        return value
    value = dict(value)
    model_type = value.pop("model_type", None)
    if model_type is None:
        raise ValueError("text_config needs a 'model_type' (e.g. 'qwen2') to pick the causal-LM config class")
    return AutoConfig.for_model(model_type, **value)
