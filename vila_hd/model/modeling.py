"""VILA-HD: PS3 vision tower + projector + causal LM, with top-down (prompt-steered) patch selection.

Inference with ``look_close_mode="after_prompt"`` does the work once:

1. PS3 low-res pass (``encode_low_res``), kept for step 4;
2. low-res tokens projected and written into the input embeddings (``merge_image_embeddings``);
3. *prefix pass* (``top_down_prompts`` from a :mod:`~vila_hd.model.prefix_plan`): the LLM runs over the tokens
   up to the last token of the latest user message, each image contributing its low-res tokens only; the final
   (normed) hidden state there -> prompt head -> a PS3 prompt per image of that sample;
4. PS3 looks close with that prompt, reusing the low-res pass (its K/V cache and selection features);
5. selected 2x2 groups projected (only those, never dense maps) and written into the embeddings;
6. main pass. The tokens before the first image's high-res tokens are identical in the prefix and the
   main sequence, so the main pass can continue from the prefix pass's KV cache (cropped to that shared
   part) instead of recomputing it (``reuse_prefix_cache``: always with flash attention; with SDPA only
   when the shared part is large enough to pay for the masked continuation, see ``_prefix_reuse_pays``).

``after_image`` mode (bottom-up selection) needs no prefix pass. Text-only prompts skip the vision tower.
The training step (``vila_hd.train.model_step``) runs the same pieces on packed rows, with the collator's plan.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from vila_hd.model.attention import NO_MASKS
from vila_hd.model.cache import CACHE_FIELD, DynamicCache, cache_of, call_with_cache, crop_cache, new_cache
from vila_hd.model.configuration import VilaHDConfig
from vila_hd.model.prefix_plan import PrefixPlan, padded_prefix_plan
from vila_hd.model.projector import VilaHDProjector
from vila_hd.model.token_layout import ImageTokenLayout, TokenLayoutSpec, image_token_layout
from vila_hd.ps3 import PS3VisionModel

try:  # transformers >= 5 tracks loaded tensors; its init functions skip them
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - transformers 4.x
    _init = nn.init

# With SDPA, reuse the prefix KV cache only when it covers at least this share of the sequence (measured
# break-even ~0.12 on an H100, see `_prefix_reuse_pays`).
AUTO_REUSE_MIN_SHARED_FRACTION = 0.15


# Generation inputs with one row per image rather than per sample.
_PER_IMAGE_INPUTS = ("pixel_values", "gt_selection_maps")
# transformers renamed the cache field of model outputs from ``past_key_values`` to ``cache`` (5.2x) and
# its ``generate`` reads only the current name: declare the output with the name this version uses (CACHE_FIELD).

if CACHE_FIELD == "cache":

    @dataclass
    class VilaHDCausalLMOutput(ModelOutput):
        """Causal-LM output plus PS3's selection (per high-res scale, (num_images, h, w))."""

        loss: torch.FloatTensor | None = None
        logits: torch.FloatTensor | None = None
        cache: object | None = None
        hidden_states: tuple[torch.FloatTensor, ...] | None = None
        attentions: tuple[torch.FloatTensor, ...] | None = None
        selection_maps: list[torch.Tensor] | None = None
        selection_probs: list[torch.Tensor] | None = None

else:  # pragma: no cover - exercised with transformers < 5.2x

    @dataclass
    class VilaHDCausalLMOutput(ModelOutput):
        """Causal-LM output plus PS3's selection (per high-res scale, (num_images, h, w))."""

        loss: torch.FloatTensor | None = None
        logits: torch.FloatTensor | None = None
        past_key_values: object | None = None
        hidden_states: tuple[torch.FloatTensor, ...] | None = None
        attentions: tuple[torch.FloatTensor, ...] | None = None
        selection_maps: list[torch.Tensor] | None = None
        selection_probs: list[torch.Tensor] | None = None


@dataclass
class VilaHDImageFeatures:
    """LLM embeddings of a batch of images and how they were selected."""

    low_res: torch.Tensor  # (num_images, T_low, H)
    high_res: torch.Tensor  # (sum of high-res tokens, H), image-major, then scale, then raster order
    high_res_counts: list[int]  # high-res tokens per image
    layout: ImageTokenLayout
    selection_maps: list[torch.Tensor] | None = None  # per high-res scale (num_images, h, w), 0/1
    selection_probs: list[torch.Tensor] | None = None
    prompts: torch.Tensor | None = None  # (num_images, C) top-down prompts, None for bottom-up

    @property
    def embeds(self) -> list[torch.Tensor]:
        """Per image (num_tokens, H): its low-res tokens, then its high-res tokens (the token stream)."""
        highs = self.high_res.split(self.high_res_counts)
        return [torch.cat([lo, hi.to(lo.dtype)]) for lo, hi in zip(self.low_res, highs)]


