"""Micro-batches: padding or packing of encoded samples, image bookkeeping and loss normalisers.

A batch is a dict of tensors:

- ``input_ids`` / ``target_ids`` / ``position_ids`` (R, L): ``target_ids[r, t]`` is the token predicted
  at position t (the label of t + 1, ``-100`` where there is no loss). Each sample (and the padding tail
  of a row) has position ids restarting at 0: the LLM runs without an attention mask and builds a
  block-diagonal causal mask from them, so padded and packed rows take the same path.
- ``pixel_values`` (N, 3, S, S) in the order the images appear in the rows, plus ``num_placed_images``:
  a batch without images carries one dummy image that is encoded but placed nowhere (ZeRO-3 lockstep:
  every rank runs the same module calls).
- ``prompt_index`` (N_placed, 2): (row, position) of each placed image's prompt token.
- ``boxes`` (N, 4): normalised box per image, NaN where none.
- ``num_items``: the normalisers of the loss terms (``lm``: target tokens, ``selection``: boxed images),
  known before the forward so the trainer can all-reduce them across ranks and micro-batches.
- ``skipped``: the samples of this batch that were rejected (index, id, reason, detail).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vila_hd.model.attention import segment_table
from vila_hd.model.prefix_plan import prefix_plan
from vila_hd.train.data.dataset import IGNORE_INDEX, EncodedSample, SkippedSample
from vila_hd.train.data.packing import pack
from vila_hd.train.losses import target_positions


class Collator:
    """Builds micro-batches; ``packing`` puts the samples into as few rows of ``max_length`` as possible."""

    def __init__(self, pad_token_id: int, image_size: tuple[int, int], max_length: int, packing: bool = False,
                 pad_to_multiple_of: int = 8, image_token_id: int | None = None, low_res_tokens: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.image_token_id = image_token_id
        self.low_res_tokens = low_res_tokens
        self.image_size = tuple(image_size)
        self.max_length = int(max_length)
        self.packing = packing
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[EncodedSample | SkippedSample]) -> dict[str, Any]:
        good = [x for x in items if isinstance(x, EncodedSample)]
        skipped = [(x.index, x.id, x.reason, x.detail) for x in items if isinstance(x, SkippedSample)]
        if self.packing:
            rows = [[good[i] for i in row] for row in pack([len(s.input_ids) for s in good], self.max_length)]
        else:
            rows = [[s] for s in good]
        if not rows:  # every sample was rejected: one empty row keeps the step's module calls unchanged
            rows = [[]]
        batch = self._rows(rows)
        batch.update(self._index_plan(batch))
        batch["skipped"] = skipped
        batch["num_samples"] = len(good)
        return batch

    def _index_plan(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Data-dependent indices the training forward needs, found here on the CPU (in the loader workers) so
        the GPU step never waits for them: (2, N) row/column of every image token (row-major, as
        ``nonzero`` orders them), the (2, N) row/column of every target token (at least one) and, given
        the low-res tokens per image, the top-down prefix pass's plan (:mod:`vila_hd.model.prefix_plan`)."""
        plan = {"target_positions": target_positions(batch["target_ids"])}
        if self.image_token_id is None:
            return plan
        plan["image_positions"] = found = (batch["input_ids"] == self.image_token_id).nonzero().T.contiguous()
        placed = batch["num_placed_images"]
        if self.low_res_tokens is not None and (placed == 0 or found.shape[1] % placed == 0):
            rows, cols = (t.view(placed, -1) if placed else t.view(0, 0) for t in found)
            prefix = prefix_plan(batch["position_ids"], rows, cols, self.low_res_tokens, batch["prompt_index"])
            plan["prefix"] = vars(prefix)
        return plan

    def _rows(self, rows: list[list[EncodedSample]]) -> dict[str, Any]:
        widest = max(max(sum(len(s.input_ids) for s in row) for row in rows), 1)
        m = self.pad_to_multiple_of
        length = int(math.ceil(widest / m) * m) if m else widest
        shape = (len(rows), length)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        target_ids = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        pixels, boxes, prompts, seq_lengths, segments = [], [], [], [], []
        for r, row in enumerate(rows):
            start, spans = 0, []
            for s in row:
                n = len(s.input_ids)
                input_ids[r, start:start + n] = s.input_ids
                target_ids[r, start:start + n - 1] = s.labels[1:]
                position_ids[r, start:start + n] = torch.arange(n)
                for p in s.prompt_positions.tolist():
                    prompts.append((r, start + p))
                if s.num_images:
                    pixels.append(s.pixel_values)
                    boxes.append(s.boxes if s.boxes is not None else torch.full((s.num_images, 4), float("nan")))
                seq_lengths.append(n)
                spans.append((start, start + n))
                start += n
            segments.append(tuple(spans))
            if start < length:  # the padding tail is a segment of its own
                position_ids[r, start:] = torch.arange(length - start)
        placed = len(prompts)
        if pixels:
            pixel_values = torch.cat(pixels)
            box_tensor = torch.cat(boxes)
        else:
            pixel_values = torch.zeros(1, 3, *self.image_size)
            box_tensor = torch.full((1, 4), float("nan"))
        if pixels and pixel_values.shape[0] != placed:
            raise RuntimeError(f"collate: {pixel_values.shape[0]} images for {placed} prompt positions")
        return {
            "input_ids": input_ids,
            "target_ids": target_ids,
            "position_ids": position_ids,
            "pixel_values": pixel_values,
            "num_placed_images": placed,
            "prompt_index": torch.tensor(prompts, dtype=torch.long).view(-1, 2),
            "boxes": box_tensor,
            "num_items": {
                "lm": int((target_ids != IGNORE_INDEX).sum()),
                "selection": int((~box_tensor[:placed].isnan().any(-1)).sum()),
            },
            "seq_lengths": seq_lengths,
            "segments": segment_table(segments),  # (row, start, end) of each sample; stays on the host
            "num_tokens": int(sum(seq_lengths)),
        }
