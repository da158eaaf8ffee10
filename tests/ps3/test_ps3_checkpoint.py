"""Official PS3 checkpoint layout: config.json + model.safetensors with the reference's key names."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from vila_hd.ps3 import PS3ImageProcessor, PS3Model, PS3TextModel, PS3VisionModel, preset_config
from vila_hd.ps3.modeling import count_parameters

DEPTH, TEXT_DEPTH, CONVNEXT_DEPTH = 2, 2, 1

# What the reference's `config.json` holds (field names as written by ps3-torch), tiny widths added
# as explicit sizes.
OFFICIAL_CONFIG = {
    "architectures": ["PS3Model"],
    "model_type": "ps3",
    "vision_config": {
        "model_type": "ps3_vision_model", "model_name": "vit_so400m_patch14_siglip_378", "hidden_size": 32,
        "num_hidden_layers": DEPTH, "num_attention_heads": 4, "intermediate_size": 64, "pool": "map",
        "drop_path": None, "patch_drop": None, "pretrained": False, "dynamic_img_size": True,
        "ps3_scales": [378, 756, 1512], "select_based_on_layer": [0, 1], "max_select_num": 2560,
        "max_select_num_each_scale": None, "separate_pos_emb": True, "highres_selection_feature": True,
        "highres_selection_module_hidden_dim": 16, "highres_selection_module_out_dim": 16,
        "highres_selection_module_depth": CONVNEXT_DEPTH, "highres_selection_module_kernel_size": 28,
        "radio": False, "img_size": None, "drop": 0.0, "class_token": None, "final_norm": False,
        "vision_tower_name": "vit_so400m_patch14_siglip_378", "image_size": 1512, "patch_size": 14,
    },
    "text_config": {
        "model_type": "ps3_text_model", "output_dim": 32, "prompt_proj_dim": 32, "context_length": 16,
        "vocab_size": 100, "hf_tokenizer_name": "timm/ViT-SO400M-14-SigLIP2-378",
        "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 32, "heads": 4, "layers": TEXT_DEPTH,
        "mlp_ratio": 2.0, "ls_init_value": None, "embed_cls": False, "pad_id": 0, "no_causal_mask": True,
        "final_ln_after_pool": False, "pool_type": "last", "proj_bias": True, "output_tokens": False,
        "act_kwargs": {"approximate": "tanh"}, "norm_kwargs": {"eps": 1e-6},
    },
}


def official_keys() -> set[str]:
    """The key names of §9 of the reference spec, written out independently of our modules."""
    keys = {"vision_model.trunk.pos_embed", "vision_model.prior_prompt", "vision_model.trunk.attn_pool.latent",
            "vision_model.pos_emb_residual.0", "vision_model.pos_emb_residual.1",
            "text_model.positional_embedding"}
    wb = lambda names: {f"{n}.{s}" for n in names for s in ("weight", "bias")}  # noqa: E731
    keys |= wb(["vision_model.trunk.patch_embed.proj", "vision_model.trunk.norm"])
    keys |= wb([f"vision_model.trunk.attn_pool.{n}" for n in ("q", "kv", "proj", "norm", "mlp.fc1", "mlp.fc2")])
    for i in range(DEPTH):
        keys |= wb([f"vision_model.trunk.blocks.{i}.{n}" for n in
                    ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")])
    keys |= wb([f"vision_model.selection_feature_proj.{n}" for n in ("fc1", "norm", "fc2")])
    hs = "vision_model.highres_selection_feature_module"
    keys |= wb([f"{hs}.stem.0", f"{hs}.stem.1", f"{hs}.out_proj", "vision_model.prompt_proj_for_highres"])
    for i in range(CONVNEXT_DEPTH):
        keys |= wb([f"{hs}.blocks.{i}.{n}" for n in ("conv_dw", "norm", "mlp.fc1", "mlp.fc2")])
        keys.add(f"{hs}.blocks.{i}.weight")
    keys |= {"text_model.token_embedding.weight"}
    for i in range(TEXT_DEPTH):
        block = f"text_model.transformer.resblocks.{i}"
        keys |= {f"{block}.attn.in_proj_weight", f"{block}.attn.in_proj_bias"}
        keys |= wb([f"{block}.{n}" for n in ("ln_1", "attn.out_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")])
    keys |= wb(["text_model.ln_final", "text_model.text_projection"])
    keys |= wb([f"text_model.prompt_proj.{n}" for n in ("fc1", "norm", "fc2")])
    return keys


@pytest.fixture()
def official_dir(tmp_path):
    """A checkpoint directory exactly as the reference ships it, with random tensors."""
    reference_shapes = {k: v.shape for k, v in PS3Model(_config()).state_dict().items()}
    assert set(reference_shapes) == official_keys()
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(shape, generator=g) * 0.05 for k, shape in reference_shapes.items()}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_size": [1512, 1512], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
         "resize_mode": "squash"}))
    return tmp_path, tensors


def _config():
    from vila_hd.ps3 import PS3Config

    return PS3Config(**{k: v for k, v in OFFICIAL_CONFIG.items() if k.endswith("_config")})


def test_state_dict_uses_official_key_names():
    assert set(PS3Model(_config()).state_dict()) == official_keys()


def test_official_checkpoint_loads_without_conversion(official_dir):
    path, tensors = official_dir
    for cls, prefix in ((PS3Model, ""), (PS3VisionModel, "vision_model."), (PS3TextModel, "text_model.")):
        model, info = cls.from_pretrained(path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        state = model.state_dict()
        for key, value in tensors.items():
            if key.startswith(prefix):
                torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    assert PS3VisionModel.from_pretrained(path).config.ps3_scales == [378, 756, 1512]


def test_round_trip_through_save_pretrained(official_dir, tmp_path_factory):
    path, tensors = official_dir
    out = tmp_path_factory.mktemp("saved")
    PS3Model.from_pretrained(path).save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "ps3" and saved["vision_config"]["ps3_scales"] == [378, 756, 1512]
    reloaded = PS3Model.from_pretrained(out).state_dict()
    assert set(reloaded) == set(tensors)
    for key, value in tensors.items():
        torch.testing.assert_close(reloaded[key], value, rtol=0, atol=0)
    # The vision tower alone also round-trips.
    vision_dir = tmp_path_factory.mktemp("vision")
    PS3VisionModel.from_pretrained(path).save_pretrained(vision_dir)
    assert json.loads((vision_dir / "config.json").read_text())["model_type"] == "ps3_vision_model"
    again, info = PS3VisionModel.from_pretrained(vision_dir, output_loading_info=True)
    assert not any(info.values())


def test_image_processor_from_official_dir(official_dir):
    path, _ = official_dir
    processor = PS3ImageProcessor.from_pretrained(path)
    assert processor.image_size == [1512, 1512]
    import numpy as np

    array = np.zeros((300, 500, 3), dtype=np.uint8)
    array[..., 0] = 255
    pixels = processor(array)["pixel_values"]
    assert pixels.shape == (1, 3, 1512, 1512)
    x = processor(array)["pixel_values"][0].unsqueeze(0)  # the reference README's idiom
    assert x.shape == (1, 3, 1512, 1512)
    torch.testing.assert_close(pixels[0, 0], torch.ones(1512, 1512))  # red channel: (1 - 0.5) / 0.5
    torch.testing.assert_close(pixels[0, 1], -torch.ones(1512, 1512))


def test_presets_have_released_sizes():
    cfg = preset_config("nvidia/PS3-4K-SigLIP2")
    vision = cfg.vision_config
    assert vision.ps3_scales == [378, 756, 1512, 3780] and vision.max_select_num == 2560
    assert vision.budget_each_scale == [85, 341, 2134]
    assert cfg.text_config.vocab_size == 256000 and cfg.text_config.act_kwargs == {"approximate": "tanh"}
    assert preset_config("PS3-1.5K-SigLIP").text_config.vocab_size == 32000
    with pytest.raises(ValueError, match="unknown PS3 preset"):
        preset_config("PS3-8K")


def test_real_size_parameter_counts():
    """Reference sizes (§9): trunk 428M; extras 58M (1.5K) / 148M (4K). Built on the meta device."""
    with torch.device("meta"):
        for name, extras in (("PS3-1.5K-SigLIP2", 58e6), ("PS3-4K-SigLIP2", 148e6)):
            enc = PS3VisionModel(preset_config(name).vision_config).vision_model
            trunk = count_parameters(enc.trunk)
            assert abs(trunk - 428e6) / 428e6 < 0.01, trunk
            assert abs(count_parameters(enc) - trunk - extras) / extras < 0.03, count_parameters(enc) - trunk
