"""Segment attention for training rows that hold several samples (packing) or a sample and its padding.

With SDPA, transformers turns such rows into a dense (L x L) boolean mask: it is built for every forward (after a
host sync to find the segments), takes L^2 memory per row, and keeps attention off the fused causal kernels
(flash / cuDNN) and off their grouped-query path, so every K/V head is copied to all its query heads.

:data:`SEGMENT_ATTENTION` is an attention implementation for Hugging Face decoders (registered with
``AttentionInterface``): given ``segments`` -- the ``(row, start, end)`` spans of the samples, a CPU table from the
collator (:func:`segment_table`) -- it runs one causal SDPA call per span (``enable_gqa``, no mask: the fused kernels),
so a row of four samples costs four causal triangles instead of a full square, and padding between or after
packed samples costs nothing (its output is zero; it carries no loss). A batch of one sample per row (unpacked)
is one causal call over the whole rows: the padding comes after each sample, so the samples' tokens are exact. Without ``segments`` it *is* SDPA (same masks, same kernel), so the
same model serves calls that do not pass them (e.g. the top-down prefix pass).

Passing :data:`NO_MASKS` as ``attention_mask`` with ``segments`` tells the decoder that masks are prepared (none
are needed), so it builds none. Both need transformers >= 5 (masks prepared as a dict per layer type).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["NO_MASKS", "SEGMENT_ATTENTION", "register_segment_attention", "segment_attention", "segment_table",
           "supports_segments"]

SEGMENT_ATTENTION = "vila_hd_segments"
Segments = Sequence[Sequence[tuple[int, int]]]


class _NoMasks(dict):
    """A decoder's prepared per-layer-type masks, all None."""

    def __missing__(self, key):
        return None


NO_MASKS = _NoMasks()


def supports_segments(config=None) -> bool:
    """transformers >= 5 (decoders accept masks prepared as a dict, so :data:`NO_MASKS` skips building them) and,
    given the LLM's config, plain causal attention in every layer (no sliding window, no logit soft-capping)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return False
    if config is None:
        return True
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or ()) or (
        getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True))
    return not sliding and getattr(config, "attn_logit_softcapping", None) is None


def segment_table(segments: Segments) -> torch.Tensor:
    """Per-row spans -> the (N, 3) int64 CPU table of (row, start, end) that :func:`segment_attention` takes.

    A tensor, not nested lists, so that compiled decoder layers (``train/compile.py``) treat it as an input
    instead of specialising (and recompiling) on every packing layout; on the CPU, so reading it never waits for
    a GPU."""
    rows = [(r, start, end) for r, spans in enumerate(segments) for start, end in spans]
    return torch.tensor(rows, dtype=torch.long).view(-1, 3)


@torch.compiler.disable  # a Python loop over host-known spans: keep it out of compiled regions
def segment_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      segments: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """``query`` (B, H, L, D), ``key`` / ``value`` (B, H_kv, L, D) -> ((B, L, H, D), None), the attention-interface
    contract. With ``segments`` (a :func:`segment_table`): causal attention inside each span, zeros outside every
    span (any mask is ignored: the spans define it). Without: transformers' SDPA attention."""
    if segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise ValueError("segment attention has no sliding window or logit soft-capping; train this LLM with "
                         "llm_attention: model")
    per_row = _per_row(segments, query.shape[0], query.shape[2])
    gqa = key.shape[1] != query.shape[1]
    if all(len(spans) <= 1 and all(start == 0 for start, _ in spans) for spans in per_row):
        # One sample per row, then padding: causal attention over whole rows is exact for every token of the
        # samples (the padding comes after them), in one call; the padding rows' outputs are not zeroed.
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scaling,
                                             enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    rows = [_row(query[b], key[b], value[b], spans, dropout, scaling, gqa) for b, spans in enumerate(per_row)]
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def _per_row(table: torch.Tensor, batch: int, length: int) -> list[list[tuple[int, int]]]:
    if table.dim() != 2 or table.shape[1] != 3:
        raise ValueError(f"segments must be an (N, 3) table of (row, start, end), got shape {tuple(table.shape)}")
    if table.device.type != "cpu":
        raise ValueError(f"segments must stay on the host (reading a {table.device} table would wait for it)")
    per_row: list[list[tuple[int, int]]] = [[] for _ in range(batch)]
    for row, start, end in table.numpy().tolist():  # host memory: nothing to wait for
        if not 0 <= row < batch:
            raise ValueError(f"segment ({row}, {start}, {end}) names row {row} of a batch of {batch}")
        at = per_row[row][-1][1] if per_row[row] else 0
        if not at <= start < end <= length:
            raise ValueError(f"segment ({start}, {end}) of row {row} is empty, overlaps the previous one or leaves "
                             f"the row of {length} tokens")
        per_row[row].append((start, end))
    return per_row


def _row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: Sequence[tuple[int, int]], dropout: float,
         scaling: float | None, gqa: bool) -> torch.Tensor:
    """One row (H, L, D): causal SDPA per span, zeros in the gaps."""
    length = q.shape[1]
    pieces, at = [], 0
    for start, end in spans:
        if start > at:
            pieces.append(q.new_zeros(q.shape[0], start - at, v.shape[-1]))
        s = slice(start, end)
        pieces.append(F.scaled_dot_product_attention(q[None, :, s], k[None, :, s], v[None, :, s], dropout_p=dropout,
                                                     is_causal=True, scale=scaling, enable_gqa=gqa)[0])
        at = end
    if at < length:
        pieces.append(q.new_zeros(q.shape[0], length - at, v.shape[-1]))
    return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]


def register_segment_attention() -> None:
    """Make :data:`SEGMENT_ATTENTION` a valid ``attn_implementation`` (its masks, when built, are SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_ATTENTION, sdpa_mask)
