"""Typed configuration for the PS3 encoder.

The field names are the reference's (``ps3-torch``) so that the official ``config.json`` files load
unchanged. Two additions make tiny test models and non-SO400M backbones possible: explicit backbone
sizes (``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``, ``patch_size``) that
default to the sizes of the named timm backbone.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from transformers import PretrainedConfig

from ..errors import ConfigError

# timm backbones the released checkpoints name; both are the same SO400M/14 network.
KNOWN_BACKBONES: dict[str, dict[str, Any]] = {
    "vit_so400m_patch14_siglip_384": dict(
        hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304, patch_size=14
    ),
    "vit_so400m_patch14_siglip_378": dict(
        hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304, patch_size=14
    ),
}
_DEFAULT_BACKBONE = "vit_so400m_patch14_siglip_384"
_BACKBONE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size")


def backbone_sizes(model_name: str | None, explicit: dict[str, int | None]) -> dict[str, int]:
    """The backbone sizes: those of the named timm backbone (SO400M when unnamed), replaced by the explicit ones.

    Raises:
        ConfigError: ``model_name`` is not a known backbone and some sizes are not given (a guess would build the
            SO400M network and fail later on every tensor's shape).
    """
    if model_name is None or model_name in KNOWN_BACKBONES:
        sizes = dict(KNOWN_BACKBONES[model_name or _DEFAULT_BACKBONE])
    else:
        missing = [k for k in _BACKBONE_FIELDS if explicit.get(k) is None]
        if missing:
            raise ConfigError(
                f"PS3 vision config: model_name={model_name!r} is not a known backbone ({', '.join(KNOWN_BACKBONES)}) "
                f"and its sizes are not given: set {', '.join(missing)} explicitly in the vision config (an unknown "
                f"backbone needs all of {', '.join(_BACKBONE_FIELDS)})"
            )
        sizes = {}
    sizes.update({k: v for k, v in explicit.items() if v is not None})
    return sizes


class _NamesItsFile:
    """``from_pretrained`` of a config: a refused value (:class:`ConfigError`) names the file it was read from;
    remote code is never trusted."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if kwargs.pop("trust_remote_code", False):
            raise ConfigError(f"{cls.__name__}: trust_remote_code=True is refused; VILA-HD never runs checkpoint code")
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, trust_remote_code=False, **kwargs)
        except ConfigError as err:
            where = os.fspath(pretrained_model_name_or_path)
            if os.path.isdir(where):
                where = os.path.join(where, kwargs.get("subfolder") or "", "config.json")
            raise ConfigError(f"{where}: {err}") from err


