"""PS3 localized contrastive model: both PS3 towers + SigLIP logit scale/bias (reference spec §7, §10).

:class:`PS3ForPretraining` holds ``vision_model`` and ``text_model`` directly, so its ``state_dict`` *is* the official
checkpoint layout (``vision_model.*``, ``text_model.*``, ``logit_scale``, ``logit_bias``). One forward:

1. the caption goes through the text tower: normalised ``pooled_output`` = text feature; ``prompt`` (the text tower's
   ``prompt_proj`` of the normalised embedding) = top-down selection prompt of the sample's own caption;
2. the low-res pass of the image; bottom-up and top-down selection probabilities;
3. one look-close step (``tokens_per_step``, default the config's ``max_select_num``): GT-box patches are forced first
   (``select_with_gt``), the rest by top-down probability; the selected high-res tokens are attention-pooled over
   the tokens inside the box (``pool_gt_token_only``); global-caption samples use the low-res pooled vector.

Selection is a no-grad top-k: the selection modules learn only from the box BCE (:func:`pretrain_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from vila_hd.ps3 import PS3Config, PS3Model

from .data import box_maps_for_grids
from .losses import selection_bce, siglip_loss

__all__ = [
    "LOSS_TERMS",
    "SELECTION_MODULES",
    "PS3ForPretraining",
    "PretrainOutput",
    "box_recall",
    "box_recall_sums",
    "loss_counts",
    "pretrain_loss",
    "pretrain_loss_sums",
]

# Parameters the selection-only mode trains (the reference's token-selection set, under our key names).
SELECTION_MODULES = (
    "text_model.prompt_proj.",
    "vision_model.selection_feature_proj.",
    "vision_model.prior_prompt",
    "vision_model.highres_selection_feature_module.",
    "vision_model.prompt_proj_for_highres.",
)


@dataclass
class PretrainOutput:
    """What one pre-training forward produces (features are L2-normalised; ``image_features`` is None when the
    contrastive branch is skipped in selection-only training)."""

    image_features: torch.Tensor | None
    text_features: torch.Tensor
    logit_scale: torch.Tensor  # exponentiated
    logit_bias: torch.Tensor
    bottomup_probs: list[torch.Tensor]
    topdown_probs: list[torch.Tensor]
    selection_maps: list[torch.Tensor] | None
    gt_maps: torch.Tensor
    is_global: torch.Tensor


class PS3ForPretraining(nn.Module):
    """PS3 vision + text towers with the SigLIP contrastive head.

    Args:
        config: the PS3 configuration (vision + text).
        logit_scale: initial value of ``exp(logit_scale)`` (SigLIP: 10).
        logit_bias: initial bias (SigLIP: -10).
        select_with_gt: force GT-box patches into the look-close step before top-down ones.
        pool_gt_token_only: pool only the high-res tokens inside the box for local captions.
        tokens_per_step: patches of the one look-close step (None: the config's ``max_select_num``).
    """

    def __init__(
        self,
        config: PS3Config,
        logit_scale: float = 10.0,
        logit_bias: float = -10.0,
        select_with_gt: bool = True,
        pool_gt_token_only: bool = True,
        tokens_per_step: int | None = None,
    ):
        super().__init__()
        if pool_gt_token_only and not select_with_gt:
            raise ValueError(
                "pool_gt_token_only=True needs select_with_gt=True: the box tokens are only guaranteed to be "
                "selected (and the encoder only receives the box map) when GT patches are forced"
            )
        budget = config.vision_config.max_select_num
        if tokens_per_step is not None and not 0 < tokens_per_step <= budget:
            raise ValueError(f"tokens_per_step={tokens_per_step} must lie in [1, max_select_num={budget}] (one step)")
        towers = PS3Model(config)  # builds and initialises both towers as the released model does
        self.config = towers.config
        self.vision_model = towers.vision_model
        self.text_model = towers.text_model
        # Shape (1,) as in transformers' SigLIP (DeepSpeed cannot broadcast 0-d parameters); exported as scalars.
        self.logit_scale = nn.Parameter(torch.tensor([math.log(logit_scale)]))
        self.logit_bias = nn.Parameter(torch.tensor([float(logit_bias)]))
        self.select_with_gt = select_with_gt
        self.pool_gt_token_only = pool_gt_token_only
        self.tokens_per_step = tokens_per_step
        self.contrastive = True
        vision, text = config.vision_config, config.text_config
        if text.prompt_proj_dim != vision.hidden_size:
            raise ValueError(
                f"text_config.prompt_proj_dim={text.prompt_proj_dim} must equal vision_config.hidden_size="
                f"{vision.hidden_size}: the text prompt drives the vision tower's top-down selection"
            )
        if text.output_dim != vision.hidden_size:
            raise ValueError(
                f"text_config.output_dim={text.output_dim} must equal vision_config.hidden_size={vision.hidden_size} "
                "(image and text features are compared directly)"
            )

    # --- training modes ------------------------------------------------------------------------------------------------
    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Recompute every vision and text block in the backward pass."""
        self.vision_model.gradient_checkpointing = enable
        self.text_model.gradient_checkpointing = enable

    def train_only_selection(self) -> list[str]:
        """Freeze everything but the selection modules (:data:`SELECTION_MODULES`); returns the trainable names.

        The contrastive branch is then skipped: selection is a no-grad top-k, so the SigLIP loss would give the
        trainable parameters no gradient.
        """
        trainable = []
        for name, param in self.named_parameters():
            param.requires_grad_(name.startswith(SELECTION_MODULES))
            if param.requires_grad:
                trainable.append(name)
        self.contrastive = False
        return trainable

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no weight decay on 1-d parameters (norms, biases, tables of one row) and the logit scalars."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or name in ("logit_scale", "logit_bias") else decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    # --- forward -------------------------------------------------------------------------------------------------------
    def normalize_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> the model dtype with mean = std = 0.5; float input is taken as normalised."""
        dtype = self.vision_model.trunk.patch_embed.proj.weight.dtype
        if pixel_values.dtype == torch.uint8:
            return (pixel_values.to(dtype) / 127.5 - 1.0).to(dtype)
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be uint8 or floating point, got {pixel_values.dtype}")
        return pixel_values.to(dtype)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        boxes: torch.Tensor,
        is_global: torch.Tensor,
    ) -> PretrainOutput:
        """``pixel_values`` (B, 3, S, S) uint8 or normalised float; ``input_ids`` (B, L); ``boxes`` (B, 4) XYXY in
        input pixels (ignored for global captions); ``is_global`` (B,) bool."""
        batch = pixel_values.shape[0]
        for name, value, shape in (("input_ids", input_ids, 2), ("boxes", boxes, 2), ("is_global", is_global, 1)):
            if value.dim() != shape or value.shape[0] != batch:
                raise ValueError(f"{name} must have batch size {batch} in dim 0, got shape {tuple(value.shape)}")
        pixels = self.normalize_pixels(pixel_values)
        # As given (a CPU tensor lets the high-res step read its local-caption count without waiting for the GPU).
        is_global_given = is_global.view(-1).bool()
        is_global = is_global_given.to(pixels.device, non_blocking=True)
        text = self.text_model(input_ids)
        enc = self.vision_model
        low = enc.encode_low_res(pixels)
        hw = tuple(pixels.shape[-2:])
        full = torch.zeros_like(boxes, dtype=torch.float32)  # device ops: new_tensor([...]) would be a blocking copy
        full[:, 2], full[:, 3] = hw[1], hw[0]
        boxes = torch.where(is_global[:, None], full, boxes.float())
        gt = box_maps_for_grids(boxes, hw, enc.highres_grids(hw)).to(pixels.device)
        prompt = text.prompt
        image_features, selection_maps = None, None
        if self.contrastive:
            out = enc.forward_pooled(
                low, prompt=prompt, gt_selection_maps=gt if self.select_with_gt else None, is_global_text=is_global_given,
                pool_gt_token_only=self.pool_gt_token_only, num_token_look_close=self.tokens_per_step,
            )
            image_features = F.normalize(out.pooled_output.float(), dim=-1)
            bottom_up, top_down, selection_maps = out.bottomup_selection_probs, out.topdown_selection_probs, out.selection_maps
        else:
            bottom_up, top_down = enc.selection_probs(low), enc.selection_probs(low, prompt)
        return PretrainOutput(
            image_features=image_features,
            text_features=F.normalize(text.pooled_output.float(), dim=-1),
            logit_scale=self.logit_scale.exp(),
            logit_bias=self.logit_bias,
            bottomup_probs=bottom_up,
            topdown_probs=top_down,
            selection_maps=selection_maps,
            gt_maps=gt,
            is_global=is_global,
        )

    def named_selection_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if n.startswith(SELECTION_MODULES))


LOSS_TERMS = ("siglip", "bce_bottomup", "bce_topdown")


def pretrain_loss_sums(out: PretrainOutput, group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """Per-term loss *sums* over this rank's samples (the trainer divides each by its global count, see
    :func:`loss_counts`): ``siglip`` (over all samples), ``bce_bottomup`` / ``bce_topdown`` (over samples with a
    local caption), and ``topdown_box_recall`` (a detached metric, see :func:`box_recall`)."""
    sums = {
        "bce_bottomup": selection_bce(out.bottomup_probs, out.gt_maps, out.is_global, reduction="sum"),
        "bce_topdown": selection_bce(out.topdown_probs, out.gt_maps, out.is_global, reduction="sum"),
    }
    if out.image_features is not None:
        sums["siglip"] = siglip_loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias, group,
                                     reduction="sum")
    sums["topdown_box_recall"] = box_recall_sums(out.topdown_probs, out.gt_maps, out.is_global)[0]
    return sums


def loss_counts(is_global: torch.Tensor) -> dict[str, int]:
    """What each term of :func:`pretrain_loss_sums` is normalised by."""
    n, local = int(is_global.numel()), int((~is_global.view(-1).bool()).sum())
    return {"siglip": n, "bce_bottomup": local, "bce_topdown": local, "topdown_box_recall": local}


def pretrain_loss(
    out: PretrainOutput,
    bottomup_weight: float = 1.0,
    topdown_weight: float = 1.0,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Single-process total: SigLIP + ``bottomup_weight`` * BCE(bottom-up) + ``topdown_weight`` * BCE(top-down),
    each term its sum over the batch divided by its count. Returns the loss and detached per-term means."""
    sums, counts = pretrain_loss_sums(out, group), loss_counts(out.is_global)
    weights = {"siglip": 1.0, "bce_bottomup": bottomup_weight, "bce_topdown": topdown_weight}
    loss = sum(weights[k] * sums[k] / max(counts[k], 1) for k in LOSS_TERMS if k in sums)
    metrics = {k: float(v.detach()) / max(counts[k], 1) for k, v in sums.items()}
    metrics["loss"] = float(loss.detach())
    if out.image_features is not None:
        metrics["logit_scale"] = float(out.logit_scale.detach())
        metrics["logit_bias"] = float(out.logit_bias.detach())
    return loss, metrics


