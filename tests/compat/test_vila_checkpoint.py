"""VILA checkpoint layout (llm/, vision_tower/, mm_projector/): load, convert both ways, round-trip with
identical outputs; errors that name missing or mis-shaped tensors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vila_hd.compat.convert import main as convert_main
from vila_hd.compat.convert import shard_size
from vila_hd.hub import CheckpointError
from vila_hd.model import VilaHDForConditionalGeneration
from vila_hd.model.vila_layout import is_vila_checkpoint, read_vila_config
from vila_hd.processing import VilaHDProcessor
from vila_hd.templates import write_chat_template


def rgb(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (15, 20, 3), dtype=np.uint8)).resize((320, 240))


TINY_SEED = 3  # the seed of conftest's `tiny` fixture here


def write_vila_layout(model, processor, root, legacy_scales: bool = True) -> None:
    """Write a VILA checkpoint by hand, with the keys and config fields of the reference (§6)."""
    llm_dir, vision_dir, proj_dir = (os.path.join(root, d) for d in ("llm", "vision_tower", "mm_projector"))
    model.language_model.save_pretrained(llm_dir)
    processor.tokenizer.save_pretrained(llm_dir)
    write_chat_template(llm_dir, processor.chat_template)
    model.vision_tower.save_pretrained(vision_dir)
    processor.image_processor.save_pretrained(vision_dir)
    vision_cfg = json.load(open(os.path.join(vision_dir, "config.json")))
    if legacy_scales:  # VILA still writes the pre-June-2025 name
        vision_cfg["s3_scales"] = vision_cfg.pop("ps3_scales")
        json.dump(vision_cfg, open(os.path.join(vision_dir, "config.json"), "w"))
    os.makedirs(proj_dir)
    p = model.mm_projector
    head = p.top_down_prompt_head
    tensors = {
        "layers.1.weight": p.layers[1].weight,
        "layers.1.bias": p.layers[1].bias,
        "layers.2.weight": p.layers[2].weight,
        "layers.2.bias": p.layers[2].bias,
        "layers.4.weight": p.layers[4].weight,
        "layers.4.bias": p.layers[4].bias,
        "top_down_prompt_head.fc1.weight": head.fc1.weight,
        "top_down_prompt_head.fc1.bias": head.fc1.bias,
        "top_down_prompt_head.norm.weight": head.norm.weight,
        "top_down_prompt_head.norm.bias": head.norm.bias,
        "top_down_prompt_head.fc2.weight": head.fc2.weight,
        "top_down_prompt_head.fc2.bias": head.fc2.bias,
    }
    save_file(
        {k: v.detach().clone().contiguous() for k, v in tensors.items()}, os.path.join(proj_dir, "model.safetensors")
    )
    projector_cfg = {
        "architectures": ["MultimodalProjector"],
        "model_type": "v2l_projector",
        "mm_projector_type": "mlp_downsample_2x2_fix",
    }
    json.dump(projector_cfg, open(os.path.join(proj_dir, "config.json"), "w"))
    text = model.language_model.config
    top = {
        "architectures": ["LlavaTopDownLlamaModel"],
        "model_type": "llava_topdown_llama",
        "llm_cfg": text.to_dict(),
        "vision_tower_cfg": vision_cfg,
        "mm_projector_cfg": projector_cfg,
        "hidden_size": text.hidden_size,
        "mm_hidden_size": vision_cfg["hidden_size"],
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "cls_patch",
        "ps3": True,
        "look_close_mode": "after_prompt",
        "num_look_close": 2,
        "num_token_look_close": None,
        "top_down_prompt_head_type": "mlp",
        "high_res_pos_embed": False,
        "mm_low_res_token_num": 64,
        "mm_scale_num": 3,
        "model_dtype": "torch.float32",
    }
    json.dump(top, open(os.path.join(root, "config.json"), "w"), default=str)


@pytest.fixture(scope="module")
def vila_dir(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("vila")
    write_vila_layout(*tiny, root)
    return root


def logits(model, processor, seed=0):
    text = processor.apply_chat_template([{"role": "user", "content": "<image>What color is the car?"}])
    inputs = processor(text=text, images=[rgb(seed)])
    with torch.no_grad():
        return model(**inputs).logits


def test_vila_layout_loads_with_identical_outputs(tiny, vila_dir):
    model, processor = tiny
    assert is_vila_checkpoint(vila_dir)
    config = read_vila_config(vila_dir)
    assert config.vision_config.ps3_scales == [112, 224, 448]  # read from s3_scales
    assert config.projector_type == "mlp_downsample_2x2" and config.prompt_head_type == "mlp"
    loaded = VilaHDForConditionalGeneration.from_pretrained(vila_dir)
    loaded_processor = VilaHDProcessor.from_pretrained(vila_dir)
    assert loaded_processor.chat_template == processor.chat_template
    torch.testing.assert_close(logits(loaded, loaded_processor), logits(model, processor), rtol=0, atol=0)
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id


@pytest.mark.parametrize(("device_map", "llm_map", "vision_map"), [
    ("cpu", {"": "cpu"}, {"": "cpu"}),  # created empty and filled on the device: no CPU copy first
    ("auto", "auto", {"": "cpu"}),  # the LLM spread by accelerate, vision next to its input embeddings
    ({"": "cpu"}, None, None),  # names of the combined model: loaded, then dispatched
])
def test_vila_layout_loads_onto_the_requested_device(tiny, vila_dir, monkeypatch, device_map, llm_map, vision_map):
    from transformers import AutoModelForCausalLM

    from vila_hd.ps3 import PS3VisionModel

    seen = {}
    for name, cls in (("llm", AutoModelForCausalLM), ("vision", PS3VisionModel)):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _name=name, _original=original, **kwargs):
            seen[_name] = kwargs.get("device_map")
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    model, processor = tiny
    loaded = VilaHDForConditionalGeneration.from_pretrained(vila_dir, device_map=device_map)
    assert seen == {"llm": llm_map, "vision": vision_map}
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    torch.testing.assert_close(logits(loaded, processor), logits(model, processor), rtol=0, atol=0)


def test_convert_roundtrip(tiny, vila_dir, tmp_path):
    model, processor = tiny
    reference = logits(model, processor)
    hf_dir, vila_again, hf_again = tmp_path / "hf", tmp_path / "vila", tmp_path / "hf2"
    assert convert_main(["--to", "hf", str(vila_dir), str(hf_dir)]) == 0
    assert json.load(open(hf_dir / "config.json"))["model_type"] == "vila_hd"
    assert convert_main(["--to", "vila", str(hf_dir), str(vila_again)]) == 0
    assert convert_main(["--to", "hf", str(vila_again), str(hf_again)]) == 0
    for path in (hf_dir, vila_again, hf_again):
        m = VilaHDForConditionalGeneration.from_pretrained(path)
        p = VilaHDProcessor.from_pretrained(path)
        torch.testing.assert_close(logits(m, p), reference, rtol=0, atol=0)
    # The exported VILA checkpoint holds the reference's keys and fields.
    original = load_file(vila_dir / "mm_projector" / "model.safetensors")
    exported = load_file(vila_again / "mm_projector" / "model.safetensors")
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    top = json.load(open(vila_again / "config.json"))
    for key in (
        "llm_cfg",
        "vision_tower_cfg",
        "mm_projector_cfg",
        "mm_hidden_size",
        "ps3",
        "look_close_mode",
        "num_look_close",
        "top_down_prompt_head_type",
        "mm_low_res_token_num",
        "mm_scale_num",
    ):
        assert key in top, key
    assert top["model_type"] == "llava_topdown_llama" and top["mm_vision_select_layer"] == -2
    assert os.path.exists(vila_again / "llm" / "chat_template.jinja")
    assert "chat_template" in json.load(open(vila_again / "llm" / "tokenizer_config.json"))
    assert json.load(open(vila_again / "vision_tower" / "config.json"))["model_type"] == "ps3_vision_model"


def test_convert_refuses_non_empty_destination(vila_dir, tmp_path, capsys):
    (tmp_path / "x").write_text("occupied")
    from vila_hd.cli import main as vila_hd_main

    assert vila_hd_main(["convert", "--to", "hf", str(vila_dir), str(tmp_path)]) == 1  # one line, exit 1
    err = capsys.readouterr().err
    assert err.startswith("vila-hd: error: ") and "not empty" in err and "Traceback" not in err


@pytest.mark.parametrize("value, size", [("5GB", 5 * 10**9), ("100KB", 100_000), ("1GiB", 2**30),
                                         ("1.5MB", 1_500_000), ("2 mb", 2 * 10**6), ("123", 123)])
def test_max_shard_size_reads_sizes_and_bytes(value, size):
    assert shard_size(value) == size


@pytest.mark.parametrize("to", ["hf", "vila"])
@pytest.mark.parametrize("value", ["abc", "0", "5XB", "-1GB"])
def test_bad_max_shard_size_is_an_argument_error_either_way(vila_dir, tmp_path, capsys, to, value):
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--to", to, str(vila_dir), str(tmp_path / "out"), f"--max-shard-size={value}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "argument --max-shard-size: expected a size such as 5GB" in err, err
    assert not (tmp_path / "out").exists()


def test_convert_to_vila_shards_by_max_shard_size(tiny, vila_dir, tmp_path):
    out = tmp_path / "vila"
    assert convert_main(["--to", "vila", str(vila_dir), str(out), "--max-shard-size", "100KB"]) == 0
    for sub in ("llm", "vision_tower"):
        shards = sorted(p.name for p in (out / sub).glob("*.safetensors"))
        assert len(shards) > 1 and (out / sub / "model.safetensors.index.json").exists(), (sub, shards)
        assert max((out / sub / n).stat().st_size for n in shards) < 2 * 100_000 + 4096  # a tensor may overflow
    m, p = VilaHDForConditionalGeneration.from_pretrained(out), VilaHDProcessor.from_pretrained(out)
    torch.testing.assert_close(logits(m, p), logits(*tiny), rtol=0, atol=0)


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_convert_onto_its_own_source_names_it(vila_dir, capsys, force):
    from vila_hd.cli import main as vila_hd_main

    assert vila_hd_main(["convert", "--to", "hf", str(vila_dir), str(vila_dir), *force]) == 1
    err = capsys.readouterr().err
    assert err == f"vila-hd: error: src and dst are the same directory ({vila_dir}); write the converted checkpoint elsewhere\n"


def test_convert_source_must_be_a_checkpoint_directory(tmp_path, capsys, monkeypatch):
    import vila_hd.hub as hub
    from vila_hd.cli import main as vila_hd_main

    def no_hub(*args, **kwargs):
        raise AssertionError("a local path went to the Hub")

    monkeypatch.setattr(hub, "_download", no_hub)
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text(json.dumps({"model_type": "vila_hd"}))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    monkeypatch.chdir(tmp_path)
    for src, message in [
        ("adapter", "adapter is a LoRA adapter (adapter_config.json, no config.json), not a checkpoint: merge it "
                    "into its base model first with `vila-hd merge-lora --adapter adapter --out MERGED`"),
        ("img.png", "checkpoint img.png is a file; expected a checkpoint directory or a Hub id"),
        ("./nope", "checkpoint directory ./nope does not exist (and it is not a Hub id owner/name"),
        ("empty", "empty has no config.json; it is not a VILA-HD checkpoint"),
        ("config-only", "config-only has no *.safetensors weights; it is not a VILA-HD checkpoint"),
    ]:
        assert vila_hd_main(["convert", "--to", "hf", src, "out"]) == 1, src
        err = capsys.readouterr().err
        assert err.startswith(f"vila-hd: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def broken_copy(tiny, tmp_path, edit):
    root = tmp_path / "broken"
    write_vila_layout(*tiny, root)
    edit(root)
    return root


def test_missing_projector_key_is_named(tiny, tmp_path):
    def drop(root):
        path = root / "mm_projector" / "model.safetensors"
        state = load_file(path)
        del state["layers.2.weight"]
        save_file(state, path)

    with pytest.raises(CheckpointError, match=r"\(mm_projector/\): 1 missing key \(mm_projector.layers.2.weight\)"):
        VilaHDForConditionalGeneration.from_pretrained(broken_copy(tiny, tmp_path, drop))


def test_mismatched_projector_key_is_named(tiny, tmp_path):
    def reshape(root):
        path = root / "mm_projector" / "model.safetensors"
        state = load_file(path)
        state["layers.4.weight"] = torch.zeros(3, 3)
        state["extra.weight"] = torch.zeros(1)
        save_file(state, path)

    with pytest.raises(CheckpointError, match=r"1 unexpected key \(mm_projector.extra.weight\).*mm_projector.layers.4.weight \(3, 3\) vs"):
        VilaHDForConditionalGeneration.from_pretrained(broken_copy(tiny, tmp_path, reshape))


def test_missing_llm_key_is_named(tiny, tmp_path):
    def drop(root):
        path = root / "llm" / "model.safetensors"
        state = load_file(path)
        del state["model.layers.1.mlp.up_proj.weight"]
        save_file(state, path, metadata={"format": "pt"})

    with pytest.raises(CheckpointError, match=r"\(llm/\): 1 missing key \(language_model.model.layers.1.mlp.up_proj.weight\)"):
        VilaHDForConditionalGeneration.from_pretrained(broken_copy(tiny, tmp_path, drop))


def test_inconsistent_config_is_named(tiny, tmp_path):
    def lie(root):
        top = json.load(open(root / "config.json"))
        top["mm_hidden_size"] = 1152
        json.dump(top, open(root / "config.json", "w"))

    with pytest.raises(CheckpointError, match=r"mm_hidden_size=1152 \(the sub-checkpoints give 32\)"):
        read_vila_config(broken_copy(tiny, tmp_path, lie))


def test_missing_subdirectory(tmp_path):
    json.dump({"model_type": "llava_topdown_llama", "ps3": True}, open(tmp_path / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"lacks the sub-directories \['llm', 'vision_tower', 'mm_projector'\]"):
        read_vila_config(tmp_path)


def test_hub_ids_resolve_like_local_directories(tiny, vila_dir, monkeypatch):
    """A Hub id of a VILA checkpoint goes through the same loader as its local directory."""
    import huggingface_hub

    requested = []

    def fake_file(repo_id, filename, **kwargs):
        requested.append((repo_id, filename))
        return str(vila_dir / filename)

    def fake_snapshot(repo_id, allow_patterns=None, **kwargs):
        requested.append((repo_id, "snapshot"))
        assert not any(p.endswith((".bin", ".pt")) for p in allow_patterns)  # safetensors only
        return str(vila_dir)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    hub_id = "nvidia/VILA-HD-8B-PS3-4K-SigLIP2"
    model = VilaHDForConditionalGeneration.from_pretrained(hub_id)
    processor = VilaHDProcessor.from_pretrained(hub_id)
    assert (hub_id, "config.json") in requested and (hub_id, "snapshot") in requested
    torch.testing.assert_close(logits(model, processor), logits(*tiny), rtol=0, atol=0)


def test_builder_assembles_from_ps3_and_llm(tiny, tmp_path):
    from vila_hd.builder import build_vila_hd

    model, processor = tiny
    ps3_dir, llm_dir = tmp_path / "ps3", tmp_path / "llm"
    model.vision_tower.save_pretrained(ps3_dir)
    processor.image_processor.save_pretrained(ps3_dir)
    model.language_model.save_pretrained(llm_dir)
    processor.tokenizer.save_pretrained(llm_dir)
    built, built_processor = build_vila_hd(ps3_dir, llm_dir, image_token="<img>", num_look_close=1, seed=0)
    # The new placeholder token was added and the LLM's embeddings grew with it.
    assert built_processor.image_token == "<img>" and built.config.image_token_id == len(processor.tokenizer)
    assert built.get_input_embeddings().weight.shape[0] == len(processor.tokenizer) + 1
    # Pretrained parts keep their weights; the prompt head gets the reference's init.
    torch.testing.assert_close(built.vision_tower.state_dict(), model.vision_tower.state_dict(), rtol=0, atol=0)
    emb = model.language_model.get_input_embeddings().weight
    torch.testing.assert_close(built.get_input_embeddings().weight[: emb.shape[0]], emb, rtol=0, atol=0)
    head = built.mm_projector.top_down_prompt_head
    assert head.fc1.weight.abs().max() <= 0.02 and head.fc1.bias.abs().max() <= 0.02
    assert torch.equal(head.norm.weight, torch.ones_like(head.norm.weight))
    text = built_processor.apply_chat_template([{"role": "user", "content": "<img>What color is the car?"}])
    inputs = built_processor(text=text, images=[rgb(1)])
    with torch.no_grad():
        out = built.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
