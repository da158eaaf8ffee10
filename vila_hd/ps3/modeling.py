"""Hugging Face wrappers of the PS3 towers: ``from_pretrained`` / ``save_pretrained`` on the official layout.

A released PS3 directory holds one ``config.json`` (model_type ``ps3``) and one ``model.safetensors``
with ``vision_model.*`` and ``text_model.*`` keys; each tower loads from it alone and ignores the other.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from transformers import PreTrainedModel

from .configuration import PS3Config, PS3TextConfig, PS3VisionConfig
from .layers import AttentionPoolLatent, ConvNeXtBlock
from .text import PS3TextTransformer
from .vision import PS3Trunk, PS3VisionEncoder, PS3VisionModelOutput

try:  # transformers >= 5 tracks which tensors were loaded; its init functions skip those
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - transformers 4.x
    _init = nn.init


class PS3PreTrainedModel(PreTrainedModel):
    config_class = PS3Config
    base_model_prefix = "ps3"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["Block", "ResidualAttentionBlock"]
    # Reference checkpoints may carry the contrastive head's scalars; the towers do not use them.
    _keys_to_ignore_on_load_unexpected = [r"^logit_scale", r"^logit_bias"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained`` reading safetensors only (a directory with only ``.bin`` / ``.pt``
        files is refused: unpickling can run code); a local-looking path that does not exist is an error, never
        a Hub download; a directory whose configs name custom code (``auto_map``) is refused.

        Missing or unexpected tensors are a :class:`~vila_hd.hub.CheckpointError` naming them (the other
        tower's and the contrastive scalars of a full ``ps3`` checkpoint are ignored by design);
        ``allow_missing_keys`` / ``allow_unexpected_keys`` (regular expressions searched in the key) allow them."""
        from vila_hd.hub import (
            locate_directory,
            refuse_custom_code,
            refuse_pickled_weights,
            safetensors_only,
            strict_from_pretrained,
        )

        path, local = locate_directory(pretrained_model_name_or_path, "PS3 checkpoint")
        kwargs = safetensors_only(kwargs, f"PS3 checkpoint {path}")
        if local:
            refuse_pickled_weights(path, "PS3 checkpoint")
            refuse_custom_code(path, "PS3 checkpoint")
        return strict_from_pretrained(super().from_pretrained, path, "PS3 checkpoint", *model_args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, PS3VisionEncoder):
            _init.normal_(module.prior_prompt, std=1.0)
            if module.config.separate_pos_emb:
                for table in module.pos_emb_residual:
                    _init.zeros_(table)
        elif isinstance(module, PS3Trunk):
            _init.normal_(module.pos_embed, std=module.pos_embed.shape[-1] ** -0.5)
        elif isinstance(module, AttentionPoolLatent):
            _init.normal_(module.latent, std=module.latent.shape[-1] ** -0.5)
        elif isinstance(module, ConvNeXtBlock):
            _init.constant_(module.weight, 1e-6)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            _init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            _init.ones_(module.weight)
            _init.zeros_(module.bias)
        elif isinstance(module, PS3TextTransformer):
            module.init_weights()


class PS3VisionModel(PS3PreTrainedModel):
    """PS3 vision tower; ``forward`` has the reference's arguments plus ``output_layers`` and
    ``selection_group_size`` (see :meth:`PS3VisionEncoder.look_close`)."""

    config_class = PS3VisionConfig
    main_input_name = "pixel_values"
    _keys_to_ignore_on_load_unexpected = PS3PreTrainedModel._keys_to_ignore_on_load_unexpected + [r"^text_model\."]

    def __init__(self, config: PS3VisionConfig):
        super().__init__(config)
        self.vision_model = PS3VisionEncoder(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        num_look_close=None,
        num_token_look_close=None,
        prompt: torch.Tensor | None = None,
        gt_selection_maps: torch.Tensor | None = None,
        smooth_selection_prob: bool = False,
        only_select_first_n_scale: int | None = None,
        is_global_text: torch.Tensor | None = None,
        pool_gt_token_only: bool = False,
        output_hidden_states: bool = True,
        output_layers=None,
        selection_group_size: int = 1,
    ) -> PS3VisionModelOutput:
        """Encode ``pixel_values`` (B, 3, H, W), normally squash-resized to the largest scale.

        ``num_look_close``: look-close steps (int, ``"all"``, or 0 for low-res only); or
        ``num_token_look_close``: a patch budget. ``prompt`` (B, width): top-down selection, else
        bottom-up. ``output_hidden_states=False`` runs the pooled pre-training path.
        """
        if not output_hidden_states and (num_look_close is not None or only_select_first_n_scale is not None):
            raise ValueError(
                "the pooled pre-training path (output_hidden_states=False) looks close exactly once: "
                "num_look_close and only_select_first_n_scale must be None"
            )
        return self.vision_model(
            pixel_values, num_look_close=num_look_close, num_token_look_close=num_token_look_close,
            prompt=prompt, gt_selection_maps=gt_selection_maps, smooth_selection_prob=smooth_selection_prob,
            only_select_first_n_scale=only_select_first_n_scale, is_global_text=is_global_text,
            pool_gt_token_only=pool_gt_token_only, output_hidden_states=output_hidden_states,
            output_layers=output_layers, selection_group_size=selection_group_size,
        )

    def format_features_into_feature_maps(self, features, selection_maps):
        return self.vision_model.format_features_into_feature_maps(features, selection_maps)


class PS3TextModel(PS3PreTrainedModel):
    """PS3 text tower: ``forward(text)`` -> pooled_output and the ``prompt`` for top-down selection."""

    config_class = PS3TextConfig
    main_input_name = "text"
    _keys_to_ignore_on_load_unexpected = PS3PreTrainedModel._keys_to_ignore_on_load_unexpected + [r"^vision_model\."]

    def __init__(self, config: PS3TextConfig):
        super().__init__(config)
        self.text_model = PS3TextTransformer(config)
        self.post_init()

    def forward(self, text: torch.Tensor):
        return self.text_model(text)


class PS3Model(PS3PreTrainedModel):
    """Both towers, as in the released checkpoints (``vision_model.*`` and ``text_model.*``)."""

    config_class = PS3Config
    main_input_name = "pixel_values"

    def __init__(self, config: PS3Config):
        super().__init__(config)
        self.vision_model = PS3VisionEncoder(config.vision_config)
        self.text_model = PS3TextTransformer(config.text_config)
        self.post_init()

    def encode_text(self, text: torch.Tensor):
        return self.text_model(text)

    def encode_image(self, pixel_values: torch.Tensor, **kwargs) -> PS3VisionModelOutput:
        return self.vision_model(pixel_values, **kwargs)

    def forward(self, pixel_values: torch.Tensor, text: torch.Tensor | None = None, **kwargs):
        image = self.encode_image(pixel_values, **kwargs)
        return image, (self.encode_text(text) if text is not None else None)


def count_parameters(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