@torch.no_grad()
def box_recall_sums(
    probs: list[torch.Tensor], gt_maps: torch.Tensor, is_global: torch.Tensor, scale: int = -1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Box recall of the top-k patches by probability at one high-res scale, k = the box's patch count.

    Returns (sum of recalls, sum of chances, count) over local-caption samples as device tensors (no host sync);
    chance = the box's share of the grid, what a random choice of k patches scores on average.
    """
    prob = probs[scale].float().flatten(1)
    target = F.interpolate(gt_maps.unsqueeze(1).float(), size=probs[scale].shape[-2:], mode="area")
    target = (target.flatten(1) > 0).float()
    k = target.sum(1)
    ranked = target.gather(1, prob.argsort(dim=1, descending=True))
    hits = (ranked * (torch.arange(ranked.shape[1], device=k.device)[None] < k[:, None])).sum(1)
    valid = (~is_global.view(-1).bool()) & (k > 0)
    recall = torch.where(valid, hits / k.clamp(min=1), torch.zeros_like(k))
    chance = torch.where(valid, k / target.shape[1], torch.zeros_like(k))
    return recall.sum(), chance.sum(), valid.sum()


def box_recall(
    probs: list[torch.Tensor], gt_maps: torch.Tensor, is_global: torch.Tensor, scale: int = -1
) -> tuple[float, float] | None:
    """(mean recall, mean chance) of :func:`box_recall_sums`; None when no sample has a local caption."""
    recall, chance, count = box_recall_sums(probs, gt_maps, is_global, scale)
    n = int(count)
    return (float(recall) / n, float(chance) / n) if n else None
