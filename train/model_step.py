"""The VILA-HD training forward: what DeepSpeed wraps and the :class:`~vila_hd.train.trainer.Trainer` calls.

:class:`VilaHDTrainStep` runs ``VilaHDForConditionalGeneration``'s own multimodal forward, piece by piece
(``embed_text``, ``encode_low_res``, ``project_low_res``, ``merge_image_embeddings``, ``top_down_prompts``,
``get_image_features``, the LLM), arranged for training:

- rows may be *packed* (several samples, position ids restarting at each sample), so each image has its own
  prompt position and the top-down prefix pass runs once over all rows, with high-res tokens removed and each
  row cut after its last prompt (:func:`vila_hd.model.prefix_plan.prefix_plan`);
- samples do not attend to each other: segment attention (one causal call per sample span, see
  :mod:`vila_hd.model.attention`), or with ``llm_attention="model"`` the LLM's own block-diagonal mask;
- the data-dependent indices (image tokens, targets, spans, prefix plan) come from the collator, found on the
  CPU, so the step's own code never waits for the GPU (it finds them itself when a batch lacks them);
- the selection probabilities are returned un-forced (no ground-truth forcing), for the box loss;
- the LM head runs only at the target tokens, and the loss is a sum;
- ZeRO-3 lockstep: every call runs the vision tower, the prefix pass, the prompt head and the LLM once,
  whatever the data (a batch without images carries one dummy image, placed nowhere, whose embeddings
  enter the loss with weight 0 so every trainable parameter receives a gradient on every rank).

Returns ``{"lm": summed CE, "selection": summed per-image BCE + Dice over boxed images}``; the trainer
normalises each by its global count (``batch["num_items"]``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vila_hd.model.attention import NO_MASKS, SEGMENT_ATTENTION, register_segment_attention, supports_segments
from vila_hd.model.prefix_plan import PrefixPlan, prefix_plan
from vila_hd.train.config import LLM_ATTENTION
from vila_hd.train.losses import lm_loss_sum, selection_loss, target_positions


class VilaHDTrainStep(nn.Module):
    """Training forward of a VILA-HD model (optionally with LoRA layers injected by peft)."""

    def __init__(self, model: nn.Module, look_close: dict[str, Any] | None = None, mode: str | None = None,
                 llm_attention: str = "auto", normalize: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """``normalize``: turns uint8 pixel batches into model inputs (the image processor's
        :meth:`~vila_hd.ps3.PS3ImageProcessor.normalize`); float batches are taken as normalised."""
        super().__init__()
        self.model = model
        self.normalize = normalize
        self.look_close = {k: v for k, v in (look_close or {}).items() if v is not None}
        self.mode = mode or model.config.look_close_mode
        if self.mode not in ("after_prompt", "after_image"):
            raise ValueError(f"look_close mode must be after_prompt or after_image, got {self.mode!r}")
        self.segments = use_segment_attention(model.language_model, llm_attention)
        self.plain_head = plain_lm_head(model.language_model.config)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        m = self.model
        input_ids, positions, targets = batch["input_ids"], batch["position_ids"], batch["target_ids"]
        pixel_values = self._pixels(batch["pixel_values"])
        placed = int(batch["num_placed_images"])
        layout = m.image_token_layout(tuple(pixel_values.shape[-2:]), **self.look_close)
        n_tok, n_low = layout.num_tokens, layout.num_low_res_tokens
        image_mask = input_ids == m.config.image_token_id
        rows, cols = _image_positions(batch, image_mask)
        if rows.numel() != placed * n_tok:
            raise ValueError(
                f"the batch holds {rows.numel()} image tokens for {placed} image(s) of {n_tok} tokens "
                f"({self.look_close}); the data was expanded with other look-close settings than the model uses"
            )
        rows, cols = rows.view(placed, n_tok), cols.view(placed, n_tok)

        embeds = m.embed_text(input_ids, image_mask)
        low = m.encode_low_res(pixel_values)
        low_embeds = m.project_low_res(low)
        embeds = m.merge_image_embeddings(embeds, rows[:, :n_low], cols[:, :n_low], low_embeds[:placed])
        prompts = None
        if self.mode == "after_prompt":
            prompts = self._prompts(embeds, batch, rows, cols, n_low, pixel_values.shape[0])
        feats = m.get_image_features(prompts=prompts, low_res=low, low_res_embeds=low_embeds, **self.look_close)
        if placed:
            high = feats.high_res[:sum(feats.high_res_counts[:placed])]
            embeds = m.merge_image_embeddings(embeds, rows[:, n_low:], cols[:, n_low:], high)

        lm = self._lm_loss(embeds, positions, targets, batch)

        # Images placed nowhere (the dummy) still reach the loss, with weight 0 (see the module docstring).
        unused = sum((e.float().sum() for e in feats.embeds[placed:]), torch.zeros((), device=lm.device))
        boxes = batch["boxes"].to(lm.device)
        has_box = ~boxes.isnan().any(-1)
        per_image = selection_loss(feats.selection_probs, boxes)
        selection = torch.where(has_box, per_image, torch.zeros_like(per_image)).sum()
        return {"lm": lm + 0.0 * unused, "selection": selection}

    def _pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dtype != torch.uint8:
            return pixel_values
        if self.normalize is None:
            raise ValueError("the batch holds uint8 pixels but the training step has no normalize (give it the "
                             "image processor's normalize)")
        return self.normalize(pixel_values)

    def _lm_loss(self, embeds, positions, targets, batch) -> torch.Tensor:
        """Summed CE of the target tokens. The LM head runs at exactly the target positions (not at every column
        where some row has one, which with unpacked rows multiplies the head's work and the fp32 logits by the
        number of rows), except for LLMs whose head does more than a linear layer (``logits_to_keep`` path)."""
        m = self.model
        spans = {"segments": batch["segments"], "attention_mask": NO_MASKS} if self.segments else {}
        if not self.plain_head:
            keep = _target_positions(batch, targets)[1].unique()
            out = m.language_model(inputs_embeds=embeds, position_ids=positions, logits_to_keep=keep,
                                   use_cache=False, **spans)
            return lm_loss_sum(out.logits, targets[:, keep])
        out = m.language_model.base_model(inputs_embeds=embeds, position_ids=positions, use_cache=False, **spans)
        rows, cols = _target_positions(batch, targets)
        logits = m.language_model.get_output_embeddings()(out.last_hidden_state[rows, cols])
        return lm_loss_sum(logits, targets[rows, cols])

    def _prompts(self, embeds, batch, rows, cols, n_low, num_images) -> torch.Tensor:
        """Top-down prompts (num_images, C) from the model's prefix pass over each row's tokens without the high-res
        ones, up to the row's last prompt position (:func:`vila_hd.model.prefix_plan.prefix_plan`); images placed
        nowhere (the dummy) read row 0's first token."""
        plan = _prefix_plan(batch, rows, cols, n_low)
        if not self.segments:
            plan = dataclasses.replace(plan, segments=None)
        extra = num_images - plan.prompt_rows.shape[0]
        if extra:
            plan = plan.with_unplaced(extra)
        return self.model.top_down_prompts(embeds, plan)[0]


