"""VilaHDForConditionalGeneration on tiny configs: token stream, top-down selection, prefix reuse,
generation (KV cache, batching, streaming), projector parity, checkpoints and bad input."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from serving_helpers import rgb
from tolerances import assert_fp_close
from transformers import AutoModelForImageTextToText, LogitsProcessor, LogitsProcessorList, TextIteratorStreamer

from vila_hd.builder import build_tiny_model
from vila_hd.host_syncs import count_host_syncs
from vila_hd.model import VilaHDForConditionalGeneration
from vila_hd.model.projector import VilaHDProjector, gather_groups, space_to_channel
from vila_hd.model.tiny import tiny_config


def chat(processor, content, history=()):
    return processor.apply_chat_template([*history, {"role": "user", "content": content}])


def inputs_for(processor, texts, images, **kw):
    return processor(text=texts, images=images, **kw)


def greedy(model, inputs, n=6, **kw):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, **kw)
    return out[:, inputs["input_ids"].shape[1] :]


# --- token stream -------------------------------------------------------------------------------------
def test_image_features_follow_the_layout(tiny):
    model, processor = tiny
    pixel_values = processor(
        text=chat(processor, "<image>"),
        images=[
            rgb(0),
        ],
    ).get("pixel_values")
    pixel_values = torch.cat([pixel_values, pixel_values.flip(-1)])
    with torch.no_grad():
        feats = model.get_image_features(pixel_values, num_look_close=3)
    layout = model.image_token_layout((448, 448), num_look_close=3)
    assert layout.num_tokens == 16 + 3 * 32
    assert [e.shape for e in feats.embeds] == [(layout.num_tokens, model.config.text_config.hidden_size)] * 2
    assert [m.shape for m in feats.selection_maps] == [(2, 16, 16), (2, 32, 32)]
    assert [int(m.sum()) for m in feats.selection_maps] == [2 * n for n in layout.selected_patches]


def test_high_res_tokens_are_the_fully_selected_groups(tiny):
    """The projector output equals the reference computation: scatter into dense zero maps, 2x2-merge,
    project, keep the merged tokens whose four patches were all selected."""
    model, processor = tiny
    pixel_values = processor(text=chat(processor, "<image>"), images=[rgb(1)])["pixel_values"]
    with torch.no_grad():
        low = model.encode_low_res(pixel_values)
        out = model.vision_tower.vision_model.look_close(
            low, num_look_close=2, output_layers=[-2], selection_group_size=2
        )
        feats = model.get_image_features(low_res=low, num_look_close=2)
        maps = model.vision_tower.format_features_into_feature_maps(out.hidden_states[0], out.selection_maps)
        expected = []
        for fmap, smap in zip(maps[1:], out.selection_maps):
            merged = space_to_channel(fmap.permute(0, 2, 3, 1), 2)
            keep = F.avg_pool2d(smap[:, None], 2)[:, 0] == 1
            expected.append(model.mm_projector(merged[keep]))
    assert_fp_close(feats.embeds[0][16:], torch.cat(expected))


def test_space_to_channel_order():
    x = torch.arange(16.0).view(1, 4, 4, 1)
    merged = space_to_channel(x, 2)
    assert merged[0, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]  # top-left, top-right, bottom-left, bottom-right
    assert space_to_channel(torch.ones(1, 3, 3, 2), 2).shape == (1, 2, 2, 8)


def test_gather_groups_skips_partial_groups():
    tokens = torch.arange(7.0).view(1, 7, 1)  # 1 low-res token, then 6 selected patches
    smap = torch.tensor([[[1, 1, 1, 0], [1, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]], dtype=torch.float)
    feats, where = gather_groups(tokens, [smap], 2, offset=1)
    assert feats.tolist() == [[1.0, 2.0, 4.0, 5.0]]
    assert [w.tolist() for w in where[0]] == [[0], [0], [0]]


def test_gather_groups_with_known_counts_is_sync_free_and_checked():
    g = torch.Generator().manual_seed(0)
    smaps = [torch.zeros(2, 4, 4), torch.zeros(2, 8, 8)]
    for smap, groups in zip(smaps, (2, 5)):
        for b in range(2):  # `groups` whole 2x2 groups per image, at random places
            cells = torch.randperm(smap.shape[-1] // 2 * smap.shape[-2] // 2, generator=g)[:groups]
            for c in cells.tolist():
                row, col = divmod(c, smap.shape[-1] // 2)
                smap[b, 2 * row:2 * row + 2, 2 * col:2 * col + 2] = 1
    n = int(sum(m[0].sum() for m in smaps))
    tokens = torch.randn(2, 1 + n, 3, generator=g)
    generic = gather_groups(tokens, smaps, 2, offset=1)
    with count_host_syncs() as syncs:
        known = gather_groups(tokens, smaps, 2, offset=1, groups_per_scale=(2, 5))
    assert syncs.total == 0
    assert torch.equal(generic[0], known[0])
    for a, b in zip(generic[1], known[1]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(RuntimeError, match="complete groups"):
        gather_groups(tokens, smaps, 2, offset=1, groups_per_scale=(3, 5))


def test_position_embedding_equals_area_interpolation():
    config = tiny_config("tiny", high_res_pos_embed=True)
    projector = VilaHDProjector(config)
    torch.manual_seed(0)
    projector.high_res_pos_embed.data.normal_()
    table = projector.high_res_pos_embed.view(1, 8, 8, -1).permute(0, 3, 1, 2)
    for grid in [(4, 4), (8, 8), (16, 16), (5, 11)]:
        dense = F.interpolate(table, size=grid, mode="area")[0].permute(1, 2, 0)
        rows = torch.arange(grid[0]).repeat_interleave(grid[1])
        cols = torch.arange(grid[1]).repeat(grid[0])
        got = projector.position_embedding(grid, rows, cols, scale=1) - projector.high_res_scale_embed[1][0]
        assert_fp_close(got, dense.reshape(-1, dense.shape[-1]))


# --- top-down selection ------------------------------------------------------------------------------
def selection(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, output_selection_maps=True, **kw).selection_maps


def test_selection_depends_on_the_question(tiny):
    model, processor = tiny
    image = rgb(2)
    a = selection(
        model, inputs_for(processor, chat(processor, "<image>What color is the car?"), [image], num_look_close=1)
    )
    b = selection(
        model, inputs_for(processor, chat(processor, "<image>Read the text on the sign."), [image], num_look_close=1)
    )
    c = selection(
        model, inputs_for(processor, chat(processor, "<image>What color is the car?"), [image], num_look_close=1)
    )
    assert any(not torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(a, c))


def test_bottom_up_needs_no_prefix_pass(tiny):
    model, processor = tiny
    calls = []
    hook = model.language_model.base_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        inputs = inputs_for(
            processor,
            [chat(processor, "<image>What color is the car?"), chat(processor, "<image>Read the text on the sign.")],
            [rgb(3), rgb(3)],
        )
        maps = selection(model, inputs, look_close_mode="after_image")
    finally:
        hook.remove()
    assert len(calls) == 1  # the main pass only
    assert all(torch.equal(m[0], m[1]) for m in maps)  # same image, no prompt: same selection


# --- prefix reuse ---------------------------------------------------------------------------------------
def batch_inputs(processor):
    texts = [
        chat(processor, "<image>What color is the car?"),
        chat(
            processor,
            "Which one is larger?",
            history=[
                {"role": "user", "content": "<image>\n<image>\nCompare the two pictures."},
                {"role": "assistant", "content": "The left one is red."},
            ],
        ),
        chat(processor, "Hi, how are you?"),
    ]
    return processor(text=texts, images=[[rgb(4)], [rgb(5), rgb(6)], []])


def test_prefix_reuse_matches_two_pass(tiny):
    model, processor = tiny
    inputs = batch_inputs(processor)
    with torch.no_grad():
        reused = model(**inputs, reuse_prefix_cache=True)
        plain = model(**inputs, reuse_prefix_cache=False)
    assert_fp_close(reused.logits, plain.logits)
    mask = inputs["attention_mask"].bool()
    assert torch.isfinite(reused.logits[mask]).all()


def test_prefix_reuse_runs_fewer_tokens(tiny):
    model, processor = tiny
    inputs = processor(text=chat(processor, "<image>What color is the car?"), images=[rgb(7)])
    lengths = []

    def record(module, args, kwargs):
        lengths.append(kwargs["inputs_embeds"].shape[1])

    hook = model.language_model.base_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, reuse_prefix_cache=True)
            reused = list(lengths)
            lengths.clear()
            model(**inputs, reuse_prefix_cache=False)
    finally:
        hook.remove()
    total = inputs["input_ids"].shape[1]
    prefix = reused[0]
    assert lengths == [prefix, total]
    assert reused[1] < total and prefix + reused[1] < prefix + total


# --- generation ---------------------------------------------------------------------------------------
def test_generate_with_and_without_kv_cache(tiny):
    model, processor = tiny
    inputs = processor(text=chat(processor, "<image>Describe the image in detail."), images=[rgb(8)])
    with_cache = greedy(model, inputs, use_cache=True)
    without = greedy(model, inputs, use_cache=False)
    assert torch.equal(with_cache, without)


def test_batch_matches_single(tiny):
    model, processor = tiny
    texts = [
        chat(processor, "<image>What color is the car?"),
        chat(processor, "<image><image>How many people are in the picture? Look at both photos."),
    ]
    images = [[rgb(9)], [rgb(10), rgb(11)]]
    batched = processor(text=texts, images=images)
    assert not batched["attention_mask"].all()  # really padded
    together = greedy(model, batched)
    with torch.no_grad():
        batch_logits = model(**batched).logits[:, -1]
    for i in range(2):
        single = processor(text=texts[i], images=images[i])
        alone = greedy(model, single)
        assert torch.equal(together[i], alone[0]), i
        with torch.no_grad():
            assert_fp_close(batch_logits[i], model(**single).logits[0, -1])


def test_num_return_sequences_keeps_each_samples_images(tiny):
    """Several returned sequences per prompt, with a two-image sample in the batch: every copy must see its own
    sample's images (top_k=1 sampling makes each copy equal to the single-sequence answer)."""
    model, processor = tiny
    texts = [chat(processor, "<image>What color is the car?"),
             chat(processor, "<image><image>How many people are in the picture? Look at both photos.")]
    inputs = processor(text=texts, images=[[rgb(9)], [rgb(10), rgb(11)]])
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        once = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=1)[:, length:]
        twice = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=1, num_return_sequences=2)
    assert not torch.equal(once[0], once[1])  # the two samples answer differently, so a mix-up would show
    assert torch.equal(twice[:, length:], once.repeat_interleave(2, dim=0))


