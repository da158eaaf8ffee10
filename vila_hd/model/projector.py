"""Vision-to-language projector of VILA-HD, the top-down prompt head and the optional position tables.

Parameter names follow the VILA ``mm_projector`` checkpoint so that its state dict loads unchanged:
``layers.1`` (LayerNorm), ``layers.2`` / ``layers.4`` (Linear) for the 2x2 MLP (``layers.0`` is the
parameter-free space-to-channel step), ``top_down_prompt_head.{weight,bias}`` or ``.{fc1,norm,fc2}``,
``high_res_pos_embed`` and ``high_res_scale_embed.N``.

High-res tokens are never laid out on dense zero-filled maps: PS3 returns the selected patches in raster
order, :func:`gather_groups` picks the fully selected merge groups straight from that list, and the MLP
runs on those groups only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vila_hd.ps3.vision import selected_columns


class PromptHeadLinear(nn.Linear):
    """Linear(LLM hidden -> PS3 width) prompt head."""

    init_rule = "uniform"  # read by VilaHDPreTrainedModel._init_weights


class PromptHeadMLP(nn.Module):
    """MLP prompt head: Linear(H -> 2C) -> GELU -> LayerNorm -> Linear(2C -> C) (timm ``Mlp`` key names)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, 2 * out_dim)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(2 * out_dim)
        self.fc2 = nn.Linear(2 * out_dim, out_dim)
        self.fc1.init_rule = self.fc2.init_rule = "uniform"  # the reference's init; the norm keeps 1/0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


PROMPT_HEADS = (PromptHeadLinear, PromptHeadMLP)


