"""The training forward (parity with the model's own forward, packing), losses, schedule and recipes."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from tolerances import assert_fp_close
from train_helpers import step_samples

from vila_hd.builder import build_tiny_model
from vila_hd.host_syncs import count_host_syncs
from vila_hd.model.parts import PARTS, part_of
from vila_hd.train.config import CONFIG_ROOT, load_stage, stage_from_dict
from vila_hd.train.data.collate import Collator
from vila_hd.train.losses import box_maps, dice_loss, lm_loss_sum, normalized_total, selection_loss
from vila_hd.train.model_step import VilaHDTrainStep
from vila_hd.train.schedule import WarmupCosine

LOOK = {"num_look_close": 2}
TINY_SEED = 3  # the seed of conftest's `tiny` fixture here


@pytest.fixture(scope="module")
def samples(tiny, tmp_path_factory):
    return step_samples(tiny[1], tmp_path_factory.mktemp("img"), LOOK)


def test_training_forward_matches_the_model_forward(tiny, samples):
    model, processor = tiny
    step = VilaHDTrainStep(model, LOOK).eval()
    collate = Collator(processor.tokenizer.pad_token_id, (448, 448), 2048)
    for s in samples:
        with torch.no_grad():
            ref = model(input_ids=s.input_ids[None], pixel_values=s.pixel_values, labels=s.labels[None],
                        prompt_positions=s.prompt_positions[:1] if s.num_images else None, reuse_prefix_cache=False,
                        **LOOK)
            batch = collate([s])
            ours = step(batch)["lm"] / batch["num_items"]["lm"]
        assert_fp_close(ours, ref.loss)


def test_packed_rows_give_the_same_losses_and_gradients_as_padded_rows(tiny, samples):
    model, processor = tiny
    step = VilaHDTrainStep(model, LOOK).eval()
    results = []
    for packing in (False, True):
        batch = Collator(processor.tokenizer.pad_token_id, (448, 448), 2048, packing=packing)(samples)
        model.zero_grad()
        out = step(batch)
        (out["lm"] + out["selection"]).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((batch["input_ids"].shape[0], {k: v.detach() for k, v in out.items()}, grads))
    (rows_a, out_a, g_a), (rows_b, out_b, g_b) = results
    assert rows_a == 3 and rows_b == 1
    for k in out_a:
        assert_fp_close(out_a[k], out_b[k])
    assert g_a.keys() == g_b.keys() and any(n.startswith("mm_projector.top_down_prompt_head") for n in g_a)
    for n in g_a:
        assert_fp_close(g_a[n], g_b[n], msg=n)
    model.zero_grad()


@pytest.mark.parametrize("packing", [False, True])
def test_collator_index_plan_spares_the_step_its_host_syncs(tiny, samples, packing):
    """Given the image-token id and the low-res tokens per image, the collator finds the image-token and target
    positions and the prefix pass's plan on the CPU: the step gives the same losses and gradients as when it
    finds them itself, and its forward (model included) never waits for the device (its own code at least three
    times otherwise)."""
    model, processor = tiny
    step = VilaHDTrainStep(model, LOOK).eval()
    planned = Collator(processor.tokenizer.pad_token_id, (448, 448), 2048, packing=packing,
                       image_token_id=processor.image_token_id, low_res_tokens=low_res_tokens(model))(samples)
    unplanned = {k: v for k, v in planned.items() if k not in ("image_positions", "target_positions", "prefix")}
    results = []
    for batch in (unplanned, planned):
        model.zero_grad()
        with count_host_syncs(where=True) as syncs:
            out = step(batch)
        (out["lm"] + out["selection"]).backward()
        # The step's own code: vila_hd.train and the prefix plan it makes when the batch lacks one.
        own = sum(n for site, n in syncs.by_site.items()
                  if site.startswith(("train" + os.sep, os.path.join("vila_hd", "model", "prefix_plan.py"))))
        if batch is planned:  # the whole forward, model included
            assert syncs.total == 0, syncs.by_site
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((own, {k: v.detach() for k, v in out.items()}, grads))
    (own_a, out_a, g_a), (own_b, out_b, g_b) = results
    assert own_a >= 3 and own_b == 0
    for k in out_a:
        torch.testing.assert_close(out_a[k], out_b[k], rtol=0, atol=0)
    assert g_a.keys() == g_b.keys()
    for n in g_a:
        torch.testing.assert_close(g_a[n], g_b[n], rtol=0, atol=0)
    model.zero_grad()


@pytest.mark.parametrize("packing", [False, True])
def test_segment_attention_equals_the_masked_sdpa_path_and_builds_no_mask(samples, packing, monkeypatch):
    """An SDPA LLM is switched to segment attention for the main pass: same losses and gradients as the
    masked path (``llm_attention="model"``), segment attention runs in every layer of both passes, and the main pass
    builds no mask (so no host sync to look for packed rows); with the collator's prefix plan neither does the
    prefix pass."""
    import vila_hd.model.attention as attention

    results = []
    for choice in ("model", "auto"):
        model, processor = build_tiny_model("tiny", seed=3)  # a fresh model: the switch is made in place
        step = VilaHDTrainStep(model, LOOK, llm_attention=choice).eval()
        assert model.language_model.config._attn_implementation == ("sdpa" if choice == "model" else
                                                                      attention.SEGMENT_ATTENTION)
        batch = Collator(processor.tokenizer.pad_token_id, (448, 448), 2048, packing=packing,
                         image_token_id=processor.image_token_id, low_res_tokens=low_res_tokens(model))(samples)
        calls = []
        monkeypatch.setattr(attention, "_per_row", _counting(attention._per_row, calls))
        with count_host_syncs(where=True) as syncs:
            out = step(batch)
        monkeypatch.undo()
        (out["lm"] + out["selection"]).backward()
        masks = sum(n for site, n in syncs.by_site.items() if "masking_utils" in site)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((len(calls), masks, out, grads))
    (calls_a, masks_a, out_a, g_a), (calls_b, masks_b, out_b, g_b) = results
    layers = model.language_model.config.num_hidden_layers
    assert calls_a == 0 and calls_b == 2 * layers  # every layer of the main and the prefix pass
    assert masks_a == 2 and masks_b == 0  # neither pass builds a mask any more
    for k in out_a:
        assert_fp_close(out_a[k], out_b[k])
    assert g_a.keys() == g_b.keys()
    for n in g_a:
        assert_fp_close(g_a[n], g_b[n], msg=n)


def low_res_tokens(model):
    return model.image_token_layout((448, 448), **LOOK).num_low_res_tokens


def _counting(fn, calls):
    def wrapped(*args):
        calls.append(1)
        return fn(*args)

    return wrapped


@pytest.mark.parametrize("packing", [False, True])
def test_uint8_pixels_normalised_in_the_step_equal_float_pixels(tiny, samples, tmp_path, packing):
    """Training data travels as uint8 (a quarter of the bytes) and the step normalises it: same losses and
    gradients, bit for bit, as the float pixels the processor makes."""
    model, processor = tiny
    small = step_samples(processor, tmp_path, LOOK, uint8_pixels=True)
    assert small[0].pixel_values.dtype == torch.uint8 and samples[0].pixel_values.dtype == torch.float32
    collate = Collator(processor.tokenizer.pad_token_id, (448, 448), 2048, packing=packing)
    results = []
    for items, normalize in ((samples, None), (small, processor.image_processor.normalize)):
        model.zero_grad()
        out = VilaHDTrainStep(model, LOOK, normalize=normalize).eval()(collate(items))
        (out["lm"] + out["selection"]).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (out_a, g_a), (out_b, g_b) = results
    for k in out_a:
        torch.testing.assert_close(out_b[k], out_a[k], rtol=0, atol=0)
    for n in g_a:
        torch.testing.assert_close(g_b[n], g_a[n], rtol=0, atol=0)
    with pytest.raises(ValueError, match="uint8 pixels"):
        VilaHDTrainStep(model, LOOK).eval()(collate(small))
    model.zero_grad()


def test_a_prefix_plan_for_another_layout_is_refused(tiny, samples):
    model, processor = tiny
    n_low = low_res_tokens(model)
    batch = Collator(processor.tokenizer.pad_token_id, (448, 448), 2048, image_token_id=processor.image_token_id,
                     low_res_tokens=n_low + 4)(samples)
    with pytest.raises(ValueError, match=f"prefix pass for {n_low + 4} low-res tokens .* layout has {n_low}"):
        VilaHDTrainStep(model, LOOK).eval()(batch)


def test_the_lm_head_runs_only_at_target_tokens(tiny, samples):
    """Unpacked rows answer at different columns: the head reads each row's own targets, not every column where
    some row has one (the losses match the model's own forward, see the first test)."""
    model, processor = tiny
    batch = Collator(processor.tokenizer.pad_token_id, (448, 448), 2048, image_token_id=processor.image_token_id,
                     low_res_tokens=low_res_tokens(model))(samples)
    seen = []
    hook = model.language_model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            VilaHDTrainStep(model, LOOK).eval()(batch)
    finally:
        hook.remove()
    targets = batch["target_ids"] != -100
    assert seen == [int(targets.sum())] and seen[0] < targets.any(0).sum() * targets.shape[0]


def test_a_text_only_batch_still_gives_every_vision_parameter_a_gradient(tiny, samples):
    model, processor = tiny
    batch = Collator(processor.tokenizer.pad_token_id, (448, 448), 2048)([samples[1]])
    assert batch["num_placed_images"] == 0
    model.zero_grad()
    out = VilaHDTrainStep(model, LOOK).eval()(batch)
    (out["lm"] + out["selection"]).backward()
    for name in ("mm_projector.layers.2.weight", "mm_projector.top_down_prompt_head.fc1.weight",
                 "vision_tower.vision_model.selection_feature_proj.fc1.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and not grad.any()  # present (lockstep) but zero (weight 0)
    model.zero_grad()


def test_flops_count_the_lm_head_at_target_tokens_only(tiny, samples):
    """MFU's LLM term: body parameters over every token, the head (vocabulary x width, tied or not) over the
    target tokens only, where the step runs it."""
    from vila_hd.train.flops import FlopsModel

    model, processor = tiny
    layout = model.image_token_layout((448, 448), **LOOK)
    flops = FlopsModel.from_model(model, layout)
    text = model.config.text_config
    assert flops.head_params == text.vocab_size * text.hidden_size
    embed = model.get_input_embeddings().weight.numel()
    tied = model.language_model.get_output_embeddings().weight is model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.language_model.parameters())
    assert flops.llm_params == total - embed - (0 if tied else flops.head_params)
    lengths = [100, 50]
    with_head = flops.llm(lengths, 6.0, targets=7)
    assert with_head - flops.llm(lengths, 6.0) == 6.0 * flops.head_params * 7
    batch = Collator(processor.tokenizer.pad_token_id, (448, 448), 2048)(samples)
    no_prefix = flops.batch(batch, prefix=False)
    assert no_prefix == flops.llm(batch["seq_lengths"], 6.0, batch["num_items"]["lm"]) + flops.vision(
        batch["num_placed_images"])


def test_box_maps_and_selection_loss():
    maps = box_maps(torch.tensor([[0.0, 0.0, 0.5, 0.25], [float("nan")] * 4]), (4, 4))
    expected = torch.zeros(4, 4)
    expected[0, :2] = 1
    assert torch.equal(maps[0], expected) and not maps[1].any()
    target = maps[:1]
    perfect = selection_loss([target.clamp(0.01, 0.99)], torch.tensor([[0.0, 0.0, 0.5, 0.25]]))
    wrong = selection_loss([(1 - target).clamp(0.01, 0.99)], torch.tensor([[0.0, 0.0, 0.5, 0.25]]))
    assert perfect.item() < 0.1 < wrong.item()
    assert dice_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)