@dataclass
class VilaHDSelection:
    """What ``generate(..., return_selection_maps=True)`` returns next to the generated ids."""

    maps: list[torch.Tensor]
    probs: list[torch.Tensor]
    prompts: torch.Tensor | None
    layout: ImageTokenLayout


class VilaHDPreTrainedModel(PreTrainedModel):
    config_class = VilaHDConfig
    config: VilaHDConfig
    base_model_prefix = "vila_hd"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_cache_class = True
    _skip_keys_device_placement = ["past_key_values", "cache"]

    def _init_weights(self, module: nn.Module) -> None:
        # transformers >= 5 calls this only for modules that hold parameters directly (for code outside the
        # library), so special inits are tagged on those leaf modules by the projector (`init_rule`).
        rule = getattr(module, "init_rule", None)
        if rule == "uniform":  # prompt head: the reference's uniform(-0.02, 0.02) for weights and biases
            for param in module.parameters(recurse=False):
                _init.uniform_(param, -0.02, 0.02)
        elif rule == "zeros":  # position / scale tables
            for param in module.parameters(recurse=False):
                _init.zeros_(param)
        elif isinstance(module, nn.Linear):
            std = getattr(self.config.text_config, "initializer_range", 0.02) or 0.02
            _init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            _init.ones_(module.weight)
            _init.zeros_(module.bias)


def default_attn_implementation(requested: str | None = None) -> str:
    """flash-attn 2 when installed and a GPU is present, else SDPA (an explicit request wins)."""
    if requested:
        return requested
    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        return "flash_attention_2"
    return "sdpa"