def _mlp_layers(kind: str, vision_dim: int, text_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(vision_dim, text_dim)
    if kind == "mlp_downsample_2x2":
        c = 4 * vision_dim
        return nn.Sequential(
            nn.Identity(), nn.LayerNorm(c), nn.Linear(c, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim)
        )
    if kind == "mlp_downsample_3x3":
        c = 9 * vision_dim
        return nn.Sequential(
            nn.Identity(),
            nn.LayerNorm(c),
            nn.Linear(c, 3 * vision_dim),
            nn.GELU(),
            nn.LayerNorm(3 * vision_dim),
            nn.Linear(3 * vision_dim, text_dim),
            nn.GELU(),
            nn.Linear(text_dim, text_dim),
        )
    raise ValueError(f"unknown projector type {kind!r}")


def space_to_channel(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, h, w, C) -> (B, ceil(h/r), ceil(w/r), r*r*C), zero-padding the bottom/right edge; the r*r patches
    of a group are concatenated in row-major order (top-left, top-right, bottom-left, bottom-right)."""
    if r == 1:
        return x
    b, h, w, c = x.shape
    ph, pw = (-h) % r, (-w) % r
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hh, ww = (h + ph) // r, (w + pw) // r
    x = x.reshape(b, hh, r, ww, r, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hh, ww, r * r * c)


def gather_groups(
    tokens: torch.Tensor, selection_maps: list[torch.Tensor], r: int, offset: int,
    groups_per_scale: Sequence[int] | None = None,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Pick the fully selected r x r groups of every high-res scale from PS3's selected-token list.

    Args:
        tokens: (B, N, C) PS3 features; the selected patches start at ``offset`` (after the low-res
            tokens), scale-major, raster order within a scale.
        selection_maps: per high-res scale, (B, h, w) 0/1 maps of the selected patches.
        r: merge size.
        groups_per_scale: the number of full groups every image has at each scale, when known (the token
            layout knows it for group-aligned selection): they are then found without a host sync (checked on
            the device); otherwise with ``nonzero``.

    Returns:
        ``(features, where)``: ``features`` (G, r*r*C) for all kept groups, ordered by image, then scale,
        then raster position; ``where`` per scale a tuple ``(image_index, group_row, group_col)`` of the
        kept groups (used for position embeddings and for counting tokens per image).
    """
    b, _, c = tokens.shape
    pieces, where = [], []
    start = torch.full((b, 1), offset, dtype=torch.long, device=tokens.device)
    for smap in selection_maps:
        sel = smap > 0.5
        h, w = sel.shape[-2:]
        flat = sel.flatten(1)
        # Index of each selected patch in `tokens` (garbage where not selected; never read there).
        index = (flat.long().cumsum(1) - 1 + start).view(b, h, w)
        start = start + flat.sum(1, keepdim=True)
        hh, ww = h // r, w // r
        sel_g = sel[:, : hh * r, : ww * r].reshape(b, hh, r, ww, r).permute(0, 1, 3, 2, 4).reshape(b, hh, ww, r * r)
        idx_g = index[:, : hh * r, : ww * r].reshape(b, hh, r, ww, r).permute(0, 1, 3, 2, 4).reshape(b, hh, ww, r * r)
        keep = sel_g.all(-1)  # (B, hh, ww)
        if groups_per_scale is None:
            img, gi, gj = keep.nonzero(as_tuple=True)
        else:
            img, gi, gj = _known_groups(keep, groups_per_scale[len(where)])
        idx = idx_g[img, gi, gj]  # (G_s, r*r)
        pieces.append((img, tokens[img.unsqueeze(1), idx].reshape(-1, r * r * c)))
        where.append((img, gi, gj))
    if not pieces:
        return tokens.new_zeros(0, r * r * c), where
    # Re-order from scale-major to image-major (stable: keeps scale then raster order inside an image).
    img_all = torch.cat([p[0] for p in pieces])
    feats = torch.cat([p[1] for p in pieces])
    order = torch.sort(img_all, stable=True).indices
    return feats[order], where


def _known_groups(keep: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``keep.nonzero(as_tuple=True)`` for a (B, hh, ww) map with ``count`` ones per image, without a host sync."""
    b, _, ww = keep.shape
    flat = keep.flatten(1)
    torch._assert_async((flat.sum(1) == count).all(), "PS3 selected another number of complete groups than the "
                        "token layout expects")
    cols = selected_columns(flat, count)  # (B, count), raster order
    img = torch.arange(b, device=keep.device)[:, None].expand(b, count).reshape(-1)
    return img, (cols // ww).reshape(-1), (cols % ww).reshape(-1)


def area_weights(size_in: int, size_out: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(size_out, size_in) averaging matrix of ``F.interpolate(mode='area')`` (adaptive average pooling)."""
    w = torch.zeros(size_out, size_in, device=device, dtype=dtype)
    for i in range(size_out):
        lo = (i * size_in) // size_out
        hi = math.ceil((i + 1) * size_in / size_out)
        w[i, lo:hi] = 1.0 / (hi - lo)
    return w


class VilaHDProjector(nn.Module):
    """Projector + prompt head (+ optional position tables); ``config`` is a ``VilaHDConfig``."""

    def __init__(self, config):
        super().__init__()
        vision_dim = config.vision_config.hidden_size
        text_dim = config.text_config.hidden_size
        self.projector_type = config.projector_type
        self.downsample = config.downsample
        self.layers = _mlp_layers(config.projector_type, vision_dim, text_dim)
        self.top_down_prompt_head = None
        if config.prompt_head_type == "linear":
            self.top_down_prompt_head = PromptHeadLinear(text_dim, vision_dim)
        elif config.prompt_head_type == "mlp":
            self.top_down_prompt_head = PromptHeadMLP(text_dim, vision_dim)
        self.high_res_pos_embed = None
        self.high_res_scale_embed = None
        self.low_res_grid = config.vision_config.low_res_grid
        if config.high_res_pos_embed:
            num_scales = len(config.vision_config.ps3_scales)
            self.high_res_pos_embed = nn.Parameter(torch.zeros(1, self.low_res_grid**2, text_dim))
            self.high_res_scale_embed = nn.ParameterList(
                [nn.Parameter(torch.zeros(1, 1, text_dim)) for _ in range(num_scales)]
            )
            self.init_rule = self.high_res_scale_embed.init_rule = "zeros"

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        """Project merged vision features (..., r*r*C) to LLM embeddings (..., H)."""
        return self.layers(merged)

    def prompt(self, hidden: torch.Tensor) -> torch.Tensor:
        """LLM hidden state(s) (..., H) -> PS3 top-down prompt(s) (..., C)."""
        if self.top_down_prompt_head is None:
            raise ValueError(
                "this model has no top-down prompt head (prompt_head_type=None): use look_close_mode='after_image'"
            )
        return self.top_down_prompt_head(hidden)

    def project_low_res(self, features: torch.Tensor) -> torch.Tensor:
        """(B, g*g, C) low-res PS3 features -> (B, T_low, H) LLM embeddings (+ position/scale embedding)."""
        b, n, c = features.shape
        g = int(round(n**0.5))
        merged = space_to_channel(features.reshape(b, g, g, c), self.downsample)
        gh, gw = merged.shape[1:3]
        out = self.layers(merged.reshape(b, gh * gw, -1))
        if self.high_res_pos_embed is not None:
            rows = torch.arange(gh, device=out.device).repeat_interleave(gw)
            cols = torch.arange(gw, device=out.device).repeat(gh)
            out = out + self.position_embedding((gh, gw), rows, cols, scale=0).unsqueeze(0)
        return out

    def project_high_res(
        self, tokens: torch.Tensor, selection_maps: list[torch.Tensor], offset: int,
        groups_per_scale: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Project the fully selected groups of PS3's high-res tokens.

        Returns ``(embeds, counts)``: (G, H) embeddings ordered image-major, and (B,) groups per image (``None``
        when ``groups_per_scale`` gives them; see :func:`gather_groups`).
        """
        r = self.downsample
        merged, where = gather_groups(tokens, selection_maps, r, offset, groups_per_scale)
        counts = None
        if groups_per_scale is None:
            counts = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
            for img, _, _ in where:
                counts += torch.bincount(img, minlength=tokens.shape[0])
        out = self.layers(merged)
        if self.high_res_pos_embed is not None and out.shape[0]:
            pos = []
            for s, ((img, gi, gj), smap) in enumerate(zip(where, selection_maps)):
                grid = (math.ceil(smap.shape[-2] / r), math.ceil(smap.shape[-1] / r))
                pos.append((img, self.position_embedding(grid, gi, gj, scale=s + 1)))
            img_all = torch.cat([p[0] for p in pos])
            order = torch.sort(img_all, stable=True).indices
            out = out + torch.cat([p[1] for p in pos])[order]
        return out, counts

    def position_embedding(
        self, grid: tuple[int, int], rows: torch.Tensor, cols: torch.Tensor, scale: int
    ) -> torch.Tensor:
        """Position table area-resized to ``grid``, read at (rows, cols) only, plus the scale's vector.

        Equal to ``F.interpolate(table, grid, mode='area')[rows, cols]`` without building the full map."""
        table = self.high_res_pos_embed[0]  # (g*g, H)
        g = self.low_res_grid
        wh = area_weights(g, grid[0], device=table.device, dtype=table.dtype)[rows]  # (n, g)
        ww = area_weights(g, grid[1], device=table.device, dtype=table.dtype)[cols]  # (n, g)
        weights = (wh.unsqueeze(2) * ww.unsqueeze(1)).reshape(-1, g * g)
        return weights @ table + self.high_res_scale_embed[scale][0]