# Index plans: from the collator when it found them on the CPU (no GPU sync), else computed here.
def _image_positions(batch: dict[str, Any], image_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of every image token, row-major."""
    found = batch.get("image_positions")
    if found is not None:
        return found[0], found[1]
    return image_mask.nonzero(as_tuple=True)


def _prefix_plan(batch: dict[str, Any], rows: torch.Tensor, cols: torch.Tensor, n_low: int) -> PrefixPlan:
    found = batch.get("prefix")
    if found is None:
        return prefix_plan(batch["position_ids"], rows, cols, n_low, batch["prompt_index"])
    if found["low_res_tokens"] != n_low:
        raise ValueError(f"the collator planned the prefix pass for {found['low_res_tokens']} low-res tokens per "
                         f"image but the model's layout has {n_low}")
    return PrefixPlan(**found).to(rows.device)


def _target_positions(batch: dict[str, Any], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of every target token, row-major; (0, 0) when there is none, so the LM head always runs."""
    found = batch.get("target_positions")
    if found is None:
        found = target_positions(targets)
    return found[0], found[1]


def use_segment_attention(llm: nn.Module, choice: str) -> bool:
    """Switch the LLM to segment attention (see :mod:`vila_hd.model.attention`) for ``"segments"``, and for
    ``"auto"`` when it runs SDPA on transformers >= 5; ``"model"`` keeps its own implementation (flash-attn 2
    already reads packed rows from the position ids). Returns whether the main pass passes segments."""
    if choice not in LLM_ATTENTION:
        raise ValueError(f"llm_attention must be one of {LLM_ATTENTION}, got {choice!r}")
    current = llm.config._attn_implementation
    wanted = choice == "segments" or (choice == "auto" and current in ("sdpa", SEGMENT_ATTENTION))
    if not wanted:
        return False
    if not supports_segments(llm.config):
        if choice == "segments":
            raise ValueError("llm_attention='segments' needs transformers >= 5 (masks prepared per layer type) and "
                             "an LLM with plain causal attention (no sliding window, no soft-capping)")
        return False
    register_segment_attention()
    llm.config._attn_implementation = SEGMENT_ATTENTION
    return True


# Config fields of LLMs whose ForCausalLM forward does more than ``lm_head(hidden)`` (Gemma 2, Cohere, Granite).
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def plain_lm_head(config) -> bool:
    """Whether the LLM's logits are ``lm_head(last_hidden_state)`` and nothing more."""
    return all(getattr(config, name, None) in (None, 1.0) for name in _HEAD_EXTRAS)