def test_loss_normalisation_by_global_tokens():
    # Two micro-batches with 1 and 3 target tokens: the normalised sum equals the mean over the 4 tokens.
    logits = torch.randn(4, 7, requires_grad=True)
    targets = torch.tensor([1, 2, 3, 4])
    full = torch.nn.functional.cross_entropy(logits, targets)
    parts = [lm_loss_sum(logits[:1], targets[:1]), lm_loss_sum(logits[1:], targets[1:])]
    total = sum(normalized_total({"lm": p}, {"lm": 4}, {"lm": 1.0}) for p in parts)
    assert_fp_close(total, full)
    assert normalized_total({"lm": torch.tensor(6.0), "selection": torch.tensor(3.0)}, {"lm": 3, "selection": 0},
                            {"lm": 1.0, "selection": 2.0}, scale=4.0).item() == pytest.approx(4 * (2.0 + 6.0))


def test_warmup_cosine():
    f = WarmupCosine(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.2) and f(3) == pytest.approx(0.8)
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1)


def test_every_parameter_has_a_part(tiny):
    model, _ = tiny
    seen = {}
    for name, _ in model.named_parameters():
        seen.setdefault(part_of(name), []).append(name)
    assert set(seen) == set(PARTS) | {None}
    never = seen[None]
    assert all(n.endswith("prior_prompt") or ".trunk.norm." in n or ".trunk.attn_pool." in n for n in never)
    assert all(n.startswith("mm_projector.top_down_prompt_head.") for n in seen["prompt_head"])
    assert part_of("base_model.model.mm_projector.modules_to_save.default.layers.2.weight") == "projector"


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIG_ROOT, "stages", "*.yaml"))))
def test_every_shipped_recipe_parses(path):
    config = load_stage(path)
    assert config.learning_rates
    assert os.path.exists(os.path.join(CONFIG_ROOT, "deepspeed", f"{config.deepspeed}.json"))


def test_recipe_errors_name_the_key_and_set_overrides():
    with pytest.raises(ValueError, match=r"data: unknown key\(s\) \['max_len'\]"):
        stage_from_dict({"init": {"preset": "tiny"}, "data": {"max_len": 5}})
    with pytest.raises(ValueError, match="unknown part"):
        stage_from_dict({"init": {"preset": "tiny"}, "trainable": {"projecter": 1e-3}})
    with pytest.raises(ValueError, match="exactly one"):
        stage_from_dict({"init": {"preset": "tiny", "model": "x"}})
    cfg = stage_from_dict({"init": {"preset": "tiny"}}, ["data.max_length=128", "trainable.llm=2e-5",
                                                        "lora={r: 4}", "look_close.num_look_close=all"])
    assert cfg.data.max_length == 128 and cfg.learning_rates == {"llm": 2e-5} and cfg.lora.r == 4
    assert cfg.look_close.num_look_close == "all"
    assert cfg.llm_attention == "auto"
    with pytest.raises(ValueError, match="llm_attention must be one of"):
        stage_from_dict({"init": {"preset": "tiny"}, "llm_attention": "flash"})