class PS3VisionConfig(_NamesItsFile, PretrainedConfig):
    """Configuration of the PS3 vision tower (backbone + selection modules)."""

    model_type = "ps3_vision_model"
    base_config_key = "vision_config"

    def __init__(
        self,
        model_name: str | None = None,
        hidden_size: int | None = None,
        num_hidden_layers: int | None = None,
        num_attention_heads: int | None = None,
        intermediate_size: int | None = None,
        patch_size: int | None = None,
        num_channels: int = 3,
        layer_norm_eps: float = 1e-6,
        hidden_act: str = "gelu",
        pool: str = "map",
        ps3_scales: list[int] | None = None,
        select_based_on_layer: list[int] | None = None,
        max_select_num: int = 1280,
        max_select_num_each_scale: list[int] | None = None,
        separate_pos_emb: bool = True,
        highres_selection_feature: bool = True,
        highres_selection_module_hidden_dim: int = 512,
        highres_selection_module_out_dim: int = 512,
        highres_selection_module_depth: int = 3,
        highres_selection_module_kernel_size: int = 28,
        highres_selection_image_size: int = 1512,
        prefix_attention: str = "auto",
        low_res_cuda_graph: bool = True,
        **kwargs,
    ):
        # VILA still writes the pre-June-2025 name of the scales field.
        legacy_scales = kwargs.pop("s3_scales", None)
        for stale in ("image_size", "vision_tower_name"):  # derived below, never authoritative
            kwargs.pop(stale, None)
        super().__init__(**kwargs)
        explicit = dict(
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            patch_size=patch_size,
        )
        sizes = backbone_sizes(model_name, explicit)
        self.model_name = model_name
        for key in _BACKBONE_FIELDS:
            setattr(self, key, int(sizes[key]))
        self.num_channels = num_channels
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.pool = pool
        self.ps3_scales = sorted(ps3_scales or legacy_scales or [378, 756, 1512])
        self.select_based_on_layer = list(select_based_on_layer if select_based_on_layer is not None else [0, 9, 18, 26])
        self.max_select_num = max_select_num
        self.max_select_num_each_scale = max_select_num_each_scale
        self.separate_pos_emb = separate_pos_emb
        self.highres_selection_feature = highres_selection_feature
        self.highres_selection_module_hidden_dim = highres_selection_module_hidden_dim
        self.highres_selection_module_out_dim = highres_selection_module_out_dim
        self.highres_selection_module_depth = highres_selection_module_depth
        self.highres_selection_module_kernel_size = highres_selection_module_kernel_size
        self.highres_selection_image_size = highres_selection_image_size
        # Inference kernels (no effect on results beyond rounding): how the high-res tokens attend to the
        # low-res K/V prefix ("auto": log-sum-exp merge on CUDA, see layers.Attention), and whether the
        # low-res pass replays a CUDA graph at inference.
        self.prefix_attention = prefix_attention
        self.low_res_cuda_graph = bool(low_res_cuda_graph)
        # Derived fields the reference also exposes (VILA reads them).
        self.image_size = self.ps3_scales[-1]
        self.vision_tower_name = model_name
        self._validate()

    def _validate(self) -> None:
        if self.prefix_attention not in ("auto", "concat", "merge"):
            raise ValueError(f"prefix_attention must be 'auto', 'concat' or 'merge', got {self.prefix_attention!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        base = self.ps3_scales[0]
        if base % self.patch_size:
            raise ValueError(f"ps3_scales[0]={base} must be a multiple of patch_size={self.patch_size}")
        bad = [s for s in self.ps3_scales[1:] if s % base]
        if bad:
            raise ValueError(f"ps3_scales {bad} are not integer multiples of the low-res scale {base}")
        layers = [i if i >= 0 else i + self.num_hidden_layers for i in self.select_based_on_layer]
        if any(not 0 <= i < self.num_hidden_layers for i in layers):
            raise ValueError(
                f"select_based_on_layer={self.select_based_on_layer} is out of range for "
                f"num_hidden_layers={self.num_hidden_layers}"
            )

    # --- derived quantities -------------------------------------------------------------------
    @property
    def num_scales(self) -> int:
        return len(self.ps3_scales)

    @property
    def low_res_grid(self) -> int:
        return self.ps3_scales[0] // self.patch_size

    @property
    def low_res_token_num(self) -> int:
        return self.low_res_grid**2

    @property
    def budget_each_scale(self) -> list[int]:
        """Per-step selection budget of each high-res scale (pixel-count split, remainder to the last)."""
        if self.max_select_num_each_scale is not None:
            return list(self.max_select_num_each_scale)
        pixels = [s**2 for s in self.ps3_scales[1:]]
        budget = [int(self.max_select_num * p / sum(pixels)) for p in pixels]
        budget[-1] += self.max_select_num - sum(budget)
        return budget

    @property
    def width(self) -> int:  # name used by the reference and VILA
        return self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("vision_tower_name", None)
        return out


class PS3TextConfig(_NamesItsFile, PretrainedConfig):
    """Configuration of the PS3 (open_clip-style) text tower used for standalone top-down selection."""

    model_type = "ps3_text_model"
    base_config_key = "text_config"

    def __init__(
        self,
        output_dim: int = 1152,
        prompt_proj_dim: int = 1152,
        context_length: int = 77,
        vocab_size: int = 49408,
        hf_tokenizer_name: str | None = None,
        tokenizer_kwargs: dict | None = None,
        width: int = 512,
        heads: int = 8,
        layers: int = 12,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = None,
        embed_cls: bool = False,
        pad_id: int = 0,
        no_causal_mask: bool = False,
        final_ln_after_pool: bool = False,
        pool_type: str = "argmax",
        proj_bias: bool = False,
        output_tokens: bool = False,
        act_kwargs: dict | None = None,
        norm_kwargs: dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if pool_type not in ("first", "last", "argmax", "none"):
            raise ValueError(f"pool_type must be one of first/last/argmax/none, got {pool_type!r}")
        self.output_dim = output_dim
        self.prompt_proj_dim = prompt_proj_dim
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.hf_tokenizer_name = hf_tokenizer_name
        self.tokenizer_kwargs = dict(tokenizer_kwargs or {})
        self.width = width
        self.heads = heads
        self.layers = layers
        self.mlp_ratio = mlp_ratio
        self.ls_init_value = ls_init_value
        self.embed_cls = embed_cls
        self.pad_id = pad_id
        self.no_causal_mask = no_causal_mask
        self.final_ln_after_pool = final_ln_after_pool
        self.pool_type = pool_type
        self.proj_bias = proj_bias
        self.output_tokens = output_tokens
        self.act_kwargs = dict(act_kwargs or {})
        self.norm_kwargs = dict(norm_kwargs or {})


class PS3Config(_NamesItsFile, PretrainedConfig):
    """Vision + text configuration, as stored in the released ``config.json`` (model_type ``ps3``)."""

    model_type = "ps3"
    sub_configs = {"text_config": PS3TextConfig, "vision_config": PS3VisionConfig}

    def __init__(self, text_config: dict | PS3TextConfig | None = None,
                 vision_config: dict | PS3VisionConfig | None = None, **kwargs):
        super().__init__(**kwargs)
        self.text_config = _as_config(text_config, PS3TextConfig)
        self.vision_config = _as_config(vision_config, PS3VisionConfig)


def _as_config(value, cls):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, PretrainedConfig):
        return cls(**value.to_dict())
    return cls(**value)


# --- presets ----------------------------------------------------------------------------------
_TEXT_SIGLIP = dict(
    context_length=64, vocab_size=32000, hf_tokenizer_name="timm/ViT-B-16-SigLIP",
    tokenizer_kwargs={"clean": "canonicalize"}, width=1152, heads=16, layers=27, mlp_ratio=3.7362,
    no_causal_mask=True, proj_bias=True, pool_type="last", norm_kwargs={"eps": 1e-6},
)
_TEXT_SIGLIP2 = dict(
    _TEXT_SIGLIP, vocab_size=256000, hf_tokenizer_name="timm/ViT-SO400M-14-SigLIP2-378",
    act_kwargs={"approximate": "tanh"},
)
_SCALES_15K = [378, 756, 1512]
_SCALES_4K = [378, 756, 1512, 3780]


def _vision(backbone: str, scales: list[int]) -> dict:
    return dict(model_name=backbone, hidden_size=1152, pool="map", ps3_scales=scales,
                select_based_on_layer=[0, 9, 18, 26], max_select_num=2560, separate_pos_emb=True,
                highres_selection_feature=True)


PRESETS: dict[str, dict[str, dict]] = {
    "PS3-1.5K-SigLIP": dict(vision_config=_vision("vit_so400m_patch14_siglip_384", _SCALES_15K), text_config=_TEXT_SIGLIP),
    "PS3-4K-SigLIP": dict(vision_config=_vision("vit_so400m_patch14_siglip_384", _SCALES_4K), text_config=_TEXT_SIGLIP),
    "PS3-1.5K-SigLIP2": dict(vision_config=_vision("vit_so400m_patch14_siglip_378", _SCALES_15K), text_config=_TEXT_SIGLIP2),
    "PS3-4K-SigLIP2": dict(vision_config=_vision("vit_so400m_patch14_siglip_378", _SCALES_4K), text_config=_TEXT_SIGLIP2),
}


def preset_config(name: str, **vision_overrides) -> PS3Config:
    """Return the released configuration ``name`` (e.g. ``"PS3-4K-SigLIP2"``; an ``nvidia/`` prefix is accepted).

    ``vision_overrides`` replace vision fields, e.g. tiny widths for tests with the real scales.
    """
    key = name.split("/")[-1].replace("PS3_Lang-", "PS3-")
    if key not in PRESETS:
        raise ValueError(f"unknown PS3 preset {name!r}; known: {sorted(PRESETS)}")
    spec = copy.deepcopy(PRESETS[key])
    spec["vision_config"].update(vision_overrides)
    return PS3Config(**spec)


def tiny_vision_config(scales: list[int] | None = None, **overrides) -> PS3VisionConfig:
    """A few-kB vision config with real geometry (patch 14, 27x27 low-res grid) for tests and demos."""
    fields = dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, patch_size=14,
        ps3_scales=scales or _SCALES_15K, select_based_on_layer=[0, 1, 2, 3], max_select_num=2560,
        highres_selection_module_hidden_dim=16, highres_selection_module_out_dim=16,
        highres_selection_module_depth=1,
    )
    fields.update(overrides)
    return PS3VisionConfig(**fields)


def tiny_text_config(**overrides) -> PS3TextConfig:
    fields = dict(output_dim=32, prompt_proj_dim=32, context_length=16, vocab_size=128, width=32, heads=4,
                  layers=2, mlp_ratio=2.0, no_causal_mask=True, proj_bias=True, pool_type="last",
                  norm_kwargs={"eps": 1e-6}, act_kwargs={"approximate": "tanh"},
                  tokenizer_kwargs={"clean": "canonicalize"})
    fields.update(overrides)
    return PS3TextConfig(**fields)
