"""Where the top-down prefix pass reads: an index plan the collator builds on the CPU (or the step on the device).

For top-down selection each image's prompt is the LLM's hidden state at its prompt token, computed by a pass
(no gradient) over each row's tokens *without* the high-res image tokens (not known yet) and cut after the row's
last prompt. The plan says which tokens that pass reads, in which order, at which positions, and where the
prompts land. It depends only on the batch layout, so the collator can make it in the loader workers: the GPU
step then never waits for the device to find the row width, and the pass gets its sample spans for segment
attention (:mod:`vila_hd.model.attention`) instead of a block mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vila_hd.model.attention import segment_table

__all__ = ["PrefixPlan", "prefix_plan"]


@dataclass
class PrefixPlan:
    order: torch.Tensor  # (B, W) column of each prefix token in its row
    positions: torch.Tensor  # (B, W) position ids, restarting at every sample
    prompt_columns: torch.Tensor  # (P,) column of each image's prompt in the prefix rows
    low_res_tokens: int  # the image layout the plan was made for
    segments: torch.Tensor | None = None  # (N, 3) sample spans, a CPU table (CPU plans only, see segment_table)

    def to(self, device) -> PrefixPlan:
        return PrefixPlan(self.order.to(device, non_blocking=True), self.positions.to(device, non_blocking=True),
                          self.prompt_columns.to(device, non_blocking=True), self.low_res_tokens, self.segments)


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
    plan = PrefixPlan(order, idx[None, :width] - begin, compact[prompt_index[:, 0], prompt_index[:, 1]],
                      low_res_tokens)
    if device.type == "cpu":
        plan.segments = segment_table(_spans(starts & valid, lengths))
    return plan


def _spans(starts: torch.Tensor, lengths: torch.Tensor) -> list[list[tuple[int, int]]]:
    rows = []
    for row, n in zip(starts.tolist(), lengths.tolist()):
        begins = [i for i, s in enumerate(row[:n]) if s]
        rows.append(list(zip(begins, begins[1:] + [n])))
    return rows
