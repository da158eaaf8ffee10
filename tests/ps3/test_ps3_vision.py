"""PS3 vision tower: token counts, parity with transformers' SigLIP, selection behaviour, bad input."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_fp_close

from vila_hd.host_syncs import count_host_syncs
from vila_hd.ps3 import PS3VisionModel
from vila_hd.ps3.configuration import PS3VisionConfig, tiny_vision_config
from vila_hd.ps3.convert_siglip import ps3_to_siglip, siglip_to_ps3
from vila_hd.ps3.vision import selected_columns

SCALES_15K = [378, 756, 1512]
SCALES_4K = [378, 756, 1512, 3780]


def tiny_model(scales=SCALES_15K, seed=0, **overrides) -> PS3VisionModel:
    torch.manual_seed(seed)
    model = PS3VisionModel(tiny_vision_config(scales, **overrides)).eval()
    with torch.no_grad():  # make the zero-initialised residual tables non-trivial
        for table in model.vision_model.pos_emb_residual:
            table.normal_(std=0.02)
    return model


@pytest.fixture(scope="module")
def model_15k():
    return tiny_model(SCALES_15K)


@pytest.fixture(scope="module")
def model_4k():
    return tiny_model(SCALES_4K)


def image(size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, *size, generator=g)


# --- token counts ---------------------------------------------------------------------------------
@torch.no_grad()
def test_counts_15k(model_15k):
    x = image((1512, 1512))
    assert model_15k(x, num_look_close="all").last_hidden_state.shape[1] == 15309
    out = model_15k(x, num_token_look_close=3000)
    assert out.last_hidden_state.shape[1] == 3729
    assert [int(m.sum()) for m in out.selection_maps] == [600, 2400]
    low = model_15k(x, num_look_close=0)
    assert low.last_hidden_state.shape[1] == 729
    assert all(int(m.sum()) == 0 for m in low.selection_maps)


@torch.no_grad()
def test_counts_4k(model_4k):
    x = image((3780, 3780))
    assert model_4k(x, num_look_close=2).last_hidden_state.shape[1] == 5849
    out = model_4k(x, num_look_close="all", output_layers=[-1])
    assert out.last_hidden_state.shape[1] == 88209
    assert [int(m.sum()) for m in out.selection_maps] == [2916, 11664, 72900]


@torch.no_grad()
def test_counts_non_square(model_15k):
    x = image((1008, 1512))
    out = model_15k(x, num_look_close="all")
    assert out.last_hidden_state.shape[1] == 10449
    assert [tuple(m.shape[-2:]) for m in out.selection_maps] == [(36, 54), (72, 108)]
    assert [tuple(p.shape[-2:]) for p in out.selection_probs] == [(36, 54), (72, 108)]


def test_counts_without_forward():
    enc = PS3VisionModel(tiny_vision_config(SCALES_4K)).vision_model
    assert enc.config.budget_each_scale == [85, 341, 2134]
    assert enc.num_selected_patches((3780, 3780), num_look_close="all") == 87480
    assert enc.num_selected_patches((3780, 3780), num_look_close=100) == 87480  # clamped to 35 steps
    assert len(enc.plan((3780, 3780), num_look_close="all")) == 35
    assert enc.num_selected_patches((3780, 3780), num_token_look_close=3000) == 3000
    enc15 = PS3VisionModel(tiny_vision_config(SCALES_15K)).vision_model
    assert enc15.config.budget_each_scale == [512, 2048]
    assert len(enc15.plan((1512, 1512), num_look_close="all")) == 6


# --- parity with transformers' SigLIP -------------------------------------------------------------
def test_low_res_matches_transformers_siglip():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    model = tiny_model(SCALES_15K)
    cfg = model.config
    hf_cfg = SiglipVisionConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        image_size=378, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, attn_implementation="eager",
    )
    hf = SiglipVisionModel(hf_cfg).eval()
    ours = {k[len("vision_model."):]: v for k, v in model.state_dict().items() if ".trunk." in f".{k}"}
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in hf.state_dict()) else ""
    converted = ps3_to_siglip(ours, prefix=prefix)
    missing, unexpected = hf.load_state_dict(converted, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    # ...and back: the reverse mapping reproduces every trunk tensor.
    back = siglip_to_ps3(hf.state_dict())
    assert set(back) == set(ours)
    for key, value in back.items():
        torch.testing.assert_close(value, ours[key], rtol=0, atol=0)

    x = image((378, 378), seed=3)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True)
        low = model.vision_model.encode_low_res(x)
        pooled = model.vision_model.trunk.pool(low.hidden_states[-1])
    assert len(low.hidden_states) == len(ref.hidden_states) - 1
    for i, hidden in enumerate(low.hidden_states):
        assert_fp_close(hidden, ref.hidden_states[i + 1])
    assert_fp_close(pooled, ref.pooler_output)


# --- selection behaviour --------------------------------------------------------------------------
@torch.no_grad()
def test_steps_are_independent(model_15k):
    x = image((1512, 1512), seed=1)
    one = model_15k(x, num_look_close=1)
    two = model_15k(x, num_look_close=2)
    n1 = one.last_hidden_state.shape[1]
    first_maps = one.selection_maps
    assert n1 == 729 + 2560
    # low-res tokens never change with the selection
    for a, b in zip(one.hidden_states, two.hidden_states):
        torch.testing.assert_close(a[:, :729], b[:, :729], rtol=0, atol=0)
    # step-1 tokens are the same vectors whether 1 or 2 steps run (found via the feature maps)
    maps_one = model_15k.format_features_into_feature_maps(one.last_hidden_state, one.selection_maps)
    maps_two = model_15k.format_features_into_feature_maps(two.last_hidden_state, two.selection_maps)
    for m1, m2, sel in zip(maps_one[1:], maps_two[1:], first_maps):
        mask = sel[:, None].bool().expand_as(m1)
        assert_fp_close(m1[mask], m2[mask])
    # step 2 selects only new patches
    for sel1, sel2 in zip(one.selection_maps, two.selection_maps):
        assert torch.all(sel2 >= sel1) and sel2.max() == 1


def test_selected_columns_equal_nonzero():
    g = torch.Generator().manual_seed(0)
    maps = torch.zeros(3, 500)
    for row, n in enumerate((7, 40, 1)):
        maps[row, torch.randperm(500, generator=g)[:n]] = 1.0
    for row, n in enumerate((7, 40, 1)):
        got = selected_columns(maps[row : row + 1], n)[0]
        assert torch.equal(got, maps[row].nonzero()[:, 0])


@torch.no_grad()
def test_look_close_never_waits_for_the_device(model_4k):
    """Selection, patch gathering and the batched high-res pass run without a host sync (the counts come from
    the plan), so on a GPU the host queues the high-res blocks while the low-res pass still runs."""
    enc = model_4k.vision_model
    x = torch.cat([image((3780, 3780), seed=2), image((3780, 3780), seed=3)])
    low = enc.encode_low_res(x)
    with count_host_syncs(where=True) as syncs:
        out = enc.look_close(low, num_look_close=2, prompt=torch.randn(2, enc.width))
    assert syncs.total == 0, syncs.by_site
    assert out.last_hidden_state.shape[1] == 729 + 2 * 2560


@torch.no_grad()
def test_batched_equals_single(model_15k):
    x = torch.cat([image((1512, 1512), seed=4), image((1512, 1512), seed=5)])
    both = model_15k(x, num_token_look_close=3000)
    for i in range(2):
        single = model_15k(x[i : i + 1], num_token_look_close=3000)
        assert_fp_close(both.last_hidden_state[i : i + 1], single.last_hidden_state)
        for a, b in zip(both.selection_maps, single.selection_maps):
            assert torch.equal(a[i : i + 1], b)


@torch.no_grad()
def test_top_down_depends_on_prompt(model_15k):
    x = image((1512, 1512), seed=2)
    width = model_15k.config.hidden_size
    g = torch.Generator().manual_seed(7)
    prompts = torch.randn(2, width, generator=g)
    outs = [model_15k(x, num_look_close=1, prompt=prompts[i : i + 1]) for i in range(2)]
    bottom_up = model_15k(x, num_look_close=1)
    assert not torch.equal(outs[0].selection_maps[0], outs[1].selection_maps[0])
    assert not torch.equal(outs[0].selection_maps[0], bottom_up.selection_maps[0])
    # per-sample prompts in one batch give the same as each alone
    batch = model_15k(x.expand(2, -1, -1, -1), num_look_close=1, prompt=prompts)
    for i in range(2):
        assert torch.equal(batch.selection_maps[0][i], outs[i].selection_maps[0][0])


@torch.no_grad()
def test_gt_regions_selected_first(model_15k):
    x = image((1512, 1512), seed=6)
    gt = torch.zeros(1, 1512, 1512)
    gt[:, 0:420, 840:1512] = 1  # a box at the top right
    out = model_15k(x, num_token_look_close=600, gt_selection_maps=gt)
    for sel, prob in zip(out.selection_maps, out.selection_probs):
        h, w = sel.shape[-2:]
        box = torch.zeros(h, w, dtype=torch.bool)
        box[: round(h * 420 / 1512), round(w * 840 / 1512) :] = True
        n_box, n_sel = int(box.sum()), int(sel.sum())
        inside = int(sel[0][box].sum())
        assert inside == min(n_box, n_sel)  # box patches first, before any other
        assert torch.all(prob[0][box] == 1)


@torch.no_grad()
def test_group_selection_takes_whole_groups():
    model = tiny_model(SCALES_4K)
    x = image((3780, 3780), seed=8)
    enc = model.vision_model
    for steps in (2, 4, 6):
        out = model(x, num_look_close=steps, selection_group_size=2, output_layers=[-2])
        n = out.last_hidden_state.shape[1] - 729
        assert n == enc.num_selected_patches((3780, 3780), num_look_close=steps, selection_group_size=2)
        assert n == steps * 2560
        for sel in out.selection_maps:
            pooled = torch.nn.functional.avg_pool2d(sel[:, None], 2)
            assert torch.all((pooled == 0) | (pooled == 1))  # every group is all-or-nothing


@torch.no_grad()
def test_smoothing_and_first_n_scale(model_4k):
    x = image((3780, 3780), seed=9)
    out = model_4k(x, num_look_close=1, smooth_selection_prob=True, only_select_first_n_scale=1)
    counts = [int(m.sum()) for m in out.selection_maps]
    assert sum(counts) == 2560 and counts[1:] == [1, 1] and counts[0] == 2558
    prob = out.selection_probs[2][0]
    assert len(torch.unique(prob)) <= 36  # 6x6 smoothed map


@torch.no_grad()
def test_output_layers_and_feature_maps(model_15k):
    x = image((1512, 1512), seed=10)
    full = model_15k(x, num_look_close=2)
    part = model_15k(x, num_look_close=2, output_layers=[-2])
    assert len(full.hidden_states) == model_15k.config.num_hidden_layers
    assert_fp_close(part.hidden_states[0], full.hidden_states[-2])
    maps = model_15k.format_features_into_feature_maps(full.last_hidden_state, full.selection_maps)
    assert [tuple(m.shape[-2:]) for m in maps] == [(27, 27), (54, 54), (108, 108)]
    assert torch.all(maps[1][:, :, full.selection_maps[0][0] == 0] == 0)


def test_pooled_pretraining_path_has_gradients(model_15k):
    model = tiny_model(SCALES_15K, seed=1)
    x = image((1512, 1512), seed=11)
    gt = torch.zeros(1, 1512, 1512)
    gt[:, 100:400, 100:400] = 1
    prompt = torch.randn(1, model.config.hidden_size, requires_grad=True)
    out = model(x, prompt=prompt, gt_selection_maps=gt, pool_gt_token_only=True, output_hidden_states=False,
                is_global_text=torch.tensor([False]))
    assert out.pooled_output.shape == (1, model.config.hidden_size)
    loss = out.pooled_output.square().sum() + sum(p.sum() for p in out.topdown_selection_probs)
    loss.backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert model.vision_model.trunk.blocks[0].attn.qkv.weight.grad is not None


# --- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, pixels, match",
    [
        (dict(num_look_close=1), torch.randn(1, 4, 378, 378), "channels"),
        (dict(num_look_close=1), torch.randn(3, 378, 378), "pixel_values"),
        (dict(num_look_close=1, prompt=torch.randn(1, 7)), None, "prompt"),
        (dict(num_look_close=1, num_token_look_close=100), None, "num_look_close"),
        (dict(), None, "num_look_close"),
        (dict(num_look_close=-1), None, "num_look_close"),
        (dict(num_look_close=1.5), None, "num_look_close"),
        (dict(num_token_look_close=-5), None, "num_token_look_close"),
        (dict(num_look_close=1, gt_selection_maps=torch.ones(1, 1, 8, 8)), None, "gt_selection_maps"),
        (dict(num_look_close=1, only_select_first_n_scale=5), None, "only_select_first_n_scale"),
        (dict(num_look_close=1, output_layers=[99]), None, "output_layers"),
    ],
)
def test_bad_input_raises(model_15k, kwargs, pixels, match):
    x = pixels if pixels is not None else torch.randn(1, 3, 378, 378)
    with pytest.raises(ValueError, match=match):
        model_15k(x, **kwargs)


def test_config_validation():
    with pytest.raises(ValueError, match="num_attention_heads"):
        PS3VisionConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="multiple"):
        PS3VisionConfig(ps3_scales=[378, 700])
    cfg = PS3VisionConfig(model_name="vit_so400m_patch14_siglip_378", s3_scales=[378, 756, 1512, 3780])
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (1152, 27, 4304)
    assert cfg.ps3_scales == SCALES_4K and cfg.image_size == 3780


@torch.no_grad()
def test_position_cache_follows_weight_updates():
    model = tiny_model(SCALES_15K, seed=3)
    x = image((1512, 1512), seed=12)
    before = model(x, num_look_close=1).last_hidden_state
    again = model(x, num_look_close=1).last_hidden_state  # served from the cache
    torch.testing.assert_close(before, again, rtol=0, atol=0)
    model.vision_model.pos_emb_residual[0].add_(1.0)  # an in-place update (as an optimizer step does)
    after = model(x, num_look_close=1).last_hidden_state
    assert not torch.allclose(before[:, 729:], after[:, 729:])
    fresh = tiny_model(SCALES_15K, seed=3)
    fresh.load_state_dict(model.state_dict())
    assert_fp_close(fresh(x, num_look_close=1).last_hidden_state, after)


# --- inference kernels ----------------------------------------------------------------------------
@torch.no_grad()
def test_merged_prefix_attention_equals_concatenation():
    """The log-sum-exp merge (no per-sequence copy of the low-res K/V) gives the concatenated attention,
    for a prefix shared by all steps of one image and for a batch of images with their own prefixes."""
    model = tiny_model(SCALES_15K, seed=8)
    enc = model.vision_model
    x = torch.cat([image((1512, 1512), seed=21), image((1512, 1512), seed=22)])
    prompts = torch.randn(2, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    outs = {}
    for mode in ("concat", "merge"):
        enc.set_prefix_attention(mode)
        assert all(blk.attn.prefix_mode == mode for blk in enc.trunk.blocks)
        outs[mode] = [model(x[:1], num_look_close=3), model(x, num_token_look_close=3000, prompt=prompts)]
    enc.set_prefix_attention("auto")
    for merged, joined in zip(outs["merge"], outs["concat"]):
        for a, b in zip(merged.selection_maps, joined.selection_maps):
            assert torch.equal(a, b)
        assert_fp_close(merged.last_hidden_state, joined.last_hidden_state)
    with pytest.raises(ValueError, match="prefix_attention"):
        enc.set_prefix_attention("fast")


def test_merge_mode_falls_back_to_concatenation_for_gradients():
    from vila_hd.ps3.layers import Attention

    torch.manual_seed(0)
    attn = Attention(16, 2, "merge")
    x = torch.randn(3, 5, 16, requires_grad=True)
    prefix = (torch.randn(1, 4, 16), torch.randn(1, 4, 16))
    out, _ = attn(x, prefix)
    out.square().sum().backward()  # the merge has no backward: this runs the concatenated path
    assert x.grad is not None and attn.qkv.weight.grad is not None
    attn.prefix_mode = "concat"
    with torch.no_grad():
        assert_fp_close(attn(x, prefix)[0], out.detach())
    with pytest.raises(ValueError, match="prefix_mode"):
        Attention(16, 2, "fastest")