class VilaHDForConditionalGeneration(VilaHDPreTrainedModel, GenerationMixin):
    """VILA-HD multimodal LLM: ``vision_tower`` (PS3), ``mm_projector``, ``language_model``.

    Inputs come from :class:`~vila_hd.processing.VilaHDProcessor`: ``input_ids`` where each image is a
    run of ``image_token_id`` placeholders (length from :mod:`~vila_hd.model.token_layout`), ``pixel_values``
    (num_images, 3, S, S) in placeholder order over the batch, ``prompt_positions`` (B,) for top-down
    selection and ``attention_mask`` (left padding for generation).
    """

    # The trainable parts recipes name: each is the submodules (or parameters) at its paths, matched in this
    # order (the prompt head sits inside the projector). In no part, never trained: PS3's `prior_prompt`
    # (bottom-up selection only) and its pooled head (`trunk.norm`, `trunk.attn_pool`; unused by VILA-HD).
    # A parameter's part from its name, through peft's wrappers too: vila_hd.model.parts.part_of.
    PARTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "prompt_head": ("mm_projector.top_down_prompt_head",),
        "projector": ("mm_projector",),
        "selection": tuple(f"vision_tower.vision_model.{m}" for m in (
            "selection_feature_proj", "highres_selection_feature_module", "prompt_proj_for_highres")),
        "vision_tower": tuple(f"vision_tower.vision_model.{m}" for m in (
            "trunk.patch_embed", "trunk.pos_embed", "trunk.blocks", "pos_emb_residual")),
        "llm": ("language_model",),
    }
    NEVER_TRAINED: ClassVar[tuple[str, ...]] = tuple(
        f"vision_tower.vision_model.{m}" for m in ("prior_prompt", "trunk.norm", "trunk.attn_pool"))

    def parts(self) -> dict[str, list[nn.Module | nn.Parameter]]:
        """Each part's modules by :attr:`PARTS` (a parameter where a path names one: PS3's ``trunk.pos_embed``)."""
        return {part: [self._part_member(path) for path in paths] for part, paths in self.PARTS.items()}

    def _part_member(self, path: str) -> nn.Module | nn.Parameter:
        try:
            return self.get_submodule(path)
        except AttributeError:  # a parameter, not a module
            return self.get_parameter(path)

    def __init__(
        self,
        config: VilaHDConfig,
        vision_tower: PS3VisionModel | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        """Build from ``config``; ``vision_tower`` / ``language_model`` may be given already loaded (the
        builder and the VILA loader do), then their weights are kept and only the projector is initialised."""
        super().__init__(config)
        prebuilt = [m for m in (vision_tower, language_model) if m is not None]
        llm_attn = None if language_model is None else language_model.config._attn_implementation
        self.vision_tower = vision_tower if vision_tower is not None else PS3VisionModel(config.vision_config)
        self.mm_projector = VilaHDProjector(config)
        if language_model is None:
            requested = getattr(config.text_config, "_attn_implementation_internal", None)
            language_model = AutoModelForCausalLM.from_config(
                config.text_config, attn_implementation=default_attn_implementation(requested), trust_remote_code=False
            )
        self.language_model = language_model
        self._no_split_modules = list(
            dict.fromkeys(
                [*(self.language_model._no_split_modules or []), *(self.vision_tower._no_split_modules or [])]
            )
        )
        for loaded in prebuilt:  # loaded weights: keep them out of post_init's initialisation
            for module in loaded.modules():
                module._is_hf_initialized = True
        self.post_init()
        if llm_attn is not None and self.language_model.config._attn_implementation != llm_attn:
            self.language_model.config._attn_implementation = llm_attn  # some versions reset shared sub-configs

    # --- standard accessors ---------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.base_model

    @property
    def layout_spec(self) -> TokenLayoutSpec:
        return TokenLayoutSpec.from_config(self.config)

    def image_token_layout(self, image_hw=None, **look_close) -> ImageTokenLayout:
        """Token layout of one image under these look-close settings (same function as the processor)."""
        return image_token_layout(self.layout_spec, image_hw, **look_close)

    # --- image features -------------------------------------------------------------------------
    def encode_low_res(self, pixel_values: torch.Tensor):
        """PS3 low-res pass (prompt-independent; its output is reused by :meth:`get_image_features`)."""
        dtype = next(self.vision_tower.parameters()).dtype
        return self.vision_tower.vision_model.encode_low_res(pixel_values.to(dtype))

    def project_low_res(self, low) -> torch.Tensor:
        """(num_images, T_low, H) LLM embeddings of the low-res tokens."""
        feats = low.hidden_states[self.config.vision_feature_layer]
        return self.mm_projector.project_low_res(feats.to(self._projector_dtype))

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        *,
        low_res=None,
        low_res_embeds: torch.Tensor | None = None,
        num_look_close=None,
        num_token_look_close=None,
        smooth_selection_prob: bool | None = None,
        gt_selection_maps: torch.Tensor | None = None,
        only_select_first_n_scale: int | None = None,
    ) -> VilaHDImageFeatures:
        """Encode images into LLM embeddings (low-res tokens, then the selected high-res groups).

        Args:
            pixel_values: (num_images, 3, S, S); not needed when ``low_res`` is given.
            prompts: (num_images, C) top-down prompts; ``None`` selects bottom-up.
            low_res / low_res_embeds: outputs of :meth:`encode_low_res` / :meth:`project_low_res` to reuse.
            num_look_close / num_token_look_close: budget (default: the config's).
        """
        if low_res is None:
            low_res = self.encode_low_res(pixel_values)
        if low_res_embeds is None:
            low_res_embeds = self.project_low_res(low_res)
        steps, tokens = self.layout_spec.resolve_look_close(num_look_close, num_token_look_close)
        layout = image_token_layout(
            self.layout_spec,
            low_res.image_hw,
            num_look_close=steps,
            num_token_look_close=tokens,
            only_select_first_n_scale=only_select_first_n_scale,
        )
        smooth = self.config.smooth_selection_prob if smooth_selection_prob is None else smooth_selection_prob
        out = self.vision_tower.vision_model.look_close(
            low_res,
            num_look_close=steps,
            num_token_look_close=tokens,
            prompt=None if prompts is None else prompts.to(next(self.vision_tower.parameters()).dtype),
            gt_selection_maps=gt_selection_maps,
            smooth_selection_prob=smooth,
            only_select_first_n_scale=only_select_first_n_scale,
            output_layers=[self.config.vision_feature_layer],
            selection_group_size=self.config.downsample,
        )
        n_low_patches = low_res.hidden_states[0].shape[1]
        high = out.hidden_states[0][:, n_low_patches:].to(self._projector_dtype)
        # The layout knows each scale's full groups (selection is group-aligned); the projector checks them on the
        # device, so nothing here waits for the GPU.
        high_embeds, _ = self.mm_projector.project_high_res(high, out.selection_maps, offset=0,
                                                            groups_per_scale=layout.high_res_tokens)
        counts = [layout.num_high_res_tokens] * high.shape[0]
        return VilaHDImageFeatures(
            low_res_embeds, high_embeds, counts, layout, out.selection_maps, out.selection_probs, prompts
        )

    @property
    def _projector_dtype(self) -> torch.dtype:
        return next(self.mm_projector.parameters()).dtype

    # --- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        prompt_positions: torch.LongTensor | None = None,
        look_close_mode: str | None = None,
        num_look_close=None,
        num_token_look_close=None,
        smooth_selection_prob: bool | None = None,
        gt_selection_maps: torch.Tensor | None = None,
        only_select_first_n_scale: int | None = None,
        reuse_prefix_cache: bool | str | None = None,
        output_selection_maps: bool = False,
        selection_sink: dict | None = None,
        **kwargs,
    ) -> VilaHDCausalLMOutput:
        """Multimodal causal-LM forward (see the module docstring for the steps).

        ``look_close_mode`` / ``num_look_close`` / ``num_token_look_close`` / ``smooth_selection_prob``
        override the config for this call; the placeholder runs in ``input_ids`` must have been expanded
        with the same budget. ``reuse_prefix_cache``: ``True`` continues the main pass from the prefix pass's
        KV cache, ``False`` recomputes the shared prefix (plain two passes), ``"auto"`` (the default)
        reuses when it is faster (see ``_prefix_reuse_pays``).
        ``selection_sink``: a dict that receives the selection of this call (used by ``generate``).
        """
        kwargs.pop("cache_position", None)
        cache = cache if cache is not None else past_key_values
        past_len = cache.get_seq_length() if cache is not None else 0
        llm_kwargs = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states, **kwargs)
        # Decoding steps (non-empty cache, no pixel_values) must not synchronise with the GPU: only a
        # prefill looks for image tokens.
        if pixel_values is not None and past_len > 0:
            if input_ids is not None and bool((input_ids == self._image_token_id()).any()):
                raise ValueError("images must be given in the first (prefill) forward, not with a non-empty KV cache")
            pixel_values = None  # a decoding step: the images are already in the cache
        if pixel_values is None:
            if past_len == 0 and input_ids is not None and self.config.image_token_id is not None:
                count = int((input_ids == self.config.image_token_id).sum())
                if count:
                    raise ValueError(f"input_ids hold {count} image tokens but no pixel_values were given")
            return self._text_forward(
                input_ids,
                inputs_embeds,
                attention_mask,
                position_ids,
                cache,
                labels,
                use_cache,
                logits_to_keep,
                llm_kwargs,
            )
        if input_ids is None:
            raise ValueError("pixel_values need input_ids with image placeholders (inputs_embeds cannot carry them)")
        image_mask = input_ids == self._image_token_id()
        return self._multimodal_forward(
            input_ids,
            image_mask,
            pixel_values,
            attention_mask,
            position_ids,
            cache,
            labels,
            use_cache,
            logits_to_keep,
            prompt_positions,
            look_close_mode,
            num_look_close,
            num_token_look_close,
            smooth_selection_prob,
            gt_selection_maps,
            only_select_first_n_scale,
            reuse_prefix_cache,
            output_selection_maps,
            selection_sink,
            llm_kwargs,
        )

    def _text_forward(
        self,
        input_ids,
        inputs_embeds,
        attention_mask,
        position_ids,
        cache,
        labels,
        use_cache,
        logits_to_keep,
        llm_kwargs,
    ) -> VilaHDCausalLMOutput:
        if input_ids is not None:
            self._check_context(input_ids.shape[1] + (cache.get_seq_length() if cache is not None else 0))
        if position_ids is None and attention_mask is not None:
            length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            position_ids = _positions_from_mask(attention_mask)[:, -length:]
        out = self._call_llm(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **llm_kwargs,
        )
        return _output(out)

    def _multimodal_forward(
        self,
        input_ids,
        image_mask,
        pixel_values,
        attention_mask,
        position_ids,
        cache,
        labels,
        use_cache,
        logits_to_keep,
        prompt_positions,
        look_close_mode,
        num_look_close,
        num_token_look_close,
        smooth_selection_prob,
        gt_selection_maps,
        only_select_first_n_scale,
        reuse_prefix_cache,
        output_selection_maps,
        selection_sink,
        llm_kwargs,
    ) -> VilaHDCausalLMOutput:
        batch, length = input_ids.shape
        self._check_context(length)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = _positions_from_mask(attention_mask)
        mode = look_close_mode or self.config.look_close_mode
        steps, tokens = self.layout_spec.resolve_look_close(num_look_close, num_token_look_close)
        steps, tokens = _as_python(steps), _as_python(tokens)
        layout = image_token_layout(
            self.layout_spec,
            tuple(pixel_values.shape[-2:]),
            num_look_close=steps,
            num_token_look_close=tokens,
            only_select_first_n_scale=only_select_first_n_scale,
        )
        images_per_sample = self._images_per_sample(image_mask, pixel_values.shape[0], layout, steps, tokens)

        # Where each image's tokens go: (num_images, T) positions, low-res part first.
        rows, cols = image_mask.nonzero(as_tuple=True)
        rows = rows.view(-1, layout.num_tokens)
        cols = cols.view(-1, layout.num_tokens)
        n_low = layout.num_low_res_tokens
        high_mask = torch.zeros_like(image_mask)
        high_mask[rows[:, n_low:].reshape(-1), cols[:, n_low:].reshape(-1)] = True

        embeds = self.embed_text(input_ids, image_mask)
        low = self.encode_low_res(pixel_values)
        low_embeds = self.project_low_res(low)
        embeds = self.merge_image_embeddings(embeds, rows[:, :n_low], cols[:, :n_low], low_embeds)

        reuse = self.config.reuse_prefix_cache if reuse_prefix_cache is None else reuse_prefix_cache
        # The cached prefix carries no gradient and holds no hidden states: training and analysis run plain.
        eligible = not torch.is_grad_enabled() and labels is None and not llm_kwargs.get("output_hidden_states")
        eligible = eligible and (cache is None or (DynamicCache is not None and isinstance(cache, DynamicCache)))
        reuse = reuse if eligible else False
        prompts, prefix = None, None
        if mode == "after_prompt":
            positions = self._prompt_positions(input_ids, attention_mask, prompt_positions)
            prompts, prefix = self._prefix_pass(
                embeds,
                attention_mask,
                position_ids,
                high_mask,
                positions,
                images_per_sample,
                cache if reuse else None,
                reuse,
                n_low,
            )
        elif mode != "after_image":
            raise ValueError(f"look_close_mode must be 'after_prompt' or 'after_image', got {mode!r}")

        feats = self.get_image_features(
            prompts=prompts,
            low_res=low,
            low_res_embeds=low_embeds,
            num_look_close=steps,
            num_token_look_close=tokens,
            smooth_selection_prob=smooth_selection_prob,
            gt_selection_maps=gt_selection_maps,
            only_select_first_n_scale=only_select_first_n_scale,
        )
        embeds = self.merge_image_embeddings(embeds, rows[:, n_low:], cols[:, n_low:], feats.high_res)
        if selection_sink is not None:
            selection_sink["selection"] = VilaHDSelection(feats.selection_maps, feats.selection_probs, prompts, layout)

        if prefix is not None:
            out, logits = self._main_pass_from_prefix(
                embeds, attention_mask, position_ids, prefix, logits_to_keep, llm_kwargs
            )
            keep_cache = use_cache is not False
        else:
            out = self._call_llm(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **llm_kwargs,
            )
            logits, keep_cache = out.logits, True
        return _output(out, keep_cache=keep_cache, logits=logits, selection=feats if output_selection_maps else None)

    # --- the multimodal forward's pieces (also run by the training step) -------------------------
    def embed_text(self, input_ids: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H) token embeddings; image placeholders (``image_mask``) embedded as token 0, to be replaced by
        :meth:`merge_image_embeddings`."""
        return self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))

    def merge_image_embeddings(self, embeds: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                               image_embeds: torch.Tensor) -> torch.Tensor:
        """``embeds`` (B, L, H) with image embeddings written at their tokens: ``rows`` / ``cols`` (images, T)
        where each image's tokens sit, ``image_embeds`` their embeddings in the same order (image-major, any shape
        of ``images * T`` vectors)."""
        values = image_embeds.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return embeds.index_put((rows.reshape(-1), cols.reshape(-1)), values)

    def top_down_prompts(self, embeds: torch.Tensor, plan: PrefixPlan, cache=None) -> tuple[torch.Tensor, ModelOutput]:
        """Top-down prompts from a :class:`~vila_hd.model.prefix_plan.PrefixPlan`: the LLM (no gradient) over the
        tokens of ``embeds`` (B, L, H) the plan reads (each prompt's context without high-res tokens), its final
        hidden state at each prompt -> the prompt head.

        The plan's sample spans, when it has them, go to segment attention (the LLM must run it, see
        :mod:`vila_hd.model.attention`), else its attention mask (or none). Returns ``(prompts (P, C), the pass's
        LLM output)``; given ``cache``, the pass fills it."""
        prefix_embeds = embeds[plan.rows[:, None], plan.order]
        if plan.segments is not None:
            masks = {"segments": plan.segments, "attention_mask": NO_MASKS}
        else:
            masks = {"attention_mask": plan.attention_mask}
        with torch.no_grad():
            out = self._call_base(inputs_embeds=prefix_embeds, position_ids=plan.positions, cache=cache,
                                  use_cache=cache is not None, **masks)
        at_prompt = out.last_hidden_state[plan.prompt_rows, plan.prompt_columns]
        return self.mm_projector.prompt(at_prompt.to(self._projector_dtype)), out

    # --- top-down prefix pass ---------------------------------------------------------------------
    def _prefix_pass(self, embeds, attention_mask, position_ids, high_mask, positions, images_per_sample, cache, reuse,
                     low_res_tokens):
        """LLM over each sample's tokens up to its prompt position, high-res tokens left out.

        Returns ``(prompts (num_images, C), prefix)``; with ``reuse``, ``prefix`` holds the KV cache of the
        first ``shared`` tokens (identical in the main sequence) and their hidden states."""
        length = attention_mask.shape[1]
        with_images = images_per_sample > 0
        idx = torch.arange(length, device=embeds.device)
        first_high = torch.where(high_mask.any(1), torch.where(high_mask, idx, length).amin(1), length)
        shared_per_row = torch.where(with_images, torch.minimum(first_high, positions + 1), length)
        shared = min(int(shared_per_row.min()), length - 1) if reuse else 0
        if reuse == "auto" and not self._prefix_reuse_pays(shared, length):
            shared = 0
        plan = padded_prefix_plan(attention_mask, position_ids, high_mask, positions, with_images, shared,
                                  low_res_tokens)
        if shared > 0 and cache is None:
            cache = new_cache(self.config.text_config)
        prompts, out = self.top_down_prompts(embeds, plan, cache if shared > 0 else None)
        prompts = prompts.repeat_interleave(images_per_sample[with_images], dim=0)
        if shared == 0:
            return prompts, None
        cache = cache_of(out) or cache
        crop_cache(cache, shared)
        return prompts, {"shared": shared, "cache": cache, "hidden": out.last_hidden_state[:, :shared]}

    def _prefix_reuse_pays(self, shared: int, length: int) -> bool:
        """Whether continuing the main pass from the prefix KV cache beats recomputing the shared part.

        Flash attention runs a cached continuation at full speed, so any shared prefix is a saving. SDPA
        needs a dense mask once the queries are fewer than the keys, which on an H100 made the continuation
        ~13% slower per token than a fresh causal pass (Qwen2-7B, 4K tokens): reuse pays there only when
        the shared part is a sizeable fraction of the sequence (long chat histories, several images)."""
        if shared <= 0:
            return False
        if str(self.language_model.config._attn_implementation).startswith("flash_attention"):
            return True
        return shared >= AUTO_REUSE_MIN_SHARED_FRACTION * length

    def _main_pass_from_prefix(self, embeds, attention_mask, position_ids, prefix, logits_to_keep, llm_kwargs):
        """Main pass over the tokens after the shared prefix, on top of the prefix pass's KV cache.

        Returns ``(llm_output, logits)``; with ``logits_to_keep=0`` the shared part's logits come from the
        prefix pass's hidden states so that every position has one."""
        shared = prefix["shared"]
        out = self._call_llm(
            inputs_embeds=embeds[:, shared:],
            attention_mask=attention_mask,
            position_ids=position_ids[:, shared:],
            cache=prefix["cache"],
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **llm_kwargs,
        )
        logits = out.logits
        if isinstance(logits_to_keep, int) and logits_to_keep == 0:
            head = self.get_output_embeddings()
            logits = torch.cat([head(prefix["hidden"]).to(logits.dtype), logits], dim=1)
        return out, logits

    def _prompt_positions(self, input_ids, attention_mask, prompt_positions) -> torch.Tensor:
        """Index of the prompt token per sample: given by the processor, or found from the chat template's
        user-turn end (``config.prompt_end_token_ids``), or the last token."""
        batch, length = input_ids.shape
        if prompt_positions is not None:
            positions = torch.as_tensor(prompt_positions, device=input_ids.device).long().view(-1)
            if positions.numel() != batch:
                raise ValueError(f"prompt_positions has {positions.numel()} entries for a batch of {batch}")
        else:
            positions = self._find_prompt_positions(input_ids, attention_mask)
        if (positions < 0).any() or (positions >= length).any():
            raise ValueError(f"prompt_positions {positions.tolist()} fall outside the sequence of length {length}")
        if not attention_mask.gather(1, positions[:, None]).bool().all():
            raise ValueError(f"prompt_positions {positions.tolist()} point at padding")
        return positions

    def _find_prompt_positions(self, input_ids, attention_mask) -> torch.Tensor:
        last = attention_mask.shape[1] - 1 - attention_mask.flip(1).long().argmax(1)
        end = getattr(self.config, "prompt_end_token_ids", None)
        if not end:
            return last
        pattern = torch.tensor(end, device=input_ids.device)
        n = pattern.numel()
        if input_ids.shape[1] < n:
            return last
        windows = input_ids.unfold(1, n, 1)  # (B, L-n+1, n)
        hits = (windows == pattern).all(-1)
        idx = torch.arange(hits.shape[1], device=input_ids.device)
        found = torch.where(hits, idx, -1).amax(1)
        return torch.where(found > 0, found - 1, last)

    # --- helpers ----------------------------------------------------------------------------------
    def _image_token_id(self) -> int:
        if self.config.image_token_id is None:
            raise ValueError("config.image_token_id is not set; build the model with its tokenizer's <image> id")
        return self.config.image_token_id

    def _images_per_sample(self, image_mask, num_images, layout, steps, tokens) -> torch.Tensor:
        per_sample = image_mask.sum(1)
        total = int(per_sample.sum())
        n = layout.num_tokens
        if total == 0:
            raise ValueError(
                f"pixel_values hold {num_images} image(s) but input_ids have no image tokens "
                f"(id {self.config.image_token_id}); put {self.config.image_token} in the prompt for each image"
            )
        settings = f"num_look_close={steps!r}, num_token_look_close={tokens!r}"
        for b, count in enumerate(per_sample.tolist()):
            if count % n:
                raise ValueError(
                    f"sample {b} holds {count} image tokens, not a multiple of the {n} tokens an image takes "
                    f"with {settings}; expand the prompt with VilaHDProcessor using the same settings"
                )
        if total != num_images * n:
            raise ValueError(
                f"input_ids hold image tokens for {total // n} image(s) ({n} tokens each, {settings}) but "
                f"pixel_values hold {num_images} image(s)"
            )
        return per_sample // n

    def _check_context(self, length: int) -> None:
        limit = self.config.max_context
        if limit is not None and length > limit:
            raise ValueError(
                f"sequence of {length} tokens after image expansion exceeds the LLM context of {limit} "
                "(max_position_embeddings)"
            )

    def _call_llm(self, cache=None, **kwargs):
        return call_with_cache(self.language_model, cache, return_dict=True, **kwargs)

    def _call_base(self, cache=None, **kwargs):
        return call_with_cache(self.language_model.base_model, cache, return_dict=True, **kwargs)

    # --- generation -------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        cache = inputs.get("cache", inputs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            for key in ("pixel_values", "gt_selection_maps"):
                inputs.pop(key, None)
        return inputs

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: torch.LongTensor | None = None, **model_kwargs):
        """``num_return_sequences`` / beams repeat each *sample*; image-indexed inputs (``pixel_values``,
        ``gt_selection_maps``: one row per image, a sample may hold several) must repeat each sample's run of
        images, which the default row-wise ``repeat_interleave`` gets wrong as soon as a sample has two."""
        per_image = {k: model_kwargs.pop(k) for k in _PER_IMAGE_INPUTS if model_kwargs.get(k) is not None}
        if expand_size > 1 and per_image:
            order = self._expanded_image_order(input_ids, per_image["pixel_values"].shape[0], expand_size)
            per_image = {k: v.index_select(0, order.to(v.device)) for k, v in per_image.items()}
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        return input_ids, {**model_kwargs, **per_image}

    def _expanded_image_order(self, input_ids, num_images: int, expand_size: int) -> torch.Tensor:
        """Image rows for samples repeated ``expand_size`` times each: [s0's images] x n, [s1's images] x n, ..."""
        if input_ids is None:
            raise ValueError("pixel_values need input_ids with image placeholders to expand for generation")
        per_row = (input_ids == self._image_token_id()).sum(1)
        tokens = int(per_row.sum())
        if num_images == 0 or tokens == 0 or tokens % num_images:
            raise ValueError(
                f"input_ids hold {tokens} image tokens: not a whole, non-zero number per image for {num_images} image(s)"
            )
        counts = (per_row // (tokens // num_images)).tolist()
        starts = [sum(counts[:i]) for i in range(len(counts))]
        order = [idx for start, n in zip(starts, counts) for _ in range(expand_size) for idx in range(start, start + n)]
        return torch.tensor(order, dtype=torch.long)

    def generate(self, *args, return_selection_maps: bool = False, **kwargs):
        """``GenerationMixin.generate`` (greedy, sampling, streamers, KV cache...); with
        ``return_selection_maps=True`` returns ``(output, VilaHDSelection)`` (``None`` without images)."""
        if not return_selection_maps:
            return super().generate(*args, **kwargs)
        sink: dict = {}
        output = super().generate(*args, selection_sink=sink, **kwargs)
        return output, sink.get("selection")

    def set_generation_defaults(self, processor) -> None:
        """Adopt the processor's tokens (:meth:`set_template_defaults` with its tokenizer, chat template and
        image placeholder); ``save_pretrained`` then writes them (``config.json``, ``generation_config.json``)."""
        self.set_template_defaults(processor.tokenizer, processor.chat_template, processor.image_token)

    def set_template_defaults(self, tokenizer, chat_template: str | None, image_token: str = "<image>") -> None:
        """Adopt the tokens of ``tokenizer`` and ``chat_template``: image placeholder id, end-of-turn stop ids,
        padding id and the user-turn end used to locate prompts when ``prompt_positions`` is not given."""
        from vila_hd.templates import image_token_id, turn_ends

        self.config.image_token = image_token
        self.config.image_token_id = image_token_id(tokenizer, image_token)
        end_text, stops = turn_ends(tokenizer, chat_template)
        self.config.prompt_end_token_ids = tokenizer(end_text, add_special_tokens=False).input_ids if end_text else None
        self.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
        self.generation_config.pad_token_id = pad

    # --- checkpoints ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load our single-directory format, or a VILA checkpoint (``llm/``, ``vision_tower/``,
        ``mm_projector/``), from a local directory or a Hub id; the layout is decided by ``config.json``.

        Weights come from safetensors only (a directory with only ``.bin`` / ``.pt`` files is refused: unpickling
        can run code), and a local-looking path that does not exist is an error, never a Hub download. A directory
        whose configs name custom code (``auto_map``) is refused before anything is read from it.

        Missing or unexpected tensors are a :class:`~vila_hd.hub.CheckpointError` naming them;
        ``allow_missing_keys`` / ``allow_unexpected_keys`` (regular expressions searched in the full key, e.g.
        ``[r"^mm_projector\\.top_down_prompt_head\\."]`` to start a new prompt head fresh) allow them explicitly.
        The keys are those of this model (``language_model.*``, ``vision_tower.*``, ``mm_projector.*``) in both
        layouts."""
        from vila_hd.hub import (
            locate_directory,
            pop_key_allowances,
            refuse_custom_code,
            refuse_pickled_weights,
            resolve_model_dir,
            safetensors_only,
            strict_from_pretrained,
        )
        from vila_hd.model.vila_layout import is_vila_config

        path, local = locate_directory(pretrained_model_name_or_path, "VILA-HD checkpoint")
        kwargs = safetensors_only(kwargs, f"VILA-HD checkpoint {path}")
        if local:
            refuse_pickled_weights(path, "VILA-HD checkpoint")
            refuse_custom_code(path, "VILA-HD checkpoint")
        top = _peek_config(path, kwargs)
        if not local:  # the snapshot (metadata + safetensors) is checked for custom code before it is read
            path = resolve_model_dir(path, kind="model", **_hub_kwargs(kwargs))
        if top is not None and is_vila_config(top):
            kwargs, allow_missing, allow_unexpected = pop_key_allowances(kwargs)
            return load_vila_model(
                path, dtype=kwargs.get("dtype", kwargs.get("torch_dtype")), device=kwargs.get("device_map"),
                allow_missing_keys=allow_missing, allow_unexpected_keys=allow_unexpected,
            )
        return strict_from_pretrained(super().from_pretrained, path, "VILA-HD checkpoint", *model_args, **kwargs)


def load_vila_model(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device=None,
                    allow_missing_keys: Sequence[str] = (), allow_unexpected_keys: Sequence[str] = ()):
    """Load a VILA-layout checkpoint (:mod:`vila_hd.model.vila_layout`) as a
    :class:`VilaHDForConditionalGeneration` (eval mode, generation defaults set from ``llm/``'s tokenizer and
    chat template).

    ``device``: a device (``"cuda:0"``, ``torch.device``): every part is created empty and filled from its
    safetensors on that device, with no full copy in CPU memory first; an accelerate strategy (``"auto"``,
    ``"balanced"``, ...): the LLM is spread by it and the vision tower and projector go where the LLM's input
    embeddings are; a dict over the combined model's module names: loaded on the CPU, then dispatched.

    Missing, unexpected or mis-shaped tensors in any part are a :class:`CheckpointError` naming them as keys of
    the combined model (``language_model.*``, ``vision_tower.*``, ``mm_projector.*``); ``allow_missing_keys`` /
    ``allow_unexpected_keys`` (regular expressions searched in those names) allow them explicitly."""
    from vila_hd.dtypes import resolve_dtype
    from vila_hd.model import vila_layout

    path = os.fspath(path)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = resolve_dtype(dtype, torch.device("cpu"))
    config, tokenizer, template = vila_layout.read_vila_checkpoint(path)
    allowed = (allow_missing_keys, allow_unexpected_keys)
    llm, vision = vila_layout.load_vila_parts(path, config, dtype, device, default_attn_implementation(), *allowed)
    model = VilaHDForConditionalGeneration(config, vision_tower=vision, language_model=llm)
    vila_layout.load_vila_projector(model.mm_projector, path, *allowed)
    target = dtype if isinstance(dtype, torch.dtype) else next(llm.parameters()).dtype
    model.mm_projector.to(device=vision.device, dtype=target)
    model.set_template_defaults(tokenizer, template, config.image_token)
    if isinstance(device, dict):
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=device)
    return model.eval()


# --- small utilities -------------------------------------------------------------------------------
def _positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _as_python(value):
    if torch.is_tensor(value):
        return value.item()
    return value


def _output(out, keep_cache: bool = True, logits=None, selection=None) -> VilaHDCausalLMOutput:
    # Built once with every field: a ModelOutput keeps a key once set, and ignores keys set after init.
    cache = cache_of(out) if keep_cache else None
    return VilaHDCausalLMOutput(
        loss=out.get("loss"),
        logits=out.get("logits") if logits is None else logits,
        hidden_states=out.get("hidden_states"),
        attentions=out.get("attentions"),
        selection_maps=None if selection is None else selection.selection_maps,
        selection_probs=None if selection is None else selection.selection_probs,
        **{CACHE_FIELD: cache},
    )


def _hub_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}


def _peek_config(path_or_id, kwargs: dict) -> dict | None:
    """The checkpoint's top-level config.json (None if it cannot be read, or a ``config`` is given)."""
    import json

    if kwargs.get("config") is not None:
        return None
    path = os.fspath(path_or_id)
    cfg = os.path.join(path, "config.json")
    if not os.path.exists(path):  # a Hub id (from_pretrained checked that with hub.locate)
        try:
            from huggingface_hub import hf_hub_download

            cfg = hf_hub_download(path, "config.json", **_hub_kwargs(kwargs))
        except Exception:
            return None
    if not os.path.exists(cfg):
        return None
    with open(cfg) as f:
        return json.load(f)
