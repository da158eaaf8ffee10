"""Where the top-down prefix pass reads: an index plan, made before the pass.

For top-down selection each image's prompt is the LLM's hidden state at its prompt token, computed by a pass
(no gradient) over each row's tokens *without* the high-res image tokens (not known yet) and cut after the row's
last prompt. A :class:`PrefixPlan` says which tokens that pass reads, in which order, at which positions, and where
the prompts land; :meth:`~vila_hd.model.modeling.VilaHDForConditionalGeneration.top_down_prompts` runs the pass
from it. Two rules make plans:

- :func:`prefix_plan`, for training rows that may be packed (several samples per row, one prompt per image). It
  depends only on the batch layout, so the collator makes it in the loader workers: the GPU step then never waits
  for the device to find the row width, and the pass gets its sample spans for segment attention
  (:mod:`vila_hd.model.attention`) instead of a block mask;
- :func:`padded_prefix_plan`, for the model's own forward: left-padded rows of one sample each, one prompt per
  sample (shared by its images), optionally a shared head of every row kept for KV-cache reuse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vila_hd.model.attention import segment_table

__all__ = ["PrefixPlan", "padded_prefix_plan", "prefix_plan"]


@dataclass
class PrefixPlan:
    rows: torch.Tensor  # (B',) batch row each prefix row reads
    order: torch.Tensor  # (B', W) column of each prefix token in its row
    positions: torch.Tensor  # (B', W) position ids, restarting at every sample
    prompt_rows: torch.Tensor  # (P,) prefix row of each prompt
    prompt_columns: torch.Tensor  # (P,) column of each prompt in the prefix rows
    low_res_tokens: int  # the image layout the plan was made for
    attention_mask: torch.Tensor | None = None  # (B', W) padding mask (padded plans)
    segments: torch.Tensor | None = None  # (N, 3) sample spans, a CPU table (CPU plans only, see segment_table)

    def to(self, device) -> PrefixPlan:
        """The plan's index tensors on ``device`` (the segment table stays on the host)."""
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return PrefixPlan(move(self.rows), move(self.order), move(self.positions), move(self.prompt_rows),
                          move(self.prompt_columns), self.low_res_tokens, move(self.attention_mask), self.segments)

    def with_unplaced(self, count: int) -> PrefixPlan:
        """This plan plus ``count`` prompts read at row 0's first token (images placed nowhere, e.g. the dummy
        image of a batch without images, whose prompts only keep the prompt head in lockstep)."""
        zeros = self.prompt_rows.new_zeros(count)
        return PrefixPlan(self.rows, self.order, self.positions, torch.cat([self.prompt_rows, zeros]),
                          torch.cat([self.prompt_columns, zeros]), self.low_res_tokens, self.attention_mask,
                          self.segments)


def prefix_plan(positions: torch.Tensor, image_rows: torch.Tensor, image_cols: torch.Tensor, low_res_tokens: int,
                prompt_index: torch.Tensor) -> PrefixPlan:
    """``positions`` (B, L) position ids (0 where a sample starts); ``image_rows`` / ``image_cols`` (images, T) where
    each image's tokens sit, low-res ones first; ``prompt_index`` (P, 2) (row, column) of each image's prompt.

    Row 0 always keeps its first token (a batch without images reads its dummy prompt there). Sample spans come
    with the plan when it is made on the CPU (reading them on a GPU would stall the step)."""
    batch, length = positions.shape
    device = positions.device
    idx = torch.arange(length, device=device)
    high = torch.zeros(batch, length, dtype=torch.bool, device=device)
    high[image_rows[:, low_res_tokens:].reshape(-1), image_cols[:, low_res_tokens:].reshape(-1)] = True
    last = torch.full((batch,), -1, dtype=torch.long, device=device)
    if prompt_index.numel():
        last = last.scatter_reduce(0, prompt_index[:, 0], prompt_index[:, 1], reduce="amax")
    keep = ~high & (idx[None] <= last[:, None])
    keep[0, 0] = True
    lengths = keep.sum(1)
    width = int(lengths.max())
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = idx[None, :width] < lengths[:, None]
    # A new sample starts where the original position ids restart; padding gets a segment of its own.
    segment = (positions == 0).long().cumsum(1).gather(1, order)
    segment = torch.where(valid, segment, segment.new_full((), length + 1))
    starts = torch.ones_like(valid)
    starts[:, 1:] = segment[:, 1:] != segment[:, :-1]
    begin = torch.where(starts, idx[None, :width], torch.zeros_like(order)).cummax(1).values
    compact = keep.long().cumsum(1) - 1
    plan = PrefixPlan(torch.arange(batch, device=device), order, idx[None, :width] - begin, prompt_index[:, 0],
                      compact[prompt_index[:, 0], prompt_index[:, 1]], low_res_tokens)
    if device.type == "cpu":
        plan.segments = segment_table(_spans(starts & valid, lengths))
    return plan


def padded_prefix_plan(attention_mask: torch.Tensor, position_ids: torch.Tensor, high_mask: torch.Tensor,
                       prompt_positions: torch.Tensor, with_images: torch.Tensor, shared: int,
                       low_res_tokens: int) -> PrefixPlan:
    """``attention_mask`` / ``position_ids`` / ``high_mask`` (B, L): padding, positions and high-res image tokens
    of rows holding one sample each; ``prompt_positions`` (B,) each sample's prompt, read for the rows
    ``with_images`` (B,) only.

    The pass reads the rows with images, or, when ``shared`` > 0, every row: then the first ``shared`` tokens of
    a row without images are read too (the shared head of every row, whose KV cache the main pass reuses)."""
    length = attention_mask.shape[1]
    device = attention_mask.device
    idx = torch.arange(length, device=device)
    rows = torch.arange(attention_mask.shape[0], device=device) if shared > 0 else with_images.nonzero(as_tuple=True)[0]
    keep = (idx[None] <= prompt_positions[rows, None]) & ~high_mask[rows]
    keep = torch.where(with_images[rows, None], keep, idx[None] < shared)
    lengths = keep.sum(1)
    width = int(lengths.max())
    order = torch.sort((~keep).int(), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=device)[None] < lengths[:, None]
    removed_before = high_mask[rows].long().cumsum(1).gather(1, order)
    mask = attention_mask[rows].gather(1, order) * valid
    positions = (position_ids[rows].gather(1, order) - removed_before) * valid
    image_rows = with_images[rows].nonzero(as_tuple=True)[0]
    return PrefixPlan(rows, order, positions, image_rows, lengths[image_rows] - 1, low_res_tokens, mask)


def _spans(starts: torch.Tensor, lengths: torch.Tensor) -> list[list[tuple[int, int]]]:
    rows = []
    for row, n in zip(starts.tolist(), lengths.tolist()):
        begins = [i for i, s in enumerate(row[:n]) if s]
        rows.append(list(zip(begins, begins[1:] + [n])))
    return rows
