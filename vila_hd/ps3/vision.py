"""The PS3 vision encoder: low-res global pass, patch selection, batched high-res look-close steps.

Architecture only; the Hugging Face wrappers live in ``modeling.py``. The encoder is split in two
public halves so that callers (VILA-HD) can run the prompt-independent low-res pass once and reuse it:

* :meth:`PS3VisionEncoder.encode_low_res` -> :class:`LowResOutput` (block outputs, K/V cache,
  selection features), and
* :meth:`PS3VisionEncoder.look_close` -> :class:`PS3VisionModelOutput` for a given prompt/budget.

Unlike the reference, the look-close steps (which never attend to each other) run as one batch, each
scale is resized and unfolded once, and the high-res blocks stop at the deepest layer asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

from .configuration import PS3VisionConfig
from .cuda_graph import GraphCache, graph_usable
from .geometry import highres_grids, plan_selection, scale_grid_size, scale_image_size
from .layers import AttentionPoolLatent, Block, Mlp, PatchEmbed, ShallowConvNet
from .selection import (
    StepSpec,
    apply_gt_and_smoothing,
    resize_maps,
    select_step,
    selection_probs_from_logits,
)


@dataclass
class PS3VisionModelOutput(ModelOutput):
    """Outputs of the PS3 vision tower.

    ``hidden_states`` are block outputs *before* the final norm: 729 low-res tokens, then the selected
    patches of each high-res scale in raster order (scale-major). ``selection_maps`` are float 0/1 maps
    (B, h, w) per high-res scale (union of the steps).
    """

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    pooled_output: torch.FloatTensor | None = None
    selection_maps: list[torch.Tensor] | None = None
    selection_probs: list[torch.Tensor] | None = None
    bottomup_selection_probs: list[torch.Tensor] | None = None
    topdown_selection_probs: list[torch.Tensor] | None = None


@dataclass
class LowResOutput:
    """Everything the prompt-independent low-res pass produces (reusable across prompts)."""

    pixel_values: torch.Tensor
    hidden_states: list[torch.Tensor]
    kv_cache: list[tuple[torch.Tensor, torch.Tensor]]
    selection_features: torch.Tensor
    highres_selection_features: torch.Tensor | None

    @property
    def image_hw(self) -> tuple[int, int]:
        return tuple(self.pixel_values.shape[-2:])


def resize_image(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bicubic resize in fp32, no antialias (the reference's choice), back to the input dtype."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.float(), size=tuple(size), mode="bicubic", align_corners=False).to(x.dtype)


def resample_pos_embed(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, g*g, C) table -> (h*w, C): bicubic+antialias to max(h, w) squared, cropped top-left."""
    g = int(round(table.shape[1] ** 0.5))
    h, w = grid
    if (h, w) == (g, g):
        return table[0]
    x = table.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    side = max(h, w)
    x = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False)[:, :, :h, :w]
    return x.permute(0, 2, 3, 1).reshape(h * w, -1).to(table.dtype)


