"""Regional torch.compile for training (train/compile.py): same losses and gradients as eager, with gradient
checkpointing and through the DeepSpeed trainer; the recipe's ``compile`` section; which blocks get compiled.

The compiled runs use the ``aot_eager`` backend (dynamo + AOT autograd, no code generation), which keeps them
quick on CPU; inductor's extra step (code generation) is not exercised here (about a minute on 2 CPU cores)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tolerances import assert_fp_close, fp_approx
from train_helpers import losses, make_dataset, one_thread, stage_dict, step_samples  # noqa: F401

from vila_hd.builder import build_tiny_model
from vila_hd.train.compile import compile_blocks, is_compiled, llm_blocks, vision_blocks
from vila_hd.train.config import CompileConfig, load_stage, stage_from_dict
from vila_hd.train.data.collate import Collator
from vila_hd.train.model_step import VilaHDTrainStep
from vila_hd.train.stage import enable_gradient_checkpointing

LOOK = {"num_look_close": 2}
ALL_PARTS = {"projector": 1e-3, "prompt_head": 1e-3, "selection": 1e-3, "vision_tower": 1e-3, "llm": 1e-3}


@pytest.fixture(autouse=True)
def _fresh_dynamo(one_thread):  # noqa: F811
    """Compiled-graph caches and recompile counts are per code object, shared by every model in the process."""
    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    yield
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.reset()


def _samples(processor, folder):
    return step_samples(processor, folder, LOOK)


def _loss_and_grads(step, model, batch):
    model.zero_grad()
    out = step(batch)
    (out["lm"] + out["selection"]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


def test_compiled_blocks_give_the_eager_losses_and_gradients(tmp_path):
    from torch._dynamo.testing import CompileCounterWithBackend

    model, processor = build_tiny_model("tiny", seed=3)
    config = stage_from_dict({"init": {"preset": "tiny"}, "trainable": ALL_PARTS})
    for p in model.parameters():
        p.requires_grad_(True)
    enable_gradient_checkpointing(model, config)  # HF non-reentrant (LLM) + PS3's own flag
    assert model.vision_tower.vision_model.gradient_checkpointing
    step = VilaHDTrainStep(model, LOOK).train()
    batch = Collator(processor.tokenizer.pad_token_id, (448, 448), 2048)(_samples(processor, tmp_path))
    ref_out, ref_grads = _loss_and_grads(step, model, batch)

    counters = {part: CompileCounterWithBackend("aot_eager") for part in ("llm", "vision")}
    for part, counter in counters.items():
        compile_blocks(model, SimpleNamespace(backend=counter, mode=None, dynamic=None,
                                              llm=part == "llm", vision=part == "vision"))
    out, grads = _loss_and_grads(step, model, batch)
    assert all(c.frame_count >= 1 for c in counters.values()), {k: c.frame_count for k, c in counters.items()}
    for key in ref_out:
        assert_fp_close(out[key], ref_out[key])
    assert grads.keys() == ref_grads.keys() and any(".trunk.blocks." in n for n in grads)
    for name in ref_grads:
        assert_fp_close(grads[name], ref_grads[name], msg=name)
    model.zero_grad()


def test_compile_blocks_compiles_the_block_stacks_and_respects_the_switches():
    model, _ = build_tiny_model("tiny")
    n_llm, n_vision = model.config.text_config.num_hidden_layers, model.config.vision_config.num_hidden_layers
    assert (len(llm_blocks(model)), len(vision_blocks(model))) == (n_llm, n_vision) == (2, 4)

    summary = compile_blocks(model, CompileConfig(enabled=True, backend="aot_eager", vision=False))
    assert summary == ["llm: 2 x Qwen2DecoderLayer"]
    compiled = [name for name, m in model.named_modules() if is_compiled(m)]
    assert compiled == ["language_model.model.layers.0", "language_model.model.layers.1"]

    summary = compile_blocks(model, CompileConfig(enabled=True, backend="aot_eager", llm=False, recompile_limit=16))
    assert summary == ["vision: 4 x Block"] and torch._dynamo.config.recompile_limit == 16
    compiled = {name for name, m in model.named_modules() if is_compiled(m)}
    assert len(compiled) == n_llm + n_vision
    assert {n for n in compiled if ".trunk.blocks." in n} == {f"vision_tower.vision_model.trunk.blocks.{i}"
                                                             for i in range(4)}
    assert compile_blocks(model, CompileConfig(llm=False, vision=False)) == []


def test_compile_blocks_finds_the_layers_under_lora():
    pytest.importorskip("peft")
    from vila_hd.train.config import LoraConfig
    from vila_hd.train.lora import apply_lora

    model, _ = build_tiny_model("tiny")
    peft_model = apply_lora(model, LoraConfig(r=4, vision_tower=True), ["llm", "projector"])
    summary = compile_blocks(peft_model, CompileConfig(enabled=True, backend="aot_eager"))
    assert summary == ["llm: 2 x Qwen2DecoderLayer", "vision: 4 x Block"]
    assert sum(is_compiled(m) for m in peft_model.modules()) == 6
    assert all(is_compiled(b) for b in model.language_model.model.layers)


def test_the_recipe_parses_the_compile_section_and_names_bad_keys(tmp_path):
    default = stage_from_dict({"init": {"preset": "tiny"}})
    assert default.compile == CompileConfig() and not default.compile.enabled
    cfg = stage_from_dict({"init": {"preset": "tiny"}, "compile": {"enabled": True, "mode": "max-autotune-no-cudagraphs",
                                                                   "vision": False}}, ["compile.dynamic=false"])
    assert (cfg.compile.enabled, cfg.compile.backend, cfg.compile.mode) == (True, "inductor", "max-autotune-no-cudagraphs")
    assert (cfg.compile.dynamic, cfg.compile.llm, cfg.compile.vision) == (False, True, False)
    assert cfg.to_dict()["compile"]["enabled"] is True

    path = tmp_path / "stage.yaml"
    path.write_text("init: {preset: tiny}\ncompile: {enabled: true, mode: fast}\n")
    with pytest.raises(ValueError, match=r"stage\.yaml: compile\.mode must be one of .*'fast'"):
        load_stage(str(path))
    with pytest.raises(ValueError, match=r"compile: unknown key\(s\) \['fullgraph'\]"):
        stage_from_dict({"init": {"preset": "tiny"}, "compile": {"fullgraph": True}})
    for bad in ("compile.enabled=yes please", "compile.dynamic=3", "compile.recompile_limit=0", "compile.backend=null"):
        with pytest.raises(ValueError, match=rf"compile\.{bad.split('.')[1].split('=')[0]}"):
            stage_from_dict({"init": {"preset": "tiny"}}, [bad])


def test_a_compiled_stage_trains_like_the_eager_one(tmp_path):
    pytest.importorskip("deepspeed")
    from vila_hd.train.stage import run_stage

    data = make_dataset(str(tmp_path / "data"), n=4)
    runs = {}
    for enabled in (False, True):
        out = str(tmp_path / f"compile_{enabled}")
        cfg = stage_from_dict(stage_dict(data, out, max_steps=2, trainable=ALL_PARTS,
                                         **{"compile.enabled": enabled, "compile.backend": "aot_eager",
                                            "batch.global_batch_size": 2,
                                            "checkpoint.every_steps": 100, "checkpoint.export_final": False}))
        run = run_stage(cfg)
        runs[enabled] = losses(out)
        blocks = [*llm_blocks(run.model), *vision_blocks(run.model)]
        assert [is_compiled(b) for b in blocks] == [enabled] * 6
    assert sorted(runs[True]) == [1, 2]
    for s in runs[False]:
        assert runs[True][s] == fp_approx(runs[False][s]), runs
