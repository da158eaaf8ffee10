"""Segment attention: equal to a block-diagonal causal mask, and the training step's main pass uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_fp_close
from torch import nn

from vila_hd.model.attention import segment_attention, segment_table


def dense_reference(q, k, v, segments):
    """Block-diagonal causal mask over the spans; rows outside every span -> 0."""
    b, h, length, _ = q.shape
    mask = torch.zeros(b, 1, length, length, dtype=torch.bool)
    inside = torch.zeros(b, length, dtype=torch.bool)
    for r, spans in enumerate(segments):
        for start, end in spans:
            mask[r, 0, start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
            inside[r, start:end] = True
    mask[~inside[:, None, :, None].expand_as(mask)] = True  # keep softmax finite on gap rows, zeroed below
    rep = h // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)
    return (out * inside[:, None, :, None]).transpose(1, 2)


def test_matches_a_block_diagonal_causal_mask_with_gqa_and_gaps():
    torch.manual_seed(0)
    q = torch.randn(2, 6, 13, 8, requires_grad=True)
    k = torch.randn(2, 2, 13, 8, requires_grad=True)
    v = torch.randn(2, 2, 13, 8, requires_grad=True)
    segments = (((0, 5), (5, 11)), ((2, 13),))  # row 0: two samples and a padding tail; row 1: a gap first
    ours, _ = segment_attention(nn.Module(), q, k, v, None, segments=segment_table(segments))
    ref = dense_reference(q, k, v, segments)
    assert_fp_close(ours, ref)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        assert_fp_close(g, r)


def test_one_sample_per_row_is_one_causal_call_exact_on_the_samples(monkeypatch):
    torch.manual_seed(2)
    q = torch.randn(3, 4, 9, 8)
    k, v = torch.randn(3, 2, 9, 8), torch.randn(3, 2, 9, 8)
    segments = (((0, 9),), ((0, 5),), ())  # full row, sample + padding tail, all padding
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    ours, _ = segment_attention(nn.Module(), q, k, v, None, segments=segment_table(segments))
    monkeypatch.undo()
    ref = dense_reference(q, k, v, segments)
    assert len(calls) == 1
    assert_fp_close(ours[0], ref[0])
    assert_fp_close(ours[1, :5], ref[1, :5])


def test_without_segments_it_is_sdpa():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 7, 4) for _ in range(3))
    module = nn.Module()
    module.is_causal = True
    ours, _ = segment_attention(module, q, k, v, None)
    assert_fp_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2))


@pytest.mark.parametrize("segments", [((0, 5), (4, 8)), ((0, 0),), ((3, 20),)])
def test_bad_segments_are_named(segments):
    q = torch.randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match="segment"):
        segment_attention(nn.Module(), q, q, q, None, segments=segment_table((segments,)))



def test_a_table_naming_a_missing_row_or_of_the_wrong_shape_is_refused():
    q = torch.randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match="names row 1 of a batch of 1"):
        segment_attention(nn.Module(), q, q, q, None, segments=torch.tensor([[1, 0, 4]]))
    with pytest.raises(ValueError, match=r"\(N, 3\) table"):
        segment_attention(nn.Module(), q, q, q, None, segments=torch.tensor([0, 0, 4]))


def test_the_training_switch_is_not_saved_with_the_model(tmp_path):
    """Segment attention is a training-time choice: a model saved after it loads with its own implementation."""
    from vila_hd.builder import build_tiny_model
    from vila_hd.model import VilaHDForConditionalGeneration
    from vila_hd.model.attention import SEGMENT_ATTENTION
    from vila_hd.train.model_step import VilaHDTrainStep

    model, _ = build_tiny_model("tiny")
    VilaHDTrainStep(model, {"num_look_close": 2})
    assert model.language_model.config._attn_implementation == SEGMENT_ATTENTION
    model.save_pretrained(tmp_path)
    assert SEGMENT_ATTENTION not in (tmp_path / "config.json").read_text()
    loaded = VilaHDForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.language_model.config._attn_implementation == "sdpa"


def test_auto_keeps_llms_whose_attention_is_not_plain_causal():
    """A sliding window (Mistral) or soft-capping (Gemma 2) is not what segment attention computes: auto keeps
    the model's own path, an explicit request is refused, and the kernel refuses such calls."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from vila_hd.model.attention import supports_segments
    from vila_hd.train.model_step import use_segment_attention

    assert supports_segments(Qwen2Config()) and supports_segments(LlamaConfig())
    assert not supports_segments(MistralConfig())
    assert not supports_segments(SimpleNamespace(attn_logit_softcapping=50.0))
    mistral = SimpleNamespace(config=MistralConfig(attn_implementation="sdpa"))
    assert not use_segment_attention(mistral, "auto") and mistral.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="plain causal attention"):
        use_segment_attention(mistral, "segments")
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="llm_attention: model"):
        segment_attention(nn.Module(), q, q, q, None, segments=segment_table((((0, 6),),)), sliding_window=4)


@settings(max_examples=60, deadline=None, database=None)
@given(data=st.data())
def test_random_span_layouts_match_the_dense_mask(data):
    rows = data.draw(st.integers(1, 3))
    length = data.draw(st.integers(1, 12))
    segments = []
    for _ in range(rows):  # increasing cut points -> spans, some of them dropped (gaps / padding)
        cuts = sorted(set(data.draw(st.lists(st.integers(0, length), max_size=5)) + [0, length]))
        spans = [(a, b) for a, b in zip(cuts, cuts[1:]) if data.draw(st.booleans())]
        segments.append(tuple(spans))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    q = torch.randn(rows, 4, length, 8, generator=g)
    k, v = torch.randn(rows, 2, length, 8, generator=g), torch.randn(rows, 2, length, 8, generator=g)
    ours, _ = segment_attention(nn.Module(), q, k, v, None, segments=segment_table(segments))
    ref = dense_reference(q, k, v, segments)
    for r, spans in enumerate(segments):
        for start, end in spans:  # the samples' tokens (outside them: zero, or padding after a lone sample)
            assert_fp_close(ours[r, start:end], ref[r, start:end])