def test_text_only_prompt_skips_vision(tiny, monkeypatch):
    model, processor = tiny
    inputs = processor(text=chat(processor, "Hi, how are you?"))
    assert "pixel_values" not in inputs

    def fail(*args, **kwargs):
        raise AssertionError("the vision tower ran for a text-only prompt")

    monkeypatch.setattr(model.vision_tower.vision_model, "encode_low_res", fail)
    out = greedy(model, inputs, n=4)
    assert out.shape == (1, 4)


def test_sampling_and_streaming(tiny):
    model, processor = tiny
    inputs = processor(text=chat(processor, "<image>Describe the image."), images=[rgb(12)])
    torch.manual_seed(0)
    with torch.no_grad():
        sampled = model.generate(**inputs, max_new_tokens=5, do_sample=True, temperature=0.8, top_k=20)
    assert sampled.shape[1] <= inputs["input_ids"].shape[1] + 5
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = {}
    thread = threading.Thread(target=lambda: result.update(ids=greedy(model, inputs, n=6, streamer=streamer)))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == processor.tokenizer.decode(result["ids"][0], skip_special_tokens=True)


class ForceAt(LogitsProcessor):
    def __init__(self, step: int, token: int, prompt_len: int):
        self.step, self.token, self.prompt_len = step, token, prompt_len

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_len == self.step:
            scores = torch.full_like(scores, -1e9)
            scores[:, self.token] = 0
        return scores


