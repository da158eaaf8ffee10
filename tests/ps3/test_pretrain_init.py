"""SigLIP (transformers) -> PS3 initialisation, PS3 checkpoint init, and export in the official layout."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from tolerances import assert_fp_close
from train_helpers import one_thread  # noqa: F401 (fixture)

from vila_hd.ps3 import PS3Model, PS3TextModel, PS3VisionModel
from vila_hd.train.pretrain.init import export_ps3, init_from_ps3, init_from_siglip, load_safetensors_dir
from vila_hd.train.pretrain.model import PS3ForPretraining
from vila_hd.train.pretrain.synthetic import tiny_ps3_config

TEXT_VOCAB, TEXT_CONTEXT = 40, 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared 2-core machine


def _siglip_config(layers: int = 4):
    from transformers import SiglipConfig, SiglipTextConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                image_size=112, patch_size=14, layer_norm_eps=1e-6)
    text = SiglipTextConfig(vocab_size=TEXT_VOCAB, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=TEXT_CONTEXT, projection_size=32,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """A SiglipModel checkpoint written by transformers itself, with every tensor perturbed."""
    from transformers import SiglipModel

    torch.manual_seed(0)
    model = SiglipModel(_siglip_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.logit_scale.fill_(math.log(12.0))
        model.logit_bias.fill_(-7.0)
    path = tmp_path_factory.mktemp("siglip")
    model.save_pretrained(path)
    return path


def test_siglip_checkpoint_initialises_ps3_with_equal_features(siglip_dir):
    from transformers import SiglipTextModel, SiglipVisionModel

    model = init_from_siglip(siglip_dir, tiny_ps3_config()).eval()
    assert model.config.vision_config.hidden_act == "gelu_pytorch_tanh"
    assert model.config.text_config.act_kwargs == {"approximate": "tanh"}
    torch.testing.assert_close(model.logit_scale.exp(), torch.tensor([12.0]))
    torch.testing.assert_close(model.logit_bias, torch.tensor([-7.0]))

    vision = SiglipVisionModel.from_pretrained(siglip_dir, attn_implementation="eager").eval()
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = vision(pixel_values=x, output_hidden_states=True)
        low = model.vision_model.encode_low_res(x)
        pooled = model.vision_model.trunk.pool(low.hidden_states[-1])
    assert len(low.hidden_states) == len(ref.hidden_states) - 1
    for ours, theirs in zip(low.hidden_states, ref.hidden_states[1:]):
        assert_fp_close(ours, theirs)
    assert_fp_close(pooled, ref.pooler_output)

    # The text tower: same pooled (last-position) embedding as transformers' SigLIP text model.
    text = SiglipTextModel.from_pretrained(siglip_dir, attn_implementation="eager").eval()
    ids = torch.randint(3, TEXT_VOCAB, (3, TEXT_CONTEXT), generator=torch.Generator().manual_seed(2))
    ids[0, 4:] = 0  # padded as the SigLIP tokenizer pads (max_length), attended without a mask
    with torch.no_grad():
        assert_fp_close(model.text_model(ids).pooled_output, text(input_ids=ids).pooler_output)


def test_siglip_mismatch_and_unsupported_checkpoints_are_refused(siglip_dir, tmp_path):
    cfg = tiny_ps3_config()
    cfg.vision_config.num_hidden_layers = 2
    cfg.vision_config.select_based_on_layer = [0, 1]
    with pytest.raises(ValueError, match="num_hidden_layers: PS3 2 vs SigLIP 4"):
        init_from_siglip(siglip_dir, cfg)
    raw = json.loads((siglip_dir / "config.json").read_text())
    bad = tmp_path / "naflex"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**raw, "model_type": "siglip2"}))
    with pytest.raises(ValueError, match="NaFlex"):
        init_from_siglip(bad, tiny_ps3_config())
    (bad / "config.json").write_text(json.dumps({"model_type": "ps3"}))
    (bad / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        init_from_ps3(bad)


def test_export_load_round_trip_keeps_every_tensor(siglip_dir, tmp_path):
    torch.manual_seed(3)
    model = init_from_siglip(siglip_dir, tiny_ps3_config())
    with torch.no_grad():  # make the zero / constant-initialised tensors distinguishable
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = export_ps3(model, tmp_path / "export")
    expected = model.state_dict()
    stored = load_safetensors_dir(out)
    assert set(stored) == set(expected)
    for key, value in expected.items():
        assert torch.equal(stored[key].reshape(value.shape), value), key
    assert stored["logit_scale"].shape == stored["logit_bias"].shape == ()  # scalars, as the reference saves them
    # The reference's key names (§9), and its top-level contrastive scalars.
    for key in ("vision_model.trunk.blocks.0.attn.qkv.weight", "vision_model.trunk.attn_pool.kv.weight",
                "vision_model.highres_selection_feature_module.blocks.0.weight", "vision_model.pos_emb_residual.1",
                "text_model.transformer.resblocks.1.attn.in_proj_weight", "text_model.text_projection.bias",
                "text_model.prompt_proj.fc2.weight", "logit_scale", "logit_bias"):
        assert key in stored
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "ps3" and config["architectures"] == ["PS3Model"]
    assert config["vision_config"]["hidden_act"] == "gelu_pytorch_tanh"
    assert json.loads((out / "preprocessor_config.json").read_text())["image_size"] == [448, 448]

    # Our from_pretrained loads it strictly, tower by tower.
    for cls, prefix in ((PS3Model, ""), (PS3VisionModel, "vision_model."), (PS3TextModel, "text_model.")):
        loaded, info = cls.from_pretrained(out, output_loading_info=True)
        assert not any(info.values()), (cls.__name__, info)
        state = loaded.state_dict()
        for key, value in expected.items():
            if key.startswith(prefix) and key not in ("logit_scale", "logit_bias"):
                assert torch.equal(state[key], value), key
    # ...and so does pre-training init, logit scalars included.
    again = init_from_ps3(out)
    for key, value in again.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert again.config.vision_config.hidden_act == "gelu_pytorch_tanh"
    with pytest.raises(FileExistsError):
        export_ps3(model, out)
    export_ps3(again, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary directories left


def test_export_refuses_a_foreign_state_dict(tmp_path):
    model = PS3ForPretraining(tiny_ps3_config())
    state = model.state_dict()
    state.pop("logit_bias")
    with pytest.raises(ValueError, match="missing \\['logit_bias'\\]"):
        export_ps3(model, tmp_path / "x", state_dict=state)
    assert not (tmp_path / "x").exists()


def test_explicit_activation_overrides_the_checkpoints(siglip_dir):
    model = init_from_siglip(siglip_dir, tiny_ps3_config(), hidden_act="gelu", text_act_kwargs={})
    assert model.config.vision_config.hidden_act == "gelu" and model.config.text_config.act_kwargs == {}
    assert isinstance(model.vision_model.trunk.blocks[0].mlp.act, torch.nn.GELU)
    assert model.vision_model.trunk.blocks[0].mlp.act.approximate == "none"
