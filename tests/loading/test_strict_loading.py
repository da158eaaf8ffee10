"""Nothing loads half a model (issue #13 section 5a), nor a model of guessed sizes (section 6).

A checkpoint with a tensor removed, with none at all (an empty ``model.safetensors``), with an extra tensor or
with a mis-shaped one is a ``CheckpointError`` naming the keys -- for our single-directory format, a PS3 checkpoint
and the VILA layout's LLM (its other parts: tests/compat/test_vila_checkpoint.py), in the library and through ``vila-hd
chat`` (one line, exit 1, no traceback, no transformers load-report table). ``allow_missing_keys=`` /
``allow_unexpected_keys=`` patterns (and transformers' ``ignore_mismatched_sizes=True``) allow them explicitly:
then only the allowed tensors are fresh, every other one is the checkpoint's, bit for bit. A PS3 ``model_name``
that is not a known backbone needs its sizes explicitly (``ConfigError`` naming the name, the known names and the
fields), instead of getting SO400M sizes and failing on every tensor's shape.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import fresh_job_env

from vila_hd.hub import CheckpointError
from vila_hd.model import VilaHDForConditionalGeneration

EXE = os.path.join(os.path.dirname(sys.executable), "vila-hd")
ERROR_LINE = re.compile(r"^vila-hd( [a-z-]+)*: error: ")
WEIGHTS = "model.safetensors"
DROPPED = "mm_projector.layers.2.weight"
HEAD = r"^mm_projector\.top_down_prompt_head\."  # a new prompt head, as a stage could start it fresh


def rewrite(directory: Path, edit) -> dict[str, torch.Tensor]:
    """Replace ``directory/model.safetensors`` by ``edit(tensors)`` (metadata format=pt, as transformers writes);
    returns the original tensors."""
    original = load_file(directory / WEIGHTS)
    save_file(edit(dict(original)), directory / WEIGHTS, metadata={"format": "pt"})
    return original


def without(*keys: str):
    return lambda state: {k: v for k, v in state.items() if k not in keys}


def assert_only_fresh(model: torch.nn.Module, original: dict[str, torch.Tensor], fresh: set[str]) -> None:
    """Every tensor of ``original`` but ``fresh`` is loaded bit for bit; the ``fresh`` ones are initialised (finite)
    and, unless all are constant-initialised (norms: ones / zeros), not all equal to the original."""
    state = model.state_dict()
    for key, value in original.items():
        if key in fresh:
            assert torch.isfinite(state[key]).all(), f"{key} was not initialised"
        elif key in state:
            assert torch.equal(state[key], value), f"{key} was not loaded from the checkpoint"
    random = [k for k in fresh if original[k].unique().numel() > 1]
    assert not random or any(not torch.equal(state[k], original[k]) for k in random), "fresh tensors hold the originals"


@pytest.fixture
def load_reports():
    """The load-report tables transformers logs (on stderr, by its own handler) while the test runs."""
    reports: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: reports.append(record.getMessage()) if "LOAD REPORT" in record.getMessage() \
        else None
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    yield reports
    logger.removeHandler(handler)


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


# --- our single-directory format ------------------------------------------------------------------------------
def test_a_missing_tensor_is_named(checkpoint, load_reports, reliability):
    rewrite(checkpoint, without(DROPPED))
    with pytest.raises(CheckpointError, match=rf"ckpt: 1 missing key \({re.escape(DROPPED)}\); .*allow_missing_keys="
                       ) as err:
        VilaHDForConditionalGeneration.from_pretrained(checkpoint)
    assert "\n" not in str(err.value)
    assert not load_reports  # the error names the keys; no transformers table besides
    reliability.add("contents", "damaged_weight_cases", 1)


def test_an_empty_weights_file_is_named(checkpoint, reliability):
    original = rewrite(checkpoint, lambda state: {})
    first = sorted(original)[0]
    with pytest.raises(CheckpointError, match=rf"{len(original)} missing keys \({re.escape(first)}, .*"
                                              rf"\.\.\. \({len(original) - 5} more\)\)"):
        VilaHDForConditionalGeneration.from_pretrained(checkpoint)
    reliability.add("contents", "damaged_weight_cases", 1)


def test_an_unexpected_tensor_is_named(checkpoint, reliability):
    rewrite(checkpoint, lambda state: {**state, "mm_projector.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"1 unexpected key \(mm_projector\.extra\.weight\); .*"
                                              r"allow_unexpected_keys="):
        VilaHDForConditionalGeneration.from_pretrained(checkpoint)
    reliability.add("contents", "damaged_weight_cases", 1)


def test_a_mis_shaped_tensor_is_named_not_a_transformers_runtime_error(checkpoint, reliability):
    original = rewrite(checkpoint, lambda state: {**state, DROPPED: torch.zeros(3, 3)})
    shape = tuple(original[DROPPED].shape)
    with pytest.raises(CheckpointError, match=rf"mismatched shapes \(checkpoint vs model\): {re.escape(DROPPED)} "
                                              rf"\(3, 3\) vs {re.escape(str(shape))}; .*ignore_mismatched_sizes=True"):
        VilaHDForConditionalGeneration.from_pretrained(checkpoint)
    reliability.add("contents", "damaged_weight_cases", 1)


def test_allowed_missing_keys_start_fresh_and_nothing_else(checkpoint, reliability):
    original = rewrite(checkpoint, without(DROPPED))
    with pytest.raises(CheckpointError, match="1 missing key"):  # a pattern that does not cover it allows nothing
        VilaHDForConditionalGeneration.from_pretrained(checkpoint, allow_missing_keys=[HEAD])
    model = VilaHDForConditionalGeneration.from_pretrained(checkpoint, allow_missing_keys=re.escape(DROPPED))
    assert_only_fresh(model, original, {DROPPED})
    reliability.add("contents", "allowance_cases", 1)


def test_a_new_prompt_head_can_be_started_fresh(checkpoint, reliability):
    """The case the allowance is for: a checkpoint without a prompt head, loaded into a model that has one."""
    head = {k for k in load_file(checkpoint / WEIGHTS) if re.search(HEAD, k)}
    assert head
    original = rewrite(checkpoint, without(*head))
    with pytest.raises(CheckpointError, match=f"{len(head)} missing keys"):
        VilaHDForConditionalGeneration.from_pretrained(checkpoint)
    model = VilaHDForConditionalGeneration.from_pretrained(checkpoint, allow_missing_keys=[HEAD])
    assert_only_fresh(model, original, head)
    reliability.add("contents", "allowance_cases", 1)


def test_allowed_unexpected_and_mis_shaped_tensors(checkpoint, reliability):
    original = rewrite(checkpoint, lambda state: {**state, "mm_projector.extra.weight": torch.zeros(2)})
    model = VilaHDForConditionalGeneration.from_pretrained(checkpoint, allow_unexpected_keys=[r"\.extra\."])
    assert_only_fresh(model, original, set())
    rewrite(checkpoint, lambda state: {**without("mm_projector.extra.weight")(state), DROPPED: torch.zeros(3, 3)})
    model = VilaHDForConditionalGeneration.from_pretrained(checkpoint, ignore_mismatched_sizes=True)
    assert tuple(model.state_dict()[DROPPED].shape) == tuple(original[DROPPED].shape)
    assert_only_fresh(model, original, {DROPPED})
    reliability.add("contents", "allowance_cases", 2)


def test_the_intact_checkpoint_loads_bit_for_bit(checkpoint):
    model, info = VilaHDForConditionalGeneration.from_pretrained(checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_only_fresh(model, load_file(checkpoint / WEIGHTS), set())


def test_training_init_and_the_engine_refuse_half_a_model(checkpoint):
    """What ``init: {model: DIR}`` (train/stage.py) and ``vila-hd chat`` / ``infer`` / ``eval`` load through."""
    from vila_hd.loading import load_pretrained as load_model
    from vila_hd.train.lora import load_base_model

    rewrite(checkpoint, without(DROPPED))
    for load in (lambda: load_base_model(str(checkpoint)), lambda: load_model(str(checkpoint), device="cpu")):
        with pytest.raises(CheckpointError, match=re.escape(DROPPED)):
            load()


def test_chat_names_the_missing_tensor_in_one_line(checkpoint, tmp_path, reliability):
    rewrite(checkpoint, without(DROPPED))
    env = {**fresh_job_env(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([EXE, "chat", "--model", str(checkpoint), "--prompt", "hi"], cwd=tmp_path, env=env,
                          capture_output=True, encoding="utf-8", timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "LOAD REPORT" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if ERROR_LINE.match(line)]
    assert len(lines) == 1 and f"1 missing key ({DROPPED})" in lines[0], proc.stderr[-3000:]
    assert not proc.stdout.strip(), proc.stdout  # no answer printed
    reliability.add("contents", "damaged_weight_cases", 1)


# --- PS3 ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def ps3_dir(tiny, tmp_path) -> Path:
    path = tmp_path / "ps3"
    tiny[0].vision_tower.save_pretrained(path)
    return path


def test_ps3_checkpoint_with_a_tensor_removed_none_or_one_extra(ps3_dir, reliability):
    from vila_hd.ps3 import PS3VisionModel

    key = "vision_model.prior_prompt"
    original = rewrite(ps3_dir, without(key))
    with pytest.raises(CheckpointError, match=rf"PS3 checkpoint .*: 1 missing key \({re.escape(key)}\)"):
        PS3VisionModel.from_pretrained(ps3_dir)
    assert_only_fresh(PS3VisionModel.from_pretrained(ps3_dir, allow_missing_keys=r"prior_prompt$"), original, {key})
    rewrite(ps3_dir, lambda state: {})
    with pytest.raises(CheckpointError, match=rf"PS3 checkpoint .*: {len(original)} missing keys"):
        PS3VisionModel.from_pretrained(ps3_dir)
    save_file({**original, "vision_model.extra": torch.zeros(1)}, ps3_dir / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 unexpected key \(vision_model\.extra\)"):
        PS3VisionModel.from_pretrained(ps3_dir)
    model = PS3VisionModel.from_pretrained(ps3_dir, allow_unexpected_keys=[r"\.extra$"])
    assert_only_fresh(model, original, set())
    reliability.add("contents", "damaged_weight_cases", 3)
    reliability.add("contents", "allowance_cases", 2)


def test_a_full_ps3_checkpoint_fills_either_tower_by_design(tmp_path):
    """A released ``ps3`` checkpoint holds both towers and the contrastive scalars: each tower ignores the rest."""
    from vila_hd.ps3 import PS3Model, PS3TextModel, PS3VisionModel
    from vila_hd.ps3.configuration import PS3Config, tiny_text_config, tiny_vision_config

    torch.manual_seed(0)
    PS3Model(PS3Config(vision_config=tiny_vision_config(), text_config=tiny_text_config())).save_pretrained(tmp_path)
    original = load_file(tmp_path / WEIGHTS)
    for cls in (PS3VisionModel, PS3TextModel, PS3Model):
        assert_only_fresh(cls.from_pretrained(tmp_path), original, set())


# --- the VILA layout's LLM (the other parts: tests/compat/test_vila_checkpoint.py) -------------------------------------
@pytest.fixture
def vila_dir(tiny, tmp_path) -> Path:
    from vila_hd.compat.vila_checkpoint import export_vila_checkpoint

    export_vila_checkpoint(*tiny, tmp_path / "vila")
    return tmp_path / "vila"


def test_vila_llm_mis_shaped_or_missing_tensor_is_named_as_a_key_of_the_model(vila_dir, load_reports, reliability):
    key = "model.layers.0.mlp.up_proj.weight"
    llm = vila_dir / "llm"
    original = rewrite(llm, lambda state: {**state, key: torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match=rf"\(llm/\): mismatched shapes \(checkpoint vs model\): "
                                              rf"language_model\.{re.escape(key)} \(2, 2\) vs"):
        VilaHDForConditionalGeneration.from_pretrained(vila_dir)
    assert not load_reports
    save_file(without(key)(original), llm / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"\(llm/\): 1 missing key \(language_model\.{re.escape(key)}\)"):
        VilaHDForConditionalGeneration.from_pretrained(vila_dir)
    model = VilaHDForConditionalGeneration.from_pretrained(vila_dir, allow_missing_keys=[re.escape(key) + "$"])
    assert_only_fresh(model.language_model, original, {key})
    reliability.add("contents", "damaged_weight_cases", 2)
    reliability.add("contents", "allowance_cases", 1)


# --- an unknown PS3 backbone (issue #13 section 6) -----------------------------------------------------------
SO400M = dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304, patch_size=14)
SIZES = tuple(SO400M)
RELEASED = ("vit_so400m_patch14_siglip_384", "vit_so400m_patch14_siglip_378")  # ../shared/docs/ps3-reference.md §1


def test_an_unknown_backbone_without_its_sizes_is_refused_by_name(reliability):
    from vila_hd.errors import ConfigError
    from vila_hd.ps3 import PS3VisionConfig

    with pytest.raises(ConfigError) as err:
        PS3VisionConfig(model_name="vit_giant_patch16_custom")
    message = str(err.value)
    assert "model_name='vit_giant_patch16_custom' is not a known backbone" in message and "\n" not in message
    assert all(name in message for name in RELEASED)
    assert f"set {', '.join(SIZES)} explicitly" in message
    with pytest.raises(ConfigError, match=r"set num_hidden_layers, intermediate_size explicitly"):  # only those
        PS3VisionConfig(model_name="vit_custom", hidden_size=32, num_attention_heads=4, patch_size=14)
    reliability.add("contents", "backbone_refusals", 2)


def test_an_unknown_backbone_with_explicit_sizes_builds_and_round_trips(tmp_path):
    from vila_hd.model.configuration import VilaHDConfig
    from vila_hd.model.tiny import tiny_config
    from vila_hd.ps3 import PS3VisionConfig, PS3VisionModel
    from vila_hd.ps3.configuration import tiny_vision_config

    torch.manual_seed(0)
    PS3VisionModel(tiny_vision_config(model_name="my_tiny_vit")).save_pretrained(tmp_path / "ps3")
    config = PS3VisionModel.from_pretrained(tmp_path / "ps3").config
    assert config.model_name == "my_tiny_vit" and (config.hidden_size, config.num_hidden_layers) == (32, 4)
    same_as_so400m = PS3VisionConfig(model_name="my_so400m", **SO400M, select_based_on_layer=[0, 9, 18, 26])
    same_as_so400m.save_pretrained(tmp_path / "so400m")  # sizes equal to the defaults are kept in the file too
    assert PS3VisionConfig.from_pretrained(tmp_path / "so400m").to_dict() == same_as_so400m.to_dict()
    tiny_config("tiny", vision_overrides={"model_name": "my_tiny_vit"}).save_pretrained(tmp_path / "vila_hd")
    vision = VilaHDConfig.from_pretrained(tmp_path / "vila_hd").vision_config
    assert vision.model_name == "my_tiny_vit" and vision.num_hidden_layers == 4


def test_the_released_backbone_names_still_resolve():
    from vila_hd.ps3 import PS3VisionConfig, preset_config
    from vila_hd.ps3.configuration import PRESETS

    for name in (*RELEASED, None):  # None: an unnamed backbone is the reference's SO400M
        config = PS3VisionConfig(model_name=name, select_based_on_layer=[0, 9, 18, 26])
        assert {k: getattr(config, k) for k in SIZES} == SO400M, name
    for preset in PRESETS:
        vision = preset_config(preset).vision_config
        assert vision.model_name in RELEASED and {k: getattr(vision, k) for k in SIZES} == SO400M, preset


def test_loading_an_unknown_backbone_names_the_config_file(ps3_dir, reliability):
    from vila_hd.errors import ConfigError
    from vila_hd.ps3 import PS3VisionModel

    config = json.loads((ps3_dir / "config.json").read_text())
    config["model_name"] = "vit_custom"
    del config["num_hidden_layers"]
    (ps3_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(ps3_dir / 'config.json'))}: PS3 vision config: "
                                          r"model_name='vit_custom' is not a known backbone .* set num_hidden_layers"):
        PS3VisionModel.from_pretrained(ps3_dir)
    reliability.add("contents", "backbone_refusals", 1)


def test_convert_refuses_an_unknown_backbone_in_one_line(vila_dir, tmp_path, reliability):
    file = vila_dir / "vision_tower" / "config.json"
    config = json.loads(file.read_text())
    config["model_name"] = "vit_giant_patch16_custom"
    for key in ("num_hidden_layers", "num_attention_heads", "intermediate_size"):
        config.pop(key, None)
    file.write_text(json.dumps(config))
    env = {**fresh_job_env(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    out = tmp_path / "converted"
    proc = subprocess.run([EXE, "convert", "--to", "hf", str(vila_dir), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, encoding="utf-8", timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "LOAD REPORT" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if ERROR_LINE.match(line)]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"vila-hd: error: {file}: PS3 vision config: model_name='vit_giant_patch16_custom'")
    assert "set num_hidden_layers, num_attention_heads, intermediate_size explicitly" in lines[0]
    assert not out.exists() or not any(out.iterdir())
    reliability.add("contents", "backbone_refusals", 1)


# --- a known gap, left to the builder's owner ---------------------------------------------------------------------
def test_the_stage_1_builder_refuses_an_llm_with_a_tensor_removed(tiny, ps3_dir, tmp_path):
    from vila_hd.builder import build_vila_hd

    llm = tmp_path / "llm"
    tiny[0].language_model.save_pretrained(llm)
    tiny[1].tokenizer.save_pretrained(llm)
    rewrite(llm, without("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        build_vila_hd(ps3_dir, llm)