def test_generation_stops_on_end_of_turn(tiny):
    model, processor = tiny
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in np.atleast_1d(model.generation_config.eos_token_id)
    inputs = processor(text=chat(processor, "<image>Hi"), images=[rgb(13)])
    out = greedy(
        model, inputs, n=20, logits_processor=LogitsProcessorList([ForceAt(2, im_end, inputs["input_ids"].shape[1])])
    )
    assert out.shape[1] == 3 and int(out[0, -1]) == im_end


def test_generate_returns_selection_maps(tiny):
    model, processor = tiny
    inputs = processor(text=chat(processor, "<image>What color is the car?"), images=[rgb(14)])
    with torch.no_grad():
        ids, sel = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_selection_maps=True)
    assert ids.shape[1] == inputs["input_ids"].shape[1] + 2 or ids.shape[1] < inputs["input_ids"].shape[1] + 2
    assert [m.shape for m in sel.maps] == [(1, 16, 16), (1, 32, 32)]
    assert sel.prompts.shape == (1, model.config.vision_config.hidden_size)


def test_bf16_forward(tiny):
    model, processor = tiny
    model_bf16, _ = build_tiny_model("tiny", seed=0, dtype=torch.bfloat16)
    inputs = processor(text=chat(processor, "<image>What color is the car?"), images=[rgb(15)])
    with torch.no_grad():
        logits = model_bf16(**inputs).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(projector_type="mlp_downsample_3x3", vision_overrides={"max_select_num": 144}),
        dict(projector_type="linear", prompt_head_type="linear"),
        dict(high_res_pos_embed=True),
    ],
)
def test_other_projectors_run(overrides):
    model, processor = build_tiny_model("tiny", seed=1, **overrides)
    if overrides.get("projector_type") == "mlp_downsample_3x3":
        # 3x3 merging needs grids divisible by 3: the low-res scale 126 gives 9x9, 18x18 and 36x36.
        model, processor = build_tiny_model(
            "tiny",
            seed=1,
            vision_overrides={"max_select_num": 144, "ps3_scales": [126, 252, 504]},
            projector_type="mlp_downsample_3x3",
        )
    inputs = processor(text=chat(processor, "<image>What color is the car?"), images=[rgb(16)])
    with torch.no_grad():
        reused = model(**inputs).logits
        plain = model(**inputs, reuse_prefix_cache=False).logits
    assert_fp_close(reused, plain)
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == processor.num_image_tokens()


