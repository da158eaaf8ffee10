"""Token layout: the reference's per-image token counts with the real scales, one function shared by the
processor and the model, agreement with the PS3 encoder's own plan."""

from __future__ import annotations

import pytest
import torch

from vila_hd.model.configuration import VilaHDConfig
from vila_hd.model.presets import preset_config
from vila_hd.model.token_layout import (
    TokenLayoutSpec,
    highres_grid_sizes,
    image_token_layout,
    num_image_tokens,
)
from vila_hd.ps3 import PS3VisionModel
from vila_hd.ps3.configuration import tiny_vision_config

SCALES_15K = [378, 756, 1512]
SCALES_4K = [378, 756, 1512, 3780]


@pytest.fixture(scope="module")
def spec_4k() -> TokenLayoutSpec:
    return TokenLayoutSpec.from_config(preset_config("VILA-HD-8B-4K"))


@pytest.fixture(scope="module")
def spec_15k() -> TokenLayoutSpec:
    return TokenLayoutSpec.from_config(preset_config("VILA-HD-8B-1.5K"))


# --- the reference's numbers (paper tables): 196 + selected / 4 ---------------------------------------
def test_15k_all_patches(spec_15k):
    layout = image_token_layout(spec_15k, num_look_close="all")
    assert layout.num_low_res_tokens == 196
    assert layout.num_selected_patches == 14580
    assert layout.num_tokens == 3841
    # "all" is also what the 6 released steps reach at 1.5K.
    assert num_image_tokens(spec_15k, num_look_close=6) == 3841


@pytest.mark.parametrize(
    "steps, patches, tokens", [(2, 5120, 1476), (4, 10240, 2756), (6, 15360, 4036), (12, 30720, 7876)]
)
def test_4k_steps(spec_4k, steps, patches, tokens):
    layout = image_token_layout(spec_4k, num_look_close=steps)
    assert layout.num_selected_patches == patches
    assert layout.num_tokens == tokens == 196 + patches // 4


def test_4k_token_budget_and_defaults(spec_4k):
    assert num_image_tokens(spec_4k, num_token_look_close=10240) == 2756
    assert num_image_tokens(spec_4k) == 4036  # preset default: 6 steps (18%)
    assert num_image_tokens(spec_4k, num_look_close=0) == 196
    assert num_image_tokens(spec_4k, num_look_close="all") == 196 + 87480 // 4


def test_layout_per_scale_and_merged_grids(spec_4k):
    layout = image_token_layout(spec_4k, num_look_close=2)
    assert layout.high_res_grids == ((54, 54), (108, 108), (270, 270))
    assert layout.merged_grids == ((27, 27), (54, 54), (135, 135))
    assert sum(layout.selected_patches) == 5120
    assert layout.high_res_tokens == tuple(n // 4 for n in layout.selected_patches)
    assert all(n % 4 == 0 for n in layout.selected_patches)


def test_other_projectors():
    vision = tiny_vision_config(SCALES_15K)
    three = TokenLayoutSpec.from_config(
        VilaHDConfig(vision_config=vision, projector_type="mlp_downsample_3x3", num_look_close="all")
    )
    assert num_image_tokens(three) == 81 + 14580 // 9
    linear = TokenLayoutSpec.from_config(VilaHDConfig(vision_config=vision, projector_type="linear", num_look_close=1))
    assert num_image_tokens(linear) == 729 + 2560


def test_spec_roundtrip(spec_4k):
    assert TokenLayoutSpec.from_dict(spec_4k.to_dict()) == spec_4k


# --- one arithmetic: the PS3 encoder selects exactly what the layout counts -------------------------
@pytest.fixture(scope="module")
def encoder_4k():
    return PS3VisionModel(tiny_vision_config(SCALES_4K)).vision_model


@pytest.mark.parametrize("hw", [(3780, 3780), (2160, 3840), (3840, 2160), (1000, 3000), (378, 378)])
def test_grids_match_encoder(encoder_4k, hw):
    assert highres_grid_sizes(SCALES_4K, 14, hw) == encoder_4k.highres_grids(hw)


@pytest.mark.parametrize(
    "look_close",
    [
        dict(num_look_close=2),
        dict(num_look_close=7),
        dict(num_look_close="all"),
        dict(num_token_look_close=5000),
        dict(num_look_close=3, only_select_first_n_scale=2),
    ],
)
@pytest.mark.parametrize("hw", [(3780, 3780), (2160, 3840)])
def test_counts_match_encoder_plan(encoder_4k, spec_4k, look_close, hw):
    layout = image_token_layout(spec_4k, hw, **look_close)
    assert layout.num_selected_patches == encoder_4k.num_selected_patches(hw, selection_group_size=2, **look_close)
    plan = encoder_4k.plan(hw, selection_group_size=2, **look_close)
    assert list(layout.selected_patches) == [sum(step[i] for step in plan) for i in range(3)]


def test_selected_patches_form_complete_groups():
    """With the group selection of PS3 every selected patch lies in a complete 2x2 group."""
    torch.manual_seed(0)
    model = PS3VisionModel(
        tiny_vision_config([112, 224, 448], max_select_num=128, highres_selection_image_size=448)
    ).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 448, 448), num_look_close=3, output_layers=[-2], selection_group_size=2)
    for m in out.selection_maps:
        groups = m.unflatten(1, (-1, 2)).unflatten(3, (-1, 2)).sum((2, 4))
        assert set(groups.unique().tolist()) <= {0.0, 4.0}


def test_presets():
    import vila_hd

    assert {"VilaHDConfig", "VilaHDForConditionalGeneration", "VilaHDProcessor"} <= set(vila_hd.__all__)
    assert vila_hd.VilaHDConfig is VilaHDConfig
    for name, scales in [("VILA-HD-8B-1.5K", SCALES_15K), ("nvidia/VILA-HD-8B-PS3-4K-SigLIP2", SCALES_4K)]:
        config = preset_config(name)
        text = config.text_config
        assert (text.model_type, text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (
            "qwen2",
            3584,
            28,
            28,
        )
        assert (text.num_key_value_heads, text.intermediate_size, text.vocab_size) == (4, 18944, 152064)
        assert text.max_position_embeddings == 32768
        rope = getattr(text, "rope_parameters", None) or {}
        assert (getattr(text, "rope_theta", None) or rope.get("rope_theta")) == 1e6
        assert config.vision_config.ps3_scales == scales and config.vision_config.hidden_size == 1152
        assert config.vision_config.model_name == "vit_so400m_patch14_siglip_378"  # SigLIP2
        assert (config.projector_type, config.prompt_head_type, config.vision_feature_layer) == (
            "mlp_downsample_2x2",
            "mlp",
            -2,
        )
    tiny = preset_config("tiny")
    assert tiny.vision_config.ps3_scales == [112, 224, 448] and tiny.text_config.hidden_size == 64
    with pytest.raises(ValueError, match="unknown VILA-HD preset"):
        preset_config("VILA-HD-70B")