def crop_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, G*G, C) square table -> its top-left (h, w) crop as (h*w, C)."""
    side = int(round(table.shape[1] ** 0.5))
    h, w = grid
    return table[0].view(side, side, -1)[:h, :w].reshape(h * w, -1)


class PS3Trunk(nn.Module):
    """SigLIP ViT backbone with timm's parameter names (patch_embed, pos_embed, blocks, norm, attn_pool)."""

    def __init__(self, config: PS3VisionConfig):
        super().__init__()
        dim, grid = config.hidden_size, config.low_res_grid
        self.patch_embed = PatchEmbed(config.num_channels, dim, config.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.blocks = nn.ModuleList(
            Block(dim, config.num_attention_heads, config.intermediate_size, config.layer_norm_eps, config.hidden_act,
                  config.prefix_attention)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn_pool = AttentionPoolLatent(
            dim, config.num_attention_heads, config.intermediate_size, config.layer_norm_eps, config.hidden_act
        )

    def pool(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attn_pool(self.norm(x), mask)


class PS3VisionEncoder(nn.Module):
    """PS3 vision tower (parameter names as the official checkpoints under ``vision_model.``)."""

    def __init__(self, config: PS3VisionConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self._pos_cache: dict[int, tuple] = {}  # scale -> (weights key, interpolated table); inference only
        self._low_res_graphs = GraphCache()
        dim, n_hi = config.hidden_size, config.num_scales - 1
        self.trunk = PS3Trunk(config)
        sel_dim = dim * len(config.select_based_on_layer)
        self.selection_feature_proj = Mlp(sel_dim, sel_dim, dim * n_hi, norm_eps=1e-5)
        self.prior_prompt = nn.Parameter(torch.randn(dim))
        if config.separate_pos_emb:
            self.pos_emb_residual = nn.ParameterList(
                nn.Parameter(torch.zeros(1, (s // config.patch_size) ** 2, dim)) for s in config.ps3_scales[1:]
            )
        if config.highres_selection_feature:
            self.highres_selection_feature_module = ShallowConvNet(
                config.highres_selection_module_hidden_dim,
                config.highres_selection_module_out_dim,
                config.highres_selection_module_depth,
                config.highres_selection_module_kernel_size,
            )
            self.prompt_proj_for_highres = nn.Linear(dim, config.highres_selection_module_out_dim * n_hi)

    def set_prefix_attention(self, mode: str) -> None:
        """How high-res tokens attend to the low-res K/V prefix: "auto", "concat" or "merge" (see layers.Attention)."""
        self.config.prefix_attention = mode
        self.config._validate()
        for blk in self.trunk.blocks:
            blk.attn.prefix_mode = mode

    # --- geometry -------------------------------------------------------------------------------
    @property
    def width(self) -> int:
        return self.config.hidden_size

    @property
    def low_res_token_num(self) -> int:
        return self.config.low_res_token_num

    def image_size_scale_i(self, hw, scale_idx: int) -> tuple[int, int]:
        """Pixel size of scale ``scale_idx`` for an input of size ``hw`` (a tensor or (H, W))."""
        return scale_image_size(self.config.ps3_scales, self.config.patch_size, _hw(hw), scale_idx)

    def feature_size_scale_i(self, hw, scale_idx: int) -> tuple[int, int]:
        """Patch grid (h, w) of scale ``scale_idx``."""
        return scale_grid_size(self.config.ps3_scales, self.config.patch_size, _hw(hw), scale_idx)

    def highres_grids(self, hw) -> list[tuple[int, int]]:
        return highres_grids(self.config.ps3_scales, self.config.patch_size, _hw(hw))

    def max_highres_token_num(self, hw, only_select_first_n_scale: int | None = None) -> int:
        grids = self.highres_grids(hw)
        if only_select_first_n_scale is not None:
            grids = grids[:only_select_first_n_scale]
        return sum(h * w for h, w in grids)

    def plan(self, hw, num_look_close=None, num_token_look_close=None, only_select_first_n_scale=None,
             selection_group_size: int = 1, steps: list[StepSpec] | None = None) -> list[list[int]]:
        """Patches selected per step and scale, ``plan[step][scale]`` (no forward pass needed)."""
        cfg = self.config
        return plan_selection(cfg.ps3_scales, cfg.patch_size, cfg.budget_each_scale, _hw(hw), num_look_close,
                              num_token_look_close, only_select_first_n_scale, selection_group_size, steps)

    def num_selected_patches(self, hw, num_look_close=None, num_token_look_close=None,
                             only_select_first_n_scale=None, selection_group_size: int = 1) -> int:
        """Exact number of high-res patches :meth:`look_close` selects for these settings."""
        plan = self.plan(hw, num_look_close, num_token_look_close, only_select_first_n_scale, selection_group_size)
        return sum(sum(step) for step in plan)

    # --- low-res pass ---------------------------------------------------------------------------
    def encode_low_res(self, pixel_values: torch.Tensor) -> LowResOutput:
        """Run all blocks on the 378x378 image; keep block outputs, K/V and the selection features.
        At inference on CUDA this replays a captured CUDA graph (``config.low_res_cuda_graph``)."""
        self._check_pixels(pixel_values)
        if self.config.low_res_cuda_graph and graph_usable(self, pixel_values):
            low = self._low_res_graphs.run(self._low_res_tensors, pixel_values, list(self.parameters()))
            low.pixel_values = pixel_values
            return low
        return self._encode_low_res_eager(pixel_values)

    def _low_res_tensors(self, pixel_values: torch.Tensor):
        """The low-res pass as (flat list of output tensors, function rebuilding the LowResOutput)."""
        low = self._encode_low_res_eager(pixel_values)
        n, has_hr = len(low.hidden_states), low.highres_selection_features is not None
        tensors = [*low.hidden_states, *(t for kv in low.kv_cache for t in kv), low.selection_features]
        tensors += [low.highres_selection_features] if has_hr else []

        def rebuild(ts: list[torch.Tensor]) -> LowResOutput:
            kv = [(ts[n + 2 * i], ts[n + 2 * i + 1]) for i in range(n)]
            return LowResOutput(pixel_values, ts[:n], kv, ts[3 * n], ts[3 * n + 1] if has_hr else None)

        return tensors, rebuild

    def _encode_low_res_eager(self, pixel_values: torch.Tensor) -> LowResOutput:
        base = self.config.ps3_scales[0]
        x = self.trunk.patch_embed(resize_image(pixel_values, (base, base))) + self.trunk.pos_embed
        hidden, kv_cache = [], []
        for blk in self.trunk.blocks:
            x, kv = self._run_block(blk, x, None, True)
            hidden.append(x)
            kv_cache.append(kv)
        grid = self.config.low_res_grid
        feats = torch.cat([hidden[i] for i in self.config.select_based_on_layer], dim=-1)
        feats = self.selection_feature_proj(feats)[..., : self.width]  # only the first scale slot is used
        feats = feats.transpose(1, 2).reshape(x.shape[0], self.width, grid, grid)
        highres = None
        if self.config.highres_selection_feature:
            side = self.config.highres_selection_image_size
            highres = self.highres_selection_feature_module(resize_image(pixel_values, (side, side)))
        return LowResOutput(pixel_values, hidden, kv_cache, feats, highres)

    def _run_block(self, blk, x, kv_prefix, return_kv):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, x, kv_prefix, return_kv, use_reentrant=False)
        return blk(x, kv_prefix, return_kv)

    # --- selection scores -----------------------------------------------------------------------
    def prompt_logits(self, low: LowResOutput, prompt: torch.Tensor) -> torch.Tensor:
        """Cosine logits (B, g, g) of a prompt against the low-res (and high-res conv) selection features."""
        feats = low.selection_features
        prompt = prompt.to(feats.dtype)
        logits = (F.normalize(feats, dim=1) * F.normalize(prompt, dim=-1)[:, :, None, None]).sum(1)
        if low.highres_selection_features is not None:
            hr = low.highres_selection_features
            hr_prompt = self.prompt_proj_for_highres(prompt)[:, : hr.shape[1]]
            hr_logits = (F.normalize(hr, dim=1) * F.normalize(hr_prompt, dim=-1)[:, :, None, None]).sum(1)
            logits = (logits + F.adaptive_max_pool2d(hr_logits.unsqueeze(1), logits.shape[-2:]).squeeze(1)) / 2
        return logits

    def selection_probs(self, low: LowResOutput, prompt: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per high-res scale (B, h, w) probabilities: top-down for ``prompt``, bottom-up for None."""
        if prompt is None:
            prompt = self.prior_prompt[None].expand(low.pixel_values.shape[0], -1)
        probs = selection_probs_from_logits(self.prompt_logits(low, prompt))
        return [p.to(probs.dtype) for p in resize_maps(probs, self.highres_grids(low.pixel_values))]

    # --- look close -----------------------------------------------------------------------------
    def look_close(
        self,
        low: LowResOutput,
        num_look_close=None,
        num_token_look_close=None,
        prompt: torch.Tensor | None = None,
        gt_selection_maps: torch.Tensor | None = None,
        smooth_selection_prob: bool = False,
        only_select_first_n_scale: int | None = None,
        output_layers: Sequence[int] | None = None,
        selection_group_size: int = 1,
    ) -> PS3VisionModelOutput:
        """Select high-res patches and encode them against the low-res K/V cache (all steps batched)."""
        batch = low.pixel_values.shape[0]
        self._check_prompt(prompt, batch)
        self._check_gt(gt_selection_maps, batch)
        layers = self._resolve_layers(output_layers)
        plan = self.plan(low.pixel_values, num_look_close, num_token_look_close, only_select_first_n_scale,
                         selection_group_size)
        probs, bottom_up, top_down = self._scores(low, prompt, gt_selection_maps, smooth_selection_prob)
        step_maps = self._select(probs, plan, selection_group_size)
        hidden = self._encode_selected(low, step_maps, plan, layers) if plan else None
        states = tuple(
            low.hidden_states[layer] if hidden is None else torch.cat([low.hidden_states[layer], hidden[j]], dim=1)
            for j, layer in enumerate(layers)
        )
        union = [sum(m[i] for m in step_maps) if step_maps else torch.zeros_like(p) for i, p in enumerate(probs)]
        return PS3VisionModelOutput(
            last_hidden_state=states[layers.index(max(layers))],
            hidden_states=states,
            selection_maps=union,
            selection_probs=probs,
            bottomup_selection_probs=bottom_up,
            topdown_selection_probs=top_down,
        )

    def _scores(self, low, prompt, gt_selection_maps, smooth: bool):
        """(probabilities used for selection, bottom-up, top-down or None); GT forcing and smoothing
        apply to the first only, the raw maps are what the selection losses supervise."""
        bottom_up = self.selection_probs(low)
        top_down = self.selection_probs(low, prompt) if prompt is not None else None
        return apply_gt_and_smoothing(top_down or bottom_up, gt_selection_maps, smooth), bottom_up, top_down

    def _resolve_layers(self, output_layers: Sequence[int] | None) -> list[int]:
        n = self.config.num_hidden_layers
        if output_layers is None:
            return list(range(n))
        resolved = [i + n if i < 0 else i for i in output_layers]
        if not resolved or any(not 0 <= i < n for i in resolved):
            raise ValueError(f"output_layers={list(output_layers)} out of range for {n} layers")
        return resolved

    def _select(self, probs: list[torch.Tensor], plan: list[list[int]], group: int) -> list[list[torch.Tensor]]:
        taken = [torch.zeros_like(p, dtype=torch.float32) for p in probs]
        step_maps = []
        for quota in plan:
            new = select_step(probs, taken, quota, group)
            taken = [t + n for t, n in zip(taken, new)]
            step_maps.append(new)
        return step_maps

    def _scale_bank(self, pixel_values: torch.Tensor, scale_idx: int):
        """Unfolded patches (B, N, C*p*p) and position embeddings (N, dim) of one high-res scale."""
        grid = self.feature_size_scale_i(pixel_values, scale_idx)
        p = self.config.patch_size
        img = resize_image(pixel_values, self.image_size_scale_i(pixel_values, scale_idx))
        patches = F.unfold(img, kernel_size=p, stride=p).transpose(1, 2)
        return patches, self._scale_pos_embed(scale_idx, grid)

    def _scale_pos_embed(self, scale_idx: int, grid: tuple[int, int]) -> torch.Tensor:
        """Interpolated position table (+ residual) of a scale; cached at inference while weights are unchanged."""
        tables = [self.trunk.pos_embed] + ([self.pos_emb_residual[scale_idx - 1]] if self.config.separate_pos_emb else [])
        key = (scale_idx, grid) + tuple((t.data_ptr(), t._version, t.dtype) for t in tables)
        cached = self._pos_cache.get(scale_idx)
        if cached is not None and cached[0] == key and not torch.is_grad_enabled():
            return cached[1]
        pos = resample_pos_embed(tables[0], grid)
        if len(tables) > 1:
            pos = pos + crop_table(tables[1], grid)
        if not torch.is_grad_enabled():
            self._pos_cache[scale_idx] = (key, pos)
        return pos

    def _encode_selected(self, low, step_maps, plan, layers, rows: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Embed each step's patches, run every step as one batch (grouped by length), gather per layer.
        ``rows``: the images of ``low`` that ``step_maps`` describe, in order (None: all of them)."""
        pixels = low.pixel_values if rows is None else low.pixel_values[rows]
        x, batch_idx, flat_idx, owners = self._embed_steps(pixels, step_maps, plan)
        union = torch.cat([sum(m[i] for m in step_maps).flatten(1) for i in range(len(step_maps[0]))], dim=1)
        rank = union.cumsum(1).long() - 1
        total = sum(sum(counts) for counts in plan)  # the steps select disjoint patches, plan[s][i] at scale i
        out = [x[0].new_zeros(union.shape[0], total, self.width) for _ in layers]
        deepest = max(layers)
        for xg, bg, fg, owner in zip(x, batch_idx, flat_idx, owners):
            pos = rank[bg[:, None], fg]

            def keep(depth, h, bg=bg, pos=pos):
                if depth in layers:
                    out[layers.index(depth)][bg[:, None], pos] = h.to(out[0].dtype)

            self._run_group(low, xg, bg, owner, deepest, keep, rows)
        return out

    def _run_group(self, low, x, batch_idx, owner, deepest: int, keep=None,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
        """High-res blocks for one group of equal-length sequences against their images' low-res K/V
        (``batch_idx`` / ``owner`` index ``rows`` when given, else the batch of ``low``)."""
        # A group whose sequences all belong to one image shares its K/V prefix by broadcasting.
        pick = slice(owner, owner + 1) if owner is not None else batch_idx
        if rows is not None:  # one gather per layer from the full cache, as without rows
            pick = rows[pick]
        for depth, blk in enumerate(self.trunk.blocks[: deepest + 1]):
            k, v = low.kv_cache[depth]
            x, _ = self._run_block(blk, x, (k[pick], v[pick]), False)
            if keep is not None:
                keep(depth, x)
        return x

    def _embed_steps(self, pixel_values, step_maps, plan):
        """Token embeddings of every (instance, step) sequence, grouped by per-scale counts."""
        n_scales, batch = len(step_maps[0]), pixel_values.shape[0]
        used = [i for i in range(n_scales) if any(step[i] for step in plan)]
        banks = {i: self._scale_bank(pixel_values, i + 1) for i in used}
        offsets = [0]
        for m in step_maps[0]:
            offsets.append(offsets[-1] + m[0].numel())
        # Per scale and step, the (batch, count) selected patch indices; the counts come from the plan.
        per_scale = {i: [selected_columns(m[i].flatten(1), plan[s][i]) for s, m in enumerate(step_maps)]
                     for i in used}
        # Steps with the same per-scale counts run together: their sequences are (step, instance), step-major.
        groups: dict[tuple[int, ...], list[int]] = {}
        for s in range(len(plan)):
            groups.setdefault(tuple(plan[s]), []).append(s)
        xs, bs, fs, owners = [], [], [], []
        for signature, steps in groups.items():
            owners.append(0 if batch == 1 else None)
            # Made on the device: a tensor built from a Python list would be a blocking copy (a host sync).
            b_idx = torch.arange(batch, device=pixel_values.device).repeat(len(steps))
            tokens, flat = [], []
            for i in used:
                if signature[i] == 0:
                    continue
                idx = torch.cat([per_scale[i][s] for s in steps])
                patches, pos = banks[i]
                tokens.append(self.trunk.patch_embed.embed_patches(patches[b_idx[:, None], idx]) + pos[idx])
                flat.append(idx + offsets[i])
            xs.append(torch.cat(tokens, dim=1))
            bs.append(b_idx)
            fs.append(torch.cat(flat, dim=1))
        return xs, bs, fs, owners

    # --- full forward ---------------------------------------------------------------------------
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
        output_layers: Sequence[int] | None = None,
        selection_group_size: int = 1,
    ) -> PS3VisionModelOutput:
        low = self.encode_low_res(pixel_values)
        if output_hidden_states:
            return self.look_close(low, num_look_close, num_token_look_close, prompt, gt_selection_maps,
                                   smooth_selection_prob, only_select_first_n_scale, output_layers,
                                   selection_group_size)
        return self.forward_pooled(low, prompt, gt_selection_maps, is_global_text, pool_gt_token_only,
                                   num_token_look_close, smooth_selection_prob)

    def forward_pooled(
        self,
        low: LowResOutput,
        prompt: torch.Tensor | None = None,
        gt_selection_maps: torch.Tensor | None = None,
        is_global_text: torch.Tensor | None = None,
        pool_gt_token_only: bool = False,
        num_token_look_close: int | None = None,
        smooth_selection_prob: bool = False,
    ) -> PS3VisionModelOutput:
        """Pre-training path (§7): one look-close step, then a (box-masked) attention pool.

        Samples with a global caption (``is_global_text``) take the low-res pooled vector, so only the others run
        the high-res step; selection maps and probabilities still cover every sample. A batch of global captions
        only runs the step on its first sample and adds it with weight 0: every rank makes the same module calls
        and every parameter gets a gradient, whatever the data (ZeRO-3)."""
        batch = low.pixel_values.shape[0]
        self._check_prompt(prompt, batch)
        self._check_gt(gt_selection_maps, batch)
        if pool_gt_token_only and gt_selection_maps is None:
            raise ValueError("pool_gt_token_only=True needs gt_selection_maps")
        step_budget = sum(self.config.budget_each_scale)
        tokens = num_token_look_close if num_token_look_close is not None and num_token_look_close <= step_budget else None
        plan = self.plan(low.pixel_values, steps=[StepSpec(tokens=tokens)])
        probs, bottom_up, top_down = self._scores(low, prompt, gt_selection_maps, smooth_selection_prob)
        step_maps = self._select(probs, plan, 1)
        local = None if is_global_text is None else self._local_rows(is_global_text, batch, low.pixel_values.device)
        # The images that run the high-res step: all (None), the local-caption ones, or the first as a dummy.
        rows = None if local is None or len(local) == batch else (local if len(local) else local.new_zeros(1))
        pooled = self._pool_high_res(low, step_maps, plan, gt_selection_maps if pool_gt_token_only else None, rows)
        if local is not None:
            pooled = self._with_low_res_pooled(low, pooled, local)
        return PS3VisionModelOutput(
            pooled_output=pooled, selection_maps=step_maps[0], selection_probs=probs,
            bottomup_selection_probs=bottom_up, topdown_selection_probs=top_down,
        )

    @staticmethod
    def _local_rows(is_global_text: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        """Indices of the samples with a local caption; their count sets the high-res batch, so it is read on the
        host: free when ``is_global_text`` is a CPU tensor (the pre-training batches keep one), a sync otherwise."""
        if is_global_text.numel() != batch:
            raise ValueError(f"is_global_text must have {batch} entries, got shape {tuple(is_global_text.shape)}")
        return (~is_global_text.view(-1).bool()).nonzero().view(-1).to(device, non_blocking=True)

    def _pool_high_res(self, low: LowResOutput, step_maps: list[list[torch.Tensor]], plan: list[list[int]],
                       gt_selection_maps: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor:
        """Last-layer high-res tokens of the images ``rows`` (None: all), attention-pooled over the tokens inside
        the GT map when one is given."""
        if rows is not None:
            step_maps = [[m[rows] for m in step] for step in step_maps]
            gt_selection_maps = None if gt_selection_maps is None else gt_selection_maps[rows]
        high = self._encode_selected(low, step_maps, plan, [self.config.num_hidden_layers - 1], rows)[0]
        mask = None if gt_selection_maps is None else self._gt_token_mask(gt_selection_maps, step_maps[0], high.shape[1])
        return self.trunk.pool(high, mask)

    def _with_low_res_pooled(self, low: LowResOutput, high_pooled: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """Low-res pooled vectors with rows ``local`` replaced by ``high_pooled``; with no local row,
        ``high_pooled`` (the discarded dummy step) enters with weight 0."""
        low_pooled = self.trunk.pool(low.hidden_states[-1])
        if len(local) == 0:
            return low_pooled + 0.0 * high_pooled.sum()
        return low_pooled.index_copy(0, local, high_pooled.to(low_pooled.dtype))

    def _gt_token_mask(self, gt_selection_maps, maps, count: int) -> torch.Tensor:
        """GT map (area-resized per scale) read at the ``count`` selected patches of each row, in token order."""
        sizes = [tuple(m.shape[-2:]) for m in maps]
        gts = resize_maps(gt_selection_maps, sizes, mode="area")
        flat_gt = torch.cat([g.flatten(1) for g in gts], dim=1)
        flat_sel = torch.cat([m.flatten(1) for m in maps], dim=1)
        return flat_gt.gather(1, selected_columns(flat_sel, count)) > 0

    def format_features_into_feature_maps(self, features: torch.Tensor, selection_maps) -> list[torch.Tensor]:
        """Scatter (B, N, C) tokens back into zero-filled (B, C, h, w) maps: low-res first, then each scale."""
        batch, n, dim = features.shape
        g = self.config.low_res_grid
        maps = [torch.ones(batch, g, g, device=features.device)] + [m.to(features.device) for m in selection_maps]
        flat = torch.cat([m.flatten(1) for m in maps], dim=1).bool()
        counts = flat.sum(1)
        if not torch.all(counts == n):
            raise ValueError(f"features have {n} tokens but the selection maps select {counts.tolist()}")
        full = features.new_zeros(batch, flat.shape[1], dim)
        full[flat] = features.reshape(-1, dim)
        out, start = [], 0
        for m in maps:
            h, w = m.shape[-2:]
            out.append(full[:, start : start + h * w].transpose(1, 2).reshape(batch, dim, h, w))
            start += h * w
        return out

    # --- input checks ---------------------------------------------------------------------------
    def _check_pixels(self, pixel_values) -> None:
        if not torch.is_tensor(pixel_values) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a (batch, channels, height, width) tensor, got {shape}")
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels; the model expects {self.config.num_channels}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floating point, got {pixel_values.dtype}")

    def _check_prompt(self, prompt, batch: int) -> None:
        if prompt is not None and (prompt.dim() != 2 or tuple(prompt.shape) != (batch, self.width)):
            raise ValueError(f"prompt must have shape (batch, width) = ({batch}, {self.width}), got {tuple(prompt.shape)}")

    def _check_gt(self, gt, batch: int) -> None:
        if gt is not None and (gt.dim() != 3 or gt.shape[0] != batch):
            raise ValueError(f"gt_selection_maps must have shape (batch, h, w) with batch={batch}, got {tuple(gt.shape)}")


def selected_columns(selected: torch.Tensor, count: int) -> torch.Tensor:
    """(B, N) 0/1 map with ``count`` ones per row -> (B, count) the columns of the ones, ascending: what
    ``nonzero`` gives, without its host sync (a stable sort puts the ones first, in column order)."""
    return torch.argsort((selected == 0).to(torch.uint8), dim=1, stable=True)[:, :count]


def _hw(hw) -> tuple[int, int]:
    if torch.is_tensor(hw):
        return tuple(hw.shape[-2:])
    h, w = hw
    return int(h), int(w)