def test_training_forward_has_gradients(tiny):
    model, processor = tiny
    inputs = processor(text=chat(processor, "<image>What color is the car?"), images=[rgb(17)])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == processor.image_token_id, -100)
    model.train()
    try:
        out = model(**inputs, labels=labels)
        out.loss.backward()
    finally:
        model.eval()
    assert torch.isfinite(out.loss)
    assert model.mm_projector.layers[2].weight.grad is not None
    assert model.language_model.get_input_embeddings().weight.grad is not None
    model.zero_grad(set_to_none=True)


# --- checkpoints --------------------------------------------------------------------------------------------
def test_save_load_roundtrip(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    processor.save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1 and not list(tmp_path.glob("*.bin"))
    inputs = processor(text=chat(processor, "<image>What color is the car?"), images=[rgb(18)])
    for cls in (VilaHDForConditionalGeneration, AutoModelForImageTextToText):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert type(loaded) is VilaHDForConditionalGeneration
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
        assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id


# --- bad input ----------------------------------------------------------------------------------------------
def test_images_without_placeholders(tiny):
    model, processor = tiny
    text_inputs = processor(text=chat(processor, "Hi"))
    pixel_values = processor(text=chat(processor, "<image>"), images=[rgb(0)])["pixel_values"]
    with pytest.raises(ValueError, match=r"pixel_values hold 1 image\(s\) but input_ids have no image tokens"):
        model(**text_inputs, pixel_values=pixel_values)


def test_placeholder_count_mismatch(tiny):
    model, processor = tiny
    inputs = processor(text=chat(processor, "<image>Hi"), images=[rgb(0)])
    two = torch.cat([inputs["pixel_values"]] * 2)
    with pytest.raises(ValueError, match=r"image tokens for 1 image\(s\) \(80 tokens each.*pixel_values hold 2"):
        model(**{**inputs, "pixel_values": two})
    with pytest.raises(ValueError, match=r"sample 0 holds 80 image tokens, not a multiple of the 48 tokens"):
        model(**{**inputs, "num_look_close": 1})
    with pytest.raises(ValueError, match="input_ids hold 80 image tokens but no pixel_values"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


def test_sequence_longer_than_context(tiny):
    model, processor = tiny
    inputs = processor(text=chat(processor, "<image>Hi"), images=[rgb(0)])
    limit = model.config.text_config.max_position_embeddings
    padding = torch.full((1, limit), processor.tokenizer.pad_token_id)
    ids = torch.cat([padding, inputs["input_ids"]], dim=1)
    with pytest.raises(
        ValueError,
        match=rf"sequence of {ids.shape[1]} tokens after image expansion exceeds the "
        rf"LLM context of {limit} \(max_position_embeddings\)",
    ):
        model(input_ids=ids, pixel_values=inputs["pixel_values"])


def test_bad_prompt_positions(tiny):
    model, processor = tiny
    inputs = processor(
        text=[chat(processor, "<image>Hi"), chat(processor, "<image>What color is the car?")], images=[rgb(0), rgb(1)]
    )
    with pytest.raises(ValueError, match="point at padding"):
        model(**{**inputs, "prompt_positions": torch.tensor([0, 0])})
    with pytest.raises(ValueError, match="2 entries for a batch of 3|has 1 entries for a batch of 2"):
        model(**{**inputs, "prompt_positions": torch.tensor([5])})


def test_prompt_positions_fallback_from_template(tiny):
    model, processor = tiny
    inputs = processor(text=chat(processor, "<image>What color is the car?"), images=[rgb(19)])
    found = model._find_prompt_positions(inputs["input_ids"], inputs["attention_mask"])
    assert found.tolist() == inputs["prompt_positions"].tolist()


def test_auto_reuse_policy(tiny, monkeypatch):
    model, _ = tiny
    assert model.config.reuse_prefix_cache == "auto"
    assert not model._prefix_reuse_pays(0, 1000)
    assert not model._prefix_reuse_pays(50, 1000)  # SDPA: a short shared prefix is cheaper to recompute
    assert model._prefix_reuse_pays(500, 1000)
    monkeypatch.setattr(model.language_model.config, "_attn_implementation", "flash_attention_2")
    assert model._prefix_reuse_pays(50, 1000)


def test_processor_settings_flow_into_the_model(tiny):
    """Budgets given to the processor travel with the inputs, so the model uses the same layout."""
    model, processor = tiny
    text = chat(processor, "<image>What color is the car?")
    for settings in (dict(num_token_look_close=96), dict(num_look_close=3, only_select_first_n_scale=1)):
        inputs = processor(text=text, images=[rgb(20)], **settings)
        with torch.no_grad():
            out = model(**inputs, output_selection_maps=True)
        layout = model.image_token_layout(**settings)
        assert [int(m.sum()) for m in out.selection_maps] == list(layout.selected_patches)


def test_no_deprecated_cache_name_is_read(tiny):
    """The cache is read under this transformers version's field name only: the other name goes through a
    deprecation shim that logs a warning on every process."""
    import logging

    model, processor = tiny
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        inputs = processor(text=chat(processor, "<image>What color is the car?"), images=[rgb(15)])
        with torch.no_grad():
            model(**inputs, use_cache=False, output_selection_maps=True, logits_to_keep=1, reuse_prefix_cache=True)
            model(**inputs, use_cache=False, reuse_prefix_cache=False)
            greedy(model, inputs, n=2)
    finally:
        logger.removeHandler(handler)
    assert not [m for m in messages if "deprecated" in m]
